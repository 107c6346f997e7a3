"""Running ``qemu-img`` and ``qemu-io``: bounded output, a timeout, killed on cancellation.

:func:`run_tool` is the one place a block tool is started. Its output is read while it runs
(stdout up to a limit, stderr's last 64 KiB), every run has a deadline, and whatever ends the
call (an error, the timeout, a cancel, Ctrl-C) kills the tool with SIGKILL and reaps it
before the call returns.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections import deque
from collections.abc import Container, Sequence
from typing import Final

import trio

from .._util import ToolResult
from ._errors import ImageError, ImageTimeout

__all__ = ["MAX_OUTPUT", "ToolResult", "run_tool"]

MAX_OUTPUT: Final = 32 << 20
"""The most a tool may write to stdout (bytes); more is an :class:`~trio_qemu.ImageError`
(``qemu-img map`` of a huge, fragmented image is the only thing that comes near)."""

#: How much of stderr is kept (its end).
_STDERR_TAIL: Final = 64 << 10
_CHUNK: Final = 65536


class _Tail:
    """The last ``limit`` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def add(self, data: bytes | bytearray) -> None:
        self._chunks.append(bytes(data))
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.popleft())

    def value(self) -> bytes:
        return b"".join(self._chunks)[-self._limit :]


def _message(argv: Sequence[str], stderr: bytes, stdout: bytes) -> str:
    """The tool's own complaint: its last lines of stderr (else stdout), one line."""
    for stream in (stderr, stdout):
        lines = [ln.strip() for ln in stream.decode("utf-8", "replace").splitlines() if ln.strip()]
        if lines:
            return " / ".join(lines[-3:])
    return "(no message)"


async def run_tool(
    argv: Sequence[str],
    *,
    timeout: float | None,
    ok: Container[int] = (0,),
    max_output: int = MAX_OUTPUT,
) -> ToolResult:
    """Run ``argv`` to its end; return its result when its exit status is in ``ok``.

    Raises:
        ImageError: the tool could not be started, exited with another status (the message
            is its own error text), or wrote more than ``max_output`` bytes to stdout.
        ImageTimeout: it ran longer than ``timeout`` seconds (None: no limit); it was killed.
    """
    argv = tuple(argv)
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we kill it
        )
    except OSError as exc:
        raise ImageError(
            f"cannot run {argv[0]}: {exc.strerror or exc} (install qemu-utils, or name the "
            "binary in $QEMU_IMG / $QEMU_IO)",
            argv=argv,
        ) from exc
    stdout = bytearray()
    stderr = _Tail(_STDERR_TAIL)
    too_much = False

    async def drain_stdout(stream: trio.abc.ReceiveStream) -> None:
        nonlocal too_much
        while chunk := await stream.receive_some(_CHUNK):
            if len(stdout) + len(chunk) > max_output:
                too_much = True
                process.kill()
                return
            stdout.extend(chunk)

    async def drain_stderr(stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(_CHUNK):
            stderr.add(chunk)

    assert process.stdout is not None and process.stderr is not None
    try:
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_stdout, process.stdout)
                nursery.start_soon(drain_stderr, process.stderr)
            await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()  # SIGKILLed: reaped at once
            for stream in (process.stdout, process.stderr):
                await stream.aclose()
    err = stderr.value()
    if scope.cancelled_caught:
        raise ImageTimeout(
            f"{os.path.basename(argv[0])} did not finish within {timeout} s; it was killed",
            argv=argv,
            output=(err + bytes(stdout[-_STDERR_TAIL:])).decode("utf-8", "replace"),
        )
    if too_much:
        raise ImageError(
            f"{os.path.basename(argv[0])} wrote more than {max_output} bytes to stdout; "
            "it was killed",
            argv=argv,
            output=err.decode("utf-8", "replace"),
        )
    returncode = process.returncode
    assert returncode is not None
    result = ToolResult(argv, returncode, bytes(stdout), err)
    if returncode not in ok:
        raise ImageError(
            _message(argv, err, bytes(stdout)),
            argv=argv,
            returncode=returncode,
            output=result.output[-_STDERR_TAIL:],
        )
    return result
