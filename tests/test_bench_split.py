"""Tuning reads validation data only: once a process takes a suite's validation view it cannot open the eval files
or a report-only suite, whatever path it uses (bench/suite/split.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import numpy as np
from bench.suite.split import ReportDataSealed, validation_view

suite, report_only, probes = json.loads(sys.argv[1])
view = validation_view(suite, report_only=[report_only])
print(json.dumps({"view": view}))
for path in probes:
    try:
        np.load(path)
        print(json.dumps({path: "read"}))
    except ReportDataSealed:
        print(json.dumps({path: "sealed"}))
"""


def test_the_validation_view_names_validation_sets_and_seals_the_report_data(tmp_path: Path):
    import numpy as np

    task = tmp_path / "suite" / "tasks" / "mnist"
    text = tmp_path / "text-suite" / "tasks" / "topic"
    for folder in (task, text):
        folder.mkdir(parents=True)
    for name in ("eval.npz", "validation.npz", "calibration.npz"):
        np.savez(task / name, x=np.zeros(2))
    np.savez(text / "eval.npz", x=np.zeros(2))
    (tmp_path / "alias.npz").symlink_to(task / "eval.npz")
    suite = {"tasks": {"mnist": {"eval": (task / "eval.npz").as_uri(), "validation": (task / "validation.npz").as_uri(),
                                 "individual_accuracy": 0.9, "individual_validation_accuracy": 0.8}},
             "base_accuracy": {"mnist": 0.5}, "base_validation_accuracy": {"mnist": 0.4}}
    probes = [task / "eval.npz", tmp_path / "alias.npz", text / "eval.npz", task / "validation.npz",
              task / "calibration.npz"]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps([suite, str(tmp_path / "text-suite"),
                                                                      [str(p) for p in probes]])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    view = lines[0]["view"]["tasks"]["mnist"]
    assert view["eval"] == (task / "validation.npz").as_uri() and "validation" not in view
    assert view["individual_accuracy"] == 0.8 and lines[0]["view"]["base_accuracy"] == {"mnist": 0.4}
    outcome = {k: v for line in lines[1:] for k, v in line.items()}
    assert outcome == {str(probes[0]): "sealed", str(probes[1]): "sealed", str(probes[2]): "sealed",
                       str(probes[3]): "read", str(probes[4]): "read"}
