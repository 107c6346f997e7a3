"""Boot to shell of the tiny guest: trio_qemu against raw QEMU with the same command line.

    .venv/bin/python benchmarks/boot.py [--quick] [--n 5] [--round-trips 200] [--warmup 1]

Both sides boot ``trio_qemu.guest``'s tiny guest (``ensure_guest()``, built once and cached)
with ``image.config()``: q35, 256 MiB, the accelerator ``accel="auto"`` picks (printed), the
serial console and the guest-shell channel on socketpairs: the same work on both sides.
The two sides are interleaved (``_common.interleave``): ``--n`` rounds of one boot each,
raw first in odd rounds and trio_qemu first in even ones, after ``--warmup`` uncounted
rounds (page cache: the kernel and initrd are read on the first boot). Figures are medians;
a ratio is the median over rounds of the ratio of the two boots of a round.

- raw: ``subprocess.Popen`` of exactly the argv trio_qemu builds (``config.argv(fds)`` with
  our own socketpairs), then one ``selectors`` loop reading the console until
  ``READY_MARKER`` and the shell channel until the agent's ``#R`` line, answering with a ping
  (and pinging every 0.25 s besides, as ``Shell.wait_ready`` does) until its ``#P`` pong.
  Then (after 5 untimed) ``--round-trips`` raw ``R`` requests running ``true``, each to its
  ``#E`` line; then
  QMP negotiation (not timed) and ``quit`` + ``wait()`` for the teardown.
- trio_qemu: ``async with open_machine(image.config()) as vm: await vm.shell.wait_ready()``
  with a task recording when ``vm.console.wait_for(READY_MARKER)`` returns; then
  (after 5 untimed) ``--round-trips`` ``vm.shell.run("true")`` and as many raw ``R``
  requests written to ``vm.channel("shell")`` directly (Shell's own cost, in the same VM),
  in alternating blocks; teardown is leaving the block (``quit``, reaped, files removed).

Times are from just before the process is spawned. "Marker" is the console's ready line
(``/init`` prints it); "shell" is the shell agent answering, a little later (busybox
``init`` starts it). Results go to ``benchmarks/results/boot.json``. Nothing here asserts
a speed.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    interleave,
    interleave_note,
    median,
    paired_ratio,
    print_ratios,
    quiet_logging,
    write_results,
)

import trio_qemu
from trio_qemu import ChannelFds, GuestImage, MachineConfig
from trio_qemu._shell_protocol import encode_run
from trio_qemu.guest import READY_MARKER

NAME = "boot"
TARGET_RATIO = 1.05
BOOT_TIMEOUT = 180.0
PING_INTERVAL = 0.25
#: Untimed shell round trips first: the guest is still settling just after boot.
WARMUP_TRIPS = 5


@dataclass
class Boot:
    marker: float  # s from spawn to the ready marker on the console
    shell: float  # s from spawn to the shell agent's pong
    round_trips_per_s: float
    teardown: float
    #: trio_qemu only: raw protocol round trips on the machine's own shell channel
    channel_round_trips_per_s: float = float("nan")


def _request(rid: bytes) -> tuple[bytes, bytes]:
    """A raw ``R`` request running ``true`` and the start of its ``#E`` line."""
    command, _stdin = encode_run("true", None)
    return b"\nR %s 1048576 0 %s %s\n" % (rid, command, rid), b"#E %s " % rid


# -- raw -----------------------------------------------------------------------------------
def raw_boot(config: MachineConfig, round_trips: int) -> Boot:
    channels = ("monitor", "console", "shell", *(("relay",) if config.relay else ()))
    pairs = {name: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
             for name in channels}  # fmt: skip
    ours = {name: pair[0] for name, pair in pairs.items()}
    theirs = [pair[1] for pair in pairs.values()]
    argv = config.argv(ChannelFds(**{name: pair[1].fileno() for name, pair in pairs.items()}))
    proc: subprocess.Popen[bytes] | None = None
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=[s.fileno() for s in theirs],
                                start_new_session=True)  # fmt: skip
        for sock in theirs:
            sock.close()
        console, shell = ours["console"], ours["shell"]
        for sock in (console, shell):
            sock.setblocking(False)
        marker = READY_MARKER.encode()
        console_tail = b""
        shell_buf = bytearray()
        t_marker = t_shell = None
        next_ping = start + PING_INTERVAL
        ping = b"\nP raw-ping raw-ping\n"
        with selectors.DefaultSelector() as sel:
            sel.register(console, selectors.EVENT_READ, "console")
            sel.register(shell, selectors.EVENT_READ, "shell")
            while t_marker is None or t_shell is None:
                now = time.perf_counter()
                if now - start > BOOT_TIMEOUT or proc.poll() is not None:
                    raise RuntimeError(f"raw boot: no ready marker/shell (exit {proc.poll()})")
                if t_shell is None and now >= next_ping:
                    shell.send(ping)
                    next_ping = now + PING_INTERVAL
                for key, _ in sel.select(timeout=max(0.0, next_ping - now)):
                    data = (console if key.data == "console" else shell).recv(65536)
                    if not data:
                        raise RuntimeError(f"raw boot: {key.data} closed")
                    if key.data == "console":
                        if t_marker is None and marker in console_tail + data:
                            t_marker = time.perf_counter() - start
                        console_tail = (console_tail + data)[-len(marker) :]
                        continue
                    shell_buf += data
                    while b"\n" in shell_buf:
                        line, _, rest = bytes(shell_buf).partition(b"\n")
                        shell_buf[:] = rest
                        if line.startswith(b"#R "):
                            shell.send(ping)
                        elif line == b"#P raw-ping" and t_shell is None:
                            t_shell = time.perf_counter() - start
            # the shell channel, blocking from here; the console is left to its buffer
            # (the guest prints nothing more while only `true` runs)
            sel.unregister(console)
        shell.setblocking(True)
        warmup = min(WARMUP_TRIPS, round_trips)
        begin = time.perf_counter()
        for i in range(warmup + round_trips):
            if i == warmup:
                begin = time.perf_counter()
            request, want = _request(b"raw-%d" % i)
            shell.sendall(request)
            while True:
                while b"\n" not in shell_buf:
                    data = shell.recv(65536)
                    if not data:
                        raise RuntimeError("raw boot: the shell channel closed")
                    shell_buf += data
                line, _, rest = bytes(shell_buf).partition(b"\n")
                shell_buf[:] = rest
                if line.startswith(want):
                    if line != want + b"0":
                        raise RuntimeError(f"raw boot: `true` failed: {line!r}")
                    break
        rate = round_trips / (time.perf_counter() - begin) if round_trips else float("nan")
        monitor = ours["monitor"]
        monitor_buf = bytearray()

        def readline() -> bytes:
            while b"\n" not in monitor_buf:
                data = monitor.recv(65536)
                if not data:
                    raise RuntimeError("raw boot: QEMU closed its monitor")
                monitor_buf.extend(data)
            line, _, rest = bytes(monitor_buf).partition(b"\n")
            monitor_buf[:] = rest
            return line

        readline()  # the greeting, waiting since the start
        monitor.sendall(b'{"execute":"qmp_capabilities"}')
        readline()
        down = time.perf_counter()
        monitor.sendall(b'{"execute":"quit"}')
        proc.wait(30)
        teardown = time.perf_counter() - down
        assert t_marker is not None and t_shell is not None
        return Boot(t_marker, t_shell, rate, teardown)
    finally:
        if proc is not None and proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for pair in pairs.values():
            for sock in pair:
                sock.close()


# -- trio_qemu -----------------------------------------------------------------------------
async def trio_boot(config: MachineConfig, round_trips: int) -> Boot:
    marker: list[float] = []
    start = time.perf_counter()
    async with trio_qemu.open_machine(config) as vm:

        async def watch_console() -> None:
            await vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
            marker.append(time.perf_counter() - start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_console)
            await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
            shell = time.perf_counter() - start
        # Shell.run and the same requests written raw to the machine's shell channel, in
        # alternating blocks after a warm-up (the guest is still settling just after boot).
        # Shell skips lines that are not its own, and each block reads to its last reply.
        channel, buf = vm.channel("shell"), bytearray()

        async def raw_block(count: int, tag: int) -> None:
            for i in range(count):
                request, want = _request(b"chan-%d-%d" % (tag, i))
                await channel.send_all(request)
                while True:
                    while b"\n" not in buf:
                        data = await channel.receive_some(65536)
                        if not data:
                            raise RuntimeError("the shell channel closed")
                        buf.extend(data)
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    if line.startswith(want):
                        break

        for _ in range(min(WARMUP_TRIPS, round_trips)):
            await vm.shell.run("true", check=True)
        spent = {"shell": 0.0, "raw": 0.0}
        done = {"shell": 0, "raw": 0}
        for block in range(2):
            count = round_trips // 2 + (round_trips % 2 if block else 0)
            begin = time.perf_counter()
            for _ in range(count):
                await vm.shell.run("true", check=True)
            spent["shell"] += time.perf_counter() - begin
            begin = time.perf_counter()
            await raw_block(count, block)
            spent["raw"] += time.perf_counter() - begin
            done["shell"] += count
            done["raw"] += count
        rate = done["shell"] / spent["shell"] if spent["shell"] else float("nan")
        channel_rate = done["raw"] / spent["raw"] if spent["raw"] else float("nan")
        down = time.perf_counter()
    teardown = time.perf_counter() - down
    return Boot(marker[0], shell, rate, teardown, channel_rate)


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--n", type=int, help="boots per side (default 5)")
    parser.add_argument("--round-trips", type=int, help="shell round trips (default 200)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds (default 1)")
    options = parser.parse_args(argv)
    n = options.n or (1 if options.quick else 5)
    round_trips = options.round_trips or (20 if options.quick else 200)
    warmup: int = options.warmup
    quiet_logging()

    print("preparing the tiny guest (ensure_guest) ...", flush=True)
    image: GuestImage = trio.run(trio_qemu.ensure_guest)
    config = image.config()
    accel = trio_qemu.resolve_accel(config.accel)
    note = interleave_note(n, warmup)
    print(f"boot to shell: tiny guest, accelerator {accel}, {n} boot(s) per side, "
          f"{round_trips} shell round trips per boot; same argv on both sides; "
          f"{note}")  # fmt: skip

    def boot(side: str, trips: int) -> Boot:
        if side == "raw":
            return raw_boot(config, trips)
        return trio.run(trio_boot, config, trips)

    samples: dict[str, list[Boot]] = interleave(
        ["raw", "trio"], n, lambda side: boot(side, round_trips),
        warmup=warmup, warmup_run=lambda side: boot(side, min(round_trips, 10)),
        say=lambda line: print(line, flush=True),
    )  # fmt: skip

    med: dict[str, dict[str, float]] = {
        side: {f: median([getattr(b, f) for b in boots]) for f in Boot.__dataclass_fields__}
        for side, boots in samples.items()
    }
    labels = {"raw": "raw Popen + socketpairs", "trio": "trio_qemu open_machine"}
    print(f"\n  {'':26} {'marker s':>9} {'shell s':>9} {'true/s':>8} {'teardown ms':>12}")
    for side, label in labels.items():
        m = med[side]
        print(f"  {label:26} {m['marker']:9.3f} {m['shell']:9.3f} "
              f"{m['round_trips_per_s']:8.1f} {m['teardown'] * 1000:12.1f}")  # fmt: skip
    print(f"  raw protocol on trio_qemu's shell channel: "
          f"{med['trio']['channel_round_trips_per_s']:.1f} true/s")  # fmt: skip

    def paired(field: str, other: str = "raw", other_field: str | None = None) -> float:
        return paired_ratio([getattr(b, field) for b in samples["trio"]],
                            [getattr(b, other_field or field) for b in samples[other]])  # fmt: skip

    ratios = {
        "boot to shell trio/raw": paired("shell"),
        "boot to marker trio/raw": paired("marker"),
        "shell round trips trio/raw": paired("round_trips_per_s"),
        "Shell.run / raw protocol, same VM": paired("round_trips_per_s", "trio",
                                                    "channel_round_trips_per_s"),
        "teardown trio/raw": paired("teardown"),
    }  # fmt: skip
    print("\nratios, median over rounds of the ratio within a round (times: lower is faster; "
          "round trips: higher is faster):")  # fmt: skip
    print_ratios(ratios)
    print(f"\ntarget: boot to shell trio/raw <= {TARGET_RATIO}: measured "
          f"{ratios['boot to shell trio/raw']:.3f}")  # fmt: skip
    argv_shown = config.argv()
    path = write_results(NAME, {
        "params": {"n": n, "round_trips": round_trips, "warmup": warmup,
                   "quick": options.quick},
        "method": note,
        "accel": accel,
        "argv": argv_shown,
        "target_ratio": TARGET_RATIO,
        "median": med,
        "samples": {side: [asdict(b) for b in boots] for side, boots in samples.items()},
        "ratios": ratios,
    })  # fmt: skip
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
