"""Continual-merging accuracy on a bench suite: every method, all 8 tasks, 3 task orders, through `run_job`.

For each task order and method, one job per task is posted onto a fresh lineage (bench.suite.build.merge_continually,
the path a pipeline takes); each job's metrics hold the accuracy of every merged task on the new version.
From them:
  average accuracy   mean over the 8 tasks of the final version's accuracy
  normalized         mean over tasks of (merged accuracy ÷ that task's individual fine-tuned accuracy)
  BWT                mean over tasks 1..T−1 of (final accuracy − accuracy right after the task was merged)
reported as mean ± half-range (spread) over the orders, with the curve of average accuracy against the number of
merged tasks plotted to docs/benchmarks-accuracy[-SUITE].png. Also counted: OTMF's degenerate steps, those whose
trained masks never beat the all-ones start (the step is then the plain α-blend).

The report reads eval (`--split eval`, the default). Choosing anything runs on validation instead
(`--split validation`, image suite only): the process then cannot open eval data (bench/suite/split.py).

    .venv/bin/python -m bench.accuracy [--suite image|text] [--split eval|validation] [--orders 3]
                                       [--methods otmf-paper,ties] [--otmf-params '{"alpha": 0.6}']
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from bench.common import CACHE, DOCS, fork_pool, machine, now, read_result, write_result
from bench.suite import SUITES, get_suite, task_orders
from core.uris import file_uri_path

# label: (method, params, head tuning). Everything else is the method's defaults (core/methods.py). The paper's own
# mode comes first: OTMF without replay (pre_data "current": D_pre is the current task's calibration inputs), at the
# α that mode scored best with on the validation split (bench/results/otmf_select.json). The
# reservoir stores unlabelled inputs of earlier tasks and replays them, an extension. "+heads" labels give every job
# the task's labelled head_data, so the step ends with the paper's head tuning; they are not data-free, so task
# arithmetic is run with the same labels to compare like with like.
# Replay rows measured with the head's features as the replayed inputs' teacher say so (replay_targets "head"):
# stored task features became the default later.
# Rows without `composition` or `alpha` in their stored params ran the convex blend, the default before the additive
# composition, and replay rows without `reservoir_per_task` or `batch_size` stored 64 inputs per task, 512 in all, and
# read batches of 16, the defaults before 1024 and 32: the replay rows name both here, so that running them again
# measures the same thing.
_REPLAY_SIZES_BEFORE = {"reservoir_per_task": 64, "reservoir_size": 512, "batch_size": 16}
_REPLAY = {"pre_data": "reservoir", "replay_targets": "head", "composition": "convex", **_REPLAY_SIZES_BEFORE}
_ANCHORED = {"pre_data": "reservoir", "replay_targets": "task", "composition": "convex", **_REPLAY_SIZES_BEFORE}
_ANCHORED_ADDITIVE = {**_ANCHORED, "composition": "additive"}
# OTMF's defaults with replay: 1024 stored inputs (128 per task) and batches of 32 (otmf_replay_default_levers.json).
_DEFAULT_REPLAY = {**_ANCHORED_ADDITIVE, "reservoir_per_task": 128, "reservoir_size": 1024, "batch_size": 32}
# The defaults with replay, each replayed input aligned through its own task's head as well.
_OWN_HEADS = {**_DEFAULT_REPLAY, "head_alignment": 3.0, "replay_heads": "own"}
METHODS: dict[str, tuple[str, dict, bool]] = {
    "otmf-paper": ("otmf", {"pre_data": "current", "alpha": 0.8}, False),
    "otmf-paper+heads": ("otmf", {"pre_data": "current", "alpha": 0.8}, True),
    "otmf-replay": ("otmf", _REPLAY, False),
    "otmf-replay+heads": ("otmf", _REPLAY, True),
    # The additive composition (θ0 + M_pre⊙τ_pre + λ·M_post⊙τ_post, task arithmetic's sum at all-ones masks) is
    # ours; lr 0.03 is what the no-replay mode scored best with on the validation split (otmf_composition.json). Both
    # are now OTMF's defaults without replay; the rows keep them explicit, as they were measured.
    "otmf-additive": ("otmf", {"pre_data": "current", "composition": "additive", "lr": 0.03}, False),
    "otmf-additive+heads": ("otmf", {"pre_data": "current", "composition": "additive", "lr": 0.03}, True),
    "otmf-replay-additive": ("otmf", {**_REPLAY, "composition": "additive"}, False),
    "otmf-replay-additive+heads": ("otmf", {**_REPLAY, "composition": "additive"}, True),
    # Aligning through the task heads (head_alignment, ours): the weights each mode scored best with on the
    # validation split over 3 orders (otmf_head_alignment.json, otmf_head_alignment_wide.json).
    "otmf-paper-aligned": ("otmf", {"pre_data": "current", "alpha": 0.8, "head_alignment": 10.0}, False),
    "otmf-paper-aligned+heads": ("otmf", {"pre_data": "current", "alpha": 0.8, "head_alignment": 10.0}, True),
    "otmf-additive-aligned": ("otmf", {"pre_data": "current", "composition": "additive", "lr": 0.03,
                                       "head_alignment": 3.0}, False),
    "otmf-replay-aligned": ("otmf", {**_REPLAY, "head_alignment": 3.0}, False),
    "otmf-replay-additive-aligned": ("otmf", {**_REPLAY, "composition": "additive", "head_alignment": 3.0}, False),
    # Replayed inputs matched against the features their own task's fine-tune gave them, stored with them
    # (replay_targets "task", ours), instead of against the lineage head's (otmf_replay_targets.json).
    "otmf-replay-anchored": ("otmf", _ANCHORED, False),
    # ... with the additive composition (it led on the validation split, otmf_replay_composition.json).
    "otmf-replay-additive-anchored": ("otmf", _ANCHORED_ADDITIVE, False),
    "otmf-replay-additive-anchored+heads": ("otmf", _ANCHORED_ADDITIVE, True),
    # ... with 1024 stored inputs and batches of 32: the defaults with replay since they led on the validation split
    # (otmf_replay_default_levers.json).
    "otmf-replay-default": ("otmf", _DEFAULT_REPLAY, False),
    "otmf-replay-default+heads": ("otmf", _DEFAULT_REPLAY, True),
    # With head tuning the stored targets are the merged tower's, the one the re-fitted head reads; rows with
    # "fine-tune" kept the fine-tune's features even there (replay_targets "fine_tune").
    "otmf-replay-anchored+heads": ("otmf", _ANCHORED, True),
    "otmf-replay-anchored-fine-tune+heads": ("otmf", {**_ANCHORED, "replay_targets": "fine_tune"}, True),
    "otmf-replay-additive-aligned-anchored": ("otmf", {**_ANCHORED, "composition": "additive",
                                                       "head_alignment": 3.0}, False),
    # ... with twice the stored inputs (128 per task, 1024 in all; otmf_replay_size.json).
    "otmf-replay-additive-aligned-anchored-1024": ("otmf", {
        **_ANCHORED, "composition": "additive", "head_alignment": 3.0, "reservoir_per_task": 128,
        "reservoir_size": 1024}, False),
    # ... and batches of 32 inputs instead of 16 (otmf_replay_longer.json, otmf_replay_batch.json).
    "otmf-replay-additive-aligned-anchored-1024-b32": ("otmf", {
        **_ANCHORED, "composition": "additive", "head_alignment": 3.0, "reservoir_per_task": 128,
        "reservoir_size": 1024, "batch_size": 32}, False),
    # ... with each replayed input aligned through its own task's head only (otmf_replay_own_heads.json).
    "otmf-replay-additive-aligned-own-anchored-1024-b32": ("otmf", _OWN_HEADS, False),
    # ... and 200 iterations per step (chosen on the validation split of build 36251161fbef,
    # otmf_replay_own_heads_3625.json).
    "otmf-replay-additive-aligned-own-anchored-1024-b32-200": ("otmf", {**_OWN_HEADS, "steps": 200}, False),
    # One mask value per output row of each 2-D weight instead of per element (the low-memory masks).
    "otmf-paper-row": ("otmf", {"pre_data": "current", "alpha": 0.8, "mask_granularity": "row"}, False),
    "otmf-replay-row": ("otmf", {**_REPLAY, "mask_granularity": "row"}, False),
    "task_arithmetic": ("task_arithmetic", {}, False),
    "task_arithmetic+heads": ("task_arithmetic", {}, True),
    "ties": ("ties", {}, False),
    "opcm": ("opcm", {}, False),
    "weight_average": ("weight_average", {}, False),
}
LABELS = {
    "otmf-paper": "OTMF (paper: no replay)",
    "otmf-paper+heads": "OTMF (paper: no replay) + heads",
    "otmf-replay": "OTMF + replay (extension)",
    "otmf-replay+heads": "OTMF + replay (extension) + heads",
    "otmf-additive": "OTMF, no replay, additive composition (extension)",
    "otmf-additive+heads": "OTMF, no replay, additive composition (extension) + heads",
    "otmf-replay-additive": "OTMF + replay, additive composition (extensions)",
    "otmf-replay-additive+heads": "OTMF + replay, additive composition (extensions) + heads",
    "otmf-paper-aligned": "OTMF (paper: no replay), aligned through the heads (extension)",
    "otmf-paper-aligned+heads": "OTMF (paper: no replay), aligned through the heads (extension) + heads",
    "otmf-additive-aligned": "OTMF, no replay, additive composition, aligned through the heads (extensions)",
    "otmf-replay-aligned": "OTMF + replay, aligned through the heads (extensions)",
    "otmf-replay-additive-aligned": "OTMF + replay, additive composition, aligned through the heads (extensions)",
    "otmf-replay-anchored": "OTMF + replay against stored task features (extensions)",
    "otmf-replay-anchored+heads": "OTMF + replay against stored task features (extensions) + heads",
    "otmf-replay-additive-anchored": "OTMF + replay against stored task features, additive composition "
                                     "(extensions)",
    "otmf-replay-additive-anchored+heads": "OTMF + replay against stored task features, additive composition "
                                           "(extensions) + heads",
    "otmf-replay-anchored-fine-tune+heads": "OTMF + replay against stored fine-tune features (extensions) + heads",
    "otmf-replay-default": "OTMF + replay of 1024 inputs against stored task features, additive composition "
                           "(extensions), batches of 32",
    "otmf-replay-default+heads": "OTMF + replay of 1024 inputs against stored task features, additive composition "
                                 "(extensions), batches of 32 + heads",
    "otmf-replay-additive-aligned-anchored": "OTMF + replay against stored task features, additive composition, "
                                             "aligned through the heads (extensions)",
    "otmf-replay-additive-aligned-anchored-1024": "OTMF + replay of 1024 inputs against stored task features, "
                                                  "additive composition, aligned through the heads (extensions)",
    "otmf-replay-additive-aligned-anchored-1024-b32": "OTMF + replay of 1024 inputs against stored task features, "
                                                      "additive composition, aligned through the heads (extensions), "
                                                      "batches of 32",
    "otmf-replay-additive-aligned-own-anchored-1024-b32": "OTMF + replay of 1024 inputs against stored task "
                                                          "features, additive composition, each replayed input "
                                                          "aligned through its own task's head (extensions), "
                                                          "batches of 32",
    "otmf-replay-additive-aligned-own-anchored-1024-b32-200": "OTMF + replay of 1024 inputs against stored task "
                                                              "features, additive composition, each replayed "
                                                              "input aligned through its own task's head "
                                                              "(extensions), batches of 32, 200 iterations",
    "otmf-paper-row": "OTMF (paper: no replay), row masks",
    "otmf-replay-row": "OTMF + replay (extension), row masks",
    "task_arithmetic": "task arithmetic",
    "task_arithmetic+heads": "task arithmetic + heads",
    "ties": "TIES",
    "opcm": "OPCM",
    "weight_average": "weight averaging",
}
DATA_FREE = ("task_arithmetic", "ties", "opcm", "weight_average")


def run_lineage(suite: dict, order: list[str], method: str, params: dict, *, lineage: str, store, settings,
                tune_heads: bool = False) -> dict:
    from bench.suite.build import merge_continually

    started = time.monotonic()
    results = merge_continually(suite, order, method, params, store=store, settings=settings, lineage=lineage,
                                tune_heads=tune_heads)
    seconds = time.monotonic() - started
    per_step = [{n: m["accuracy"] for n, m in r["metrics"]["tasks"].items()} for r in results]
    steps = [s for r in results for s in r["metrics"]["steps"] if s.get("iterations")]  # fusion steps with data
    return {"order": order, "curve": [r["metrics"]["avg_accuracy"] for r in results], "per_step": per_step,
            "seconds": round(seconds, 2), "job_seconds": [r["metrics"].get("seconds") for r in results],
            "degenerate_steps": [sum(bool(s.get("masks_kept_all_ones")) for s in steps), len(steps)]}


def suite_fingerprint(suite: dict) -> str:
    """The sha256 of the suite's base and task weights (a checkpoint file, or a checkpoint folder's safetensors
    files in order): builds on other machines or thread counts differ, and only results of one build compare. A
    folder's other files (config, tokenizer) are the base's, rewritten by whichever library version saved the
    folder, whose keys change from version to version."""
    digest = hashlib.sha256()
    for uri in [suite["base"]["uri"], *(t["checkpoint"] for t in suite["tasks"].values())]:
        path = file_uri_path(uri)
        for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
            digest.update(f.read_bytes())
    return digest.hexdigest()


def summarise(run: dict, individual: dict[str, float]) -> dict:
    """Average accuracy, normalized accuracy and BWT of one lineage (all fractions in [0, 1])."""
    order, final = run["order"], run["per_step"][-1]
    just_merged = {name: run["per_step"][i][name] for i, name in enumerate(order)}
    bwt = [final[n] - just_merged[n] for n in order[:-1]]
    return {
        "avg_accuracy": statistics.fmean(final[n] for n in order),
        "normalized": statistics.fmean(final[n] / individual[n] for n in order),
        "bwt": statistics.fmean(bwt) if bwt else 0.0,
        "final": final,
    }


_context: dict = {}


def _run_one(work: tuple) -> dict:
    """One lineage of one method and task order, in a worker; a failure is reported, the other runs go on."""
    label, k, order, params = work
    method, _, tune_heads = METHODS[label]
    c, lineage = _context, f"{label.replace('_', '-').replace('+', '-')}-o{k}"
    print(f"[accuracy] {label} order {k}: {' → '.join(order)}", flush=True)
    try:
        run = run_lineage(c["suite"], order, method, params, lineage=lineage, store=c["store"],
                          settings=c["settings"], tune_heads=tune_heads)
    except Exception as exc:  # a method that has not landed yet, or fails
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    run.update(summarise(run, c["individual"]))
    print(f"[accuracy] {label} order {k}: avg {run['avg_accuracy']:.4f} norm {run['normalized']:.4f} "
          f"bwt {run['bwt']:+.4f} ({run['seconds']:.0f} s)", flush=True)
    return run


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "values": values}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="image")
    parser.add_argument("--split", choices=("eval", "validation"), default="eval")
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--otmf-steps", type=int, default=None, help="override OTMF's `steps` (default: its own)")
    parser.add_argument("--otmf-params", default="{}", help="extra OTMF params as JSON, e.g. '{\"lr\": 0.02}'")
    parser.add_argument("--name", default=None, help="result file name under bench/results (default: accuracy, "
                        "then -SUITE unless image, then -validation for the validation split)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="lineages run at once, one torch thread each")
    parser.add_argument("--add", action="store_true", help="add these rows to the existing result file (same suite, "
                        "split and orders), replacing rows of the same label")
    parser.add_argument("--reuse", default=None, help="a result file whose lineages of the same suite build, split, "
                        "row, params and task order are taken instead of run again (e.g. more orders for a result "
                        "of one)")
    args = parser.parse_args(argv)

    from core.settings import Settings
    from core.store import LineageStore

    name = args.name or "-".join(["accuracy", *([args.suite] if args.suite != "image" else []),
                                  *(["validation"] if args.split == "validation" else [])])
    suite = get_suite(log=lambda m: print(m, flush=True), name=args.suite, split=args.split)
    tasks = list(suite["tasks"])
    individual = {n: suite["tasks"][n]["individual_accuracy"] for n in tasks}
    build = suite_fingerprint(suite)  # hashes every checkpoint: once per run
    # One store per run: runs adding rows to the same result at once (--add) must not share lineages.
    store_root = CACHE / "stores" / f"{name}-{os.getpid()}"
    shutil.rmtree(store_root, ignore_errors=True)
    settings = Settings(store=store_root.as_uri(), allowed_roots=str(CACHE), device="cpu")
    store = LineageStore(settings.store)
    orders = task_orders(args.orders, tasks)
    otmf_extra = json.loads(args.otmf_params)
    if args.otmf_steps:
        otmf_extra["steps"] = args.otmf_steps

    labels = args.methods.split(",")
    work = [(label, k, order, {**METHODS[label][1], **(otmf_extra if METHODS[label][0] == "otmf" else {})})
            for label in labels for k, order in enumerate(orders)]
    done = _measured_before(read_result(args.reuse), build, args.split, work) if args.reuse else {}
    todo = [w for w in work if (w[0], w[1]) not in done]
    context = {"suite": suite, "store": store, "settings": settings, "individual": individual}
    # Forked workers inherit the suite, the store and a validation view's seal on the eval data.
    with fork_pool(args.jobs, _context.update, context) as pool:
        done.update(zip([(w[0], w[1]) for w in todo], pool.map(_run_one, todo), strict=True))

    methods: dict[str, dict] = {}
    for label in labels:
        method, _, tune_heads = METHODS[label]
        params = next(w[3] for w in work if w[0] == label)
        outcomes = [done[(label, k)] for k in range(len(orders))]
        runs = [o for o in outcomes if "error" not in o]
        error = next((o["error"] for o in outcomes if "error" in o), None)
        entry: dict = {"label": LABELS[label], "method": method, "params": params, "head_tuning": tune_heads,
                       "runs": runs}
        if error:
            entry["error"] = error
        if runs and not error:
            for key in ("avg_accuracy", "normalized", "bwt"):
                entry[key] = spread([r[key] for r in runs])
            curves = [r["curve"] for r in runs]
            entry["curve"] = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
            entry["seconds"] = spread([r["seconds"] for r in runs])
            if method == "otmf":
                entry["degenerate_steps"] = [sum(r["degenerate_steps"][i] for r in runs) for i in (0, 1)]
        methods[label] = entry

    config = {k: ("TINY_CLIP" if k == "arch" else v) for k, v in suite["config"].items()}
    result = {
        "suite": {"name": args.suite, "split": args.split, "tasks": tasks, "build": config,
                  "build_sha256": build,
                  "individual": individual, "base": suite["base_accuracy"],
                  "individual_avg": statistics.fmean(individual.values()),
                  "base_avg": statistics.fmean(suite["base_accuracy"].values())},
        "orders": orders,
        "methods": methods,
        "command": "python -m bench.accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with _locked(name):  # rows added by runs finishing together must all land
        if args.add:
            result = _added_to(read_result(name), result)
        result["targets"] = targets(result)
        write_result(name, result)
    shutil.rmtree(store_root, ignore_errors=True)
    if not args.no_plot:
        plot(result, DOCS / f"benchmarks-{name}.png")
    return result


def _measured_before(old: dict | None, build: str, split: str, work: list[tuple]) -> dict[tuple[str, int], dict]:
    """The lineages of `work` (label, order index, order, params) that result `old` already holds: same suite build
    (`build`, its fingerprint) and split, and a row of the same label, params and head tuning with a run of the same
    task order."""
    if old is None or old["suite"].get("build_sha256") != build or old["suite"]["split"] != split:
        raise SystemExit("--reuse needs an existing result of the same build and split of the suite")
    found = {}
    for label, k, order, params in work:
        row = old["methods"].get(label)
        if row is None or row["params"] != params or row["head_tuning"] != METHODS[label][2]:
            continue
        run = next((r for r in row["runs"] if r["order"] == order), None)
        if run is not None:
            print(f"[accuracy] {label} order {k}: taken from {old['command'][:60]}...", flush=True)
            found[(label, k)] = run
    return found


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock on result `name` while it is read and rewritten."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _added_to(old: dict | None, new: dict) -> dict:
    """`old` with `new`'s rows in place of its rows of the same label; each invocation's time and load recorded."""
    if old is None or old["suite"]["tasks"] != new["suite"]["tasks"] or old["orders"] != new["orders"] \
            or old["suite"]["split"] != new["suite"]["split"]:
        raise SystemExit("--add needs an existing result of the same suite, split and task orders")
    old_build, new_build = old["suite"].get("build_sha256"), new["suite"]["build_sha256"]
    # Rows measured before builds were fingerprinted join only if the build gives the same accuracies as theirs.
    same = (old_build == new_build if old_build else
            all(old["suite"][k] == new["suite"][k] for k in ("individual", "base")))
    if not same:
        raise SystemExit("--add needs the same build of the suite: this one differs from the existing result's")
    old = {**old, "suite": {**old["suite"], "build_sha256": new_build}}
    parts = old.get("parts_measured") or {
        "rows " + ", ".join(old["methods"]): {"generated_at": old["generated_at"], "command": old["command"],
                                              "load_avg_1m": old["machine"]["load_avg_1m"]}}
    parts["rows " + ", ".join(new["methods"])] = {"generated_at": now(), "command": new["command"],
                                                  "load_avg_1m": machine()["load_avg_1m"]}
    return {**old, "methods": {**old["methods"], **new["methods"]}, "parts_measured": parts,
            "command": " && ".join(p["command"] for p in parts.values())}


def target_rule(entry: dict) -> tuple[float, bool, float | None]:
    """What an OTMF row must reach: (margin in points over its baseline, whether the margin must be exceeded rather
    than reached, normalized accuracy floor or None). The paper's mode: the best data-free method + 2 points; with
    replay: + 5 points and 0.90 normalized; with head tuning (labelled head data): ahead of task arithmetic given
    the same labels."""
    if entry["head_tuning"]:
        return 0.0, True, None
    if entry["params"].get("pre_data") == "current":
        return 2.0, False, None
    return 5.0, False, 0.90


def targets(result: dict) -> dict:
    """Each OTMF row against its like (`target_rule`): without heads the best data-free method, with heads task
    arithmetic with heads."""
    ok = {k: v for k, v in result["methods"].items() if "avg_accuracy" in v}
    free = [k for k in ok if k in DATA_FREE]
    if not free:
        return {}
    mean = lambda label, key="avg_accuracy": ok[label][key]["mean"]  # noqa: E731
    best_free = max(free, key=mean)
    out = {}
    for label, entry in ok.items():
        if entry["method"] != "otmf":
            continue
        baseline = "task_arithmetic+heads" if entry["head_tuning"] else best_free
        if baseline not in ok:
            continue
        needed, strict, floor = target_rule(entry)
        margin = 100 * (mean(label) - mean(baseline))
        normalized = mean(label, "normalized")
        out[label] = {"baseline": baseline, "margin_points": margin, "margin_needed": needed, "strict": strict,
                      "margin_met": margin > needed if strict else margin >= needed, "normalized": normalized,
                      "normalized_floor": floor, "normalized_met": None if floor is None else normalized >= floor}
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, entry) for label, entry in result["methods"].items() if "curve" in entry]
    # The legend goes under the axes, one row per line: the labels are long and there may be twenty of them.
    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.2 * (len(rows) + 2)))
    colors = plt.get_cmap("tab20").colors
    n = len(result["suite"]["tasks"])
    xs = list(range(1, n + 1))
    for i, (label, entry) in enumerate(rows):
        runs, color = entry["runs"], colors[i % len(colors)]
        lo = [min(r["curve"][k] for r in runs) * 100 for k in range(n)]
        hi = [max(r["curve"][k] for r in runs) * 100 for k in range(n)]
        ax.plot(xs, [c * 100 for c in entry["curve"]], marker="o", color=color, label=entry.get("label", label))
        ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
    ax.axhline(result["suite"]["individual_avg"] * 100, color="k", ls="--", lw=1, label="individual (avg)")
    ax.axhline(result["suite"]["base_avg"] * 100, color="gray", ls=":", lw=1, label="base + heads (avg)")
    ax.set_xlabel("tasks merged")
    ax.set_ylabel("average accuracy over merged tasks (%)")
    ax.set_title(f"Continual merging, {result['suite']['name']} suite, {result['suite']['split']} "
                 f"(mean over {len(result['orders'])} task order{'s' if len(result['orders']) != 1 else ''})")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
