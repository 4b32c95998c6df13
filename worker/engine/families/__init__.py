"""The model families by name. Each is imported on first use, so that asking for one does not import the heavy
libraries of the others (transformers, open_clip)."""

from __future__ import annotations

import importlib

from service.errors import InvalidInput
from worker.engine.families.base import Family

FAMILIES: dict[str, str] = {
    "open_clip": "worker.engine.families.open_clip:OpenClipFamily",
    "hf": "worker.engine.families.hf:HFFamily",
    "state_dict": "worker.engine.families.state_dict:StateDictFamily",
}


def get_family(name: str) -> Family:
    """A new instance of the family called `name`; InvalidInput for an unknown name."""
    try:
        target = FAMILIES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown model family {name!r}: use one of {', '.join(sorted(FAMILIES))}", param="base.family"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()
