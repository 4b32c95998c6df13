"""Real processes for the end-to-end tests: uvicorn, Celery workers (`mergeline worker`), moto's S3 server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its output in a log file; stopped (and reaped) by `stop`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process; closed by stop)
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {text!r} in {timeout} s:\n{self.log()[-3000:]}")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process and its children (a Celery worker's pool processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.kill_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def mergeline_cmd(*args: str) -> list[str]:
    """The `mergeline` console script of this environment (falls back to calling its entry point)."""
    script = VENV_BIN / "mergeline"
    if script.exists():
        return [str(script), *args]
    code = "import sys; from mergeline.cli import main; sys.argv[0] = 'mergeline'; main()"
    return [sys.executable, "-c", code, *args]


def start_api(env: dict[str, str], log_dir: Path, port: int | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    proc = Proc(f"api-{port}", [sys.executable, "-m", "uvicorn", "--factory", "mergeline.compose:api_app",
                                "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz")
    except TimeoutError:
        proc.stop()
        raise
    return proc, url


def start_worker(env: dict[str, str], log_dir: Path, name: str) -> Proc:
    proc = Proc(name, mergeline_cmd("worker", "--loglevel", "INFO"), env, log_dir)
    proc.wait_for_log(" ready.")
    return proc


def start_moto(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(f"moto-{port}", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                dict(os.environ), log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/moto-api/")
    return proc, url


@contextlib.contextmanager
def hook_receiver(status: Callable[[], int] = lambda: 200) -> Iterator[tuple[str, list[tuple[dict, bytes]]]]:
    """A loopback HTTP server for webhooks: yields its URL and the (headers, body) of every POST it got, each
    answered with `status()`."""
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status())
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
