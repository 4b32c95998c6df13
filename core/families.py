"""The model families: one registry entry each (where its engine code is, what its spec needs).

Torch-free: the spec checks `arch` and feature needs with these entries; the engine imports the entry's class on
first use. Adding a family is one engine module plus one entry here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.errors import InvalidInput


@dataclass(frozen=True)
class FamilyEntry:
    engine: str  # "module:Class" of the engine's implementation
    has_features: bool  # a feature function exists, so data-driven methods can run on it
    needs_arch: bool = False  # the spec's `base.arch` names the architecture (else `arch` must be left out)


FAMILIES: dict[str, FamilyEntry] = {
    "open_clip": FamilyEntry("engine.families.open_clip:OpenClipFamily", has_features=True, needs_arch=True),
    "hf": FamilyEntry("engine.families.hf:HFFamily", has_features=True),
    "state_dict": FamilyEntry("engine.families.state_dict:StateDictFamily", has_features=False),
}
FamilyName = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]  # the spec's `base.family`


def family_entry(name: str) -> FamilyEntry:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidInput(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}",
                           param="base.family") from None
