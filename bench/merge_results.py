"""Combine engine-cost parts measured by separate invocations (e.g. `--part iteration --name engine_cost-iter`)
into bench/results/engine_cost.json, keeping when and under what load each part was measured.

    .venv/bin/python -m bench.merge_results engine_cost iteration=engine_cost-iter lineage=engine_cost-lineage ...
"""

from __future__ import annotations

import sys

from bench.common import read_result, write_result


def main(argv: list[str]) -> None:
    target, pairs = argv[0], [a.split("=", 1) for a in argv[1:]]
    merged: dict = {}
    parts: dict = {}
    for part, source in pairs:
        r = read_result(source)
        if r is None or part not in r:
            raise SystemExit(f"{source} has no {part!r} result")
        merged.setdefault("arch", r.get("arch"))
        merged.setdefault("files", r.get("files"))
        merged[part] = r[part]
        parts[part] = {"generated_at": r["generated_at"], "load_avg_1m": r["machine"]["load_avg_1m"],
                       "command": r.get("command")}
    merged["parts_measured"] = parts
    write_result(target, merged)


if __name__ == "__main__":
    main(sys.argv[1:])
