"""The QMP client against a real QEMU (`-machine none`, answering in milliseconds).

Most tests use the ``bare_qemu`` fixture (a socketpair monitor); the unix-socket ones start
QEMU themselves, once with us listening and once with QEMU listening. Where a test needs
QEMU to hold a reply back, it stops the process with SIGSTOP: that is deterministic, where
racing a fast command against a short timeout is not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import trio
import trio.testing
from conftest import QEMU, BareQemu
from qemu.qmp import ExecuteError
from qemu.qmp.models import Greeting

import trio_qemu
from trio_qemu import QMPBadMessage, QMPClient, QMPConnectionClosed, QMPTimeout, open_qmp

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")


P = ParamSpec("P")


@functools.cache
def qemu_version() -> tuple[int, int, int]:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert found, out
    major, minor, micro = found.groups()
    return int(major), int(minor), int(micro)


def hmp_print(n: int) -> str:
    """What HMP's ``print N`` answers: C's ``%#x`` (so 0 is plain ``0``)."""
    return f"{n:#x}\r\n" if n else "0\r\n"


@contextmanager
def qemu_stopped(process: trio.Process) -> Iterator[None]:
    """Freeze QEMU (SIGSTOP) so it reads nothing and answers nothing until the block ends."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGCONT)


# -- greeting, commands, errors ------------------------------------------------------------


async def test_greeting_status_and_transcript(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        greeting = client.greeting
        assert isinstance(greeting, Greeting)
        version = greeting.QMP.version["qemu"]
        assert isinstance(version, dict)
        assert (version["major"], version["minor"], version["micro"]) == qemu_version()
        assert "oob" in greeting.QMP.capabilities

        status = await client.cmd("query-status")
        assert status["status"] == "running"
        assert status["running"] is True

        lines = client.transcript()
        assert [line[:3] for line in lines] == ["<- ", "-> ", "<- ", "-> ", "<- "]
        assert json.loads(lines[0][3:])["QMP"]["version"]["qemu"] == version
        assert json.loads(lines[1][3:])["execute"] == "qmp_capabilities"
        assert json.loads(lines[2][3:]) == {"return": {}}
        request, reply = json.loads(lines[3][3:]), json.loads(lines[4][3:])
        assert request["execute"] == "query-status"
        assert reply["id"] == request["id"]
        assert reply["return"] == status


async def test_error_reply_raises_execute_error(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        with pytest.raises(ExecuteError) as info:
            await client.cmd("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)
        assert trio_qemu.ExecuteError is ExecuteError

        raw = await client.qmp("no-such-command")
        assert set(raw) == {"id", "error"}
        assert raw["error"]["class"] == "CommandNotFound"

        # the connection is fine after an error
        assert (await client.cmd("query-status"))["status"] == "running"


async def test_keyword_arguments_turn_underscores_into_dashes(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        # human-monitor-command takes "command-line": only the conversion makes this work
        info = await client.cmd("human-monitor-command", command_line="info version")
        major, minor, micro = qemu_version()
        assert info.startswith(f"{major}.{minor}.{micro}")
        raw = await client.qmp("human-monitor-command", command_line=f"print {1234}")
        assert raw["return"] == hmp_print(1234)
        # an ``args`` mapping is passed as it is
        refused = await client.qmp("human-monitor-command", {"command_line": "info version"})
        assert refused["error"]["class"] == "GenericError"
        # both together; only keys are converted, never values
        assert await client.cmd("qom-get", {"path": "/machine"}, property="type") == "none-machine"
        with pytest.raises(ExecuteError, match="dump_guest_core"):
            await client.cmd("qom-get", {"path": "/machine"}, property="dump_guest_core")


async def test_many_concurrent_calls_each_get_their_own_reply(bare_qemu: BareQemu) -> None:
    """1000 calls in flight at once; each answer (or error) names the caller's own number."""
    results: dict[int, object] = {}

    async def call(client: QMPClient, n: int) -> None:
        if n % 3 == 0:  # an error whose description contains n
            try:
                await client.cmd("qom-list", path=f"/no-such-object-{n}")
            except ExecuteError as exc:
                results[n] = exc
        else:
            results[n] = await client.cmd("human-monitor-command", command_line=f"print {n}")

    async with open_qmp(bare_qemu.stream) as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(1000):
                    nursery.start_soon(call, client, n)
        assert len(results) == 1000
        for n, result in results.items():
            if n % 3 == 0:
                assert isinstance(result, ExecuteError), (n, result)
                assert result.error_class == "DeviceNotFound"
                assert str(result) == f"Device '/no-such-object-{n}' not found"
            else:
                assert result == hmp_print(n), (n, result)
        assert not client.closed


# -- events ----------------------------------------------------------------------------------


async def test_subscription_sees_stop_then_resume(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        with client.subscribe("STOP", "RESUME") as both, client.subscribe("STOP") as stops:
            for _ in range(3):
                await client.cmd("stop")
                assert (await client.cmd("query-status"))["status"] == "paused"
                await client.cmd("cont")
            with trio.fail_after(5):
                names = [(await both.receive())["event"] for _ in range(6)]
                assert names == ["STOP", "RESUME"] * 3
                stop_events = [await stops.receive() for _ in range(3)]
            assert all(e["event"] == "STOP" for e in stop_events)
            assert all({"seconds", "microseconds"} <= set(e["timestamp"]) for e in stop_events)
            with pytest.raises(trio.WouldBlock):
                stops.receive_nowait()


async def test_subscription_with_match_sees_only_matching(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        with client.subscribe(match={"event": "RESUME"}) as resumes:
            await client.cmd("stop")
            await client.cmd("cont")
            with trio.fail_after(5):
                # STOP came first; had it matched it would be first in the buffer
                assert (await resumes.receive())["event"] == "RESUME"
            with pytest.raises(trio.WouldBlock):
                resumes.receive_nowait()


async def test_event_wait_finds_an_event_that_arrived_earlier(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        await client.cmd("stop")  # STOP arrives before the reply: it is cached, unclaimed
        with trio.fail_after(5):
            event = await client.event_wait("STOP", timeout=0)
        assert event["event"] == "STOP"
        # claimed: it is gone from the cache
        assert client.get_events() == []
        with pytest.raises(QMPTimeout):
            await client.event_wait("STOP", timeout=0.05)


async def test_events_wait_returns_the_first_that_matches(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        # cached: the older one wins, whatever the order of the pairs
        await client.cmd("stop")
        await client.cmd("cont")
        pairs: list[tuple[str, dict[str, object] | None]] = [("RESUME", None), ("STOP", None)]
        assert (await client.events_wait(pairs, timeout=0))["event"] == "STOP"
        assert (await client.events_wait(pairs, timeout=0))["event"] == "RESUME"

        # pending: the first to arrive wins, and the later one stays unclaimed
        got: list[dict[str, Any]] = []

        async def wait() -> None:
            got.append(await client.events_wait(pairs, timeout=5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await client.cmd("stop")
            await client.cmd("cont")
        assert [e["event"] for e in got] == ["STOP"]
        assert [e["event"] for e in client.get_events()] == ["RESUME"]


async def test_get_events_returns_unclaimed_events(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        assert client.get_events() == []
        with client.subscribe("STOP") as sub:
            await client.cmd("stop")  # a subscription gets a copy; the cache keeps it too
            assert (await sub.receive())["event"] == "STOP"
        await client.cmd("cont")
        await client.event_wait("RESUME", timeout=5)  # a wait claims it
        await client.cmd("stop")
        await client.cmd("cont")
        assert [e["event"] for e in client.get_events()] == ["STOP", "STOP", "RESUME"]
        assert client.get_events() == []


async def test_event_wait_with_match_and_timeout(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        await client.cmd("stop")
        start = trio.current_time()
        with pytest.raises(QMPTimeout):
            await client.event_wait("STOP", timeout=0.1, match={"data": {"no": "such"}})
        elapsed = trio.current_time() - start
        assert 0.1 <= elapsed < 2
        # the STOP that did not match is still there for someone else
        assert (await client.event_wait("STOP", timeout=0, match={"event": "STOP"}))["event"]


# -- cancellation and timeouts ---------------------------------------------------------------


async def test_call_cancelled_at_once_leaves_the_client_working(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        with trio.move_on_after(0) as scope:
            await client.cmd("query-qmp-schema")
        assert scope.cancelled_caught
        assert await client.cmd("human-monitor-command", command_line="print 1") == hmp_print(1)
        assert (await client.cmd("query-status"))["status"] == "running"
        assert not client.closed


async def test_call_cancelled_after_sending_drops_its_late_reply(bare_qemu: BareQemu) -> None:
    """The request is on the wire when the caller gives up; its reply comes later and must
    not be taken for the answer to the next call."""
    async with open_qmp(bare_qemu.stream) as client:
        scope = trio.CancelScope()

        async def abandoned_call() -> None:
            with scope:
                await client.cmd("query-qmp-schema")

        with qemu_stopped(bare_qemu.process):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(abandoned_call)
                await trio.testing.wait_all_tasks_blocked()  # sent, waiting for the reply
                scope.cancel()
        assert scope.cancelled_caught
        assert '"query-qmp-schema"' in client.transcript()[-1]  # it was really sent
        with trio.fail_after(10):
            for n in range(5):
                got = await client.cmd("human-monitor-command", command_line=f"print {n}")
                assert got == hmp_print(n)
            assert (await client.cmd("query-status"))["status"] == "running"
        assert not client.closed
        assert client.error is None


async def test_calls_with_tiny_deadlines_do_not_confuse_later_calls(
    bare_qemu: BareQemu,
) -> None:
    """Cancel a slow command at whatever point a tiny deadline hits, again and again."""
    cancelled = 0
    async with open_qmp(bare_qemu.stream) as client:
        for n in range(30):
            with trio.move_on_after(0.0005 * (n % 10)) as scope:
                await client.cmd("query-qmp-schema")
            cancelled += scope.cancelled_caught
            got = await client.cmd("human-monitor-command", command_line=f"print {n}")
            assert got == hmp_print(n)
        assert not client.closed
        assert client.error is None
    print(f"{cancelled} of 30 schema queries cancelled")
    # The test means something only if deadlines really cut calls short (those of 0 s
    # always do, at the wait for the reply, after the request went out).
    assert cancelled >= 3, cancelled


async def test_timeout_raises_qmp_timeout_and_the_next_call_works(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        with pytest.raises(QMPTimeout):
            await client.cmd("query-status", timeout=0)
        with qemu_stopped(bare_qemu.process):
            start = trio.current_time()
            with pytest.raises(QMPTimeout, match="query-status"):
                await client.cmd("query-status", timeout=0.1)
            assert 0.1 <= trio.current_time() - start < 2
        with trio.fail_after(10):
            assert await client.cmd("human-monitor-command", command_line="print 7") == hmp_print(7)
        assert not client.closed


# -- file descriptors ------------------------------------------------------------------------


async def test_getfd_with_fds_then_closefd(bare_qemu: BareQemu) -> None:
    read_end, write_end = os.pipe()
    try:
        async with open_qmp(bare_qemu.stream) as client:
            # without an fd QEMU refuses getfd: success below means the fd really went across
            with pytest.raises(ExecuteError, match="SCM_RIGHTS"):
                await client.cmd("getfd", {"fdname": "f0"})
            reply = await client.qmp("getfd", {"fdname": "f1"}, fds=[read_end])
            assert reply["return"] == {}
            assert await client.cmd("closefd", fdname="f1") == {}
            with pytest.raises(ExecuteError, match="not found") as info:
                await client.cmd("closefd", fdname="f1")
            assert info.value.error_class == "GenericError"
            with pytest.raises(ExecuteError, match="not found"):
                await client.cmd("closefd", fdname="never-given")
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_send_fd_scm_then_getfd(bare_qemu: BareQemu) -> None:
    read_end, write_end = os.pipe()
    try:
        async with open_qmp(bare_qemu.stream) as client:
            await client.send_fd_scm(write_end)
            assert await client.cmd("getfd", fdname="f2") == {}
            assert await client.cmd("closefd", fdname="f2") == {}
            # the stray space that carried the fd did not disturb the stream
            assert (await client.cmd("query-status"))["status"] == "running"
    finally:
        os.close(read_end)
        os.close(write_end)


# -- large messages --------------------------------------------------------------------------


async def test_large_reply(bare_qemu: BareQemu) -> None:
    async with open_qmp(bare_qemu.stream) as client:
        schema = await client.cmd("query-qmp-schema")
        assert isinstance(schema, list)
        assert len(schema) > 500
        names = {entry["name"] for entry in schema if entry["meta-type"] == "command"}
        assert {"query-qmp-schema", "query-status", "getfd"} <= names
        # the transcript keeps a clipped copy, not hundreds of KB
        assert len(client.transcript()[-1]) < 4096


async def test_reply_over_max_message_size_closes_the_connection(bare_qemu: BareQemu) -> None:
    with pytest.raises(QMPBadMessage, match="limit of 4096"):
        async with open_qmp(bare_qemu.stream, max_message_size=4096) as client:
            assert (await client.cmd("query-status"))["status"] == "running"
            with pytest.raises(QMPBadMessage, match="limit of 4096"):
                await client.cmd("query-qmp-schema")
            assert client.closed
            assert isinstance(client.error, QMPBadMessage)
            with trio.fail_after(5):  # not TooSlowError: the failed connection cancels the block
                await trio.sleep_forever()


class HeldStream(trio.abc.Stream):
    """A stream whose reads can be held back, so that several replies arrive in one read."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.gate: trio.Event | None = None
        #: what the last read returned
        self.last = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.gate is not None:
            await self.gate.wait()
        self.last = bytes(await self.inner.receive_some(max_bytes))
        return self.last

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_oversized_reply_after_another_in_one_read_reports_its_bytes(
    bare_qemu: BareQemu,
) -> None:
    """The error shows the start of the oversized message even when a shorter message came
    before it in the same read (a regression test: it showed b"" once)."""
    held = HeldStream(bare_qemu.stream)
    with pytest.raises(QMPBadMessage) as info:
        async with open_qmp(held, max_message_size=4096) as client:
            await trio.testing.wait_all_tasks_blocked()  # the reader waits inside a read
            held.gate = trio.Event()
            # one more reply, and the reader's next read waits at the gate
            await client.cmd("query-status")

            async def call(cmd: str, args: Mapping[str, object] | None = None) -> None:
                with contextlib.suppress(QMPBadMessage):
                    await client.cmd(cmd, args)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "qom-list", {"path": "/machine"})  # ~1 KB reply
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, "query-commands")  # ~6.5 KB reply
                for _ in range(2000):  # until both replies wait in the socket (10 s at most)
                    waiting = await held.inner.socket.recv(65536, socket.MSG_PEEK)
                    if waiting.count(b"\n") >= 2:
                        break
                    await trio.sleep(0.005)
                else:
                    pytest.fail("QEMU did not answer")
                held.gate.set()
    assert held.last.count(b"\n") == 2  # both replies came in one read
    assert info.value.raw is not None
    assert info.value.raw.startswith(b'{"return": [')


# -- the end of the connection ---------------------------------------------------------------
#
# When QEMU goes away, open_qmp may end the block with QMPConnectionClosed (it cancels the
# block when the peer hangs up). These tests accept that, and check what is left afterwards
# on the client, its subscriptions and the calls that were waiting.


async def test_quit_ends_subscriptions_waits_and_calls(bare_qemu: BareQemu) -> None:
    with trio.fail_after(5), pytest.raises(QMPConnectionClosed):
        async with open_qmp(bare_qemu.stream) as client:
            shutdowns = client.subscribe("SHUTDOWN")
            stops = client.subscribe("STOP")
            assert await client.cmd("quit") == {}
            # raises when the connection ends (or the block is cancelled into the same error)
            await client.event_wait("STOP", timeout=5)
    assert client.closed
    assert client.error is None  # a clean end
    # the subscriptions deliver what came before the end, then end
    assert [e["data"]["reason"] async for e in shutdowns] == ["host-qmp-quit"]
    assert [e async for e in stops] == []
    with pytest.raises(QMPConnectionClosed):
        await client.event_wait("STOP", timeout=5)
    with pytest.raises(QMPConnectionClosed):
        await client.cmd("query-status")
    with pytest.raises(QMPConnectionClosed):
        await client.qmp("query-status")
    with trio.fail_after(5):
        assert await bare_qemu.process.wait() == 0


async def test_waits_pending_when_qemu_quits_raise_closed(bare_qemu: BareQemu) -> None:
    errors: list[BaseException] = []

    async def wait(client: QMPClient) -> None:
        try:
            await client.event_wait("STOP", timeout=10)
        except QMPConnectionClosed as exc:
            errors.append(exc)

    async def iterate(client: QMPClient) -> None:
        async with client.subscribe("STOP") as stops:
            async for _ in stops:
                pass
        errors.append(StopAsyncIteration())

    with trio.fail_after(5), contextlib.suppress(QMPConnectionClosed):
        async with open_qmp(bare_qemu.stream) as client, trio.open_nursery() as nursery:
            nursery.start_soon(wait, client)
            nursery.start_soon(iterate, client)
            await trio.testing.wait_all_tasks_blocked()
            await client.cmd("quit")
    assert sorted(type(e).__name__ for e in errors) == ["QMPConnectionClosed", "StopAsyncIteration"]


async def test_pending_call_fails_promptly_when_qemu_is_killed(bare_qemu: BareQemu) -> None:
    outcome: list[tuple[BaseException, float]] = []
    killed_at = math.inf

    async def call(client: QMPClient) -> None:
        try:
            await client.cmd("query-status", timeout=10)
        except QMPConnectionClosed as exc:
            outcome.append((exc, trio.current_time()))

    with trio.fail_after(5), contextlib.suppress(QMPConnectionClosed):
        async with open_qmp(bare_qemu.stream) as client:
            with qemu_stopped(bare_qemu.process):  # so the reply can't come before the kill
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call, client)
                    await trio.testing.wait_all_tasks_blocked()  # sent, waiting
                    killed_at = trio.current_time()
                    os.kill(bare_qemu.process.pid, signal.SIGKILL)
    assert len(outcome) == 1
    assert outcome[0][1] - killed_at < 0.5
    assert client.closed
    with pytest.raises(QMPConnectionClosed):
        await client.cmd("query-status")
    with trio.fail_after(5):
        assert await bare_qemu.process.wait() == -signal.SIGKILL


async def test_pending_event_wait_fails_promptly_when_qemu_is_killed(bare_qemu: BareQemu) -> None:
    outcome: list[tuple[BaseException, float]] = []
    killed_at = math.inf

    async def wait(client: QMPClient) -> None:
        try:
            await client.event_wait("STOP", timeout=10)
        except QMPConnectionClosed as exc:
            outcome.append((exc, trio.current_time()))

    with trio.fail_after(5), contextlib.suppress(QMPConnectionClosed):
        async with open_qmp(bare_qemu.stream) as client:
            assert (await client.cmd("query-status"))["status"] == "running"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, client)
                await trio.testing.wait_all_tasks_blocked()
                killed_at = trio.current_time()
                os.kill(bare_qemu.process.pid, signal.SIGKILL)
    assert len(outcome) == 1
    assert outcome[0][1] - killed_at < 0.5
    assert client.closed


# -- unix socket paths: we listen, or QEMU listens -------------------------------------------


async def _kill(process: trio.Process) -> None:
    process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()


@asynccontextmanager
async def spawned_qemu(nursery: trio.Nursery, *args: str) -> AsyncIterator[trio.Process]:
    """A `-machine none` QEMU with ``args``, in ``nursery``; killed and reaped on the way out."""
    argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg", *args]
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            deliver_cancel=_kill,
        )
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "qmp.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 107 bytes"
    return path


async def test_server_mode_qemu_connects_to_us(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    # reconnect=1: should QEMU still come too early, it retries instead of exiting
    monitor = [
        "-chardev", f"socket,id=mon,path={path},reconnect=1",
        "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    async with AsyncExitStack() as stack:

        async def launch_when_listening() -> None:
            # bind() runs in a thread: wait for the file, then for open_qmp to be in accept()
            for _ in range(2000):
                if await trio.Path(path).exists():
                    break
                await trio.sleep(0.005)
            await trio.testing.wait_all_tasks_blocked()
            await stack.enter_async_context(spawned_qemu(nursery, *monitor))

        nursery.start_soon(launch_when_listening)
        with trio.fail_after(10):
            async with open_qmp(path, server=True, timeout=10) as client:
                assert not await trio.Path(path).exists()  # one connection taken, listener gone
                assert isinstance(client.greeting, Greeting)
                assert (await client.cmd("query-status"))["status"] == "running"
                await client.cmd("quit")
    assert not await trio.Path(path).exists()


async def test_server_mode_times_out_when_nobody_connects(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    with pytest.raises(QMPTimeout):
        async with open_qmp(path, server=True, timeout=0.1):
            pytest.fail("nobody connected")
    assert not await trio.Path(path).exists()


async def test_client_mode_we_connect_to_qemu(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    monitor = [
        "-chardev", f"socket,id=mon,path={path},server=on,wait=off",
        "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    async with spawned_qemu(nursery, *monitor), AsyncExitStack() as stack:
        deadline = trio.current_time() + 10
        while True:  # QEMU creates its socket some milliseconds after it starts
            try:
                client = await stack.enter_async_context(open_qmp(path, timeout=10))
                break
            except QMPConnectionClosed as exc:
                if not isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError):
                    raise
                if trio.current_time() > deadline:
                    raise
            await trio.sleep(0.01)
        assert isinstance(client.greeting, Greeting)
        assert (await client.cmd("query-status"))["status"] == "running"


# -- open_qmp's body with a nursery of its own ------------------------------------------------


async def test_bad_message_while_body_waits_in_a_nursery_raises_the_error(
    bare_qemu: BareQemu,
) -> None:
    async def break_the_connection(client: QMPClient) -> None:
        with pytest.raises(QMPBadMessage):
            await client.cmd("query-qmp-schema")  # too big: the connection fails
        await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(QMPBadMessage):
        async with (
            open_qmp(bare_qemu.stream, max_message_size=4096) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(trio.sleep_forever)  # e.g. waiting on the console
            nursery.start_soon(break_the_connection, client)
