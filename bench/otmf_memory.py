"""OTMF's memory with element-wise against row masks, on OpenCLIP image towers with random weights from open_clip's
registry (nothing downloaded): the step's working memory ÷ the float32 tower, the whole process's peak ÷ the tower,
and iterations per second.

Each measurement runs in a fresh process that holds what a job holds during the step (the base, the lineage head
and the new task, float32 on the CPU, and the calibration inputs), then runs one OTMF step. The step's working memory
is the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs right before the step) minus the RSS before it;
the process peak is VmHWM itself. Results: bench/results/otmf_memory.json.

With `--device cuda` the step runs on the GPU (the inputs stay on the CPU, as in a job): its working memory is the
GPU's (torch's peak allocation above what was allocated before it), each iteration is timed to a synchronised
device, and a plain forward+backward of the tower on the same batch is timed beside it for the overhead per pass.
Results: bench/results/otmf_memory_cuda.json.

    .venv/bin/python -m bench.otmf_memory [--archs ViT-B-32,ViT-L-14] [--granularities element,row] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import CACHE, ROOT, machine, now, repo_env, run_measured
from bench.engine_cost import peak_mib, plain_pass, reset_peak, rss_mib

RESULTS = ROOT / "bench" / "results"


def result_file(device: str) -> Path:
    return RESULTS / ("otmf_memory.json" if device == "cpu" else f"otmf_memory_{device}.json")


def base_file(arch: str) -> Path:
    """The tower (`visual.` keys) of a randomly initialised registered OpenCLIP model, cached."""
    path = CACHE / "otmf_memory" / f"{arch}.safetensors"
    if not path.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"visual.{k}": v.detach().float().contiguous() for k, v in model.visual.state_dict().items()},
                  path)
    return path


def measure(arch: str, granularity: str, dtype: str, batch: int, steps: int, calibration: int,
            device: str = "cpu", forward_chunk: int | None = None, mmap_threshold: int | None = None) -> dict:
    """One OTMF step in this process (run it in a fresh one), under the allocator policy a job applies with
    MERGELINE_MALLOC_MMAP_THRESHOLD=`mmap_threshold` when given."""
    import torch

    from core.methods import OTMFParams
    from core.uris import Fetched
    from engine.allocator import use_for_job
    from engine.families import get_family
    from engine.inputs import Inputs
    from engine.methods import get_method
    from engine.methods.base import MethodState, StepInput

    assert use_for_job(True, mmap_threshold), "the C library is not glibc"  # as a job does before reading inputs
    family = get_family("open_clip")
    loaded = family.load_base(Fetched.local(base_file(arch)), arch)
    g = torch.Generator().manual_seed(1)

    def fine_tune() -> dict:  # a task vector of 1% of each tensor's spread
        return {k: v + 0.01 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
                for k, v in loaded.tower.items()}

    head, task = fine_tune(), fine_tune()
    height, width = loaded.info["image_size"]
    pixels = torch.randn(calibration, 3, height, width, generator=g)
    tower_mib = sum(v.numel() for v in loaded.tower.values()) * 4 / 2**20
    on_gpu = device != "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    stamps: list[float] = []

    def stamp(*_) -> None:  # each iteration's end, once the device has finished it
        sync()
        stamps.append(time.perf_counter())

    params = OTMFParams(steps=steps, batch_size=batch, pre_data="current", dtype=dtype, eval_every=steps,
                        mask_granularity=granularity, forward_chunk=forward_chunk)
    inp = StepInput(base=loaded.tower, merged=head, task=task, index=1, state=MethodState(), params=params,
                    device=torch.device(device), family=family, loaded=loaded,
                    calibration=Inputs({"pixels": pixels}), progress=stamp)
    gc.collect()
    before = rss_mib()
    reset_peak()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if on_gpu else 0
    t0 = time.perf_counter()
    get_method("otmf").step(inp)
    sync()
    step_s = time.perf_counter() - t0
    peak = peak_mib()
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    r = {"arch": arch, "granularity": granularity, "dtype": dtype, "batch": batch, "forward_chunk": forward_chunk,
         "steps": steps, "device": device,
         "tower_mib": tower_mib, "step_s": step_s,
         "iterations_per_s": 1 / statistics.median(intervals) if intervals else None,
         "rss_before_step_mib": before, "step_peak_increment_mib": peak - before,
         "step_x_tower": (peak - before) / tower_mib, "process_peak_mib": peak, "process_x_tower": peak / tower_mib}
    if on_gpu:
        gpu_step = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20
        plain = plain_pass_s(family, loaded, pixels[:batch], torch.device(device), getattr(torch, dtype), sync)
        passes = 2 if params.mask_update == "joint" else 1
        r.update({"gpu": torch.cuda.get_device_name(0), "gpu_step_peak_mib": gpu_step,
                  "gpu_step_x_tower": gpu_step / tower_mib, "plain_fwd_bwd_s": plain,
                  "passes_per_iteration": passes,
                  "overhead_ratio": 1 / (r["iterations_per_s"] * passes * plain) if intervals else None})
    return r


def plain_pass_s(family, loaded, x, device, dtype, sync, repeats: int = 5) -> float:
    """Median time of a plain forward+backward of the tower, its weights leaf tensors as in fine-tuning."""
    weights = {k: v.to(device, dtype).requires_grad_(True) for k, v in loaded.tower.items()}
    batch = {"pixels": x.to(device)}
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        plain_pass(family, loaded, weights, batch)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--granularities", default="element,row")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=24)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="also measure with MERGELINE_MALLOC_MMAP_THRESHOLD set to this many bytes, as a job "
                             "applies it (glibc then returns freed tensors to the kernel at once)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the step on the GPU")
    parser.add_argument("--forward-chunk", type=int, default=None, help="OTMF's forward_chunk")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return {}
    path = result_file(args.device)
    result = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    # Runs accumulate across invocations; every invocation's command is kept.
    command = "python -m bench.otmf_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    result["commands"] = [*result.get("commands", []), *([result.pop("command")] if "command" in result else []),
                          command]
    for arch in args.archs.split(","):
        base_file(arch)
        for granularity in args.granularities.split(","):
            for dtype, threshold in [(d, t) for d in args.dtypes.split(",")
                                     for t in sorted({0, args.mmap_threshold})]:
                child = json.dumps([arch, granularity, dtype, args.batch, args.steps, args.calibration, args.device,
                                    args.forward_chunk, threshold or None])
                try:
                    out = run_measured([sys.executable, "-m", "bench.otmf_memory", "--child", child], env=repo_env(),
                                       cwd=ROOT)
                except RuntimeError as e:  # one failed configuration must not cost the others' figures
                    print(f"[otmf_memory] {arch} {granularity} {dtype}: {e}", flush=True)
                    continue
                r = json.loads(out["stdout"].strip().splitlines()[-1])
                r.update({"measured_at": now(), "malloc_mmap_threshold": threshold or None, "machine": machine()})
                key = (f"{arch}/{granularity}/{dtype}" + (f"/batch{args.batch}" if args.batch != 2 else "")
                       + (f"/chunk{args.forward_chunk}" if args.forward_chunk else ""))
                result["runs"][key + (f"/mmap{threshold}" if threshold else "")] = r
                gpu = (f", GPU step {r['gpu_step_x_tower']:.2f}× tower, overhead {r['overhead_ratio']:.2f}× per pass"
                       if "gpu_step_x_tower" in r else "")
                print(f"[otmf_memory] {arch} {granularity} {dtype} mmap {threshold or '-'}: "
                      f"step +{r['step_peak_increment_mib']:.0f} MiB = "
                      f"{r['step_x_tower']:.2f}× tower, process {r['process_x_tower']:.2f}×, "
                      f"{r['iterations_per_s']:.3f} it/s{gpu}", flush=True)
                result["machine"] = machine()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
