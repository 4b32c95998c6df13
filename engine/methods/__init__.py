"""Fusion methods by name, from the core's registry (core.methods): one module here and one entry there each."""

from __future__ import annotations

from core.methods import method_entry
from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.registry import load_class


def get_method(name: str) -> Method:
    """A new instance of the method registered as `name`; InvalidInput (naming `method`) for an unknown one."""
    entry = method_entry(name)
    return load_class(entry.engine)(name, data_driven=entry.data_driven)


__all__ = ["Method", "MethodState", "StepInput", "StepOutput", "get_method"]
