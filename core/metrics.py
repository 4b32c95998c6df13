"""Prometheus metrics. Workers are separate processes (often on other machines), so what they measure (step and
job durations, bytes written) is aggregated in Redis and exposed by the API's `/metrics` through one collector."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis.exceptions import RedisError

from core.jobs import JobStore
from core.statuses import STATUSES

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)
HISTOGRAMS = {
    "step_duration_seconds": ("Time of one merge optimisation step (data-free methods: one task)", STEP_BUCKETS),
    "job_duration_seconds": ("Time from a job's start to its end, by final status", JOB_BUCKETS),
}
COUNTERS = {
    "store_bytes_written": "Bytes of committed version files written to the lineage store",
    "store_bytes_read": "Bytes read from the lineage store and from job inputs",
}


class RedisMetrics:
    """Histograms and counters kept in Redis hashes so that every process adds to the same series."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.r = client
        self.p = f"{prefix}:metrics"

    def observe(self, name: str, value: float, pipe=None, **labels: str) -> None:
        """Add one observation (within `pipe` when given, so it costs no extra round trip)."""
        _, buckets = HISTOGRAMS[name]
        key = self._key(name, labels)
        target = pipe if pipe is not None else self.r.pipeline(transaction=False)
        for bound in buckets:
            if value <= bound:
                target.hincrby(key, f"le:{bound}", 1)
        target.hincrbyfloat(key, "sum", value)
        target.hincrby(key, "count", 1)
        target.sadd(f"{self.p}:series", key)
        if pipe is None:
            target.execute()

    def inc(self, name: str, amount: float = 1.0) -> None:
        if name not in COUNTERS:
            raise KeyError(name)
        self.r.hincrbyfloat(f"{self.p}:counters", name, amount)

    def _key(self, name: str, labels: dict[str, str]) -> str:
        suffix = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return f"{self.p}:h:{name}|{suffix}"

    def safe_inc(self, name: str, amount: float) -> None:
        """Counting must never fail the thing counted."""
        with contextlib.suppress(RedisError):
            self.inc(name, amount)


class ServiceCollector:
    """Collects, at scrape time, job counts, queue depth and the workers' Redis-kept series."""

    def __init__(self, jobs: JobStore, metrics: RedisMetrics, broker_depth: Callable[[], int | None]):
        self.jobs = jobs
        self.metrics = metrics
        self.broker_depth = broker_depth

    def collect(self) -> Iterable:
        try:
            counts = self.jobs.counts()
        except Exception:  # a scrape during an outage reports what it can
            counts = None
        if counts is not None:
            jobs = GaugeMetricFamily("mergeline_jobs", "Jobs by status", labels=["status"])
            for status in STATUSES:
                jobs.add_metric([status], counts[status])
            yield jobs
            yield GaugeMetricFamily("mergeline_queue_depth", "Jobs waiting to run", value=counts["queued"])
        depth = self.broker_depth()
        if depth is not None:
            yield GaugeMetricFamily("mergeline_broker_messages", "Messages waiting in the Celery queue", value=depth)
        yield from self._histograms()
        yield from self._counters()

    def _histograms(self) -> Iterable:
        r, p = self.metrics.r, self.metrics.p
        try:
            series = sorted(r.smembers(f"{p}:series"))
            values = [r.hgetall(key) for key in series]
        except RedisError:
            return
        families: dict[str, HistogramMetricFamily] = {}
        for key, raw in zip(series, values, strict=True):
            name, _, suffix = key.rsplit(":h:", 1)[1].partition("|")
            if name not in HISTOGRAMS or not raw:
                continue
            labels = dict(item.split("=", 1) for item in suffix.split(",") if item)
            family = families.get(name)
            if family is None:
                family = families[name] = HistogramMetricFamily(
                    f"mergeline_{name}", HISTOGRAMS[name][0], labels=sorted(labels))
            buckets = [(str(b), float(raw.get(f"le:{b}", 0))) for b in HISTOGRAMS[name][1]]
            buckets.append(("+Inf", float(raw.get("count", 0))))
            family.add_metric([labels[k] for k in sorted(labels)], buckets, float(raw.get("sum", 0.0)))
        yield from families.values()

    def _counters(self) -> Iterable:
        try:
            raw = self.metrics.r.hgetall(f"{self.metrics.p}:counters")
        except RedisError:
            return
        for name, help_text in COUNTERS.items():
            value = float(raw.get(name, 0.0))
            yield CounterMetricFamily(f"mergeline_{name}", help_text, value=value if math.isfinite(value) else 0.0)


def render(collector: ServiceCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
