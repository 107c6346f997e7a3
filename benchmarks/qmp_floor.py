"""Where a QMP round trip goes: trio_qemu against the floors of a Trio client.

    .venv/bin/python benchmarks/qmp_floor.py [--n 2000] [--repeat 5]

Every variant sends ``--n`` sequential ``{"execute":"query-status","id":N}`` requests to a
``-machine none`` QEMU of its own with one monitor, after 200 untimed ones. Each step from
one variant to the next adds one thing, so the ratios between neighbours say what that
thing costs:

- raw: a blocking socket, one ``sendall`` and one ``readline`` per call (the limit).
- trio, one task: a Trio task writes the request, then reads until a newline, waiting with
  ``trio.lowlevel.wait_readable`` when nothing is there: what Trio's scheduler and epoll
  cost over a blocking read, with no second task.
- trio, reader task: the same bytes, but a second task reads and splits lines and wakes
  the caller through a ``trio.Event``: the cost of handing a reply from one task to
  another (what any client that also receives events needs).
- QMPClient: trio_qemu's client (``open_qmp``, ``await client.cmd("query-status")``):
  JSON encoding and decoding, ids, timeouts, the event fan-out on top of the hand-off.
- Machine: ``open_machine`` and ``await vm.cmd("query-status")``, as users write it.

The variants are interleaved (``_common.interleave``); figures are medians over rounds, a
ratio is the median of the ratios within a round. Results go to
``benchmarks/results/qmp_floor.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import trio

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
    start_qemu,
    write_results,
)

import trio_qemu
from trio_qemu import open_qmp

NAME = "qmp_floor"
WARMUP = 200
CAPABILITIES = b'{"execute":"qmp_capabilities"}'


def _requests(n: int) -> list[bytes]:
    return [b'{"execute":"query-status","id":%d}' % i for i in range(n)]


def _handshake(sock: socket.socket) -> None:
    """Greeting and negotiation over a blocking socket (not timed)."""
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(CAPABILITIES)
    reader.readline()
    reader.close()


def bench_raw(n: int) -> float:
    qemu = start_qemu(monitors=1)
    try:
        with qemu.take_monitor() as sock, sock.makefile("rb") as reader:
            reader.readline()
            sock.sendall(CAPABILITIES)
            reader.readline()
            for request in _requests(WARMUP):
                sock.sendall(request)
                reader.readline()
            requests = _requests(n)
            start = time.perf_counter()
            for request in requests:
                sock.sendall(request)
                reader.readline()
            return n / (time.perf_counter() - start)
    finally:
        qemu.kill()


async def _one_task(fd: int, requests: list[bytes]) -> None:
    buffer = b""
    for request in requests:
        os.write(fd, request)
        while b"\n" not in buffer:
            try:
                buffer += os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
        buffer = buffer.split(b"\n", 1)[1]


async def _reader_task(fd: int, requests: list[bytes]) -> None:
    waiter: list[trio.Event] = []

    async def reader() -> None:
        buffer = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            buffer += data
            while b"\n" in buffer:
                _line, buffer = buffer.split(b"\n", 1)
                waiter.pop().set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for request in requests:
            done = trio.Event()
            waiter.append(done)
            os.write(fd, request)
            await done.wait()
        nursery.cancel_scope.cancel()


def bench_trio_floor(n: int, with_reader: bool) -> float:
    qemu = start_qemu(monitors=1)
    try:
        with qemu.take_monitor() as sock:
            _handshake(sock)
            sock.setblocking(False)
            run = _reader_task if with_reader else _one_task
            trio.run(run, sock.fileno(), _requests(WARMUP))
            start = time.perf_counter()
            trio.run(run, sock.fileno(), _requests(n))
            return n / (time.perf_counter() - start)
    finally:
        qemu.kill()


async def _client(sock: socket.socket, n: int) -> float:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with open_qmp(stream) as client:
        for _ in range(WARMUP):
            await client.cmd("query-status")
        start = time.perf_counter()
        for _ in range(n):
            await client.cmd("query-status")
        return n / (time.perf_counter() - start)


def bench_client(n: int) -> float:
    qemu = start_qemu(monitors=1)
    try:
        return trio.run(_client, qemu.take_monitor(), n)
    finally:
        qemu.kill()


async def _machine(n: int) -> float:
    config = trio_qemu.MachineConfig(args=BASE_ARGS, accel=None)  # BASE_ARGS has -accel
    async with trio_qemu.open_machine(config) as vm:
        for _ in range(WARMUP):
            await vm.cmd("query-status")
        start = time.perf_counter()
        for _ in range(n):
            await vm.cmd("query-status")
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="uncounted rounds first")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1 or args.warmup_rounds < 0:
        parser.error("--n and --repeat must be positive")
    quiet_logging()
    n: int = args.n
    labels = {
        "raw": "raw blocking socket (the limit)",
        "one_task": "trio, one task (write, wait_readable, read)",
        "reader_task": "trio, reader task + Event hand-off",
        "client": "trio_qemu QMPClient (open_qmp)",
        "machine": "trio_qemu Machine (vm.cmd)",
    }
    runners = {
        "raw": lambda: bench_raw(n),
        "one_task": lambda: bench_trio_floor(n, False),
        "reader_task": lambda: bench_trio_floor(n, True),
        "client": lambda: bench_client(n),
        "machine": lambda: trio.run(_machine, n),
    }
    print(f"QMP query-status round trips: N={n} per run, each variant on a QEMU of its own; "
          f"{interleave_note(args.repeat, args.warmup_rounds)}")  # fmt: skip
    runs = interleave(
        list(runners),
        args.repeat,
        lambda key: runners[key](),
        warmup=args.warmup_rounds,
        say=lambda line: print(line, flush=True),
    )
    print("\nops/s (median of runs):")
    print_table([(labels[k], median(runs[k]), runs[k]) for k in runners])
    steps = {
        "one task/raw": paired_ratio(runs["one_task"], runs["raw"]),
        "reader task/one task": paired_ratio(runs["reader_task"], runs["one_task"]),
        "client/reader task": paired_ratio(runs["client"], runs["reader_task"]),
        "machine/client": paired_ratio(runs["machine"], runs["client"]),
        "reader task/raw": paired_ratio(runs["reader_task"], runs["raw"]),
        "client/raw": paired_ratio(runs["client"], runs["raw"]),
        "machine/raw": paired_ratio(runs["machine"], runs["raw"]),
    }
    print("\nratios (median over rounds of the ratio within a round; higher is faster):")
    print_ratios(steps)
    path = write_results(
        NAME,
        {
            "params": {"n": n, "repeat": args.repeat, "warmup_rounds": args.warmup_rounds},
            "method": "each variant on a -machine none QEMU of its own with one monitor; "
            + interleave_note(args.repeat, args.warmup_rounds),
            "results": {
                k: {"label": labels[k], "median": median(runs[k]), "runs": runs[k]}
                for k in runners
            },
            "ratios": steps,
        },
    )
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
