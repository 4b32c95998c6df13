"""Job records in Redis, and the per-lineage queue that runs a lineage's jobs one at a time in submission order.

Keys (all under the configured prefix P):
  P:job:{id}                 hash: the record (tenant, lineage, status, spec, progress, result, error, ...)
  P:job:{id}:events          list of JSON events, oldest first
  P:jobs:{tenant}            zset of the tenant's job ids by submission sequence (listing, newest first)
  P:jobs:{tenant}:l:{name}   the same, per lineage
  P:idem:{tenant}:{sha}      the job an Idempotency-Key created, with its body's hash (24 h)
  P:lq:{tenant}:{name}       zset of the lineage's unfinished jobs by sequence: the first one may run
  P:lease:{tenant}:{name}    "job_id:token" of the attempt running the lineage's first job; expires unless renewed
  P:active                   "tenant/name" of every lineage with unfinished jobs (swept by `reconcile`)
  P:sent:{id}                a message for the job is in the broker queue, not yet taken by a worker (expires)
  P:counts                   hash status -> number of jobs that are (or ended) in it
  P:open:{tenant}            set of the tenant's queued or running jobs (the active-job cap)
  P:jobs:{tenant}:m:{sha}    zset of the tenant's jobs carrying one metadata key=value (filtered listings)
  P:rate:{tenant}:{minute}   the tenant's requests in that minute (the rate limit)

A lineage operation (rollback, fork, delete) is an `op_...` record in the lineage queue, run by a worker under the
lineage lease like a job, so it waits behind the lineage's queued jobs; it is in no job listing or count.

Ordering: a job's Celery message is sent when it becomes the first of its lineage queue (at submission when
nothing is ahead of it, else by the job ahead when that one finishes). A worker runs a job only while it holds
the lineage lease; a worker that dies stops renewing it, and `reconcile` (run by every worker every few seconds)
re-sends the first job of any lineage whose lease has lapsed. A duplicate message is harmless: it finds the job
finished, not first, or leased, and does nothing; and a job is not re-sent while a message for it waits in the
broker queue (`P:sent:{id}`), so a lineage queued behind busy workers does not grow the queue.

A record that vanished (Redis restarted without its AOF) is never re-created piecemeal: worker-side writes go
through scripts that touch a job's keys only while its record exists, and a record missing any contract field reads
as absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import RedisError, WatchError

from core.errors import BadRequest, BrokerUnavailable, Conflict, NotFound, RateLimited
from core.ids import new_job_id, utc_now
from core.settings import Settings
from core.spec import JobSpec
from core.statuses import FINAL, STATUSES

log = logging.getLogger("mergeline.jobs")

IDEMPOTENCY_TTL_S = 24 * 3600
MAX_EVENTS = 5000
SENT_TTL_S = 600  # a message not taken by any worker this long is presumed lost, and the reconciler sends another
RECORD_FIELDS = ("id", "tenant", "lineage", "status", "method", "created_at")
# What a status read needs: the Job object's fields and the owner (not the spec, which can be large).
JOB_FIELDS = (*RECORD_FIELDS, "started_at", "finished_at", "progress", "result", "error", "metadata")
RATE_WINDOW_TTL_S = 120  # a minute's counter outlives its minute

# Set the progress only while the record exists; returns the cancel flag, or false when the record is gone.
_PROGRESS_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
return redis.call('HGET', KEYS[1], 'cancel') or '0'
"""
# Flag the job for cancellation only while the record exists; returns whether it did.
_CANCEL_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 1
"""
# Append an event (trimmed to the newest ARGV[2]) only while the record exists; returns whether it did.
_EVENT_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return 1
"""
# Count one request in the tenant's rate window KEYS[1] (kept ARGV[1] seconds); returns the count.
_COUNT_REQUEST = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
"""
# The same, and read the fields ARGV[2..] of the job record KEYS[2]: a status poll in one round trip.
_COUNT_AND_READ = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
local values = redis.call('HMGET', KEYS[2], unpack(ARGV, 2))
table.insert(values, 1, n)
return values
"""
ACTIVE_CAP_RETRY_AFTER_S = 30

Send = Callable[[str], None]


class RecordLost(Exception):
    """The job's record is gone from Redis (restarted without persistence): its attempt must stop."""


@dataclass(frozen=True)
class Acquired:
    """The outcome of `JobStore.acquire`: `state` is `acquired` (run it) or why not."""

    state: str  # acquired | missing | final | waiting | leased | cancelled | worker_lost
    record: dict | None = None


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis failures become BrokerUnavailable (503), never a 500."""
    try:
        yield
    except RedisError as exc:
        raise BrokerUnavailable(f"job store (Redis) unavailable: {type(exc).__name__}: {exc}") from None


_CLIENT_OPTIONS = {"decode_responses": True, "socket_connect_timeout": 5, "socket_timeout": 15,
                   "health_check_interval": 30, "retry_on_timeout": True}


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_CLIENT_OPTIONS)


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_complete(record: dict) -> bool:
    """A record with every field the contract's Job needs (not one a stray write left behind)."""
    return all(record.get(field) for field in RECORD_FIELDS)


def is_job_id(job_id: str) -> bool:
    return job_id.startswith("job_") and len(job_id) <= 64


def owned_job(record: dict | None, tenant: str, job_id: str) -> dict:
    """The record if it is the tenant's job; another tenant's job is as absent as a missing one."""
    if record is None or not is_complete(record) or record["tenant"] != tenant:
        raise NotFound(f"no job {job_id!r}", param="id")
    return record


def public_job(record: dict) -> dict:
    """The contract's Job object from a stored record (the spec, tenant and webhook secret stay inside)."""

    def load(field: str) -> Any:
        raw = record.get(field)
        return json.loads(raw) if raw else None

    return {
        "id": record["id"],
        "lineage": record["lineage"],
        "status": record["status"],
        "method": record["method"],
        "created_at": record["created_at"],
        "started_at": record.get("started_at") or None,
        "finished_at": record.get("finished_at") or None,
        "progress": load("progress"),
        "result": load("result"),
        "error": load("error"),
        "metadata": load("metadata") or {},
    }


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "mergeline", *, job_ttl_s: int = 30 * 86400,
                 lease_ttl_s: float = 30.0, max_attempts: int = 3, send: Send | None = None,
                 on_final: Callable[[dict], None] | None = None, max_active_jobs: int = 0, rate_limit: int = 0):
        self.r = client
        self.on_final = on_final
        self.on_started: Callable[[dict], None] | None = None  # called once, when a job first starts running
        self.max_active_jobs = max_active_jobs
        self.rate_limit = rate_limit
        self.p = prefix
        self.job_ttl_s = job_ttl_s
        self.lease_ms = int(lease_ttl_s * 1000)
        self.max_attempts = max_attempts
        self.send = send
        self._progress_if_exists = client.register_script(_PROGRESS_IF_EXISTS)
        self._event_if_exists = client.register_script(_EVENT_IF_EXISTS)
        self._cancel_if_exists = client.register_script(_CANCEL_IF_EXISTS)

    @classmethod
    def from_settings(cls, settings: Settings, send: Send | None = None,
                      on_final: Callable[[dict], None] | None = None) -> JobStore:
        url = settings.job_redis_url()
        if not url:
            raise BrokerUnavailable("no job store: set MERGELINE_BROKER_URL (redis://...) or MERGELINE_REDIS_URL")
        return cls(connect(url), settings.key_prefix, job_ttl_s=settings.job_ttl_s,
                   lease_ttl_s=settings.lease_ttl_s, max_attempts=settings.max_attempts, send=send,
                   on_final=on_final, max_active_jobs=settings.max_active_jobs, rate_limit=settings.rate_limit)

    # -- keys ------------------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _events(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:events"

    def _index(self, tenant: str, lineage: str | None = None) -> str:
        return f"{self.p}:jobs:{tenant}" + (f":l:{lineage}" if lineage else "")

    def _queue(self, tenant: str, lineage: str) -> str:
        return f"{self.p}:lq:{tenant}:{lineage}"

    def _lease(self, tenant: str, lineage: str) -> str:
        return f"{self.p}:lease:{tenant}:{lineage}"

    def _sent(self, job_id: str) -> str:
        return f"{self.p}:sent:{job_id}"

    def _open(self, tenant: str) -> str:
        return f"{self.p}:open:{tenant}"

    def _rate(self, tenant: str, now: float) -> str:
        return f"{self.p}:rate:{tenant}:{int(now // 60)}"

    def _by_metadata(self, tenant: str, key: str, value: str) -> str:
        return f"{self.p}:jobs:{tenant}:m:{hashlib.sha256(f'{key}={value}'.encode()).hexdigest()[:32]}"

    @property
    def _active(self) -> str:
        return f"{self.p}:active"

    @property
    def _counts(self) -> str:
        return f"{self.p}:counts"

    def ping(self) -> None:
        with redis_errors():
            self.r.ping()

    # -- API side --------------------------------------------------------------------------------------------
    def create(self, tenant: str, spec: JobSpec, body: dict, *,
               idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Record a queued job and send it if nothing is ahead of it. Returns (record, created): with an
        Idempotency-Key already used for the same body, the first job and False; for another body, Conflict."""
        digest = body_hash(body)
        idem = f"{self.p}:idem:{tenant}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}" \
            if idempotency_key is not None else None
        with redis_errors():
            while True:
                with self.r.pipeline() as pipe:
                    try:
                        if idem:
                            pipe.watch(idem)
                            held = pipe.get(idem)
                            if held:
                                first = json.loads(held)
                                if first["body_sha256"] != digest:
                                    raise Conflict("this Idempotency-Key was used with a different request body",
                                                   param="Idempotency-Key")
                                record = self.load(first["job_id"])
                                if record is None:
                                    raise Conflict("the job created with this Idempotency-Key no longer exists",
                                                   param="Idempotency-Key")
                                return record, False
                        if self.max_active_jobs:
                            pipe.watch(self._open(tenant))
                            self._check_active_cap(pipe, tenant)
                        job_id = new_job_id()
                        seq = self.r.incr(f"{self.p}:seq")
                        record = {
                            "id": job_id, "tenant": tenant, "lineage": spec.lineage, "status": "queued",
                            "method": spec.method, "created_at": utc_now(), "seq": str(seq),
                            "spec": json.dumps(body), "attempts": "0", "cancel": "0",
                        }
                        if spec.metadata:
                            record["metadata"] = json.dumps(spec.metadata)
                        pipe.multi()
                        pipe.hset(self._job(job_id), mapping=record)
                        pipe.zadd(self._index(tenant), {job_id: seq})
                        pipe.zadd(self._index(tenant, spec.lineage), {job_id: seq})
                        for key, value in (spec.metadata or {}).items():
                            pipe.zadd(self._by_metadata(tenant, key, value), {job_id: seq})
                        pipe.sadd(self._open(tenant), job_id)
                        pipe.zadd(self._queue(tenant, spec.lineage), {job_id: seq})
                        pipe.sadd(self._active, f"{tenant}/{spec.lineage}")
                        pipe.hincrby(self._counts, "queued", 1)
                        pipe.rpush(self._events(job_id), _event("queued", "job accepted"))
                        if idem:
                            pipe.set(idem, json.dumps({"job_id": job_id, "body_sha256": digest}),
                                     ex=IDEMPOTENCY_TTL_S)
                        pipe.execute()
                        break
                    except WatchError:
                        continue  # the same key arrived concurrently: read what it created
        try:
            self.kick(tenant, spec.lineage, only=job_id)
        except BrokerUnavailable:
            # The job is recorded and first in its lineage queue: the workers' reconciler sends it once the broker
            # answers again, so the submission still succeeds.
            log.warning("job recorded but not yet sent: broker unavailable", extra={"job_id": job_id})
        return record, True

    def _check_active_cap(self, pipe, tenant: str) -> None:
        """RateLimited when the tenant has `max_active_jobs` queued or running jobs. Members whose records are gone
        or final (a lost Redis write) are dropped before the count is believed."""
        if pipe.scard(self._open(tenant)) < self.max_active_jobs:
            return
        members = list(pipe.smembers(self._open(tenant)))
        statuses = [pipe.hget(self._job(m), "status") for m in members]
        stale = [m for m, st in zip(members, statuses, strict=True) if st is None or st in FINAL]
        if len(members) - len(stale) >= self.max_active_jobs:
            raise RateLimited(f"this tenant already has {len(members) - len(stale)} queued or running jobs "
                              f"(MERGELINE_MAX_ACTIVE_JOBS={self.max_active_jobs})",
                              retry_after=ACTIVE_CAP_RETRY_AFTER_S)
        self.r.srem(self._open(tenant), *stale)  # changes the watched set: the transaction retries with it

    def rate_verdict(self, count: int, now: float) -> None:
        """RateLimited, with the seconds left in the window, when `count` requests this minute are too many (the
        count itself is kept by `AsyncJobReads`, in the API)."""
        if self.rate_limit and count > self.rate_limit:
            retry_after = max(1, math.ceil((int(now // 60) + 1) * 60 - now))
            raise RateLimited(f"more than {self.rate_limit} requests this minute (MERGELINE_RATE_LIMIT)",
                              retry_after=retry_after)

    def create_op(self, tenant: str, lineage: str, op: dict) -> dict:
        """Queue a lineage operation behind the lineage's jobs (see the module doc); returns its record."""
        op_id = new_job_id("op")
        with redis_errors():
            seq = self.r.incr(f"{self.p}:seq")
            record = {"id": op_id, "tenant": tenant, "lineage": lineage, "status": "queued", "kind": "op",
                      "method": f"lineage.{op['op']}", "created_at": utc_now(), "seq": str(seq),
                      "spec": json.dumps(op), "attempts": "0", "cancel": "0"}
            with self.r.pipeline() as pipe:
                pipe.hset(self._job(op_id), mapping=record)
                pipe.zadd(self._queue(tenant, lineage), {op_id: seq})
                pipe.sadd(self._active, f"{tenant}/{lineage}")
                pipe.execute()
        try:
            self.kick(tenant, lineage, only=op_id)
        except BrokerUnavailable:
            log.warning("lineage operation recorded but not yet sent: broker unavailable", extra={"job_id": op_id})
        return record

    def load_op(self, op_id: str) -> dict | None:
        with redis_errors():
            return self.r.hgetall(self._job(op_id)) or None

    def load(self, job_id: str) -> dict | None:
        if not is_job_id(job_id):
            return None
        with redis_errors():
            record = self.r.hgetall(self._job(job_id))
        return record if is_complete(record) else None

    def get(self, tenant: str, job_id: str) -> dict:
        """The tenant's job; another tenant's job is as absent as a missing one."""
        return owned_job(self.load(job_id), tenant, job_id)

    def list(self, tenant: str, *, lineage: str | None = None, status: str | None = None, limit: int = 20,
             after: str | None = None, metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        """The tenant's jobs, newest first, starting after the job id `after`, with every `metadata` key=value
        when given; returns (records, has_more)."""
        metadata = metadata or {}
        index = self._index(tenant, lineage)
        if metadata:  # the first pair's index; the other filters are checked on each record
            index = self._by_metadata(tenant, *next(iter(metadata.items())))

        def wanted(rec: dict) -> bool:
            tags = json.loads(rec.get("metadata") or "{}")
            return ((status is None or rec["status"] == status) and (lineage is None or rec["lineage"] == lineage)
                    and all(tags.get(k) == v for k, v in metadata.items()))

        with redis_errors():
            top = "+inf"
            if after is not None:
                score = self.r.zscore(index, after)
                if score is None:
                    raise BadRequest(f"`after` names no job of this listing: {after!r}", param="after")
                top = f"({int(score)}"
            found: list[dict] = []
            batch = max(limit * 2, 50)
            while len(found) <= limit:
                ids = self.r.zrevrangebyscore(index, top, "-inf", start=0, num=batch, withscores=True)
                if not ids:
                    break
                with self.r.pipeline(transaction=False) as pipe:
                    for job_id, _ in ids:
                        pipe.hgetall(self._job(job_id))
                    records = pipe.execute()
                stale = [job_id for (job_id, _), rec in zip(ids, records, strict=True) if not is_complete(rec)]
                if stale:  # records expired (job_ttl_s) or lost: drop them from the index as we pass
                    self.r.zrem(index, *stale)
                found += [rec for rec in records if is_complete(rec) and wanted(rec)]
                top = f"({int(ids[-1][1])}"
        return found[:limit], len(found) > limit

    def events(self, tenant: str, job_id: str, start: int = 0) -> list[dict]:
        self.get(tenant, job_id)
        with redis_errors():
            return [json.loads(e) for e in self.r.lrange(self._events(job_id), start, -1)]

    def request_cancel(self, tenant: str, job_id: str) -> dict:
        """A queued job is cancelled now; a running one is flagged and stops at its next step boundary. A record
        that vanishes meanwhile (Redis restarted without its data) is a missing job: nothing is written for it."""
        record = self.get(tenant, job_id)
        if record["status"] in FINAL:
            return record
        try:
            with redis_errors():
                if not self._cancel_if_exists(keys=[self._job(job_id)]):
                    raise RecordLost(job_id)
                if record["status"] == "queued":
                    final = self.finish(job_id, None, "cancelled", error={"type": "cancelled",
                                                                          "message": "cancelled before it started"})
                    if final is not None:
                        self.kick(record["tenant"], record["lineage"])
                        return final
                self.add_event(job_id, "cancel_requested", "cancellation requested; stops at the next step")
        except RecordLost:
            raise NotFound(f"no job {job_id!r}", param="id") from None
        return self.load(job_id) or record

    def counts(self) -> dict[str, int]:
        with redis_errors():
            raw = self.r.hgetall(self._counts)
        return {status: max(0, int(raw.get(status, 0))) for status in STATUSES}

    # -- worker side ---------------------------------------------------------------------------------------
    def acquire(self, job_id: str, token: str) -> Acquired:
        """Take the lineage lease for `job_id` if it is first in its lineage queue and no live attempt holds it."""
        with redis_errors(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._job(job_id))
                    pipe.delete(self._sent(job_id))  # this message is taken: a lost attempt may be re-sent
                    record = pipe.hgetall(self._job(job_id))
                    if not is_complete(record):
                        return Acquired("missing")
                    if record["status"] in FINAL:
                        return Acquired("final", record)
                    tenant, lineage = record["tenant"], record["lineage"]
                    queue, lease = self._queue(tenant, lineage), self._lease(tenant, lineage)
                    pipe.watch(queue, lease)
                    first = pipe.zrange(queue, 0, 0)
                    if first != [job_id]:
                        return Acquired("waiting", record)
                    if pipe.get(lease):
                        return Acquired("leased", record)
                    attempts = int(record.get("attempts", 0)) + 1
                    if record.get("cancel") == "1":
                        pipe.multi()
                        final = self._finish_in(pipe, record, "cancelled", error={
                            "type": "cancelled", "message": "cancelled before it started"})
                        pipe.execute()
                        self._notify(final)
                        return Acquired("cancelled", final)
                    if attempts > self.max_attempts:
                        pipe.multi()
                        final = self._finish_in(pipe, record, "failed", error={
                            "type": "worker_lost",
                            "message": f"the worker running this job was lost {attempts - 1} times"})
                        pipe.execute()
                        self._notify(final)
                        return Acquired("worker_lost", final)
                    pipe.multi()
                    pipe.set(lease, f"{job_id}:{token}", px=self.lease_ms)
                    changes = {"status": "running", "attempts": str(attempts)}
                    if not record.get("started_at"):
                        changes["started_at"] = utc_now()
                    pipe.hset(self._job(job_id), mapping=changes)
                    if record["status"] != "running" and record.get("kind") != "op":
                        pipe.hincrby(self._counts, record["status"], -1)
                        pipe.hincrby(self._counts, "running", 1)
                    if attempts == 1:
                        pipe.rpush(self._events(job_id), _event("started", "a worker started the job"))
                    else:
                        pipe.rpush(self._events(job_id), _event(
                            "worker_lost", f"the previous worker was lost; attempt {attempts}",
                            {"attempt": attempts}))
                    pipe.execute()
                    record.update(changes)
                    if attempts == 1 and self.on_started is not None and record.get("kind") != "op":
                        try:
                            self.on_started(record)
                        except Exception:
                            log.exception("job-started hook failed", extra={"job_id": job_id})
                    return Acquired("acquired", record)
                except WatchError:
                    continue

    def holds_lease(self, record: dict, token: str, *, extend: bool = True) -> bool:
        """Whether this attempt still holds its lineage lease; extends it when so (the heartbeat)."""
        lease = self._lease(record["tenant"], record["lineage"])
        mine = f"{record['id']}:{token}"
        with redis_errors(), self.r.pipeline() as pipe:
            try:
                pipe.watch(lease)
                if pipe.get(lease) != mine:
                    return False
                pipe.multi()
                if extend:
                    pipe.pexpire(lease, self.lease_ms)
                pipe.execute()
                return True
            except WatchError:
                return False

    def update_progress(self, job_id: str, progress: dict) -> bool:
        """Store the progress; returns whether cancellation was requested (one round trip for both). Raises
        RecordLost when the record is gone rather than re-creating it without its other fields."""
        with redis_errors():
            cancel = self._progress_if_exists(keys=[self._job(job_id)], args=[json.dumps(progress)])
        if cancel is None:
            raise RecordLost(f"the record of job {job_id} is gone from the job store")
        return cancel == "1"

    def cancel_requested(self, job_id: str) -> bool:
        with redis_errors():
            return self.r.hget(self._job(job_id), "cancel") == "1"

    def add_event(self, job_id: str, type: str, message: str, data: dict | None = None) -> None:
        """Append an event; raises RecordLost when the record is gone (no orphan event list is left)."""
        with redis_errors():
            added = self._event_if_exists(keys=[self._job(job_id), self._events(job_id)],
                                          args=[_event(type, message, data), MAX_EVENTS])
        if not added:
            raise RecordLost(f"the record of job {job_id} is gone from the job store")

    def record_lost(self, record: dict, status: str, *, result: dict | None = None,
                    error: dict | None = None) -> dict | None:
        """Write the final record of a job whose record vanished while it ran, from the attempt's own copy (whole,
        so `GET` shows how it ended); None when a record exists again (nothing is overwritten)."""
        final = {**record, "status": status, "finished_at": utc_now()}
        final.pop("progress", None)
        if result is not None:
            final["result"] = json.dumps(result)
        if error is not None:
            final["error"] = json.dumps(error)
        with redis_errors(), self.r.pipeline() as pipe:
            try:
                pipe.watch(self._job(record["id"]))
                if pipe.exists(self._job(record["id"])):
                    return None
                pipe.multi()
                pipe.hset(self._job(record["id"]), mapping=final)
                pipe.expire(self._job(record["id"]), self.job_ttl_s)
                pipe.zadd(self._index(record["tenant"]), {record["id"]: int(record["seq"])})
                pipe.zadd(self._index(record["tenant"], record["lineage"]), {record["id"]: int(record["seq"])})
                pipe.hincrby(self._counts, status, 1)
                pipe.rpush(self._events(record["id"]), _event(
                    status, "the job store lost this job's record while it ran; this is how it ended",
                    {"error": error} if error else None))
                pipe.expire(self._events(record["id"]), self.job_ttl_s)
                pipe.execute()
            except WatchError:
                return None
        self._notify(final)
        return final

    def finish(self, job_id: str, token: str | None, status: str, *, result: dict | None = None,
               error: dict | None = None) -> dict | None:
        """Make the job final. A running job is finished only by the attempt holding its lease (`token`); returns
        the final record, or None when this caller may not finish it (lease lost, or it started meanwhile)."""
        with redis_errors(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._job(job_id))
                    record = pipe.hgetall(self._job(job_id))
                    if not is_complete(record):
                        return None
                    if record["status"] in FINAL:
                        return record
                    lease = self._lease(record["tenant"], record["lineage"])
                    pipe.watch(lease)
                    if record["status"] == "running" and (token is None or pipe.get(lease) != f"{job_id}:{token}"):
                        return None
                    pipe.multi()
                    final = self._finish_in(pipe, record, status, result=result, error=error)
                    if token is not None:
                        pipe.delete(lease)
                    pipe.execute()
                    break
                except WatchError:
                    continue
        self._notify(final)
        return final

    def _notify(self, final: dict) -> None:
        """The final-state hook (webhooks) runs once, by whoever made the job final; it never fails the caller."""
        if self.on_final is None:
            return
        try:
            self.on_final(final)
        except Exception:
            log.exception("final-job hook failed", extra={"job_id": final["id"]})

    def _finish_in(self, pipe, record: dict, status: str, *, result: dict | None = None,
                   error: dict | None = None) -> dict:
        job_id = record["id"]
        changes = {"status": status, "finished_at": utc_now()}
        if result is not None:
            changes["result"] = json.dumps(result)
        if error is not None:
            changes["error"] = json.dumps(error)
        pipe.hset(self._job(job_id), mapping=changes)
        pipe.zrem(self._queue(record["tenant"], record["lineage"]), job_id)
        if record.get("kind") != "op":
            pipe.srem(self._open(record["tenant"]), job_id)
            pipe.hincrby(self._counts, record["status"], -1)
            pipe.hincrby(self._counts, status, 1)
        message = {"succeeded": "job succeeded", "cancelled": "job cancelled"}.get(status) or \
            f"job failed: {(error or {}).get('type', 'internal')}"
        pipe.rpush(self._events(job_id), _event(status, message, {"error": error} if error else None))
        pipe.expire(self._job(job_id), self.job_ttl_s)
        pipe.expire(self._events(job_id), self.job_ttl_s)
        return {**record, **changes}

    def kick(self, tenant: str, lineage: str, *, throttle_ms: int | None = None, only: str | None = None) -> str | None:
        """Send the lineage's first job (if it is `only`, when given) unless an attempt holds the lease; returns
        the job id sent, if any."""
        if self.send is None:
            return None
        with redis_errors():
            first = self.r.zrange(self._queue(tenant, lineage), 0, 0)
            if not first or (only is not None and first[0] != only) or self.r.exists(self._lease(tenant, lineage)):
                return None
            if throttle_ms and not self.r.set(f"{self.p}:kick:{tenant}:{lineage}", "1", nx=True, px=throttle_ms):
                return None
            if not self.r.set(self._sent(first[0]), "1", nx=True, ex=SENT_TTL_S):
                return None  # a message for it still waits in the broker queue
        try:
            self.send(first[0])
        except BaseException:
            with contextlib.suppress(RedisError):
                self.r.delete(self._sent(first[0]))
            raise
        return first[0]

    def reconcile(self, *, throttle_ms: int = 5000) -> list[str]:
        """Re-send the first job of every lineage whose lease has lapsed (a dead worker, a lost message)."""
        sent = []
        with redis_errors():
            members = self.r.smembers(self._active)
        for member in members:
            tenant, _, lineage = member.partition("/")
            queue = self._queue(tenant, lineage)
            with redis_errors(), self.r.pipeline() as pipe:
                try:
                    pipe.watch(queue)
                    if pipe.zcard(queue) == 0:
                        pipe.multi()
                        pipe.srem(self._active, member)
                        pipe.execute()
                        continue
                    pipe.unwatch()
                except WatchError:
                    continue
            job_id = self.kick(tenant, lineage, throttle_ms=throttle_ms)
            if job_id:
                sent.append(job_id)
        return sent


class AsyncJobReads:
    """What the API does with Redis on every request, on asyncio so that it costs no thread hop: count the
    tenant's request for the rate limit (`JobStore.rate_verdict`), and read a job for a status poll, both in one
    round trip. A client belongs to one event loop, so there is one per loop (uvicorn runs one; test clients may
    start several)."""

    def __init__(self, jobs: JobStore, url: str):
        self.jobs = jobs
        self.url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: redis.asyncio.Redis | None = None

    def _redis(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = redis.asyncio.Redis.from_url(self.url, **_CLIENT_OPTIONS), loop
            # Sent as EVALSHA, and loaded first when Redis does not know them (a restarted Redis).
            self._count_request = self._client.register_script(_COUNT_REQUEST)
            self._count_and_read = self._client.register_script(_COUNT_AND_READ)
        return self._client

    async def check_rate(self, tenant: str) -> None:
        """Count one request of `tenant` in this minute's window; RateLimited past the limit."""
        if not self.jobs.rate_limit:
            return
        now = time.time()
        self._redis()
        with redis_errors():
            count = await self._count_request(keys=[self.jobs._rate(tenant, now)], args=[RATE_WINDOW_TTL_S])
        self.jobs.rate_verdict(count, now)

    async def poll(self, tenant: str, job_id: str) -> dict:
        """The tenant's job (the Job object's fields, not its spec), the request counted as `check_rate` does."""
        if not is_job_id(job_id):
            await self.check_rate(tenant)
            return owned_job(None, tenant, job_id)
        now = time.time()
        client = self._redis()
        with redis_errors():
            if self.jobs.rate_limit:
                count, *values = await self._count_and_read(keys=[self.jobs._rate(tenant, now), self.jobs._job(job_id)],
                                                            args=[RATE_WINDOW_TTL_S, *JOB_FIELDS])
            else:
                count, values = 0, await client.hmget(self.jobs._job(job_id), JOB_FIELDS)
        self.jobs.rate_verdict(count, now)
        return owned_job({f: v for f, v in zip(JOB_FIELDS, values, strict=True) if v is not None}, tenant, job_id)

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None


def _event(type: str, message: str, data: dict | None = None) -> str:
    return json.dumps({"at": utc_now(), "type": type, "message": message, "data": data or {}})
