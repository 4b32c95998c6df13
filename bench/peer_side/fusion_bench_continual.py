"""Runs inside FusionBench's own venv (no Mergeline import): FusionBench's continual task arithmetic
(`ContinualTaskArithmeticForCLIP`) or OPCM (`fusion_bench.method.opcm.opcm_general.OPCM`), through their own `run`,
on the bench suite's OpenCLIP image towers.

FusionBench's algorithms walk nn.Module trees (leaf modules, nn.Linear instances), and this venv has no open_clip,
so the tower is rebuilt as a module tree with the same names, the same nn.Linear modules and the same leaf/non-leaf
structure as OpenCLIP's (described by the bench in `structure`), then loaded with the checkpoints' weights.

    python fusion_bench_continual.py JOB.json    -> prints {"merge_s", "function", ...} as the last stdout line
"""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def build(structure):
    root = None
    modules = {}
    for entry in structure:
        name = entry["name"]
        if entry["linear"]:
            out_f, in_f = entry["params"]["weight"]
            module = nn.Linear(in_f, out_f, bias="bias" in entry["params"])
        else:
            module = nn.Module()
            for pname, shape in entry["params"].items():
                module.register_parameter(pname, nn.Parameter(torch.zeros(shape)))
        modules[name] = module
        if name == "":
            root = module
        else:
            parent, _, child = name.rpartition(".")
            modules[parent].add_module(child, module)
    return root


def flat_name(key):
    return key.replace(".", "__")


def build_flat(shapes, linear):
    """Every tensor in its own leaf module: an nn.Linear (weight only) for the linear weights, else a plain module
    holding it as `p`; so FusionBench's leaf-module walk reaches every tensor."""
    root = nn.Module()
    for key, shape in shapes.items():
        if key in linear:
            module = nn.Linear(shape[1], shape[0], bias=False)
        else:
            module = nn.Module()
            module.register_parameter("p", nn.Parameter(torch.zeros(shape)))
        root.add_module(flat_name(key), module)
    return root


def load(job, path):
    state = {k.removeprefix("visual."): v for k, v in load_file(path).items() if k.startswith("visual.")}
    if job.get("layout") == "flat":
        linear = set(job["linear"])
        module = build_flat({k: list(v.shape) for k, v in state.items()}, linear)
        state = {f"{flat_name(k)}.{'weight' if k in linear else 'p'}": v for k, v in state.items()}
    else:
        module = build(job["structure"])
    module.load_state_dict(state, strict=True)
    return module.requires_grad_(True)


def unflatten(job, state):
    if job.get("layout") != "flat":
        return state
    return {k.rsplit(".", 1)[0].replace("__", "."): v for k, v in state.items()}


def main():
    job = json.loads(Path(sys.argv[1]).read_text())
    started = time.perf_counter()
    import fusion_bench  # noqa: F401  (import cost counted in the process, not in merge_s)
    from fusion_bench import BaseModelPool

    models = {"_pretrained_": load(job, job["files"]["base"])}
    for i, path in enumerate(job["files"]["tasks"]):
        models[f"task{i}"] = load(job, path)
    pool = BaseModelPool(models)
    loaded = time.perf_counter()
    if job["method"] == "task_arithmetic":
        from fusion_bench.method.opcm.task_arithmetic import ContinualTaskArithmeticForCLIP as Algorithm

        algo = Algorithm(scaling_factor=job["lambda"], shuffle_order=False, save_on_every_step=False,
                         evaluate_on_every_step=False)
        algo._program = SimpleNamespace(taskpool=SimpleNamespace(_test_datasets={}))  # only read for evaluation
    else:
        from fusion_bench.method.opcm.opcm_general import OPCM as Algorithm

        algo = Algorithm(alpha=job["alpha"], shuffle_order=False, save_on_every_step=False,
                         evaluate_on_every_step=False)
    t0 = time.perf_counter()
    merged = algo.run(pool)
    merge_s = time.perf_counter() - t0
    save_file({k: v.detach().contiguous() for k, v in unflatten(job, merged.state_dict()).items()}, job["out"])
    print(json.dumps({"merge_s": merge_s, "load_s": loaded - started, "function": f"{Algorithm.__module__}."
                      f"{Algorithm.__name__}.run"}))


if __name__ == "__main__":
    main()
