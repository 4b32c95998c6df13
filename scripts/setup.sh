#!/usr/bin/env bash
# Creates .venv with Mergeline and everything its engine, service and tests need. Safe to re-run: it only
# reinstalls when pyproject.toml or the torch pin changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Mergeline needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.mergeline-installed
want=$(cat pyproject.toml requirements/torch.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # About 7 GB in all, most of it PyTorch's CUDA libraries; pip shows each download's progress.
  echo "[1/3] pip itself"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone: its pinned CUDA build also runs on the CPU, and torchvision must match it.
  echo "[2/3] PyTorch and torchvision (about 5 GB; the longest step)"
  .venv/bin/python -m pip install --progress-bar on -r requirements/torch.txt
  echo "[3/3] Mergeline with its engine, service and test extras"
  .venv/bin/python -m pip install --progress-bar on -e ".[engine,service,test]"
  echo "$want" > "$stamp"
  echo "done: .venv holds $(du -sh .venv | cut -f1)"
else
  echo ".venv is up to date (delete $stamp to reinstall)"
fi
