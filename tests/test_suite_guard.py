"""The test command cannot pass by skipping: a service test skipped for want of Redis fails the run, unless the
caller asked for skips explicitly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_service_tests(**env: str) -> subprocess.CompletedProcess:
    nowhere = {"MERGELINE_TEST_REDIS_URL": "redis://127.0.0.1:1"}  # nothing listens on port 1
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/service/test_service_jobs.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **nowhere, **env}, timeout=120)


def test_skips_fail_the_run_unless_asked_for():
    refused = run_service_tests()
    assert refused.returncode == 1, refused.stdout[-2000:]
    assert "skipped: failing the run" in refused.stdout
    allowed = run_service_tests(MERGELINE_TEST_ALLOW_SKIPS="1")
    assert allowed.returncode == 0 and "skipped" in allowed.stdout, allowed.stdout[-2000:]
