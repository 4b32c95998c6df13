"""`python -m bench.demo_select`: choose the demo's fine-tuning learning rate and OTMF α on held-out training
images (DemoConfig.holdout), never on the test split the demo reports. Each candidate runs the whole demo on the
shipped base with the candidate's settings, and the one whose OTMF merge scores highest is chosen; writes
bench/results/demo_select.json."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from mergeline.demo import DemoConfig, run_demo

RESULTS = Path(__file__).resolve().parent / "results"


def validation_accuracy(config: DemoConfig) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        report = run_demo(Path(workdir), config=config, threads=1)
    return {"individual": report["individual"]["avg_accuracy"],
            **{m: r["avg_accuracy"] for m, r in report["methods"].items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="candidates run at once, one torch thread each")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_select.json")
    args = parser.parse_args(argv)
    base = DemoConfig(holdout=args.holdout, eval_size=args.holdout)
    candidates = [replace(base, finetune_lr=lr, otmf_alpha=alpha) for lr in args.lr for alpha in args.alpha]
    with ProcessPoolExecutor(args.jobs) as pool:
        scores = list(pool.map(validation_accuracy, candidates))
    rows = [{"finetune_lr": c.finetune_lr, "otmf_alpha": c.otmf_alpha, "validation": s}
            for c, s in zip(candidates, scores, strict=True)]
    best = max(rows, key=lambda r: r["validation"]["otmf"])
    command = " ".join(["python -m bench.demo_select", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "holdout": args.holdout,
              "fixed": {"finetune_steps": base.finetune_steps, "otmf_steps": base.otmf_steps}, "candidates": rows,
              "chosen": {"finetune_lr": best["finetune_lr"], "otmf_alpha": best["otmf_alpha"]}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
