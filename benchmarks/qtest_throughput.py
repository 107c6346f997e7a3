"""qtest round trips per second: trio_qemu against a bare synchronous socket client.

    .venv/bin/python benchmarks/qtest_throughput.py [--n 5000] [--repeat 5] [--warmup 500]
        [--warmup-rounds 1] [--callers 8] [--request readb|inb]

Every run starts a QEMU of its own (a qtest channel has exactly one peer) with the command
line :func:`~trio_qemu.qtest.open_qtest_machine` builds by default: q35, TCG here, ``-S``,
``-nodefaults``, a QMP monitor and the qtest chardev (named ``qtest``, ``-qtest-log none``),
each on an inherited socketpair. The raw variants build that command line from the same
``MachineConfig`` and :func:`~trio_qemu.qtest.qtest_args` and start it with ``Popen``; the
trio runs' ``machine.argv`` is compared with it (fd numbers aside) and the run stops if
they differ. Every run then makes ``--warmup`` untimed requests and ``--n`` timed ones; only
the timed loop is measured (QEMU's start, the QMP handshake and the teardown are not). The
request is ``readb 0x100000`` (a byte of RAM; ``--request inb``: ``inb 0x70``, the CMOS
index port), the same line for every variant.

- trio_qemu, sequential: ``open_qtest_machine()``, then ``await qt.readb(0x100000)`` (or
  ``await qt.inb(0x70)``) one after another: the argument checks, the line built and
  encoded, the channel's send, the reply read (by the request itself when it is already
  there, else by the reader task, which hands it over), the reply parsed into an int.
- trio_qemu, concurrent: the same, with ``--callers`` tasks (8 by default) each making
  ``n / callers`` of the calls at once: requests pipeline on the one channel.
- raw: a blocking socket (our end of the qtest socketpair), the pre-encoded line written with
  ``sendall`` and one reply line read (``makefile("rb").readline()``, not decoded) per
  request, one after another: the limit for one caller, what the 0.9x target is measured
  against. QEMU's QMP monitor is there (the same command line) but never read.
- raw pipelined: the same lines all written at once (as fast as the socket takes them) while
  counting reply lines: the limit with every request in flight, the baseline of the
  concurrent variant.

The variants are interleaved (``_common.interleave``): ``--repeat`` rounds, each running
every variant once, the order reversed every other round, after ``--warmup-rounds``
uncounted rounds. The printed figure is the median over rounds; a ratio is the median over
rounds of the ratio of two variants in the same round. All loggers stay at WARNING.
Nothing here asserts a speed; results go to ``benchmarks/results/qtest_throughput.json``.

On a small machine the figures move with its load, the ratios much less: with a core idle,
QEMU runs there and every round trip pays two cross-core wake-ups (the raw client measured
~10,000/s on the 2-core reference machine); with both busy, the kernel runs QEMU on our core
as soon as we write, and the reply is there when we look (raw ~30,000/s).
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    _die_with_parent,
    interleave,
    interleave_note,
    median,
    paired_ratio,
    print_ratios,
    print_table,
    quiet_logging,
    write_results,
)

from trio_qemu import MachineConfig, resolve_accel
from trio_qemu._config import ChannelFds
from trio_qemu.qtest import DEFAULT_MACHINE, open_qtest_machine, qtest_args

NAME = "qtest_throughput"
RAM = 0x100000
CMOS_INDEX = 0x70
#: the request line of each ``--request`` choice, and the reply the first one must get
REQUESTS = {
    "readb": (f"readb {RAM:#x}", re.compile(rb"OK 0x[0-9a-f]{16}")),
    "inb": (f"inb {CMOS_INDEX:#x}", re.compile(rb"OK 0x[0-9a-f]{4}")),
}


@dataclass
class Result:
    label: str
    runs: list[float] = field(default_factory=list)  # ops/s of each run

    @property
    def median(self) -> float:
        return median(self.runs)


def _rate(n: int, start: float) -> float:
    return n / (time.perf_counter() - start)


def _same_argv(argv: list[str]) -> list[str]:
    """``argv`` without the binary and with fd numbers blanked, for comparison."""
    return [re.sub(r"fd=\d+", "fd=N", arg) for arg in argv[1:]]


# -- the raw client ------------------------------------------------------------------------
def raw_argv(qtest_fd: int, monitor_fd: int) -> list[str]:
    """The command line ``open_qtest_machine()`` builds by default, on these fds."""
    config = MachineConfig(machine=DEFAULT_MACHINE)
    config = config.replace(
        args=[*qtest_args(qtest_fd, config.args), *config.args],
        inherit_fds=[*config.inherit_fds, qtest_fd],
    )
    return config.argv(ChannelFds(monitor=monitor_fd), accel=resolve_accel(config.accel))


@contextmanager
def raw_qemu() -> Iterator[tuple[socket.socket, list[str]]]:
    """QEMU on :func:`raw_argv`; yields our end of the qtest socketpair (blocking) and the
    argv. QEMU is SIGKILLed by pid on the way out; our sockets are closed."""
    qtest, qtest_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monitor, monitor_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as QEMU
    try:
        argv = raw_argv(qtest_child.fileno(), monitor_child.fileno())
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=[qtest_child.fileno(), monitor_child.fileno()],
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            qtest_child.close()
            monitor_child.close()
        try:
            yield qtest, argv
        except BaseException:
            if proc.poll() is not None:
                stderr.seek(0)
                text = stderr.read().decode("utf-8", "replace")
                print(f"QEMU (pid {proc.pid}) exited with {proc.returncode}:\n{text}")
            raise
        finally:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        qtest.close()
        monitor.close()
        stderr.close()


def _check_reply(reply: bytes, expected: re.Pattern[bytes], who: str) -> None:
    if expected.fullmatch(reply.rstrip(b"\n")) is None:
        raise RuntimeError(f"{who}: unexpected reply {reply!r}")


def bench_raw(n: int, warmup: int, request: str, argvs: dict[str, list[str]]) -> float:
    """One line out, one reply line in (not decoded), one after another."""
    line, expected = REQUESTS[request]
    data = (line + "\n").encode("ascii")
    with raw_qemu() as (sock, argv), sock.makefile("rb") as reader:
        argvs.setdefault("raw", argv)
        send, readline = sock.sendall, reader.readline
        send(data)
        _check_reply(readline(), expected, "raw")
        for _ in range(warmup):
            send(data)
            readline()
        start = time.perf_counter()
        for _ in range(n):
            send(data)
            reply = readline()
            if not reply:
                raise RuntimeError("raw: EOF from QEMU")
        rate = _rate(n, start)
        _check_reply(reply, expected, "raw")
        return rate


def bench_raw_pipelined(n: int, warmup: int, request: str) -> float:
    """Every line written at once (as fast as the socket takes them) while reading the
    reply lines (counted, not decoded): ``n`` requests in flight."""
    line, expected = REQUESTS[request]
    data = (line + "\n").encode("ascii")
    with raw_qemu() as (sock, _):
        with sock.makefile("rb") as reader:
            for _ in range(warmup + 1):
                sock.sendall(data)
                _check_reply(reader.readline(), expected, "raw pipelined")
        payload = memoryview(data * n)
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
                            chunk = sock.recv(1 << 20)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            raise RuntimeError("raw pipelined: EOF from QEMU")
                        lines += chunk.count(b"\n")
                        tail = (tail + chunk)[-100:]
            rate = _rate(n, start)
        _check_reply(tail.rstrip(b"\n").rpartition(b"\n")[2], expected, "raw pipelined")
        return rate


# -- trio_qemu -----------------------------------------------------------------------------
async def bench_trio(
    n: int, warmup: int, request: str, callers: int, argvs: dict[str, list[str]]
) -> float:
    """``callers == 1``: sequential; else ``callers`` tasks making ``n / callers`` each."""
    async with open_qtest_machine() as qt:
        argvs.setdefault("trio", qt.machine.argv)
        call, arg = (qt.readb, RAM) if request == "readb" else (qt.inb, CMOS_INDEX)
        first = await call(arg)
        if not isinstance(first, int):
            raise RuntimeError(f"trio_qemu: unexpected result {first!r}")
        for _ in range(warmup):
            await call(arg)

        async def worker(count: int) -> None:
            for _ in range(count):
                await call(arg)

        start = time.perf_counter()
        if callers == 1:
            for _ in range(n):
                await call(arg)
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(worker, n // callers)
        return _rate(n // callers * callers, start)


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=5000, help="requests per run (default 5000)")
    parser.add_argument("--repeat", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed requests per run (default min(500, n))"
    )
    parser.add_argument(
        "--warmup-rounds", type=int, default=1, help="uncounted rounds first (default 1)"
    )
    parser.add_argument(
        "--callers", type=int, default=8, help="tasks of the concurrent variant (default 8)"
    )
    parser.add_argument(
        "--request", choices=sorted(REQUESTS), default="readb", help="the request (readb)"
    )
    args = parser.parse_args(argv)
    n: int = args.n
    repeat: int = args.repeat
    warmup: int = min(500, n) if args.warmup is None else args.warmup
    warmup_rounds: int = args.warmup_rounds
    callers: int = args.callers
    request: str = args.request
    if n < callers or repeat < 1 or warmup < 0 or warmup_rounds < 0 or callers < 2:
        parser.error("need --n >= --callers >= 2, --repeat >= 1 and warm-ups not negative")
    quiet_logging()

    line = REQUESTS[request][0]
    res: dict[str, Result] = {
        "raw": Result("raw blocking socket, sequential (the limit)"),
        "raw_pipelined": Result("raw socket, all N in flight (the limit)"),
        "trio": Result("trio_qemu, sequential"),
        "trio_concurrent": Result(f"trio_qemu, {callers} concurrent callers"),
    }
    argvs: dict[str, list[str]] = {}
    runners: dict[str, Callable[[], float]] = {
        "raw": lambda: bench_raw(n, warmup, request, argvs),
        "raw_pipelined": lambda: bench_raw_pipelined(n, warmup, request),
        "trio": lambda: trio.run(bench_trio, n, warmup, request, 1, argvs),
        "trio_concurrent": lambda: trio.run(bench_trio, n, warmup, request, callers, argvs),
    }

    def run(key: str) -> float:
        rate = runners[key]()
        both = [argvs.get("raw"), argvs.get("trio")]
        if None not in both and _same_argv(both[0] or []) != _same_argv(both[1] or []):
            raise SystemExit(
                f"the raw command line differs from open_qtest_machine's:\n"
                f"  raw:  {both[0]}\n  trio: {both[1]}"
            )
        return rate

    note = interleave_note(repeat, warmup_rounds)
    setup = (
        f"every run starts its own QEMU (open_qtest_machine's default command line: "
        f"{DEFAULT_MACHINE}, -S, -nodefaults, QMP and qtest on socketpairs), makes "
        f"{warmup} untimed requests, then {n} timed {line!r} requests; {note}"
    )
    print(f"qtest {line!r} throughput: N={n} requests per run, every variant the same "
          f"requests on the same command line")  # fmt: skip
    print(f"setup: {setup}")
    runs = interleave(
        list(runners),
        repeat,
        run,
        warmup=warmup_rounds,
        say=lambda text: print(text, flush=True),
    )
    for key, values in runs.items():
        res[key].runs = values
    print(f"qemu: {' '.join(argvs['raw'])}")

    print("\nops/s (median of runs):")
    print_table([(r.label, r.median, r.runs) for r in res.values()])

    def paired(a: str, b: str) -> float:
        return paired_ratio(res[a].runs, res[b].runs)

    ratios = {
        "trio/raw": paired("trio", "raw"),
        "concurrent/raw pipelined": paired("trio_concurrent", "raw_pipelined"),
        "concurrent/raw sequential": paired("trio_concurrent", "raw"),
        "concurrent/trio": paired("trio_concurrent", "trio"),
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
                "callers": callers,
                "request": line,
            },
            "setup": setup,
            "method": note,
            "qemu_argv": argvs["raw"],
            "target_ratio": 0.9,
            "unit": "ops/s",
            "results": {
                k: {"label": r.label, "median": r.median, "runs": r.runs} for k, r in res.items()
            },
            "ratios": ratios,
        },
    )
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
