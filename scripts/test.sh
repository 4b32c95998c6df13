#!/usr/bin/env bash
# Runs the whole test suite. The service tests need a real Redis: MERGELINE_TEST_REDIS_URL (redis://HOST:PORT) names
# one; otherwise this starts a private redis-server for the run and stops it afterwards. A skipped test fails the
# run unless MERGELINE_TEST_ALLOW_SKIPS=1 asks for skips explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -z "${MERGELINE_TEST_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null; then
    echo "The service tests need Redis: install redis-server (Debian/Ubuntu: apt-get install redis-server)," >&2
    echo "or point MERGELINE_TEST_REDIS_URL at one (redis://HOST:PORT)." >&2
    exit 2
  fi
  redis_dir=$(mktemp -d)
  port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$redis_dir" \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
  trap 'kill "$(cat "$redis_dir/redis.pid" 2>/dev/null)" 2>/dev/null; rm -rf "$redis_dir"' EXIT
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export MERGELINE_TEST_REDIS_URL="redis://127.0.0.1:$port"
  echo "test Redis: $MERGELINE_TEST_REDIS_URL (private to this run)"
fi
.venv/bin/python -m pytest "$@"
