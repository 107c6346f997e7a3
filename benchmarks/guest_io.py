"""Data into and out of the tiny guest: file copies, TCP streams, many streams at once.

    .venv/bin/python benchmarks/guest_io.py [--quick] [--mib 64] [--rounds 3] [--warmup 1]

One machine runs every variant, so they compare the same guest: the tiny guest with the
QEMU guest agent (``ensure_guest(agent=True)``, which has the relay too), 512 MiB (so two
``--mib`` files fit in its tmpfs), the accelerator ``accel="auto"`` picks (printed), and a
virtio-net NIC on ``-netdev user`` whose ``hostfwd`` rules map host ports to the guest's
test servers (busybox ``nc -ll``), for the host-port baselines. The variants of each
comparison are interleaved (``_common.interleave``'s order, in one Trio run): every round
runs each once, the order reversed every other round, after ``--warmup`` uncounted rounds
(at an eighth of the size); figures are medians, a ratio the median over rounds of the
ratio within a round. MB/s is 10^6 bytes per second of payload.

Copies of ``--mib`` MiB of random bytes, timed from the call to its return:

- to the guest: ``shell.copy_to`` (with the in-guest SHA-256 check, and ``verify=False``)
  against ``shell.run("cat > f", stdin=data)`` (the shell channel: base64 in one request)
  and the guest agent's ``write_file`` (base64 in 96 KiB QMP chunks);
- from the guest: ``shell.copy_from`` (both ways too) against ``shell.run("cat f")`` and the
  agent's ``read_file``.

TCP, relay (``vm.open_tcp_stream``) against the same through the host port of
``-netdev user,hostfwd`` (``trio.open_tcp_stream`` to 127.0.0.1):

- connect latency: from connecting to a 1-byte echo coming back (a guest ``cat``), ms;
- throughput to the guest: ``--mib`` MiB to a guest ``cat >/dev/null``, until the guest
  says it is done (after end of file); from the guest: a ``--mib`` MiB file from a guest
  ``cat``, to end of file;
- 16 streams at once: the same total, 1/16 on each of 16 streams (relay), against one
  relay stream.

Results go to ``benchmarks/results/guest_io.json``. Nothing here asserts a speed; the
issue's targets (copies >= 30 MB/s each way, a TCP stream >= 20 MB/s, under TCG) are shown
against the figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    accelerator,
    interleave_note,
    loadavg,
    median,
    paired_ratio,
    print_ratios,
    quiet_logging,
    write_results,
)

import trio_qemu
from trio_qemu.guest import GUEST_ARGS, ensure_guest

NAME = "guest_io"
MB = 1_000_000
#: The guest's test servers (busybox nc, a process per connection). nc's listen backlog is
#: 1, so streams opened at once get a server each (ports SINK + i, SOURCE16 + i): else all
#: but one wait on the guest's TCP retransmissions.
ECHO, SOURCE, SINK, SOURCE16 = 7000, 7001, 7100, 7200
STREAMS = 16
TARGETS = {"copy MB/s": 30.0, "TCP stream MB/s": 20.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def interleaved(
    keys: Sequence[str],
    rounds: int,
    warmup: int,
    run: Callable[[str, bool], Awaitable[float]],
) -> dict[str, list[float]]:
    """``_common.interleave``'s order, awaited: ``run(key, counted)`` returns seconds."""
    out: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(warmup + rounds):
        counted = index >= warmup
        order = list(keys) if (index - warmup) % 2 == 0 else list(reversed(keys))
        label = f"round {index - warmup + 1}/{rounds}" if counted else "warm-up (not counted)"
        print(f"  {label}: {', '.join(order)}", flush=True)
        for key in order:
            seconds = await run(key, counted)
            if counted:
                out[key].append(seconds)
    return out


async def read_to_end(stream: trio.abc.ReceiveStream) -> int:
    total = 0
    while chunk := await stream.receive_some(1 << 20):
        total += len(chunk)
    return total


class Bench:
    def __init__(self, vm: trio_qemu.Machine, ports: dict[int, int], size: int) -> None:
        self.vm = vm
        self.ports = ports  # guest port -> host port (hostfwd)
        self.size = size
        self.data = os.urandom(size)

    def sized(self, counted: bool) -> int:
        return self.size if counted else max(1 << 20, self.size // 8)

    # --- copies ---------------------------------------------------------------------------
    async def copy_to(self, key: str, counted: bool) -> float:
        vm, data = self.vm, self.data[: self.sized(counted)]
        await vm.shell.run("rm -f /tmp/in", check=True)
        start = time.perf_counter()
        if key == "copy_to":
            await vm.shell.copy_to(data, "/tmp/in", timeout=600)
        elif key == "copy_to verify=False":
            await vm.shell.copy_to(data, "/tmp/in", verify=False, timeout=600)
        elif key == "shell.run stdin":
            await vm.shell.run("cat > /tmp/in", stdin=data, timeout=600, check=True)
        elif key == "agent.write_file":
            await vm.agent.write_file("/tmp/in", data, timeout=600)
        seconds = time.perf_counter() - start
        size = await vm.shell.run("stat -c %s /tmp/in", check=True)
        assert int(size.stdout) == len(data), (key, size)
        return seconds

    async def copy_from(self, key: str, counted: bool) -> float:
        vm = self.vm
        path = "/tmp/src" if counted else "/tmp/src16"
        want = self.size if counted else self.size // STREAMS
        start = time.perf_counter()
        if key == "copy_from":
            got = await vm.shell.copy_from(path, timeout=600)
        elif key == "copy_from verify=False":
            got = await vm.shell.copy_from(path, verify=False, timeout=600)
        elif key == "shell.run stdout":
            got = (await vm.shell.run(f"cat {path}", timeout=600, check=True)).stdout
        else:
            got = await vm.agent.read_file(path, timeout=600, max_size=self.size + 1)
        seconds = time.perf_counter() - start
        assert len(got) == want, (key, len(got))
        return seconds

    # --- TCP ------------------------------------------------------------------------------
    async def connect(self, key: str, port: int) -> trio.abc.HalfCloseableStream:
        if key == "relay":
            return await self.vm.open_tcp_stream(port)
        return await trio.open_tcp_stream("127.0.0.1", self.ports[port])

    async def latency(self, key: str, counted: bool) -> float:
        times = []
        for _ in range(20 if counted else 3):
            start = time.perf_counter()
            stream = await self.connect(key, ECHO)
            async with stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                times.append(time.perf_counter() - start)
        return median(times)

    async def to_guest(self, key: str, counted: bool) -> float:
        size = self.sized(counted)
        start = time.perf_counter()
        stream = await self.connect(key, SINK)
        async with stream:
            view = memoryview(self.data)[:size]
            for offset in range(0, size, 1 << 20):
                await stream.send_all(view[offset : offset + (1 << 20)])
            await stream.send_eof()
            reply = bytearray()
            while chunk := await stream.receive_some():
                reply += chunk
        assert reply == b"done\n", (key, reply)
        return time.perf_counter() - start

    async def from_guest(self, key: str, counted: bool) -> float:
        start = time.perf_counter()
        stream = await self.connect(key, SOURCE if counted else SOURCE16)
        async with stream:
            got = await read_to_end(stream)
        assert got == (self.size if counted else self.size // STREAMS), (key, got)
        return time.perf_counter() - start

    async def many(self, key: str, counted: bool) -> float:
        """``key``: "16 streams to", "1 stream to", "16 streams from", "1 stream from"."""
        n = STREAMS if key.startswith("16") else 1
        total = self.sized(counted)
        each = total // n
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                if key.endswith("to"):
                    nursery.start_soon(self._send_sink, SINK + i, each)
                else:
                    nursery.start_soon(self._read_source, SOURCE16 + i if n > 1 else SOURCE)
        return time.perf_counter() - start

    async def _send_sink(self, port: int, size: int) -> None:
        async with await self.vm.open_tcp_stream(port) as stream:
            view = memoryview(self.data)[:size]
            for offset in range(0, size, 1 << 20):
                await stream.send_all(view[offset : offset + (1 << 20)])
            await stream.send_eof()
            await read_to_end(stream)

    async def _read_source(self, port: int) -> None:
        async with await self.vm.open_tcp_stream(port) as stream:
            await read_to_end(stream)


def rates(size: int, runs: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        key: {"median_mb_s": size / MB / median(v), "runs_s": v, "median_s": median(v)}
        for key, v in runs.items()
    }


def ratios_of(runs: dict[str, list[float]], a: str, others: Sequence[str]) -> dict[str, float]:
    """Speed of ``a`` over each other variant (a time ratio inverted: > 1 is faster)."""
    return {f"{a} / {b} (speed)": paired_ratio(runs[b], runs[a]) for b in others}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.mib << 20
    image = await ensure_guest(agent=True)
    if not image.relay:
        raise SystemExit("the guest has no relay (no C compiler when it was built)")
    ports = {port: free_port() for port in (ECHO, SINK, SOURCE, SOURCE16)}
    forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in ports.items())
    config = image.config(
        name="guest-io",
        memory=512,
        append=f"{image.append} trio.ip=10.0.2.15/24",
        args=[*GUEST_ARGS, "-netdev", f"user,id=n0,{forwards}",
              "-device", "virtio-net-pci,netdev=n0"],
    )  # fmt: skip
    results: dict[str, Any] = {}
    async with trio_qemu.open_machine(config) as vm:
        await vm.shell.wait_ready(timeout=120)
        await vm.relay.wait_ready(timeout=60)
        vm.shell.max_output = size + (1 << 20)
        bench = Bench(vm, ports, size)
        await vm.shell.copy_to(bench.data, "/tmp/src", timeout=600)
        await vm.shell.run(f"head -c {size // STREAMS} /tmp/src > /tmp/src16", check=True)
        servers = {
            ECHO: "cat",
            SOURCE: "cat /tmp/src",
            **{SINK + i: "sh -c 'cat >/dev/null; echo done'" for i in range(STREAMS)},
            **{SOURCE16 + i: "cat /tmp/src16" for i in range(STREAMS)},
        }
        await vm.shell.run(
            "\n".join(f"nc -ll -p {p} -e {c} >/dev/null 2>&1 &" for p, c in servers.items()),
            check=True,
        )
        for port in servers:
            await vm.wait_for_open_port(port, timeout=30, interval=0.05)
        print(f"guest ready; accel {accelerator()}; {args.mib} MiB per transfer", flush=True)

        sections: list[tuple[str, Sequence[str], Callable[[str, bool], Awaitable[float]]]] = [
            ("copy to the guest", ["copy_to", "copy_to verify=False", "shell.run stdin",
                                   "agent.write_file"], bench.copy_to),
            ("copy from the guest", ["copy_from", "copy_from verify=False", "shell.run stdout",
                                     "agent.read_file"], bench.copy_from),
            ("TCP connect + 1-byte echo", ["relay", "hostfwd"], bench.latency),
            ("TCP to the guest", ["relay", "hostfwd"], bench.to_guest),
            ("TCP from the guest", ["relay", "hostfwd"], bench.from_guest),
            ("16 streams to the guest", ["16 streams to", "1 stream to"], bench.many),
            ("16 streams from the guest", ["16 streams from", "1 stream from"], bench.many),
        ]  # fmt: skip
        for title, keys, fn in sections:
            if args.only and not any(word in title for word in args.only.split(",")):
                continue
            print(f"\n{title}", flush=True)
            runs = await interleaved(keys, args.rounds, args.warmup, fn)
            if fn == bench.latency:
                row = {k: {"median_ms": median(v) * 1000, "runs_ms": [x * 1000 for x in v]}
                       for k, v in runs.items()}  # fmt: skip
                for key, value in row.items():
                    print(f"  {key:<24} {value['median_ms']:8.2f} ms")
                pairs = {"relay / hostfwd (time)": paired_ratio(runs["relay"], runs["hostfwd"])}
            else:
                row = rates(size, runs)
                for key, value in row.items():
                    print(f"  {key:<24} {value['median_mb_s']:8.1f} MB/s")
                pairs = ratios_of(runs, keys[0], keys[1:])
                if len(keys) > 2:
                    pairs.update(ratios_of(runs, keys[1], keys[2:]))
            print_ratios(pairs)
            results[title] = {"results": row, "ratios": pairs}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--mib", type=int, help="MiB per transfer (default 64)")
    parser.add_argument("--rounds", type=int, help="counted rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds (default 1)")
    parser.add_argument("--only", help="run the sections whose title has one of these words "
                        "(comma-separated: copy,TCP,streams)")  # fmt: skip
    args = parser.parse_args(argv)
    args.mib = args.mib or (4 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    quiet_logging()
    started = time.monotonic()
    load_before = loadavg()
    results = trio.run(run, args)
    path = write_results(NAME, {
        "params": {"mib": args.mib, "rounds": args.rounds, "warmup": args.warmup,
                   "streams": STREAMS, "only": args.only},
        "method": interleave_note(args.rounds, args.warmup),
        "targets": TARGETS,
        "load_before": load_before,
        "seconds": time.monotonic() - started,
        **results,
    })  # fmt: skip
    print(f"\nwrote {path} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
