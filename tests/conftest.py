"""Shared fixtures: an S3 endpoint (moto's server over real HTTP) and settings rooted in a temp folder."""

from __future__ import annotations

import os
import uuid

import pytest

# One compute thread per process: the suite runs servers, workers and tests side by side on few cores, and
# oversubscribed OpenMP threads make small models ten times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint for the whole session; credentials and AWS_ENDPOINT_URL set in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the kernel picks a free one
    server.start()
    port = server.get_host_and_port()[1]
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A fresh lineage store, once over a local folder and once over moto's S3 server."""
    from core.store import LineageStore

    if request.param == "file":
        return LineageStore((tmp_path / "store").as_uri())
    bucket = request.getfixturevalue("s3_bucket")
    return LineageStore(f"s3://{bucket}/prefix")


@pytest.fixture
def settings(tmp_path):
    from core.settings import Settings

    return Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))


DEMO_TASKS = ["mnist", "shapes", "gratings"]


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    """A small demo suite (base, fine-tunes, calibration, eval and head data) built once per session."""
    from bench.suite.build import build_suite

    root = tmp_path_factory.mktemp("suite")
    # The quick label-free proxy and a large fine-tuning step: task vectors that differ clearly after a few steps.
    return build_suite(root, DEMO_TASKS, proxy="rotation", pretrain_steps=30, finetune_steps=40, finetune_lr=1e-3,
                       calib_size=48, eval_size=96), root


@pytest.fixture
def env(suite, tmp_path):
    """The suite with a fresh file store and settings that may read both."""
    from core.settings import Settings
    from core.store import LineageStore

    data, root = suite
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=f"{root},{tmp_path}")
    return data, root, settings, LineageStore(settings.store)


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is a real part that was missing (Redis, redis-server): the run fails unless the caller asked
    for skips with MERGELINE_TEST_ALLOW_SKIPS=1, so a green run always means every test ran."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and exitstatus == 0 and os.environ.get("MERGELINE_TEST_ALLOW_SKIPS") != "1":
        reporter.ensure_newline()
        reporter.write_line(f"{skipped} test(s) skipped: failing the run (set MERGELINE_TEST_ALLOW_SKIPS=1 to allow)",
                            red=True)
        session.exitstatus = 1

