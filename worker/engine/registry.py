"""Name → "module:Class" registries whose entries are imported on first use, so that a job loads only the heavy
libraries (transformers, open_clip, POT) of the family and method it names."""

from __future__ import annotations

import importlib

from service.errors import InvalidInput


def instantiate(registry: dict[str, str], name: str, *, kind: str, param: str):
    """A new instance of the class registered as `name`; InvalidInput naming `param` for an unknown name."""
    try:
        target = registry[name]
    except KeyError:
        raise InvalidInput(f"unknown {kind} {name!r}: use one of {', '.join(registry)}", param=param) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()
