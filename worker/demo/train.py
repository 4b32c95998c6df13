"""Training for the demo and the benchmark suite: a tiny OpenCLIP ViT base, pretrained briefly on a generic
proxy (rotation prediction over digits, strokes and shapes), and per-task fine-tunes of its image tower plus a
linear head. Everything goes through the open_clip family, so the files are exactly what users merge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine.families.base import Family, LoadedBase, Tensors

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 64, "layers": 4, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
# Heads are trained on logits = scale · W f(x); the saved head holds scale · W, the same classifier.
HEAD_SCALE = 10.0


@dataclass
class FineTuned:
    tower: Tensors
    head: Tensors  # weight [C, D], bias [C]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def pretrain(family: Family, loaded: LoadedBase, pixels: torch.Tensor, *, steps: int, seed: int,
             lr: float = 2e-3, batch_size: int = 128) -> Tensors:
    """Rotation prediction (0/90/180/270°): generic features without any task's labels."""
    g = torch.Generator().manual_seed(seed)
    tower = {k: v.clone().requires_grad_(True) for k, v in loaded.tower.items()}
    dim = family.features(loaded, tower, {"pixels": pixels[:2]}).shape[1]
    head = torch.nn.Linear(dim, 4)
    opt = torch.optim.AdamW([*tower.values(), *head.parameters()], lr=lr, weight_decay=0.01)
    for index in _batches(len(pixels), batch_size, steps, g):
        quarter = torch.randint(0, 4, (batch_size,), generator=g)
        x = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(pixels[index], quarter, strict=True)])
        loss = F.cross_entropy(HEAD_SCALE * head(family.features(loaded, tower, {"pixels": x})), quarter)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in tower.items()}


def finetune(family: Family, loaded: LoadedBase, pixels: torch.Tensor, labels: torch.Tensor, classes: int, *,
             steps: int, seed: int, lr: float = 1e-3, head_lr: float = 1e-2, batch_size: int = 64) -> FineTuned:
    """Fine-tune the image tower and a linear head on one task (cross-entropy)."""
    g = torch.Generator().manual_seed(seed)
    tower = {k: v.clone().requires_grad_(True) for k, v in loaded.tower.items()}
    dim = family.features(loaded, tower, {"pixels": pixels[:2]}).shape[1]
    torch.manual_seed(seed)
    head = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam([{"params": list(tower.values()), "lr": lr}, {"params": head.parameters(), "lr": head_lr}])
    for index in _batches(len(pixels), batch_size, steps, g):
        loss = F.cross_entropy(HEAD_SCALE * head(family.features(loaded, tower, {"pixels": pixels[index]})),
                               labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return FineTuned(
        {k: v.detach() for k, v in tower.items()},
        {"weight": HEAD_SCALE * head.weight.detach().clone(), "bias": HEAD_SCALE * head.bias.detach().clone()},
    )


def as_uint8_npz(x: np.ndarray, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"x": x.astype(np.uint8)} if y is None else {"x": x.astype(np.uint8), "y": y.astype(np.int64)}
