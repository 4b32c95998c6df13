"""The benchmark suite's builder: a base, fine-tuned tasks with calibration, eval and head-tuning sets, cached
by their settings, and the continual merges the benchmarks run over them. The models and data are made by the
demo's building blocks (mergeline/demo), with the benchmark's own, larger settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from core.progress import NullProgress, Progress
from core.settings import Settings
from core.spec import JobSpec
from core.store import LineageStore
from engine.evaluate import accuracy
from engine.families import get_family
from engine.families.base import Family, LoadedBase
from engine.job import run_job
from mergeline.demo.build import finetuned_task, local, pretrained_base, write_task_data
from mergeline.demo.tasks import TaskData, build_task, glyphs
from mergeline.demo.train import TINY_CLIP, as_uint8_npz

SUITE_VERSION = 3  # 3: a validation set per task, held out of fine-tuning


def build_suite(root: Path, task_names: list[str], *, seed: int = 0, pretrain_steps: int = 3000,
                proxy: str = "glyphs", proxy_sources: tuple[str, ...] = ("mnist", "digits", "shapes"),
                proxy_size: int = 20000, finetune_steps: int = 600, finetune_lr: float = 7e-5, calib_size: int = 256,
                eval_size: int = 500, validation_size: int = 250, head_fraction: float = 0.25,
                arch: dict | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the base, every task's checkpoint, head, calibration, validation, eval and head-tuning set under
    `root`; reuse them when `root/suite.json` says they were built with the same settings. Returns that description.

    Validation sets are the last `validation_size` images of each task's training split, held out of fine-tuning:
    labelled inputs disjoint from eval (the test split) on which every choice is made (bench/suite/split.py).

    The defaults aim at the regime merging is used in (a strong base, small fine-tuning steps, as with CLIP): a
    base pretrained on printed glyphs, then fine-tunes at a small learning rate. `proxy_sources` feed only the
    label-free `rotation` and `transforms` proxies."""
    config = {"version": SUITE_VERSION, "arch": arch or TINY_CLIP, "seed": seed, "pretrain_steps": pretrain_steps,
              "proxy": proxy, "proxy_sources": list(proxy_sources), "proxy_size": proxy_size,
              "finetune_steps": finetune_steps, "finetune_lr": finetune_lr, "calib_size": calib_size,
              "eval_size": eval_size, "validation_size": validation_size, "head_fraction": head_fraction}
    described = root / "suite.json"
    if described.exists():
        suite = json.loads(described.read_text())
        if suite["config"] == config and all(n in suite["tasks"] for n in task_names):
            return suite
    family = get_family("open_clip")
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    datasets = {name: build_task(name, seed=seed) for name in task_names}
    log(f"pretraining the base ({config['pretrain_steps']} steps, {config['proxy']} proxy)")
    images, labels = _proxy_images(config)
    base_file = pretrained_base(family, root, config["arch"], images, labels, steps=pretrain_steps, seed=seed,
                                proxy=proxy)
    loaded = family.load_base(local(base_file), config["arch"])
    tasks = {}
    for i, (name, data) in enumerate(datasets.items()):
        folder = root / "tasks" / name
        cut = len(data.x_train) - validation_size
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "validation.npz", **as_uint8_npz(data.x_train[cut:], data.y_train[cut:]))
        data = replace(data, x_train=data.x_train[:cut], y_train=data.y_train[:cut])
        write_task_data(folder, data, calib_size=calib_size, eval_size=eval_size)
        _write_head_data(folder, data, head_fraction)
        log(f"fine-tuning {name} ({finetune_steps} steps)")
        tasks[name] = {**finetuned_task(family, loaded, folder, data, steps=finetune_steps, lr=finetune_lr,
                                        seed=seed * 1000 + i),
                       "head_data": (folder / "head_data.npz").as_uri(),
                       "validation": (folder / "validation.npz").as_uri()}
        tuned = family.load_checkpoint(local(folder / "checkpoint.safetensors"), loaded, field="task")
        tasks[name]["individual_validation_accuracy"] = _accuracy(family, loaded, tuned, folder, "validation.npz")
    # The base with each task's fine-tuned head shows how much of the task the head alone carries.
    suite = {"config": config, "base": {"family": "open_clip", "arch": config["arch"], "uri": base_file.as_uri()},
             "tasks": tasks,
             **{key: {name: _accuracy(family, loaded, loaded.tower, root / "tasks" / name, file) for name in tasks}
                for key, file in (("base_accuracy", "eval.npz"), ("base_validation_accuracy", "validation.npz"))}}
    described.write_text(json.dumps(suite, indent=2))
    return suite


def _proxy_images(config: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The pretraining proxy's images and labels: printed glyphs, or `proxy_sources` images without labels."""
    if config["proxy"] == "glyphs":
        return glyphs(np.random.default_rng([config["seed"], 999]), config["proxy_size"])
    sources = [build_task(name, seed=config["seed"]).x_train[:1000] for name in config["proxy_sources"]]
    return np.concatenate(sources), None


def _write_head_data(folder: Path, data: TaskData, head_fraction: float) -> None:
    """Labelled data for the optional head tuning: a share of the training split, as the paper uses."""
    n_head = int(len(data.x_train) * head_fraction)
    np.savez(folder / "head_data.npz", **as_uint8_npz(data.x_train[:n_head], data.y_train[:n_head]))


def _accuracy(family: Family, loaded: LoadedBase, tower: dict, folder: Path, file: str) -> float:
    """`tower`'s accuracy on a task's labelled `file` (eval or validation) through that task's fine-tuned head."""
    inputs = family.load_inputs(local(folder / file), loaded, labelled=True, field="e")
    head = load_file(folder / "head.safetensors")
    return round(accuracy(family, loaded, tower, inputs, head, device=torch.device("cpu")), 6)


def task_entry(suite: dict, name: str, *, with_calibration: bool = True, tune_head: bool = False) -> dict:
    t = suite["tasks"][name]
    entry = {"name": name, "checkpoint": t["checkpoint"], "eval": t["eval"], "head": t["head"]}
    if with_calibration:
        entry["calibration"] = t["calibration"]
    if tune_head:
        entry["head_data"] = t["head_data"]
    return entry


def merge_continually(suite: dict, task_names: list[str], method: str, params: dict, *, store: LineageStore,
                      settings: Settings, lineage: str, progress: Progress | None = None,
                      tune_heads: bool = False) -> list[dict]:
    """One job per task onto `lineage`, as a pipeline would post them; returns each job's result."""
    results = []
    for i, name in enumerate(task_names):
        spec = {"lineage": lineage, "tasks": [task_entry(suite, name, tune_head=tune_heads)], "method": method,
                "params": params}
        if i == 0:
            spec["base"] = suite["base"]
        results.append(run_job(JobSpec.model_validate(spec), store, progress or NullProgress(), settings=settings))
    return results
