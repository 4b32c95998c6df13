"""Service cost: job submission and status-poll throughput and latency (p50/p99) against the real service.

Starts, on loopback only, a real `redis-server` (no persistence), the API (`mergeline serve`, uvicorn) with that
Redis as broker and job store, and one Celery worker (`mergeline worker`); then an asyncio load generator (httpx,
bounded in count and in time) posts tiny data-free jobs (state_dict family, a 4 KiB checkpoint, task arithmetic)
and polls their status. Everything it started is stopped at the end, by process id.

    .venv/bin/python -m bench.service_load [--jobs 1000] [--polls 3000] [--concurrency 32] [--seconds 60]
                                           [--wrk-seconds 15] [--no-wrk]

Each phase reports the client's latency (p50/p99) and the API's own (`Server-Timing`), requests per second and
errors: submission, status polls while the worker runs the submitted jobs, and status polls once it is idle. Every
submitted job is then followed to its end (`jobs_outcome`: a lost job would show as `http 404`).

The polls are sent by `wrk` when it is installed (`apt-get install wrk`), for `--wrk-seconds` each: a Python client
on the same few cores costs more CPU per request than the API does and would measure itself. Without `wrk` (or with
`--no-wrk`), the httpx client polls too. Each phase records its `generator`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, ROOT, free_port, write_result

WORK = CACHE / "service"
TOKEN = "bench-token"


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_files() -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    base, task = WORK / "base.safetensors", WORK / "task.safetensors"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    save_file({"w": w}, base)
    save_file({"w": w + 0.01 * torch.randn(32, 32, generator=g)}, task)
    return base, task


class Services:
    """redis-server, the API and one worker, started here and stopped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self) -> str:
        redis_port, api_port = free_port(), free_port()
        shutil.rmtree(WORK / "data", ignore_errors=True)
        (WORK / "data").mkdir(parents=True)
        logs = WORK / "logs"
        logs.mkdir(exist_ok=True)
        redis = shutil.which("redis-server")
        if not redis:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self._spawn([redis, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no",
                     "--dir", str(WORK / "data")], logs / "redis.log")
        wait_port(redis_port)
        url = f"redis://127.0.0.1:{redis_port}/0"
        env = {**os.environ, "MERGELINE_BROKER_URL": url, "MERGELINE_REDIS_URL": url,
               "MERGELINE_API_TOKENS": f"{TOKEN}=bench", "MERGELINE_STORE": (WORK / "data" / "store").as_uri(),
               "MERGELINE_ALLOWED_ROOTS": str(WORK), "MERGELINE_DATA_DIR": str(WORK / "data"),
               "MERGELINE_DEVICE": "cpu", "MERGELINE_LOG_LEVEL": "WARNING",
               # The service's capacity is measured, not its per-tenant limits: one tenant sends every request.
               "MERGELINE_RATE_LIMIT": "1000000", "MERGELINE_MAX_ACTIVE_JOBS": "100000",
               "PYTHONPATH": str(ROOT)}
        cli = [sys.executable, "-c", "from mergeline.cli import main; main()"]
        self._spawn([*cli, "serve", "--host", "127.0.0.1", "--port", str(api_port)], logs / "api.log", env)
        self._spawn([*cli, "worker"], logs / "worker.log", env)
        wait_port(api_port, timeout=60)
        return f"http://127.0.0.1:{api_port}"

    def _spawn(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=WORK,
                                               start_new_session=True))

    def stop(self) -> None:
        """Worker, then API, then Redis: each gets SIGTERM (to its own session, pool children included) and 15 s."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# wrk's script: each connection polls the ids (IDS_FILE) in turn with the bearer token, each thread keeps the
# status codes and `Server-Timing` durations it saw, and `done` prints the whole run as one JSON line.
WRK_SCRIPT = r"""
local ids, threads = {}, {}
for line in io.lines(os.getenv("IDS_FILE")) do ids[#ids + 1] = line end
local auth = {["Authorization"] = "Bearer " .. os.getenv("TOKEN")}
local i = 0
server, codes = {}, {}

function setup(thread) threads[#threads + 1] = thread end

function request()
  i = i + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[i % #ids + 1], auth)
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  local timing = headers["server-timing"] or headers["Server-Timing"]
  local dur = timing and timing:match("dur=([%d.]+)")
  if dur then server[#server + 1] = tonumber(dur) end
end

function done(summary, latency, requests)
  local all, merged = {}, {}
  for _, thread in ipairs(threads) do
    for _, v in ipairs(thread:get("server")) do all[#all + 1] = v end
    for code, n in pairs(thread:get("codes")) do merged[tostring(code)] = (merged[tostring(code)] or 0) + n end
  end
  table.sort(all)
  local function pct(q) return #all > 0 and all[math.max(1, math.floor(q / 100 * (#all - 1) + 1.5))] or -1 end
  local e = summary.errors
  local parts = {}
  for code, n in pairs(merged) do parts[#parts + 1] = string.format('"%s": %d', code, n) end
  io.write(string.format('WRK_RESULT {"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, ' ..
    '"mean_ms": %.3f, "server_p50_ms": %.3f, "server_p99_ms": %.3f, "socket_errors": %d, "status_codes": {%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3, pct(50), pct(99), e.connect + e.read + e.write + e.timeout, table.concat(parts, ", ")))
end
"""


def wrk_polls(url: str, ids: list[str], *, concurrency: int, seconds: float) -> dict:
    """Status polls of `ids` by `wrk` (`concurrency` connections, two threads) for `seconds`: the phase's figures
    in the shape `stats` gives."""
    with tempfile.TemporaryDirectory() as tmp:
        script, id_file = Path(tmp) / "poll.lua", Path(tmp) / "ids.txt"
        script.write_text(WRK_SCRIPT)
        id_file.write_text("\n".join(ids) + "\n")
        threads = max(1, min(2, concurrency))
        out = subprocess.run([shutil.which("wrk"), f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s",
                              "--timeout", "10s", "-s", str(script), f"{url}/"], capture_output=True, text=True,
                             env={**os.environ, "IDS_FILE": str(id_file), "TOKEN": TOKEN}, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_RESULT "))
    r = json.loads(line.removeprefix("WRK_RESULT "))
    codes = {int(code): n for code, n in r.pop("status_codes").items()}
    errors = sum(n for code, n in codes.items() if code >= 400) + r.pop("socket_errors")
    return {**r, "per_s": r["requests"] / r["seconds"], "errors": errors, "status_codes": codes, "generator": "wrk"}


def server_ms(response) -> float | None:
    """The API's own time from its `Server-Timing: app;dur=<ms>` header."""
    timing = response.headers.get("server-timing", "")
    return float(timing.split("dur=", 1)[1]) if "dur=" in timing else None


def stats(client_s: list[float], server: list[float], elapsed: float, codes: dict[int, int]) -> dict:
    ms = [x * 1000 for x in client_s]
    return {"requests": len(ms), "seconds": elapsed, "per_s": len(ms) / elapsed if elapsed else 0.0,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "server_p50_ms": percentile(server, 50), "server_p99_ms": percentile(server, 99),
            "errors": sum(n for code, n in codes.items() if code >= 400), "status_codes": codes,
            "generator": "httpx"}


async def load(url: str, base: Path, task: Path, *, jobs: int, polls: int, concurrency: int, seconds: float,
               wrk_seconds: float | None) -> dict:
    """The phases; the polls by wrk for `wrk_seconds` each when that is given, else by the httpx client."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        ready = await client.get("/readyz")
        ids: list[str] = []

        async def run_phase(requests, on_response=None) -> dict:
            """`requests` (an iterator of (method, path, json)) sent by `concurrency` clients, time-bounded."""
            client_s: list[float] = []
            server: list[float] = []
            codes: dict[int, int] = {}
            deadline = time.monotonic() + seconds

            async def one_client() -> None:
                for method, path, body in requests:
                    if time.monotonic() > deadline:
                        return
                    t0 = time.perf_counter()
                    r = await client.request(method, path, json=body)
                    client_s.append(time.perf_counter() - t0)
                    if (ms := server_ms(r)) is not None:
                        server.append(ms)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if on_response:
                        on_response(r)

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            return stats(client_s, server, time.perf_counter() - t0, codes)

        def submits():
            for i in range(jobs):
                yield "POST", "/v1/jobs", {"lineage": f"load-{i}", "method": "task_arithmetic",
                                           "base": {"family": "state_dict", "uri": base.as_uri()},
                                           "tasks": [{"name": "t", "checkpoint": task.as_uri()}]}

        def polls_of():
            for i in range(polls):
                yield "GET", f"/v1/jobs/{ids[i % len(ids)]}", None

        async def poll_phase() -> dict:
            if wrk_seconds:
                return await asyncio.to_thread(wrk_polls, url, ids, concurrency=concurrency, seconds=wrk_seconds)
            return await run_phase(iter(polls_of()))

        submit = await run_phase(iter(submits()),
                                 lambda r: ids.append(r.json()["id"]) if r.status_code in (200, 202) else None)
        poll_busy = await poll_phase()  # while the worker runs the submitted jobs

        # Every submitted job must still be there and end: wait (bounded) for the worker to finish them.
        drain_deadline = time.monotonic() + 10 * seconds
        final: dict[str, str] = {}
        while time.monotonic() < drain_deadline:
            pending = [j for j in ids if final.get(j) not in ("succeeded", "failed", "cancelled")]
            if not pending:
                break
            for job_id in pending[:100]:
                r = await client.get(f"/v1/jobs/{job_id}")
                final[job_id] = r.json()["status"] if r.status_code == 200 else f"http {r.status_code}"
            await asyncio.sleep(0.5)
        outcome: dict[str, int] = {}
        for job_id in ids:
            outcome[final.get(job_id, "unknown")] = outcome.get(final.get(job_id, "unknown"), 0) + 1
        poll_idle = await poll_phase()  # the worker idle: the API's cost alone

    return {"readyz": ready.status_code, "submit": submit, "poll": poll_idle, "poll_while_worker_busy": poll_busy,
            "jobs_submitted": len(ids), "jobs_outcome": outcome}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--wrk-seconds", type=float, default=15.0, help="how long wrk polls in each poll phase")
    parser.add_argument("--no-wrk", action="store_true", help="poll with the httpx client even if wrk is installed")
    args = parser.parse_args(argv)
    wrk_seconds = None if args.no_wrk or not shutil.which("wrk") else args.wrk_seconds
    base, task = make_files()
    services = Services()
    try:
        url = services.start()
        result = asyncio.run(load(url, base, task, jobs=args.jobs, polls=args.polls, concurrency=args.concurrency,
                                  seconds=args.seconds, wrk_seconds=wrk_seconds))
    finally:
        services.stop()
    poller = (f"wrk ({args.concurrency} connections, {wrk_seconds:g} s a phase)" if wrk_seconds
              else "the same httpx client")
    result.update({"jobs": args.jobs, "polls": args.polls, "concurrency": args.concurrency,
                   "seconds_bound": args.seconds, "wrk_seconds": wrk_seconds,
                   "poll_generator": "wrk" if wrk_seconds else "httpx",
                   "setup": "redis-server + `mergeline serve` (uvicorn) + one `mergeline worker`, all on 127.0.0.1; "
                   f"load generator in the same machine: submissions by httpx (asyncio), polls by {poller}; "
                   "per-tenant rate and active-job limits lifted, since one tenant sends every request"})
    for phase in ("submit", "poll_while_worker_busy", "poll"):
        r = result[phase]
        print(f"[service_load] {phase} ({r['generator']}): {r['per_s']:.0f}/s p50 {r['p50_ms']:.1f} ms "
              f"p99 {r['p99_ms']:.1f} ms (API p50 {r['server_p50_ms']:.1f} p99 {r['server_p99_ms']:.1f} ms), "
              f"errors {r['errors']}")
    print(f"[service_load] jobs {result['jobs_outcome']}")
    write_result("service_load", result)
    return result


if __name__ == "__main__":
    main()
