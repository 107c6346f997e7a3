"""QMP round trips per second: trio_qemu against qemu.qmp and a raw socket.

    .venv/bin/python benchmarks/qmp_throughput.py [--n 2000] [--repeat 5] [--warmup 200]

One ``qemu-system-x86_64 -machine none`` process serves every client; each client gets its
own QMP monitor on its own socketpair (a monitor has one peer, and qemu.qmp's clients take
over their socket). Each run is ``--n`` ``query-status`` calls; a client first makes
``--warmup`` untimed calls; the printed figure is the median of ``--repeat`` runs.

- trio_qemu: ``open_qmp`` over the socketpair, ``await client.cmd("query-status")``
  one after another, and N at once (one task each, in a nursery).
- qemu.qmp's asyncio ``QMPClient`` (``connect(sock)``, ``execute``) and its sync
  ``legacy.QEMUMonitorProtocol`` (what ``QEMUMachine`` uses; ``cmd``). Their
  ``_cb_outbound``/``_cb_inbound`` hooks pretty-print every message as JSON for a debug log
  call even when debug is off; the main rows use a subclass that formats only when debug is
  on (as trio_qemu does), the "stock" rows use the class as shipped.
- raw: a blocking socket, pre-encoded ``{"execute":"query-status","id":N}``, one line read
  per call and not decoded: the limit for one connection.

All loggers stay at WARNING. Nothing here asserts a speed; results go to
``benchmarks/results/qmp_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from qemu.qmp import Message, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BASE_ARGS,
    median,
    print_ratios,
    print_table,
    quiet_logging,
    ratio,
    running_qemu,
    write_results,
)

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
async def bench_trio(
    sock: socket.socket, n: int, repeat: int, warmup: int, seq: Result, conc: Result
) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with open_qmp(stream) as client:
        _check_status(await client.cmd(COMMAND), "trio_qemu")
        for _ in range(warmup):
            await client.cmd(COMMAND)
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(n):
                await client.cmd(COMMAND)
            seq.runs.append(_rate(n, start))

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(client.cmd, COMMAND)
            conc.runs.append(_rate(n, start))


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


async def bench_asyncio(
    sock: socket.socket, n: int, repeat: int, warmup: int, result: Result, quiet: bool
) -> None:
    qmp = QuietQMPClient("bench") if quiet else QMPClient("bench")
    await qmp.connect(sock)  # 0.0.6 takes an already-connected socket here
    try:
        _check_status(await qmp.execute(COMMAND), "qemu.qmp asyncio")
        for _ in range(warmup):
            await qmp.execute(COMMAND)
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(n):
                await qmp.execute(COMMAND)
            result.runs.append(_rate(n, start))
    finally:
        await qmp.disconnect()


def bench_legacy(
    sock: socket.socket, n: int, repeat: int, warmup: int, result: Result, quiet: bool
) -> None:
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
            for _ in range(repeat):
                start = time.perf_counter()
                for _ in range(n):
                    qmp.cmd(COMMAND)
                result.runs.append(_rate(n, start))
        finally:
            qmp.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# -- raw socket ----------------------------------------------------------------------------
def bench_raw(sock: socket.socket, n: int, repeat: int, warmup: int, result: Result) -> None:
    with sock, sock.makefile("rb") as reader:
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

        requests = [b'{"execute":"%s","id":%d}' % (COMMAND.encode(), i) for i in range(n)]
        send, readline = sock.sendall, reader.readline
        for request in requests[:warmup]:
            send(request)
            readline()
        for _ in range(repeat):
            start = time.perf_counter()
            for request in requests:
                send(request)
                line = readline()
                if not line:
                    raise RuntimeError("raw: EOF from QEMU")
            result.runs.append(_rate(n, start))
            last = json.loads(line)
            if last.get("id") != n - 1 or "status" not in last.get("return", {}):
                raise RuntimeError(f"raw: out of step, last reply {last!r}")


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per client (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first (default min(200, n))"
    )
    args = parser.parse_args(argv)
    n: int = args.n
    repeat: int = args.repeat
    warmup: int = min(200, n) if args.warmup is None else args.warmup
    if n < 1 or repeat < 1 or warmup < 0:
        parser.error("--n and --repeat must be positive, --warmup not negative")
    quiet_logging()

    raw_req = b'{"execute":"%s","id":1000}' % COMMAND.encode()
    trio_req = bytes(Message({"execute": COMMAND, "id": 1000}))
    qmp_req = bytes(Message({"execute": COMMAND, "id": "__qmp#01000"}))
    res: dict[str, Result] = {
        "raw": Result("raw blocking socket (the limit)", raw_req),
        "trio": Result("trio_qemu, sequential", trio_req),
        "trio_concurrent": Result("trio_qemu, N concurrent tasks", trio_req),
        "asyncio": Result("qemu.qmp asyncio QMPClient", qmp_req),
        "asyncio_stock": Result("qemu.qmp asyncio QMPClient (stock hooks)", qmp_req),
        "legacy": Result("qemu.qmp legacy QEMUMonitorProtocol", qmp_req),
        "legacy_stock": Result("qemu.qmp legacy QEMUMonitorProtocol (stock hooks)", qmp_req),
    }

    runners: list[tuple[str, Callable[[socket.socket], None]]] = [
        ("raw", lambda s: bench_raw(s, n, repeat, warmup, res["raw"])),
        (
            "trio",
            lambda s: trio.run(
                bench_trio, s, n, repeat, warmup, res["trio"], res["trio_concurrent"]
            ),
        ),
        (
            "asyncio",
            lambda s: asyncio.run(bench_asyncio(s, n, repeat, warmup, res["asyncio"], True)),
        ),
        (
            "asyncio_stock",
            lambda s: asyncio.run(bench_asyncio(s, n, repeat, warmup, res["asyncio_stock"], False)),
        ),
        ("legacy", lambda s: bench_legacy(s, n, repeat, warmup, res["legacy"], True)),
        ("legacy_stock", lambda s: bench_legacy(s, n, repeat, warmup, res["legacy_stock"], False)),
    ]

    with running_qemu(monitors=len(runners)) as qemu:
        setup = (
            f"one QEMU (pid {qemu.pid}) shared by all clients, each client on its own "
            f"socketpair QMP monitor ({len(runners)} monitors); clients run one after another"
        )
        print(f"QMP {COMMAND} throughput: N={n} calls per run, median of {repeat} runs, "
              f"{warmup} warm-up calls per client")  # fmt: skip
        print(f"setup: {setup}")
        print(f"qemu: {' '.join(qemu.argv[: 1 + len(BASE_ARGS)])} + -chardev/-mon per client")
        for key, run in runners:
            print(f"  running {key} ...", flush=True)
            run(qemu.take_monitor())

    order = [
        "raw", "trio", "trio_concurrent", "asyncio", "legacy", "asyncio_stock", "legacy_stock",
    ]  # fmt: skip
    print("\nops/s (median of runs):")
    print_table([(res[k].label, res[k].median, res[k].runs) for k in order])
    print("\nrequest bytes on the wire (at id 1000):")
    for k in ("raw", "trio", "asyncio"):
        users = {"raw": "raw", "trio": "trio_qemu", "asyncio": "qemu.qmp (both)"}[k]
        print(f"  {users:<16} {len(res[k].request):3d}  {res[k].request.decode()}")

    med = {k: r.median for k, r in res.items()}
    ratios = {
        "trio/raw": ratio(med["trio"], med["raw"]),
        "trio/legacy": ratio(med["trio"], med["legacy"]),
        "trio/asyncio": ratio(med["trio"], med["asyncio"]),
        "concurrent/raw": ratio(med["trio_concurrent"], med["raw"]),
        "trio/legacy (stock hooks)": ratio(med["trio"], med["legacy_stock"]),
        "trio/asyncio (stock hooks)": ratio(med["trio"], med["asyncio_stock"]),
        "concurrent/trio": ratio(med["trio_concurrent"], med["trio"]),
    }
    print("\nratios (of medians):")
    print_ratios(ratios)

    path = write_results(
        NAME,
        {
            "params": {"n": n, "repeat": repeat, "warmup": warmup, "command": COMMAND},
            "setup": setup,
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
