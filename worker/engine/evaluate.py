"""Accuracy of a tower with a task's classification head on the task's eval set."""

from __future__ import annotations

import torch

from service.errors import InvalidInput
from worker.engine.families.base import Family, LoadedBase, Tensors
from worker.engine.heads import check_head
from worker.engine.inputs import Inputs


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
    weight = weight.to(device, torch.float32)
    bias = None if bias is None else bias.to(device, torch.float32)
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in data.take(slice(start, start + batch_size)).items()}
        features = family.features(loaded, tower, batch).float()
        if features.shape[1] != weight.shape[1]:
            raise InvalidInput(
                f"{field}: head expects {weight.shape[1]} features, the model gives {features.shape[1]}", param=field
            )
        logits = torch.nn.functional.linear(features, weight, bias)
        correct += (logits.argmax(dim=1).cpu() == data.labels[start : start + batch_size]).sum().item()
    return correct / max(len(data), 1)
