"""A mirror job driven by ``run_job`` against the same job polled with qemu.qmp's legacy
client, one VM and 8 VMs at once.

    .venv/bin/python benchmarks/block_job.py [--quick] [--mib 256] [--rounds 5]
                                             [--vms 8] [--vms-rounds 3] [--poll 0.01]

Every variant does the same work: a ``-machine none`` QEMU (as in ``lifecycle.py``) opens
a ``--mib`` MiB qcow2 image full of data (read-only, shared by all the VMs) and an empty
qcow2 target of the same size as ``-blockdev`` nodes; the timing runs from sending
``blockdev-mirror`` (``sync=full``) to the job being gone after its completion: copied,
``ready``, ``complete``d (pivoted), concluded and dismissed. Launching and quitting QEMU
and making the target are outside the timing. Images live in ``--dir`` (default
``/dev/shm`` when it is writable: the figures are then about the job, not the disk).

- trio_qemu: ``await vm.cmd("blockdev-mirror", ...)`` then ``await vm.run_job("m0")``, which
  follows ``JOB_STATUS_CHANGE`` and ``BLOCK_JOB_*`` events and sends ``job-complete`` the
  moment the job is ready.
- legacy polling (the older iotests' way): ``qemu.qmp.legacy.QEMUMonitorProtocol`` (what
  ``QEMUMachine`` uses), ``query-block-jobs`` every ``--poll`` seconds until the job is
  ready, ``block-job-complete``, then ``query-block-jobs`` every ``--poll`` seconds until
  the job is gone.
- 8 VMs at once (``--vms``): trio_qemu runs the 8 jobs in one nursery (``open_machines``);
  the legacy client drives each VM from a thread of its own, polling as above.

The variants are interleaved (``_common.interleave``): each round runs every variant once,
the order reversed every other round, after one uncounted warm-up round; a ratio is the
median over rounds of the ratio trio_qemu / legacy within a round (lower: trio_qemu is
faster). Results go to ``benchmarks/results/block_job.json``. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BASE_ARGS,
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
from trio_qemu.block import Drive
from trio_qemu.block import images as img

NAME = "block_job"
MIRROR = {"job-id": "m0", "device": "src", "target": "dst", "sync": "full"}
#: generous: a 256 MiB mirror takes well under a second on an idle machine
JOB_TIMEOUT = 600.0


def drives(source: Path, target: Path) -> list[Drive]:
    return [
        Drive(source, "qcow2", interface="none", node_name="src", read_only=True),
        Drive(target, "qcow2", interface="none", node_name="dst"),
    ]


def make_target(directory: Path, name: str, mib: int) -> Path:
    """An empty qcow2 target (made outside the timing, with qemu-img directly)."""
    path = directory / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{mib}M"], check=True)
    return path


# -- trio_qemu --------------------------------------------------------------------------------
async def _mirror(vm: trio_qemu.Machine) -> None:
    await vm.cmd("blockdev-mirror", MIRROR)
    info = await vm.run_job("m0", timeout=JOB_TIMEOUT)
    if info.status != "null" or info.current != info.total:
        raise RuntimeError(f"unexpected end of the job: {info}")


async def _trio_many(source: Path, targets: Sequence[Path]) -> float:
    configs = [
        trio_qemu.MachineConfig(args=BASE_ARGS, accel=None, drives=drives(source, target))
        for target in targets
    ]
    async with trio_qemu.open_machines(*configs) as vms:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for vm in vms:
                nursery.start_soon(_mirror, vm)
        return time.perf_counter() - start


def trio_jobs(source: Path, targets: Sequence[Path]) -> float:
    """One ``trio.run`` (its own start-up outside the timing) for the VMs of ``targets``."""
    return trio.run(_trio_many, source, targets)


# -- legacy polling ----------------------------------------------------------------------------
class LegacyVM:
    """QEMU started with ``Popen`` and driven by ``QEMUMonitorProtocol`` on a socketpair."""

    def __init__(self, source: Path, target: Path) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        blockdevs = []
        for drive in drives(source, target):
            blockdevs += ["-blockdev", json.dumps(drive.blockdev_options())]
        argv = [
            qemu_binary(), *BASE_ARGS, *blockdevs,
            "-chardev", f"socket,id=mon,fd={theirs.fileno()}", "-mon", "chardev=mon,mode=control",
        ]  # fmt: skip
        self.sock = ours
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
        )
        theirs.close()
        self.qmp = QEMUMonitorProtocol(ours)
        self.qmp.connect(negotiate=True)
        self.polls = 0

    def mirror(self, poll: float) -> None:
        self.qmp.cmd("blockdev-mirror", **MIRROR)
        while True:
            jobs: Any = self.qmp.cmd("query-block-jobs")
            self.polls += 1
            if jobs and jobs[0]["ready"]:
                break
            time.sleep(poll)
        self.qmp.cmd("block-job-complete", device="m0")
        while self.qmp.cmd("query-block-jobs"):
            self.polls += 1
            time.sleep(poll)

    def close(self) -> None:
        try:
            self.qmp.cmd("quit")
            self.proc.wait(30)
            with suppress(EOFError):  # as QEMUMachine does: QEMU hung up first
                self.qmp.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.sock.close()


def legacy_jobs(source: Path, targets: Sequence[Path], poll: float) -> tuple[float, int]:
    """The same jobs with the legacy client, each VM driven from a thread of its own (the
    client runs an asyncio loop per thread); returns (seconds, polls). Every VM is up and
    negotiated before the timing starts, and is quit after it ends."""
    count = len(targets)
    barrier = threading.Barrier(count + 1)
    ends: list[float] = []
    polls: list[int] = []
    errors: list[BaseException] = []

    def drive(target: Path) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        vm: LegacyVM | None = None
        try:
            try:
                vm = LegacyVM(source, target)
            finally:
                barrier.wait()
            vm.mirror(poll)
            ends.append(time.perf_counter())
            polls.append(vm.polls)
        except BaseException as exc:
            errors.append(exc)
        finally:
            if vm is not None:
                vm.close()
            loop.close()

    threads = [threading.Thread(target=drive, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(ends) - start, sum(polls)


# -- the run ---------------------------------------------------------------------------------
def _default_dir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 1 round each")
    parser.add_argument("--mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="single-VM rounds (default 5)")
    parser.add_argument("--vms", type=int, default=8, help="VMs at once (default 8)")
    parser.add_argument("--vms-rounds", type=int, default=3, help="rounds with --vms VMs")
    parser.add_argument("--poll", type=float, default=0.01, help="legacy poll interval, s")
    parser.add_argument("--dir", default=_default_dir(), help="where the images go")
    options = parser.parse_args()
    if options.quick:
        options.mib, options.rounds, options.vms_rounds = 32, 1, 1
    quiet_logging()
    qemu_binary()
    mib, poll, vms = options.mib, options.poll, options.vms
    note = interleave_note(options.rounds)
    with tempfile.TemporaryDirectory(prefix="trio-qemu-block-job-", dir=options.dir) as tmp:
        directory = Path(tmp)
        source = directory / "source.qcow2"
        print(f"making a {mib} MiB qcow2 image full of data in {directory} ...", flush=True)
        trio.run(img.create, source, "qcow2", f"{mib}M")
        trio.run(lambda: img.write_pattern(source, 0x5A, 0, f"{mib}M", fmt="qcow2", timeout=600))
        polls: dict[str, list[int]] = {"single": [], "many": []}

        def run(key: str) -> float:
            count = 1 if key.startswith("single") else vms
            targets = [make_target(directory, f"{key}{i}", mib) for i in range(count)]
            try:
                if key.endswith("trio"):
                    return trio_jobs(source, targets)
                took, n = legacy_jobs(source, targets, poll)
                polls["single" if count == 1 else "many"].append(n)
                return took
            finally:
                for target in targets:
                    target.unlink()

        print(f"mirror of {mib} MiB, blockdev-mirror to gone; {note}")
        single = interleave(["single trio", "single legacy"], options.rounds, run, say=print)
        print(f"{vms} VMs at once, each the same mirror")
        many = interleave(["many trio", "many legacy"], options.vms_rounds, run, say=print)

    results: dict[str, Any] = {}
    for label, samples in (*single.items(), *many.items()):
        results[label.replace(" ", "_")] = {
            "median_s": median(samples),
            "samples_s": samples,
            "mib_per_s": mib * (1 if label.startswith("single") else vms) / median(samples),
        }
    ratios = {
        "run_job / legacy polling, 1 VM": paired_ratio(
            single["single trio"], single["single legacy"]),
        f"run_job / legacy polling, {vms} VMs at once": paired_ratio(
            many["many trio"], many["many legacy"]),
    }  # fmt: skip
    print(f"\n  {'':34} {'median':>9} {'MiB/s':>8}")
    for key, row in results.items():
        print(f"  {key:34} {row['median_s'] * 1000:7.0f} ms {row['mib_per_s']:8.0f}")
    print(f"  legacy polls per job: {median([p / 1 for p in polls['single']]):.0f} (1 VM), "
          f"{median([p / vms for p in polls['many']]):.0f} ({vms} VMs)")  # fmt: skip
    print("\nratios (median over rounds of the ratio within a round; lower: trio_qemu faster):")
    print_ratios(ratios)
    path = write_results(
        NAME,
        {
            "params": {"mib": mib, "rounds": options.rounds, "vms": vms,
                       "vms_rounds": options.vms_rounds, "poll_s": poll,
                       "dir": options.dir, "quick": options.quick},
            "method": note,
            "results": results,
            "legacy_polls": polls,
            "ratios": ratios,
        },
    )  # fmt: skip
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
