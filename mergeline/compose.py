"""The one composition point: what each kind of process is built from.

- the API process: `api_app()` (`uvicorn --factory mergeline.compose:api_app`), from `api_services()`;
- a worker process: `worker_app()` (the Celery app with the merge task), each process's `worker_context()`;
- the CLI: `lineage_store()`, and `run_job` itself for local merges.

Everything below this package receives what it needs; nothing there builds a store, a job store or a Celery app.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import BrokerUnavailable
from core.settings import Settings, get_settings
from core.store import LineageStore

if TYPE_CHECKING:  # the API and worker sides are imported only by the processes that run them
    from celery import Celery
    from fastapi import FastAPI

    from core.jobs import JobStore
    from core.webhooks import WebhookQueue
    from service.api.deps import Services
    from worker.tasks import WorkerContext


def lineage_store(settings: Settings, root: str | None = None) -> LineageStore:
    """The store at `root` (default MERGELINE_STORE): file://PATH, s3://bucket/prefix, or a plain folder."""
    root = root or settings.store
    if "://" not in root:
        root = Path(root).expanduser().resolve().as_uri()
    return LineageStore(root, claim_ttl_s=settings.claim_ttl_s)


def job_store(settings: Settings, send: Callable[[str], None] | None) -> tuple[JobStore, WebhookQueue]:
    """Job records in the configured Redis, and the webhook queue that each final job enqueues into."""
    from core.jobs import JobStore
    from core.webhooks import WebhookQueue, notify_webhook

    jobs = JobStore.from_settings(settings, send=send)
    webhooks = WebhookQueue.from_settings(jobs.r, settings, on_outcome=jobs.add_event)
    jobs.on_final = jobs.on_started = notify_webhook(webhooks)
    return jobs, webhooks


# -- the API process ----------------------------------------------------------------------------------------------
def api_services(settings: Settings, send: Callable[[str], None] | None = None) -> Services:
    """Connections for one API app. `send` enqueues a job id (default: a Celery producer from the settings)."""
    from core.jobs import AsyncJobReads
    from core.metrics import RedisMetrics, ServiceCollector
    from core.queue import make_celery, send_job
    from service.api.deps import Services, TokenTable

    if not settings.job_redis_url():
        raise BrokerUnavailable("the API needs Redis: set MERGELINE_BROKER_URL=redis://... or MERGELINE_REDIS_URL")
    broker_check = None
    if send is None:
        celery = make_celery(settings)
        send = lambda job_id: send_job(celery, settings, job_id)  # noqa: E731
        if settings.broker_url != settings.job_redis_url():
            def broker_check() -> None:
                with celery.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=3)
    jobs, _ = job_store(settings, send)
    metrics = RedisMetrics(jobs.r, settings.key_prefix)

    def broker_depth() -> int | None:
        if settings.broker_url != settings.job_redis_url():
            return None
        try:
            return jobs.r.llen(settings.queue)  # kombu's Redis queue is a list
        except Exception:
            return None

    return Services(settings=settings, jobs=jobs, store=lineage_store(settings),
                    tokens=TokenTable(settings.tenants_by_token()), metrics=metrics,
                    collector=ServiceCollector(jobs, metrics, broker_depth),
                    reads=AsyncJobReads(jobs, settings.job_redis_url()), broker_check=broker_check)


def api_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app from every MERGELINE_* setting."""
    from service.api.app import create_app

    return create_app(api_services(settings or get_settings()))


# -- worker processes -----------------------------------------------------------------------------------------------
def run_job_in_engine(*args, **kwargs) -> dict:
    """`engine.job.run_job`, imported on first use: only the pool processes that run jobs load torch, so the
    worker's main process starts fast and forks small children."""
    from engine.job import run_job

    return run_job(*args, **kwargs)


@cache
def _worker_context(pid: int, app: Celery) -> WorkerContext:
    """Per process (a forked pool process must not share its parent's sockets)."""
    from core import logs
    from core.metrics import RedisMetrics
    from core.queue import send_job
    from worker.tasks import WorkerContext

    settings = get_settings()
    logs.configure(settings.log_level)
    jobs, webhooks = job_store(settings, send=lambda job_id: send_job(app, settings, job_id))
    return WorkerContext(settings=settings, jobs=jobs, store=lineage_store(settings),
                         metrics=RedisMetrics(jobs.r, settings.key_prefix), webhooks=webhooks, engine=run_job_in_engine)


def worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app of `mergeline worker`, with the merge task and the housekeeping threads registered."""
    from core.queue import make_celery
    from worker.tasks import register

    app = make_celery(settings or get_settings())
    register(app, lambda: _worker_context(os.getpid(), app))
    return app
