"""Training for the demo and the benchmark suite: a tiny OpenCLIP ViT base, pretrained briefly on a generic
proxy (rotation prediction over digits, strokes and shapes), and per-task fine-tunes of its image tower plus a
linear head. Everything goes through the open_clip family, so the files are exactly what users merge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.families.base import Family, LoadedBase, Tensors

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 64, "layers": 4, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
# on_step(step, loss) after every optimisation step, step counting from 1: how the demo draws its bars.
OnStep = Callable[[int, float], None]
# Heads are trained on logits = scale · W f(x); the saved head holds scale · W, the same classifier.
HEAD_SCALE = 10.0


@dataclass
class FineTuned:
    tower: Tensors
    head: Tensors  # weight [C, D], bias [C]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _transformed(images: torch.Tensor, labels: torch.Tensor, inverted_offset: torch.Tensor) -> torch.Tensor:
    """Transform `labels[i]` of image i, out of 16: quarter turn (label % 4), mirror (bit 2), inversion (bit 3)."""
    out = []
    for img, label in zip(images, labels.tolist(), strict=True):
        img = torch.rot90(img, label % 4, dims=(1, 2))
        if label // 4 % 2:
            img = torch.flip(img, dims=(2,))
        if label // 8:
            img = inverted_offset - img  # 1 − p in pixel space, after the model's mean/std
        out.append(img)
    return torch.stack(out)


# Proxy objectives: how many of the 16 transforms are predicted, and whether the images' own labels are too.
PROXIES = {"rotation": (4, False), "transforms": (16, False), "glyphs": (16, True)}


def pretrain(family: Family, loaded: LoadedBase, pixels: torch.Tensor, *, steps: int, seed: int,
             labels: torch.Tensor | None = None, proxy: str = "rotation", lr: float = 2e-3,
             batch_size: int = 128, on_step: OnStep | None = None) -> Tensors:
    """Transform prediction, plus the images' classes for the `glyphs` corpus: generic features without any task's
    labels."""
    transforms, supervised = PROXIES[proxy]
    if supervised and labels is None:
        raise ValueError(f"the {proxy} proxy needs labelled images")
    g = torch.Generator().manual_seed(seed)
    tower = {k: v.clone().requires_grad_(True) for k, v in loaded.tower.items()}
    dim = family.features(loaded, tower, {"pixels": pixels[:2]}).shape[1]
    mean, std = (torch.tensor(loaded.info[k]).view(3, 1, 1) for k in ("mean", "std"))
    inverted_offset = (1 - 2 * mean) / std
    transform_head = torch.nn.Linear(dim, transforms)
    class_head = torch.nn.Linear(dim, int(labels.max()) + 1) if supervised else None
    heads = [h for h in (transform_head, class_head) if h is not None]
    opt = torch.optim.AdamW([*tower.values(), *(p for h in heads for p in h.parameters())], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for step, index in enumerate(_batches(len(pixels), batch_size, steps, g), 1):
        target = torch.randint(0, transforms, (batch_size,), generator=g)
        features = family.features(loaded, tower, {"pixels": _transformed(pixels[index], target, inverted_offset)})
        loss = F.cross_entropy(HEAD_SCALE * transform_head(features), target)
        if class_head is not None:
            loss = loss + F.cross_entropy(HEAD_SCALE * class_head(features), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    return {k: v.detach() for k, v in tower.items()}


def finetune(family: Family, loaded: LoadedBase, pixels: torch.Tensor, labels: torch.Tensor, classes: int, *,
             steps: int, seed: int, lr: float = 1e-3, head_lr: float = 1e-2, batch_size: int = 64,
             on_step: OnStep | None = None) -> FineTuned:
    """Fine-tune the image tower and a linear head on one task (cross-entropy)."""
    g = torch.Generator().manual_seed(seed)
    tower = {k: v.clone().requires_grad_(True) for k, v in loaded.tower.items()}
    dim = family.features(loaded, tower, {"pixels": pixels[:2]}).shape[1]
    torch.manual_seed(seed)
    head = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam([{"params": list(tower.values()), "lr": lr}, {"params": head.parameters(), "lr": head_lr}])
    for step, index in enumerate(_batches(len(pixels), batch_size, steps, g), 1):
        loss = F.cross_entropy(HEAD_SCALE * head(family.features(loaded, tower, {"pixels": pixels[index]})),
                               labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, loss.item())
    return FineTuned(
        {k: v.detach() for k, v in tower.items()},
        {"weight": HEAD_SCALE * head.weight.detach().clone(), "bias": HEAD_SCALE * head.bias.detach().clone()},
    )


def as_uint8_npz(x: np.ndarray, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"x": x.astype(np.uint8)} if y is None else {"x": x.astype(np.uint8), "y": y.astype(np.int64)}
