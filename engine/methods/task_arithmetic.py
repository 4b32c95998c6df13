"""Continual task arithmetic: every step adds the new task vector, scaled by λ, to the head."""

from __future__ import annotations

import torch

from core.methods import TaskArithmeticParams
from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.methods.common import to_cpu, to_device


class TaskArithmetic(Method):
    """θ ← θ0 before the first step; each step θ ← θ + λ·τ_t with τ_t = θ_t − θ0 and λ = `scaling_factor`."""


    def step(self, inp: StepInput) -> StepOutput:
        params: TaskArithmeticParams = inp.params
        start = inp.base if inp.index == 0 else inp.merged
        merged = {}
        for k in inp.base:
            tau = torch.sub(to_device(inp.task[k], inp.device), to_device(inp.base[k], inp.device))  # fresh tensor
            merged[k] = to_cpu(tau.mul_(params.scaling_factor).add_(to_device(start[k], inp.device)))
        inp.progress(1, 1, None)
        state = MethodState(meta={"method": self.name})
        return StepOutput(merged=merged, state=state, metrics={"scaling_factor": params.scaling_factor})
