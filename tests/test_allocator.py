"""MERGELINE_MALLOC_MMAP_THRESHOLD: a data-driven job's process returns freed tensors to the kernel at once, so
its peak memory follows its live memory. Each case runs a real job in a fresh process (the allocator's settings are
process-wide), then frees every other one of 48 blocks of 8 MiB and reports how much memory the process gave back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.suite.build import task_entry

ROOT = Path(__file__).resolve().parents[1]

AFTER_A_JOB = """
import json, sys
import torch
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from engine.job import run_job

spec, settings = json.loads(sys.argv[1]), Settings(**json.loads(sys.argv[2]))
run_job(parse_job_spec(spec), LineageStore(settings.store), settings=settings)

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

blocks = [torch.ones(2**21) for _ in range(48)]  # 8 MiB each, every page touched
held = rss_mib()
del blocks[::2]  # holes between the blocks still alive
print(json.dumps({"given_back_mib": held - rss_mib()}))
"""


def given_back_after_a_job(data, root, tmp_path, threshold: int | None) -> float:
    spec = {"lineage": f"alloc-{threshold or 0}", "base": data["base"], "method": "otmf",
            "tasks": [task_entry(data, n) for n in ("mnist", "shapes")],
            "params": {"steps": 2, "batch_size": 8, "pre_data": "current"}}
    settings = {"store": (tmp_path / "store").as_uri(), "allowed_roots": f"{root},{tmp_path}",
                "malloc_mmap_threshold": threshold}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", AFTER_A_JOB, json.dumps(spec), json.dumps(settings)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["given_back_mib"]


def test_a_data_driven_job_with_the_threshold_returns_freed_tensors_to_the_kernel(env, tmp_path):
    data, root, _, _ = env
    default = given_back_after_a_job(data, root, tmp_path, None)
    mapped = given_back_after_a_job(data, root, tmp_path, 2**20)
    print(f"freed 192 MiB; given back: {default:.0f} MiB with glibc's default, {mapped:.0f} MiB with the threshold")
    assert mapped > 180  # every freed block, at once
    assert default < 100  # glibc's default keeps them: the comparison measures the setting, not the pattern
