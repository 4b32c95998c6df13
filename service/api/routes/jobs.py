"""`/v1/jobs`: submit, read, list, cancel, and follow a job's events."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from core.errors import BadRequest, MergelineError
from core.jobs import public_job
from core.names import LINEAGE_PATTERN
from core.spec import MAX_METADATA_VALUE, METADATA_KEY, parse_body, parse_job_spec
from core.statuses import FINAL
from core.uris import check_submission_policy
from service.api.deps import Caller, Jobs, Reads, Tenant
from service.api.models import ERROR_RESPONSES, EventList, Job, JobList, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
STREAM_POLL_S = 0.25
EVENT_ID = re.compile(r"[0-9]{1,9}", re.ASCII)  # what `_stream` sends; anything else restarts from the first event

SUBMIT_BODY = {"requestBody": {"required": True, "description": "the job spec (contract §2)",
                               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}}


@router.post("", status_code=202, response_model=Job, openapi_extra=SUBMIT_BODY,
             responses={200: {"model": Job, "description": "the job first created with this Idempotency-Key"},
                        409: ERROR_RESPONSES[400] | {"description": "Idempotency-Key reused with another body"}})
async def submit_job(request: Request, response: Response, tenant: Tenant, jobs: Jobs,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                                   max_length=255)] = None) -> Any:
    body = parse_body(await request.body())
    spec = parse_job_spec(body)
    await run_in_threadpool(check_submission_policy, spec, request.app.state.services.settings)
    record, created = await run_in_threadpool(jobs.create, tenant, spec, body, idempotency_key=idempotency_key)
    if not created:
        response.status_code = 200
    return public_job(record)


@router.get("", response_model=JobList)
def list_jobs(request: Request, tenant: Tenant, jobs: Jobs,
              lineage: Annotated[str | None, Query(pattern=LINEAGE_PATTERN)] = None,
              status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(min_length=1, max_length=64, description="a job id")] = None) -> Any:
    """Newest first. `metadata.KEY=VALUE` query parameters (any number) keep the jobs whose metadata has them."""
    records, has_more = jobs.list(tenant, lineage=lineage, status=status, limit=limit, after=after,
                                  metadata=_metadata_filter(request))
    return {"data": [public_job(r) for r in records], "has_more": has_more}


def _metadata_filter(request: Request) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not name.startswith("metadata."):
            continue
        key = name.removeprefix("metadata.")
        if not METADATA_KEY.fullmatch(key) or len(value) > MAX_METADATA_VALUE:
            raise BadRequest(f"{name}: metadata keys match ^[a-z0-9_.-]{{1,64}}$ and values are at most "
                             f"{MAX_METADATA_VALUE} characters", param=name)
        if key in wanted:
            raise BadRequest(f"{name} is given twice", param=name)
        wanted[key] = value
    return wanted


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, caller: Caller, reads: Reads) -> Any:
    # The status poll: the caller's rate count and the read in one round trip to Redis, on the event loop.
    return public_job(await reads.poll(caller, job_id))


@router.post("/{job_id}/cancel", response_model=Job)
def cancel_job(job_id: str, tenant: Tenant, jobs: Jobs) -> Any:
    return public_job(jobs.request_cancel(tenant, job_id))


@router.get("/{job_id}/events", response_model=EventList,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "with `Accept: text/event-stream`: a live stream ending with the job"}})
async def job_events(job_id: str, request: Request, tenant: Tenant, jobs: Jobs,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None) -> Any:
    events = await run_in_threadpool(jobs.events, tenant, job_id)  # 404 before any stream starts
    if "text/event-stream" not in request.headers.get("accept", ""):
        return {"data": events}
    start = int(last_event_id) + 1 if last_event_id and EVENT_ID.fullmatch(last_event_id) else 0
    return EventSourceResponse(_stream(request, jobs, tenant, job_id, start), ping=15)


async def _stream(request: Request, jobs: Jobs, tenant: str, job_id: str, index: int):
    """Every event from `index` on, as it is recorded; ends once the job is final and its events are sent."""
    while True:
        try:
            record = await run_in_threadpool(jobs.get, tenant, job_id)
            events = await run_in_threadpool(jobs.events, tenant, job_id, index)
        except MergelineError as exc:
            yield {"event": "error", "data": json.dumps({"error": exc.to_dict()})}
            return
        for event in events:
            yield {"event": event["type"], "id": str(index), "data": json.dumps(event)}
            index += 1
        if record["status"] in FINAL:
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(STREAM_POLL_S)
