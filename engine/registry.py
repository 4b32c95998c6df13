"""The engine's side of the core's registries: the class a method or family entry names, imported on first use, so
that a job loads only the heavy libraries (transformers, open_clip, POT) of the family and method it names."""

from __future__ import annotations

import importlib
from typing import Any


def load_class(target: str) -> Any:
    """The class at "module:Class"."""
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
