"""Faults with real processes: a Redis restart while jobs are queued and running (a private redis-server, with AOF
and without it, so the shared one is untouched), and an unreachable lineage store."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from svc_procs import free_port, start_api, start_worker
from test_service_e2e import make_inputs, spec, task

from service.client import ApiError, MergelineClient

pytestmark = pytest.mark.e2e


def start_redis(port: int, data: Path, *, persist: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                             "--appendonly", "yes" if persist else "no", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() \
            != "PONG":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    return proc


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_restart_while_jobs_are_queued_and_running(tmp_path):
    inputs = make_inputs(tmp_path / "inputs", n_tasks=3)
    port = free_port()
    (tmp_path / "redis").mkdir()
    redis_proc = start_redis(port, tmp_path / "redis")
    env = {**os.environ, "MERGELINE_BROKER_URL": f"redis://127.0.0.1:{port}/0", "MERGELINE_API_TOKENS": "t=acme",
           "MERGELINE_STORE": f"file://{tmp_path}/store", "MERGELINE_ALLOWED_ROOTS": str(inputs["root"]),
           "MERGELINE_DEVICE": "cpu", "MERGELINE_LEASE_TTL_S": "20", "MERGELINE_RECONCILE_INTERVAL_S": "1",
           "MERGELINE_KEY_PREFIX": f"r{uuid.uuid4().hex[:6]}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = []
    try:
        api, url = start_api(env, tmp_path)
        procs.append(api)
        procs.append(start_worker(env, tmp_path, "worker"))
        with MergelineClient(url, "t") as client:
            running = client.submit(spec(inputs, "r1", [task(inputs, 0), task(inputs, 1)], steps=30))
            queued = client.submit(spec(inputs, "r1", [task(inputs, 2)], method="task_arithmetic", with_base=False))
            other = client.submit(spec(inputs, "r2", [task(inputs, 0)], method="task_arithmetic"))
            deadline = time.monotonic() + 120
            while (client.get(running["id"])["progress"] or {}).get("step", 0) < 2:
                assert time.monotonic() < deadline, "the first job never started stepping"
                time.sleep(0.1)

            redis_proc.terminate()
            redis_proc.wait(10)
            with pytest.raises(ApiError) as info:
                client.get(running["id"])
            assert info.value.status == 503 and info.value.type == "broker_unavailable"
            time.sleep(2)
            redis_proc = start_redis(port, tmp_path / "redis")

            finals = {job["id"]: client.wait(job["id"], timeout=240, poll=0.3) for job in (running, queued, other)}
            assert {j["status"] for j in finals.values()} == {"succeeded"}, [j["error"] for j in finals.values()]
            r1 = client.lineage("r1")
            assert [(v["version"], v["job_id"]) for v in r1["versions"]] == [(1, running["id"]), (2, queued["id"])]
            assert client.lineage("r2")["head"] == 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis_proc.terminate()
        redis_proc.wait(10)


def test_unreachable_store_answers_503(redis_db, tmp_path):
    """The API answers 503 store_unavailable for lineage reads when S3 is down; the job store keeps working."""
    from fastapi.testclient import TestClient

    from core.settings import Settings
    from mergeline.compose import api_services
    from service.api import create_app

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        settings = Settings(broker_url=redis_db, key_prefix=f"s{uuid.uuid4().hex[:6]}", store="s3://gone/prefix",
                            api_tokens="t=acme")
        app = create_app(api_services(settings, send=lambda _: None))
        with TestClient(app) as client:
            response = client.get("/v1/lineages/vision", headers={"Authorization": "Bearer t"})
            assert response.status_code == 503 and response.json()["error"]["type"] == "store_unavailable"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["type"] == "store_unavailable"
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer t"}).status_code == 200
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_back_empty_mid_job_ends_the_job_with_a_clear_status(tmp_path):
    """Redis restarts without its data while a job runs: the worker's progress writes never re-create a partial
    record, `GET` never answers 500, and the running job ends `failed` with `job_lost`, its record whole."""
    import redis

    inputs = make_inputs(tmp_path / "inputs", n_tasks=2)
    port = free_port()
    (tmp_path / "redis").mkdir()
    redis_proc = start_redis(port, tmp_path / "redis", persist=False)
    prefix = f"l{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "MERGELINE_BROKER_URL": f"redis://127.0.0.1:{port}/0", "MERGELINE_API_TOKENS": "t=acme",
           "MERGELINE_STORE": f"file://{tmp_path}/store", "MERGELINE_ALLOWED_ROOTS": str(inputs["root"]),
           "MERGELINE_DEVICE": "cpu", "MERGELINE_LEASE_TTL_S": "3", "MERGELINE_RECONCILE_INTERVAL_S": "1",
           "MERGELINE_KEY_PREFIX": prefix, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = []
    try:
        api, url = start_api(env, tmp_path)
        procs.append(api)
        procs.append(start_worker(env, tmp_path, "worker"))
        with MergelineClient(url, "t") as client:
            job = client.submit(spec(inputs, "lost", [task(inputs, 0), task(inputs, 1)], steps=400))
            deadline = time.monotonic() + 120
            while (client.get(job["id"])["progress"] or {}).get("step", 0) < 2:
                assert time.monotonic() < deadline, "the job never started stepping"
                time.sleep(0.1)
            redis_proc.terminate()
            redis_proc.wait(10)
            redis_proc = start_redis(port, tmp_path / "redis", persist=False)
            r = redis.Redis(port=port, decode_responses=True)
            seen = set()
            deadline = time.monotonic() + 90
            while True:
                try:
                    final = client.get(job["id"])
                except ApiError as exc:
                    assert exc.status in (404, 503), (exc.status, exc.type, exc.message)
                    seen.add(exc.status)
                    final = None
                record = r.hgetall(f"{prefix}:job:{job['id']}")
                assert not record or "tenant" in record, record  # never a partial hash
                if final and final["status"] in ("failed", "succeeded"):
                    break
                assert time.monotonic() < deadline, "the job never ended"
                time.sleep(0.1)
            assert final["status"] == "failed" and final["error"]["type"] == "job_lost", final
            assert client.list(lineage="lost")["data"][0]["id"] == job["id"]
            with pytest.raises(ApiError) as info:
                client.lineage("lost")
            assert info.value.status == 404  # nothing was committed
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
