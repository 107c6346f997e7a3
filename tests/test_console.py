"""Tests of trio_qemu._console: the logic over a socketpair, then a real QEMU (SeaBIOS)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_qemu._console import Console
from trio_qemu._errors import (
    ConsoleClosed,
    ConsoleFailure,
    ConsoleTimeout,
    MachineError,
    MachineExited,
)

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@asynccontextmanager
async def fed_console(**kwargs: Any) -> AsyncIterator[tuple[Console, trio.SocketStream]]:
    """A Console draining one end of a socketpair; the test writes to the other end."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        console = Console(**kwargs)
        peer = _stream(theirs)
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, _stream(ours))
            yield console, peer
            nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let the drain and every waiter process what was sent (the data is already queued)."""
    await trio.testing.wait_all_tasks_blocked()


# --- matching ---------------------------------------------------------------------------


async def test_match_across_chunk_boundaries() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        results: list[re.Match[bytes]] = []

        async def waiter() -> None:
            results.append(await console.wait_for(b"hello world", timeout=5))

        nursery.start_soon(waiter)
        for piece in (b"xx hel", b"lo worl", b"d yy"):
            await settle()
            assert not results
            await peer.send_all(piece)
        await settle()
        assert console.total_bytes == 17
        assert [m.group() for m in results] == [b"hello world"]


async def test_regex_across_chunks_with_groups() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        results: list[re.Match[bytes]] = []

        async def waiter() -> None:
            results.append(await console.wait_for(re.compile(rb"ip=(\d+\.\d+\.\d+\.\d+)\n")))

        nursery.start_soon(waiter)
        for piece in (b"dhcp: ip=10.0", b".2.", b"15\nmore"):
            await settle()
            assert not results
            await peer.send_all(piece)
        await settle()
        assert results[0].group(1) == b"10.0.2.15"


async def test_str_and_bytes_patterns_are_literal() -> None:
    async with fed_console() as (console, peer):
        await peer.send_all("a+b=c? axb ok a.b ünï\n".encode())
        assert (await console.wait_for("a.b", timeout=5)).group() == b"a.b"
        assert (await console.wait_for("ünï", timeout=5)).group() == "ünï".encode()
        await peer.send_all(b"x+y=z?")
        assert (await console.wait_for(b"y=z?", timeout=5)).group() == b"y=z?"
        with pytest.raises(ValueError, match="empty"):
            await console.wait_for(b"")
        with pytest.raises(TypeError, match="bytes"):
            await console.wait_for(re.compile("text"))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="bytes, str or a compiled bytes regex, not 5"):
            await console.wait_for(5)  # type: ignore[arg-type]


async def test_regex_sees_context_before_the_cursor() -> None:
    async with fed_console() as (console, peer):
        await peer.send_all(b"xxfoo")
        await console.wait_for(b"foo", timeout=5)
        await peer.send_all(b"bar\nbar\n")
        match = await console.wait_for(re.compile(rb"^bar$", re.MULTILINE), timeout=5)
        # The cursor was mid-line before the first "bar": only the second one starts a line.
        assert match.string[match.start() - 1 : match.start()] == b"\n"
        with pytest.raises(ConsoleTimeout):
            await console.wait_for(b"bar", timeout=0.05)


async def test_cursor_advances_past_each_match() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        await peer.send_all(b"boot: ready\n")
        assert (await console.wait_for(b"ready", timeout=5)).group() == b"ready"
        second: list[re.Match[bytes]] = []

        async def waiter() -> None:
            second.append(await console.wait_for(b"ready", timeout=5))

        nursery.start_soon(waiter)
        await settle()
        assert not second  # the first occurrence was consumed
        await peer.send_all(b"again: ready\n")
        await settle()
        assert [m.group() for m in second] == [b"ready"]


async def test_concurrent_waits_share_the_cursor_in_arrival_order() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        got: list[tuple[str, bytes]] = []

        async def waiter(tag: str, pattern: bytes) -> None:
            match = await console.wait_for(re.compile(pattern + rb"\d"), timeout=5)
            got.append((tag, match.group()))

        nursery.start_soon(waiter, "first", b"A")
        await settle()
        nursery.start_soon(waiter, "second", b"B")
        await settle()
        await peer.send_all(b"B1 A2 B3")
        await settle()
        # The second waiter searched only after the first one's match.
        assert got == [("first", b"A2"), ("second", b"B3")]


async def test_fail_pattern_first_in_the_stream_wins() -> None:
    async with fed_console() as (console, peer):
        await peer.send_all(b"booting\nKernel panic - not syncing\nlogin: ")
        with pytest.raises(ConsoleFailure) as info:
            await console.wait_for(b"login:", fail=[b"Kernel panic", b"Oops"], timeout=5)
        assert isinstance(info.value.match, re.Match)
        assert info.value.match.group() == b"Kernel panic"
        assert info.value.tail.endswith(b"login: ")
        assert "Kernel panic" in str(info.value) and "login:" in str(info.value)
        # The failure was consumed: the cursor is past it.
        assert (await console.wait_for(b"login:", fail=[b"panic"], timeout=5)).group() == b"login:"

        await peer.send_all(b"ok: done; later: error")
        match = await console.wait_for(b"done", fail=[re.compile(rb"err\w+")], timeout=5)
        assert match.group() == b"done"
        # At the same position the fail pattern wins; a single pattern is accepted as fail.
        with pytest.raises(ConsoleFailure) as info:
            await console.wait_for(b"error", fail="err", timeout=5)
        assert info.value.match.group() == b"err"  # type: ignore[attr-defined]
        # A fail pattern is found even when the awaited one never comes.
        await peer.send_all(b"Oops")
        with pytest.raises(ConsoleFailure):
            await console.wait_for(b"never", fail=[b"Oops"], timeout=5)


async def test_fail_pattern_while_waiting() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        errors: list[ConsoleFailure] = []

        async def waiter() -> None:
            with pytest.raises(ConsoleFailure) as info:
                await console.wait_for(b"READY", fail=[re.compile(rb"FAIL(ED)?: (\w+)")])
            errors.append(info.value)

        nursery.start_soon(waiter)
        await settle()
        await peer.send_all(b"step FAI")
        await settle()
        assert not errors
        await peer.send_all(b"LED: disk\nREADY\n")
        await settle()
        assert errors[0].match.group(2) == b"disk"  # type: ignore[attr-defined]
        assert str(errors[0]).startswith(
            "console: fail pattern re.compile(b'FAIL(ED)?: (\\\\w+)') appeared while waiting "
            "for b'READY'\n"
        )


async def test_timeout_raises_console_timeout_with_tail() -> None:
    async with fed_console() as (console, peer):
        await peer.send_all(b"x" * 10_000 + b"some output\n")
        start = trio.current_time()
        with pytest.raises(ConsoleTimeout) as info:
            await console.wait_for(b"never", timeout=0.2)
        assert 0.2 <= trio.current_time() - start < 2
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, MachineError)
        assert str(info.value).startswith(
            "console: timed out after 0.2 s waiting for b'never' on the console\n"
        )
        assert info.value.tail.endswith(b"some output\n") and len(info.value.tail) == 4096
        # The cursor did not move.
        assert (await console.wait_for(b"some", timeout=5)).group() == b"some"


# --- ring buffer and log ----------------------------------------------------------------


async def test_ring_buffer_is_bounded() -> None:
    size = 64 * 1024
    flood = b"".join(b"line %07d\n" % i for i in range(5 * 1024 * 1024 // 13 + 1))
    assert len(flood) >= 5 * 1024 * 1024
    async with fed_console(buffer_size=size) as (console, peer), trio.open_nursery() as nursery:
        largest = 0
        done: list[re.Match[bytes]] = []

        async def waiter() -> None:
            done.append(await console.wait_for(b"END-OF-FLOOD", timeout=30))

        nursery.start_soon(waiter)  # its cursor (0) leaves the ring long before the match
        await settle()
        for i in range(0, len(flood), 100_000):
            await peer.send_all(flood[i : i + 100_000])
            largest = max(largest, len(console._buf))
        await peer.send_all(b"END-OF-FLOOD\n")
        await settle()
        assert done and done[0].group() == b"END-OF-FLOOD"
        assert console.total_bytes == len(flood) + 13
        assert largest <= 2 * size  # trimmed back to `size` whenever an append passes 2 x size
        assert len(console.output()) == size
        assert console.output().endswith(flood[-(size - 13) :] + b"END-OF-FLOOD\n")
        assert console.tail(13) == b"END-OF-FLOOD\n"
        assert (console.tail(1), console.tail(0), console.tail(-1)) == (b"\n", b"", b"")
        assert console.tail(10 * size) == console.output()
        # A wait started now sees only new data.
        with pytest.raises(ConsoleTimeout):
            await console.wait_for(b"line 0000001", timeout=0.05)
        await peer.send_all(b"fresh data\n")
        assert (await console.wait_for(b"fresh", timeout=5)).group() == b"fresh"


async def test_log_file_gets_everything(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"previous run\n")
    data = os.urandom(300_000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        console = Console(buffer_size=4096, log_path=log)
        peer = _stream(theirs)
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, _stream(ours))
            for i in range(0, len(data), 7000):
                await peer.send_all(data[i : i + 7000])
                if i % 70_000 == 0:  # flushed chunk by chunk, readable while running
                    await settle()
                    assert log.read_bytes() == b"previous run\n" + data[: i + 7000]
            await peer.send_eof()
        # run() returned at end of file and closed the log.
        assert not console.running and console.ended
    assert log.read_bytes() == b"previous run\n" + data
    assert console.output() == data[-4096:]


async def test_failing_log_is_given_up_not_the_drain(caplog: pytest.LogCaptureFixture) -> None:
    async with fed_console(name="vm3", log_path=Path("/dev/full")) as (console, peer):
        await peer.send_all(b"first\n")  # write and close both fail: no space left on device
        assert (await console.wait_for(b"first", timeout=5)).group() == b"first"
        await peer.send_all(b"second\n")
        assert (await console.wait_for(b"second", timeout=5)).group() == b"second"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("vm3: writing console log /dev/full failed, no longer logging:")
    assert "No space left on device" in warnings[0]


async def test_unopenable_log_file_fails_start(tmp_path: Path) -> None:
    console = Console(log_path=tmp_path / "missing-dir" / "console.log")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        async with trio.open_nursery() as nursery:
            with pytest.raises(FileNotFoundError):
                await nursery.start(console.run, _stream(ours))
    assert console.ended
    with pytest.raises(ConsoleClosed, match="log could not be opened"):
        await console.wait_for(b"x")
    with pytest.raises(ConsoleClosed, match="log could not be opened"):  # not an orderly end
        await console.lines().__anext__()


# --- lines ------------------------------------------------------------------------------


async def test_lines_with_crlf_and_own_positions() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        early = console.lines()
        await peer.send_all(b"one\r\ntwo\nthr")
        seen: list[bytes] = []

        async def reader() -> None:
            async for line in console:
                seen.append(line)

        nursery.start_soon(reader)
        await settle()
        assert seen == [b"one", b"two"]
        await peer.send_all(b"ee\r")
        await settle()
        assert seen == [b"one", b"two"]
        await peer.send_all(b"\n\nfour\r")
        await settle()
        assert seen == [b"one", b"two", b"three", b""]
        await peer.send_eof()  # the unterminated last line comes at a clean end of file
        await settle()
        assert seen == [b"one", b"two", b"three", b"", b"four"]
        assert [line async for line in early] == seen
        assert [line async for line in console.lines()] == seen


async def test_lines_continue_from_oldest_retained_byte() -> None:
    async with fed_console(buffer_size=100) as (console, peer):
        lagging = console.lines()
        await peer.send_all(b"".join(b"line %02d\n" % i for i in range(50)))
        await settle()
        # 400 bytes sent, the last 100 retained: the first line seen is cut at its start.
        assert await lagging.__anext__() == b" 37"
        assert await lagging.__anext__() == b"line 38"
        rest = []
        with trio.move_on_after(0.05):
            async for line in lagging:
                rest.append(line)
        assert rest == [b"line %02d" % i for i in range(39, 50)]


# --- ending -----------------------------------------------------------------------------


async def test_close_with_error_wakes_waiters_promptly() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        await peer.send_all(b"complete line\npartial")
        failures: list[BaseException] = []

        async def waiter() -> None:
            with pytest.raises(MachineExited) as info:
                await console.wait_for(b"never", timeout=60)
            failures.append(info.value)

        async def reader() -> None:
            lines = []
            with pytest.raises(MachineExited) as info:
                async for line in console.lines():
                    lines.append(line)
            assert lines == [b"complete line"]
            failures.append(info.value)

        nursery.start_soon(waiter)
        nursery.start_soon(reader)
        await settle()
        start = trio.current_time()
        error = MachineExited("vm1", -9, "qemu log")
        console.close(error)
        console.close(MachineExited("vm1", 1, "ignored: only the first close counts"))
        assert "ended: closed: MachineExited(" in repr(console)
        await settle()
        assert trio.current_time() - start < 0.5
        assert len(failures) == 2
        for failure in failures:
            assert failure is not error and isinstance(failure, MachineExited)
            assert failure.returncode == -9 and str(failure) == str(error)
        # Future waits and writes fail the same way; output keeps being recorded.
        with pytest.raises(MachineExited):
            await console.wait_for(b"never")
        with pytest.raises(MachineExited):
            await console.send_line("echo hi")
        await peer.send_all(b"after close\n")
        await settle()
        assert console.output().endswith(b"after close\n") and console.running
        # Output already received still matches.
        assert (await console.wait_for(b"after")).group() == b"after"


async def test_an_empty_first_line() -> None:
    async with fed_console() as (console, peer):
        await peer.send_all(b"\nnext\n")  # the first newline is the buffer's first byte
        await settle()
        lines = console.lines()
        with trio.fail_after(5):
            assert [await lines.__anext__(), await lines.__anext__()] == [b"", b"next"]


async def test_close_without_error() -> None:
    async with fed_console() as (console, _peer):
        assert not console.ended
        console.close()
        assert console.ended
        with pytest.raises(ConsoleClosed, match="ended \\(closed\\)"):
            await console.wait_for(b"x")
        with pytest.raises(StopAsyncIteration):  # close() without an error: an orderly end
            await console.lines().__anext__()
        with pytest.raises(MachineError, match="cannot write"):
            await console.write(b"x")


async def test_end_of_file_ends_iterators_and_waits() -> None:
    async with fed_console() as (console, peer), trio.open_nursery() as nursery:
        results: list[BaseException] = []

        async def waiter() -> None:
            with pytest.raises(ConsoleClosed) as info:
                await console.wait_for(b"never", timeout=60)
            results.append(info.value)

        nursery.start_soon(waiter)
        await settle()
        await peer.send_all(b"hello\nworld")
        await peer.aclose()
        await settle()
        assert "end of file" in str(results[0]) and results[0].tail == b"hello\nworld"  # type: ignore[attr-defined]
        assert console.ended and not console.running
        assert [line async for line in console] == [b"hello", b"world"]
        assert (await console.wait_for(b"world")).group() == b"world"  # already received
        with pytest.raises(ConsoleClosed, match=r"end of file\) while waiting for b'more'"):
            await console.wait_for(b"more")
        with pytest.raises(MachineError, match="end of file"):
            await console.write(b"x")
        # A later close(error) (the machine saw QEMU die) replaces the generic error.
        console.close(MachineExited("vm1", 3))
        with pytest.raises(MachineExited):
            await console.wait_for(b"more")
        lines = console.lines()  # complete lines first, then the error instead of the end
        assert await lines.__anext__() == b"hello"
        with pytest.raises(MachineExited):
            await lines.__anext__()


async def test_cancelled_drain_ends_the_console() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        console = Console(name="vm7")
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, _stream(ours))
            assert console.running
            assert repr(console) == "<Console 'vm7' running, 0 bytes received>"
            nursery.cancel_scope.cancel()
        assert console.ended and not console.running
        with pytest.raises(ConsoleClosed, match="vm7: the console ended \\(the console drain"):
            await console.wait_for(b"x")
        with pytest.raises(ConsoleClosed, match=r"drain stopped\) while reading lines"):
            await console.lines().__anext__()  # not an orderly end
        with pytest.raises(RuntimeError, match="once"):
            await console.run(_stream(theirs))


async def test_broken_connection_ends_the_console() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        console = Console(name="vm4")
        stream = _stream(ours)
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, stream)
            await stream.aclose()  # under the drain's feet: ClosedResourceError
        assert console.ended and not console.running
        with pytest.raises(ConsoleClosed, match=r"\(the console connection broke: Closed"):
            await console.wait_for(b"x")


def test_buffer_size_and_defaults() -> None:
    with pytest.raises(ValueError, match="buffer_size must be at least 1, not 0"):
        Console(buffer_size=0)
    console = Console(buffer_size=1)
    assert repr(console) == "<Console 'console' not running, 0 bytes received>"


# --- input ------------------------------------------------------------------------------


async def test_write_and_send_line() -> None:
    console = Console(name="vm2")
    with pytest.raises(MachineError, match=r"vm2: cannot write.*Console.run\(\) has not been"):
        await console.write(b"x")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = _stream(theirs)
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, _stream(ours))
            await console.write(b"abc")
            await console.send_line("hé")
            await console.send_line(b"ls", newline=b"\r")
            expected = "abché\nls\r".encode()
            received = b""
            while len(received) < len(expected):
                received += await peer.receive_some()
            assert received == expected
            with pytest.raises(TypeError, match=r"Console.write takes bytes; use send_line\(\)"):
                await console.write("text")  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    with pytest.raises(MachineError, match="cannot write"):
        await console.write(b"x")


# --- a real QEMU ------------------------------------------------------------------------


async def _kill(process: trio.Process) -> None:
    process.kill()


@asynccontextmanager
async def seabios(console: Console) -> AsyncIterator[trio.Process]:
    """A q35 QEMU with no disk whose serial console ``console`` drains.

    SeaBIOS prints its banner and "No bootable device" there, then (reboot-timeout=0)
    reboots and does it again, forever. QEMU is SIGKILLed and reaped on the way out.
    """
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = theirs.fileno()
        argv = [
            QEMU, "-machine", "q35,graphics=off", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-vga", "none", "-monitor", "none",
            "-chardev", f"socket,id=console,fd={fd}", "-serial", "chardev:console",
            "-boot", "reboot-timeout=0",
        ]  # fmt: skip
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    argv,
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    check=False,
                    start_new_session=True,
                    deliver_cancel=_kill,
                )
            )
            try:
                theirs.close()
                await nursery.start(console.run, _stream(ours))
                yield process
            finally:
                nursery.cancel_scope.cancel()
                if process.returncode is None:
                    os.kill(process.pid, signal.SIGKILL)
    assert process.returncode is not None
    with pytest.raises(ProcessLookupError):  # reaped
        os.kill(process.pid, 0)


async def test_qemu_seabios_no_bootable_device(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    console = Console(name="seabios", log_path=log)
    with trio.fail_after(30):
        async with seabios(console) as process:
            match = await console.wait_for(
                b"No bootable device", fail=[b"Kernel panic"], timeout=10
            )
            assert match.group() == b"No bootable device"
            assert b"SeaBIOS (version" in console.output()
            lines = []
            async for line in console.lines():
                lines.append(line)
                if line.startswith(b"No bootable device"):
                    break
            assert b"Booting from Hard Disk..." in lines
            assert process.returncode is None
        assert not console.running
    assert log.read_bytes() == console.output()


async def test_qemu_console_keeps_draining() -> None:
    """Far more than the ~278 bytes an undrained socketpair holds: the drain never stops."""
    console = Console(name="seabios")
    banners = 0
    with trio.fail_after(60):
        async with seabios(console) as process:
            while console.total_bytes <= 6000:
                await console.wait_for(b"SeaBIOS (version", timeout=10)
                banners += 1
            assert process.returncode is None
    assert banners >= 6000 // 400
    assert console.output().count(b"No bootable device") >= banners - 1
