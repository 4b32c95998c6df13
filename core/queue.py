"""The job queue: the Celery application configured from settings, and sending a job by id. Torch-free: the API
sends with it and the worker's entry point registers the task on it.

Long jobs want: `acks_late` (a message is acknowledged only after its job ends, so a dead worker's job is
redelivered), `reject_on_worker_lost` (a killed pool process requeues its message at once), and prefetch 1 (a
worker holds no message it is not running). Redelivered and duplicate messages are made harmless by the lineage
lease and the job record (see core/jobs.py), not by Celery.
"""

from __future__ import annotations

from celery import Celery

from core.errors import BrokerUnavailable
from core.settings import Settings

TASK_NAME = "mergeline.run_job"
PURGE_TASK_NAME = "mergeline.purge_deleted_lineages"


def make_celery(settings: Settings) -> Celery:
    if not settings.broker_url:
        raise BrokerUnavailable("no broker: set MERGELINE_BROKER_URL, or run `mergeline serve` for an embedded one")
    app = Celery("mergeline", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart instead of exiting
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # our JSON log lines go to stderr as they are
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


def send_purge(app: Celery, settings: Settings) -> None:
    """Ask a worker's pool process to purge the deleted lineages whose retention has passed."""
    try:
        app.send_task(PURGE_TASK_NAME, queue=settings.queue)
    except Exception as exc:
        raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from None


def send_job(app: Celery, settings: Settings, job_id: str) -> None:
    """Enqueue one job by id (the message carries nothing else)."""
    try:
        app.send_task(TASK_NAME, args=[job_id], queue=settings.queue)
    except Exception as exc:  # kombu raises transport-specific errors for an unreachable broker
        raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from None

