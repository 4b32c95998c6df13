"""The service side of the `mergeline` command: `serve`, `worker`, and `submit`/`status`/`cancel` against the API.

`register(app)` adds them to the main typer app (mergeline/cli.py). Nothing here imports torch: only the worker's
pool processes load the engine, when they run a job.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from core.settings import Settings, get_settings
from core.statuses import FINAL
from mergeline.bars import losses_text
from service.client import ApiError, Job, MergelineClient

console = Console()
err = Console(stderr=True)

UrlOpt = typer.Option("http://127.0.0.1:8000", "--url", envvar="MERGELINE_URL", help="the API's base URL")
TokenOpt = typer.Option(None, "--token", envvar="MERGELINE_TOKEN", help="bearer token")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")


def _client(url: str, token: str | None) -> MergelineClient:
    return MergelineClient(url, token)


def _fail(exc: ApiError, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": {"type": exc.type, "message": exc.message, "param": exc.param}}) + "\n")
    else:
        err.print(error_line(exc.type, exc.message))
    raise typer.Exit(1)


def error_line(type: str, message: str) -> Text:
    """`error (type): message`, the server's or the user's text printed as it is (never read as markup)."""
    return Text.assemble(("error", "red"), f" ({type}): {message}")


def print_step_warnings(metrics: dict) -> None:
    """One line per step whose method warned (e.g. OTMF's masks never beat the all-ones start)."""
    for step in metrics.get("steps") or []:
        if step.get("warning"):
            console.print(Text.assemble(("warning", "yellow"), f" {step['task']}: {step['warning']}"))


def _print_job(job: Job, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(job, indent=2) + "\n")
        return
    line = Text.assemble(f"{job['id']}  {job['lineage']}  ", (job["status"], "bold"), f"  {job['method']}")
    progress = job.get("progress")
    if progress and job["status"] == "running":
        line.append(f"  task {progress['task_index'] + 1}/{progress['tasks_total']}"
                    f"  step {progress['step']}/{progress['steps_total']}")
    console.print(line)
    if job.get("result"):
        metrics = job["result"].get("metrics") or {}
        avg = metrics.get("avg_accuracy")
        console.print(f"  version {job['result']['version']}" + ("" if avg is None else f"  avg accuracy {avg:.4f}"))
        print_step_warnings(metrics)
    if job.get("error"):
        console.print(Text.assemble("  ", (job["error"]["type"], "red"), f": {job['error']['message']}"))


# -- embedded mode ----------------------------------------------------------------------------------------------
def start_embedded_redis(host: str = "127.0.0.1") -> tuple[str, Any]:
    """A Redis-protocol server in this process (fakeredis), so the embedded service runs the production code
    paths (job records, Celery's Redis transport) with no external server. Returns (url, server)."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, 0), server_type="redis")
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="mergeline-embedded-redis", daemon=True).start()
    return f"redis://{host}:{server.server_address[1]}/0", server


def _die_with_parent() -> None:
    """In the embedded worker's child: end it if `serve` dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_worker(env: dict[str, str]) -> subprocess.Popen:
    """The embedded worker: no banner, and its output on stderr, so that `serve`'s stdout holds only its block."""
    code = "from mergeline.cli_remote import run_worker; run_worker(quiet=True)"
    return subprocess.Popen([sys.executable, "-c", code], env=env, preexec_fn=_die_with_parent, stdout=sys.stderr)


def run_worker(concurrency: int | None = None, loglevel: str | None = None, *, quiet: bool = False) -> None:
    """Start a Celery worker on the configured broker (blocks); `quiet` leaves out Celery's banner."""
    settings = get_settings()
    if not settings.broker_url:
        err.print("[red]error[/red]: `mergeline worker` needs MERGELINE_BROKER_URL (e.g. redis://localhost:6379/0); "
                  "`mergeline serve` with no broker runs an embedded worker itself")
        raise typer.Exit(2)
    from mergeline.compose import worker_app

    argv = ["worker", "--loglevel", (loglevel or settings.log_level).upper(), "-Q", settings.queue,
            "--concurrency", str(concurrency or settings.worker_concurrency), "-n", f"mergeline-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    if quiet:
        argv.insert(0, "--quiet")  # a global option of the `celery` command, before the subcommand
    worker_app(settings).worker_main(argv)


def serve_command(host: str, port: int, settings: Settings | None = None) -> None:
    import uvicorn

    from mergeline.compose import api_app

    settings = settings or get_settings()
    worker: subprocess.Popen | None = None
    redis_server = None
    updates: dict[str, Any] = {}
    generated = None
    if not settings.api_tokens:
        generated = secrets.token_urlsafe(24)
        updates["api_tokens"] = f"{generated}=default"
    if not settings.broker_url:
        url, redis_server = start_embedded_redis()
        updates.update(broker_url=url, redis_url=url)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MERGELINE_BROKER_URL": url, "MERGELINE_REDIS_URL": url,
               "MERGELINE_API_TOKENS": updates.get("api_tokens", settings.api_tokens or "")}
        worker = spawn_worker(env)
    settings = settings.model_copy(update=updates)
    sys.stdout.write(serve_block(f"http://{host}:{port}", settings, generated, embedded=worker is not None))
    sys.stdout.flush()
    try:
        uvicorn.run(api_app(settings), host=host, port=port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if redis_server is not None:
            redis_server.shutdown()


def serve_block(url: str, settings: Settings, token: str | None, *, embedded: bool) -> str:
    """What `serve` prints on stdout, once: where the API is, how to call it, and what it runs on. Logs go to
    stderr."""
    broker = settings.broker_url
    if embedded:
        broker = "embedded (a Redis-protocol server in this process and one worker process)"
    lines = [
        "mergeline serve",
        f"  API     {url}",
        f"  docs    {url}/docs",
        f"  ui      {url}/ui",
        f"  token   {token} (tenant default)" if token else "  token   from MERGELINE_API_TOKENS",
        f"  store   {settings.store}",
        f"  broker  {broker}",
        "",
        f"export MERGELINE_URL={url}" + (f" MERGELINE_TOKEN={token}" if token else ""),
        f"curl -H \"Authorization: Bearer ${{MERGELINE_TOKEN}}\" {url}/v1/jobs",
    ]
    return "\n".join(lines) + "\n"


# -- commands ---------------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command()
    def serve(host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port")) -> None:
        """The API; with no broker configured also an embedded worker and Redis-protocol server (no setup)."""
        serve_command(host, port)

    @app.command()
    def worker(concurrency: int = typer.Option(None, "--concurrency", "-c", help="pool processes (default 1)"),
               loglevel: str = typer.Option(None, "--loglevel")) -> None:
        """A Celery worker on MERGELINE_BROKER_URL (uses the GPU when one is visible)."""
        run_worker(concurrency, loglevel)

    @app.command()
    def submit(job: Path = typer.Argument(..., help="job spec JSON file (contract §2)"),
               wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
               idempotency_key: str = typer.Option(None, "--idempotency-key"),
               url: str = UrlOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
        """Submit a job to the API."""
        try:
            spec = json.loads(job.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            _fail(ApiError(0, "invalid_input", f"{job}: {exc}"), as_json)
        with _client(url, token) as client:
            try:
                created = client.submit(spec, idempotency_key=idempotency_key)
                final = _follow(client, created, quiet=as_json) if wait else created
            except ApiError as exc:
                _fail(exc, as_json)
        _print_job(final, as_json)
        if wait and final["status"] != "succeeded":
            raise typer.Exit(1)

    @app.command()
    def status(job_id: str, url: str = UrlOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
        """Show a job."""
        with _client(url, token) as client:
            try:
                job = client.get(job_id)
            except ApiError as exc:
                _fail(exc, as_json)
        _print_job(job, as_json)

    @app.command()
    def cancel(job_id: str, url: str = UrlOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
        """Cancel a job: at once when queued, at its next step when running. Exits 1 when the job had already
        ended (nothing was cancelled)."""
        with _client(url, token) as client:
            try:
                before = client.get(job_id)
                job = before if before["status"] in FINAL else client.cancel(job_id)
            except ApiError as exc:
                _fail(exc, as_json)
        _print_job(job, as_json)
        if before["status"] in FINAL:
            if not as_json:
                err.print(f"nothing to cancel: the job had already ended ({before['status']})", markup=False)
            raise typer.Exit(1)


def _follow(client: MergelineClient, job: Job, *, quiet: bool) -> Job:
    """Poll the job until it ends, drawing its progress (on stderr, so --json output stays clean)."""
    if quiet:
        return client.wait(job["id"], poll=0.5)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{job['id']} queued", total=None, loss="")
        while job["status"] not in FINAL:
            time.sleep(0.5)
            job = client.get(job["id"])
            progress = job.get("progress")
            if progress:
                latest = {None: progress["loss"]} if progress.get("loss") is not None else {}
                losses = progress.get("losses") or latest
                loss = losses_text(losses)
                bar.update(task, total=progress["steps_total"], completed=progress["step"], loss=loss,
                           description=f"{job['status']} task {progress['task_index'] + 1}/{progress['tasks_total']}")
            else:
                bar.update(task, description=f"{job['id']} {job['status']}")
        if job["status"] == "succeeded":
            bar.update(task, completed=bar.tasks[0].total or 1, total=bar.tasks[0].total or 1)
    return job
