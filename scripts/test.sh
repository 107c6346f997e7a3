#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the linters, the type checker and the whole test suite.
# Exits non-zero on any failure, including pytest finding no tests (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$status"
