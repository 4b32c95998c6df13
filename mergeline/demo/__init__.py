"""`mergeline demo`: a small continual-merging problem built on the spot from offline data.

A tiny OpenCLIP ViT base pretrained on printed glyphs (shipped with the package, see `mergeline.demo.base`, or
pretrained on the spot with `--pretrain`) is fine-tuned separately on each task (tower plus linear
head), and the fine-tunes are merged continually, one job per task, with OTMF and with task arithmetic. The job
specs it writes follow the contract, so any step can be re-run with `mergeline merge` or `mergeline submit`."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from core.settings import Settings
from core.spec import JobSpec
from core.store import LineageStore
from engine.families import get_family
from engine.job import run_job
from engine.tensors import torch_threads
from mergeline.bars import StepRow, losses_text
from mergeline.demo.base import SHIPPED_BASE, BaseConfig, pretrain_base, sha256_of, shipped_base
from mergeline.demo.build import finetuned_task, local, write_task_data
from mergeline.demo.tasks import TASK_NAMES, TaskData, build_task
from mergeline.demo.train import TINY_CLIP

METHODS = ("otmf", "task_arithmetic")
DEMO_TOKEN = "demo-token"  # the token the printed `serve` and `submit` commands share (the API listens on loopback)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes. `pretrain` None uses the shipped base; a BaseConfig pretrains one on the spot (minutes).
    The fine-tuning lr and OTMF's α were chosen by OTMF's accuracy on 500 held-out training images per task
    (`holdout`, bench/demo_select.py, bench/results/demo_select.json), never on the test split the demo reports."""

    seed: int = 0
    pretrain: BaseConfig | None = None
    finetune_steps: int = 150
    finetune_lr: float = 1e-4
    calib_size: int = 256
    eval_size: int = 500
    otmf_steps: int = 100
    otmf_alpha: float = 0.5
    otmf_mask_update: str = "alternate"  # the updates the demo's settings were chosen and measured with
    otmf_replay_targets: str = "head"  # the replay targets its figures were measured with
    holdout: int = 0  # > 0: that many training images per task are kept out of fine-tuning and evaluated on


# The replay sizes the demo's figures were measured with (OTMF's defaults before they doubled): quicker, too.
_MEASURED_REPLAY_SIZES = {"reservoir_per_task": 64, "reservoir_size": 512, "batch_size": 16}


def demo_threads() -> int:
    """One torch thread per idle core, at most 4. On a busy 2-core machine that is one: there a pretraining step
    took 0.3 s with one thread and 4.6 s with torch's default two threads, which wait on each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, int(cores - os.getloadavg()[0])))


def run_demo(workdir: Path, *, n_tasks: int = 4, config: DemoConfig = DemoConfig(), threads: int | None = None,
             bars: Progress | None = None) -> dict:
    """Build the models and data under `workdir/models`, merge them into a fresh store at `workdir/store` (job
    specs in `workdir/jobs`), and return the report: per-task accuracy, timings and the next commands to try."""
    started = time.monotonic()
    workdir = workdir.resolve()
    names = TASK_NAMES[:n_tasks]
    bars = bars or Progress(disable=True)
    threads = threads or demo_threads()
    for owned in ("models", "store", "jobs"):
        shutil.rmtree(workdir / owned, ignore_errors=True)
    seconds: dict[str, float] = {}
    with torch_threads(threads):
        suite = _build_models(workdir / "models", names, config, bars, seconds)
        settings = Settings(store=(workdir / "store").as_uri(), allowed_roots=str(workdir))
        store = LineageStore(settings.store)
        finals = {}
        for method in METHODS:
            t0 = time.monotonic()
            params = ({"steps": config.otmf_steps, "alpha": config.otmf_alpha, "mask_update": config.otmf_mask_update,
                       "replay_targets": config.otmf_replay_targets, **_MEASURED_REPLAY_SIZES}
                      if method == "otmf" else {})
            finals[method] = _merge_continually(suite, names, method, params, store, settings, workdir / "jobs",
                                                bars)[-1]["metrics"]
            seconds[f"merging {method}"] = round(time.monotonic() - t0, 1)
    seconds["total"] = round(time.monotonic() - started, 1)
    return {
        "tasks": names,
        "individual": _metrics({n: suite["tasks"][n]["individual_accuracy"] for n in names}),
        "methods": finals,
        "store": str(workdir / "store"),
        "jobs": str(workdir / "jobs"),
        "threads": threads,
        "seconds": seconds,
        "config": {**asdict(config), "tasks": n_tasks, "arch": TINY_CLIP,
                   "base_sha256": sha256_of(workdir / "models" / "base" / "model.safetensors")},
        "next": next_commands(workdir, n_tasks),
    }


def _build_models(root: Path, names: list[str], config: DemoConfig, bars: Progress, seconds: dict) -> dict:
    """The base and each task's fine-tune, checkpoint, head, calibration and eval set; returns their URIs."""
    family = get_family("open_clip")
    torch.manual_seed(config.seed)
    root.mkdir(parents=True)
    t0 = time.monotonic()
    row = bars.add_task("data", total=len(names), note="")
    datasets = {}
    for name in names:
        datasets[name] = _held_out(build_task(name, seed=config.seed), config.holdout)
        write_task_data(root / "tasks" / name, datasets[name], calib_size=config.calib_size,
                        eval_size=config.eval_size)
        bars.advance(row)
    seconds["data"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    base_file = _base(root / "base", config.pretrain, bars)
    seconds["base"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    loaded = family.load_base(local(base_file), TINY_CLIP)
    tasks = {}
    for i, (name, data) in enumerate(datasets.items()):
        row = bars.add_task(f"fine-tune {name}", total=config.finetune_steps, note="")
        tasks[name] = finetuned_task(family, loaded, root / "tasks" / name, data, steps=config.finetune_steps,
                                     lr=config.finetune_lr, seed=config.seed * 1000 + i, on_step=_on_step(bars, row))
        bars.update(row, note=f"accuracy {100 * tasks[name]['individual_accuracy']:.1f}%")
    seconds["fine-tuning"] = round(time.monotonic() - t0, 1)
    return {"base": {"family": "open_clip", "arch": TINY_CLIP, "uri": base_file.as_uri()}, "tasks": tasks}


def _base(folder: Path, pretrain: BaseConfig | None, bars: Progress) -> Path:
    """The shipped base, verified by its sha256, or one pretrained on the spot with `pretrain`."""
    if pretrain is None:
        row = bars.add_task("base (shipped)", total=1, note="")
        base_file = shipped_base(folder)
        bars.update(row, completed=1, note=f"sha256 {sha256_of(SHIPPED_BASE)[:12]} verified")
        return base_file
    row = bars.add_task("pretraining", total=pretrain.steps, note="")
    return pretrain_base(folder.parent, pretrain, on_step=_on_step(bars, row))


def _held_out(data: TaskData, holdout: int) -> TaskData:
    """The task with its last `holdout` training images as its test split (unchanged when 0)."""
    if holdout == 0:
        return data
    return dataclasses.replace(data, x_train=data.x_train[:-holdout], y_train=data.y_train[:-holdout],
                               x_test=data.x_train[-holdout:], y_test=data.y_train[-holdout:])


def _on_step(bars: Progress, row):
    return lambda step, loss: bars.update(row, completed=step, note=losses_text({None: loss}))


def _merge_continually(suite: dict, names: list[str], method: str, params: dict, store: LineageStore,
                       settings: Settings, jobs_dir: Path, bars: Progress) -> list[dict]:
    """One job per task onto the method's lineage, each written to `jobs_dir` first; returns each job's result."""
    lineage = lineage_name(method)
    jobs_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, name in enumerate(names):
        task = {key: suite["tasks"][name][key] for key in ("checkpoint", "calibration", "eval", "head")}
        spec = {"lineage": lineage, "tasks": [{"name": name, **task}], "method": method, "params": params}
        if i == 0:
            spec["base"] = suite["base"]
        (jobs_dir / f"{lineage}-{i + 1}.json").write_text(json.dumps(spec, indent=2))
        row = StepRow(bars, f"{lineage} v{i + 1}: +{name}")
        results.append(run_job(JobSpec.model_validate(spec), store, row, settings=settings))
    return results


def lineage_name(method: str) -> str:
    return f"demo-{method.replace('_', '-')}"


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to the current directory when below it."""
    cwd = Path.cwd().resolve()
    return shlex.quote(str(path.relative_to(cwd) if path.is_relative_to(cwd) else path))


def next_commands(workdir: Path, n_tasks: int) -> list[dict[str, str]]:
    """What to try after the demo, each command runnable as printed from the current directory."""
    store, otmf = _shown(workdir / "store"), lineage_name("otmf")
    serve_env = f"MERGELINE_API_TOKENS={DEMO_TOKEN}=default"
    if not workdir.is_relative_to(Path.cwd().resolve()):  # `serve` reads inputs below the current directory only
        serve_env += f" MERGELINE_ALLOWED_ROOTS={shlex.quote(str(workdir))}"
    first_job = _shown(workdir / "jobs" / f"{otmf}-1.json")
    return [
        {"what": "the demo's lineages", "command": f"mergeline lineage list --store {store}"},
        {"what": "OTMF's versions, one per merged task", "command": f"mergeline lineage show {otmf} --store {store}"},
        {"what": "the last merged model's files, verified",
         "command": f"mergeline pull {otmf}@{n_tasks} {_shown(workdir / 'pulled')} --store {store}"},
        {"what": "the service (in a second terminal; its store is ./mergeline-data/store)",
         "command": f"{serve_env} mergeline serve"},
        {"what": "the first OTMF job, through the service",
         "command": f"mergeline submit {first_job} --token {DEMO_TOKEN} --wait"},
        {"what": "the lineage it started, read through the API",
         "command": f"mergeline lineage show {otmf} --url http://127.0.0.1:8000 --token {DEMO_TOKEN}"},
    ]


def _metrics(accuracies: dict[str, float]) -> dict:
    return {"tasks": {n: {"accuracy": a} for n, a in accuracies.items()},
            "avg_accuracy": round(sum(accuracies.values()) / len(accuracies), 6)}
