"""The API in-process (real Redis, real file store; messages captured instead of sent): routes, auth, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from core.store import FileToCommit, LineageStore
from mergeline.compose import api_services
from service.api import create_app
from service.api.deps import TokenTable

A = {"Authorization": "Bearer tok-acme"}
G = {"Authorization": "Bearer tok-globex"}
BASE = {"family": "open_clip", "arch": "ViT-B-32", "uri": "file:///data/base.safetensors"}
SPEC = {"lineage": "vision", "base": BASE, "method": "task_arithmetic",
        "tasks": [{"name": "mnist", "checkpoint": "file:///data/mnist.safetensors"}]}


@pytest.fixture
def settings(redis_db, prefix, tmp_path) -> Settings:
    return Settings(broker_url=redis_db, key_prefix=prefix, queue=prefix, store=f"file://{tmp_path}/store",
                    api_tokens="tok-acme=acme,tok-globex=globex", metrics_token="metrics-token", max_body_bytes=4096)


@pytest.fixture
def sent() -> list[str]:
    return []


@pytest.fixture
def client(settings, sent) -> TestClient:
    app = create_app(api_services(settings, send=sent.append))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def commit(settings: Settings, tenant: str, tmp_path: Path, lineage: str = "vision", version: int = 1) -> dict:
    data = tmp_path / f"model-{version}.bin"
    data.write_bytes(bytes(range(256)) * (40 + version))
    store = LineageStore(settings.store)
    return store.commit_version(tenant, lineage, parent=version - 1, base=BASE,
                                files=[FileToCommit("model.safetensors", data)],
                                manifest={"method": "task_arithmetic", "tasks": [], "metrics": {}},
                                job_id=f"job_{version}")


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"type", "message", "param"} <= set(body["error"]), body
    return body["error"]


def test_service_never_imports_torch():
    code = "import sys, service.api, mergeline.compose, mergeline.cli_remote, service.client, worker.tasks; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_auth(client):
    assert error_of(client.get("/v1/jobs"))["type"] == "unauthorized"
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers={"Authorization": "Basic dG9rLWFjbWU="}).status_code == 401
    assert client.get("/v1/jobs", headers=A).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}


def test_token_table_maps_tokens_to_tenants():
    table = TokenTable({"a" * 40: "acme", "b": "globex"})
    assert table.tenant_for("a" * 40) == "acme" and table.tenant_for("b") == "globex"
    assert table.tenant_for("a" * 39) is None and table.tenant_for("") is None
    with pytest.raises(ValueError):
        TokenTable({"t": "../etc"})


def test_submit_get_list_cancel(client, sent):
    response = client.post("/v1/jobs", headers=A, json=SPEC)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and sent == [job["id"]]
    assert "webhook" not in response.text and "tenant" not in job
    assert client.get(f"/v1/jobs/{job['id']}", headers=A).json() == job
    listing = client.get("/v1/jobs", headers=A, params={"lineage": "vision", "limit": 1}).json()
    assert listing == {"data": [job], "has_more": False}
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=A).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=A).json()["data"]
    assert [e["type"] for e in events] == ["queued", "cancelled"]


def test_status_polls_count_against_the_rate_limit(settings, sent):
    """The poll counts its request in the same round trip as its read: the limit holds for it as for every route."""
    if time.time() % 60 > 55:  # the counts below must fall in one minute's window
        time.sleep(60 - time.time() % 60 + 0.1)
    limited = settings.model_copy(update={"rate_limit": 5})
    with TestClient(create_app(api_services(limited, send=sent.append)), raise_server_exceptions=False) as client:
        job = client.post("/v1/jobs", headers=A, json=SPEC).json()
        paths = (f"/v1/jobs/{job['id']}", "/v1/jobs/job_missing", "/v1/jobs/nope", f"/v1/jobs/{job['id']}")
        answers = [client.get(path, headers=A).status_code for path in paths]
        assert answers == [200, 404, 404, 200]
        over = client.get(f"/v1/jobs/{job['id']}", headers=A)
        assert over.status_code == 429 and error_of(over)["type"] == "rate_limited"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        assert client.get("/v1/jobs", headers=A).status_code == 429, "one count per tenant, whatever the route"
        assert client.get(f"/v1/jobs/{job['id']}", headers=G).status_code == 404, "another tenant has its own count"
        assert client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_cancel_whose_record_vanishes_is_a_404(client):
    """Redis comes back empty while the cancel runs: the caller gets a 404, and nothing of the job is re-created."""
    job = client.post("/v1/jobs", headers=A, json=SPEC).json()
    jobs = client.app.state.services.jobs
    read = jobs.get

    def read_then_lose(tenant: str, job_id: str) -> dict:
        found = read(tenant, job_id)
        jobs.r.delete(jobs._job(job_id), jobs._events(job_id))
        return found

    jobs.get = read_then_lose
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=A)
    assert response.status_code == 404 and error_of(response)["type"] == "not_found"
    assert not jobs.r.exists(jobs._job(job["id"]), jobs._events(job["id"]))


def test_idempotency_key_over_http(client):
    headers = {**A, "Idempotency-Key": "ci-42"}
    first = client.post("/v1/jobs", headers=headers, json=SPEC)
    again = client.post("/v1/jobs", headers=headers, json=SPEC)
    assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", headers=headers, json={**SPEC, "lineage": "other"})
    assert other.status_code == 409 and error_of(other)["param"] == "Idempotency-Key"
    assert len(client.get("/v1/jobs", headers=A).json()["data"]) == 1


def test_tenants_are_isolated(client, settings, tmp_path):
    job = client.post("/v1/jobs", headers=A, json=SPEC).json()
    commit(settings, "acme", tmp_path)
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", "/v1/lineages/vision",
                 "/v1/lineages/vision/versions/1", "/v1/lineages/vision/versions/1/files/model.safetensors"):
        response = client.get(path, headers=G)
        assert response.status_code == 404 and error_of(response)["type"] == "not_found", path
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=G).status_code == 404
    assert client.get("/v1/jobs", headers=G).json()["data"] == []
    assert client.get("/v1/lineages", headers=G).json()["data"] == []
    assert [x["name"] for x in client.get("/v1/lineages", headers=A).json()["data"]] == ["vision"]


@pytest.mark.parametrize(("body", "status", "type", "param"), [
    (b"{not json", 400, "invalid_request", None),
    (b"[1, 2]", 422, "invalid_input", None),
    (json.dumps({**SPEC, "lineage": "Bad Name"}).encode(), 422, "invalid_input", "lineage"),
    (json.dumps({**SPEC, "tasks": "mnist"}).encode(), 422, "invalid_input", "tasks"),
    (json.dumps({**SPEC, "params": {"scaling_factor": "high"}}).encode(), 422, "invalid_input",
     "params.scaling_factor"),
    (json.dumps({**SPEC, "params": {"nope": 1}}).encode(), 422, "invalid_input", "params.nope"),
    (json.dumps({**SPEC, "tasks": [{"name": "x", "checkpoint": "https://example.com/x.safetensors"}]}).encode(),
     422, "access_denied", "tasks.0.checkpoint"),
    (json.dumps({**SPEC, "tasks": [{"name": "x", "checkpoint": "hf://acme/model@main"}]}).encode(),
     422, "access_denied", "tasks.0.checkpoint"),  # hf:// is off unless MERGELINE_ALLOW_HF
    (json.dumps({**SPEC, "tasks": [{"name": "x", "checkpoint": "hf://acme/model@../../x"}]}).encode(),
     422, "invalid_input", "tasks.0.checkpoint"),
])
def test_bad_specs_name_the_field_and_create_nothing(client, sent, body, status, type, param):
    response = client.post("/v1/jobs", headers={**A, "Content-Type": "application/json"}, content=body)
    error = error_of(response)
    assert (response.status_code, error["type"], error["param"]) == (status, type, param), error
    assert client.get("/v1/jobs", headers=A).json()["data"] == [] and sent == []


def test_protocol_errors_keep_the_error_shape(client):
    big = json.dumps({**SPEC, "pad": "x" * 5000}).encode()
    assert client.post("/v1/jobs", headers=A, content=big).status_code == 413

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    chunked = client.post("/v1/jobs", headers=A, content=chunks())
    assert chunked.status_code == 413 and error_of(chunked)["type"] == "request_too_large"
    assert error_of(client.get("/v2/nothing", headers=A))["type"] == "not_found"
    response = client.delete("/v1/jobs", headers=A)
    assert response.status_code == 405 and error_of(response)["type"] == "method_not_allowed"
    for params in ({"limit": 0}, {"limit": "many"}, {"status": "done"}, {"lineage": "UPPER"}, {"after": "job_x"}):
        response = client.get("/v1/jobs", headers=A, params=params)
        assert response.status_code == 400 and error_of(response)["param"], params
    assert client.get("/v1/jobs/job_missing", headers=A).status_code == 404
    assert client.get("/v1/lineages/vision/versions/one", headers=A).status_code == 404
    assert client.post("/v1/jobs", headers={**A, "Idempotency-Key": "k" * 300}, json=SPEC).status_code == 400


def test_lineage_routes_and_file_download(client, settings, tmp_path):
    assert client.get("/v1/lineages/vision", headers=A).status_code == 404
    commit(settings, "acme", tmp_path, version=1)
    second = commit(settings, "acme", tmp_path, version=2)
    lineage = client.get("/v1/lineages/vision", headers=A).json()
    assert lineage["head"] == 2 and lineage["base"] == BASE and [v["version"] for v in lineage["versions"]] == [1, 2]
    assert lineage["versions"][1]["parent"] == 1
    assert client.get("/v1/lineages/vision/versions/2", headers=A).json() == second
    response = client.get("/v1/lineages/vision/versions/2/files/model.safetensors", headers=A)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == second["files"][0]["sha256"]
    assert response.headers["etag"] == f'"{second["files"][0]["sha256"]}"'
    assert client.get("/v1/lineages/vision/versions/2/files/../lineage.json", headers=A).status_code == 404
    assert client.get("/v1/lineages/vision/versions/3", headers=A).status_code == 404
    assert client.get("/v1/lineages/vision/versions/0", headers=A).status_code == 404
    page = client.get("/v1/lineages", headers=A, params={"limit": 1}).json()
    assert [x["name"] for x in page["data"]] == ["vision"] and page["has_more"] is False


def test_event_stream_ends_when_the_job_ends(client, settings):
    job = client.post("/v1/jobs", headers=A, json=SPEC).json()
    services = client.app.state.services
    services.jobs.acquire(job["id"], "tok")

    def finish_later():
        services.jobs.add_event(job["id"], "task_started", "merging mnist", {"task_index": 0})
        services.jobs.finish(job["id"], "tok", "failed", error={"type": "fetch_failed", "message": "gone"})

    timer = threading.Timer(0.5, finish_later)
    timer.start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={**A, "Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    timer.join()
    assert [e["type"] for e in data] == ["queued", "started", "task_started", "failed"]


def test_readyz_and_metrics(client, settings, redis_db):
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"broker": "ok", "store": "ok"}}
    client.post("/v1/jobs", headers=A, json=SPEC)
    for headers in ({}, A, {"Authorization": "Bearer wrong"}):  # not for tenants, nor anonymous
        assert client.get("/metrics", headers=headers).status_code == 401
    text = client.get("/metrics", headers={"Authorization": "Bearer metrics-token"}).text
    assert 'mergeline_jobs{status="queued"} 1.0' in text and "mergeline_queue_depth 1.0" in text
    down = Settings(broker_url="redis://127.0.0.1:1/0", key_prefix="x", store=settings.store, api_tokens="t=a")
    app = create_app(api_services(down, send=lambda _: None))
    with TestClient(app) as c:
        response = c.get("/readyz")
        assert response.status_code == 503 and error_of(response)["type"] == "broker_unavailable"
        assert c.post("/v1/jobs", headers={"Authorization": "Bearer t"}, json=SPEC).status_code == 503


def test_openapi_documents_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert "JobSpec" in schema["components"]["schemas"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                 "/v1/lineages", "/v1/lineages/{name}", "/v1/lineages/{name}/versions/{version}",
                 "/v1/lineages/{name}/versions/{version}/files/{path}", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    assert client.get("/docs").status_code == 200


def test_root_sends_a_browser_to_the_dashboard_and_stays_out_of_the_schema(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/ui"
    assert client.get("/").status_code == 200  # followed: the dashboard's page, no token needed to load it
    assert "/" not in client.get("/openapi.json").json()["paths"]
