"""A job's statuses (contract §3), for the job records, the API's models and the client alike."""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[str, ...] = get_args(JobStatus)
FINAL = frozenset({"succeeded", "failed", "cancelled"})
