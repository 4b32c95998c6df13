"""Webhook signing, delivery with retries to a real loopback HTTP receiver, and the Redis-kept metrics."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from svc_procs import hook_receiver

from core.jobs import connect
from core.metrics import RedisMetrics, ServiceCollector, render
from core.webhooks import SIGNATURE_HEADER, WebhookQueue, notify_webhook, sign, standard_headers, verify

JOB = {"id": "job_01TEST", "lineage": "vision", "status": "succeeded", "method": "otmf", "created_at": "t",
       "started_at": "t", "finished_at": "t", "progress": None, "result": {"version": 1}, "error": None}


@pytest.fixture
def receiver():
    """A loopback HTTP server that fails its first `fail` requests with 500, then answers 204."""
    state = {"fail": 2}

    def status() -> int:
        state["fail"] -= 1
        return 500 if state["fail"] >= 0 else 204

    with hook_receiver(status) as (url, received):
        state.update(url=url, received=received)
        yield state


def test_sign_and_verify():
    body = b'{"id":"job_1"}'
    signature = sign("s3cr3t", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify("s3cr3t", body, signature)
    assert not verify("other", body, signature) and not verify("s3cr3t", body + b" ", signature)


def test_standard_webhooks_signature_and_whsec_secrets():
    body = b'{"type":"job.failed"}'
    key = base64.b64encode(b"\x00\x01binary key").decode()
    for secret, verifier in ((f"whsec_{key}", f"whsec_{key}"), ("plain", base64.b64encode(b"plain").decode())):
        headers = standard_headers(secret, "msg_1", body)
        assert headers["webhook-signature"].startswith("v1,")
        assert Webhook(verifier).verify(body, headers) == {"type": "job.failed"}
        with pytest.raises(WebhookVerificationError):
            Webhook(verifier).verify(body + b" ", headers)
        stale = standard_headers(secret, "msg_1", body, datetime.now(UTC) - timedelta(minutes=6))
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(verifier).verify(body, stale)


def test_the_event_filter_picks_what_is_enqueued(redis_db, prefix):
    queue = WebhookQueue(connect(redis_db), prefix)
    hook = notify_webhook(queue)
    default = json.dumps({"webhook": {"url": "https://x.example/h", "secret": "s"}})
    running = json.dumps({"webhook": {"url": "https://x.example/h", "secret": "s", "events": ["job.running"]}})
    for spec in (default, running):
        for status in ("running", "succeeded", "failed", "cancelled"):
            hook({"id": "job_01TEST", "lineage": "vision", "method": "otmf", "created_at": "t", "status": status,
                  "spec": spec})
    bodies = [json.loads(queue.r.hget(queue._delivery(d), "body")) for d in queue.r.zrange(queue.due_key, 0, -1)]
    types = sorted(b["type"] for b in bodies)
    assert types == ["job.cancelled", "job.failed", "job.running", "job.succeeded"]


def test_delivery_is_signed_and_retried_with_backoff(redis_db, prefix, receiver):
    outcomes = []
    queue = WebhookQueue(connect(redis_db), prefix, backoff_s=0.1, max_attempts=5, allow_private=True,
                         on_outcome=lambda *a: outcomes.append(a))
    queue.enqueue(receiver["url"], "s3cr3t", JOB)
    stop = threading.Event()
    thread = threading.Thread(target=queue.run, args=(stop, 0.02), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not outcomes and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert [o[1] for o in outcomes] == ["webhook_delivered"] and outcomes[0][3] == {"attempts": 3}
    assert len(receiver["received"]) == 3
    headers, body = receiver["received"][-1]
    event = Webhook(base64.b64encode(b"s3cr3t").decode()).verify(body, headers)  # Standard Webhooks
    assert event["type"] == "job.succeeded" and event["data"] == JOB
    assert verify("s3cr3t", body, headers[SIGNATURE_HEADER])
    assert len({h["webhook-id"] for h, _ in receiver["received"]}) == 1, "retries keep the message id"
    assert queue.r.zcard(queue.due_key) == 0


def test_private_receivers_are_refused_unless_allowed(redis_db, prefix, receiver):
    outcomes = []
    queue = WebhookQueue(connect(redis_db), prefix, allow_private=False, on_outcome=lambda *a: outcomes.append(a))
    queue.enqueue(receiver["url"], "s", JOB)
    assert queue.deliver_due() == 1
    assert receiver["received"] == [] and outcomes[0][1] == "webhook_failed" and "non-public" in outcomes[0][2]


def test_give_up_after_max_attempts(redis_db, prefix, receiver):
    receiver["fail"] = 100
    outcomes = []
    queue = WebhookQueue(connect(redis_db), prefix, backoff_s=0.01, max_attempts=2, allow_private=True,
                         on_outcome=lambda *a: outcomes.append(a))
    queue.enqueue(receiver["url"], "s", JOB)
    for _ in range(50):
        queue.deliver_due()
        if outcomes:
            break
        time.sleep(0.02)
    assert len(receiver["received"]) == 2 and outcomes[0][1] == "webhook_failed"


def test_metrics_from_several_processes_add_up(redis_db, prefix):
    client = connect(redis_db)
    for value in (0.02, 0.2, 3.0):
        RedisMetrics(client, prefix).observe("step_duration_seconds", value)
    RedisMetrics(client, prefix).observe("job_duration_seconds", 12.0, status="succeeded")
    RedisMetrics(client, prefix).inc("store_bytes_written", 2048)

    class Jobs:
        def counts(self):
            return {"queued": 2, "running": 1, "succeeded": 5, "failed": 0, "cancelled": 1}

    text = render(ServiceCollector(Jobs(), RedisMetrics(client, prefix), lambda: 7)).decode()
    assert 'mergeline_step_duration_seconds_bucket{le="0.25"} 2.0' in text
    assert "mergeline_step_duration_seconds_count 3.0" in text
    assert 'mergeline_job_duration_seconds_count{status="succeeded"} 1.0' in text
    assert "mergeline_store_bytes_written_total 2048.0" in text
    assert "mergeline_queue_depth 2.0" in text and "mergeline_broker_messages 7.0" in text
