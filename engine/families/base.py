"""What every model family provides to the engine. A family is one kind of model: how to load it, which tensors
are merged (its "tower"), how to compute features from a set of tower weights, and how to save a version."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.methods import DEFAULT_MAX_SHARD_BYTES, CommonParams
from core.uris import Fetched
from engine.inputs import Inputs
from engine.streaming import WriterSink
from engine.tensorfiles import PlannedTensor, ShardedWriter, dtype_of, shape_of
from engine.tensors import check_same_tower

Tensors = dict[str, torch.Tensor]


@dataclass
class LoadedBase:
    """A base model θ0 as loaded by its family.

    tower: the merged parameters θ0, float32 on the CPU, keyed by the family's tower names.
    carried: every other tensor of the checkpoint, carried unchanged into each version.
    module: the torch module that `features` runs (None for families without features). It may sit on the `meta`
        device (layout only) until `features` first needs it: the hf family builds the real one then.
    info: what the family needs to save and reload (arch config, image size, mean/std, tokenizer dir, ...).
    """

    tower: Mapping[str, torch.Tensor]
    carried: Mapping[str, torch.Tensor] = field(default_factory=dict)
    module: torch.nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # the base file's floating dtype: a version's by default


@dataclass(frozen=True)
class VersionFormat:
    """How a version's weights are stored: the tower's dtype (None: the base's) and the shard size."""

    dtype: torch.dtype | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    @classmethod
    def of(cls, params: CommonParams) -> VersionFormat:
        dtype = getattr(torch, params.out_dtype) if params.out_dtype else None
        return cls(dtype, params.max_shard_size)


@dataclass
class VersionPlan:
    """A family's version layout: `names` maps tower names to names in the files, `carried` tensors are written
    unchanged, `extra(folder, dtype)` writes the family's other files (config, ...) and returns them."""

    names: dict[str, str]
    carried: Mapping[str, torch.Tensor]
    metadata: dict[str, str]
    extra: Callable[[Path, torch.dtype], list[Path]] = lambda folder, dtype: []


class Family(ABC):
    """A kind of model. Its name and abilities are its registry entry's (core.families)."""

    def __init__(self, name: str, *, has_features: bool):
        self.name, self.has_features = name, has_features

    @abstractmethod
    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        """Load θ0. Raises InvalidInput for unreadable or non-finite weights."""

    @abstractmethod
    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        """A task checkpoint's tower weights, keyed like `base.tower`. Raises IncompatibleCheckpoint naming the
        first missing, unexpected or differently shaped key."""

    @abstractmethod
    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        """The tower weights of a version this family saved into `folder`."""

    def version_plan(self, base: LoadedBase) -> VersionPlan:
        """The family's layout of a version (see `open_version`)."""
        raise NotImplementedError(f"the {self.name} family does not write versions")

    def open_version(self, base: LoadedBase, folder: Path, fmt: VersionFormat,
                     pieces: Mapping[str, tuple[str, int, int]] | None = None) -> WriterSink:
        """A sink that writes a version into `folder` tensor by tensor (or by the row blocks `pieces` names), in
        the family's own format (loadable with OpenCLIP / transformers as usual): the tower in `fmt.dtype`, every
        carried tensor unchanged, sharded above `fmt.max_shard_bytes`. The carried tensors are written now, the
        family's other files when the sink is done; its `files` are then every file written."""
        plan = self.version_plan(base)
        dtype = fmt.dtype or base.dtype
        planned = [PlannedTensor(plan.names[k], dtype, shape_of(base.tower, k)) for k in base.tower]
        planned += [PlannedTensor(k, dtype_of(plan.carried, k), shape_of(plan.carried, k)) for k in plan.carried]
        writer = ShardedWriter(folder, planned, max_shard_bytes=fmt.max_shard_bytes, metadata=plan.metadata)
        for key in plan.carried:
            writer.write(key, plan.carried[key])
        whole = {k: (k, 0, shape_of(base.tower, k)[0] if shape_of(base.tower, k) else 0) for k in base.tower}
        return WriterSink(writer, plan.names, pieces or whole, on_close=lambda: plan.extra(Path(folder), dtype))

    def save_version(self, base: LoadedBase, tower: Mapping[str, torch.Tensor], folder: Path,
                     fmt: VersionFormat | None = None) -> list[Path]:
        """Write a version holding `tower` into `folder` (see `open_version`). Returns the files written."""
        check_same_tower(base.tower, tower)
        sink = self.open_version(base, folder, fmt or VersionFormat())
        for key in base.tower:
            sink[key] = tower[key]
        sink.done()
        return sink.files

    def load_inputs(self, data: Fetched, base: LoadedBase, *, labelled: bool, field: str) -> Inputs:
        """Calibration (`labelled=False`) or eval (`labelled=True`) data in the contract's formats."""
        raise NotImplementedError(f"the {self.name} family has no feature function")

    def features(self, base: LoadedBase, tower: Tensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised features [B, D] of `batch` under the tower weights `tower` (differentiable in them)."""
        raise NotImplementedError(f"the {self.name} family has no feature function")

    def linear_weight_keys(self, base: LoadedBase) -> set[str]:
        """Tower keys that are 2-D weights of linear maps (OPCM projects these)."""
        return {k for k in base.tower
                if len(shape_of(base.tower, k)) == 2 and k.endswith("weight") and "embed" not in k}
