#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo. Until the guest demo lands this is the QMP
# example: launch QEMU, query it, stop/continue it while watching the events.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/hello_qmp.py "$@"
