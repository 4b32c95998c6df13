"""The integrator's basics (contract §3.1) against real processes: uvicorn, a Celery worker, the real Redis and a
file store. Lineage rollback, fork and delete in job order; lineage:// inputs within a tenant; job metadata;
Standard Webhooks with an event filter; private webhook targets refused; 429 from the rate and active-job limits."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load_file
from standardwebhooks import Webhook
from svc_procs import Proc, hook_receiver, start_api, start_worker
from test_service_e2e import make_inputs, spec, task

from service.client import ApiError, MergelineClient

pytestmark = pytest.mark.e2e
TOKENS = "tok-acme=acme,tok-globex=globex"
SECRET = "whsec_" + base64.b64encode(b"integrator signing key").decode()
RETENTION_S = 40


@pytest.fixture(scope="module")
def receiver():
    with hook_receiver() as (url, received):
        yield url, received


@pytest.fixture(scope="module")
def cluster(redis_db, tmp_path_factory):
    """The API and one worker on a file store; deleted lineages are purged RETENTION_S after their deletion."""
    logs = tmp_path_factory.mktemp("logs")
    inputs = make_inputs(tmp_path_factory.mktemp("inputs"))
    store = tmp_path_factory.mktemp("store")
    prefix = f"int{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MERGELINE_BROKER_URL": redis_db, "MERGELINE_KEY_PREFIX": prefix, "MERGELINE_QUEUE": prefix,
           "MERGELINE_API_TOKENS": TOKENS, "MERGELINE_STORE": store.as_uri(),
           "MERGELINE_ALLOWED_ROOTS": str(inputs["root"]), "MERGELINE_DEVICE": "cpu",
           "MERGELINE_LEASE_TTL_S": "4", "MERGELINE_RECONCILE_INTERVAL_S": "1",
           "MERGELINE_RETENTION_DAYS": str(RETENTION_S / 86400), "MERGELINE_WEBHOOK_ALLOW_PRIVATE": "true",
           "MERGELINE_WEBHOOK_BACKOFF_S": "0.2", "MERGELINE_RATE_LIMIT": "100000",
           "MERGELINE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs: list[Proc] = []
    try:
        api, url = start_api(env, logs)
        procs.append(api)
        procs.append(start_worker(env, logs, "worker"))
        yield {"url": url, "env": env, "logs": logs, "inputs": inputs, "store": store, "prefix": prefix}
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture
def acme(cluster):
    with MergelineClient(cluster["url"], "tok-acme") as client:
        yield client


def run(client: MergelineClient, body: dict) -> dict:
    job = client.wait(client.submit(body)["id"], timeout=180, poll=0.2)
    assert job["status"] == "succeeded", job["error"]
    return job


def merge(inputs: dict, lineage: str, i: int, **extra) -> dict:
    """A task-arithmetic job merging task i (deterministic, so two lineages can be compared tensor by tensor)."""
    return spec(inputs, lineage, [task(inputs, i)], method="task_arithmetic", **extra)


def weights(client: MergelineClient, lineage: str, version: int, dest: Path) -> dict:
    client.download_version(lineage, version, dest)
    return load_file(dest / "model.safetensors")


def file_shas(manifest: dict, only: tuple[str, ...] = ("model.safetensors", "state.safetensors")) -> dict:
    return {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] in only}


def test_rollback_waits_its_turn_and_the_next_job_merges_onto_k(cluster, acme, receiver, tmp_path):
    inputs = cluster["inputs"]
    hook_url, received = receiver
    first = run(acme, merge(inputs, "roll", 0, metadata={"run": "r1", "team": "vision"}))
    assert first["metadata"] == {"run": "r1", "team": "vision"}
    assert first["result"]["manifest"]["metadata"] == {"run": "r1", "team": "vision"}
    # Two more jobs (one running, one queued behind it), then the rollback, which waits behind both; the second job
    # has a webhook asking for every event.
    acme.submit(spec(inputs, "roll", [task(inputs, 1)], steps=30, with_base=False))
    second = acme.submit(merge(inputs, "roll", 2, with_base=False,
                               webhook={"url": hook_url, "secret": SECRET, "events": ["job.running", "job.succeeded"]}))
    rolled = acme.rollback("roll", 1)
    assert acme.get(second["id"])["status"] == "succeeded", "the rollback ran after the jobs queued before it"
    v1 = acme.manifest("roll", 1)
    assert (rolled["version"], rolled["parent"], rolled["rollback_of"]) == (4, 3, 1)
    assert {f["path"]: f["sha256"] for f in rolled["files"]} == {f["path"]: f["sha256"] for f in v1["files"]}
    assert acme.lineage("roll")["head"] == 4

    after = run(acme, merge(inputs, "roll", 2, with_base=False))
    assert after["result"]["version"] == 5
    assert set(after["result"]["metrics"]["tasks"]) == {"task0", "task2"}, "task1 and task2 were rolled back"
    run(acme, merge(inputs, "straight", 0))
    run(acme, merge(inputs, "straight", 2, with_base=False))
    rolled_on, straight = weights(acme, "roll", 5, tmp_path / "a"), weights(acme, "straight", 2, tmp_path / "b")
    assert rolled_on.keys() == straight.keys()
    assert all((rolled_on[k] == straight[k]).all() for k in straight), "v5 = task2 merged onto v1's weights"

    with pytest.raises(ApiError) as info:
        acme.rollback("roll", 9)
    assert info.value.status == 404
    with pytest.raises(ApiError) as info:
        acme.rollback("nosuch", 1)
    assert info.value.status == 404

    # Standard Webhooks: signed deliveries of exactly the events asked for, verified by the library.
    deadline = time.monotonic() + 30
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = [Webhook(SECRET).verify(body, headers) for headers, body in received]
    assert [(e["type"], e["data"]["id"]) for e in events] == [("job.running", second["id"]),
                                                              ("job.succeeded", second["id"])]


def test_webhook_event_filter_is_honoured(cluster, acme):
    inputs = cluster["inputs"]
    with hook_receiver() as (url, received):
        quiet = run(acme, merge(inputs, "hooks", 0, webhook={"url": url, "secret": "plain", "events": ["job.failed"]}))
        failing = acme.wait(acme.submit(spec(inputs, "hooks", [{"name": "x", "checkpoint": "file:///etc/hostname"}],
                                             method="task_arithmetic", with_base=False,
                                             webhook={"url": url, "secret": "plain"}))["id"], timeout=120)
        assert failing["status"] == "failed"
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a stray delivery for the succeeded job would have arrived by now
    verifier = Webhook(base64.b64encode(b"plain").decode())  # a plain secret signs with its UTF-8 bytes
    events = [verifier.verify(body, headers) for headers, body in received]
    assert [(e["type"], e["data"]["id"]) for e in events] == [("job.failed", failing["id"])]
    assert quiet["id"] not in json.dumps(events)


def test_fork_copies_k_and_lives_on_its_own(cluster, acme, tmp_path):
    inputs = cluster["inputs"]
    run(acme, merge(inputs, "source", 0))
    run(acme, merge(inputs, "source", 1, with_base=False))
    fork = acme.fork("source", 2, "source-fork")
    assert fork["head"] == 1 and fork["forked_from"] == {"lineage": "source", "version": 2}
    v1 = fork["versions"][0]
    assert v1["forked_from"] == {"lineage": "source", "version": 2}
    assert file_shas(v1) == file_shas(acme.manifest("source", 2)) and len(file_shas(v1)) == 2
    with pytest.raises(ApiError) as info:
        acme.fork("source", 1, "source-fork")
    assert info.value.status == 409
    grown = run(acme, merge(inputs, "source-fork", 2, with_base=False))
    assert grown["result"]["version"] == 2
    assert set(grown["result"]["metrics"]["tasks"]) == {"task0", "task1", "task2"}, "the fork measures k's tasks"
    assert acme.lineage("source")["head"] == 2, "the source does not move"


def test_delete_is_a_404_keeps_the_name_until_the_purge_removes_the_files(cluster, acme):
    inputs = cluster["inputs"]
    run(acme, merge(inputs, "doomed", 0))
    folder = cluster["store"] / "acme" / "doomed"
    assert (folder / "v1" / "model.safetensors").exists()
    deleted = acme.delete_lineage("doomed")
    assert deleted["name"] == "doomed" and {"deleted_at", "purge_after"} <= deleted.keys()
    for call in (lambda: acme.lineage("doomed"), lambda: acme.manifest("doomed", 1),
                 lambda: acme.rollback("doomed", 1), lambda: acme.delete_lineage("doomed")):
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.status == 404
    assert "doomed" not in [lin["name"] for lin in acme.lineages(limit=100)["data"]]
    files = httpx.get(f"{cluster['url']}/v1/lineages/doomed/versions/1/files/model.safetensors",
                      headers={"Authorization": "Bearer tok-acme"})
    assert files.status_code == 404
    run(acme, merge(inputs, "keeper", 0))
    with pytest.raises(ApiError) as info:
        acme.fork("keeper", 1, "doomed")
    assert info.value.status == 409, "the name stays taken until the purge"
    reused = acme.wait(acme.submit(merge(inputs, "doomed", 0))["id"], timeout=120)
    assert reused["status"] == "failed" and reused["error"]["type"] == "conflict", reused

    deadline = time.monotonic() + RETENTION_S + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folder.exists(), "the worker's housekeeping purged every file"
    assert run(acme, merge(inputs, "doomed", 0))["result"]["version"] == 1, "the name is free after the purge"


def test_lineage_uris_reuse_a_version_within_the_tenant_only(cluster, acme):
    inputs = cluster["inputs"]
    source = run(acme, merge(inputs, "reusable", 0))["result"]["manifest"]
    model_sha = file_shas(source)["model.safetensors"]
    reuse = run(acme, spec(inputs, "reuser", [{"name": "prev", "checkpoint": "lineage://reusable@1"}],
                           method="task_arithmetic"))
    record = reuse["result"]["manifest"]["tasks"][0]
    assert record["checkpoint"] == "lineage://reusable@1" and record["sha256"] == model_sha
    as_base = run(acme, spec(inputs, "on-reused", [task(inputs, 1)], method="task_arithmetic",
                             base_uri="lineage://reusable@1"))
    assert as_base["result"]["manifest"]["base"]["sha256"] == model_sha

    errors = {}
    with MergelineClient(cluster["url"], "tok-globex") as globex:
        for case, uri in (("other tenant", "lineage://reusable@1"), ("missing", "lineage://unknown@1")):
            body = spec(inputs, f"steal-{len(errors)}", [{"name": "x", "checkpoint": uri}], method="task_arithmetic")
            job = globex.wait(globex.submit(body)["id"], timeout=120)
            assert job["status"] == "failed"
            errors[case] = {**job["error"], "message": job["error"]["message"].replace(uri, "URI")}
    missing_version = acme.wait(acme.submit(spec(inputs, "steal-x", [{"name": "x", "checkpoint": "lineage://reusable@7"}],
                                                 method="task_arithmetic"))["id"], timeout=120)["error"]
    assert errors["other tenant"] == errors["missing"], "another tenant's lineage looks exactly like a missing one"
    assert errors["missing"]["type"] == missing_version["type"] == "fetch_failed"


def test_cli_rollback_fork_delete_through_the_api(cluster, acme):
    from typer.testing import CliRunner

    from mergeline.cli import app as cli

    run(acme, merge(cluster["inputs"], "cli-ops", 0))
    run(acme, merge(cluster["inputs"], "cli-ops", 1, with_base=False))
    api = ["--url", cluster["url"], "--token", "tok-acme", "--json"]
    rolled = CliRunner().invoke(cli, ["lineage", "rollback", "cli-ops", "1", *api])
    assert rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.output)["rollback_of"] == 1
    forked = CliRunner().invoke(cli, ["lineage", "fork", "cli-ops@3", "cli-ops-fork", *api])
    assert forked.exit_code == 0, forked.output
    assert json.loads(forked.output)["forked_from"] == {"lineage": "cli-ops", "version": 3}
    gone = CliRunner().invoke(cli, ["lineage", "delete", "cli-ops", *api])
    assert gone.exit_code == 0 and json.loads(gone.output)["name"] == "cli-ops", gone.output
    again = CliRunner().invoke(cli, ["lineage", "delete", "cli-ops", "--url", cluster["url"], "--token", "tok-acme"])
    assert again.exit_code == 1 and "not_found" in again.output


# -- an API whose queue no worker reads: submission-time checks and limits ------------------------------------------
def quiet_api(cluster, **settings: str) -> tuple[Proc, str]:
    env = {**cluster["env"], "MERGELINE_KEY_PREFIX": f"q{uuid.uuid4().hex[:8]}", "MERGELINE_QUEUE": "nobody-reads",
           **{f"MERGELINE_{k.upper()}": v for k, v in settings.items()}}
    env.pop("MERGELINE_WEBHOOK_ALLOW_PRIVATE")
    return start_api(env, cluster["logs"])


def test_metadata_filters_the_job_list(cluster):
    api, url = quiet_api(cluster)
    try:
        with MergelineClient(url, "tok-acme") as client:
            inputs = cluster["inputs"]
            ids = {}
            tagged = {"a": {"run": "1", "team": "x"}, "b": {"run": "2", "team": "x"}, "c": {"run": "1"}}
            for name, tags in tagged.items():
                ids[name] = client.submit(merge(inputs, "meta", 0, metadata=tags))["id"]
            client.submit(merge(inputs, "meta", 1))

            def listed(**metadata):
                return [j["id"] for j in client.list(metadata=metadata, limit=100)["data"]]

            assert listed(run="1") == [ids["c"], ids["a"]]
            assert listed(team="x") == [ids["b"], ids["a"]]
            assert listed(run="1", team="x") == [ids["a"]]
            assert listed(run="3") == []
            assert client.get(ids["b"])["metadata"] == {"run": "2", "team": "x"}
            bad = httpx.get(f"{url}/v1/jobs", params={"metadata.Bad Key": "1"},
                            headers={"Authorization": "Bearer tok-acme"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.Bad Key"
            with pytest.raises(ApiError) as info:
                client.submit(merge(inputs, "meta", 0, metadata={"k": "v" * 513}))
            assert info.value.status == 422 and info.value.param == "metadata.k"
        with MergelineClient(url, "tok-globex") as globex:
            assert globex.list(metadata={"run": "1"})["data"] == []
    finally:
        api.stop()


def test_private_webhook_targets_are_refused_at_submission(cluster):
    api, url = quiet_api(cluster)
    try:
        with MergelineClient(url, "tok-acme") as client:
            for target in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                           "http://localhost/hook", "http://[::1]/hook"):
                body = merge(cluster["inputs"], "hooked", 0, webhook={"url": target, "secret": "s"})
                with pytest.raises(ApiError) as info:
                    client.submit(body)
                assert (info.value.status, info.value.param) == (400, "webhook.url"), target
            assert client.list()["data"] == [], "nothing was created"
    finally:
        api.stop()


def test_rate_limit_is_shared_by_api_replicas_and_per_tenant(cluster):
    env = {"MERGELINE_KEY_PREFIX": f"rl{uuid.uuid4().hex[:8]}", "MERGELINE_RATE_LIMIT": "6"}
    replicas = [start_api({**cluster["env"], **env}, cluster["logs"]) for _ in range(2)]
    try:
        acme = {"Authorization": "Bearer tok-acme"}
        answers = [httpx.get(f"{replicas[i % 2][1]}/v1/jobs", headers=acme) for i in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        over = httpx.get(f"{replicas[0][1]}/v1/jobs", headers=acme)
        assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        assert httpx.get(f"{replicas[1][1]}/v1/lineages", headers=acme).status_code == 429
        assert httpx.get(f"{replicas[1][1]}/v1/jobs", headers={"Authorization": "Bearer tok-globex"}).status_code == 200
    finally:
        for proc, _ in replicas:
            proc.stop()


def test_active_job_cap(cluster):
    api, url = quiet_api(cluster, max_active_jobs="2")
    inputs = cluster["inputs"]
    try:
        with MergelineClient(url, "tok-acme") as client, MergelineClient(url, "tok-globex") as globex:
            first = client.submit(merge(inputs, "capped", 0))
            client.submit(merge(inputs, "capped-2", 0))
            with pytest.raises(ApiError) as info:
                client.submit(merge(inputs, "capped-3", 0))
            assert (info.value.status, info.value.type) == (429, "rate_limited") and info.value.retry_after > 0
            assert globex.submit(merge(inputs, "capped", 0))["status"] == "queued", "the cap is per tenant"
            client.cancel(first["id"])
            assert client.submit(merge(inputs, "capped-3", 0))["status"] == "queued", "a finished job frees a slot"
    finally:
        api.stop()


def test_an_operation_that_never_gets_its_turn_changes_nothing(cluster, acme):
    run(acme, merge(cluster["inputs"], "busy", 0))
    api, url = quiet_api(cluster, lineage_op_timeout_s="1")  # its queue has no worker: the turn never comes
    try:
        with MergelineClient(url, "tok-acme") as client:
            with pytest.raises(ApiError) as info:
                client.rollback("busy", 1)
            assert (info.value.status, info.value.type) == (409, "conflict")
            with pytest.raises(ApiError) as info:
                client.delete_lineage("busy")
            assert info.value.status == 409
    finally:
        api.stop()
    assert acme.lineage("busy")["head"] == 1
