"""The shapes of every name a client or operator gives: lineages, tasks, tenants and device strings.

ASCII only on purpose: `str.isdigit` and `\\d` also accept other scripts' digits ("cuda:١")."""

from __future__ import annotations

import re

LINEAGE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]{1,3})$"

_LINEAGE = re.compile(LINEAGE_PATTERN, re.ASCII)
_TENANT = re.compile(TENANT_PATTERN, re.ASCII)
_DEVICE = re.compile(DEVICE_PATTERN, re.ASCII)


def is_lineage_name(name: str) -> bool:
    return bool(_LINEAGE.fullmatch(name))


def is_tenant_name(name: str) -> bool:
    return bool(_TENANT.fullmatch(name))


def check_device(value: str | None) -> str | None:
    """A device string (auto, cpu, cuda, cuda:N) unchanged, or ValueError."""
    if value is None or _DEVICE.fullmatch(value):
        return value
    raise ValueError("device must be auto, cpu, cuda or cuda:N")
