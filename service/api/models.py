"""Response models: every route declares one, so /openapi.json describes exactly what clients receive."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.names import LINEAGE_PATTERN
from core.statuses import JobStatus


class ErrorBody(BaseModel):
    type: str = Field(examples=["invalid_input"])
    message: str
    param: str | None = Field(None, description="the offending field, header or parameter, when there is one")


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobProgress(BaseModel):
    task_index: int
    tasks_total: int
    step: int
    steps_total: int
    loss: float | None = None
    # A method with alternating objectives (OTMF: "pre", "post") gives each one's latest loss in the current task.
    losses: dict[str, float] | None = None


class JobResult(BaseModel):
    version: int
    manifest: dict[str, Any]
    metrics: dict[str, Any]


class JobError(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["incompatible_checkpoint"])
    message: str


class Job(BaseModel):
    id: str = Field(examples=["job_01JD3XK4Q8N7ZC2V5M0W9R6T1B"])
    lineage: str
    status: JobStatus
    method: str
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: JobProgress | None = None
    result: JobResult | None = None
    error: JobError | None = None
    metadata: dict[str, str] = Field(default_factory=dict, description="the spec's metadata")


class JobList(BaseModel):
    data: list[Job]
    has_more: bool


class Event(BaseModel):
    at: str
    type: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class EventList(BaseModel):
    data: list[Event]


class Lineage(BaseModel):
    name: str
    head: int = Field(description="the newest committed version (0: only the base)")
    base: dict[str, Any]
    versions: list[dict[str, Any]] = Field(description="every version's manifest, oldest first")
    created_at: str | None = None
    forked_from: dict[str, Any] | None = Field(None, description='{"lineage", "version"} this lineage was forked from')


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, description="the version whose files and state become the new head")


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, description="the version the new lineage starts from")
    name: str = Field(pattern=LINEAGE_PATTERN, description="the new lineage's name")


class DeletedLineage(BaseModel):
    name: str
    deleted_at: str
    purge_after: str = Field(description="its files are removed after this time; the name is free after that")


class LineageList(BaseModel):
    data: list[Lineage]
    has_more: bool


class Health(BaseModel):
    status: Literal["ok", "ready"]
    checks: dict[str, str] = Field(default_factory=dict)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request", 401: "Missing or unknown bearer token", 404: "No such resource for this tenant",
        413: "Request body too large", 422: "Invalid job spec",
        429: "Over the tenant's request rate or active-job cap (see Retry-After)",
        503: "Job store, broker or lineage store unreachable",
    }.items()
}
