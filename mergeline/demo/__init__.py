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
from engine.families.base import Family, LoadedBase
from engine.job import run_job
from engine.tensors import save_safetensors
from mergeline.demo.tasks import TASK_NAMES, TaskData, build_task, glyphs
from mergeline.demo.train import TINY_CLIP, as_uint8_npz, finetune, pretrain

SUITE_VERSION = 2
local = Fetched.local  # the demo's own files, read without a UriReader
TASK_FILES = (("checkpoint", "checkpoint.safetensors"), ("calibration", "calibration.npz"), ("eval", "eval.npz"),
              ("head", "head.safetensors"), ("head_data", "head_data.npz"))


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
    config = {"version": SUITE_VERSION, "arch": arch or TINY_CLIP, "seed": seed, "pretrain_steps": pretrain_steps,
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
    base_file = _pretrained_base(family, root, config, log)
    loaded = family.load_base(local(base_file), config["arch"])
    tasks = {name: _finetuned_task(family, loaded, root / "tasks" / name, data, config, seed * 1000 + i, log)
             for i, (name, data) in enumerate(datasets.items())}
    # The base with each task's fine-tuned head shows how much of the task the head alone carries.
    base_acc = {name: _base_accuracy(family, loaded, root / "tasks" / name) for name in tasks}
    suite = {"config": config, "base": {"family": "open_clip", "arch": config["arch"], "uri": base_file.as_uri()},
             "tasks": tasks, "base_accuracy": base_acc}
    described.write_text(json.dumps(suite, indent=2))
    return suite


def _pretrained_base(family: Family, root: Path, config: dict, log: Callable[[str], None]) -> Path:
    """A fresh tower of `config["arch"]` pretrained on the proxy, saved under `root/base`; returns its file."""
    import open_clip

    init, proxy_file = root / "base-init.safetensors", root / "proxy.npz"
    save_safetensors(open_clip.CLIP(**config["arch"]).state_dict(), init)
    loaded = family.load_base(local(init), config["arch"])
    images, labels = _proxy_images(config)
    np.savez(proxy_file, **as_uint8_npz(images, labels))
    proxy_data = family.load_inputs(local(proxy_file), loaded, labelled=labels is not None, field="proxy")
    log(f"pretraining the base ({config['pretrain_steps']} steps, {config['proxy']} proxy)")
    tower = pretrain(family, loaded, proxy_data.tensors["pixels"], labels=proxy_data.labels,
                     steps=config["pretrain_steps"], seed=config["seed"], proxy=config["proxy"])
    base_file = family.save_version(loaded, tower, root / "base")[0]
    init.unlink()
    proxy_file.unlink()
    return base_file


def _proxy_images(config: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The pretraining proxy's images and labels: printed glyphs, or `proxy_sources` images without labels."""
    if config["proxy"] == "glyphs":
        return glyphs(np.random.default_rng([config["seed"], 999]), config["proxy_size"])
    sources = [build_task(name, seed=config["seed"]).x_train[:1000] for name in config["proxy_sources"]]
    return np.concatenate(sources), None


def _write_task_data(folder: Path, data: TaskData, config: dict) -> None:
    """The task's training split (removed once fine-tuned), calibration, eval and head-tuning sets under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    calib_size, eval_size = config["calib_size"], config["eval_size"]
    np.savez(folder / "train.npz", **as_uint8_npz(data.x_train, data.y_train))
    np.savez(folder / "calibration.npz", **as_uint8_npz(data.x_train[:calib_size]))
    np.savez(folder / "eval.npz", **as_uint8_npz(data.x_test[:eval_size], data.y_test[:eval_size]))
    # Labelled data for the optional head tuning: a share of the training split, as the paper uses.
    n_head = int(len(data.x_train) * config["head_fraction"])
    np.savez(folder / "head_data.npz", **as_uint8_npz(data.x_train[:n_head], data.y_train[:n_head]))


def _finetuned_task(family: Family, loaded: LoadedBase, folder: Path, data: TaskData, config: dict, seed: int,
                    log: Callable[[str], None]) -> dict:
    """Fine-tune the base on one task and write its files under `folder`; returns the task's suite entry."""
    _write_task_data(folder, data, config)
    train = family.load_inputs(local(folder / "train.npz"), loaded, labelled=True, field="train")
    (folder / "train.npz").unlink()
    log(f"fine-tuning {folder.name} ({config['finetune_steps']} steps)")
    tuned = finetune(family, loaded, train.tensors["pixels"], train.labels, data.classes,
                     steps=config["finetune_steps"], lr=config["finetune_lr"], seed=seed)
    # Task checkpoints hold only the image tower, as many users ship them.
    save_safetensors({f"visual.{k}": v for k, v in tuned.tower.items()}, folder / "checkpoint.safetensors")
    save_safetensors(tuned.head, folder / "head.safetensors")
    evaluation = family.load_inputs(local(folder / "eval.npz"), loaded, labelled=True, field="eval")
    acc = accuracy(family, loaded, tuned.tower, evaluation, tuned.head, device=torch.device("cpu"))
    return {"classes": data.classes, "individual_accuracy": round(acc, 6),
            **{key: (folder / file).as_uri() for key, file in TASK_FILES}}


def _base_accuracy(family: Family, loaded: LoadedBase, folder: Path) -> float:
    """The base's accuracy on a task's eval set through that task's fine-tuned head."""
    evaluation = family.load_inputs(local(folder / "eval.npz"), loaded, labelled=True, field="e")
    head = load_file(folder / "head.safetensors")
    return round(accuracy(family, loaded, loaded.tower, evaluation, head, device=torch.device("cpu")), 6)


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
