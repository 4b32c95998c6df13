"""Continual TIES merging: trim each task vector to its largest magnitudes, elect a sign per entry, and add the
entries that agree with it.

The trim threshold is global over the whole flattened vector (every tower tensor together). It is found by an exact
radix select over the float32 bit patterns of the magnitudes, two passes over the tensors (65536 then 32768
buckets), both vectors (head and task) in the same passes, so no concatenation of the ~1e8 entries is ever built (a
`kthvalue` over a concatenation would need two extra full copies of the vector); the only temporaries are one
tensor's worth at a time, and a streamed merge reads its inputs three times in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from core.methods import TiesParams
from engine.methods.base import ElementwiseMethod, MethodState, Prepared, StepInput
from engine.methods.common import to_cpu, to_device
from engine.tensorfiles import shape_of

# The magnitude of a float32 is its bit pattern without the sign bit, and for non-negative floats the order of the
# bit patterns (as integers) is the order of the values: selecting on the integers selects on the magnitudes.
_MAGNITUDE_BITS = 0x7FFFFFFF
# 31 bits in two digits, the top 16 then the low 15: two passes over the vectors (each a bincount per piece).
_DIGITS = ((15, 16), (0, 15))  # (shift, width)


def kept_count(numel: int, top_k: float) -> int:
    """How many entries of a numel-long vector "the top k percent" keeps: ⌊numel·k/100⌋, at least one. The tiny
    epsilon stops 20% of 100 from flooring to 19 through float rounding."""
    return min(numel, max(1, math.floor(numel * top_k / 100.0 + 1e-9)))


def kth_largest_magnitudes(parts: Callable[[], Iterator[Sequence[torch.Tensor]]], k: int) -> list[float]:
    """For several vectors at once, the k-th largest |v_i| of each. `parts()` yields one tuple of pieces per step
    (the j-th piece of every vector; float32, any shape, any device) and is called once per pass, so the pieces may
    be read or computed on the fly: every vector is selected in the same two passes. Exact: entries with
    |v_i| ≥ the result are the top k, plus any ties with the k-th."""
    prefixes: list[int] | None = None  # per vector, the digits of its answer found so far
    remaining: list[int] = []  # per vector, the rank of its answer among the entries that share its prefix
    for shift, width in _DIGITS:
        counts: list[torch.Tensor] | None = None  # per vector [2^width] entries per next digit, among the prefix's
        for pieces in parts():
            if prefixes is None:
                prefixes, remaining = [0] * len(pieces), [k] * len(pieces)
            found = []
            for piece, prefix in zip(pieces, prefixes, strict=True):
                bits = piece.contiguous().view(torch.int32).flatten() & _MAGNITUDE_BITS
                if shift + width < 31:
                    bits = bits[(bits >> (shift + width)) == prefix]
                found.append(torch.bincount((bits >> shift) & ((1 << width) - 1), minlength=1 << width))
            counts = found if counts is None else [c + f for c, f in zip(counts, found, strict=True)]
        if counts is None or prefixes is None:
            raise ValueError("an empty vector has no magnitudes to select from")
        for j, c in enumerate(counts):
            c = c.cpu()
            at_or_above = c.flip(0).cumsum(0)  # at_or_above[i]: entries whose digit is ≥ top − i
            i = int(torch.searchsorted(at_or_above, remaining[j]).item())  # first bucket from the top reaching rank
            digit = (1 << width) - 1 - i
            remaining[j] -= int(at_or_above[i].item()) - int(c[digit].item())  # minus the entries above the bucket
            prefixes[j] = (prefixes[j] << width) | digit
    assert prefixes is not None
    return [torch.tensor([p], dtype=torch.int32).view(torch.float32).item() for p in prefixes]


def kth_largest_magnitude(parts: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """The k-th largest |v_i| of the vector whose pieces `parts()` yields (see `kth_largest_magnitudes`)."""
    return kth_largest_magnitudes(lambda: ((p,) for p in parts()), k)[0]


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


class Ties(ElementwiseMethod):
    """δ = τ_t at the first step, else TIES([θ − θ0, τ_t]) with the top `top_k`% of each vector kept;
    θ ← θ + λ·δ with λ = `scaling_factor`."""

    def head_reads(self, index: int) -> int:
        return 0 if index == 0 else len(_DIGITS) + 1  # the threshold passes, then the merge

    def prepare(self, inp: StepInput) -> Prepared:
        params: TiesParams = inp.params
        dev = inp.device
        lam = params.scaling_factor
        state = MethodState(meta={"method": self.name})
        metrics: dict = {"scaling_factor": lam}
        if inp.index == 0:
            def first(k: str) -> torch.Tensor:
                w0 = to_device(inp.base[k], dev)
                return to_cpu((to_device(inp.task[k], dev) - w0).mul_(lam).add_(w0))

            return Prepared(first, state, metrics)

        def both_vectors(k: str) -> tuple[torch.Tensor, torch.Tensor]:  # θ − θ0 and τ_t, θ0 read once
            w0 = to_device(inp.base[k], dev)
            return to_device(inp.merged[k], dev) - w0, to_device(inp.task[k], dev) - w0

        keys = list(inp.base)
        numel = sum(math.prod(shape_of(inp.base, k)) for k in keys)
        k_keep = kept_count(numel, params.top_k)
        head_thr, tau_thr = kth_largest_magnitudes(lambda: (both_vectors(k) for k in keys), k_keep)

        def merge(k: str) -> torch.Tensor:
            w0, head = to_device(inp.base[k], dev), to_device(inp.merged[k], dev)
            delta = ties_merge_tensor(head - w0, to_device(inp.task[k], dev) - w0, head_thr, tau_thr)
            return to_cpu(delta.mul_(lam).add_(head))

        metrics.update({"kept_per_vector": k_keep, "head_threshold": head_thr, "task_threshold": tau_thr})
        return Prepared(merge, state, metrics)
