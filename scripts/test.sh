#!/usr/bin/env bash
# Run the whole test suite (unit, service on SQLite + PostgreSQL + Redis, end-to-end) in .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
