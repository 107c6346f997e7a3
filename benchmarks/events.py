"""Event pump throughput: trio_qemu's QMP reader and fan-out against raw readers.

    .venv/bin/python benchmarks/events.py [--quick] [--n 500000] [--repeat 3] [--seconds 3]
        [--mem-n 25000] [--mem-repeat 2] [--pairs 2000] [--parts fake,memory,real]

Every part interleaves its variants (``_common.interleave``): each round runs every variant
once, the order reversed every other round, after one uncounted warm-up round (a tenth of
the size, or a shorter window). Figures are medians over rounds; a ratio of rates is the
median over rounds of the ratio of two variants measured in the same round, so a load that
drifts during the run (or QEMU's own event rate, which moves with it) falls on both.

Part A, a flooding fake QMP peer (``_peers.py events``) in a process of its own: after the
handshake and one "go" command it writes ``--n`` pre-encoded ``GUEST_CRASHLOADED`` events
(byte for byte what QEMU sends) in 128 KiB ``sendall`` calls and then EOF. Every variant
reads the same stream to its end. The peer is far faster than any Python reader, so each
figure is how fast that reader parses and fans out. Every run is timed from sending "go"
to the last consumer reaching the end; the figure is events/s (``--n`` / time).

- raw line count: a Trio task reading the fd (``os.read`` + ``wait_readable``, as
  trio_qemu's reader does) and counting newlines: the limit for any reader in this process.
- raw split + json.loads: the same, plus splitting lines and ``json.loads`` of each: the
  floor for a reader that decodes every event. Both raw readers do less than trio_qemu
  (no routing, no fan-out): they are limits, not competitors.
- trio_qemu: ``open_qmp`` on the socket, with 0 matching subscribers (reader, decode and
  publish only), 1 and 4 subscribers with the default buffer (2048), and 1 subscriber whose
  buffer holds every event (``n + 1``: nothing can be dropped). A consumer either drains in
  batches (``await receive()`` then ``receive_nowait()`` until ``WouldBlock``) or calls
  ``receive()`` per event (``async for``); the latter yields to the scheduler once per
  event, so in a flood it falls behind and its bounded buffer drops (counted and printed).
- qemu.qmp: its asyncio ``QMPClient`` with an ``EventListener`` (debug formatting hooks
  disabled, as in ``qmp_throughput.py``), the consumer reading until ``BENCH_END``. Its
  queue is unbounded, so it is compared with the trio_qemu subscriber that keeps every
  event: both deliver all ``--n`` events to one consumer (checked), the same work.

Part A also measures memory (``tracemalloc`` peak above the start) while ``--mem-n`` and
4x as many events reach a subscriber that reads nothing until the flood has ended. The
same work on both sides: trio_qemu with a buffer of ``n + 1`` and qemu.qmp's
``EventListener`` (its queue and its history) both keep every event, and the figure is
what holding them costs. A third row, trio_qemu's default buffer (2048), keeps 2048 and
drops the rest (counted): its peak should not grow with the count. It has no qemu.qmp
counterpart (qemu.qmp has no bounded listener).

Part B, a real QEMU: ``-machine q35 -device pvpanic`` with a 64 KiB ``-bios`` whose reset
vector loops writing 2 to port 0x505, so QEMU emits ``GUEST_CRASHLOADED`` as fast as TCG
runs the loop. QEMU starts paused (``-S``); the reader subscribes, sends ``cont``, waits
``--seconds``, sends ``stop`` and awaits its reply: the reply comes after every event
emitted before it, so when it arrives all of them were read. events/s = events / (time
from ``cont`` to the ``stop`` reply); a reader that keeps pace shows about QEMU's own rate,
the raw blocking reader's figure in the same round, and QEMU's RSS stays flat (QEMU buffers
unread monitor output without bound). Then a ``-machine none`` QEMU and ``stop``/``cont``
in a loop (two events per pair, ``--pairs``), raw and trio_qemu interleaved the same way.

Results go to ``benchmarks/results/events.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from qemu.qmp import EventListener

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    interleave,
    interleave_note,
    median,
    paired_ratio,
    peer_process,
    print_ratios,
    qemu_binary,
    quiet_logging,
    ratio,
    rss_bytes,
    write_results,
)
from _peers import END_EVENT, EVENT_NAME
from qmp_throughput import QuietQMPClient

import trio_qemu
from trio_qemu import (
    ChannelFds,
    EventsDropped,
    MachineConfig,
    QMPClient,
    Subscription,
    open_qmp,
)

NAME = "events"
#: The reset vector: mov dx,0x505; mov al,2; out dx,al; jmp back to the out.
RESET_VECTOR = bytes.fromhex("BA0505B002EEEBF8")
BIOS_SIZE = 64 * 1024
NONE_ARGS = ["-machine", "none", "-nodefaults", "-accel", "tcg"]
TARGET_EVENTS = 100_000
#: trio_qemu's default subscription buffer (``open_qmp``'s ``event_buffer``, the same as
#: ``MachineConfig.event_buffer``), read from the code so the label can't go stale. It is above
#: two 64 KiB reads' worth of events (~540 each of QEMU's 121-byte ``GUEST_CRASHLOADED``): the
#: reader publishes a whole read before a consumer can run.
BIG_BUFFER: int = inspect.signature(QMPClient.__init__).parameters["event_buffer"].default
if MachineConfig().event_buffer != BIG_BUFFER:  # pragma: no cover - a library change
    raise SystemExit("open_qmp and MachineConfig disagree on the default event buffer")


# -- results -------------------------------------------------------------------------------
@dataclass
class Run:
    """One run: how many events in how long, and what each subscriber got."""

    events: int
    seconds: float
    delivered: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Variant:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return median([r.rate for r in self.runs]) if self.runs else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "events_per_s": self.rate,
            "runs": [
                {
                    "events": r.events,
                    "seconds": r.seconds,
                    "events_per_s": r.rate,
                    "delivered": r.delivered,
                    "dropped": r.dropped,
                    **r.extra,
                }
                for r in self.runs
            ],
        }

    def summary(self) -> str:
        if not self.runs:
            return f"  {self.label:<66} (not run)"
        last = self.runs[-1]
        subs = ""
        if last.delivered:
            got = zip(last.delivered, last.dropped, strict=True)
            pairs = ", ".join(f"{d:,}/{x:,}" for d, x in got)
            subs = f"  delivered/dropped per subscriber: {pairs}"
        extra = "".join(f"  {k} {v}" for k, v in last.extra.items()
                        if k.startswith("qemu_rss") or k == "lag_s")  # fmt: skip
        return f"  {self.label:<66} {self.rate:>12,.0f} events/s{subs}{extra}"


# -- consumers -----------------------------------------------------------------------------
async def consume(sub: Subscription, counts: list[int], index: int, batch: bool,
                  pause: float = 0.0, until: tuple[int, trio.Event] | None = None,
                  ) -> None:  # fmt: skip
    """Count events until the subscription ends; ``EventsDropped`` is counted by ``sub``.

    ``batch``: after each ``receive()``, take what is buffered with ``receive_nowait()``.
    ``pause``: sleep that long after each wake-up (a slow subscriber). ``until``: set the
    event once that many events were counted.
    """
    with suppress(trio.EndOfChannel):
        while True:
            try:
                await sub.receive()
            except EventsDropped:
                continue
            counts[index] += 1
            if batch:
                while True:
                    try:
                        sub.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except EventsDropped:
                        continue
                    counts[index] += 1
            if until is not None and counts[index] >= until[0]:
                until[1].set()
            if pause:
                await trio.sleep(pause)


def drain_nowait(sub: Subscription) -> int:
    """Take what is buffered without waiting; return how many events that was."""
    taken = 0
    while True:
        try:
            sub.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return taken
        except EventsDropped:
            continue
        taken += 1


# -- part A: the flooding fake peer --------------------------------------------------------
def raw_handshake(sock: socket.socket) -> bytearray:
    """Greeting and qmp_capabilities on a blocking socket; returns bytes read past them."""
    buf = bytearray()
    lines = 0
    sent = False
    while lines < 2:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("peer closed during the handshake")
        buf += data
        while b"\n" in buf and lines < 2:
            _, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            lines += 1
            if lines == 1 and not sent:
                sock.sendall(b'{"execute":"qmp_capabilities"}')
                sent = True
    return buf


async def raw_fake(sock: socket.socket, decode: bool) -> tuple[int, float]:
    """Count (and with ``decode``, ``json.loads``) every line until EOF; (lines, seconds)."""
    carry = raw_handshake(sock)
    sock.setblocking(False)
    fd = sock.fileno()
    lines = carry.count(b"\n")
    start = time.perf_counter()
    os.write(fd, b'{"execute":"go","id":1}')
    loads = json.loads
    pending = bytes(carry)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not data:
            break
        if decode:
            parts = (pending + data).split(b"\n")
            pending = parts.pop()
            for line in parts:
                loads(line)
            lines += len(parts)
        else:
            lines += data.count(b"\n")
        await trio.lowlevel.cancel_shielded_checkpoint()  # a fair reader yields per read
    elapsed = time.perf_counter() - start
    sock.close()
    return lines, elapsed


async def trio_fake(
    sock: socket.socket, subscribers: int, batch: bool, buffer: int
) -> tuple[float, list[int], list[int]]:
    """trio_qemu on the fake peer; (seconds, delivered, dropped) per subscriber."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with open_qmp(stream, event_buffer=buffer) as client:
        if subscribers:
            subs = [client.subscribe(EVENT_NAME, END_EVENT) for _ in range(subscribers)]
        else:  # matches nothing: reader, decode and publish only; ends at EOF
            subs = [client.subscribe("NO-SUCH-EVENT", buffer=1)]
        counts = [0] * len(subs)
        async with trio.open_nursery() as nursery:
            for i, sub in enumerate(subs):
                nursery.start_soon(consume, sub, counts, i, batch)
            start = time.perf_counter()
            await client.cmd("go")
        elapsed = time.perf_counter() - start
        dropped = [s.dropped for s in subs]
        for s in subs:
            s.close()
    if not subscribers:
        return elapsed, [], []
    return elapsed, counts, dropped


async def asyncio_fake(sock: socket.socket) -> tuple[float, int]:
    """qemu.qmp's asyncio client with one EventListener read to the end."""
    qmp = QuietQMPClient("bench")
    await qmp.connect(sock)
    listener = EventListener()
    count = 0
    try:
        with qmp.listen(listener):
            start = time.perf_counter()
            await qmp.execute("go")
            async for event in listener:
                count += 1
                if event["event"] == END_EVENT:
                    break
            elapsed = time.perf_counter() - start
    finally:
        with suppress(Exception):
            await qmp.disconnect()
    return elapsed, count


def fake_variants() -> list[Variant]:
    return [
        Variant("raw_count", "raw: os.read + count newlines (the limit)"),
        Variant("raw_json", "raw: os.read + split + json.loads per line"),
        Variant("trio_0", "trio_qemu, no matching subscriber (reader + publish)"),
        Variant("trio_1_batch", f"trio_qemu, 1 subscriber, batch drain, buffer {BIG_BUFFER}"),
        Variant("trio_4_batch", f"trio_qemu, 4 subscribers, batch drain, buffer {BIG_BUFFER}"),
        Variant("trio_1_all", "trio_qemu, 1 subscriber, batch drain, buffer n+1 (keeps all)"),
        Variant("trio_1_each", f"trio_qemu, 1 subscriber, receive() each, buffer {BIG_BUFFER}"),
        Variant("asyncio", "qemu.qmp asyncio QMPClient + EventListener (keeps all)"),
    ]


def fake_run(key: str, count: int) -> Run:
    """One run of variant ``key`` against a fresh peer flooding ``count`` events."""
    with peer_process("events", count) as (_proc, sock):
        if key in ("raw_count", "raw_json"):
            lines, seconds = trio.run(raw_fake, sock, key == "raw_json")
            if lines < count:
                raise RuntimeError(f"{key}: {lines} lines for {count} events")
            return Run(count, seconds)
        if key == "asyncio":
            seconds, got = asyncio.run(asyncio_fake(sock))
            if got != count + 1:  # + the end event
                raise RuntimeError(f"asyncio: {got} events of {count}+1")
            return Run(count, seconds, [got], [0])
        subs = {"trio_0": 0, "trio_4_batch": 4}.get(key, 1)
        batch = key != "trio_1_each"
        buffer = count + 1 if key == "trio_1_all" else BIG_BUFFER
        seconds, delivered, dropped = trio.run(trio_fake, sock, subs, batch, buffer)
    for d, x in zip(delivered, dropped, strict=True):
        if d + x != count + 1:  # + the end event
            raise RuntimeError(f"{key}: {d} delivered + {x} dropped != {count}+1")
    if key == "trio_1_all" and any(dropped):
        raise RuntimeError(f"trio_1_all dropped {dropped} with a buffer of {buffer}")
    return Run(count, seconds, delivered, dropped, {"buffer": buffer})


def run_fake(variants: dict[str, Variant], n: int, repeat: int) -> str:
    note = interleave_note(repeat, 1)
    runs = interleave(list(variants), repeat, lambda key: fake_run(key, n),
                      warmup_run=lambda key: fake_run(key, max(n // 10, 1000)),
                      say=_say)  # fmt: skip
    for key, values in runs.items():
        variants[key].runs = values
    return note


# -- part A: memory while a subscriber is stalled ------------------------------------------
#: What each memory variant keeps while its subscriber reads nothing.
MEMORY_KINDS = {
    "trio_all": "trio_qemu, buffer n+1 (keeps every event)",
    "asyncio": "qemu.qmp EventListener (keeps every event)",
    "trio_bounded": f"trio_qemu, default buffer {BIG_BUFFER} (keeps {BIG_BUFFER}, drops the rest)",
}


async def trio_stalled(sock: socket.socket, buffer: int | None) -> dict[str, Any]:
    """A subscriber that reads nothing until the flood has ended; ``None``: default buffer."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with open_qmp(stream) as client:
        held = client.subscribe(EVENT_NAME, buffer=buffer)
        end = client.subscribe(END_EVENT)
        start = time.perf_counter()
        await client.cmd("go")
        await end.receive()  # the reader has read and published everything
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        result = {"held": drain_nowait(held), "dropped": held.dropped, "seconds": elapsed,
                  "peak_abs": peak, "buffer": BIG_BUFFER if buffer is None else buffer}  # fmt: skip
        held.close()
        end.close()
    return result


async def asyncio_stalled(sock: socket.socket) -> dict[str, Any]:
    """An ``EventListener`` nobody reads until the flood has ended (its queue and its
    history keep every event, as qemu.qmp always does)."""
    qmp = QuietQMPClient("bench")
    await qmp.connect(sock)
    held = EventListener(EVENT_NAME)
    end = EventListener(END_EVENT)
    try:
        with qmp.listen(held, end):
            start = time.perf_counter()
            await qmp.execute("go")
            await end.get()
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            count = len(held.clear())
    finally:
        with suppress(Exception):
            await qmp.disconnect()
    return {"held": count, "dropped": 0, "seconds": elapsed, "peak_abs": peak}


def measure_memory(kind: str, n: int) -> dict[str, Any]:
    """Peak traced memory above the start while ``n`` events reach a stalled subscriber."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with peer_process("events", n) as (_proc, sock):
            if kind == "trio_all":
                result = trio.run(trio_stalled, sock, n + 1)
            elif kind == "trio_bounded":
                result = trio.run(trio_stalled, sock, None)
            else:
                result = asyncio.run(asyncio_stalled(sock))
    finally:
        tracemalloc.stop()
    peak = result.pop("peak_abs") - base
    if kind != "trio_bounded" and result["held"] != n:
        raise RuntimeError(f"memory {kind}: held {result['held']} of {n} events")
    result.update(events=n, peak_bytes=peak, bytes_per_event=peak / n)
    return result


def run_memory(mem_n: int, rounds: int) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Every kind at ``mem_n`` and ``4 * mem_n`` events, interleaved; results per kind, the
    median row of each size (by peak), smaller size first."""
    sizes = (mem_n, 4 * mem_n)
    keys = [f"{kind}@{size}" for size in sizes for kind in MEMORY_KINDS]

    def one(key: str, scale: float = 1.0) -> dict[str, Any]:
        kind, _, size = key.partition("@")
        return measure_memory(kind, max(int(int(size) * scale), 1000))

    note = interleave_note(rounds, 1, paired=False) + "; a ratio is one of the median peaks"
    runs = interleave(keys, rounds, one, warmup_run=lambda key: one(key, 0.1), say=_say)
    memory: dict[str, list[dict[str, Any]]] = {kind: [] for kind in MEMORY_KINDS}
    for key, rows in runs.items():
        kind = key.partition("@")[0]
        ordered = sorted(rows, key=lambda r: r["peak_bytes"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the median run (lower middle)
        row["runs_peak_bytes"] = [r["peak_bytes"] for r in rows]
        memory[kind].append(row)
    for rows in memory.values():
        rows.sort(key=lambda r: r["events"])
    return memory, note


# -- part B: a real QEMU -------------------------------------------------------------------
def write_bios(directory: Path) -> Path:
    """64 KiB of 0xFF whose reset vector (offset 0xFFF0) loops writing 2 to port 0x505."""
    image = bytearray(b"\xff" * BIOS_SIZE)
    image[0xFFF0 : 0xFFF0 + len(RESET_VECTOR)] = RESET_VECTOR
    path = directory / "pvpanic-loop.bin"
    path.write_bytes(bytes(image))
    return path


def pvpanic_config(bios: Path) -> MachineConfig:
    return MachineConfig(
        machine="q35",
        accel="tcg",
        args=["-nodefaults", "-device", "pvpanic", "-bios", str(bios), "-S"],
    )


async def trio_real(
    config: MachineConfig, seconds: float, subscribers: int, batch: bool, buffer: int
) -> Run:
    async with trio_qemu.open_machine(config) as vm:
        assert vm.pid is not None
        subs = [vm.subscribe(EVENT_NAME, buffer=buffer) for _ in range(subscribers)]
        counts = [0] * subscribers
        async with trio.open_nursery() as nursery:
            for i, sub in enumerate(subs):
                nursery.start_soon(consume, sub, counts, i, batch)
            qemu_rss0, py_rss0 = rss_bytes(vm.pid), rss_bytes()
            start = time.perf_counter()
            await vm.cmd("cont")
            await trio.sleep(seconds)
            await vm.cmd("stop")  # its reply comes after every event emitted before it
            elapsed = time.perf_counter() - start
            qemu_rss1, py_rss1 = rss_bytes(vm.pid), rss_bytes()
            nursery.cancel_scope.cancel()
        delivered = [c + drain_nowait(s) for c, s in zip(counts, subs, strict=True)]
        dropped = [s.dropped for s in subs]
        for s in subs:
            s.close()
    total = delivered[0] + dropped[0]
    return Run(total, elapsed, delivered, dropped, {
        "qemu_rss_growth_mib": round((qemu_rss1 - qemu_rss0) / 2**20, 1),
        "python_rss_growth_mib": round((py_rss1 - py_rss0) / 2**20, 1),
        "lag_s": round(elapsed - seconds, 4),
    })  # fmt: skip


def raw_real(config: MachineConfig, seconds: float) -> Run:
    """A blocking socket, counting event lines; the same argv as trio_qemu's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = config.argv(ChannelFds(monitor=theirs.fileno()))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            pass_fds=[theirs.fileno()], start_new_session=True)  # fmt: skip
    theirs.close()
    try:
        carry = raw_handshake(ours)
        needle = b'"' + EVENT_NAME.encode() + b'"'
        qemu_rss0 = rss_bytes(proc.pid)
        start = time.perf_counter()
        ours.sendall(b'{"execute":"cont","id":"cont"}')
        count = 0
        stop_sent = False
        while True:
            data = carry + ours.recv(1 << 20)
            cut = data.rfind(b"\n") + 1
            complete, carry = data[:cut], bytearray(data[cut:])
            count += complete.count(needle)
            if stop_sent and b'"id": "stop"' in complete:
                break
            if not stop_sent and time.perf_counter() - start >= seconds:
                ours.sendall(b'{"execute":"stop","id":"stop"}')
                stop_sent = True
        elapsed = time.perf_counter() - start
        qemu_rss1 = rss_bytes(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ours.close()
    return Run(count, elapsed, extra={
        "qemu_rss_growth_mib": round((qemu_rss1 - qemu_rss0) / 2**20, 1),
        "lag_s": round(elapsed - seconds, 4),
    })  # fmt: skip


async def trio_stopcont(pairs: int) -> Run:
    config = MachineConfig(args=NONE_ARGS, accel=None)
    async with trio_qemu.open_machine(config) as vm:
        sub = vm.subscribe("STOP", "RESUME", buffer=2 * pairs + 16)
        counts = [0]
        all_seen = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, sub, counts, 0, True, 0.0, (2 * pairs, all_seen))
            start = time.perf_counter()
            for _ in range(pairs):
                await vm.cmd("stop")
                await vm.cmd("cont")
            with trio.fail_after(10):
                await all_seen.wait()
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        sub.close()
    return Run(2 * pairs, elapsed, [counts[0]], [sub.dropped])


def raw_stopcont(pairs: int) -> Run:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = MachineConfig(args=NONE_ARGS, accel=None).argv(ChannelFds(monitor=theirs.fileno()))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            pass_fds=[theirs.fileno()], start_new_session=True)  # fmt: skip
    theirs.close()
    try:
        buf = raw_handshake(ours)
        events = 0

        def until(marker: bytes) -> None:
            nonlocal events
            while True:
                while b"\n" not in buf:
                    data = ours.recv(65536)
                    if not data:
                        raise RuntimeError("QEMU closed its monitor")
                    buf.extend(data)
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                if b'"event"' in line:
                    events += 1
                    if marker == b"event":
                        return
                elif marker in line:
                    return

        start = time.perf_counter()
        for _ in range(pairs):
            ours.sendall(b'{"execute":"stop","id":1}')
            until(b'"id": 1')
            ours.sendall(b'{"execute":"cont","id":2}')
            until(b'"id": 2')
        while events < 2 * pairs:
            until(b"event")
        elapsed = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ours.close()
    return Run(2 * pairs, elapsed)


# -- main ----------------------------------------------------------------------------------
def _say(line: str) -> None:
    print(line, flush=True)


def paired(variants: dict[str, Variant], a: str, b: str) -> float:
    """Median over rounds of the events/s of ``a`` over ``b`` in the same round."""
    if not variants.get(a) or not variants.get(b) or not variants[a].runs:
        return float("nan")
    return paired_ratio([r.rate for r in variants[a].runs], [r.rate for r in variants[b].runs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--n", type=int, help="events per fake-peer run (default 500000)")
    parser.add_argument("--repeat", type=int, help="runs per variant (default 3)")
    parser.add_argument("--mem-n", type=int, help="events of the smaller memory run (25000)")
    parser.add_argument("--mem-repeat", type=int, help="rounds of the memory runs (default 2)")
    parser.add_argument("--seconds", type=float, help="real-QEMU flood window (default 3)")
    parser.add_argument("--pairs", type=int, help="stop/cont pairs (default 2000)")
    parser.add_argument(
        "--parts",
        default="fake,memory,real",
        help="comma-separated subset of fake,memory,real (default all)",
    )
    options = parser.parse_args(argv)
    quick = options.quick
    n = options.n or (50_000 if quick else 500_000)
    repeat = options.repeat or (1 if quick else 3)
    mem_n = options.mem_n or (10_000 if quick else 25_000)
    mem_repeat = options.mem_repeat or (1 if quick else 2)
    seconds = options.seconds or (1.0 if quick else 3.0)
    pairs = options.pairs or (200 if quick else 2000)
    parts = set(options.parts.split(","))
    if not parts <= {"fake", "memory", "real"}:
        parser.error(f"--parts: unknown {sorted(parts - {'fake', 'memory', 'real'})}")
    quiet_logging()
    qemu_binary()  # fail early without QEMU

    fake = {v.key: v for v in fake_variants()}
    fake_note = None
    if "fake" in parts:
        print(f"A. fake QMP peer flooding {n:,} events, median of {repeat} run(s)")
        fake_note = run_fake(fake, n, repeat)
        print()
        for variant in fake.values():
            print(variant.summary())

    memory: dict[str, list[dict[str, Any]]] = {kind: [] for kind in MEMORY_KINDS}
    memory_note = None
    if "memory" in parts:
        print(f"\nA. memory while a subscriber reads nothing until the flood ends, {mem_n:,} "
              f"and {4 * mem_n:,} events (tracemalloc peak above the start), median of "
              f"{mem_repeat} run(s)")  # fmt: skip
        memory, memory_note = run_memory(mem_n, mem_repeat)
        print()
    for kind, rows in memory.items():
        for row in rows:
            print(f"  {MEMORY_KINDS[kind]:<52} {row['events']:>8,} events: peak "
                  f"{row['peak_bytes'] / 2**20:7.2f} MiB ({row['bytes_per_event']:,.0f} B/event)"
                  f"  held {row['held']:,} dropped {row['dropped']:,}")  # fmt: skip
    growth = {
        k: ratio(rows[1]["peak_bytes"], rows[0]["peak_bytes"]) if rows else float("nan")
        for k, rows in memory.items()
    }
    mem_ratio = {
        f"memory: trio keeps all / qemu.qmp, {t['events']:,} events": ratio(
            t["peak_bytes"], a["peak_bytes"])
        for t, a in zip(memory["trio_all"], memory["asyncio"], strict=True)
    }  # fmt: skip

    real: dict[str, Variant] = {}
    real_note = None
    if "real" in parts:
        print(f"\nB. real QEMU, pvpanic loop, {seconds} s window, median of {repeat} run(s)")
        real = {
            "raw": Variant("raw", "raw blocking socket, count event lines (QEMU's rate)"),
            "trio_1_batch": Variant("trio_1_batch", "trio_qemu open_machine, 1 subscriber, "
                                    f"batch drain, buffer {BIG_BUFFER}"),
            "trio_4_batch": Variant("trio_4_batch", "trio_qemu open_machine, 4 subscribers, "
                                    f"batch drain, buffer {BIG_BUFFER}"),
            "trio_1_each": Variant("trio_1_each", "trio_qemu, 1 subscriber, receive() per "
                                   f"event, buffer {BIG_BUFFER}"),
        }  # fmt: skip
        shapes = {"trio_1_batch": (1, True), "trio_4_batch": (4, True), "trio_1_each": (1, False)}

        def real_run(key: str, window: float) -> Run:
            if key == "raw":
                return raw_real(config, window)
            subs, batch = shapes[key]
            return trio.run(trio_real, config, window, subs, batch, BIG_BUFFER)

        with tempfile.TemporaryDirectory(prefix="trio-qemu-bench-") as tmp:
            config = pvpanic_config(write_bios(Path(tmp)))
            real_note = interleave_note(repeat, 1)
            runs = interleave(list(real), repeat, lambda key: real_run(key, seconds),
                              warmup_run=lambda key: real_run(key, min(seconds, 0.5)),
                              say=_say)  # fmt: skip
            for key, values in runs.items():
                real[key].runs = values
        print(f"\nB. stop/cont on -machine none, {pairs} pairs, median of {repeat} run(s)")
        real["stopcont_raw"] = Variant("stopcont_raw", "stop/cont: raw blocking socket")
        real["stopcont_trio"] = Variant("stopcont_trio", "stop/cont: trio_qemu open_machine")

        def stopcont(key: str, count: int) -> Run:
            if key == "stopcont_raw":
                return raw_stopcont(count)
            return trio.run(trio_stopcont, count)

        runs = interleave(["stopcont_raw", "stopcont_trio"], repeat,
                          lambda key: stopcont(key, pairs),
                          warmup_run=lambda key: stopcont(key, max(pairs // 10, 10)),
                          say=_say)  # fmt: skip
        for key, values in runs.items():
            real[key].runs = values
        print()
        for variant in real.values():
            print(variant.summary())

    rate = {f"fake.{k}": v.rate for k, v in fake.items()}
    rate.update({f"real.{k}": v.rate for k, v in real.items()})
    ratios = {
        "fake: trio 1 sub / raw line count": paired(fake, "trio_1_batch", "raw_count"),
        "fake: trio 1 sub / raw json.loads": paired(fake, "trio_1_batch", "raw_json"),
        "fake: trio 4 subs / raw json.loads": paired(fake, "trio_4_batch", "raw_json"),
        "fake: trio 4 subs / trio 1 sub": paired(fake, "trio_4_batch", "trio_1_batch"),
        "fake: trio 1 sub keeps all / qemu.qmp asyncio": paired(fake, "trio_1_all", "asyncio"),
        **mem_ratio,
        "memory: trio keeps all, peak 4N / N": growth["trio_all"],
        "memory: qemu.qmp, peak 4N / N": growth["asyncio"],
        "memory: trio bounded, peak 4N / N": growth["trio_bounded"],
    }
    if real:
        ratios.update({
            "real: trio 1 sub / raw": paired(real, "trio_1_batch", "raw"),
            "real: trio 4 subs / raw": paired(real, "trio_4_batch", "raw"),
            "stop/cont: trio / raw": paired(real, "stopcont_trio", "stopcont_raw"),
        })  # fmt: skip
    print("\nratios (events/s: median over rounds of the ratio within a round, higher is "
          "faster; memory: of the median peaks, lower is smaller):")  # fmt: skip
    print_ratios(ratios)
    print(f"\ntarget >= {TARGET_EVENTS:,} events/s with 1 subscriber:")
    if fake["trio_1_batch"].runs:
        print(f"  fake peer (the reader's capacity): {rate['fake.trio_1_batch']:,.0f}")
    if real:
        print(f"  real QEMU (bounded by QEMU's own rate, {rate['real.raw']:,.0f} here): "
              f"{rate['real.trio_1_batch']:,.0f}")  # fmt: skip

    path = write_results(NAME, {
        "params": {"n": n, "repeat": repeat, "mem_n": mem_n, "mem_repeat": mem_repeat,
                   "seconds": seconds, "pairs": pairs, "quick": quick, "parts": sorted(parts),
                   "big_buffer": BIG_BUFFER},
        "method": {"fake_peer": fake_note, "memory": memory_note, "real_qemu": real_note},
        "memory_kinds": MEMORY_KINDS,
        "unit": "events/s",
        "target_events_per_s": TARGET_EVENTS,
        "fake_peer": {k: v.as_json() for k, v in fake.items() if v.runs},
        "memory": memory,
        "real_qemu": {k: v.as_json() for k, v in real.items()},
        "real_qemu_argv": pvpanic_config(Path("BIOS")).argv() if real else None,
        "ratios": ratios,
    })  # fmt: skip
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
