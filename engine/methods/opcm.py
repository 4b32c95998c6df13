"""OPCM: continual merging by orthogonal projection. Each new task vector is added to every linear weight with its
components along the merged task vector's dominant singular directions removed, and the merged task vector is
rescaled so its norm stays the mean of the task-vector norms seen so far.

State (MethodState.meta): {"method": "opcm", "norms": [‖τ_1‖, ..., ‖τ_t‖], "lambda_prev": float}; no tensors.
"""

from __future__ import annotations

import torch

from core.methods import OPCMParams
from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.methods.common import delta_norm, own_state, to_cpu, to_device
from engine.tensorfiles import shape_of


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """r: the first index where cumsum(S)/ΣS exceeds α (S in descending order)."""
    share = singular_values.cumsum(0) / singular_values.sum()
    return int((share > alpha).to(torch.int8).argmax().item())


def project_out(previous: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """U Z Vᵀ with U, S, Vᵀ = svd(P) (full matrices), Z = Uᵀ D V with its diagonal and Z[:r, :r] zeroed.

    previous: P = W − W0 [m, n]; new: D = W_t − W0 [m, n].
    Every zeroed entry of Z lies in the first k = min(m, n) rows and columns, so with the thin SVD
    (U1 [m, k], V1 [n, k]) the same result is D − U1 R V1ᵀ, R [k, k] the zeroed part of U1ᵀ D V1: it never builds
    the m×m or n×n bases that the full SVD would (a 50k-row matrix would need a 10 GB U).
    May return `new` itself; otherwise a fresh tensor."""
    if not bool(previous.any()):
        return new  # no merged subspace yet (the tensor was never changed): nothing to protect
    u, s, vh = torch.linalg.svd(previous, full_matrices=False)  # u [m, k], s [k], vh [k, n]
    r = split_rank(s, alpha)
    z = u.T @ new @ vh.T  # [k, k]
    removed = torch.diag_embed(torch.diagonal(z))  # the diagonal ...
    removed[:r, :r] = z[:r, :r]  # ... and the top-left r×r block (whose diagonal is the same values)
    return new - u @ removed @ vh


class OPCM(Method):

    def step(self, inp: StepInput) -> StepOutput:
        params: OPCMParams = inp.params
        dev = inp.device
        state = own_state(inp.state, self.name)
        metrics: dict = {}

        if inp.index == 0:
            # θ ← θ_1; the checkpoint's tensors are shared, not copied (nothing writes them in place). A streamed
            # head between steps is θ_1's own files, read again (`sinks.recompute`), rather than a copy.
            first = None if inp.sinks.recompute is not None else inp.sinks.output()
            sq_norm = 0.0
            for k in inp.base:
                task = to_cpu(inp.task[k])
                sq_norm += torch.linalg.vector_norm(to_device(task, dev) - to_device(inp.base[k], dev),
                                                    dtype=torch.float64).item() ** 2
                if first is not None:
                    first[k] = task
            norms = [sq_norm**0.5]
            merged = first.done() if first is not None else inp.sinks.recompute(lambda k: to_cpu(inp.task[k]))
            inp.progress(1, 1, None)
            return StepOutput(merged, self._state(norms, 1.0), {"norm": norms[0], "lambda_prev": 1.0})

        if state is not None and state.meta.get("norms"):
            norms = [float(n) for n in state.meta["norms"]]
            lambda_prev = float(state.meta.get("lambda_prev", 1.0))
        else:
            # The head was written by another method (or its state was lost). OPCM keeps ‖θ − θ0‖ equal to the mean
            # norm of the task vectors it merged, so the head's own norm, counted once per task it holds, is the
            # history that reproduces that invariant; λ_prev = 1 adds the head unscaled, as at OPCM's second step.
            norms = [delta_norm(inp.merged, inp.base, dev)] * inp.index
            lambda_prev = 1.0
            metrics["state_initialised_from_head"] = True

        norms.append(delta_norm(inp.task, inp.base, dev))
        mean_norm = sum(norms) / len(norms)
        linear = {k for k in inp.family.linear_weight_keys(inp.loaded)
                  if k in inp.base and len(shape_of(inp.base, k)) == 2}

        # First pass: the merged task vector θ − θ0 per tensor, kept in `scratch` and turned into weights below.
        scratch = inp.sinks.scratch()
        sq_norm = 0.0
        for k in inp.base:
            w0 = to_device(inp.base[k], dev)
            previous = to_device(inp.merged[k], dev) - w0  # P = W − W0
            new = to_device(inp.task[k], dev) - w0  # D = W_t − W0
            added = project_out(previous, new, params.alpha) if k in linear else new
            tau = added.add_(previous, alpha=lambda_prev)
            sq_norm += torch.linalg.vector_norm(tau, dtype=torch.float64).item() ** 2
            scratch[k] = to_cpu(tau)
        vectors = scratch.done()

        # Second pass: θ ← θ0 + (θ − θ0)·n̄/n, so that ‖θ − θ0‖ = n̄ (in place where the vectors are in memory).
        norm = sq_norm**0.5
        scale = mean_norm / norm if norm > 0 else 1.0
        merged = inp.sinks.output()
        for k in inp.base:
            merged[k] = vectors[k].mul_(scale).add_(inp.base[k])
        lambda_prev = norm / mean_norm if mean_norm > 0 else 1.0

        inp.progress(1, 1, None)
        metrics.update({"norm": mean_norm, "norm_before_rescale": norm, "lambda_prev": lambda_prev})
        return StepOutput(merged.done(), self._state(norms, lambda_prev), metrics)

    def _state(self, norms: list[float], lambda_prev: float) -> MethodState:
        return MethodState(meta={"method": self.name, "norms": list(norms), "lambda_prev": lambda_prev})
