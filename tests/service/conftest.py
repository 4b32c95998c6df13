"""Fixtures for the service tests: a private database of the real Redis on 127.0.0.1:6379, unique key prefixes.
The helpers that start real processes are in svc_procs.py."""

from __future__ import annotations

import uuid

import pytest
import redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@pytest.fixture(scope="session")
def redis_db() -> str:
    """A Redis database (1..15) that no other test run is using, flushed before and after; its URL."""
    owner = uuid.uuid4().hex
    for db in range(15, 0, -1):
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db)
        try:
            if client.set("mergeline-tests:owner", owner, nx=True, ex=3600):
                break
        except redis.ConnectionError:
            pytest.skip("no Redis on 127.0.0.1:6379")
    else:
        pytest.skip("every Redis database is taken by other test runs")
    client.flushdb()
    client.set("mergeline-tests:owner", owner, ex=3600)
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
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
