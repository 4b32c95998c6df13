"""The Celery task (thin): take the lineage lease, run the engine, record the outcome, start the next job.

Every worker process also runs two daemon threads (started when the worker is ready): `reconcile`, which re-sends
the first job of a lineage whose lease lapsed (its worker died) and, every few passes, asks for a purge of deleted
lineages past their retention (a task run by a pool process: the main process, which forks the pool, never does
store I/O), and the webhook delivery loop. Lineage operations (rollback, fork, delete) arrive as `op_...` ids on the
same task and run under the same lineage lease, so they keep the lineage's job order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from core import logs
from core.errors import BrokerUnavailable, JobCancelled, MergelineError
from core.jobs import JobStore, RecordLost, public_job
from core.metrics import RedisMetrics
from core.queue import PURGE_TASK_NAME, TASK_NAME, send_purge
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from core.webhooks import WebhookQueue

log = logging.getLogger("mergeline.worker")


class LeaseLost(JobCancelled):
    """This attempt can no longer prove it holds the lineage lease: another attempt may own the job now."""

    type = "lease_lost"


Engine = Callable[..., dict]  # run_job(spec, store, progress, *, tenant, job_id, settings) -> result


@dataclass
class WorkerContext:
    """What one worker process runs jobs with; built once per process by the entry point (mergeline.compose)."""

    settings: Settings
    jobs: JobStore
    store: LineageStore
    metrics: RedisMetrics
    webhooks: WebhookQueue
    engine: Engine


class LeaseKeeper:
    """Renews the lineage lease every third of its TTL. If renewal fails (lease taken, or Redis unreachable for
    longer than the TTL) the attempt is `lost` and stops at its next step, before it can commit anything."""

    def __init__(self, jobs: JobStore, record: dict, token: str, ttl_s: float):
        self.jobs, self.record, self.token, self.ttl_s = jobs, record, token, ttl_s
        self._last_ok = time.monotonic()
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mergeline-lease", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost or time.monotonic() - self._last_ok > self.ttl_s

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def confirm(self) -> None:
        """A synchronous check before an irreversible step (the commit)."""
        try:
            held = self.jobs.holds_lease(self.record, self.token)
        except BrokerUnavailable:
            held = False
        if not held or self.lost:
            self._lost = True
            raise LeaseLost("lost the lineage lease; another attempt owns the job")
        self._last_ok = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.jobs.holds_lease(self.record, self.token):
                    self._last_ok = time.monotonic()
                else:
                    self._lost = True
                    return
            except BrokerUnavailable:
                log.warning("lease renewal failed: Redis unavailable", extra={"job_id": self.record["id"]})


class RecordProgress:
    """The engine's Progress, written into the job record; raises JobCancelled at a step boundary when asked."""

    NEVER_STOP = frozenset({"committed"})  # after the commit nothing may be undone

    def __init__(self, ctx: WorkerContext, job_id: str, keeper: LeaseKeeper):
        self.ctx, self.job_id, self.keeper = ctx, job_id, keeper
        self._last_step: float | None = None
        self._losses: dict[str, float] = {}  # the current task's latest loss of each named objective

    def update(self, *, task_index: int, tasks_total: int, step: int, steps_total: int,
               loss: float | None, objective: str | None = None, losses: dict[str, float] | None = None) -> None:
        if self.keeper.lost:
            raise LeaseLost("lost the lineage lease; another attempt owns the job")
        now = time.monotonic()
        if self._last_step is not None:
            with contextlib.suppress(Exception):  # metrics never stop a merge
                self.ctx.metrics.observe("step_duration_seconds", now - self._last_step)
        self._last_step = now
        loss = float(loss) if loss is not None and math.isfinite(loss) else None
        if step == 1:
            self._losses.clear()
        if objective is not None and loss is not None:
            self._losses[objective] = loss
        self._losses.update({k: float(v) for k, v in (losses or {}).items() if math.isfinite(v)})
        progress = {"task_index": task_index, "tasks_total": tasks_total, "step": step, "steps_total": steps_total,
                    "loss": loss, **({"losses": dict(self._losses)} if self._losses else {})}
        try:
            cancelled = self.ctx.jobs.update_progress(self.job_id, progress)
        except BrokerUnavailable:
            return  # progress is advisory: a Redis blip must not kill a long merge
        if cancelled:
            raise JobCancelled("cancelled at a step boundary")

    def event(self, type: str, message: str, data: dict[str, Any] | None = None) -> None:
        if type == "committing":
            self.keeper.confirm()
        try:
            self.ctx.jobs.add_event(self.job_id, type, message, strict_json(data or {}))
            cancelled = type not in self.NEVER_STOP and self.ctx.jobs.cancel_requested(self.job_id)
        except BrokerUnavailable:
            return
        except RecordLost:
            if type in self.NEVER_STOP:
                return  # committed: the worker writes the record back as succeeded
            raise
        if cancelled:
            raise JobCancelled("cancelled at a step boundary")


def strict_json(value: Any) -> Any:
    """Engine results may hold NaN, tuples or numpy/torch scalars; records and responses hold strict JSON."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return strict_json(value.item())
    return str(value)


def _committed_by(store: LineageStore, tenant: str, lineage: str, job_id: str) -> dict | None:
    """The version this job committed, if the lineage head is it (a failure or cancel after the manifest)."""
    try:
        doc = store.get_lineage(tenant, lineage)
        if doc and doc["head"] > 0:
            manifest = store.manifest(tenant, lineage, doc["head"])
            if manifest.get("job_id") == job_id:
                return {"version": manifest["version"], "manifest": manifest, "metrics": manifest.get("metrics", {})}
    except MergelineError:
        pass
    return None


@retry(retry=retry_if_exception_type(BrokerUnavailable), stop=stop_after_attempt(6),
       wait=wait_exponential(multiplier=0.5, max=10), reraise=True)
def _finish(jobs: JobStore, job_id: str, token: str, status: str, **outcome) -> dict | None:
    return jobs.finish(job_id, token, status, **outcome)


def execute_job(ctx: WorkerContext, job_id: str) -> str:
    """Run one job if it is its turn. Returns what happened (for logs and tests)."""
    token = uuid.uuid4().hex
    with logs.job_context(job_id):
        acquired = ctx.jobs.acquire(job_id, token)
        if acquired.state != "acquired":
            log.info("job not run", extra={"state": acquired.state})
            if acquired.state in ("cancelled", "worker_lost"):
                _after(ctx, acquired.record, time.monotonic())
            return acquired.state
        record = acquired.record
        started = time.monotonic()
        if record.get("kind") == "op":
            return execute_lineage_op(ctx, record, token)
        log.info("job started", extra={"attempt": int(record["attempts"]), "lineage": record["lineage"]})
        keeper = LeaseKeeper(ctx.jobs, record, token, ctx.settings.lease_ttl_s).start()
        outcome: dict[str, Any] = {}
        try:
            spec = parse_job_spec(record["spec"])
            result = ctx.engine(spec, ctx.store, RecordProgress(ctx, job_id, keeper), tenant=record["tenant"],
                                job_id=job_id, settings=ctx.settings)
            status, outcome = "succeeded", {"result": strict_json(result)}
        except (LeaseLost, RecordLost):
            keeper.stop()
            return _abandon(ctx, record)
        except JobCancelled:
            status, outcome = "cancelled", {"error": {"type": "cancelled", "message": "cancelled by request"}}
        except MergelineError as exc:
            status, outcome = "failed", {"error": exc.to_dict()}  # type, message and the failing field (param)
        except Exception as exc:
            log.exception("job failed with an unexpected error")
            message = f"internal error ({type(exc).__name__}); see the worker log"
            status, outcome = "failed", {"error": {"type": "internal", "message": message}}
        finally:
            keeper.stop()
        if status != "succeeded":
            # A version whose manifest is written exists, whatever failed after it (the head pointer, a cancel
            # that raced the commit): the job's status follows the store.
            committed = _committed_by(ctx.store, record["tenant"], record["lineage"], job_id)
            if committed is not None:
                status, outcome = "succeeded", {"result": committed}
        final = _finish(ctx.jobs, job_id, token, status, **outcome)
        if final is None:  # the lease or the whole record was lost meanwhile
            return _abandon(ctx, record)
        log.info("job finished", extra={"status": final["status"], "seconds": round(time.monotonic() - started, 3)})
        _after(ctx, final, started, measured=True)
        return final["status"]


def _abandon(ctx: WorkerContext, record: dict) -> str:
    """Stop an attempt that lost its lease or its record. Another attempt holding the lease owns the job; but when
    the record itself is gone (Redis came back without its data), the job is written back as it ended, whole:
    `succeeded` if its version was committed, else `failed` with `job_lost`, so that it never vanishes silently."""
    try:
        if _record_exists(ctx.jobs, record["id"]):
            log.warning("job abandoned: lease lost")
            return "lease_lost"
        committed = _committed_by(ctx.store, record["tenant"], record["lineage"], record["id"])
        outcome = {"result": committed} if committed is not None else {"error": {
            "type": "job_lost", "message": "the job store lost this job's record while it ran (Redis restarted "
                                           "without persistence); nothing was committed: submit it again"}}
        final = ctx.jobs.record_lost(record, "succeeded" if committed is not None else "failed", **outcome)
    except BrokerUnavailable:
        log.warning("job abandoned: the job store is unreachable")
        return "lease_lost"
    log.warning("job record lost; final record written", extra={"status": final and final["status"]})
    return "job_lost"


@retry(retry=retry_if_exception_type(BrokerUnavailable), stop=stop_after_attempt(6),
       wait=wait_exponential(multiplier=0.5, max=10), reraise=True)
def _record_exists(jobs: JobStore, job_id: str) -> bool:
    return jobs.load(job_id) is not None


def apply_lineage_op(store: LineageStore, settings: Settings, tenant: str, lineage: str, op: dict,
                     op_id: str) -> dict:
    """Run one lineage operation on the store; returns what the API answers."""
    if op["op"] == "rollback":
        return store.rollback(tenant, lineage, op["version"], job_id=op_id)
    if op["op"] == "fork":
        return store.fork(tenant, lineage, op["version"], op["name"], job_id=op_id)
    if op["op"] == "delete":
        return store.delete_lineage(tenant, lineage, retention_s=settings.retention_days * 86400, job_id=op_id)
    raise MergelineError(f"unknown lineage operation {op['op']!r}")


def execute_lineage_op(ctx: WorkerContext, record: dict, token: str) -> str:
    """Run a lineage operation that holds the lineage lease, record its outcome and start the lineage's next job."""
    started = time.monotonic()
    keeper = LeaseKeeper(ctx.jobs, record, token, ctx.settings.lease_ttl_s).start()
    try:
        keeper.confirm()
        result = apply_lineage_op(ctx.store, ctx.settings, record["tenant"], record["lineage"],
                                  json.loads(record["spec"]), record["id"])
        status, outcome = "succeeded", {"result": result}
    except LeaseLost:
        return "lease_lost"
    except MergelineError as exc:
        status, outcome = "failed", {"error": exc.to_dict()}
    except Exception as exc:
        log.exception("lineage operation failed with an unexpected error")
        status, outcome = "failed", {"error": {"type": "internal", "message": f"internal error ({type(exc).__name__})"}}
    finally:
        keeper.stop()
    final = _finish(ctx.jobs, record["id"], token, status, **outcome)
    if final is None:
        return "lease_lost"
    log.info("lineage operation finished", extra={"status": final["status"], "lineage": record["lineage"]})
    _after(ctx, final, started)
    return final["status"]


def _after(ctx: WorkerContext, record: dict, started: float, *, measured: bool = False) -> None:
    """Side effects of a final job, none of which may fail it: metrics and the lineage's next job (the webhook is
    enqueued by the JobStore's final hook)."""
    try:
        if measured:
            ctx.metrics.observe("job_duration_seconds", time.monotonic() - started, status=record["status"])
            result = public_job(record)["result"]
            if result:
                ctx.metrics.safe_inc("store_bytes_written", sum(f["bytes"] for f in result["manifest"]["files"]))
                parent = result["manifest"].get("parent") or 0
                if parent:  # the engine reads the parent version back from the store
                    parent_files = ctx.store.manifest(record["tenant"], record["lineage"], parent)["files"]
                    ctx.metrics.safe_inc("store_bytes_read", sum(f["bytes"] for f in parent_files))
    except Exception:
        log.exception("post-job bookkeeping failed")
    try:
        ctx.jobs.kick(record["tenant"], record["lineage"])
    except BrokerUnavailable:
        log.warning("could not send the lineage's next job; the reconciler will")


def register(app: Celery, context: Callable[[], WorkerContext]) -> None:
    """Add the merge task to `app`, and the housekeeping threads to every worker (main) process it starts.
    `context()` gives the calling process's WorkerContext (a forked pool process builds its own)."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_merge_job(self, job_id: str) -> str:
        return execute_job(context(), job_id)

    @app.task(name=PURGE_TASK_NAME, ignore_result=True)
    def purge_deleted_lineages() -> list[str]:
        context().jobs.r.delete(_purge_pending_key(context()))  # taken: the next request may be sent
        purged = context().store.purge_due()
        if purged:
            log.info("purged deleted lineages", extra={"lineages": ",".join(purged)})
        context().store.sweep_staging()  # version files of jobs killed mid-write
        return purged

    stop = threading.Event()
    worker_ready.connect(lambda **_: start_housekeeping(context, stop, lambda: send_purge(app, context().settings)),
                         weak=False)
    worker_shutdown.connect(lambda **_: stop.set(), weak=False)


PURGE_PENDING_TTL_S = 600


def _purge_pending_key(ctx: WorkerContext) -> str:
    return f"{ctx.jobs.p}:purge-pending"


def _reconcile_loop(context: Callable[[], WorkerContext], stop: threading.Event,
                    request_purge: Callable[[], None] | None = None) -> None:
    while not stop.wait(context().settings.reconcile_interval_s):
        try:
            ctx = context()
            sent = ctx.jobs.reconcile(throttle_ms=int(max(ctx.settings.reconcile_interval_s, 1.0) * 2000))
            if sent:
                log.info("reconciler re-sent jobs", extra={"jobs": ",".join(sent)})
        except Exception:
            log.exception("reconciler pass failed")
        try:
            ctx = context()
            every_s = max(5 * ctx.settings.reconcile_interval_s, 5.0)  # one request per interval for all workers
            key, pending = f"{ctx.jobs.p}:purge-requested", _purge_pending_key(ctx)
            # At most one purge message waits in the broker at a time (busy workers must not let them pile up);
            # the pending mark expires in case its message is lost.
            if (request_purge and not ctx.jobs.r.exists(pending)
                    and ctx.jobs.r.set(key, "1", nx=True, px=int(every_s * 1000))):
                ctx.jobs.r.set(pending, "1", ex=PURGE_PENDING_TTL_S)
                request_purge()
        except Exception:
            log.exception("purge request failed")


def start_housekeeping(context: Callable[[], WorkerContext], stop: threading.Event,
                       request_purge: Callable[[], None] | None = None) -> list[threading.Thread]:
    """The reconciler (which also requests purges) and the webhook delivery loop, as daemon threads that end when
    `stop` is set."""
    stop.clear()
    threads = [threading.Thread(target=_reconcile_loop, args=(context, stop, request_purge),
                                name="mergeline-reconcile", daemon=True),
               threading.Thread(target=context().webhooks.run, args=(stop,), name="mergeline-webhooks", daemon=True)]
    for thread in threads:
        thread.start()
    return threads
