"""`pip install .` without extras: the client commands and `service.client` work with only the base dependencies
importable, and the commands that need an extra say which one. Every installed module outside the base
dependencies' closure is made unimportable in a child process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "engine", "service", "worker", "mergeline", "bench", "tests"}


def base_closure() -> set[str]:
    """The distributions `pip install .` brings: the base dependencies and theirs (no extras), normalised."""
    todo = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in distribution(name).requires or []]
    return seen


def blocked_modules() -> list[str]:
    allowed = base_closure()
    return sorted(module for module, dists in packages_distributions().items()
                  if module not in OURS and not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists))


def run_client_only(code: str) -> subprocess.CompletedProcess:
    guard = f"""
import importlib.abc, sys
BLOCKED = set({blocked_modules()!r})
class ExtrasAbsent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, ExtrasAbsent())
"""
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def cli(*args: str) -> str:
    return f"import sys; sys.argv = ['mergeline', *{list(args)!r}]; from mergeline.cli import main; main()"


def test_the_guard_hides_the_extras():
    blocked = blocked_modules()
    assert {"torch", "fastapi", "celery", "open_clip"} <= set(blocked) and "httpx" not in blocked
    hidden = run_client_only("import torch")
    assert hidden.returncode == 1 and "No module named 'torch'" in hidden.stderr


def test_client_commands_work_without_extras(tmp_path):
    ok = run_client_only("from service.client import MergelineClient; import mergeline.cli; print('ok')")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    listed = run_client_only(cli("lineage", "list", "--store", str(tmp_path), "--json"))
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"data": []}, listed.stderr
    gone = run_client_only(cli("status", "job_x", "--url", "http://127.0.0.1:1", "--token", "t"))
    assert gone.returncode == 1 and "http://127.0.0.1:1" in gone.stderr, gone.stderr  # a client error, not an import


def test_commands_that_need_an_extra_name_it(tmp_path):
    for args, extra in ((["serve"], "service"), (["demo", "--workdir", str(tmp_path)], "engine")):
        ran = run_client_only(cli(*args))
        assert ran.returncode == 2 and f"needs the `{extra}` extra" in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr
