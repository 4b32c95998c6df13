"""Job records and the per-lineage queue, against the real Redis."""

from __future__ import annotations

import time

import pytest

from core.errors import BadRequest, Conflict, NotFound
from core.jobs import JobStore, connect, public_job
from core.spec import parse_job_spec

BASE = {"family": "open_clip", "arch": "ViT-B-32", "uri": "file:///data/base.safetensors"}


def spec_body(lineage: str = "vision", task: str = "mnist") -> dict:
    return {"lineage": lineage, "base": BASE, "method": "task_arithmetic",
            "tasks": [{"name": task, "checkpoint": f"file:///data/{task}.safetensors"}]}


@pytest.fixture
def sent() -> list[str]:
    return []


@pytest.fixture
def jobs(redis_db, prefix, sent) -> JobStore:
    store = JobStore(connect(redis_db), prefix, lease_ttl_s=1.0, max_attempts=2, send=sent.append)
    yield store
    store.r.close()


def submit(jobs: JobStore, tenant: str = "acme", key: str | None = None, **kw) -> dict:
    body = spec_body(**kw)
    record, _ = jobs.create(tenant, parse_job_spec(body), body, idempotency_key=key)
    return record


def test_create_get_and_public_shape(jobs, sent):
    record = submit(jobs)
    job = public_job(jobs.get("acme", record["id"]))
    assert job["status"] == "queued" and job["lineage"] == "vision" and job["method"] == "task_arithmetic"
    assert set(job) == {"id", "lineage", "status", "method", "created_at", "started_at", "finished_at", "progress",
                        "result", "error", "metadata"}
    assert sent == [record["id"]], "the first job of a lineage is sent at once"
    assert [e["type"] for e in jobs.events("acme", record["id"])] == ["queued"]


def test_another_tenant_sees_nothing(jobs):
    record = submit(jobs, tenant="acme")
    with pytest.raises(NotFound):
        jobs.get("globex", record["id"])
    with pytest.raises(NotFound):
        jobs.request_cancel("globex", record["id"])
    assert jobs.list("globex") == ([], False)


def test_idempotency_key(jobs):
    first = submit(jobs, key="k-1")
    again, created = jobs.create("acme", parse_job_spec(spec_body()), spec_body(), idempotency_key="k-1")
    assert not created and again["id"] == first["id"]
    with pytest.raises(Conflict) as info:
        jobs.create("acme", parse_job_spec(spec_body(task="svhn")), spec_body(task="svhn"), idempotency_key="k-1")
    assert info.value.param == "Idempotency-Key"
    other, created = jobs.create("globex", parse_job_spec(spec_body()), spec_body(), idempotency_key="k-1")
    assert created and other["id"] != first["id"], "keys are per tenant"
    assert 0 < jobs.r.ttl(next(jobs.r.scan_iter(f"{jobs.p}:idem:acme:*"))) <= 24 * 3600


def test_listing_newest_first_with_cursor_and_filters(jobs):
    ids = [submit(jobs, lineage=f"l{i % 2}")["id"] for i in range(5)]
    page, more = jobs.list("acme", limit=2)
    assert [r["id"] for r in page] == ids[::-1][:2] and more
    page2, more2 = jobs.list("acme", limit=10, after=page[-1]["id"])
    assert [r["id"] for r in page2] == ids[::-1][2:] and not more2
    l0, _ = jobs.list("acme", lineage="l0")
    assert [r["id"] for r in l0] == [ids[4], ids[2], ids[0]]
    jobs.request_cancel("acme", ids[1])
    cancelled, _ = jobs.list("acme", status="cancelled")
    assert [r["id"] for r in cancelled] == [ids[1]]
    with pytest.raises(BadRequest):
        jobs.list("acme", after="job_NOPE")


def test_lineage_runs_one_job_at_a_time_in_order(jobs, sent):
    a, b = submit(jobs), submit(jobs)
    assert sent == [a["id"]], "a job with one ahead of it waits for that one to finish"
    assert jobs.acquire(b["id"], "t-b").state == "waiting"
    got = jobs.acquire(a["id"], "t-a")
    assert got.state == "acquired" and got.record["status"] == "running"
    assert jobs.acquire(a["id"], "t-other").state == "leased", "a second attempt cannot run a leased job"
    assert jobs.finish(a["id"], "t-wrong", "succeeded", result={"version": 1}) is None
    final = jobs.finish(a["id"], "t-a", "succeeded", result={"version": 1, "manifest": {}, "metrics": {}})
    assert final["status"] == "succeeded"
    assert jobs.kick("acme", "vision") == b["id"]
    assert jobs.acquire(b["id"], "t-b").state == "acquired"
    assert jobs.acquire(a["id"], "t-a2").state == "final", "a duplicate message of a finished job does nothing"


def test_lapsed_lease_is_resent_then_fails_worker_lost(jobs, sent):
    job = submit(jobs)
    assert jobs.acquire(job["id"], "t1").state == "acquired"
    sent.clear()
    assert jobs.reconcile(throttle_ms=10) == [], "a live lease is left alone"
    time.sleep(1.2)  # the worker "died": its lease lapses
    assert jobs.reconcile(throttle_ms=10) == [job["id"]]
    second = jobs.acquire(job["id"], "t2")
    assert second.state == "acquired" and second.record["attempts"] == "2"
    assert "worker_lost" in [e["type"] for e in jobs.events("acme", job["id"])]
    time.sleep(1.2)
    lost = jobs.acquire(job["id"], "t3")
    assert lost.state == "worker_lost"
    record = jobs.get("acme", job["id"])
    assert record["status"] == "failed" and public_job(record)["error"]["type"] == "worker_lost"
    assert jobs.r.zcard(f"{jobs.p}:lq:acme:vision") == 0


def test_cancel_queued_is_immediate_and_running_is_flagged(jobs):
    a, b = submit(jobs), submit(jobs)
    assert jobs.request_cancel("acme", b["id"])["status"] == "cancelled"
    jobs.acquire(a["id"], "t")
    running = jobs.request_cancel("acme", a["id"])
    assert running["status"] == "running"
    assert jobs.update_progress(a["id"], {"task_index": 0, "tasks_total": 1, "step": 1, "steps_total": 2,
                                          "loss": 0.5}) is True
    assert jobs.counts()["cancelled"] == 1 and jobs.counts()["running"] == 1


def test_final_hook_runs_once(jobs):
    finals = []
    jobs.on_final = finals.append
    job = submit(jobs)
    jobs.acquire(job["id"], "t")
    jobs.finish(job["id"], "t", "failed", error={"type": "fetch_failed", "message": "x"})
    jobs.finish(job["id"], "t", "succeeded")
    assert [f["status"] for f in finals] == ["failed"]
    assert jobs.r.ttl(f"{jobs.p}:job:{job['id']}") > 0, "finished records expire"


def test_a_vanished_record_is_never_recreated_and_a_partial_one_reads_as_absent(jobs):
    """Redis came back empty while the job ran: the worker's progress and events do not re-create its keys."""
    from core.jobs import RecordLost

    record = submit(jobs)
    assert jobs.acquire(record["id"], "tok").state == "acquired"
    jobs.r.delete(jobs._job(record["id"]), jobs._events(record["id"]))
    with pytest.raises(RecordLost):
        jobs.update_progress(record["id"], {"step": 1})
    with pytest.raises(RecordLost):
        jobs.add_event(record["id"], "task_started", "x")
    assert not jobs.r.exists(jobs._job(record["id"]), jobs._events(record["id"]))
    jobs.r.hset(jobs._job(record["id"]), "progress", "{}")  # a stray partial hash, as older writers left
    with pytest.raises(NotFound):
        jobs.get("acme", record["id"])
    assert jobs.list("acme") == ([], False)
    final = jobs.record_lost(record, "failed", error={"type": "job_lost", "message": "gone"})
    assert final is None, "a record that exists (even partial) is never overwritten"
    jobs.r.delete(jobs._job(record["id"]))
    jobs.record_lost(record, "failed", error={"type": "job_lost", "message": "gone"})
    shown = public_job(jobs.get("acme", record["id"]))
    assert shown["status"] == "failed" and shown["error"]["type"] == "job_lost"
    assert jobs.r.ttl(jobs._job(record["id"])) > 0


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_cancel_landing_after_the_record_vanished_writes_nothing(jobs, monkeypatch, status):
    """Redis comes back empty between the cancel's read and its write: the cancel finds no job, and leaves no
    partial hash or event list behind (a partial hash would also stop the worker recording how the job ended)."""
    record = submit(jobs)
    if status == "running":
        record = jobs.acquire(record["id"], "tok").record
    read = jobs.get

    def read_then_lose(tenant: str, job_id: str) -> dict:
        found = read(tenant, job_id)
        jobs.r.delete(jobs._job(job_id), jobs._events(job_id))  # what a restart without persistence leaves
        return found

    monkeypatch.setattr(jobs, "get", read_then_lose)
    with pytest.raises(NotFound):
        jobs.request_cancel("acme", record["id"])
    assert not jobs.r.exists(jobs._job(record["id"]), jobs._events(record["id"]))
    final = jobs.record_lost(record, "cancelled", error={"type": "cancelled", "message": "cancelled"})
    assert final is not None and final["status"] == "cancelled"


def test_a_job_is_not_sent_again_while_its_message_waits(jobs, sent):
    record = submit(jobs)
    assert sent == [record["id"]]
    for _ in range(3):
        assert jobs.reconcile(throttle_ms=1) == []  # nothing took the message yet: no second one
        time.sleep(0.01)
    assert sent == [record["id"]]
    assert jobs.acquire(record["id"], "tok").state == "acquired"  # a worker took it ...
    time.sleep(1.1)  # ... and died: its lease lapses
    assert jobs.reconcile(throttle_ms=1) == [record["id"]] and sent == [record["id"]] * 2
