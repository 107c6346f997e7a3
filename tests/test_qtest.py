"""trio_qemu.qtest against a real QEMU (q35 under ``-S``, TCG), plus a scripted peer.

The real-QEMU tests cover RAM and port I/O round trips, IRQ interception on the I/O APIC
(the CMOS RTC's periodic interrupt, which fires under ``-S`` because the RTC runs on the
host clock, and ``set_irq_in``), every malformed line refused with QEMU still alive,
FAIL/ERR replies, cancellation, pipelining, QEMU's death and the throughput. The scripted
peer (our end of a socketpair, speaking for QEMU) makes the orderings QEMU produces only
by chance deterministic: IRQ lines before a reply, late replies, a broken peer.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import trio_qemu
from trio_qemu import EventsDropped, LaunchError, MachineExited
from trio_qemu._transport import socketpair_stream
from trio_qemu.qtest import (
    COMMANDS,
    MAX_IN_FLIGHT,
    IrqEvent,
    QtestError,
    QtestInvalidRequest,
    QtestMachine,
    QtestProtocolError,
    QtestTimeout,
    check_line,
    open_qtest_machine,
)

RAM = 0x100000  # q35 with the default -m 128: RAM from 0 to 128 MiB (low 1 MiB is legacy)
CMOS_INDEX, CMOS_DATA = 0x70, 0x71
RTC_REG_A, RTC_REG_B, RTC_REG_C = 0x0A, 0x0B, 0x0C
RTC_IRQ = 8


def alive(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_healthy(qt: QtestMachine) -> None:
    """QEMU still runs, QMP answers and so does qtest."""
    assert alive(qt.machine.pid)
    assert (await qt.machine.cmd("query-status"))["status"] == "prelaunch"  # -S: never ran
    assert await qt.endianness() == "little"


# -- pure validation ------------------------------------------------------------------------
MALFORMED = [
    "",
    "readb",
    "readb 0x100000 0x1",
    "readb 0xZZ",
    "readb 08",
    "readb 0x",
    "readb -1",
    "readb +1",
    "readb  0x100000",
    " readb 0x100000",
    "readb 0x100000 ",
    "readb 0x100000\r",
    "readb 0x100000\nreadb 0x100000",
    "readb\t0x100000",
    "readb 0x10é",
    "readb 0x10000000000000000",
    "writeb 0x100000",
    "writel 0x100000 1.5",
    "inb 0x10000",
    "outb 0x70",
    "outb 0x70 -1",
    "read 0x100000 0",
    "read 0x100000 0x1000001",
    "b64read 0x100000",
    "write 0x100000 2 0xZZZZ",
    "write 0x100000 2 0xabc",
    "write 0x100000 1 0xabcd",
    "write 0x100000 1",
    "b64write 0x100000 4 AAAA",
    "b64write 0x100000 3 AA=A",
    "b64write 0x100000 3 AAA",
    "memset 0x100000 0x10",
    "set_irq_in ioapic unnamed-gpio-in -1 1",
    "set_irq_in ioapic unnamed-gpio-in 1",
    "irq_intercept_in",
    "clock_step x",
    "clock_set",
    "no_such_command",
    "READB 0x100000",
]


@pytest.mark.parametrize("line", MALFORMED)
def test_check_line_refuses_what_qemu_would_abort_on(line: str) -> None:
    with pytest.raises(QtestInvalidRequest) as info:
        check_line(line)
    assert info.value.line == line
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "line",
    [
        "readb 0x100000",
        "readq 1048576",
        "readl 04000000",
        "writeq 0x100000 0xffffffffffffffff",
        "outb 0x70 0x0b",
        "inl 0xffff",
        "read 0x100000 1",
        "write 0x100000 2 0xabcd",
        "write 0x100000 1 0x",  # QEMU answers ERR, it does not abort
        "b64write 0x100000 3 AAAA",
        "memset 0x100000 0 0",
        "irq_intercept_in /machine/q35/ioapic",
        "set_irq_in ioapic unnamed-gpio-in 3 -1",
        "clock_step",
        "clock_step -5",
        "endianness",
    ],
)
def test_check_line_accepts_well_formed_lines(line: str) -> None:
    assert check_line(line) == line.split(" ")


def test_every_command_has_a_usage() -> None:
    assert {"readb", "b64read", "b64write", "irq_intercept_in", "clock_step"} <= set(COMMANDS)
    with pytest.raises(QtestInvalidRequest, match=r"readb takes ADDR \(0 given\)"):
        check_line("readb")
    with pytest.raises(QtestInvalidRequest, match=r"clock_step takes \[NS\]"):
        check_line("clock_step 1 2")


# -- real QEMU ----------------------------------------------------------------------------
async def test_ram_round_trips_of_every_width() -> None:
    async with open_qtest_machine(memory=128) as qt:
        assert "-S" in qt.machine.argv and "-nodefaults" in qt.machine.argv
        for offset, (write, read, bits) in enumerate(
            [
                (qt.writeb, qt.readb, 8),
                (qt.writew, qt.readw, 16),
                (qt.writel, qt.readl, 32),
                (qt.writeq, qt.readq, 64),
            ]
        ):
            addr = RAM + 0x100 * offset
            for value in (0, (1 << bits) - 1, random.getrandbits(bits)):
                await write(addr, value)
                assert await read(addr) == value
        # target byte order is little-endian: the low byte comes first
        await qt.writeq(RAM, 0x0807060504030201)
        assert await qt.read(RAM, 8) == bytes(range(1, 9))
        assert await qt.readw(RAM + 2) == 0x0403
        assert await qt.qtest(f"readl {RAM + 4:#x}") == "0x0000000008070605"
        await qt.memset(RAM, 16, 0xA5)
        assert await qt.read(RAM, 16) == b"\xa5" * 16


@pytest.mark.parametrize("encoding", ["base64", "hex"])
async def test_buffer_round_trips(encoding: str) -> None:
    assert encoding in ("base64", "hex")
    async with open_qtest_machine() as qt:
        data = random.randbytes(4096)
        await qt.write(RAM + 0x1000, data, encoding=encoding)  # type: ignore[arg-type]
        assert await qt.read(RAM + 0x1000, 4096, encoding=encoding) == data  # type: ignore[arg-type]
        assert await qt.read(RAM + 0x1000, 4096) == data  # and across encodings
        # larger than one request, at an odd address and length
        big = random.randbytes(700_001)
        await qt.write(RAM + 0x12345, big, encoding=encoding)  # type: ignore[arg-type]
        assert await qt.read(RAM + 0x12345, len(big), encoding=encoding) == big  # type: ignore[arg-type]
        assert await qt.b64read(RAM + 0x1000, 4096) == data
        await qt.b64write(RAM, b"abc")
        assert await qt.read(RAM, 3) == b"abc"
        assert await qt.read(RAM, 0) == b""


async def test_port_io_round_trip_on_the_cmos() -> None:
    async with open_qtest_machine() as qt:
        # CMOS NVRAM byte 0x38 is plain storage: what is written reads back.
        for value in (0x5A, 0xA5, 0x00):
            await qt.outb(CMOS_INDEX, 0x38)
            await qt.outb(CMOS_DATA, value)
            await qt.outb(CMOS_INDEX, 0x38)
            assert await qt.inb(CMOS_DATA) == value
        # Register A after reset: 32.768 kHz time base, 1024 Hz rate; register D: power good.
        await qt.outb(CMOS_INDEX, RTC_REG_A)
        assert await qt.inb(CMOS_DATA) & 0x7F == 0x26
        await qt.outb(CMOS_INDEX, 0x0D)
        assert await qt.inb(CMOS_DATA) == 0x80
        assert await qt.inw(0xFFF0) == 0xFFFF  # an unassigned port reads all ones
        await qt.outw(0x80, 0x1234)  # the POST port takes anything
        await qt.outl(0x80, 0x12345678)
        assert isinstance(await qt.inl(0x80), int)


async def test_rtc_periodic_interrupt_reaches_the_ioapic_intercept() -> None:
    async with open_qtest_machine() as qt:
        await qt.irq_intercept_in("ioapic")
        await qt.irq_intercept_in("ioapic")  # the same device again is fine
        assert not qt.get_irq(RTC_IRQ)
        async with qt.irq_events() as irqs:
            # Register B: periodic interrupt enable (0x40) + 24-hour mode (0x02).
            await qt.outb(CMOS_INDEX, RTC_REG_B)
            await qt.outb(CMOS_DATA, 0x42)
            assert await irqs.receive(timeout=10) == IrqEvent(RTC_IRQ, raised=True)
            assert qt.get_irq(RTC_IRQ)
            # Reading register C acknowledges: QEMU sends "IRQ lower 8" before the inb reply,
            # so the level is already low when inb returns.
            await qt.outb(CMOS_INDEX, RTC_REG_C)
            flags = await qt.inb(CMOS_DATA)
            assert flags & 0xC0 == 0xC0  # IRQF and PF
            assert not qt.get_irq(RTC_IRQ)
            assert irqs.receive_nowait() == IrqEvent(RTC_IRQ, raised=False)
            # It fires again (1024 Hz): wait_irq sees it.
            await qt.wait_irq(RTC_IRQ, timeout=10)
            # Switch it off, acknowledge, and the line stays low.
            await qt.outb(CMOS_INDEX, RTC_REG_B)
            await qt.outb(CMOS_DATA, 0x02)
            await qt.outb(CMOS_INDEX, RTC_REG_C)
            await qt.inb(CMOS_DATA)
            await qt.wait_irq(RTC_IRQ, raised=False, timeout=1)
            with pytest.raises(QtestTimeout):
                await qt.wait_irq(RTC_IRQ, timeout=0.3)
        assert qt.irq_count >= 3


async def test_set_irq_in_and_a_full_subscription_counts_drops() -> None:
    async with open_qtest_machine() as qt:
        await qt.irq_intercept_in("ioapic")
        with qt.irq_events(buffer=1) as small, qt.irq_events() as big:
            for _ in range(3):
                await qt.set_irq_in("ioapic", "unnamed-gpio-in", 5, 1)
                await qt.set_irq_in("ioapic", "unnamed-gpio-in", 5, 0)
            assert [await big.receive(timeout=5) for _ in range(6)] == [
                IrqEvent(5, True),
                IrqEvent(5, False),
            ] * 3
            with pytest.raises(EventsDropped) as info:
                await small.receive(timeout=5)
            assert info.value.count == 5 and small.dropped == 5
            assert await small.receive(timeout=5) == IrqEvent(5, True)
            with pytest.raises(QtestTimeout):
                await small.receive(timeout=0.05)


async def test_every_malformed_line_is_refused_and_qemu_lives_on() -> None:
    async with open_qtest_machine() as qt:
        await qt.irq_intercept_in("ioapic")
        for line in MALFORMED:
            with pytest.raises(QtestInvalidRequest):
                await qt.qtest(line)
        # These are well-formed words, but QEMU would still abort (checked through QMP):
        for line, reason in [
            ("set_irq_in ioapic unnamed-gpio-in 99 1", "no GPIO input"),
            ("set_irq_in ioapic no-such-gpio 0 1", "no GPIO input"),
            ("irq_intercept_in /machine", "not a device"),
            ("irq_intercept_out /machine/unattached", "not a device"),
        ]:
            with pytest.raises(QtestInvalidRequest, match=reason):
                await qt.qtest(line)
        # Typed helpers refuse out-of-range values before formatting a line.
        for call in (
            qt.writeb(RAM, 0x100),
            qt.outb(0x10000, 0),
            qt.readq(-1),
            qt.memset(RAM, 1, 256),
            qt.set_irq_in("ioapic", "unnamed-gpio-in", -1, 1),
        ):
            with pytest.raises(QtestInvalidRequest):
                await call
        with pytest.raises(TypeError):
            await qt.readb(1.5)  # type: ignore[arg-type]
        await assert_healthy(qt)
        assert qt.machine.is_running()


async def test_a_malformed_line_really_kills_qemu() -> None:
    """Why the checks exist: the raw line, sent behind the validator's back, aborts QEMU,
    and a waiting caller learns that QEMU died."""
    with pytest.raises(MachineExited) as info:
        async with open_qtest_machine() as qt:
            await qt._stream.send_all(b"readb\n")
            await qt.readb(RAM, timeout=10)
    assert info.value.returncode is not None and info.value.returncode < 0  # SIGABRT


async def test_memory_access_without_a_cpu_is_refused() -> None:
    async with open_qtest_machine(machine="none") as qt:
        for call in (qt.readb(0), qt.write(0, b"x"), qt.qtest("memset 0x0 1 0")):
            with pytest.raises(QtestInvalidRequest, match="no CPU"):
                await call
        assert await qt.inb(0x70) == 0xFF  # port I/O needs no CPU
        await assert_healthy(qt)


async def test_fail_and_err_replies_raise_qtest_error() -> None:
    async with open_qtest_machine() as qt:
        with pytest.raises(QtestError) as info:
            await qt.irq_intercept_in("/no/such/device")
        assert (info.value.status, info.value.reason) == ("FAIL", "Unknown device")
        assert info.value.line == "irq_intercept_in /no/such/device"
        await qt.irq_intercept_in("ioapic")
        with pytest.raises(QtestError, match="IRQ intercept already enabled"):
            await qt.irq_intercept_in("/machine/q35/mch")
        with pytest.raises(QtestError) as info:
            await qt.qtest(f"write {RAM:#x} 1 0x")
        assert (info.value.status, info.value.reason) == ("ERR", "invalid argument size")
        # No qtest accelerator under TCG/KVM: the clock commands are unknown to QEMU.
        assert not await qt.clock_supported()
        with pytest.raises(QtestError, match="Unknown command 'clock_step'"):
            await qt.clock_step()
        await assert_healthy(qt)


@functools.cache
def accelerators() -> list[str]:
    """The accelerators this QEMU binary was built with (``-accel help``)."""
    binary = os.environ.get("QEMU", "qemu-system-x86_64")
    try:
        out = subprocess.run(
            [binary, "-accel", "help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return []
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


# Decided before the test runs: pytest-trio loses the reason of a pytest.skip() raised inside
# an async test.
@pytest.mark.skipif(
    "qtest" not in accelerators(),
    reason="this QEMU has no qtest accelerator (`-accel help` lists "
    f"{', '.join(accelerators()) or 'nothing'}), so clock_step/clock_set answer "
    "FAIL Unknown command (asserted in test_fail_and_err_replies_raise_qtest_error)",
)
async def test_clock_step_with_the_qtest_accelerator() -> None:
    async with open_qtest_machine(accel="qtest") as qt:
        assert await qt.clock_supported()
        start = await qt.clock_set(0)
        assert await qt.clock_step(1000) == start + 1000
        assert await qt.clock_step() >= start + 1000


async def test_cancelled_and_timed_out_calls_leave_the_channel_in_step() -> None:
    async with open_qtest_machine() as qt:
        await qt.writel(RAM, 0x11111111)
        await qt.writel(RAM + 4, 0x22222222)
        # A deadline already passed: nothing is sent.
        with pytest.raises(QtestTimeout, match="not sent"):
            await qt.readl(RAM, timeout=0)
        # Sent, then the caller leaves before the reply (a 16 MiB reply takes ~100 ms):
        # by its timeout, then by cancellation. The late replies are dropped.
        big = f"b64read 0x0 {1 << 24:#x}"
        with pytest.raises(QtestTimeout, match="discarded"):
            await qt.qtest(big, timeout=0.01)
        assert await qt.readl(RAM + 4) == 0x22222222
        with trio.move_on_after(0.01) as scope:
            await qt.qtest(big)
        assert scope.cancelled_caught
        assert await qt.readl(RAM) == 0x11111111
        assert qt.discarded_replies == 2
        await assert_healthy(qt)


async def test_concurrent_callers_pipeline_in_order() -> None:
    async with open_qtest_machine() as qt:
        values = [random.getrandbits(64) for _ in range(200)]
        await qt.write(RAM, b"".join(v.to_bytes(8, "little") for v in values))
        results: dict[int, int] = {}

        async def reader(index: int) -> None:
            for _ in range(20):
                results[index] = await qt.readq(RAM + 8 * index)

        async with trio.open_nursery() as nursery:
            for index in range(len(values)):
                nursery.start_soon(reader, index)
        assert [results[i] for i in range(len(values))] == values


async def test_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    """Measured and printed, never asserted (shared CI machines vary)."""
    async with open_qtest_machine() as qt:
        await qt.readb(RAM)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            for _ in range(500):
                await qt.readl(RAM)
            count += 500
        sequential = count / (time.perf_counter() - started)

        async def worker() -> None:
            for _ in range(2000):
                await qt.readl(RAM)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker)
        pipelined = 16000 / (time.perf_counter() - started)

        data = random.randbytes(4 << 20)
        started = time.perf_counter()
        await qt.write(RAM, data)
        write_rate = 4 / (time.perf_counter() - started)
        started = time.perf_counter()
        assert await qt.read(RAM, len(data)) == data
        read_rate = 4 / (time.perf_counter() - started)
    with capsys.disabled():
        print(
            f"\nqtest: {sequential:,.0f} round trips/s sequential, {pipelined:,.0f}/s with 8 "
            f"concurrent callers; b64write {write_rate:.0f} MiB/s, b64read {read_rate:.0f} MiB/s"
        )


async def test_launch_failure_and_cancellation_close_qemus_end(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(LaunchError):
        async with open_qtest_machine(binary=str(tmp_path / "no-qemu")):
            pytest.fail("launched")  # pragma: no cover
    assert open_fds() == before
    with pytest.raises(LaunchError, match="exited"):
        async with open_qtest_machine(args=["-no-such-option"]):
            pytest.fail("launched")  # pragma: no cover
    assert open_fds() == before
    for delay in (0, 0.005, 0.02):
        with trio.move_on_after(delay):
            async with open_qtest_machine():
                await trio.sleep_forever()  # pragma: no cover
    assert open_fds() == before


async def test_after_the_block_qemu_is_gone_and_calls_fail() -> None:
    async with open_qtest_machine() as qt:
        pid = qt.machine.pid
        pending, iterated = qt.irq_events(), qt.irq_events()
    assert qt.machine.returncode == 0 and not alive(pid)
    with pytest.raises(QtestProtocolError, match="closed"):
        await qt.readb(RAM)
    with pytest.raises(trio.EndOfChannel):  # an orderly end, not an error
        await pending.receive(timeout=1)
    assert [event async for event in iterated] == []
    with qt.irq_events() as after, pytest.raises(trio.EndOfChannel):
        after.receive_nowait()


async def test_body_errors_pass_through_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with open_qtest_machine():
            raise KeyError("mine")


async def test_qmp_keeps_working_beside_qtest() -> None:
    async with open_qtest_machine() as qt:
        async with qt.machine.subscribe("RESUME") as events:
            await qt.machine.cmd("cont")
            assert (await events.receive())["event"] == "RESUME"
        await qt.writel(RAM, 7)
        assert await qt.readl(RAM) == 7


# -- a scripted peer ----------------------------------------------------------------------
class Peer:
    """The test's end of the qtest channel, speaking for QEMU."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def line(self, timeout: float = 5) -> bytes:
        """The next request line (with its newline)."""
        with trio.fail_after(timeout):
            while b"\n" not in self._buffer:
                self._buffer += await self.stream.receive_some()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    async def silent(self, seconds: float) -> bool:
        """Whether no request arrives for ``seconds``."""
        with trio.move_on_after(seconds):
            await self.line(timeout=seconds + 1)
            return False
        return True

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


@asynccontextmanager
async def scripted_peer() -> AsyncIterator[tuple[QtestMachine, Peer]]:
    """A QtestMachine whose channel's far end is the test's. The machine itself is a real
    QEMU (q35, stopped), for QMP and supervision; its own qtest is not in play."""
    async with trio_qemu.open_machine(machine="q35", args=["-nodefaults", "-S"]) as vm:
        ours, theirs = socketpair_stream()
        peer = Peer(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
        qt = QtestMachine(vm, ours, timeout=5)
        async with trio.open_nursery() as nursery:
            await nursery.start(qt._run_reader)
            try:
                yield qt, peer
            finally:
                nursery.cancel_scope.cancel()
                peer.stream.socket.close()
                ours.socket.close()


async def test_irq_lines_before_a_reply_are_applied_first() -> None:
    async with scripted_peer() as (qt, peer), trio.open_nursery() as nursery:
        result: list[int] = []
        seen: list[bool] = []

        async def call() -> None:
            result.append(await qt.inb(0x71))
            seen.append(qt.get_irq(4))  # already applied when the reply is returned

        with qt.irq_events() as irqs:
            nursery.start_soon(call)
            assert await peer.line() == b"inb 0x71\n"
            await peer.send(b"IRQ raise 3\nIRQ raise 4\nIRQ lower 3\nOK 0x00c0\n")
            await qt.wait_irq(4, timeout=5)
            assert [await irqs.receive(timeout=5) for _ in range(3)] == [
                IrqEvent(3, True),
                IrqEvent(4, True),
                IrqEvent(3, False),
            ]
        nursery.cancel_scope.deadline = trio.current_time() + 5
    assert result == [0xC0] and seen == [True]
    assert (qt.get_irq(3), qt.get_irq(4)) == (False, True)


async def test_a_late_reply_goes_to_nobody() -> None:
    async with scripted_peer() as (qt, peer):
        with pytest.raises(QtestTimeout, match="discarded"):
            await qt.readb(0x10, timeout=0.05)
        assert await peer.line() == b"readb 0x10\n"
        result: list[int] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                result.append(await qt.readb(0x20))

            nursery.start_soon(call)
            assert await peer.line() == b"readb 0x20\n"
            await peer.send(b"OK 0x0000000000000010\nIRQ raise 1\nOK 0x0000000000000020\n")
        assert result == [0x20] and qt.discarded_replies == 1


async def test_pipelined_requests_are_bounded_and_answered_in_order() -> None:
    async with scripted_peer() as (qt, peer), trio.open_nursery() as nursery:
        results: dict[int, int] = {}

        async def call(port: int) -> None:
            results[port] = await qt.inb(port)

        total = MAX_IN_FLIGHT + 6
        for port in range(total):
            nursery.start_soon(call, port)
        # Only MAX_IN_FLIGHT requests go out before any reply comes back.
        requests = [await peer.line() for _ in range(MAX_IN_FLIGHT)]
        assert await peer.silent(0.1)
        for _ in range(total):
            if not requests:
                requests.append(await peer.line())
            port = int(requests.pop(0).split()[1], 16)
            await peer.send(f"OK {port + 1000:#06x}\n".encode())
    assert results == {port: port + 1000 for port in range(total)}


@pytest.mark.parametrize(
    "junk", [b"HELLO\n", b"OK 0x1\n", b"IRQ raise x\n", b"\xff\n", b"IRQ up 1\n"]
)
async def test_a_broken_peer_fails_the_channel(junk: bytes) -> None:
    async with scripted_peer() as (qt, peer):
        with qt.irq_events() as irqs:
            await peer.send(junk)  # a reply to no request, or not qtest at all
            with pytest.raises(QtestProtocolError):
                await irqs.receive(timeout=5)
        with pytest.raises(QtestProtocolError, match="qtest"):
            await qt.readb(0x10)
        await qt.machine.cmd("query-status")  # QMP is unaffected


async def test_peer_eof_fails_waiters() -> None:
    async with scripted_peer() as (qt, peer), trio.open_nursery() as nursery:

        async def close_soon() -> None:
            assert await peer.line() == b"readb 0x10\n"
            peer.stream.socket.shutdown(socket.SHUT_RDWR)

        nursery.start_soon(close_soon)
        with pytest.raises(QtestProtocolError, match="closed the qtest channel"):
            await qt.readb(0x10)


async def test_without_qmp_the_state_checks_fall_back_safely() -> None:
    async with open_qtest_machine(qmp=False) as qt:
        await qt.writel(RAM, 0xCAFE)  # q35 has a CPU: judged from the machine type
        assert await qt.readl(RAM) == 0xCAFE
        with pytest.raises(QtestInvalidRequest, match="needs QMP"):
            await qt.irq_intercept_in("ioapic")  # cannot tell a device from a container
        assert await qt.endianness() == "little"
    async with open_qtest_machine(qmp=False, machine="none") as qt:
        with pytest.raises(QtestInvalidRequest, match="no CPU"):
            await qt.readb(0)
        assert alive(qt.machine.pid) and await qt.inb(0x70) == 0xFF
