"""What every model family provides to the engine. A family is one kind of model: how to load it, which tensors
are merged (its "tower"), how to compute features from a set of tower weights, and how to save a version."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.uris import Fetched
from engine.inputs import Inputs

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

    tower: Tensors
    carried: Tensors = field(default_factory=dict)
    module: torch.nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)


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

    @abstractmethod
    def save_version(self, base: LoadedBase, tower: Tensors, folder: Path) -> list[Path]:
        """Write a version into `folder` in the family's own format (loadable with OpenCLIP / transformers as
        usual), carrying every non-tower tensor from the base. Returns the files written."""

    def load_inputs(self, data: Fetched, base: LoadedBase, *, labelled: bool, field: str) -> Inputs:
        """Calibration (`labelled=False`) or eval (`labelled=True`) data in the contract's formats."""
        raise NotImplementedError(f"the {self.name} family has no feature function")

    def features(self, base: LoadedBase, tower: Tensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised features [B, D] of `batch` under the tower weights `tower` (differentiable in them)."""
        raise NotImplementedError(f"the {self.name} family has no feature function")

    def linear_weight_keys(self, base: LoadedBase) -> set[str]:
        """Tower keys that are 2-D weights of linear maps (OPCM projects these)."""
        return {k for k, v in base.tower.items() if v.ndim == 2 and k.endswith("weight") and "embed" not in k}
