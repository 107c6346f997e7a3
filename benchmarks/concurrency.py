"""32 VMs: concurrent launch and teardown against serial, and Python memory per running VM.

    .venv/bin/python benchmarks/concurrency.py [--quick] [--vms 32] [--repeat 3]

Every VM is ``-machine none -nodefaults -display none -vga none -accel tcg`` with QMP on a
socketpair (as in ``lifecycle.py``). A run launches ``--vms`` of them until each answers
QMP ("ready"), then tears them all down: the same work for every variant. The figures are
the medians of ``--repeat`` runs, in seconds for all VMs together. The variants are
interleaved (``_common.interleave``): each round runs every variant once, the order
reversed every other round, after one uncounted warm-up round; a ratio is the median over
rounds of the ratio of two variants in the same round.

- trio_qemu concurrent: ``async with open_machines(*configs)``: every launch at once, every
  teardown at once.
- raw concurrent (the limit): ``subprocess.Popen`` all, then negotiate QMP with each
  (blocking reads, one after another: they all start meanwhile), then ``quit`` to all and
  ``wait()`` for all.
- trio_qemu serial: one ``async with open_machine(config)`` cycle after another.
- seed's way serial: ``Popen`` + ``qemu.qmp.legacy.QEMUMonitorProtocol`` cycles
  (``lifecycle.seed_cycle``), and raw serial cycles (``lifecycle.raw_cycle``).

Memory, each in a fresh interpreter: ``open_machines`` with 1 and with ``--vms`` VMs; inside
the block every VM answers one ``query-status``, then the growth since just before the block
is read: Python's traced memory (a run with ``tracemalloc`` on) and the process's RSS (a run
without it). Per VM = (with N) / N; marginal = (with N - with 1) / (N - 1). RSS also holds
Trio's worker threads that spawned the processes (idle, their stacks partly touched).

Results go to ``benchmarks/results/concurrency.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import tracemalloc
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    interleave,
    interleave_note,
    median,
    paired_ratio,
    print_ratios,
    qemu_binary,
    quiet_logging,
    rss_bytes,
    write_results,
)
from lifecycle import ARGS, raw_cycle, seed_cycle

import trio_qemu
from trio_qemu import MachineConfig

NAME = "concurrency"
CONFIG = MachineConfig(args=ARGS, accel=None)  # ARGS carry -accel tcg


async def trio_concurrent(count: int) -> tuple[float, float]:
    start = time.perf_counter()
    async with trio_qemu.open_machines(*[CONFIG] * count) as vms:
        ready = time.perf_counter()
        if len(vms) != count:
            raise RuntimeError(f"{len(vms)} of {count} machines started")
    return ready - start, time.perf_counter() - ready


async def trio_serial(count: int) -> tuple[float, float]:
    launch = teardown = 0.0
    for _ in range(count):
        start = time.perf_counter()
        async with trio_qemu.open_machine(CONFIG):
            ready = time.perf_counter()
        launch += ready - start
        teardown += time.perf_counter() - ready
    return launch, teardown


def raw_concurrent(count: int) -> tuple[float, float]:
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []
    try:
        start = time.perf_counter()
        for _ in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(ours)
            fd = theirs.fileno()
            argv = [
                qemu_binary(),
                *ARGS,
                "-chardev",
                f"socket,id=mon,fd={fd}",
                "-mon",
                "chardev=mon,mode=control",
            ]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, pass_fds=(fd,),
                                          start_new_session=True))  # fmt: skip
            theirs.close()
        readers = [s.makefile("rb") for s in socks]
        for sock, reader in zip(socks, readers, strict=True):
            json.loads(reader.readline())  # greeting
            sock.sendall(b'{"execute":"qmp_capabilities"}')
            if json.loads(reader.readline()) != {"return": {}}:
                raise RuntimeError("raw: qmp_capabilities failed")
        ready = time.perf_counter()
        for sock in socks:
            sock.sendall(b'{"execute":"quit"}')
        for proc in procs:
            proc.wait(30)
        done = time.perf_counter()
        for reader in readers:
            reader.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sock in socks:
            sock.close()
    return ready - start, done - ready


def serial(cycle: Any, count: int) -> tuple[float, float]:
    launch = teardown = 0.0
    for _ in range(count):
        a, b = cycle()
        launch += a
        teardown += b
    return launch, teardown


async def _memory_with(count: int) -> dict[str, int]:
    traced0, rss0 = tracemalloc.get_traced_memory()[0], rss_bytes()
    async with trio_qemu.open_machines(*[CONFIG] * count) as vms:
        for vm in vms:
            await vm.cmd("query-status")
        traced1, rss1 = tracemalloc.get_traced_memory()[0], rss_bytes()
    return {"vms": count, "traced_bytes": traced1 - traced0, "rss_bytes": rss1 - rss0}


def memory_probe(count: int, traced: bool) -> dict[str, int]:
    """In a fresh interpreter (clean heap): memory before and with ``count`` machines up.

    With ``traced``, ``tracemalloc`` runs (its own bookkeeping inflates RSS, so RSS is
    taken from a run without it).
    """
    argv = [sys.executable, __file__, "--memory-probe", str(count)]
    if traced:
        argv.append("--traced")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    result: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return result


def _probe_main(count: int, traced: bool) -> None:
    quiet_logging()
    trio.run(trio.sleep, 0)  # Trio's one-time setup before the baseline
    if traced:
        tracemalloc.start()
    print(json.dumps(trio.run(_memory_with, count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--vms", type=int, default=32, help="machines per run (default 32)")
    parser.add_argument("--repeat", type=int, help="runs per variant (default 3)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.memory_probe:
        _probe_main(options.memory_probe, options.traced)
        return 0
    count: int = options.vms
    repeat = options.repeat or (1 if options.quick else 3)
    if count < 2:
        parser.error("--vms must be at least 2")
    quiet_logging()
    qemu_binary()

    runners: dict[str, tuple[str, Any]] = {
        "trio_concurrent": ("trio_qemu open_machines, concurrent",
                            lambda: trio.run(trio_concurrent, count)),
        "raw_concurrent": ("raw Popen all, then QMP (the limit)",
                           lambda: raw_concurrent(count)),
        "trio_serial": ("trio_qemu open_machine, serial", lambda: trio.run(trio_serial, count)),
        "seed_serial": ("seed's way (Popen + legacy QMP), serial",
                        lambda: serial(seed_cycle, count)),
        "raw_serial": ("raw Popen + socket, serial", lambda: serial(raw_cycle, count)),
    }  # fmt: skip
    note = interleave_note(repeat, 1)
    print(f"{count} x -machine none: launch to ready + teardown, median of {repeat} run(s); "
          f"every variant the same {count} machines; {note}")  # fmt: skip
    samples: dict[str, list[tuple[float, float]]] = interleave(
        list(runners), repeat, lambda key: runners[key][1](),
        say=lambda line: print(line, flush=True),
    )  # fmt: skip
    med = {k: {"launch_s": median([a for a, _ in v]), "teardown_s": median([b for _, b in v]),
               "total_s": median([a + b for a, b in v])} for k, v in samples.items()}  # fmt: skip
    print(f"\n  {'':42} {'launch s':>9} {'teardown s':>11} {'total s':>8}")
    for key, (label, _) in runners.items():
        m = med[key]
        print(f"  {label:42} {m['launch_s']:9.3f} {m['teardown_s']:11.3f} {m['total_s']:8.3f}")

    print(f"\nPython memory per running VM (fresh processes; 1 and {count} VMs up)", flush=True)
    probes = {f"{kind}_{n}": memory_probe(n, kind == "traced")
              for kind in ("traced", "rss") for n in (1, count)}  # fmt: skip
    one_t, many_t = probes["traced_1"]["traced_bytes"], probes[f"traced_{count}"]["traced_bytes"]
    one_r, many_r = probes["rss_1"]["rss_bytes"], probes[f"rss_{count}"]["rss_bytes"]
    memory: dict[str, Any] = {
        "probes": probes,
        "traced_per_vm_bytes": many_t / count,
        "rss_per_vm_bytes": many_r / count,
        "traced_marginal_bytes": (many_t - one_t) / (count - 1),
        "rss_marginal_bytes": (many_r - one_r) / (count - 1),
    }
    print(f"  traced: {many_t / count / 1024:8.1f} KiB per VM "
          f"({(many_t - one_t) / (count - 1) / 1024:.1f} KiB marginal)")  # fmt: skip
    print(f"  RSS:    {many_r / count / 1024:8.1f} KiB per VM "
          f"({(many_r - one_r) / (count - 1) / 1024:.1f} KiB marginal)")  # fmt: skip

    def paired(a: str, b: str) -> float:
        return paired_ratio([x + y for x, y in samples[a]], [x + y for x, y in samples[b]])

    ratios = {
        "concurrent/serial trio (time)": paired("trio_concurrent", "trio_serial"),
        "concurrent trio/raw (time)": paired("trio_concurrent", "raw_concurrent"),
        "serial trio/seed (time)": paired("trio_serial", "seed_serial"),
        "serial trio/raw (time)": paired("trio_serial", "raw_serial"),
    }
    print("\nratios of total time, median over rounds of the ratio within a round (lower is "
          "faster):")  # fmt: skip
    print_ratios(ratios)
    path = write_results(NAME, {
        "params": {"vms": count, "repeat": repeat, "quick": options.quick},
        "method": note,
        "argv": ARGS,
        "median": med,
        "samples": {k: [list(s) for s in v] for k, v in samples.items()},
        "memory": memory,
        "ratios": ratios,
    })  # fmt: skip
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        sys.exit(main())
