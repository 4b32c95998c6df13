"""The `state_dict` family: bare tensors in one file, for data-free methods on any architecture.

Every floating tensor is merged; integer/bool tensors (step counters, index buffers) are carried from the base.
There is no model to run, so no feature function and no calibration data. A task may be a LoRA adapter folder whose
module names are the file's keys (engine.adapters).
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.uris import Fetched
from engine.adapters import is_adapter, read_adapter
from engine.families.base import Family, LoadedBase, Tensors
from engine.tensors import check_compatible, check_finite, check_same_tower, load_state_dict, save_safetensors

MODEL_FILE = "model.safetensors"


class StateDictFamily(Family):

    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        field = "base.uri"
        state = _read(base.path, field)
        check_finite(state, field=field)
        tower = {k: v.to(torch.float32) for k, v in state.items() if v.is_floating_point()}
        if not tower:
            raise InvalidInput(f"{field}: the checkpoint has no floating-point tensors to merge", param=field)
        carried = {k: v for k, v in state.items() if not v.is_floating_point()}
        return LoadedBase(tower=tower, carried=carried, info={"dtypes": {k: str(v.dtype) for k, v in state.items()}})

    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        if is_adapter(checkpoint.path):  # a LoRA adapter whose module names are the file's keys
            shapes = {k: v.shape for k, v in base.tower.items()}
            adapter = read_adapter(checkpoint.path, shapes, lambda name: name if name in shapes else None, field=field)
            return adapter.task_tower(base.tower)
        return self._tower_of(_read(checkpoint.path, field), base, field=field, what="checkpoint")

    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        field = f"version {Path(folder).name}"
        return self._tower_of(
            load_state_dict(Path(folder) / MODEL_FILE, field=field), base, field=field, what="version"
        )

    def _tower_of(self, state: Tensors, base: LoadedBase, *, field: str, what: str) -> Tensors:
        expected = {k: v.shape for k, v in (base.tower | base.carried).items()}
        check_compatible(expected, state, field=field, what=what)
        for key in base.tower:
            if not state[key].is_floating_point():
                raise IncompatibleCheckpoint(
                    f"{field}: {what} key {key!r} is {state[key].dtype}, the base's is floating point", param=field
                )
        tower = {k: state[k] for k in base.tower}
        check_finite(tower, field=field)
        return {k: v.to(torch.float32) for k, v in tower.items()}

    def save_version(self, base: LoadedBase, tower: Tensors, folder: Path) -> list[Path]:
        """One `model.safetensors`: the merged tensors in float32 and the carried ones unchanged."""
        check_same_tower(base.tower, tower)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in tower.items()}
        state.update(base.carried)
        return [save_safetensors(state, Path(folder) / MODEL_FILE, metadata={"format": "pt", "family": self.name})]


def _read(path: Path, field: str) -> Tensors:
    if Path(path).is_dir():
        raise InvalidInput(f"{field}: a state_dict checkpoint is one file, not a folder", param=field)
    return load_state_dict(path, field=field)
