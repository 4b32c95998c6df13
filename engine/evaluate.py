"""Accuracy of a tower with a task's classification head on the task's eval set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.families.base import Family, LoadedBase, Tensors
from engine.heads import check_head, check_width, features_of
from engine.inputs import Inputs


@torch.no_grad()
def accuracy(
    family: Family,
    loaded: LoadedBase,
    tower: Tensors,
    data: Inputs,
    head: Tensors,
    *,
    device: torch.device,
    batch_size: int = 256,
    field: str = "head",
) -> float:
    """Top-1 accuracy of `head` (weight [C, D], optional bias [C]) on the family's features of `data`.
    `tower` must already be on `device`."""
    weight, bias = check_head(head, field=field)
    if len(data) == 0:
        return 0.0
    features = features_of(family, loaded, tower, data, device=device, batch_size=batch_size)
    check_width(features, weight, field=field)
    bias = None if bias is None else bias.to(device, torch.float32)
    logits = F.linear(features, weight.to(device, torch.float32), bias)
    return (logits.argmax(dim=1).cpu() == data.labels).sum().item() / len(data)
