"""The guest relay's program: ``files/trio-relay.c``, compiled statically for the tiny guest.

The tiny guest has no compiler and no C library, so the relay (the guest end of
:mod:`trio_qemu.relay`) is built on the host, as the guest is, with the host's C compiler:
``cc -static -Os -s`` (on Debian, ``gcc`` and ``libc6-dev``). Without a compiler (or when
the build fails) the guest is built without the relay: ``/bin/trio-relay`` is then a script
that sleeps, so that init, which restarts it whenever it ends, stays idle; the image
records it (``GuestImage.relay`` is False, and its ``config()`` leaves ``relay`` off), and
the relay features raise :class:`~trio_qemu.RelayError` saying so. Whether a compiler was
found goes into the cache key, with the source's hash: installing one later builds a new
guest, with the relay.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .._errors import GuestBuildError
from .apt import _run

__all__ = ["RELAY_PATH", "compile_relay", "relay_digest"]

RELAY_PATH: Final = "/bin/trio-relay"
"""Where the tiny guest holds the relay (init runs it on the relay port, restarting it)."""

#: The source, shipped as package data beside the guest's other files.
_SOURCE: Final = (
    importlib.resources.files("trio_qemu.guest") / "files" / "trio-relay.c"
).read_bytes()

#: What /bin/trio-relay is in a guest built without a compiler: init restarts the relay
#: whenever it exits, so this must not exit.
RELAY_STUB: Final = (
    b"#!/bin/sh\n"
    b"# This guest was built without a C compiler: it has no relay (see trio_qemu.guest).\n"
    b"while :; do sleep 86400; done\n"
)

#: The compilers tried, in order.
_COMPILERS: Final = ("cc", "gcc", "clang")
_FLAGS: Final = ("-static", "-Os", "-s")


def _compiler() -> str | None:
    for name in _COMPILERS:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def relay_digest() -> str:
    """What the relay adds to the guest's cache key: the source's hash, the flags, and
    whether a compiler is at hand (a guest built without one has no relay)."""
    digest = hashlib.sha256(_SOURCE)
    digest.update(repr(_FLAGS).encode())
    digest.update(b"cc" if _compiler() is not None else b"no-cc")
    return digest.hexdigest()[:10]


async def compile_relay(build_dir: Path, report: Callable[[str], None]) -> bytes | None:
    """The relay compiled in ``build_dir``; None (reported) when there is no compiler or
    the build fails: the guest is then built without it."""
    compiler = _compiler()
    if compiler is None:
        report(
            "no C compiler found (cc, gcc, clang): building the guest without the relay "
            "(vm.open_tcp_stream, forward_port and file copies need it; on Debian: "
            "apt-get install gcc libc6-dev)"
        )
        return None
    source, binary = _stage(build_dir)
    try:
        await _run([compiler, *_FLAGS, "-o", str(binary), str(source)])
    except GuestBuildError as exc:
        report(
            f"compiling the relay failed; building the guest without it (is the static C "
            f"library there? on Debian: apt-get install libc6-dev): {exc.reason}"
        )
        return None
    data = _read(binary)
    report(f"compiled the relay ({len(data) / 1e3:.0f} kB)")
    return data


# Local file work is synchronous, as in the rest of the build: small, quick, no threads.


def _stage(build_dir: Path) -> tuple[Path, Path]:
    """Write the source into ``build_dir``; return it and where the binary goes."""
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / "trio-relay.c"
    source.write_bytes(_SOURCE)
    return source, build_dir / "trio-relay"


def _read(path: Path) -> bytes:
    return path.read_bytes()
