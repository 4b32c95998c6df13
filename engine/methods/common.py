"""Small helpers shared by the fusion methods: device round trips, global norms, seeding."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from engine.families.base import Tensors
from engine.methods.base import MethodState

CPU = torch.device("cpu")


def own_state(state: MethodState, method: str) -> MethodState | None:
    """The carried state if `method` wrote it (every method tags its meta), else None: a head written by another
    method, or the first step, starts the method fresh."""
    if state.meta.get("method") == method:
        return state
    return None


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`t` on the compute device; a no-op (no copy) for float32 on the CPU."""
    return t.to(device=device, dtype=dtype)


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A result tensor as the engine stores it: float32, contiguous, on the CPU."""
    return t.to(device=CPU, dtype=torch.float32).contiguous()


def global_norm(parts: Iterable[torch.Tensor]) -> float:
    """‖v‖₂ of one vector given as its pieces (one per tower tensor), accumulated in float64 so that the sum over
    ~1e8 squares does not lose precision."""
    total = 0.0
    for part in parts:
        total += torch.linalg.vector_norm(part, dtype=torch.float64).item() ** 2
    return total**0.5


def delta_norm(a: Tensors, b: Tensors, device: torch.device) -> float:
    """‖a − b‖₂ over every tower tensor, computed tensor by tensor on `device`."""
    return global_norm(to_device(a[k], device) - to_device(b[k], device) for k in b)


def derived_seed(seed: int, *streams: int) -> int:
    """A well-mixed 63-bit seed for one random stream of one step, so that steps of a lineage draw differently
    while the same (seed, step) always draws the same."""
    state = np.random.SeedSequence([seed, *streams]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def generator(seed: int, *streams: int) -> torch.Generator:
    """A CPU generator for one stream (indices are drawn on the CPU so the draws do not depend on the device)."""
    return torch.Generator(device=CPU).manual_seed(derived_seed(seed, *streams))
