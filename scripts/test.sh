#!/usr/bin/env bash
# Runs the whole test suite (the service tests expect Redis on 127.0.0.1:6379; .ci/run starts one if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
