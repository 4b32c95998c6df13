"""The `state_dict` family: bare tensors in one file (or a folder holding `model.safetensors` or safetensors shards
with their `model.safetensors.index.json`), for data-free methods on any architecture.

Every floating tensor is merged; integer/bool tensors (step counters, index buffers) are carried from the base.
There is no model to run, so no feature function and no calibration data. A task may be a LoRA adapter folder whose
module names are the file's keys (engine.adapters).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.uris import Fetched
from engine.adapters import by_name_only, is_adapter, read_adapter
from engine.families.base import Family, LoadedBase, VersionPlan
from engine.tensorfiles import dtype_of, float_dtype, rekey, shape_of
from engine.tensors import as_tower, check_compatible, open_state_dict

Tensors = Mapping[str, torch.Tensor]


class StateDictFamily(Family):

    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        field = "base.uri"
        state = _read(base.path, field)
        floating = {k: k for k in state if dtype_of(state, k).is_floating_point}
        if not floating:
            raise InvalidInput(f"{field}: the checkpoint has no floating-point tensors to merge", param=field)
        carried = rekey(state, {k: k for k in state if k not in floating})
        return LoadedBase(tower=as_tower(rekey(state, floating), field=field), carried=carried,
                          info={"dtypes": {k: str(dtype_of(state, k)) for k in state}}, dtype=float_dtype(state))

    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        if is_adapter(checkpoint.path):  # a LoRA adapter whose module names are the file's keys
            shapes = {k: shape_of(base.tower, k) for k in base.tower}
            own_key = by_name_only(lambda name: name if name in shapes else None)
            adapter = read_adapter(checkpoint.path, shapes, own_key, field=field)
            return adapter.task_tower(base.tower)
        return self._tower_of(_read(checkpoint.path, field), base, field=field, what="checkpoint")

    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        field = f"version {Path(folder).name}"
        return self._tower_of(open_state_dict(Path(folder), field=field), base, field=field, what="version")

    def _tower_of(self, state: Tensors, base: LoadedBase, *, field: str, what: str) -> Tensors:
        expected = {k: shape_of(base.tower, k) for k in base.tower}
        expected.update({k: shape_of(base.carried, k) for k in base.carried})
        check_compatible(expected, state, field=field, what=what)
        for key in base.tower:
            if not dtype_of(state, key).is_floating_point:
                raise IncompatibleCheckpoint(
                    f"{field}: {what} key {key!r} is {dtype_of(state, key)}, the base's is floating point", param=field
                )
        return as_tower(rekey(state, {k: k for k in base.tower}), field=field)

    def version_plan(self, base: LoadedBase) -> VersionPlan:
        """`model.safetensors` (or its shards): the merged tensors and the carried ones unchanged."""
        return VersionPlan({k: k for k in base.tower}, base.carried, {"format": "pt", "family": self.name})


def _read(path: Path, field: str) -> Tensors:
    return open_state_dict(path, field=field)
