"""OTMF tuning on the bench suite, in one process: the engine's own method step and accuracy, without the store.

For exploring settings quickly (no sha256, no files written); every setting worth keeping is then confirmed through
`run_job` with `python -m bench.accuracy --methods otmf-current --otmf-params '{...}'`. Engine patches for
before/after experiments are applied from BENCH_PATCH (see bench/common.py).

    .venv/bin/python -m bench.tune_otmf --grid '[{"alpha": 0.5}, {"alpha": 0.8, "lr": 0.05}]' [--tasks 8] [--order 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import apply_patches
from bench.suite import get_suite, task_orders


def run(params: dict, order: list[str], suite: dict, method_name: str = "otmf") -> dict:
    from safetensors.torch import load_file

    from core.spec import METHOD_PARAMS
    from engine.evaluate import accuracy
    from engine.families import get_family
    from engine.methods import get_method
    from engine.methods.base import MethodState, StepInput
    from mergeline.demo import local

    family = get_family("open_clip")
    path = lambda uri: __import__("pathlib").Path(uri.removeprefix("file://"))  # noqa: E731
    loaded = family.load_base(local(path(suite["base"]["uri"])), suite["base"]["arch"])
    method = get_method(method_name)
    p = METHOD_PARAMS[method_name].model_validate(params)
    cpu = torch.device("cpu")
    merged, state = loaded.tower, MethodState()
    evals, curve, just_merged, losses = {}, [], {}, []
    started = time.monotonic()
    for i, name in enumerate(order):
        t = suite["tasks"][name]
        task = family.load_checkpoint(local(path(t["checkpoint"])), loaded, field="task")
        calib = family.load_inputs(local(path(t["calibration"])), loaded, labelled=False, field="c")
        evals[name] = (family.load_inputs(local(path(t["eval"])), loaded, labelled=True, field="e"),
                       load_file(path(t["head"])))
        torch.manual_seed(p.seed)
        out = method.step(StepInput(base=loaded.tower, merged=merged, task=task, index=i, state=state, params=p,
                                    device=cpu, family=family, loaded=loaded, calibration=calib))
        merged, state = out.merged, out.state
        accs = {n: accuracy(family, loaded, merged, d, h, device=cpu) for n, (d, h) in evals.items()}
        just_merged[name] = accs[name]
        curve.append(statistics.fmean(accs.values()))
        losses.append({k: round(v, 4) for k, v in out.metrics.items()
                       if k in ("loss_initial", "loss_best", "best_iteration")})
    final = accs
    individual = {n: suite["tasks"][n]["individual_accuracy"] for n in order}
    return {"params": params, "avg": curve[-1], "curve": [round(c, 4) for c in curve],
            "normalized": statistics.fmean(final[n] / individual[n] for n in order),
            "bwt": statistics.fmean(final[n] - just_merged[n] for n in order[:-1]) if len(order) > 1 else 0.0,
            "final": {n: round(a, 3) for n, a in final.items()}, "losses": losses,
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="[{}]", help="JSON list of OTMF params to try")
    parser.add_argument("--method", default="otmf")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--order", type=int, default=0)
    args = parser.parse_args()
    patches = apply_patches()
    suite = get_suite(log=lambda m: None)
    order = task_orders(args.order + 1)[args.order][: args.tasks]
    for params in json.loads(args.grid):
        r = run(params, order, suite, args.method)
        r["patches"] = patches
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
