#!/usr/bin/env bash
# Set up everything trio_qemu needs on a Debian 12 machine (as root): QEMU and busybox from
# Debian's packages when missing, a venv in .venv, the package in editable mode with its
# dev extra. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86 qemu-utils)
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)  # qemu-img, qemu-io (trio_qemu.block)
[ -x /bin/busybox ] || command -v busybox >/dev/null || need_apt+=(busybox-static)
# The guest's relay (trio_qemu.relay) is compiled, statically, when the tiny guest is built.
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
export DEBIAN_FRONTEND=noninteractive
apt_updated=0
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian's packages"
  apt-get update -q
  apt_updated=1
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
# The tiny test guest is built from the kernel package's .deb: apt must know the package.
if [ "$apt_updated" = 0 ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "setup: refreshing apt's package lists (needed to fetch the guest kernel)"
  apt-get update -q
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c 'import trio_qemu, pytest_trio, hypothesis, mypy, ruff, xdist, sphinx, sphinxcontrib_trio' 2>/dev/null; then
  echo "setup: installing trio_qemu (editable) with its dev extra"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
fi
