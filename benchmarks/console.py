"""Console drain throughput and ``wait_for`` latency: ``trio_qemu.Console`` against raw reads.

    .venv/bin/python benchmarks/console.py [--quick] [--mib 512] [--repeat 3]

A peer process (``_peers.py console``) holds one end of a socketpair; on a "go" byte it
writes ``--mib`` MiB of printable console text, 64 KiB per ``sendall``, as fast as it can,
ending with a marker, then closes. Every variant reads the same stream to its end. Each run
is timed from sending "go" to end of file; the figure is MB/s (10^6 bytes per second), the
median of ``--repeat`` runs. The variants are interleaved (``_common.interleave``): each
round runs every variant once, the order reversed every other round, after one uncounted
warm-up round (an eighth of the size); a ratio is the median over rounds of the ratio of
two variants in the same round. The raw readers do less than ``Console.run`` (no ring
buffer, no waiters): they are the limits of the same I/O path, not competitors.

- raw blocking ``recv_into``: a plain blocking loop into one buffer (the limit here).
- raw Trio ``receive_some(65536)``: the same I/O path ``Console.run`` uses, bytes counted.
- ``Console.run``: the drain with its 1 MiB ring buffer (every chunk appended, waiters woken);
  then the same with ``log_path`` (every chunk also written and flushed to a file).
- ``wait_for`` latency: ``Console.run`` with a ``wait_for(marker)`` task running from the
  start; the peer prints ``time.monotonic()`` just after the ``sendall`` that carried the
  marker, and the latency is from then to ``wait_for`` returning (it includes reading the
  backlog still in the socket, ~200 KB). Once with a literal ``bytes`` pattern, once with a
  compiled regex (re-searched from the cursor on every chunk), against a raw Trio reader
  that searches each chunk plus an overlap.

Results go to ``benchmarks/results/console.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    interleave,
    interleave_note,
    median,
    paired_ratio,
    peer_process,
    print_ratios,
    quiet_logging,
    write_results,
)

from trio_qemu import Console

NAME = "console"
CHUNK = 65536
MARKER = b"BENCH-END-MARKER-424242"
MARKER_RE = re.compile(rb"BENCH-END-MARKER-(\d+)")
TARGET_MB_S = 100.0


@dataclass
class Run:
    nbytes: int
    seconds: float
    #: seconds from the peer's marker write to the match (None: no pattern wait)
    latency: float | None = None

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else float("nan")


@dataclass
class Variant:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def mb_s(self) -> float:
        return median([r.mb_s for r in self.runs]) if self.runs else float("nan")

    @property
    def latency_ms(self) -> float | None:
        values = [r.latency for r in self.runs if r.latency is not None]
        return median(values) * 1000 if values else None

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mb_per_s": self.mb_s,
            "latency_ms": self.latency_ms,
            "runs": [{"bytes": r.nbytes, "seconds": r.seconds, "mb_per_s": r.mb_s,
                      "latency_ms": None if r.latency is None else r.latency * 1000}
                     for r in self.runs],
        }  # fmt: skip


def _marker_time(proc: subprocess.Popen[bytes]) -> float:
    """The peer's ``time.monotonic()`` just after it sent the marker."""
    assert proc.stdout is not None
    proc.wait(10)
    fields = proc.stdout.read().split()
    return float(fields[1])


# -- readers -------------------------------------------------------------------------------
def raw_blocking(sock: socket.socket) -> tuple[int, float]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    sock.sendall(b"g")
    recv_into = sock.recv_into
    while n := recv_into(view):
        total += n
    elapsed = time.perf_counter() - start
    sock.close()
    return total, elapsed


async def raw_trio(sock: socket.socket, search: bool) -> tuple[int, float, float | None]:
    """``receive_some`` until EOF; with ``search``, find the marker (chunk + overlap)."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    total = 0
    found: float | None = None
    tail = b""
    keep = len(MARKER) - 1
    async with stream:
        start = time.perf_counter()
        await stream.send_all(b"g")
        while chunk := await stream.receive_some(CHUNK):
            total += len(chunk)
            if search and found is None:
                if MARKER in tail + chunk[: keep * 2] or MARKER in chunk:
                    found = time.monotonic()
                tail = bytes(chunk[-keep:])
        elapsed = time.perf_counter() - start
    return total, elapsed, found


async def console_drain(
    sock: socket.socket, log_path: str | None, pattern: bytes | re.Pattern[bytes] | None
) -> tuple[int, float, float | None]:
    """``Console.run`` until EOF, optionally with one ``wait_for(pattern)`` task."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    console = Console(name="bench", log_path=log_path)
    found: list[float] = []

    async def waiter() -> None:
        await console.wait_for(pattern if pattern is not None else MARKER, timeout=600)
        found.append(time.monotonic())

    async with stream:
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run, stream)
            if pattern is not None:
                nursery.start_soon(waiter)
            start = time.perf_counter()
            await stream.send_all(b"g")
        elapsed = time.perf_counter() - start  # run() returned at EOF (and the waiter)
    return console.total_bytes, elapsed, found[0] if found else None


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--mib", type=int, help="MiB per run (default 512)")
    parser.add_argument("--repeat", type=int, help="runs per variant (default 3)")
    options = parser.parse_args(argv)
    mib = options.mib or (32 if options.quick else 512)
    repeat = options.repeat or (1 if options.quick else 3)
    total = mib * 2**20
    quiet_logging()

    variants = [
        Variant("raw_blocking", "raw blocking recv_into (the limit)"),
        Variant("raw_trio", "raw Trio receive_some(65536)"),
        Variant("console", "Console.run, 1 MiB ring buffer"),
        Variant("console_log", "Console.run + log_path (write + flush per chunk)"),
        Variant("raw_search", "raw Trio receive_some + marker search"),
        Variant("wait_literal", "Console.run + wait_for(bytes marker)"),
        Variant("wait_regex", "Console.run + wait_for(compiled regex)"),
    ]
    by_key = {v.key: v for v in variants}
    note = interleave_note(repeat, 1)
    print(f"console drain: {mib} MiB per run from a socketpair peer, median of {repeat} "
          f"run(s); every variant reads the same stream; {note}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="trio-qemu-bench-") as tmp:
        log_path = os.path.join(tmp, "console.log")
        runners: dict[str, Callable[[socket.socket], tuple[int, float, float | None]]] = {
            "raw_blocking": lambda s: (*raw_blocking(s), None),
            "raw_trio": lambda s: trio.run(raw_trio, s, False),
            "console": lambda s: trio.run(console_drain, s, None, None),
            "console_log": lambda s: trio.run(console_drain, s, log_path, None),
            "raw_search": lambda s: trio.run(raw_trio, s, True),
            "wait_literal": lambda s: trio.run(console_drain, s, None, MARKER),
            "wait_regex": lambda s: trio.run(console_drain, s, None, MARKER_RE),
        }

        def one(key: str, size: int) -> Run:
            with peer_process("console", size, CHUNK, MARKER.hex()) as (proc, sock):
                nbytes, seconds, found = runners[key](sock)
                sent = _marker_time(proc)
            if nbytes != size:
                raise RuntimeError(f"{key}: read {nbytes} of {size} bytes")
            latency = None if found is None else found - sent
            if key in ("raw_search", "wait_literal", "wait_regex") and latency is None:
                raise RuntimeError(f"{key}: the marker was not found")
            if os.path.exists(log_path):
                if key == "console_log" and os.path.getsize(log_path) != size:
                    raise RuntimeError("console_log: the log file is incomplete")
                os.unlink(log_path)
            return Run(nbytes, seconds, latency)

        # the warm-up round reads an eighth of the size: enough to warm caches and imports
        runs = interleave(list(runners), repeat, lambda key: one(key, total),
                          warmup_run=lambda key: one(key, max(total // 8, 2**20)),
                          say=lambda line: print(line, flush=True))  # fmt: skip
        for key, values in runs.items():
            by_key[key].runs = values

    print()
    for v in variants:
        shown = f"   marker latency {v.latency_ms:8.2f} ms" if v.latency_ms is not None else ""
        print(f"  {v.label:<50} {v.mb_s:9,.0f} MB/s{shown}")
    mb = {v.key: v.mb_s for v in variants}

    def rate(a: str, b: str) -> float:
        return paired_ratio([r.mb_s for r in by_key[a].runs], [r.mb_s for r in by_key[b].runs])

    def latency(a: str, b: str) -> float:
        return paired_ratio([r.latency or 0.0 for r in by_key[a].runs],
                            [r.latency or 0.0 for r in by_key[b].runs])  # fmt: skip

    ratios = {
        "Console.run / raw Trio": rate("console", "raw_trio"),
        "Console.run / raw blocking": rate("console", "raw_blocking"),
        "Console.run + log / raw Trio": rate("console_log", "raw_trio"),
        "wait_for(bytes) latency / raw search": latency("wait_literal", "raw_search"),
        "wait_for(regex) latency / raw search": latency("wait_regex", "raw_search"),
    }
    print("\nratios, median over rounds of the ratio within a round (throughput: higher is "
          "faster; latency: lower is faster):")  # fmt: skip
    print_ratios(ratios)
    print(f"\ntarget >= {TARGET_MB_S:.0f} MB/s (Console.run): measured {mb['console']:,.0f}")
    path = write_results(NAME, {
        "params": {"mib": mib, "repeat": repeat, "chunk": CHUNK, "quick": options.quick},
        "method": note,
        "unit": "MB/s (10^6 bytes/s)",
        "target_mb_per_s": TARGET_MB_S,
        "results": {v.key: v.as_json() for v in variants},
        "ratios": ratios,
    })  # fmt: skip
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
