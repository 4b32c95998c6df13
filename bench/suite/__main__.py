"""`python -m bench.suite`: build (or reuse) the suite and print its base and individual accuracies."""

import json

from bench.suite import get_suite

suite = get_suite()
print(json.dumps({"build_seconds": suite["build_seconds"], "base_accuracy": suite["base_accuracy"],
                  "individual": {n: t["individual_accuracy"] for n, t in suite["tasks"].items()}}, indent=2))
