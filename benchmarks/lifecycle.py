"""Launch-to-ready and teardown: trio_qemu against the raw path and the seed's way.

    .venv/bin/python benchmarks/lifecycle.py [--n 30] [--warmup 2]

Every variant does the same work: start the same ``qemu-system-x86_64 -machine none
-nodefaults -display none -vga none -accel tcg`` with a QMP monitor on a socketpair, wait
until QMP is negotiated ("launch"), then ``quit`` it and reap it ("teardown"), one machine
at a time. The variants are interleaved (``_common.interleave``): ``--n`` rounds, each
running every variant once, the order reversed every other round, after ``--warmup``
uncounted rounds (page cache, imports). The printed figures are medians in milliseconds;
the ratios are the median over rounds of the ratio within a round.

- raw: ``subprocess.Popen``, read the greeting, send ``qmp_capabilities``, read its reply
  (ready); teardown: send ``quit``, ``wait()`` (the limit).
- seed's way: ``subprocess.Popen`` + ``qemu.qmp.legacy.QEMUMonitorProtocol`` on the
  socket, ``connect(negotiate=True)`` (what ``QEMUMachine.launch`` does); teardown
  ``cmd("quit")`` + ``wait()``.
- trio_qemu: ``open_machine(...)`` entered (ready: QMP negotiated, console and supervisor
  running) and left (``quit``, reaped, temp dir removed).

Results go to ``benchmarks/results/lifecycle.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    interleave,
    interleave_note,
    median,
    paired_ratio,
    print_ratios,
    qemu_binary,
    quiet_logging,
    write_results,
)

import trio_qemu

NAME = "lifecycle"
ARGS = ["-machine", "none", "-nodefaults", "-display", "none", "-vga", "none", "-accel", "tcg"]


def _spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    argv = [
        qemu_binary(), *ARGS,
        "-chardev", f"socket,id=mon,fd={fd}", "-mon", "chardev=mon,mode=control",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(fd,),
        start_new_session=True,
    )  # fmt: skip
    theirs.close()
    return proc, ours


def _readline(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("QEMU closed its monitor")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def raw_cycle() -> tuple[float, float]:
    start = time.perf_counter()
    proc, sock = _spawn()
    try:
        buf = bytearray()
        _readline(sock, buf)  # greeting
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        _readline(sock, buf)
        ready = time.perf_counter()
        sock.sendall(b'{"execute":"quit"}')
        proc.wait(30)
        done = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    return ready - start, done - ready


def seed_cycle() -> tuple[float, float]:
    start = time.perf_counter()
    proc, sock = _spawn()
    try:
        qmp = QEMUMonitorProtocol(sock)
        qmp.connect(negotiate=True)
        ready = time.perf_counter()
        qmp.cmd("quit")
        proc.wait(30)
        with contextlib.suppress(EOFError):  # as QEMUMachine does: QEMU hung up first
            qmp.close()
        done = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    return ready - start, done - ready


async def _trio_cycle() -> tuple[float, float]:
    config = trio_qemu.MachineConfig(args=ARGS, accel=None)  # ARGS carry -accel tcg
    start = time.perf_counter()
    async with trio_qemu.open_machine(config):
        ready = time.perf_counter()
    return ready - start, time.perf_counter() - ready


def trio_cycle() -> tuple[float, float]:
    """One ``open_machine`` cycle (``trio.run``'s own start-up is outside the timing)."""
    return trio.run(_trio_cycle)


CYCLES = {"raw": raw_cycle, "seed": seed_cycle, "trio": trio_cycle}


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="counted rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted rounds (default 2)")
    options = parser.parse_args()
    quiet_logging()
    qemu_binary()
    n, warmup = options.n, options.warmup
    note = interleave_note(n, warmup)
    print(f"launch-to-ready and teardown, -machine none, medians in ms; same work for every "
          f"variant; {note}")  # fmt: skip
    samples = interleave(list(CYCLES), n, lambda key: CYCLES[key](), warmup=warmup, say=_say)
    labels = {"raw": "raw (Popen + socket)", "seed": "seed's way (Popen + legacy)",
              "trio": "trio_qemu open_machine"}  # fmt: skip
    launch = {k: median([s[0] for s in v]) * 1000 for k, v in samples.items()}
    teardown = {k: median([s[1] for s in v]) * 1000 for k, v in samples.items()}
    print(f"\n  {'':30} {'launch':>9} {'teardown':>9}")
    for key, label in labels.items():
        print(f"  {label:30} {launch[key]:8.1f}  {teardown[key]:8.1f}")

    def paired(side: int, a: str, b: str) -> float:
        return paired_ratio([s[side] for s in samples[a]], [s[side] for s in samples[b]])

    ratios = {
        "launch trio/raw": paired(0, "trio", "raw"),
        "launch trio/seed": paired(0, "trio", "seed"),
        "teardown trio/raw quit": paired(1, "trio", "raw"),
        "teardown trio/seed": paired(1, "trio", "seed"),
    }
    print("\nratios (median over rounds of the ratio within a round; lower is faster):")
    print_ratios(ratios)
    path = write_results(
        NAME,
        {
            "n": n,
            "params": {"n": n, "warmup": warmup},
            "method": note,
            "argv": ARGS,
            "launch_ms": launch,
            "teardown_ms": teardown,
            "samples_ms": {k: [[a * 1000, b * 1000] for a, b in v] for k, v in samples.items()},
            "ratios": ratios,
        },
    )
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
