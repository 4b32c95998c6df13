"""Continual TIES merging: trim each task vector to its largest magnitudes, elect a sign per entry, and add the
entries that agree with it.

The trim threshold is global over the whole flattened vector (every tower tensor together). It is found by an exact
radix select over the float32 bit patterns of the magnitudes, four passes over the tensors with 256 buckets each,
so no concatenation of the ~1e8 entries is ever built (a `kthvalue` over a concatenation would need two extra full
copies of the vector); the only temporaries are one tensor's worth at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from core.methods import TiesParams
from engine.families.base import Tensors
from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.methods.common import to_cpu, to_device

# The magnitude of a float32 is its bit pattern without the sign bit, and for non-negative floats the order of the
# bit patterns (as integers) is the order of the values: selecting on the integers selects on the magnitudes.
_MAGNITUDE_BITS = 0x7FFFFFFF
_DIGIT_SHIFTS = (24, 16, 8, 0)  # 31 bits in four 8-bit digits (the top digit has 7)


def kept_count(numel: int, top_k: float) -> int:
    """How many entries of a numel-long vector "the top k percent" keeps: ⌊numel·k/100⌋, at least one. The tiny
    epsilon stops 20% of 100 from flooring to 19 through float rounding."""
    return min(numel, max(1, math.floor(numel * top_k / 100.0 + 1e-9)))


def kth_largest_magnitude(parts: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """The k-th largest |v_i| of the vector whose pieces `parts()` yields (float32, any shape, any device; called
    once per pass, so the pieces may be computed on the fly). Exact: entries with |v_i| ≥ the result are the top k,
    plus any ties with the k-th."""
    prefix = 0  # the digits of the answer found so far
    remaining = k  # rank of the answer among the entries that share `prefix`
    for shift in _DIGIT_SHIFTS:
        counts: torch.Tensor | None = None  # [256] entries per next digit, among those matching `prefix`
        for part in parts():
            bits = part.contiguous().view(torch.int32).flatten() & _MAGNITUDE_BITS
            if shift != _DIGIT_SHIFTS[0]:
                bits = bits[(bits >> (shift + 8)) == prefix]
            c = torch.bincount((bits >> shift) & 0xFF, minlength=256)
            counts = c if counts is None else counts + c
        if counts is None:
            raise ValueError("an empty vector has no magnitudes to select from")
        counts_cpu = counts.cpu()
        at_or_above = counts_cpu.flip(0).cumsum(0)  # at_or_above[i]: entries whose digit is ≥ 255 − i
        i = int(torch.searchsorted(at_or_above, remaining).item())  # first bucket (from the top) reaching rank k
        digit = 255 - i
        remaining -= int(at_or_above[i].item()) - int(counts_cpu[digit].item())  # minus the entries above the bucket
        prefix = (prefix << 8) | digit
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32).item()


def _trim(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """v with every entry below the threshold in magnitude zeroed (the threshold is a float32 value, so the
    comparison is exact in v's dtype)."""
    return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))


def ties_merge_tensor(
    head: torch.Tensor, tau: torch.Tensor, head_threshold: float, tau_threshold: float
) -> torch.Tensor:
    """δ for one tensor: trim both vectors, elect the sign of their sum, sum the entries that agree with it.
    An entry whose trimmed sum is exactly zero elects no sign and contributes nothing."""
    a = _trim(head, head_threshold)
    b = _trim(tau, tau_threshold)
    sign = torch.sign(a + b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(torch.sign(a) == sign, a, zero) + torch.where(torch.sign(b) == sign, b, zero)


class Ties(Method):
    """δ = τ_t at the first step, else TIES([θ − θ0, τ_t]) with the top `top_k`% of each vector kept;
    θ ← θ + λ·δ with λ = `scaling_factor`."""


    def step(self, inp: StepInput) -> StepOutput:
        params: TiesParams = inp.params
        dev = inp.device
        lam = params.scaling_factor
        keys = list(inp.base)

        def head_vector(k: str) -> torch.Tensor:  # θ − θ0 for one tensor
            return to_device(inp.merged[k], dev) - to_device(inp.base[k], dev)

        def task_vector(k: str) -> torch.Tensor:  # τ_t for one tensor
            return to_device(inp.task[k], dev) - to_device(inp.base[k], dev)

        merged: Tensors = {}
        metrics: dict = {"scaling_factor": lam}
        if inp.index == 0:
            for k in keys:
                merged[k] = to_cpu(task_vector(k).mul_(lam).add_(to_device(inp.base[k], dev)))
        else:
            numel = sum(inp.base[k].numel() for k in keys)
            k_keep = kept_count(numel, params.top_k)
            head_thr = kth_largest_magnitude(lambda: (head_vector(k) for k in keys), k_keep)
            tau_thr = kth_largest_magnitude(lambda: (task_vector(k) for k in keys), k_keep)
            for k in keys:
                delta = ties_merge_tensor(head_vector(k), task_vector(k), head_thr, tau_thr)
                merged[k] = to_cpu(delta.mul_(lam).add_(to_device(inp.merged[k], dev)))
            metrics.update({"kept_per_vector": k_keep, "head_threshold": head_thr, "task_threshold": tau_thr})
        inp.progress(1, 1, None)
        return StepOutput(merged=merged, state=MethodState(meta={"method": self.name}), metrics=metrics)
