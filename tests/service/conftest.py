"""Fixtures for the service tests: a private database of the real Redis at MERGELINE_TEST_REDIS_URL (default
redis://127.0.0.1:6379; scripts/test.sh starts one for the run), unique key prefixes. The helpers that start real
processes are in svc_procs.py."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

REDIS_URL = os.environ.get("MERGELINE_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
# Tests poll jobs many times a second; the per-tenant rate limit is tested where a test sets it explicitly.
os.environ.setdefault("MERGELINE_RATE_LIMIT", "1000000")


@pytest.fixture(scope="session")
def redis_db() -> str:
    """A Redis database (1..15) that no other test run is using, flushed before and after; its URL."""
    owner = uuid.uuid4().hex
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        try:
            if client.set("mergeline-tests:owner", owner, nx=True, ex=3600):
                break
        except redis.ConnectionError:
            pytest.skip(f"no Redis answers at {REDIS_URL} (MERGELINE_TEST_REDIS_URL)")
    else:
        pytest.skip("every Redis database is taken by other test runs")
    client.flushdb()
    client.set("mergeline-tests:owner", owner, ex=3600)
    yield f"{REDIS_URL}/{db}"
    client.flushdb()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rclient(redis_db):
    client = redis.Redis.from_url(redis_db, decode_responses=True)
    yield client
    client.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts real processes (uvicorn, Celery workers, moto's S3 server)")
