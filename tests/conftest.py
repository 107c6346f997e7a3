"""Shared fixtures: a real QEMU (`-machine none`) on a socketpair monitor."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from trio_qemu._transport import socketpair_stream

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


async def _kill(process: trio.Process) -> None:
    process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()


@dataclass
class BareQemu:
    """A `-machine none` QEMU whose monitor is the other end of ``stream``."""

    process: trio.Process
    stream: trio.SocketStream
    argv: list[str]


@pytest.fixture
async def bare_qemu(nursery: trio.Nursery) -> AsyncIterator[BareQemu]:
    """QEMU started with trio.run_process in the test's nursery; killed and reaped after."""
    ours, theirs = socketpair_stream()
    fd = theirs.fileno()
    argv = [
        QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-chardev", f"socket,id=mon,fd={fd}", "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            pass_fds=(fd,),
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            deliver_cancel=_kill,
        )
    )
    theirs.close()
    try:
        yield BareQemu(process, ours, argv)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
            await ours.aclose()
