"""Engine cost on an OpenCLIP ViT-B-32 image tower (random weights from open_clip's registered config, nothing
downloaded): OTMF's time per iteration against a plain forward+backward, its peak memory against the tower's
float32 size, the peak memory of every step of a 10-task lineage, and data-free merge throughput against mergekit.

Every measurement runs in a fresh process. Peak memory is the kernel's own account: VmHWM (peak RSS) of the process,
reset through /proc/self/clear_refs right before the measured phase, so the figure belongs to that phase alone; for
whole jobs, ru_maxrss of the job's process.

    .venv/bin/python -m bench.engine_cost [--part iteration,lineage,throughput] [--batch 16] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import (
    CACHE,
    ROOT,
    parse_maxrss_mib,
    read_result,
    repo_env,
    run_measured,
    time_rss_cmd,
    write_result,
)

WORK = CACHE / "vitb32"
ARCH = "ViT-B-32"
N_TASKS = 10
CALIB = 24  # calibration images per task (uint8 224×224×3)


# -- memory probes (Linux) -------------------------------------------------------------------------------------
def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MiB
    raise KeyError(field)


def rss_mib() -> float:
    return _status("VmRSS")


def reset_peak() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mib() -> float:
    return _status("VmHWM")


# -- files -----------------------------------------------------------------------------------------------------
def prepare(log=print) -> dict:
    """base.safetensors (tower only, `visual.` keys), 10 task checkpoints (base + small perturbations, as a
    fine-tune's task vector would be), and per-task uint8 calibration sets; cached under bench/.cache/vitb32."""
    described = WORK / "files.json"
    if described.exists():
        return json.loads(described.read_text())
    import open_clip
    import torch
    from safetensors.torch import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    log("building a random ViT-B-32 image tower and 10 perturbed copies")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None, device="cpu")
    tower = {f"visual.{k}": v.detach().float().contiguous() for k, v in model.visual.state_dict().items()}
    save_file(tower, WORK / "base.safetensors")
    rng = np.random.default_rng(0)
    tasks = []
    for t in range(N_TASKS):
        g = torch.Generator().manual_seed(1000 + t)
        tuned = {k: (v + 0.01 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)).contiguous()
                 for k, v in tower.items()}
        save_file(tuned, WORK / f"task{t}.safetensors")
        np.savez(WORK / f"calib{t}.npz", x=rng.integers(0, 256, (CALIB, 224, 224, 3), dtype=np.uint8))
        tasks.append(t)
    numel = sum(v.numel() for v in tower.values())
    files = {"numel": numel, "tower_mib": numel * 4 / 2**20, "tasks": tasks,
             "file_bytes": (WORK / "base.safetensors").stat().st_size}
    described.write_text(json.dumps(files))
    return files


def uri(name: str) -> str:
    return (WORK / name).as_uri()


BASE_REF = {"family": "open_clip", "arch": ARCH, "uri": ""}


def plain_pass(family, loaded, weights: dict, batch: dict) -> None:
    """One forward+backward of the tower under `weights` (leaf tensors that need gradients, as in fine-tuning); the
    gradients are dropped."""
    family.features(loaded, weights, batch).pow(2).sum().backward()
    for w in weights.values():
        w.grad = None


# -- one OTMF step in this process ---------------------------------------------------------------------------
def measure_iteration(batch: int, steps: int, repeats: int = 3, dtype: str = "float32") -> dict:
    """Plain forward+backward of the tower vs OTMF iterations, in this process (run it in a fresh one)."""
    import torch

    from core.methods import OTMFParams
    from core.uris import Fetched
    from engine.families import get_family
    from engine.methods import get_method
    from engine.methods.base import MethodState, StepInput

    family = get_family("open_clip")
    loaded = family.load_base(Fetched.local(WORK / "base.safetensors"), ARCH)
    head = family.load_checkpoint(Fetched.local(WORK / "task0.safetensors"), loaded, field="head")
    task = family.load_checkpoint(Fetched.local(WORK / "task1.safetensors"), loaded, field="task")
    calibration = family.load_inputs(Fetched.local(WORK / "calib1.npz"), loaded, labelled=False, field="calibration")
    tower_mib = sum(v.numel() for v in loaded.tower.values()) * 4 / 2**20
    pixels = calibration.tensors["pixels"]
    x = pixels[:batch]

    # Plain forward+backward: the tower's weights as leaf tensors that need gradients, as in fine-tuning.
    weights = {k: v.clone().requires_grad_(True) for k, v in loaded.tower.items()}
    fwd_bwd = partial(plain_pass, family, loaded, weights, {"pixels": x})

    fwd_bwd()  # warm-up
    rss_before = rss_mib()
    reset_peak()
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        plain.append(time.perf_counter() - t0)
    plain_peak = peak_mib() - rss_before
    weights.clear()  # free the copy before OTMF runs

    # OTMF: the engine's own step, timed between its per-iteration progress callbacks.
    stamps: list[float] = []
    params = OTMFParams(steps=steps, batch_size=batch, pre_data="current", dtype=dtype, eval_every=max(steps, 1))
    inp = StepInput(base=loaded.tower, merged=head, task=task, index=1, state=MethodState(), params=params,
                    device=torch.device("cpu"), family=family, loaded=loaded, calibration=calibration,
                    progress=lambda *_: stamps.append(time.perf_counter()))
    import gc

    gc.collect()
    rss_before = rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    out = get_method("otmf").step(inp)
    step_s = time.perf_counter() - t0
    step_peak = peak_mib() - rss_before
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    iteration = statistics.median(intervals)
    # A joint update runs a forward and a backward on a batch of each side; an alternate one on one batch.
    passes = 2 if params.mask_update == "joint" else 1
    return {
        "batch": batch, "steps": steps, "dtype": dtype, "tower_mib": tower_mib,
        "mask_update": params.mask_update, "passes_per_iteration": passes,
        "plain_fwd_bwd_s": statistics.median(plain), "plain_samples_s": plain,
        "otmf_iteration_s": iteration, "otmf_iteration_samples_s": intervals,
        "iteration_ratio": iteration / statistics.median(plain),
        "overhead_ratio": iteration / (passes * statistics.median(plain)),
        "otmf_step_s": step_s, "first_iteration_done_s": stamps[0] - t0 if stamps else None,
        "plain_peak_increment_mib": plain_peak,
        "otmf_peak_increment_mib": step_peak, "otmf_peak_increment_x_tower": step_peak / tower_mib,
        "process_rss_before_step_mib": rss_before, "process_peak_mib": rss_before + step_peak,
        "process_peak_x_tower": (rss_before + step_peak) / tower_mib,
        "metrics": {k: v for k, v in out.metrics.items() if isinstance(v, int | float | str)},
    }


def run_iteration(batch: int, steps: int, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "bench.engine_cost", "--child-iteration", json.dumps([batch, steps, dtype])]
    out = run_measured(cmd, env=repo_env(), cwd=ROOT)
    return json.loads(out["stdout"].strip().splitlines()[-1])


# -- a 10-task lineage, one job (one fresh process) per task -----------------------------------------------------
def run_job_measured(spec: dict, name: str, store: Path) -> dict:
    path = WORK / "specs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    cmd = time_rss_cmd([sys.executable, "-m", "bench.jobrun", path, store.as_uri(), str(CACHE)])
    out = run_measured(cmd, env=repo_env(), cwd=ROOT)
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    return {"wall_s": out["wall_s"], "peak_rss_mib": parse_maxrss_mib(out["stderr"]), "job_s": result["job_s"],
            "in_process_peak_mib": result["peak_rss_mib"], "metrics": result["metrics"]}


def lineage(batch: int, steps: int, pre_data: str, log=print) -> dict:
    files = prepare(log)
    store = WORK / "store-lineage"
    shutil.rmtree(store, ignore_errors=True)
    base = dict(BASE_REF, uri=uri("base.safetensors"))
    jobs = []
    for t in range(N_TASKS):
        spec = {"lineage": "vitb32-otmf", "method": "otmf",
                "params": {"steps": steps, "batch_size": batch, "pre_data": pre_data, "eval_every": steps},
                "tasks": [{"name": f"t{t}", "checkpoint": uri(f"task{t}.safetensors"),
                           "calibration": uri(f"calib{t}.npz")}]}
        if t == 0:
            spec["base"] = base
        job = run_job_measured(spec, f"lineage-{t}", store)
        jobs.append({"step": t + 1, "peak_rss_mib": job["peak_rss_mib"], "wall_s": job["wall_s"],
                     "reservoir_items": job["metrics"]["steps"][0].get("reservoir_items")})
        log(f"[engine_cost] lineage step {t + 1}: peak {job['peak_rss_mib']:.0f} MiB, {job['wall_s']:.1f} s")
        # Versions already merged are not needed again: only the head is read by the next job.
        for old in sorted((store / "default" / "vitb32-otmf").glob("v*"))[:-1]:
            (old / "model.safetensors").unlink(missing_ok=True)
    peaks = [j["peak_rss_mib"] for j in jobs]
    growth = (peaks[-1] - peaks[1]) / peaks[1]
    return {"batch": batch, "steps": steps, "pre_data": pre_data, "tower_mib": files["tower_mib"], "jobs": jobs,
            "growth_step2_to_10": growth, "flat_met": growth < 0.05,
            "max_peak_x_tower": max(peaks) / files["tower_mib"]}


# -- data-free throughput against mergekit ------------------------------------------------------------------------
def throughput(n_tasks: int = 8, log=print) -> dict:
    import yaml

    from bench.peer_env import peer_python, peer_versions

    prepare(log)
    python = peer_python("mergekit", log=log)
    inputs = [WORK / "base.safetensors", *(WORK / f"task{t}.safetensors" for t in range(n_tasks))]
    processed = sum(p.stat().st_size for p in inputs)
    out: dict = {"files": n_tasks + 1, "bytes_processed": processed, "mergekit": peer_versions("mergekit")}
    for method, ours_params, theirs_params in (
        ("task_arithmetic", {"scaling_factor": 0.3}, {"weight": 0.3}),
        ("ties", {"scaling_factor": 0.3, "top_k": 20.0}, {"weight": 1.0, "density": 0.2}),
    ):
        store = WORK / f"store-{method}"
        shutil.rmtree(store, ignore_errors=True)
        spec = {"lineage": f"tp-{method.replace('_', '-')}", "method": method, "params": ours_params,
                "base": {"family": "state_dict", "uri": inputs[0].as_uri()},
                "tasks": [{"name": f"t{t}", "checkpoint": inputs[t + 1].as_uri()} for t in range(n_tasks)]}
        ours = run_job_measured(spec, f"throughput-{method}", store)
        shutil.rmtree(store, ignore_errors=True)
        config = {"merge_method": method, "base_model": str(inputs[0]), "dtype": "float32", "out_dtype": "float32",
                  "parameters": {"normalize": False, **({"lambda": 0.3} if method == "ties" else {})},
                  "models": [{"model": str(p), "parameters": theirs_params} for p in inputs[1:]]}
        cfg = WORK / f"mergekit-{method}.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        dest = WORK / f"mergekit-{method}"  # mergekit-pytorch writes a folder of safetensors shards
        shutil.rmtree(dest, ignore_errors=True)
        cmd = time_rss_cmd([python.parent / "mergekit-pytorch", cfg, dest])
        env = repo_env()
        env.pop("PYTHONPATH", None)
        theirs_run = run_measured(cmd, env=env, cwd=WORK)
        theirs = {"wall_s": theirs_run["wall_s"], "peak_rss_mib": parse_maxrss_mib(theirs_run["stderr"])}
        shutil.rmtree(dest, ignore_errors=True)
        out[method] = {
            "ours": {**{k: ours[k] for k in ("wall_s", "peak_rss_mib", "job_s")},
                     "gb_per_s": processed / 1e9 / ours["wall_s"]},
            "mergekit": {**theirs, "gb_per_s": processed / 1e9 / theirs["wall_s"]},
            "speed_ratio": theirs["wall_s"] / ours["wall_s"],  # > 1: ours is faster
            "met": ours["wall_s"] <= theirs["wall_s"],
        }
        log(f"[engine_cost] {method}: ours {out[method]['ours']['gb_per_s']:.3f} GB/s, "
            f"mergekit {out[method]['mergekit']['gb_per_s']:.3f} GB/s")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="iteration,lineage,throughput")
    parser.add_argument("--batch", type=int, default=16, help="batch of the iteration measurement (OTMF's default)")
    parser.add_argument("--steps", type=int, default=4, help="OTMF iterations measured per step")
    parser.add_argument("--lineage-batch", type=int, default=4, help="OTMF batch of each lineage job")
    parser.add_argument("--lineage-steps", type=int, default=2, help="OTMF iterations per lineage job")
    parser.add_argument("--pre-data", default="reservoir")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--name", default="engine_cost")
    parser.add_argument("--child-iteration", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_iteration:
        batch, steps, dtype = json.loads(args.child_iteration)
        print(json.dumps(measure_iteration(batch, steps, dtype=dtype)))
        return {}
    parts = args.part.split(",")
    # Parts measured by separate invocations accumulate in one result file (bench/run_all starts from none).
    result: dict = read_result(args.name) or {}
    command = " ".join(["python -m bench.engine_cost", *(argv if argv is not None else sys.argv[1:])])
    result.update({"arch": ARCH, "files": prepare(), "command": command})
    result["commands"] = {**result.get("commands", {}), **{part: command for part in parts}}  # what measured each
    if "iteration" in parts:
        result["iteration"] = {}
        for dtype in args.dtypes.split(","):
            r = run_iteration(args.batch, args.steps, dtype)
            print(f"[engine_cost] {dtype}: fwd+bwd {r['plain_fwd_bwd_s']:.2f} s, OTMF iteration "
                  f"{r['otmf_iteration_s']:.2f} s ({r['passes_per_iteration']} passes, ×{r['overhead_ratio']:.2f} "
                  "per pass); step peak "
                  f"+{r['otmf_peak_increment_mib']:.0f} MiB = {r['otmf_peak_increment_x_tower']:.1f}× tower",
                  flush=True)
            result["iteration"][dtype] = r
    if "lineage" in parts:
        result["lineage"] = lineage(args.lineage_batch, args.lineage_steps, args.pre_data)
    if "throughput" in parts:
        result["throughput"] = throughput()
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main()
