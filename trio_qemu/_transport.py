"""Byte streams a QMP (or console) peer can sit on: socketpairs, unix and TCP sockets.

QEMU's monitor is reached in one of three ways: a socketpair whose other end QEMU inherits
(the default: no path, no port), a connection we make to a socket QEMU listens on, or a
listener of ours that QEMU connects to (``server`` mode; only the first connection is taken).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import trio

from ._errors import QMPConnectionClosed, QMPTimeout

__all__ = [
    "Address",
    "ExitAwareStream",
    "Listener",
    "connect",
    "read_fd",
    "socketpair_stream",
]

#: A unix socket path, or a TCP ``(host, port)``.
Address: TypeAlias = "str | os.PathLike[str] | tuple[str, int]"


def socketpair_stream() -> tuple[trio.SocketStream, socket.socket]:
    """A connected AF_UNIX stream pair: our end as a Trio stream, and the end to hand to QEMU.

    The caller passes ``theirs.fileno()`` to QEMU with ``pass_fds`` and closes ``theirs``
    once QEMU has started.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


async def read_fd(fd: int, *, yield_first: bool = False, size: int = 65536) -> bytes:
    """One read from a non-blocking fd (a socket Trio set up): read at once if data is
    there, else wait until readable. Always a checkpoint.

    Cheaper per wake-up than Trio's socket path (no failed ``recv()`` first), which matters
    when a request/response round trip is mostly wake-ups. ``yield_first`` lets the task we
    just woke run (and send its next request) before we poll again. ``b""`` is EOF.
    """
    if yield_first:
        await trio.lowlevel.cancel_shielded_checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    yielded = yield_first
    while True:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            yielded = True
            continue
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


def _describe(address: Address) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return os.fspath(address)


async def connect(address: Address, *, timeout: float = 30.0) -> trio.SocketStream:
    """Connect to a unix socket path or a TCP ``(host, port)``."""
    try:
        with trio.fail_after(timeout):
            if isinstance(address, tuple):
                host, port = address
                return await trio.open_tcp_stream(host, port)
            return await trio.open_unix_socket(os.fspath(address))
    except trio.TooSlowError:
        raise QMPTimeout(f"connecting to {_describe(address)} took more than {timeout} s") from None
    except OSError as exc:
        raise QMPConnectionClosed(f"cannot connect to {_describe(address)}: {exc}") from exc


class Listener:
    """A listening socket that accepts exactly one connection (QEMU's), then closes.

    A unix socket file is removed when the listener closes. ``address`` gives the real
    address (the chosen port when TCP port 0 was asked for).
    """

    def __init__(self, sock: trio.socket.SocketType, address: Address, path: str | None):
        self._sock = sock
        self.address = address
        self._path = path

    @classmethod
    async def open(cls, address: Address) -> Listener:
        """Bind and listen at ``address`` (an existing unix socket file is an error)."""
        if isinstance(address, tuple):
            host, port = address
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, sockaddr = infos[0]
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(sockaddr)
                sock.listen(1)
            except BaseException:
                sock.close()
                raise
            bound = sock.getsockname()
            return cls(sock, (host, int(bound[1])), None)
        path = os.fspath(address)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"socket path already in use: {path}") from exc
            raise
        sock.listen(1)
        return cls(sock, path, path)

    async def accept(self, *, timeout: float = 30.0) -> trio.SocketStream:
        """Wait for the first connection, then stop listening."""
        try:
            with trio.fail_after(timeout):
                conn, _ = await self._sock.accept()
        except trio.TooSlowError:
            raise QMPTimeout(
                f"nobody connected to {_describe(self.address)} within {timeout} s"
            ) from None
        finally:
            self.close()
        return trio.SocketStream(conn)

    def close(self) -> None:
        """Stop listening and remove the socket file. Idempotent."""
        self._sock.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None


class ExitAwareStream(trio.abc.Stream):
    """A stream whose end (EOF or a break) is reported only once the peer's exit is known.

    When QEMU dies its sockets end a moment before it is reaped. Reading through this waits
    up to ``grace`` s for ``wait_exit`` (QEMU's exit) before handing on the end, so readers
    can fail with :class:`~trio_qemu.MachineExited` rather than a bare "the channel ended".
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        wait_exit: Callable[[float], Awaitable[object]],
        grace: float,
    ) -> None:
        self._stream = stream
        self._wait_exit = wait_exit
        self._grace = grace

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            await self._wait_exit(self._grace)
            raise
        if not data:
            await self._wait_exit(self._grace)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
