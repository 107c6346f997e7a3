"""The byte streams under QMP and the console: socketpairs, one-shot fd reads, connecting,
one-connection listeners (unix and TCP) and the exit-aware stream."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_qemu import QMPConnectionClosed, QMPTimeout
from trio_qemu._transport import (
    ExitAwareStream,
    Listener,
    connect,
    read_fd,
    socketpair_stream,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- socketpair_stream and read_fd -------------------------------------------------------


async def test_socketpair_stream_round_trip() -> None:
    ours, theirs = socketpair_stream()
    with theirs:
        assert theirs.family == socket.AF_UNIX
        assert theirs.get_inheritable() is False  # handed over with pass_fds only
        await ours.send_all(b"ping")
        assert theirs.recv(10) == b"ping"
        theirs.sendall(b"pong")
        assert await ours.receive_some(10) == b"pong"
    assert await ours.receive_some(10) == b""  # their end closed: EOF
    await ours.aclose()


async def test_read_fd_reads_what_is_there_and_waits_for_more() -> None:
    ours, theirs = socketpair_stream()
    with theirs:
        fd = ours.socket.fileno()
        theirs.sendall(b"ready")
        with trio.testing.assert_checkpoints():
            assert await read_fd(fd) == b"ready"

        async def later() -> None:
            await trio.sleep(0.05)
            theirs.sendall(b"later")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            assert await read_fd(fd, yield_first=True) == b"later"
        theirs.sendall(b"abcdef")
        assert await read_fd(fd, size=4) == b"abcd"
        assert await read_fd(fd) == b"ef"
    assert await read_fd(fd) == b""  # EOF
    await ours.aclose()


async def test_read_fd_cancelled_consumes_nothing() -> None:
    ours, theirs = socketpair_stream()
    with theirs:
        fd = ours.socket.fileno()
        theirs.sendall(b"kept")
        with trio.CancelScope() as scope:
            scope.cancel()
            await read_fd(fd)
        assert scope.cancelled_caught
        with trio.move_on_after(0.05) as scope:  # nothing there: waits, cancellable
            await read_fd(fd, size=4)
            await read_fd(fd)
        assert scope.cancelled_caught
    await ours.aclose()


# -- connect ------------------------------------------------------------------------------


async def test_connect_unix_and_tcp(tmp_path: Path) -> None:
    accepted: list[trio.SocketStream] = []

    async def accept(listener: Listener) -> None:
        accepted.append(await listener.accept(timeout=5))

    for address in (str(tmp_path / "qmp.sock"), ("127.0.0.1", 0)):
        listener = await Listener.open(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept, listener)
            client = await connect(listener.address, timeout=5)
        await client.send_all(b"hello")
        assert await accepted[-1].receive_some(10) == b"hello"
        await client.aclose()
        await accepted[-1].aclose()


async def test_connect_failures_are_qmp_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(QMPConnectionClosed, match=r"cannot connect to .*missing\.sock") as info:
        await connect(missing)
    assert isinstance(info.value.__cause__, FileNotFoundError)

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(QMPConnectionClosed, match=f"127.0.0.1:{port}"):
            await connect(("127.0.0.1", port))

    async def never(path: str) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    monkeypatch.setattr(trio, "open_unix_socket", never)
    with pytest.raises(QMPTimeout, match=r"more than 0\.05 s"):
        await connect(tmp_path / "slow.sock", timeout=0.05)


# -- Listener -----------------------------------------------------------------------------


async def test_unix_listener_takes_one_connection_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    listener = await Listener.open(path)
    assert listener.address == str(path) and path.exists()
    client = await connect(path, timeout=5)
    server = await listener.accept(timeout=5)
    assert not path.exists()  # one connection, then it stops listening
    with pytest.raises(QMPConnectionClosed):
        await connect(path, timeout=5)
    listener.close()  # idempotent
    await client.aclose()
    await server.aclose()


async def test_listener_accept_timeout_closes_it(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    listener = await Listener.open(path)
    with pytest.raises(QMPTimeout, match=r"nobody connected to .*qmp\.sock within 0\.05 s"):
        await listener.accept(timeout=0.05)
    assert not path.exists()


async def test_tcp_listener_reports_the_chosen_port() -> None:
    listener = await Listener.open(("127.0.0.1", 0))
    try:
        assert isinstance(listener.address, tuple)
        host, port = listener.address
        assert host == "127.0.0.1" and port > 0
    finally:
        listener.close()


async def test_unix_path_in_use(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    path.write_text("not a socket")
    before = _open_fds()
    with pytest.raises(OSError, match="socket path already in use") as info:
        await Listener.open(path)
    assert info.value.errno == errno.EADDRINUSE
    assert _open_fds() == before
    assert path.read_text() == "not a socket"  # not removed: not ours


async def test_tcp_port_in_use_closes_the_socket() -> None:
    first = await Listener.open(("127.0.0.1", 0))
    try:
        before = _open_fds()
        with pytest.raises(OSError) as info:
            await Listener.open(first.address)
        assert info.value.errno == errno.EADDRINUSE
        assert _open_fds() == before, "the socket of the failed listener was left open"
    finally:
        first.close()


# -- ExitAwareStream ------------------------------------------------------------------------


class _Exit:
    """A stand-in for QEMU's exit: records how long each waiter was willing to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def wait(self, grace: float) -> bool:
        self.waits.append(grace)
        await trio.lowlevel.checkpoint()
        return True


async def test_exit_aware_stream_waits_for_the_exit_at_eof() -> None:
    ours, theirs = socketpair_stream()
    exit_ = _Exit()
    stream = ExitAwareStream(ours, exit_.wait, grace=0.25)
    with theirs:
        theirs.sendall(b"data")
        assert await stream.receive_some(10) == b"data"
        assert exit_.waits == []
        await stream.send_all(b"back")
        await stream.wait_send_all_might_not_block()
        assert theirs.recv(10) == b"back"
    assert await stream.receive_some(10) == b""
    assert exit_.waits == [0.25]
    await stream.aclose()
    assert ours.socket.fileno() == -1


async def test_exit_aware_stream_waits_for_the_exit_on_a_break() -> None:
    exit_ = _Exit()
    broken = trio.testing.MemoryReceiveStream()

    async def fail() -> None:
        raise trio.BrokenResourceError("reset")

    broken.receive_some_hook = fail
    stream = ExitAwareStream(
        trio.StapledStream(trio.testing.MemorySendStream(), broken), exit_.wait, grace=0.5
    )
    with pytest.raises(trio.BrokenResourceError, match="reset"):
        await stream.receive_some(10)
    assert exit_.waits == [0.5]
