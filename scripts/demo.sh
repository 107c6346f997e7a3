#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: build (or reuse) the tiny Linux guest, boot two
# of them concurrently, run commands in each, show QMP events and timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trio_qemu demo "$@"
