"""Helpers shared by the bench scripts: result files, the machine's description, peak-memory probes."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"  # committed: every table of docs/benchmarks.md renders from these
DOCS = ROOT / "docs"


def fork_pool(jobs: int, setup: Callable[..., None] | None = None, *args: Any) -> ProcessPoolExecutor:
    """`jobs` worker processes forked from this one, so they inherit its state (a suite's seal on eval data
    included), each on one torch thread and then `setup(*args)`."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start,
                               initargs=(setup, args))


def _worker_start(setup: Callable[..., None] | None, args: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    if setup is not None:
        setup(*args)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "generated_at": now(), "machine": machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def read_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> dict:
    """What the figures were measured on, including how loaded the machine was when they were."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "gpu": gpu(),
            "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "none (CPU only)"


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout: float = 1800) -> dict:
    """Run a command in a fresh process under /usr/bin/time-like accounting: wall seconds and its peak RSS.

    The peak comes from wait4's rusage of that one child, so earlier children do not leak into it."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{cmd[:3]} timed out after {timeout}s") from None
    wall = time.perf_counter() - started
    # communicate() already reaped the child; its rusage is folded into RUSAGE_CHILDREN, so use the per-child
    # figure the child prints itself where we control the child, and this as a fallback.
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "stdout": out, "stderr": err}


def time_rss_cmd(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that its own peak RSS is printed on the last stderr line (BENCH_MAXRSS_KIB=...)."""
    wrapper = (
        "import os, resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(f'BENCH_MAXRSS_KIB={ru.ru_maxrss}', file=sys.stderr)\n"
        "sys.exit(p.returncode)\n"
    )
    return [sys.executable, "-c", wrapper, *map(str, cmd)]


def parse_maxrss_mib(stderr: str) -> float:
    for line in reversed(stderr.splitlines()):
        if line.startswith("BENCH_MAXRSS_KIB="):
            return int(line.split("=", 1)[1]) / 1024
    raise ValueError("no BENCH_MAXRSS_KIB line in the child's stderr")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
