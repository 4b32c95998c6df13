"""`mergeline demo` at a small size: its report and closing screen, and every next command the screen prints, run
as printed from the directory the demo ran in (the service on a free port instead of 8000)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open

from core.errors import InvalidInput
from mergeline.demo import DemoConfig, _base, run_demo
from mergeline.demo.base import SHIPPED_BASE, SHIPPED_RECORD, BaseConfig, sha256_of, shipped_base
from mergeline.demo.screen import closing_panel, print_next_commands
from tests.service.svc_procs import free_port, mergeline_cmd, wait_http

ROOT = Path(__file__).resolve().parents[1]
SMALL = DemoConfig(finetune_steps=8, calib_size=32, eval_size=64, otmf_steps=4)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, run from a fresh directory as a user would: (that directory, the report, the screen's text)."""
    cwd = tmp_path_factory.mktemp("user")
    before = Path.cwd()
    os.chdir(cwd)
    try:
        report = run_demo(Path("mergeline-data/demo"), n_tasks=2, config=SMALL, threads=1)
    finally:
        os.chdir(before)
    screen = Console(record=True, width=100, file=open(os.devnull, "w"))  # noqa: SIM115
    screen.print(closing_panel(report))
    print_next_commands(screen, report)
    return cwd, report, screen.export_text()


def printed_commands(screen: str) -> list[str]:
    lines = screen.split("Next:", 1)[1].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_the_demo_reports_accuracy_timings_and_where_its_files_are(demo_run):
    cwd, report, screen = demo_run
    demo_dir = cwd / "mergeline-data" / "demo"
    assert report["tasks"] == ["mnist", "digits"] and set(report["methods"]) == {"otmf", "task_arithmetic"}
    for metrics in report["methods"].values():
        assert set(metrics["tasks"]) == {"mnist", "digits"} and 0 <= metrics["avg_accuracy"] <= 1
    assert report["threads"] == 1 and report["seconds"]["total"] > 0
    assert sorted(p.name for p in (demo_dir / "jobs").iterdir()) == [
        "demo-otmf-1.json", "demo-otmf-2.json", "demo-task-arithmetic-1.json", "demo-task-arithmetic-2.json"]
    assert report["store"] == str(demo_dir / "store") and str(demo_dir / "store") in screen
    assert str(demo_dir / "jobs") in screen


def run_printed(command: str, cwd: Path, env: dict[str, str], url: str, **kwargs) -> subprocess.CompletedProcess:
    """A printed command as a shell would run it: leading NAME=value words are its environment."""
    words = shlex.split(command.replace("http://127.0.0.1:8000", url))
    assignments = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    assert words[0] == "mergeline", command
    args = mergeline_cmd(*words[1:])
    if kwargs.pop("background", False):
        return subprocess.Popen(args, cwd=cwd, env={**env, **assignments}, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    return subprocess.run(args, cwd=cwd, env={**env, **assignments}, capture_output=True, text=True, timeout=240)


def test_every_next_command_works_as_printed(demo_run):
    cwd, report, screen = demo_run
    commands = printed_commands(screen)
    assert [c["command"] for c in report["next"]] == commands
    listing, show, pull, serve, submit, show_api = commands
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERGELINE_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), MERGELINE_URL=url, OMP_NUM_THREADS="1")  # the printed commands use port 8000

    listed = run_printed(listing, cwd, env, url)
    assert listed.returncode == 0 and "demo-otmf" in listed.stdout and "demo-task-arithmetic" in listed.stdout
    shown = run_printed(show, cwd, env, url)
    assert shown.returncode == 0 and "head v2" in shown.stdout, shown.stdout + shown.stderr
    pulled = run_printed(pull, cwd, env, url)
    assert pulled.returncode == 0, pulled.stderr
    assert (cwd / "mergeline-data" / "demo" / "pulled" / "model.safetensors").exists()

    server = run_printed(f"{serve} --port {port}", cwd, env, url, background=True)
    try:
        wait_http(f"{url}/healthz", timeout=90)
        submitted = run_printed(submit, cwd, env, url)
        assert submitted.returncode == 0 and "succeeded" in submitted.stdout, submitted.stdout + submitted.stderr
        through_api = run_printed(show_api, cwd, env, url)
        assert through_api.returncode == 0 and "head v1" in through_api.stdout, through_api.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_shipped_base_matches_its_record(demo_run):
    _, report, _ = demo_run
    record = json.loads(SHIPPED_RECORD.read_text())
    assert sha256_of(SHIPPED_BASE) == record["sha256"] == report["config"]["base_sha256"]
    assert SHIPPED_BASE.stat().st_size == record["bytes"] < 2_000_000
    assert record["settings"] == asdict(BaseConfig()) and record["command"].endswith("python -m mergeline.demo.base")


def test_an_altered_base_is_refused_and_nothing_is_copied(tmp_path):
    altered = tmp_path / "base.safetensors"
    data = bytearray(SHIPPED_BASE.read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="sha256"):
        shipped_base(tmp_path / "into", weights=altered)
    assert not (tmp_path / "into").exists()


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118


def test_pretraining_on_the_spot_makes_a_base_like_the_shipped_one(tmp_path):
    made = _base(tmp_path / "base", BaseConfig(glyphs=200, steps=2), Progress(disable=True))
    assert made == tmp_path / "base" / "model.safetensors"
    assert tensor_shapes(made) == tensor_shapes(SHIPPED_BASE)
    assert sha256_of(made) != sha256_of(SHIPPED_BASE)
