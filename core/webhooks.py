"""Webhooks (Standard Webhooks): `{"type": "job.succeeded", "timestamp", "data": <Job>}` POSTed to the spec's URL
for each event it asks for (default: the final ones; `job.running` on request), with the headers `webhook-id` (the
same on every retry), `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
(signed with the `standardwebhooks` library), and, for receivers written against contract §3,
`X-Mergeline-Signature: sha256=<hex HMAC-SHA256 of the body under the secret's UTF-8 bytes>`.

A finished job only enqueues a delivery in Redis; a delivery thread in every worker process sends due deliveries
and reschedules failures with exponential backoff. So a slow or dead receiver never delays the next job, and a
delivery outlives the worker that enqueued it (a claimed delivery whose sender died becomes due again).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import redis
from redis.exceptions import RedisError, WatchError

from core.addresses import check_public_host
from core.errors import MergelineError
from core.ids import utc_now
from core.jobs import public_job
from core.settings import Settings
from core.spec import DEFAULT_WEBHOOK_EVENTS, webhook_key

log = logging.getLogger("mergeline.webhooks")
SIGNATURE_HEADER = "X-Mergeline-Signature"
MAX_BACKOFF_S = 3600.0

OnOutcome = Callable[[str, str, str, dict], None]  # (job_id, event type, message, data)


def notify_webhook(queue: WebhookQueue) -> Callable[[dict], None]:
    """The JobStore hook (a job started, or ended) that enqueues the event for the spec's webhook, if it has one and
    asks for that event."""

    def hook(record: dict) -> None:
        webhook = json.loads(record.get("spec") or "{}").get("webhook")
        event = f"job.{record['status']}"
        if webhook and event in webhook.get("events", DEFAULT_WEBHOOK_EVENTS):
            queue.enqueue(webhook["url"], webhook["secret"], public_job(record), event)

    return hook


def standard_headers(secret: str, delivery_id: str, body: bytes, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt to send `body`."""
    from standardwebhooks import Webhook

    at = at or datetime.now(UTC)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(webhook_key(secret)).sign(delivery_id, at, body.decode())}


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """For receivers: constant-time check of a delivery's signature header."""
    return hmac.compare_digest(sign(secret, body), signature or "")


class WebhookQueue:
    def __init__(self, client: redis.Redis, prefix: str, *, timeout_s: float = 10.0, max_attempts: int = 8,
                 backoff_s: float = 2.0, allow_private: bool = False, on_outcome: OnOutcome | None = None):
        self.r = client
        self.due_key = f"{prefix}:webhooks"
        self.p = prefix
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.allow_private = allow_private
        self.on_outcome = on_outcome

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings, on_outcome: OnOutcome | None = None):
        return cls(client, settings.key_prefix, timeout_s=settings.webhook_timeout_s,
                   max_attempts=settings.webhook_max_attempts, backoff_s=settings.webhook_backoff_s,
                   allow_private=settings.webhook_allow_private, on_outcome=on_outcome)

    def _delivery(self, delivery_id: str) -> str:
        return f"{self.p}:webhook:{delivery_id}"

    def enqueue(self, url: str, secret: str, job: dict, event: str = "job.succeeded") -> str:
        """Schedule the delivery of `event` about `job` (sent as soon as a delivery thread is free)."""
        delivery_id = f"msg_{uuid.uuid4().hex}"
        body = json.dumps({"type": event, "timestamp": utc_now(), "data": job}, separators=(",", ":"),
                          sort_keys=True)
        with self.r.pipeline() as pipe:
            pipe.hset(self._delivery(delivery_id), mapping={
                "url": url, "secret": secret, "body": body, "job_id": job["id"], "attempts": "0"})
            pipe.expire(self._delivery(delivery_id), 7 * 86400)
            pipe.zadd(self.due_key, {delivery_id: time.time()})
            pipe.execute()
        return delivery_id

    def _claim(self, delivery_id: str, now: float) -> bool:
        """Push a due delivery's time past its send timeout, so that exactly one thread sends it now."""
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self.due_key)
                score = pipe.zscore(self.due_key, delivery_id)
                if score is None or score > now:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.zadd(self.due_key, {delivery_id: now + self.timeout_s + 30})
                pipe.execute()
                return True
            except WatchError:
                return False

    def deliver_due(self, client: httpx.Client | None = None) -> int:
        """Send every due delivery once; returns how many were attempted."""
        now = time.time()
        due = self.r.zrangebyscore(self.due_key, "-inf", now, start=0, num=50)
        attempted = 0
        owns_client = client is None
        client = client or httpx.Client(timeout=self.timeout_s, follow_redirects=False)
        try:
            for delivery_id in due:
                if self._claim(delivery_id, now):
                    attempted += 1
                    self._send(client, delivery_id)
        finally:
            if owns_client:
                client.close()
        return attempted

    def _send(self, client: httpx.Client, delivery_id: str) -> None:
        item = self.r.hgetall(self._delivery(delivery_id))
        if not item:
            self.r.zrem(self.due_key, delivery_id)
            return
        attempts = int(item["attempts"]) + 1
        body = item["body"].encode()
        try:
            if not self.allow_private:
                check_public_host(urllib.parse.urlsplit(item["url"]).hostname or "", item["url"], "webhook.url")
        except MergelineError as exc:
            self._give_up(delivery_id, item, f"refused: {exc.message}")
            return
        try:
            response = client.post(item["url"], content=body, headers={
                "Content-Type": "application/json", SIGNATURE_HEADER: sign(item["secret"], body),
                "User-Agent": "mergeline-webhooks", "X-Mergeline-Delivery": delivery_id,
                **standard_headers(item["secret"], delivery_id, body)})
            outcome = f"HTTP {response.status_code}"
            ok = 200 <= response.status_code < 300
        except httpx.HTTPError as exc:
            outcome, ok = f"{type(exc).__name__}: {exc}", False
        if ok:
            self.r.delete(self._delivery(delivery_id))
            self.r.zrem(self.due_key, delivery_id)
            log.info("webhook delivered", extra={"job_id": item["job_id"], "attempt": attempts})
            self._report(item, "webhook_delivered", f"webhook delivered ({outcome})", {"attempts": attempts})
            return
        if attempts >= self.max_attempts:
            self._give_up(delivery_id, item, f"{outcome} after {attempts} attempts")
            return
        delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 1)) * random.uniform(0.8, 1.2)
        with self.r.pipeline() as pipe:
            pipe.hset(self._delivery(delivery_id), "attempts", str(attempts))
            pipe.zadd(self.due_key, {delivery_id: time.time() + delay})
            pipe.execute()
        log.warning("webhook attempt failed", extra={"job_id": item["job_id"], "attempt": attempts,
                                                     "reason": outcome, "retry_in_s": round(delay, 2)})

    def _give_up(self, delivery_id: str, item: dict, reason: str) -> None:
        self.r.delete(self._delivery(delivery_id))
        self.r.zrem(self.due_key, delivery_id)
        log.error("webhook abandoned", extra={"job_id": item["job_id"], "reason": reason})
        self._report(item, "webhook_failed", f"webhook abandoned: {reason}", {})

    def _report(self, item: dict, type: str, message: str, data: dict) -> None:
        if self.on_outcome is not None:
            with contextlib.suppress(RedisError, MergelineError):
                self.on_outcome(item["job_id"], type, message, data)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """The delivery loop (a daemon thread in each worker): survives Redis outages by waiting them out."""
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            while not stop.is_set():
                try:
                    if self.deliver_due(client):
                        continue
                except RedisError as exc:
                    log.warning("webhook loop: Redis unavailable", extra={"reason": str(exc)})
                    stop.wait(2.0)
                stop.wait(interval_s)
