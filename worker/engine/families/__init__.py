"""The model families by name. Each is imported on first use, so that asking for one does not import the heavy
libraries of the others (transformers, open_clip)."""

from __future__ import annotations

from worker.engine.families.base import Family
from worker.engine.registry import instantiate

FAMILIES: dict[str, str] = {
    "open_clip": "worker.engine.families.open_clip:OpenClipFamily",
    "hf": "worker.engine.families.hf:HFFamily",
    "state_dict": "worker.engine.families.state_dict:StateDictFamily",
}


def get_family(name: str) -> Family:
    """A new instance of the family called `name`; InvalidInput for an unknown name."""
    return instantiate(FAMILIES, name, kind="model family", param="base.family")
