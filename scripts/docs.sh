#!/usr/bin/env bash
# Build the API reference (Sphinx, from the docstrings) into docs/_build/html.
# Warnings are errors; --keep-going reports them all before failing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/sphinx-build ]; then
  echo "docs: installing trio_qemu (editable) with its dev extra (sphinx, sphinxcontrib-trio)"
  .venv/bin/python -m pip install -q -e '.[dev]'
fi
# -E: read every page afresh, so that each run reports every warning (an incremental
# build would stay silent about pages it does not re-read).
exec .venv/bin/sphinx-build -W --keep-going -q -E -b html docs docs/_build/html "$@"
