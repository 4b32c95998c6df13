"""End to end: uvicorn, two Celery worker processes, the real Redis and moto's S3 server as separate processes,
running real merge jobs on tiny OpenCLIP models (tests/helpers_models.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from svc_procs import (
    Proc,
    free_port,
    hook_receiver,
    mergeline_cmd,
    start_api,
    start_moto,
    start_worker,
    wait_http,
)

from core.webhooks import SIGNATURE_HEADER, verify
from service.client import ApiError, MergelineClient

pytestmark = pytest.mark.e2e
TOKENS = "tok-acme=acme,tok-globex=globex"


def make_inputs(root: Path, n_tasks: int = 3) -> dict:
    from tests.helpers_models import tiny_clip_config, write_clip_base, write_clip_task, write_head, write_image_npz

    root.mkdir(parents=True, exist_ok=True)
    write_clip_base(root / "base.safetensors")
    for i in range(n_tasks):
        write_clip_task(root / "base.safetensors", root / f"task{i}.safetensors", seed=i + 1)
        write_image_npz(root / f"calib{i}.npz", n=16, seed=i, labelled=False)
        write_image_npz(root / f"eval{i}.npz", n=16, seed=100 + i)
        write_head(root / f"head{i}.safetensors", classes=4, seed=i)
    return {"arch": tiny_clip_config(), "root": root}


def task(inputs: dict, i: int, name: str | None = None, prefix: str | None = None) -> dict:
    where = prefix or f"file://{inputs['root']}/"
    return {"name": name or f"task{i}", "checkpoint": f"{where}task{i}.safetensors",
            "calibration": f"file://{inputs['root']}/calib{i}.npz",
            "eval": f"file://{inputs['root']}/eval{i}.npz", "head": f"file://{inputs['root']}/head{i}.safetensors"}


def spec(inputs: dict, lineage: str, tasks: list[dict], *, steps: int = 4, method: str = "otmf",
         base_uri: str | None = None, with_base: bool = True, **extra) -> dict:
    """A job spec; `with_base=False` leaves the base out (optional once the lineage exists)."""
    params = {"steps": steps, "batch_size": 4, "eval_every": 1000} if method == "otmf" else {}
    body = {"lineage": lineage, "tasks": tasks, "method": method, "params": params, **extra}
    if with_base:
        body["base"] = {"family": "open_clip", "arch": inputs["arch"],
                        "uri": base_uri or f"file://{inputs['root']}/base.safetensors"}
    return body


@pytest.fixture(scope="module")
def receiver():
    with hook_receiver() as (url, received):
        yield url, received


@pytest.fixture(scope="module")
def cluster(redis_db, tmp_path_factory):
    """moto S3 + the API + two workers, configured like production (Redis broker, s3:// store)."""
    import boto3

    logs = tmp_path_factory.mktemp("logs")
    inputs = make_inputs(tmp_path_factory.mktemp("inputs"))
    moto, s3_url = start_moto(logs)
    procs: list[Proc] = [moto]
    try:
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        for bucket in ("lineages", "models"):
            s3.create_bucket(Bucket=bucket)
        for name in ("base.safetensors", "task0.safetensors"):
            s3.upload_file(str(inputs["root"] / name), "models", f"clip/{name}")
        prefix = f"e2e{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "MERGELINE_BROKER_URL": redis_db, "MERGELINE_KEY_PREFIX": prefix,
               "MERGELINE_QUEUE": prefix, "MERGELINE_API_TOKENS": TOKENS,
               "MERGELINE_METRICS_TOKEN": "metrics-token", "MERGELINE_STORE": "s3://lineages/prod",
               "MERGELINE_ALLOWED_ROOTS": str(inputs["root"]), "MERGELINE_DEVICE": "cpu",
               "MERGELINE_LEASE_TTL_S": "4", "MERGELINE_RECONCILE_INTERVAL_S": "1",
               "MERGELINE_WEBHOOK_ALLOW_PRIVATE": "true", "MERGELINE_WEBHOOK_BACKOFF_S": "0.2",
               "MERGELINE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "AWS_ENDPOINT_URL": s3_url,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        api, url = start_api(env, logs)
        procs.append(api)
        workers = [start_worker(env, logs, f"worker-{i}") for i in range(2)]
        procs += workers
        yield {"url": url, "env": env, "logs": logs, "inputs": inputs, "workers": workers, "procs": procs,
               "s3": s3, "prefix": prefix}
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture
def acme(cluster):
    with MergelineClient(cluster["url"], "tok-acme") as client:
        yield client


def wait_final(client: MergelineClient, job_id: str, timeout: float = 180.0) -> dict:
    return client.wait(job_id, timeout=timeout, poll=0.2)


def test_job_runs_with_progress_downloads_and_makes_v2(cluster, acme, receiver, tmp_path):
    inputs = cluster["inputs"]
    hook_url, received = receiver
    first = spec(inputs, "vision", [task(inputs, 0, prefix="s3://models/clip/"), task(inputs, 1)], steps=12,
                 base_uri="s3://models/clip/base.safetensors", webhook={"url": hook_url, "secret": "s3cr3t"})
    job = acme.submit(first)
    assert job["status"] == "queued"
    steps_seen = set()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        job = acme.get(job["id"])
        if job["status"] == "running" and job["progress"]:
            steps_seen.add(job["progress"]["step"])
        time.sleep(0.1)
    assert job["status"] == "succeeded", job["error"]
    assert len(steps_seen) >= 2, f"progress should advance while the job runs: {steps_seen}"
    assert job["result"]["version"] == 1 and job["progress"]["step"] == 12
    assert set(job["progress"]["losses"]) == {"pre", "post"}  # OTMF's two objectives, each with its own loss
    manifest = job["result"]["manifest"]
    assert manifest["job_id"] == job["id"] and manifest["parent"] == 0

    pulled = acme.download_version("vision", 1, tmp_path / "v1")
    for entry in pulled["files"]:
        assert hashlib.sha256((tmp_path / "v1" / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]

    second = acme.submit(spec(inputs, "vision", [task(inputs, 2)], steps=3, parent_version=1, with_base=False))
    events = [e["type"] for e in acme.stream(second["id"])]
    assert events[0] == "queued" and "started" in events and events[-1] == "succeeded"
    done = acme.get(second["id"])
    assert done["result"]["version"] == 2 and done["result"]["manifest"]["parent"] == 1
    lineage = acme.lineage("vision")
    assert lineage["head"] == 2 and [v["job_id"] for v in lineage["versions"]] == [job["id"], second["id"]]

    # The CLI reads lineages and pulls versions through the API when given a URL.
    from typer.testing import CliRunner

    from mergeline.cli import app as cli

    api = ["--url", cluster["url"], "--token", "tok-acme", "--json"]
    shown = CliRunner().invoke(cli, ["lineage", "show", "vision", *api])
    assert shown.exit_code == 0, shown.output
    assert [v["parent"] for v in json.loads(shown.output)["versions"]] == [0, 1]
    pulled = CliRunner().invoke(cli, ["pull", "vision", str(tmp_path / "head"), *api])
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.output)["version"] == 2 and (tmp_path / "head" / "model.safetensors").exists()
    hidden = CliRunner().invoke(cli, ["lineage", "show", "vision", "--url", cluster["url"], "--token", "tok-globex"])
    assert hidden.exit_code == 1 and "not_found" in hidden.output
    listed = CliRunner().invoke(cli, ["lineage", "list", *api])
    assert listed.exit_code == 0, listed.output
    every = json.loads(listed.output)["data"]
    assert next(d for d in every if d["name"] == "vision")["head"] == 2
    assert [d["name"] for d in acme.iter_lineages(page_size=1)] == [d["name"] for d in every]  # page by page
    assert "vision" not in CliRunner().invoke(cli, ["lineage", "list", "--url", cluster["url"],
                                                    "--token", "tok-globex"]).output

    stale = wait_final(acme, acme.submit(spec(inputs, "vision", [task(inputs, 2, name="again")],
                                              parent_version=1, with_base=False))["id"])
    assert stale["status"] == "failed" and stale["error"]["type"] == "conflict"
    assert acme.lineage("vision")["head"] == 2

    deadline = time.monotonic() + 20
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    headers, body = received[0]
    assert verify("s3cr3t", body, headers[SIGNATURE_HEADER])
    assert json.loads(body)["data"]["id"] == job["id"] and json.loads(body)["data"]["status"] == "succeeded"
    import httpx

    metrics = httpx.get(f"{cluster['url']}/metrics", headers={"Authorization": "Bearer metrics-token"}).text
    assert "mergeline_step_duration_seconds_count" in metrics and "mergeline_store_bytes_written_total" in metrics


def test_ten_jobs_on_one_lineage_with_two_workers(cluster, acme):
    inputs = cluster["inputs"]

    def post(i: int) -> str:
        body = spec(inputs, "ordered", [task(inputs, i % 3, name=f"t{i}")], method="task_arithmetic")
        return acme.submit(body)["id"]

    with ThreadPoolExecutor(10) as pool:
        ids = set(pool.map(post, range(10)))
    submitted = [j["id"] for j in acme.list(lineage="ordered", limit=20)["data"]][::-1]  # oldest first
    assert set(submitted) == ids
    finals = [wait_final(acme, job_id) for job_id in submitted]
    assert [j["status"] for j in finals] == ["succeeded"] * 10, [j["error"] for j in finals]
    assert [j["result"]["version"] for j in finals] == list(range(1, 11)), "versions follow submission order"
    versions = acme.lineage("ordered")["versions"]
    assert [(v["version"], v["parent"], v["job_id"]) for v in versions] == \
        [(i + 1, i, job_id) for i, job_id in enumerate(submitted)]
    ran_on = {w.name for w in cluster["workers"] for job_id in ids if job_id in w.log()}
    assert len(ran_on) == 2, "both workers took jobs of the lineage, one at a time"


def test_bad_inputs_end_with_typed_errors(cluster, acme):
    inputs = cluster["inputs"]
    root = inputs["root"]
    cases = {
        "bad-fetch": ([task(inputs, 0, prefix="s3://models/missing/")], "fetch_failed"),
        "bad-root": ([{"name": "x", "checkpoint": "file:///etc/hostname"}], "access_denied"),
        "bad-shape": ([{"name": "x", "checkpoint": f"file://{root}/head0.safetensors"}], "incompatible_checkpoint"),
    }
    jobs = {name: acme.submit(spec(inputs, name, tasks, method="task_arithmetic"))["id"]
            for name, (tasks, _) in cases.items()}
    for name, (_, expected) in cases.items():
        final = wait_final(acme, jobs[name])
        assert final["status"] == "failed" and final["error"]["type"] == expected, final["error"]
        with pytest.raises(ApiError):
            acme.lineage(name)


def test_cli_prints_server_text_verbatim_refuses_empty_cancels_and_names_an_unreachable_url(cluster, acme, tmp_path):
    from typer.testing import CliRunner

    from mergeline.cli import app as cli

    api = ["--url", cluster["url"], "--token", "tok-acme"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec(cluster["inputs"], "Not A Name", [task(cluster["inputs"], 0)])))
    refused = CliRunner().invoke(cli, ["submit", str(bad), *api])
    assert refused.exit_code == 1 and "^[a-z0-9][a-z0-9._-]{0,62}$" in refused.output, refused.output

    done = wait_final(acme, acme.submit(spec(cluster["inputs"], "cli-cancel", [task(cluster["inputs"], 0)],
                                             method="task_arithmetic"))["id"])
    again = CliRunner().invoke(cli, ["cancel", done["id"], *api])
    assert again.exit_code == 1 and "nothing to cancel" in again.output, again.output
    assert acme.get(done["id"])["status"] == "succeeded"

    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = CliRunner().invoke(cli, ["status", done["id"], "--url", nowhere, "--token", "tok-acme"])
    assert unreachable.exit_code == 1 and nowhere in unreachable.output, unreachable.output
    assert "mergeline serve" in unreachable.output


def test_tenants_cannot_see_each_other(cluster, acme):
    with MergelineClient(cluster["url"], "tok-globex") as globex:
        assert globex.list()["data"] == [] and globex.lineages()["data"] == []
        some = acme.list(limit=1)["data"][0]
        for call in (lambda: globex.get(some["id"]), lambda: globex.cancel(some["id"]),
                     lambda: globex.lineage(some["lineage"]), lambda: globex.manifest(some["lineage"], 1)):
            with pytest.raises(ApiError) as info:
                call()
            assert info.value.status == 404
        # The store's own objects are no input: another tenant's version fails as a missing object does.
        errors = []
        for version in (1, 999):
            uri = f"s3://lineages/prod/acme/{some['lineage']}/v{version}/model.safetensors"
            job = globex.submit(spec(cluster["inputs"], "theft", [{**task(cluster["inputs"], 0), "checkpoint": uri}],
                                     method="task_arithmetic"))
            final = wait_final(globex, job["id"])
            errors.append((final["status"], final["error"]["type"], final["error"]["message"].replace(uri, "URI")))
        assert errors[0] == errors[1] and errors[0][:2] == ("failed", "fetch_failed")
    with MergelineClient(cluster["url"], "wrong") as nobody, pytest.raises(ApiError) as info:
        nobody.list()
    assert info.value.status == 401


def test_idempotency_and_cancel_queued_and_running(cluster, acme):
    inputs = cluster["inputs"]
    long_job = spec(inputs, "cancel", [task(inputs, 0), task(inputs, 1)], steps=400)
    first = acme.submit(long_job, idempotency_key="run-1")
    assert acme.submit(long_job, idempotency_key="run-1")["id"] == first["id"]
    queued = acme.submit(spec(inputs, "cancel", [task(inputs, 2)], steps=2))
    other_lineage = acme.submit(spec(inputs, "parallel", [task(inputs, 0), task(inputs, 1)], steps=400))

    cancelled = acme.cancel(queued["id"])
    assert cancelled["status"] == "cancelled", "a queued job is cancelled at once"
    deadline = time.monotonic() + 120
    both_running = False
    while time.monotonic() < deadline:
        a, b = acme.get(first["id"]), acme.get(other_lineage["id"])
        both_running = both_running or (a["status"] == b["status"] == "running")
        if a["status"] == "running" and (a["progress"] or {}).get("step", 0) >= 2:
            break
        time.sleep(0.1)
    acme.cancel(first["id"])
    acme.cancel(other_lineage["id"])
    final = wait_final(acme, first["id"], timeout=60)
    assert final["status"] == "cancelled" and final["result"] is None
    assert wait_final(acme, other_lineage["id"], timeout=60)["status"] == "cancelled"
    assert both_running, "jobs of different lineages run in parallel"
    with pytest.raises(ApiError) as info:
        acme.lineage("cancel")
    assert info.value.status == 404, "a cancelled job commits nothing"
    assert [j["id"] for j in acme.list(lineage="cancel")["data"]] == [queued["id"], first["id"]]


def worker_stepping(cluster, acme, job):
    """The worker running `job`, once the job has taken a few steps."""
    deadline = time.monotonic() + 120
    while (acme.get(job["id"])["progress"] or {}).get("step", 0) < 3:
        assert time.monotonic() < deadline, "the job never started stepping"
        time.sleep(0.1)
    return next(w for w in cluster["workers"] if f'"job started", "job_id": "{job["id"]}"' in w.log())


def test_sigkilled_worker_leaves_a_complete_head_and_the_job_finishes_once(cluster, acme, tmp_path):
    inputs = cluster["inputs"]
    base = acme.submit(spec(inputs, "crash", [task(inputs, 0)], method="task_arithmetic"))
    assert wait_final(acme, base["id"])["status"] == "succeeded"
    job = acme.submit(spec(inputs, "crash", [task(inputs, 1), task(inputs, 2)], steps=40))
    victim = worker_stepping(cluster, acme, job)
    victim.kill_group()  # the whole worker, pool process included: no chance to requeue anything
    victim.popen.wait(10)
    replacement = start_worker(cluster["env"], cluster["logs"], f"worker-replacement-{uuid.uuid4().hex[:4]}")
    cluster["procs"].append(replacement)
    cluster["workers"][cluster["workers"].index(victim)] = replacement

    final = wait_final(acme, job["id"], timeout=240)
    types = [e["type"] for e in acme.events(job["id"])]
    assert "worker_lost" in types
    lineage = acme.lineage("crash")
    mine = [v for v in lineage["versions"] if v["job_id"] == job["id"]]
    if final["status"] == "succeeded":
        assert len(mine) == 1 and lineage["head"] == 2 and final["result"]["version"] == 2
    else:
        assert final["error"]["type"] == "worker_lost" and mine == [] and lineage["head"] == 1
    acme.download_version("crash", lineage["head"], tmp_path / "head")  # complete: every sha256 matches


def test_killed_pool_process_is_redelivered_and_the_job_finishes_once(cluster, acme):
    """The OOM-killer case: only the pool process running the job dies; Celery requeues its message
    (reject_on_worker_lost) and the job runs again once its lease lapses."""
    inputs = cluster["inputs"]
    job = acme.submit(spec(inputs, "oom", [task(inputs, 0), task(inputs, 1)], steps=40))
    worker = worker_stepping(cluster, acme, job)
    children = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the worker has a pool process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    final = wait_final(acme, job["id"], timeout=180)
    assert final["status"] == "succeeded", final["error"]
    assert worker.popen.poll() is None, "the worker itself survives and replaces its pool process"
    assert "worker_lost" in [e["type"] for e in acme.events(job["id"])]
    versions = acme.lineage("oom")["versions"]
    assert [(v["version"], v["job_id"]) for v in versions] == [(1, job["id"])]


def test_schemathesis_finds_no_server_error(cluster, tmp_path):
    """Fuzz every route from the OpenAPI schema (against an API whose queue no worker reads)."""
    env = {**cluster["env"], "MERGELINE_KEY_PREFIX": f"fuzz{uuid.uuid4().hex[:6]}", "MERGELINE_QUEUE": "fuzz",
           "MERGELINE_LINEAGE_OP_TIMEOUT_S": "1"}  # lineage operations wait for no worker here
    api, url = start_api(env, cluster["logs"])
    try:
        result = subprocess.run(
            [str(Path(os.sys.executable).parent / "st"), "run", f"{url}/openapi.json", "--checks",
             "not_a_server_error", "-H", "Authorization: Bearer tok-acme", "--max-examples", "25",
             "--request-timeout", "20", "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        api.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert not re.search(r'HTTP/1\.1" 5\d\d ', api.log()), "the access log shows a server error"


def test_embedded_serve_runs_a_job_from_submit_wait(tmp_path):
    """`mergeline serve` with no configuration: no external server, prints URL and token, first curl works."""
    from tests.helpers_models import tiny_clip_config

    inputs = make_inputs(tmp_path / "data", n_tasks=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERGELINE_", "AWS_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    port = free_port()
    serve = Proc("serve", mergeline_cmd("serve", "--port", str(port)), env, tmp_path, cwd=tmp_path)
    try:
        serve.wait_for_log("MERGELINE_TOKEN=", timeout=60)
        token = serve.log().split("MERGELINE_TOKEN=", 1)[1].split()[0]
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        curl = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {token}", f"{url}/v1/jobs"],
                              capture_output=True, text=True, timeout=30)
        assert json.loads(curl.stdout) == {"data": [], "has_more": False}
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps({**spec(inputs, "local", [task(inputs, 0, prefix="file://data/")],
                                               method="task_arithmetic"),
                                        "base": {"family": "open_clip", "arch": tiny_clip_config(),
                                                 "uri": "file://data/base.safetensors"}}))
        submit = subprocess.run(mergeline_cmd("submit", str(job_file), "--wait", "--json", "--url", url,
                                              "--token", token), capture_output=True, text=True, timeout=240,
                                env=env, cwd=tmp_path)
        assert submit.returncode == 0, submit.stdout + submit.stderr + serve.log()[-3000:]
        job = json.loads(submit.stdout)
        assert job["status"] == "succeeded" and job["result"]["version"] == 1
        status = subprocess.run(mergeline_cmd("status", job["id"], "--json"), capture_output=True, text=True,
                                timeout=60, env={**env, "MERGELINE_URL": url, "MERGELINE_TOKEN": token})
        assert json.loads(status.stdout)["id"] == job["id"]
        assert (tmp_path / "mergeline-data" / "store" / "default" / "local" / "v1" / "manifest.json").exists()
    finally:
        serve.stop()
