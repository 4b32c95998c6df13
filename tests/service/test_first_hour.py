"""`mergeline serve` as a first-time user meets it: one clean block on stdout (logs on stderr), `/` leading to the
docs, and the documented Python client snippets run as printed against it, for a job that succeeds and one that
fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.svc_procs import free_port, mergeline_cmd, wait_http
from tests.service.test_service_e2e import make_inputs, spec, task

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An unconfigured `mergeline serve` in a fresh directory: (its URL, its token, directory, stdout and stderr
    files)."""
    cwd = tmp_path_factory.mktemp("user")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERGELINE_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = free_port()
    out, err = cwd / "serve.out", cwd / "serve.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(mergeline_cmd("serve", "--port", str(port)), cwd=cwd, env=env, stdout=stdout,
                                stderr=stderr, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", timeout=90)
        token = re.search(r"MERGELINE_TOKEN=(\S+)", out.read_text()).group(1)
        yield {"url": url, "token": token, "cwd": cwd, "out": out, "err": err, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def client_snippets() -> list[tuple[str, str]]:
    """(file, code) of every ```python block of the docs that uses the client."""
    found = []
    for doc in DOCS:
        for code in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            if "MergelineClient" in code:
                found.append((doc.name, code))
    return found


def test_the_docs_show_the_client(served):
    assert {name for name, _ in client_snippets()} >= {"README.md"}


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_client_snippets_run_as_printed(served, outcome):
    cwd = served["cwd"] / outcome
    inputs = make_inputs(cwd / "data", n_tasks=1)
    prefix = None if outcome == "succeeded" else f"file://{inputs['root']}/missing-"  # a checkpoint that is not there
    env = {**served["env"], "MERGELINE_URL": served["url"], "MERGELINE_TOKEN": served["token"]}
    for i, (doc, code) in enumerate(client_snippets()):
        body = spec(inputs, f"snippet-{outcome}-{i}", [task(inputs, 0, prefix=prefix)], method="task_arithmetic")
        (cwd / "job.json").write_text(json.dumps(body))
        ran = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=240)
        if outcome == "succeeded":
            assert ran.returncode == 0, f"{doc}: {ran.stderr}"
            assert (cwd / "out" / "model.safetensors").exists(), doc
        else:
            assert ran.returncode == 1, f"{doc}: {ran.stderr}"
            assert ran.stderr.startswith("failed: ") and "fetch_failed" in ran.stderr, f"{doc}: {ran.stderr}"
            assert "Traceback" not in ran.stderr, doc


def test_serve_prints_one_block_on_stdout_and_logs_on_stderr(served):
    url, token = served["url"], served["token"]
    assert served["out"].read_text() == (
        "mergeline serve\n"
        f"  API     {url}\n"
        f"  docs    {url}/docs\n"
        f"  ui      {url}/ui\n"
        f"  token   {token} (tenant default)\n"
        "  store   file://./mergeline-data/store\n"
        "  broker  embedded (a Redis-protocol server in this process and one worker process)\n"
        "\n"
        f"export MERGELINE_URL={url} MERGELINE_TOKEN={token}\n"
        f'curl -H "Authorization: Bearer ${{MERGELINE_TOKEN}}" {url}/v1/jobs\n'
    )
    err = served["err"].read_text()
    assert "-------------- " not in err and "[queues]" not in err, "Celery's banner is left out"


def test_root_leads_to_the_dashboard_which_links_the_docs(served):
    first = httpx.get(served["url"] + "/", follow_redirects=False)
    assert first.status_code == 307 and first.headers["location"] == "/ui"
    assert 'href="/docs"' in httpx.get(served["url"] + "/", follow_redirects=True).text
    assert "swagger" in httpx.get(served["url"] + "/docs").text.lower()
