"""Continual weight averaging: the head is the running mean of every task checkpoint merged so far."""

from __future__ import annotations

import torch

from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.methods.common import to_cpu, to_device


class WeightAverage(Method):
    elementwise = True
    """θ ← θ_1 at the first step; after t merged tasks, θ ← (t·θ + θ_{t+1}) / (t + 1)."""


    def step(self, inp: StepInput) -> StepOutput:
        t = inp.index
        weight = 1.0 / (t + 1)
        merged = inp.sinks.output()
        for k in inp.base:
            if t == 0:
                # The first version is the checkpoint itself (its tensors shared, not copied: never written in place).
                merged[k] = to_cpu(inp.task[k])
            else:
                # (t·θ + θ_t)/(t+1) = θ + (θ_t − θ)/(t+1): one fused op and one new tensor per key.
                merged[k] = to_cpu(
                    torch.lerp(to_device(inp.merged[k], inp.device), to_device(inp.task[k], inp.device), weight))
        inp.progress(1, 1, None)
        state = MethodState(meta={"method": self.name})
        return StepOutput(merged=merged.done(), state=state, metrics={"weight": weight})
