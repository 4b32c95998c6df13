"""Continual task arithmetic: every step adds the new task vector, scaled by λ, to the head."""

from __future__ import annotations

import torch

from core.methods import TaskArithmeticParams
from engine.methods.base import ElementwiseMethod, MethodState, Prepared, StepInput
from engine.methods.common import to_cpu, to_device


class TaskArithmetic(ElementwiseMethod):
    """θ ← θ0 before the first step; each step θ ← θ + λ·τ_t with τ_t = θ_t − θ0 and λ = `scaling_factor`."""

    def prepare(self, inp: StepInput) -> Prepared:
        params: TaskArithmeticParams = inp.params

        def merge(k: str) -> torch.Tensor:
            w0 = to_device(inp.base[k], inp.device)
            tau = torch.sub(to_device(inp.task[k], inp.device), w0)  # a fresh tensor
            start = w0 if inp.index == 0 else to_device(inp.merged[k], inp.device)
            return to_cpu(tau.mul_(params.scaling_factor).add_(start))

        return Prepared(merge, MethodState(meta={"method": self.name}), {"scaling_factor": params.scaling_factor})
