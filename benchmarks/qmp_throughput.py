"""QMP round trips per second: trio_qemu against qemu.qmp and a raw socket.

    .venv/bin/python benchmarks/qmp_throughput.py [--n 2000] [--repeat 5] [--warmup 200]
        [--warmup-rounds 1]

One ``qemu-system-x86_64 -machine none`` process serves every client. Every run does the
same work: a fresh client on a QMP monitor of its own (a socketpair; a monitor has one
peer, and qemu.qmp's clients take over their socket), the handshake, ``--warmup`` untimed
calls, then ``--n`` timed ``query-status`` calls. The variants are interleaved
(``_common.interleave``): ``--repeat`` rounds, each running every variant once, the order
reversed every other round, after ``--warmup-rounds`` uncounted rounds. The printed
figure is the median over rounds; a ratio is the median over rounds of the ratio of two
variants in the same round.

- trio_qemu: ``open_qmp`` over the socketpair, ``await client.cmd("query-status")``
  one after another; and (a separate variant) N at once, one task each, in a nursery.
- trio_qemu Machine: what users write, ``async with open_machine(config) as vm`` and
  ``await vm.cmd("query-status")`` one after another. The machine launches its own
  ``-machine none`` QEMU (same arguments) each run; its monitor socket is not shared.
  QEMU's main loop polls every monitor, so a QEMU with one monitor answers faster than the
  shared one: the Machine's baseline is "raw, own QEMU", the raw client on a fresh
  ``-machine none`` QEMU with one monitor, started the same way each run.
- qemu.qmp's asyncio ``QMPClient`` (``connect(sock)``, ``execute``) and its sync
  ``legacy.QEMUMonitorProtocol`` (what ``QEMUMachine`` uses; ``cmd``). Their
  ``_cb_outbound``/``_cb_inbound`` hooks pretty-print every message as JSON for a debug log
  call even when debug is off; the main rows use a subclass that formats only when debug is
  on (as trio_qemu does), the "stock" rows use the class as shipped.
- raw: a blocking socket, pre-encoded ``{"execute":"query-status","id":N}``, one line read
  per call and not decoded: the limit for one connection, one call at a time.
- raw pipelined: the same requests all written at once (as fast as the socket takes them)
  while counting reply lines: the limit with N calls in flight, the baseline of trio_qemu's
  N concurrent tasks.

All loggers stay at WARNING. Nothing here asserts a speed; results go to
``benchmarks/results/qmp_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import selectors
import socket
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio
from qemu.qmp import Message, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BASE_ARGS,
    interleave,
    interleave_note,
    median,
    paired_ratio,
    print_ratios,
    print_table,
    quiet_logging,
    running_qemu,
    start_qemu,
    write_results,
)

import trio_qemu
from trio_qemu import open_qmp

NAME = "qmp_throughput"
COMMAND = "query-status"


@dataclass
class Result:
    label: str
    request: bytes  # one request as sent on the wire (for reference)
    runs: list[float] = field(default_factory=list)  # ops/s of each run

    @property
    def median(self) -> float:
        return median(self.runs)


def _rate(n: int, start: float) -> float:
    return n / (time.perf_counter() - start)


def _check_status(value: object, who: str) -> None:
    if not isinstance(value, dict) or "status" not in value:
        raise RuntimeError(f"{who}: unexpected {COMMAND} result {value!r}")


# -- trio_qemu -----------------------------------------------------------------------------
async def bench_trio(sock: socket.socket, n: int, warmup: int, concurrent: bool) -> float:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with open_qmp(stream) as client:
        _check_status(await client.cmd(COMMAND), "trio_qemu")
        for _ in range(warmup):
            await client.cmd(COMMAND)
        start = time.perf_counter()
        if concurrent:
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(client.cmd, COMMAND)
        else:
            for _ in range(n):
                await client.cmd(COMMAND)
        return _rate(n, start)


async def bench_machine(sock: socket.socket, n: int, warmup: int) -> float:
    sock.close()  # the machine runs a QEMU and a monitor of its own
    config = trio_qemu.MachineConfig(args=BASE_ARGS, accel=None)  # BASE_ARGS has -accel
    async with trio_qemu.open_machine(config) as vm:
        _check_status(await vm.cmd(COMMAND), "trio_qemu Machine")
        for _ in range(warmup):
            await vm.cmd(COMMAND)
        start = time.perf_counter()
        for _ in range(n):
            await vm.cmd(COMMAND)
        return _rate(n, start)


# -- qemu.qmp ------------------------------------------------------------------------------
class QuietQMPClient(QMPClient):
    """qemu.qmp's client without the eager ``json.dumps(indent=2)`` of every message that
    its logging hooks do for a debug call that is then discarded."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


async def bench_asyncio(sock: socket.socket, n: int, warmup: int, quiet: bool) -> float:
    qmp = QuietQMPClient("bench") if quiet else QMPClient("bench")
    await qmp.connect(sock)  # 0.0.6 takes an already-connected socket here
    try:
        _check_status(await qmp.execute(COMMAND), "qemu.qmp asyncio")
        for _ in range(warmup):
            await qmp.execute(COMMAND)
        start = time.perf_counter()
        for _ in range(n):
            await qmp.execute(COMMAND)
        return _rate(n, start)
    finally:
        await qmp.disconnect()


def bench_legacy(sock: socket.socket, n: int, warmup: int, quiet: bool) -> float:
    loop = asyncio.new_event_loop()  # the one the sync shim picks up (and we close)
    asyncio.set_event_loop(loop)
    try:
        qmp = QEMUMonitorProtocol(sock)  # 0.0.6 accepts a connected socket as the address
        if quiet:
            qmp._qmp = QuietQMPClient()  # still idle: swap in the quiet client
        qmp.connect()
        try:
            _check_status(qmp.cmd(COMMAND), "qemu.qmp legacy")
            for _ in range(warmup):
                qmp.cmd(COMMAND)
            start = time.perf_counter()
            for _ in range(n):
                qmp.cmd(COMMAND)
            return _rate(n, start)
        finally:
            qmp.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# -- raw socket ----------------------------------------------------------------------------
def _raw_handshake(sock: socket.socket, reader: BinaryIO) -> None:
    greeting = json.loads(reader.readline())
    enable = ["oob"] if "oob" in greeting["QMP"]["capabilities"] else []
    sock.sendall(
        json.dumps(
            {"execute": "qmp_capabilities", "arguments": {"enable": enable}},
            separators=(",", ":"),
        ).encode()
    )
    if json.loads(reader.readline()) != {"return": {}}:
        raise RuntimeError("raw: qmp_capabilities failed")


def bench_raw_own(sock: socket.socket, n: int, warmup: int) -> float:
    """``bench_raw`` on a QEMU of its own with one monitor (the Machine's baseline)."""
    sock.close()
    qemu = start_qemu(monitors=1)
    try:
        return bench_raw(qemu.take_monitor(), n, warmup)
    finally:
        qemu.kill()


def _requests(n: int) -> list[bytes]:
    return [b'{"execute":"%s","id":%d}' % (COMMAND.encode(), i) for i in range(n)]


def bench_raw(sock: socket.socket, n: int, warmup: int) -> float:
    """One request, one reply line (not decoded), one after another."""
    with sock, sock.makefile("rb") as reader:
        _raw_handshake(sock, reader)
        requests = _requests(n)
        send, readline = sock.sendall, reader.readline
        for request in requests[:warmup]:
            send(request)
            readline()
        start = time.perf_counter()
        for request in requests:
            send(request)
            line = readline()
            if not line:
                raise RuntimeError("raw: EOF from QEMU")
        rate = _rate(n, start)
        last = json.loads(line)
        if last.get("id") != n - 1 or "status" not in last.get("return", {}):
            raise RuntimeError(f"raw: out of step, last reply {last!r}")
        return rate


def bench_raw_pipelined(sock: socket.socket, n: int, warmup: int) -> float:
    """Every request written at once (as fast as the socket takes them) while reading the
    reply lines (counted, not decoded): ``n`` calls in flight, the limit for one connection."""
    with sock:
        with sock.makefile("rb") as reader:
            _raw_handshake(sock, reader)
            for request in _requests(warmup):
                sock.sendall(request)
                reader.readline()
        payload = memoryview(b"".join(_requests(n)))
        sock.setblocking(False)
        sent = lines = 0
        tail = b""
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            start = time.perf_counter()
            while lines < n:
                for _, mask in sel.select():
                    if mask & selectors.EVENT_WRITE:
                        with suppress(BlockingIOError):
                            sent += sock.send(payload[sent : sent + 65536])
                        if sent == len(payload):
                            sel.modify(sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(1 << 20)
                        except BlockingIOError:
                            continue
                        if not data:
                            raise RuntimeError("raw pipelined: EOF from QEMU")
                        lines += data.count(b"\n")
                        tail = (tail + data)[-200:]
            rate = _rate(n, start)
        last = json.loads(tail.rstrip().rpartition(b"\n")[2])
        if last.get("id") != n - 1 or "status" not in last.get("return", {}):
            raise RuntimeError(f"raw pipelined: out of step, last reply {last!r}")
        return rate


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per run (default min(200, n))"
    )
    parser.add_argument(
        "--warmup-rounds", type=int, default=1, help="uncounted rounds first (default 1)"
    )
    args = parser.parse_args(argv)
    n: int = args.n
    repeat: int = args.repeat
    warmup: int = min(200, n) if args.warmup is None else args.warmup
    warmup_rounds: int = args.warmup_rounds
    if n < 1 or repeat < 1 or warmup < 0 or warmup_rounds < 0:
        parser.error("--n and --repeat must be positive, the warm-ups not negative")
    quiet_logging()

    raw_req = b'{"execute":"%s","id":1000}' % COMMAND.encode()
    trio_req = bytes(Message({"execute": COMMAND, "id": 1000}))
    qmp_req = bytes(Message({"execute": COMMAND, "id": "__qmp#01000"}))
    res: dict[str, Result] = {
        "raw": Result("raw blocking socket, sequential (the limit)", raw_req),
        "raw_pipelined": Result("raw socket, all N in flight (the limit)", raw_req),
        "trio": Result("trio_qemu, sequential", trio_req),
        "trio_concurrent": Result("trio_qemu, N concurrent tasks", trio_req),
        "raw_own": Result("raw blocking socket, own QEMU (one monitor)", raw_req),
        "machine": Result("trio_qemu Machine: vm.cmd, own QEMU", trio_req),
        "asyncio": Result("qemu.qmp asyncio QMPClient", qmp_req),
        "asyncio_stock": Result("qemu.qmp asyncio QMPClient (stock hooks)", qmp_req),
        "legacy": Result("qemu.qmp legacy QEMUMonitorProtocol", qmp_req),
        "legacy_stock": Result("qemu.qmp legacy QEMUMonitorProtocol (stock hooks)", qmp_req),
    }
    runners: dict[str, Callable[[socket.socket], float]] = {
        "raw": lambda s: bench_raw(s, n, warmup),
        "raw_pipelined": lambda s: bench_raw_pipelined(s, n, warmup),
        "trio": lambda s: trio.run(bench_trio, s, n, warmup, False),
        "trio_concurrent": lambda s: trio.run(bench_trio, s, n, warmup, True),
        "raw_own": lambda s: bench_raw_own(s, n, warmup),
        "machine": lambda s: trio.run(bench_machine, s, n, warmup),
        "asyncio": lambda s: asyncio.run(bench_asyncio(s, n, warmup, True)),
        "asyncio_stock": lambda s: asyncio.run(bench_asyncio(s, n, warmup, False)),
        "legacy": lambda s: bench_legacy(s, n, warmup, True),
        "legacy_stock": lambda s: bench_legacy(s, n, warmup, False),
    }
    note = interleave_note(repeat, warmup_rounds)
    monitors = len(runners) * (repeat + warmup_rounds)
    with running_qemu(monitors=monitors) as qemu:
        setup = (
            f"one QEMU (pid {qemu.pid}) shared by all clients; every run is a fresh client on "
            f"a monitor of its own ({monitors} socketpair monitors): handshake, {warmup} "
            f"untimed calls, then {n} timed {COMMAND} calls; {note}"
        )
        print(f"QMP {COMMAND} throughput: N={n} calls per run, every variant the same "
              f"calls on the same QEMU")  # fmt: skip
        print(f"setup: {setup}")
        print(f"qemu: {' '.join(qemu.argv[: 1 + len(BASE_ARGS)])} + -chardev/-mon per run")
        runs = interleave(
            list(runners),
            repeat,
            lambda key: runners[key](qemu.take_monitor()),
            warmup=warmup_rounds,
            say=lambda line: print(line, flush=True),
        )
    for key, values in runs.items():
        res[key].runs = values

    order = [
        "raw", "raw_pipelined", "trio", "trio_concurrent", "raw_own", "machine", "asyncio",
        "legacy", "asyncio_stock", "legacy_stock",
    ]  # fmt: skip
    print("\nops/s (median of runs):")
    print_table([(res[k].label, res[k].median, res[k].runs) for k in order])
    print("\nrequest bytes on the wire (at id 1000):")
    for k in ("raw", "trio", "asyncio"):
        users = {"raw": "raw", "trio": "trio_qemu", "asyncio": "qemu.qmp (both)"}[k]
        print(f"  {users:<16} {len(res[k].request):3d}  {res[k].request.decode()}")

    def paired(a: str, b: str) -> float:
        return paired_ratio(res[a].runs, res[b].runs)

    ratios = {
        "trio/raw": paired("trio", "raw"),
        "machine/raw own": paired("machine", "raw_own"),
        "trio/legacy": paired("trio", "legacy"),
        "trio/asyncio": paired("trio", "asyncio"),
        "concurrent/raw pipelined": paired("trio_concurrent", "raw_pipelined"),
        "trio/legacy (stock hooks)": paired("trio", "legacy_stock"),
        "trio/asyncio (stock hooks)": paired("trio", "asyncio_stock"),
        "concurrent/trio": paired("trio_concurrent", "trio"),
        "concurrent/raw sequential": paired("trio_concurrent", "raw"),
    }
    print("\nratios (median over rounds of the ratio within a round; higher is faster):")
    print_ratios(ratios)

    path = write_results(
        NAME,
        {
            "params": {
                "n": n,
                "repeat": repeat,
                "warmup": warmup,
                "warmup_rounds": warmup_rounds,
                "command": COMMAND,
            },
            "setup": setup,
            "method": note,
            "qemu_argv": qemu.argv,
            "unit": "ops/s",
            "results": {
                k: {
                    "label": r.label,
                    "median": r.median,
                    "runs": r.runs,
                    "request_bytes": len(r.request),
                }
                for k, r in res.items()
            },
            "ratios": ratios,
        },
    )
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
