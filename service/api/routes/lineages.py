"""`/v1/lineages`: the caller's lineages, their versions' manifests and files; rollback, fork and delete."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from core.errors import BrokerUnavailable, Conflict, MergelineError, NotFound
from core.jobs import JobStore
from core.names import is_lineage_name
from core.statuses import FINAL
from core.store import LineageStore
from service.api.deps import Jobs, Services, Store, Tenant, get_services
from service.api.models import ERROR_RESPONSES, DeletedLineage, ForkRequest, Lineage, LineageList, RollbackRequest

router = APIRouter(prefix="/v1/lineages", tags=["lineages"], responses=ERROR_RESPONSES)
OP_POLL_S = 0.1


def _lineage(store: LineageStore, tenant: str, name: str) -> dict:
    _lineage_name(name)
    return store.describe(tenant, name)


@router.get("", response_model=LineageList)
def list_lineages(tenant: Tenant, store: Store, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: Annotated[str | None, Query(max_length=63, description="a lineage name")] = None) -> Any:
    names = [n for n in store.list_lineages(tenant) if after is None or n > after]
    data = []
    for name in names:
        if len(data) > limit:
            break
        try:
            data.append(_lineage(store, tenant, name))
        except NotFound:  # a folder without lineage.json yet (its first commit is under way)
            continue
    return {"data": data[:limit], "has_more": len(data) > limit}


@router.get("/{name}", response_model=Lineage)
def get_lineage(name: str, tenant: Tenant, store: Store) -> Any:
    return _lineage(store, tenant, name)


@router.get("/{name}/versions/{version}", response_model=dict[str, Any])
def get_version(name: str, version: int, tenant: Tenant, store: Store) -> Any:
    _lineage_name(name)
    return store.manifest(tenant, name, version)


@router.get("/{name}/versions/{version}/files/{path:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}},
                             "description": "the file's bytes; ETag is its sha256 from the manifest"}})
def get_file(name: str, version: int, path: str, tenant: Tenant, store: Store,
             services: Annotated[Services, Depends(get_services)]) -> StreamingResponse:
    _lineage_name(name)
    manifest = store.manifest(tenant, name, version)
    entry = next((f for f in manifest["files"] if f["path"] == path), None)
    if entry is None:
        raise NotFound(f"version {version} of {name!r} has no file {path!r}", param="path")
    services.metrics.safe_inc("store_bytes_read", entry["bytes"])
    filename = path.rsplit("/", 1)[-1]
    return StreamingResponse(
        store.iter_file(tenant, name, version, path), media_type="application/octet-stream",
        headers={"Content-Length": str(entry["bytes"]), "ETag": f'"{entry["sha256"]}"',
                 "Content-Disposition": f'attachment; filename="{filename}"'})


def _lineage_name(name: str) -> None:
    if not is_lineage_name(name):  # not a name any lineage can have: as absent as a missing one
        raise NotFound(f"no lineage {name!r}", param="name")


# -- lineage operations (contract §3.1): each waits its turn in the lineage's job order, then answers ---------------
@router.post("/{name}/rollback", status_code=201, response_model=dict[str, Any])
async def rollback_lineage(name: str, body: RollbackRequest, tenant: Tenant, jobs: Jobs,
                           services: Annotated[Services, Depends(get_services)]) -> Any:
    """Commit a new head whose files and method state are `version`'s (`rollback_of`); answers its manifest."""
    return await _lineage_op(services, jobs, tenant, name, {"op": "rollback", "version": body.version})


@router.post("/{name}/fork", status_code=201, response_model=Lineage)
async def fork_lineage(name: str, body: ForkRequest, tenant: Tenant, jobs: Jobs,
                       services: Annotated[Services, Depends(get_services)]) -> Any:
    """Start lineage `name` (the body's) whose v1 is a copy of this lineage's `version`; 409 if the name is taken."""
    return await _lineage_op(services, jobs, tenant, name, {"op": "fork", "version": body.version, "name": body.name})


@router.delete("/{name}", response_model=DeletedLineage)
async def delete_lineage(name: str, tenant: Tenant, jobs: Jobs,
                         services: Annotated[Services, Depends(get_services)]) -> Any:
    """From now on the lineage is a 404; its files are purged after MERGELINE_RETENTION_DAYS, which frees the name."""
    return await _lineage_op(services, jobs, tenant, name, {"op": "delete"})


async def _lineage_op(services: Services, jobs: JobStore, tenant: str, name: str, op: dict) -> Any:
    """Queue `op` behind the lineage's jobs and wait for a worker to run it; its result, or its error re-raised."""
    _lineage_name(name)
    await run_in_threadpool(services.store.require_lineage, tenant, name)  # a 404 needs no turn in the queue
    record = await run_in_threadpool(jobs.create_op, tenant, name, op)
    deadline = time.monotonic() + services.settings.lineage_op_timeout_s
    while record["status"] not in FINAL:
        await asyncio.sleep(OP_POLL_S)
        if time.monotonic() > deadline and record["status"] == "queued":
            await run_in_threadpool(jobs.finish, record["id"], None, "cancelled",
                                    error={"type": "cancelled", "message": "timed out waiting for its turn"})
            await run_in_threadpool(jobs.kick, tenant, name)  # the next job in the lineage, if it was first
        record = await run_in_threadpool(jobs.load_op, record["id"])
        if record is None:
            raise BrokerUnavailable("the lineage operation's record was lost (Redis restarted?); check the lineage")
    if record["status"] == "succeeded":
        return json.loads(record["result"])
    error = json.loads(record.get("error") or "{}")
    if record["status"] == "cancelled":  # the lineage stayed busy (or no worker is running): nothing was changed
        raise Conflict(f"the lineage's earlier jobs did not let the operation run within "
                       f"{services.settings.lineage_op_timeout_s:g} s (MERGELINE_LINEAGE_OP_TIMEOUT_S); nothing was "
                       "changed, try again later", param="name")
    raise MergelineError.from_dict(error)
