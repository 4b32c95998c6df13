"""Fusion methods by name. Adding a method is one module and one entry here; its params live in service.spec.

Each method is imported on first use: a data-free job never loads OTMF's optimal-transport dependencies."""

from __future__ import annotations

from worker.engine.methods.base import Method, MethodState, StepInput, StepOutput
from worker.engine.registry import instantiate

METHODS: dict[str, str] = {
    "otmf": "worker.engine.methods.otmf:OTMF",
    "task_arithmetic": "worker.engine.methods.task_arithmetic:TaskArithmetic",
    "ties": "worker.engine.methods.ties:Ties",
    "opcm": "worker.engine.methods.opcm:OPCM",
    "weight_average": "worker.engine.methods.weight_average:WeightAverage",
}


def get_method(name: str) -> Method:
    """A new instance of the method registered as `name`; InvalidInput (naming `method`) for an unknown one."""
    return instantiate(METHODS, name, kind="method", param="method")


__all__ = ["METHODS", "Method", "MethodState", "StepInput", "StepOutput", "get_method"]
