"""Model families by name, from the core's registry (core.families): one module here and one entry there each.
Each is imported on first use, so asking for one does not import the others' libraries (transformers, open_clip)."""

from __future__ import annotations

from core.families import family_entry
from engine.families.base import Family
from engine.registry import load_class


def get_family(name: str) -> Family:
    """A new instance of the family called `name`; InvalidInput for an unknown name."""
    entry = family_entry(name)
    return load_class(entry.engine)(name, has_features=entry.has_features)
