"""`mergeline demo`: a small continual-merging problem built on the spot from offline data.

A tiny OpenCLIP ViT base is pretrained on a generic proxy, fine-tuned separately on each task (tower plus linear
head), and the fine-tunes are merged continually, one job per task, with OTMF and with task arithmetic. The
files and job specs it writes follow the contract, so any step can be re-run with `mergeline merge`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from core.progress import NullProgress, Progress
from core.settings import Settings
from core.spec import JobSpec
from core.store import LineageStore
from core.uris import Fetched
from engine.evaluate import accuracy
from engine.families import get_family
from engine.job import run_job
from engine.tensors import save_safetensors
from mergeline.demo.tasks import TASK_NAMES, build_task, glyphs
from mergeline.demo.train import TINY_CLIP, as_uint8_npz, finetune, pretrain

SUITE_VERSION = 2


def local(path: Path) -> Fetched:
    return Fetched(path.as_uri(), path, "", path.stat().st_size)


def build_suite(root: Path, task_names: list[str], *, seed: int = 0, pretrain_steps: int = 3000,
                proxy: str = "glyphs", proxy_sources: tuple[str, ...] = ("mnist", "digits", "shapes"),
                proxy_size: int = 20000, finetune_steps: int = 600, finetune_lr: float = 7e-5, calib_size: int = 256,
                eval_size: int = 500, head_fraction: float = 0.25,
                arch: dict | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the base, every task's checkpoint, head, calibration, eval and head-tuning set under `root`; reuse them
    when `root/suite.json` says they were built with the same settings. Returns that description.

    The defaults aim at the regime merging is used in (a strong base, small fine-tuning steps, as with CLIP): a
    base pretrained on printed glyphs, then fine-tunes at a small learning rate. `proxy_sources` feed only the
    label-free `rotation` and `transforms` proxies."""
    arch = arch or TINY_CLIP
    config = {"version": SUITE_VERSION, "arch": arch, "seed": seed, "pretrain_steps": pretrain_steps,
              "proxy": proxy, "proxy_sources": list(proxy_sources), "proxy_size": proxy_size,
              "finetune_steps": finetune_steps, "finetune_lr": finetune_lr, "calib_size": calib_size,
              "eval_size": eval_size, "head_fraction": head_fraction}
    described = root / "suite.json"
    if described.exists():
        suite = json.loads(described.read_text())
        if suite["config"] == config and all(n in suite["tasks"] for n in task_names):
            return suite
    family = get_family("open_clip")
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    datasets = {name: build_task(name, seed=seed) for name in task_names}

    import open_clip

    init = root / "base-init.safetensors"
    save_safetensors(open_clip.CLIP(**arch).state_dict(), init)
    loaded = family.load_base(local(init), arch)
    if proxy == "glyphs":
        proxy_images, proxy_labels = glyphs(np.random.default_rng([seed, 999]), proxy_size)
    else:  # label-free proxies
        proxy_images = np.concatenate([build_task(n, seed=seed).x_train[:1000] for n in proxy_sources])
        proxy_labels = None
    np.savez(root / "proxy.npz", **as_uint8_npz(proxy_images, proxy_labels))
    proxy_data = family.load_inputs(local(root / "proxy.npz"), loaded, labelled=proxy_labels is not None,
                                    field="proxy")
    log(f"pretraining the base ({pretrain_steps} steps, {proxy} proxy)")
    tower = pretrain(family, loaded, proxy_data.tensors["pixels"], labels=proxy_data.labels, steps=pretrain_steps,
                     seed=seed, proxy=proxy)
    base_file = family.save_version(loaded, tower, root / "base")[0]
    loaded = family.load_base(local(base_file), arch)
    init.unlink()
    (root / "proxy.npz").unlink()

    tasks = {}
    for i, (name, data) in enumerate(datasets.items()):
        folder = root / "tasks" / name
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "train.npz", **as_uint8_npz(data.x_train, data.y_train))
        np.savez(folder / "calibration.npz", **as_uint8_npz(data.x_train[:calib_size]))
        np.savez(folder / "eval.npz", **as_uint8_npz(data.x_test[:eval_size], data.y_test[:eval_size]))
        # Labelled data for the optional head tuning: a share of the training split, as the paper uses.
        n_head = int(len(data.x_train) * head_fraction)
        np.savez(folder / "head_data.npz", **as_uint8_npz(data.x_train[:n_head], data.y_train[:n_head]))
        train = family.load_inputs(local(folder / "train.npz"), loaded, labelled=True, field="train")
        (folder / "train.npz").unlink()
        log(f"fine-tuning {name} ({finetune_steps} steps)")
        tuned = finetune(family, loaded, train.tensors["pixels"], train.labels, data.classes,
                         steps=finetune_steps, lr=finetune_lr, seed=seed * 1000 + i)
        # Task checkpoints hold only the image tower, as many users ship them.
        save_safetensors({f"visual.{k}": v for k, v in tuned.tower.items()}, folder / "checkpoint.safetensors")
        save_safetensors(tuned.head, folder / "head.safetensors")
        evaluation = family.load_inputs(local(folder / "eval.npz"), loaded, labelled=True, field="eval")
        acc = accuracy(family, loaded, tuned.tower, evaluation, tuned.head, device=torch.device("cpu"))
        tasks[name] = {"classes": data.classes, "individual_accuracy": round(acc, 6),
                       **{k: (folder / f).as_uri() for k, f in (("checkpoint", "checkpoint.safetensors"),
                          ("calibration", "calibration.npz"), ("eval", "eval.npz"), ("head", "head.safetensors"),
                          ("head_data", "head_data.npz"))}}
    base_acc = {}
    for name in tasks:
        # The base with each task's fine-tuned head shows how much of the task the head alone carries.
        evaluation = family.load_inputs(local(root / "tasks" / name / "eval.npz"), loaded, labelled=True, field="e")
        head = load_file(root / "tasks" / name / "head.safetensors")
        base_acc[name] = round(accuracy(family, loaded, loaded.tower, evaluation, head, device=torch.device("cpu")), 6)
    suite = {"config": config, "base": {"family": "open_clip", "arch": arch, "uri": base_file.as_uri()},
             "tasks": tasks, "base_accuracy": base_acc}
    described.write_text(json.dumps(suite, indent=2))
    return suite


def task_entry(suite: dict, name: str, *, with_calibration: bool = True, tune_head: bool = False) -> dict:
    t = suite["tasks"][name]
    entry = {"name": name, "checkpoint": t["checkpoint"], "eval": t["eval"], "head": t["head"]}
    if with_calibration:
        entry["calibration"] = t["calibration"]
    if tune_head:
        entry["head_data"] = t["head_data"]
    return entry


def merge_continually(suite: dict, task_names: list[str], method: str, params: dict, *, store: LineageStore,
                      settings: Settings, lineage: str, jobs_dir: Path | None = None,
                      progress: Progress | None = None, tune_heads: bool = False) -> list[dict]:
    """One job per task onto `lineage`, as a pipeline would post them; returns each job's result."""
    results = []
    for i, name in enumerate(task_names):
        spec = {"lineage": lineage, "tasks": [task_entry(suite, name, tune_head=tune_heads)], "method": method,
                "params": params}
        if i == 0:
            spec["base"] = suite["base"]
        if jobs_dir is not None:
            jobs_dir.mkdir(parents=True, exist_ok=True)
            (jobs_dir / f"{lineage}-{i + 1}.json").write_text(json.dumps(spec, indent=2))
        results.append(run_job(JobSpec.model_validate(spec), store, progress or NullProgress(), settings=settings))
    return results


def run_demo(workdir: Path, *, n_tasks: int = 4, otmf_steps: int = 100, console=None,
             progress: Progress | None = None) -> dict:
    workdir = workdir.resolve()
    names = TASK_NAMES[:n_tasks]
    log = console.log if console is not None else (lambda _: None)
    suite = build_suite(workdir / "suite", names, log=log)
    store_root = workdir / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    settings = Settings(store=store_root.as_uri(), allowed_roots=str(workdir))
    store = LineageStore(settings.store)
    methods = {"otmf": {"steps": otmf_steps}, "task_arithmetic": {}}
    report = {
        "tasks": names,
        "individual": _metrics({n: suite["tasks"][n]["individual_accuracy"] for n in names}),
        "base": _metrics({n: suite["base_accuracy"][n] for n in names}),
        "methods": {},
        "store": settings.store,
    }
    for method, params in methods.items():
        log(f"merging {n_tasks} tasks continually with {method}")
        results = merge_continually(suite, names, method, params, store=store, settings=settings,
                                    lineage=f"demo-{method.replace('_', '-')}", jobs_dir=workdir / "jobs",
                                    progress=progress)
        report["methods"][method] = results[-1]["metrics"]
    return report


def _metrics(accuracies: dict[str, float]) -> dict:
    return {"tasks": {n: {"accuracy": a} for n, a in accuracies.items()},
            "avg_accuracy": round(sum(accuracies.values()) / len(accuracies), 6)}
