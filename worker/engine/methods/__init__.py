"""Fusion methods by name. Adding a method is one module and one entry here; its params live in service.spec."""

from __future__ import annotations

from service.errors import InvalidInput
from worker.engine.methods.base import Method, MethodState, StepInput, StepOutput
from worker.engine.methods.opcm import OPCM
from worker.engine.methods.otmf import OTMF
from worker.engine.methods.task_arithmetic import TaskArithmetic
from worker.engine.methods.ties import Ties
from worker.engine.methods.weight_average import WeightAverage

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (OTMF, TaskArithmetic, Ties, OPCM, WeightAverage)}


def get_method(name: str) -> Method:
    """A new instance of the method registered as `name`; InvalidInput (naming `method`) for an unknown one."""
    try:
        return METHODS[name]()
    except KeyError:
        raise InvalidInput(f"unknown method {name!r}; choose one of {', '.join(METHODS)}", param="method") from None


__all__ = ["METHODS", "Method", "MethodState", "StepInput", "StepOutput", "get_method"]
