"""Shared fixtures: a real QEMU (`-machine none`) on a socketpair monitor."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from reliability import make_base

from trio_qemu._transport import socketpair_stream
from trio_qemu._util import only_cancelled

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


async def _kill(process: trio.Process) -> None:
    process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()


def _fail_on_escaped_cancel(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Make a ``Cancelled`` (or a group of only those) escaping a test fail it.

    pytest-trio cancels its own scope around the test before it looks at the outcome, and
    that scope then swallows any ``Cancelled``: a test that a stray cancel ends early would
    otherwise pass without reaching its asserts.
    """

    @functools.wraps(test)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            await test(*args, **kwargs)
        except BaseException as exc:
            if only_cancelled(exc):
                raise AssertionError(f"a Cancelled escaped the test: {exc!r}") from exc
            raise

    return wrapper


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Guard every async test (before pytest-trio wraps it) with :func:`_fail_on_escaped_cancel`."""
    if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
        item.obj = _fail_on_escaped_cancel(item.obj)
    yield


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


pytest_plugins = ["pytester"]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base_temp_dir of the test's own, so a census sees only this test's machine dirs."""
    return make_base(tmp_path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test module's own cache (templates made once per module), removed afterwards:
    its RAM files are large."""
    path = tmp_path_factory.mktemp("cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)
