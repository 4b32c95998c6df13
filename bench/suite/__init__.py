"""The benchmark's continual-merging suites, built once and cached under bench/.cache (git-ignored):

- `image`, where choices are made: the 8 offline tasks of `mergeline.demo`, made by `bench.suite.build.build_suite`
  (a tiny OpenCLIP ViT pretrained on printed glyphs, one fine-tune of tower plus linear head per task, calibration,
  validation and eval sets in the contract's formats);
- `text`, for the report only: 8 text tasks on the pretrained all-MiniLM-L6-v2 (`bench.suite.text`). Nothing is
  chosen on it, so it shows whether the image suite's choices transfer.

This module fixes the benchmark's settings, the cache locations and the task orders; bench/suite/split.py keeps
tuning on validation data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.suite.build import build_suite
from bench.suite.split import validation_view
from mergeline.demo.tasks import TASK_NAMES

CACHE = Path(__file__).resolve().parents[1] / ".cache"
SUITE_DIR = CACHE / "suite"
TEXT_SUITE_DIR = CACHE / "text-suite"
TASKS: list[str] = list(TASK_NAMES)  # all 8 demo tasks
# Passed to build_suite; changing any of them rebuilds the suite (suite.json records them).
SETTINGS = {"seed": 0, "proxy": "glyphs", "pretrain_steps": 3000, "finetune_steps": 600, "finetune_lr": 7e-5,
            "calib_size": 256, "eval_size": 500, "validation_size": 250, "head_fraction": 0.25}
ORDER_SEEDS = (0, 1, 2)  # three task orders: the listed order, then two seeded permutations
SUITES = ("image", "text")


def get_suite(log: Callable[[str], None] = print, *, name: str = "image", split: str = "eval") -> dict:
    """Build (or reuse) a suite; returns its builder's description plus `build_seconds` when built now. With
    split="validation" (image suite only) the description is bench.suite.split's validation view, and this process
    can no longer open eval data or the report-only text suite."""
    if split not in ("eval", "validation"):
        raise ValueError(f"unknown split {split!r}: eval or validation")
    if name == "text" and split == "validation":
        raise ValueError("the text suite is for the report only: choose on the image suite's validation split")
    started = time.monotonic()
    if name == "image":
        suite = build_suite(SUITE_DIR, TASKS, log=log, **SETTINGS)
    elif name == "text":
        from bench.suite.text import build_text_suite

        suite = build_text_suite(TEXT_SUITE_DIR, log=log)
    else:
        raise ValueError(f"unknown suite {name!r}: one of {', '.join(SUITES)}")
    suite["build_seconds"] = round(time.monotonic() - started, 1)
    suite["name"] = name
    return validation_view(suite, report_only=[TEXT_SUITE_DIR]) if split == "validation" else suite


def task_orders(n: int = 3, tasks: list[str] | None = None) -> list[list[str]]:
    """Order 0 is the suite's own order; the others are deterministic permutations of it."""
    tasks = list(tasks or TASKS)
    orders = [tasks]
    for seed in ORDER_SEEDS[1:n]:
        perm = np.random.default_rng(1000 + seed).permutation(len(tasks))
        orders.append([tasks[i] for i in perm])
    return orders[:n]

