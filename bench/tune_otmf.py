"""OTMF tuning on the image suite's validation split, in one process: the job's own continual steps
(`engine.job.merge_steps`) and accuracy, without the store. The suite comes as bench/suite/split.py's validation
view, so this process cannot open eval data: nothing chosen here has seen what the report measures.

For exploring settings quickly (no sha256, no files written); every setting worth keeping is then confirmed through
`run_job` with `python -m bench.accuracy --split validation --methods otmf-paper --otmf-params '{...}'`.

    .venv/bin/python -m bench.tune_otmf --grid '[{"alpha": 0.5}, {"alpha": 0.8, "lr": 0.05}]' [--tasks 8]
                                        [--orders 1] [--out NAME]   (NAME: also write bench/results/NAME.json)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from functools import partial

import torch
from safetensors.torch import load_file

from bench.accuracy import suite_fingerprint
from bench.common import fork_pool, write_result
from bench.suite import get_suite, task_orders
from core.methods import method_entry
from core.uris import Fetched, file_uri_path
from engine.evaluate import accuracy
from engine.families import get_family
from engine.job import EvalTask, StepTask, merge_steps
from engine.methods import get_method
from engine.methods.base import MethodState, StepOutput


def _local(uri: str) -> Fetched:
    """A suite file as the engine's loaders take it: the suite is local, so nothing is fetched or hashed."""
    return Fetched.local(file_uri_path(uri))


def run(params: dict, order: list[str], suite: dict, method_name: str = "otmf") -> dict:
    family = get_family("open_clip")
    loaded = family.load_base(_local(suite["base"]["uri"]), suite["base"]["arch"])
    p = method_entry(method_name).params.model_validate(params)
    cpu = torch.device("cpu")
    entries = [suite["tasks"][name] for name in order]
    tasks = [StepTask(name, partial(family.load_checkpoint, _local(t["checkpoint"]), loaded, field="task"),
                      calibration=family.load_inputs(_local(t["calibration"]), loaded, labelled=False, field="c"))
             for name, t in zip(order, entries, strict=True)]
    evals = {name: (family.load_inputs(_local(t["eval"]), loaded, labelled=True, field="e"),
                    load_file(_local(t["head"]).path))
             for name, t in zip(order, entries, strict=True)}
    curve, just_merged, losses, final = [], {}, [], {}

    def measure(i: int, out: StepOutput) -> None:
        # Every task merged so far, on the new head: the curve's point and the just-merged task's accuracy.
        final.clear()
        final.update({n: accuracy(family, loaded, out.merged, *evals[n], device=cpu) for n in order[: i + 1]})
        just_merged[order[i]] = final[order[i]]
        curve.append(statistics.fmean(final.values()))
        losses.append({k: round(v, 4) for k, v in out.metrics.items()
                       if k in ("loss_initial", "loss_best", "best_iteration", "masks_kept_all_ones", "alpha")})

    started = time.monotonic()
    torch.manual_seed(p.seed)
    # The tasks' heads go to the steps as a job's would (OTMF's head_alignment aligns through them).
    heads = {n: EvalTask(n, i + 1, *evals[n], field=f"{n}.head") for i, n in enumerate(order)}
    merge_steps(family, loaded, get_method(method_name), p, tasks, merged=loaded.tower, state=MethodState(),
                position=0, device=cpu, evals=heads, on_step=measure)
    individual = {n: suite["tasks"][n]["individual_accuracy"] for n in order}
    return {"params": params, "avg": curve[-1], "curve": [round(c, 4) for c in curve],
            "normalized": statistics.fmean(final[n] / individual[n] for n in order),
            "bwt": statistics.fmean(final[n] - just_merged[n] for n in order[:-1]) if len(order) > 1 else 0.0,
            "final": {n: round(a, 3) for n, a in final.items()}, "losses": losses,
            "degenerate_steps": sum(bool(x.get("masks_kept_all_ones")) for x in losses),
            "seconds": round(time.monotonic() - started, 1)}


def _run(work: tuple) -> dict:
    return run(*work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="[{}]", help="JSON list of OTMF params to try")
    parser.add_argument("--method", default="otmf")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--orders", type=int, default=1, help="task orders each setting runs (their mean is its score)")
    parser.add_argument("--out", default=None, help="also write every row to bench/results/OUT.json")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each")
    args = parser.parse_args()
    suite = get_suite(log=lambda m: None, split="validation")
    orders = [o[: args.tasks] for o in task_orders(args.orders, list(suite["tasks"]))]
    grid = json.loads(args.grid)
    work = [(params, order, suite, args.method) for params in grid for order in orders]
    # Forked workers inherit this process's seal on the report data (an audit hook lives in the interpreter).
    with fork_pool(args.jobs) as pool:
        done = []
        for r in pool.map(_run, work):
            done.append(r)
            print(f"[{len(done)}/{len(work)}] {json.dumps(r['params'])}: {r['avg']:.4f} "
                  f"({r['degenerate_steps']} degenerate, {r['seconds']:.0f} s)", flush=True)
    rows = []
    for i, params in enumerate(grid):
        runs = done[i * len(orders): (i + 1) * len(orders)]
        row = {"method": args.method, "params": params, "avg": statistics.fmean(r["avg"] for r in runs),
               "normalized": statistics.fmean(r["normalized"] for r in runs),
               "degenerate_steps": sum(r["degenerate_steps"] for r in runs), "runs": runs}
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        rows.append(row)
    if args.out:
        write_result(args.out, {"split": "validation", "orders": orders, "rows": rows,
                                "suite_build_sha256": suite_fingerprint(suite),
                                "command": "python -m bench.tune_otmf " + shlex.join(sys.argv[1:])})


if __name__ == "__main__":
    main()
