"""Why OTMF steps keep the all-ones masks: one continual step per task of a small demo suite, in the paper's mode
(`pre_data` current), under variants of the likely levers (learning rate, held-out size, mask bounds,
mask granularity). Only calibration data is used: each task's calibration set is split, the step sees the first
part, and the last 64 inputs (never seen by the step) measure whether the kept masks generalise, as the same
objective the step optimises (Sinkhorn divergence to the head plus to the new checkpoint). Eval sets are not read.

    .venv/bin/python -m bench.otmf_degenerate SUITE_DIR ["VARIANT;VARIANT"] [STEPS]
    (SUITE_DIR: a suite written by mergeline.demo.build_suite)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from bench.common import write_result
from core.methods import OTMFParams
from core.uris import Fetched
from engine.families import get_family
from engine.inputs import Inputs
from engine.methods import get_method
from engine.methods import otmf as otmf_module
from engine.methods.base import MethodState, StepInput
from engine.methods.otmf import merge_from_masks
from engine.sinkhorn import sinkhorn_divergence

UNSEEN = 64
VARIANTS = {
    "default (lr 0.1, held-out 16)": {},
    "lr 0.01": {"lr": 0.01},
    "held-out 64": {"held_out": 64},
    "mask_bound clamp": {"mask_bound": "clamp"},
    "mask_bound sigmoid": {"mask_bound": "sigmoid"},
    "mask_granularity row": {"mask_granularity": "row"},
    "mask_update joint": {"mask_update": "joint"},
    "mask_update joint, lr 0.01": {"mask_update": "joint", "lr": 0.01},
}


def _split_holding(hold_size: int):
    def split(n: int, batch_size: int, gen: torch.Generator):
        perm = torch.randperm(n, generator=gen)
        hold = min(hold_size, n // 2)
        return perm[:hold], perm[hold:]
    return split


@torch.no_grad()
def unseen_loss(family, loaded, tower, head, task, x: dict, blur: float) -> float:
    f = family.features(loaded, tower, x)
    return (sinkhorn_divergence(f, family.features(loaded, head, x), blur)
            + sinkhorn_divergence(f, family.features(loaded, task, x), blur)).item()


def main(root: Path, only: list[str] | None = None, steps: int = 3) -> dict:
    suite = json.loads((root / "suite.json").read_text())
    family = get_family("open_clip")
    loaded = family.load_base(Fetched.local(Path(suite["base"]["uri"][7:])), suite["base"]["arch"])
    names = list(suite["tasks"])
    tasks = {n: family.load_checkpoint(Fetched.local(Path(suite["tasks"][n]["checkpoint"][7:])), loaded, field="t")
             for n in names}
    calib = {n: family.load_inputs(Fetched.local(Path(suite["tasks"][n]["calibration"][7:])), loaded,
                                   labelled=False, field="c").tensors for n in names}
    original_split = otmf_module._split
    rows = []
    head = tasks[names[0]]
    for i, name in enumerate(names[1:steps + 1], start=1):
        seen = Inputs({k: v[:-UNSEEN] for k, v in calib[name].items()})
        unseen = {k: v[-UNSEEN:] for k, v in calib[name].items()}
        for label, change in VARIANTS.items():
            if only and label not in only:
                continue
            change = dict(change)
            otmf_module._split = _split_holding(change.pop("held_out", 16))
            params = OTMFParams(pre_data="current", **change)
            t0 = time.time()
            out = get_method("otmf").step(StepInput(
                base=loaded.tower, merged=head, task=tasks[name], index=i, state=MethodState(), params=params,
                device=torch.device("cpu"), family=family, loaded=loaded, calibration=seen))
            otmf_module._split = original_split
            blend = merge_from_masks(loaded.tower, head, tasks[name], None, None, params.alpha)
            m = out.metrics
            row = {"step": i, "task": name, "variant": label, "best_iteration": m["best_iteration"],
                   "held_out_initial": m["loss_initial"], "held_out_best": m["loss_best"],
                   "held_out_final": m["loss_final"], "mask_range": m.get("mask_range"),
                   "unseen_blend": unseen_loss(family, loaded, blend, head, tasks[name], unseen, params.blur),
                   "unseen_kept": unseen_loss(family, loaded, out.merged, head, tasks[name], unseen, params.blur),
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        # The next step merges onto the α-blend, what a degenerate default step would have produced.
        head = merge_from_masks(loaded.tower, head, tasks[name], None, None, OTMFParams().alpha)
    return {"suite": suite["config"], "unseen_inputs": UNSEEN, "rows": rows,
            "command": "python -m bench.otmf_degenerate " + " ".join(sys.argv[1:])}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), sys.argv[2].split(";") if len(sys.argv) > 2 else None,
                  int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    print(write_result("otmf_degenerate", result))
