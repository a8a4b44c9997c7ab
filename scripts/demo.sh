#!/usr/bin/env bash
# One command from a fresh clone: install into .venv/, start the embedded service (SQLite + embedded broker +
# one local worker, all under .icd/), run a small distillation study on synthetic shapes (a teacher, the `none`
# and ICD students on two seeds), print its leaderboard and verdict, and leave the server running.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${ICD_PORT:-8000}
URL="http://127.0.0.1:${PORT}"

echo "== installing into .venv/ (first run: ~3 min)"
bash scripts/setup.sh

if ! curl -sf "${URL}/version" >/dev/null 2>&1; then
  echo "== starting the embedded service on ${URL} (log: .icd/serve.log)"
  mkdir -p .icd
  nohup .venv/bin/icd serve --host 127.0.0.1 --port "${PORT}" >.icd/serve.log 2>&1 &
  echo $! >.icd/serve.pid
fi

echo "== demo: a study: teacher, then the none and ICD students on two seeds, and its verdict (about 20 minutes on 2 CPU cores)"
.venv/bin/python scripts/demo.py --url "${URL}"

echo
echo "The service is still running (pid $(cat .icd/serve.pid 2>/dev/null || echo '?')):"
echo "  docs UI   ${URL}/docs"
echo "  dashboard ${URL}/"
echo "  stop it:  kill \$(cat .icd/serve.pid)"
