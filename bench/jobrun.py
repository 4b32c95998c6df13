"""Run one job spec through `run_job` in this process and print its result as JSON (one line, last on stdout).

Used by the peer and cost benchmarks so that each measured job runs in a fresh process, whose wall time and peak
RSS belong to that job alone:  python -m bench.jobrun SPEC.json STORE_URI ALLOWED_ROOT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.common import peak_rss_mib


def main() -> None:
    spec_path, store_uri, allowed = sys.argv[1:4]
    started = time.perf_counter()
    from core.settings import Settings
    from core.spec import JobSpec
    from core.store import LineageStore
    from engine.job import run_job

    imported = time.perf_counter()
    settings = Settings(store=store_uri, allowed_roots=allowed, device="cpu")
    spec = JobSpec.model_validate(json.loads(Path(spec_path).read_text()))
    result = run_job(spec, LineageStore(settings.store), settings=settings)
    done = time.perf_counter()
    print(json.dumps({"version": result["version"], "metrics": result["metrics"], "import_s": imported - started,
                      "job_s": done - imported, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
