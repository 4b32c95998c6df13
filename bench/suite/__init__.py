"""The benchmark's continual-merging suite: the 8 offline tasks of `mergeline.demo`, built once and cached.

Everything is made by `bench.suite.build.build_suite` (a tiny OpenCLIP ViT pretrained on printed glyphs, one fine-tune
of tower plus linear head per task, calibration and eval sets in the contract's formats); this module only fixes
the benchmark's settings, the cache location (bench/.cache/suite, git-ignored) and the task orders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.suite.build import build_suite
from mergeline.demo.tasks import TASK_NAMES

CACHE = Path(__file__).resolve().parents[1] / ".cache"
SUITE_DIR = CACHE / "suite"
TASKS: list[str] = list(TASK_NAMES)  # all 8 demo tasks
# Passed to build_suite; changing any of them rebuilds the suite (suite.json records them).
SETTINGS = {"seed": 0, "proxy": "glyphs", "pretrain_steps": 3000, "finetune_steps": 600, "finetune_lr": 7e-5,
            "calib_size": 256, "eval_size": 500, "head_fraction": 0.25}
ORDER_SEEDS = (0, 1, 2)  # three task orders: the listed order, then two seeded permutations


def get_suite(log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the suite; returns build_suite's description plus `build_seconds` when built now."""
    started = time.monotonic()
    suite = build_suite(SUITE_DIR, TASKS, log=log, **SETTINGS)
    suite["build_seconds"] = round(time.monotonic() - started, 1)
    return suite


def task_orders(n: int = 3) -> list[list[str]]:
    """Order 0 is the suite's own order; the others are deterministic permutations of it."""
    orders = [list(TASKS)]
    for seed in ORDER_SEEDS[1:n]:
        perm = np.random.default_rng(1000 + seed).permutation(len(TASKS))
        orders.append([TASKS[i] for i in perm])
    return orders[:n]

