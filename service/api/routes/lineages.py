"""`/v1/lineages`: the caller's lineages, their versions' manifests, and the versions' files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from core.errors import NotFound
from core.names import is_lineage_name
from core.store import LineageStore
from service.api.deps import Services, Store, Tenant, get_services
from service.api.models import ERROR_RESPONSES, Lineage, LineageList

router = APIRouter(prefix="/v1/lineages", tags=["lineages"], responses=ERROR_RESPONSES)


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
