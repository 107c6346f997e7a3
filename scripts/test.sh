#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the linter, the type checker, the API docs build and the
# whole test suite, then the pytest plugin's example spread over two processes with pytest-xdist.
# Exits non-zero on any failure, including pytest finding no tests (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy --strict"; .venv/bin/mypy
echo "== docs (Sphinx, warnings are errors)"; bash scripts/docs.sh
echo "== pytest"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
# The README's pytest-xdist recipe, on the pytest plugin's example (outside testpaths).
echo "== pytest -n 2 examples/test_two_nodes.py (pytest-xdist)"
.venv/bin/python -m pytest -n 2 -p no:cacheprovider examples/test_two_nodes.py || status=$?
exit "$status"
