"""Launch-to-ready and teardown: trio_qemu against the raw path and the seed's way.

    .venv/bin/python benchmarks/lifecycle.py [--n 30]

Every variant runs the same ``qemu-system-x86_64 -machine none -nodefaults -display none
-vga none -accel tcg`` with a QMP monitor on a socketpair, one machine at a time, ``--n``
times; the printed figure is the median in milliseconds.

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
from collections.abc import Callable
from pathlib import Path

import trio
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_ratios, qemu_binary, quiet_logging, ratio, write_results

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


async def _trio_cycles(n: int) -> list[tuple[float, float]]:
    config = trio_qemu.MachineConfig(args=ARGS, accel=None)  # ARGS carry -accel tcg
    results = []
    for _ in range(n):
        start = time.perf_counter()
        async with trio_qemu.open_machine(config):
            ready = time.perf_counter()
        results.append((ready - start, time.perf_counter() - ready))
    return results


def run(label: str, cycle: Callable[[], tuple[float, float]], n: int) -> list[tuple[float, float]]:
    print(f"  running {label} ...", flush=True)
    return [cycle() for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="launch/teardown cycles per variant")
    options = parser.parse_args()
    quiet_logging()
    n = options.n
    print(f"launch-to-ready and teardown, -machine none, {n} cycles each, medians in ms")
    samples = {
        "raw": run("raw", raw_cycle, n),
        "seed": run("seed's way", seed_cycle, n),
    }
    print("  running trio_qemu ...", flush=True)
    samples["trio"] = trio.run(_trio_cycles, n)
    labels = {"raw": "raw (Popen + socket)", "seed": "seed's way (Popen + legacy)",
              "trio": "trio_qemu open_machine"}  # fmt: skip
    launch = {k: median([s[0] for s in v]) * 1000 for k, v in samples.items()}
    teardown = {k: median([s[1] for s in v]) * 1000 for k, v in samples.items()}
    print(f"\n  {'':30} {'launch':>9} {'teardown':>9}")
    for key, label in labels.items():
        print(f"  {label:30} {launch[key]:8.1f}  {teardown[key]:8.1f}")
    ratios = {
        "launch trio/raw": ratio(launch["trio"], launch["raw"]),
        "launch trio/seed": ratio(launch["trio"], launch["seed"]),
        "teardown trio/raw quit": ratio(teardown["trio"], teardown["raw"]),
        "teardown trio/seed": ratio(teardown["trio"], teardown["seed"]),
    }
    print("\nratios of medians (lower is faster):")
    print_ratios(ratios)
    path = write_results(
        NAME,
        {
            "n": n,
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
