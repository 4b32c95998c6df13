"""`python -m bench.demo_time`: time `mergeline demo` as a user runs it, beside `--busy` CPU-bound processes (the
"other work" of a shared machine), and write bench/results/demo.json: wall and CPU seconds, each stage's time,
the load average before and after, the cores, and the accuracies the demo printed."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BUSY_LOOP = "while True: pass"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--busy", type=int, default=1, help="CPU-bound processes running beside the demo")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.json")
    args = parser.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    try:
        time.sleep(2)  # let the busy loops take their cores
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as cwd:
            started = time.monotonic()
            demo = subprocess.run([sys.executable, "-c", "from mergeline.cli import main; main()", "demo", "--json"],
                                  cwd=cwd, capture_output=True, text=True, check=True)
            wall = time.monotonic() - started
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the demo only: the busy loops still run
        load_after = os.getloadavg()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    report = json.loads(demo.stdout)
    result = {
        "command": f"python -m bench.demo_time --busy {args.busy}",
        "cores": len(os.sched_getaffinity(0)),
        "busy_processes": args.busy,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(children.ru_utime + children.ru_stime, 1),
        "threads": report["threads"],
        "stage_seconds": report["seconds"],
        "avg_accuracy": {"individual": report["individual"]["avg_accuracy"],
                         **{m: r["avg_accuracy"] for m, r in report["methods"].items()}},
        "accuracy": {m: {t: v["accuracy"] for t, v in r["tasks"].items()}
                     for m, r in {"individual": report["individual"], **report["methods"]}.items()},
        "config": report["config"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
