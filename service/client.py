"""A small typed client for the Mergeline API, for pipelines and the `mergeline submit/status/cancel` commands.

    with MergelineClient("http://127.0.0.1:8000", token) as client:
        job = client.submit(spec, idempotency_key="ci-run-42")
        job = client.wait(job["id"])
        client.download_version("vision-prod", job["result"]["version"], Path("out"))
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx

from core.statuses import FINAL, JobStatus

OPERATION_TIMEOUT = httpx.Timeout(30.0, read=660.0)  # the server waits up to MERGELINE_LINEAGE_OP_TIMEOUT_S


class JobProgress(TypedDict):
    task_index: int
    tasks_total: int
    step: int
    steps_total: int
    loss: float | None


class Job(TypedDict):
    id: str
    lineage: str
    status: JobStatus
    method: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: JobProgress | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class Event(TypedDict):
    at: str
    type: str
    message: str
    data: dict[str, Any]


class ApiError(Exception):
    """An error answer of the API: its HTTP status and the contract's error object (and, on a 429, how many
    seconds to wait before trying again)."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.param = status, type, message, param
        self.retry_after = retry_after


class MergelineClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        url = url or os.environ.get("MERGELINE_URL") or "http://127.0.0.1:8000"
        token = token or os.environ.get("MERGELINE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MergelineClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        _raise_for_error(response)
        return response.json()

    def _unreachable(self, exc: httpx.HTTPError) -> ApiError:
        """A connection failure, naming the URL and the usual fixes."""
        url = str(self._http.base_url).rstrip("/")
        return ApiError(0, "connection_error", f"cannot reach the Mergeline API at {url} ({type(exc).__name__}: "
                        f"{exc}); is it running? Start one with `mergeline serve`, or pass --url / set MERGELINE_URL")

    # -- jobs --------------------------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job spec. With an Idempotency-Key (default: a fresh one, so a retried request after a
        connection error cannot create the job twice) resubmitting the same spec returns the first job."""
        key = idempotency_key or str(uuid.uuid4())
        body = json.dumps(spec).encode()
        for attempt in range(3):
            try:
                response = self._http.post("/v1/jobs", content=body, headers={
                    "Content-Type": "application/json", "Idempotency-Key": key})
                break
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise self._unreachable(exc) from None
                time.sleep(0.5 * 2**attempt)
        _raise_for_error(response)
        return response.json()

    def get(self, job_id: str) -> Job:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list(self, *, lineage: str | None = None, status: str | None = None, limit: int = 20,
             after: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """The tenant's jobs, newest first; `metadata` keeps those whose metadata has every key=value given."""
        params = {k: v for k, v in {"lineage": lineage, "status": status, "limit": limit, "after": after}.items()
                  if v is not None}
        params.update({f"metadata.{k}": v for k, v in (metadata or {}).items()})
        return self._request("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> Job:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str) -> list[Event]:
        return self._request("GET", f"/v1/jobs/{job_id}/events")["data"]

    def stream(self, job_id: str) -> Iterator[Event]:
        """The job's events as they happen (server-sent events); ends when the job ends."""
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"},
                                   timeout=httpx.Timeout(30.0, read=60.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        event = json.loads("\n".join(data))
                        data = []
                        if "error" in event and "type" not in event:
                            err = event["error"]
                            raise ApiError(503, err.get("type", "internal"), err.get("message", ""))
                        yield event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is final (or `timeout` seconds pass: TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    # -- lineages ----------------------------------------------------------------------------------------------
    def lineages(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._request("GET", "/v1/lineages", params=params)

    def iter_lineages(self, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every lineage of the caller's tenant, page after page."""
        after = None
        while True:
            page = self.lineages(limit=page_size, after=after)
            yield from page["data"]
            if not page["has_more"] or not page["data"]:
                return
            after = page["data"][-1]["name"]

    def lineage(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/lineages/{name}")

    # Lineage operations wait their turn behind the lineage's queued jobs, so their answers may take a while.
    def rollback(self, name: str, version: int) -> dict[str, Any]:
        """Commit a new head whose files and method state are `version`'s; returns its manifest."""
        return self._request("POST", f"/v1/lineages/{name}/rollback", json={"version": int(version)},
                             timeout=OPERATION_TIMEOUT)

    def fork(self, name: str, version: int, new_name: str) -> dict[str, Any]:
        """Start lineage `new_name` from `name`@`version`; returns the new lineage."""
        return self._request("POST", f"/v1/lineages/{name}/fork", json={"version": int(version), "name": new_name},
                             timeout=OPERATION_TIMEOUT)

    def delete_lineage(self, name: str) -> dict[str, Any]:
        """Delete a lineage: `{"name", "deleted_at", "purge_after"}`."""
        return self._request("DELETE", f"/v1/lineages/{name}", timeout=OPERATION_TIMEOUT)

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/lineages/{name}/versions/{int(version)}")

    def download_version(self, name: str, version: int, dest: Path) -> dict[str, Any]:
        """Download every file of a version into `dest`, checking each sha256 against the manifest."""
        manifest = self.manifest(name, version)
        dest = Path(dest)
        for entry in manifest["files"]:
            rel = Path(entry["path"])
            if rel.is_absolute() or ".." in rel.parts:
                raise ApiError(0, "invalid_manifest", f"unsafe file path {entry['path']!r} in the manifest")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            try:
                with self._http.stream("GET", f"/v1/lineages/{name}/versions/{int(version)}/files/{entry['path']}",
                                       follow_redirects=True) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for_error(response)
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            if digest.hexdigest() != entry["sha256"]:
                tmp.unlink()
                raise ApiError(0, "checksum_mismatch", f"{entry['path']}: sha256 differs from the manifest")
            tmp.replace(target)
        return manifest


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    retry_after = response.headers.get("retry-after")
    try:
        err = response.json()["error"]
        raise ApiError(response.status_code, err.get("type", "error"), err.get("message", ""), err.get("param"),
                       float(retry_after) if retry_after and retry_after.isdigit() else None)
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:500]) from None
