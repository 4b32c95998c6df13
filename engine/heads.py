"""Head tuning, the paper's optional last part of a step: a task's linear head re-fitted, by cross-entropy, on the
frozen merged tower's features of the task's labelled head-tuning data. The tower is frozen, so its features are
computed once and the fit is a small logistic regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import InvalidInput
from engine.families.base import Family, LoadedBase, Tensors
from engine.inputs import Inputs
from engine.tensors import check_finite


def check_head(head: Tensors, *, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight [C, D] and optional bias [C], or a typed error naming `field`."""
    weight = head.get("weight")
    if weight is None or weight.ndim != 2:
        raise InvalidInput(f"{field}: a head needs a 2-D `weight` tensor [classes, embed_dim]", param=field)
    bias = head.get("bias")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InvalidInput(f"{field}: `bias` must have shape [{weight.shape[0]}]", param=field)
    check_finite({"weight": weight} | ({"bias": bias} if bias is not None else {}), field=field)
    return weight, bias


def check_labels(data: Inputs, classes: int, *, field: str) -> None:
    """Labels a head of `classes` outputs can predict; others would count as silent misses."""
    if data.labels is not None and len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= classes):
        raise InvalidInput(f"{field}: labels must lie in [0, {classes - 1}], the head's classes", param=field)


def check_eval_data(data: Inputs, head: Tensors, *, field: str, head_field: str) -> None:
    """Refuse an eval set and head that cannot measure anything, before any merging starts."""
    weight, _ = check_head(head, field=head_field)
    check_labels(data, weight.shape[0], field=field)


def check_width(features: torch.Tensor, weight: torch.Tensor, *, field: str) -> None:
    if features.shape[1] != weight.shape[1]:
        raise InvalidInput(f"{field}: head expects {weight.shape[1]} features, the model gives {features.shape[1]}",
                           param=field)


@torch.no_grad()
def features_of(family: Family, loaded: LoadedBase, tower: Tensors, data: Inputs, *, device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """The family's features of every input, float32 [N, D] on `device`; `tower` must already be on `device`."""
    batches = (data.take(slice(start, start + batch_size)) for start in range(0, len(data), batch_size))
    return torch.cat([family.features(loaded, tower, {k: v.to(device) for k, v in batch.items()}).float()
                      for batch in batches])


def check_head_data(data: Inputs, head: Tensors, *, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refuse head-tuning data the head cannot be fitted on, before any merging starts; returns the head's
    weight and bias."""
    weight, bias = check_head(head, field=f"{field}.head")
    if data.labels is None or len(data) == 0:
        raise InvalidInput(f"{field}.head_data: needs labelled inputs (an `y` array)", param=f"{field}.head_data")
    check_labels(data, weight.shape[0], field=f"{field}.head_data")
    return weight, bias


def tune_head(family: Family, loaded: LoadedBase, tower: Tensors, data: Inputs, head: Tensors, *, steps: int,
              lr: float, seed: int, device: torch.device, field: str, batch_size: int = 256) -> Tensors:
    """`head` after `steps` Adam steps on minibatches of `data` (labelled); float32 tensors on the CPU.
    `tower` must already be on `device`."""
    weight, bias = check_head_data(data, head, field=field)
    features = features_of(family, loaded, tower, data, device=device)
    check_width(features, weight, field=f"{field}.head")
    labels = data.labels.to(device)
    params = [weight.to(device, torch.float32).clone().requires_grad_(True)]
    if bias is not None:
        params.append(bias.to(device, torch.float32).clone().requires_grad_(True))
    opt = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randint(0, len(features), (min(batch_size, len(features)),), generator=generator).to(device)
            loss = F.cross_entropy(F.linear(features[index], *params), labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned = {"weight": params[0].detach().cpu()}
    if bias is not None:
        tuned["bias"] = params[1].detach().cpu()
    return tuned
