"""Continual weight averaging: the head is the running mean of every task checkpoint merged so far."""

from __future__ import annotations

import torch

from engine.methods.base import ElementwiseMethod, MethodState, Prepared, StepInput
from engine.methods.common import to_cpu, to_device


class WeightAverage(ElementwiseMethod):
    """θ ← θ_1 at the first step; after t merged tasks, θ ← (t·θ + θ_{t+1}) / (t + 1)."""

    def prepare(self, inp: StepInput) -> Prepared:
        t = inp.index
        weight = 1.0 / (t + 1)

        def merge(k: str) -> torch.Tensor:
            if t == 0:
                # The first version is the checkpoint itself (its tensors shared, not copied: never written in place).
                return to_cpu(inp.task[k])
            # (t·θ + θ_t)/(t+1) = θ + (θ_t − θ)/(t+1): one fused op and one new tensor per key.
            return to_cpu(torch.lerp(to_device(inp.merged[k], inp.device), to_device(inp.task[k], inp.device), weight))

        return Prepared(merge, MethodState(meta={"method": self.name}), {"weight": weight})
