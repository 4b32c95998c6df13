"""The demo's pretrained base, shipped with the package: `python -m mergeline.demo.base` pretrains it with the
recorded settings and writes `base.safetensors` and `base.json` (the command, settings and sha256) beside this
file; `mergeline demo` checks the file against that sha256 before using it."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import InvalidInput
from engine.families import get_family
from mergeline.demo.build import pretrained_base
from mergeline.demo.tasks import glyphs
from mergeline.demo.train import TINY_CLIP, OnStep

HERE = Path(__file__).resolve().parent
SHIPPED_BASE = HERE / "base.safetensors"
SHIPPED_RECORD = HERE / "base.json"
COMMAND = "OMP_NUM_THREADS=1 python -m mergeline.demo.base"


@dataclass(frozen=True)
class BaseConfig:
    """How the base is pretrained: the glyphs proxy (printed characters, their classes and 16 transforms)."""

    seed: int = 0
    glyphs: int = 20000
    steps: int = 3000
    proxy: str = "glyphs"


def pretrain_base(folder: Path, config: BaseConfig = BaseConfig(), on_step: OnStep | None = None) -> Path:
    """A tiny OpenCLIP base pretrained with `config`, saved under `folder`; returns its weights file."""
    torch.manual_seed(config.seed)  # the fresh tower's initialisation
    images, labels = glyphs(np.random.default_rng([config.seed, 999]), config.glyphs)
    folder.mkdir(parents=True, exist_ok=True)
    return pretrained_base(get_family("open_clip"), folder, TINY_CLIP, images, labels, steps=config.steps,
                           seed=config.seed, proxy=config.proxy, on_step=on_step)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_base(into: Path, weights: Path = SHIPPED_BASE, record: Path = SHIPPED_RECORD) -> Path:
    """Copy the shipped base to `into/model.safetensors` after checking it against its record's sha256."""
    expected = json.loads(record.read_text())["sha256"]
    actual = sha256_of(weights)
    if actual != expected:
        raise InvalidInput(f"the demo's shipped base {weights} has sha256 {actual}, not the {expected} recorded in "
                           f"{record.name}: reinstall the package, or run `mergeline demo --pretrain`",
                           param="base")
    into.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(weights, into / "model.safetensors"))


def write_shipped_base(config: BaseConfig, weights: Path = SHIPPED_BASE, record: Path = SHIPPED_RECORD) -> dict:
    """Pretrain the base and write it and its record (command, settings, sha256, size, seconds)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        made = pretrain_base(Path(scratch), config)
        shutil.copyfile(made, weights)
    description = {"command": COMMAND, "settings": asdict(config), "arch": TINY_CLIP,
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "seconds": round(time.monotonic() - started, 1),
                   "bytes": weights.stat().st_size, "sha256": sha256_of(weights)}
    record.write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SHIPPED_BASE, help="the weights file (its record goes beside)")
    args = parser.parse_args(argv)
    print(json.dumps(write_shipped_base(BaseConfig(), args.out, args.out.with_suffix(".json")), indent=2))


if __name__ == "__main__":
    main()
