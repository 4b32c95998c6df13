"""A set of model inputs (calibration or eval data) as equal-length tensors, with optional labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Inputs:
    """`tensors` are the model's inputs by name, all with the same first dimension N:
    open_clip: {"pixels": float32 [N,3,H,W]}; hf: {"input_ids": int64 [N,L], "attention_mask": int64 [N,L]}.
    `labels` is int64 [N] for eval sets, None for calibration sets."""

    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def take(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def to(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.tensors.items()}
