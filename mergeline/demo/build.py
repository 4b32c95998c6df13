"""The files a continual merge starts from, made on the spot: a pretrained base and, per task, a fine-tuned
tower, its head, calibration and eval sets, in the formats of the contract (the benchmark suite, bench/suite,
builds on the same three steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.uris import Fetched
from engine.evaluate import accuracy
from engine.families.base import Family, LoadedBase
from engine.tensors import save_safetensors
from mergeline.demo.tasks import TaskData
from mergeline.demo.train import OnStep, as_uint8_npz, finetune, pretrain

local = Fetched.local  # files built here, read without a UriReader
TASK_FILES = {"checkpoint": "checkpoint.safetensors", "calibration": "calibration.npz", "eval": "eval.npz",
              "head": "head.safetensors"}


def pretrained_base(family: Family, root: Path, arch: dict, images: np.ndarray, labels: np.ndarray | None, *,
                    steps: int, seed: int, proxy: str, on_step: OnStep | None = None) -> Path:
    """A fresh tower of `arch` (drawn from torch's global generator) pretrained on `images` with the `proxy`
    objective, saved under `root/base`; returns its weights file."""
    import open_clip

    init, proxy_file = root / "base-init.safetensors", root / "proxy.npz"
    save_safetensors(open_clip.CLIP(**arch).state_dict(), init)
    loaded = family.load_base(local(init), arch)
    np.savez(proxy_file, **as_uint8_npz(images, labels))
    proxy_data = family.load_inputs(local(proxy_file), loaded, labelled=labels is not None, field="proxy")
    tower = pretrain(family, loaded, proxy_data.tensors["pixels"], labels=proxy_data.labels, steps=steps, seed=seed,
                     proxy=proxy, on_step=on_step)
    base_file = family.save_version(loaded, tower, root / "base")[0]
    init.unlink()
    proxy_file.unlink()
    return base_file


def write_task_data(folder: Path, data: TaskData, *, calib_size: int, eval_size: int) -> None:
    """The task's training split (removed once fine-tuned), calibration and eval sets under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", **as_uint8_npz(data.x_train, data.y_train))
    np.savez(folder / "calibration.npz", **as_uint8_npz(data.x_train[:calib_size]))
    np.savez(folder / "eval.npz", **as_uint8_npz(data.x_test[:eval_size], data.y_test[:eval_size]))


def finetuned_task(family: Family, loaded: LoadedBase, folder: Path, data: TaskData, *, steps: int, lr: float,
                   seed: int, on_step: OnStep | None = None) -> dict:
    """Fine-tune the base on the task whose data `write_task_data` put under `folder` and write its checkpoint
    and head there; returns the task's entry: classes, individual accuracy and each file's URI."""
    train = family.load_inputs(local(folder / "train.npz"), loaded, labelled=True, field="train")
    (folder / "train.npz").unlink()
    tuned = finetune(family, loaded, train.tensors["pixels"], train.labels, data.classes, steps=steps, lr=lr,
                     seed=seed, on_step=on_step)
    # Task checkpoints hold only the image tower, as many users ship them.
    save_safetensors({f"visual.{k}": v for k, v in tuned.tower.items()}, folder / "checkpoint.safetensors")
    save_safetensors(tuned.head, folder / "head.safetensors")
    evaluation = family.load_inputs(local(folder / "eval.npz"), loaded, labelled=True, field="eval")
    acc = accuracy(family, loaded, tuned.tower, evaluation, tuned.head, device=torch.device("cpu"))
    return {"classes": data.classes, "individual_accuracy": round(acc, 6),
            **{key: (folder / file).as_uri() for key, file in TASK_FILES.items()}}
