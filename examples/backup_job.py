"""A full backup of a machine's disk as a block job, checked from the host with qemu-img.

A 64 MiB qcow2 disk gets 16 MiB of data (qemu-io), a machine opens it and an empty backup
image as block nodes (no guest needed: ``-machine none``), and ``blockdev-backup`` copies
one into the other at a limited speed, so the progress callback has something to show. The
job is started with ``auto-finalize=false``, as a backup that is part of a larger
operation would be: ``job.run()`` finalizes it when it waits in ``pending``. Then a second
backup goes to a target whose every write fails with "No space left on device" (QEMU's
``blkdebug`` driver), to show the error and that no job is left behind. Once the machine
has quit, ``qemu-img compare`` says whether the backup holds the same data as the disk.

Run: .venv/bin/python examples/backup_job.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import trio

import trio_qemu
from trio_qemu.block import Drive, JobInfo
from trio_qemu.block import images as img


def show(info: JobInfo) -> None:
    percent = f"{info.progress:.0%}" if info.progress is not None else "?"
    print(f"  {info.status:<8} {info.current >> 20:>3} of {info.total >> 20} MiB ({percent})")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="backup-job-") as tmp:
        disk = await img.create(Path(tmp, "disk.qcow2"), "qcow2", "64M")
        await img.write_pattern(disk, 0x5A, 0, "16M", fmt="qcow2")
        backup = await img.create(Path(tmp, "backup.qcow2"), "qcow2", "64M")
        full = await img.create(Path(tmp, "full.qcow2"), "qcow2", "64M")
        config = trio_qemu.MachineConfig(
            machine="none",
            args=["-nodefaults"],
            drives=[
                Drive(disk, "qcow2", interface="none", node_name="disk"),
                Drive(backup, "qcow2", interface="none", node_name="backup"),
            ],
        )
        async with trio_qemu.open_machine(config) as vm:
            print("backing up the 64 MiB disk (16 MiB of it data) at 32 MiB/s:")
            start = time.perf_counter()
            async with vm.start_job(
                "blockdev-backup",
                job_id="backup0",
                device="disk",
                target="backup",
                sync="full",
                speed=32 << 20,
                auto_finalize=False,
            ) as job:
                info = await job.run(on_progress=show, progress_interval=0.2, timeout=60)
            print(f"done in {time.perf_counter() - start:.2f} s; the job went through "
                  f"{' -> '.join(info.statuses)}")  # fmt: skip

            # A target that fills up: every write fails with ENOSPC.
            await vm.blockdev_add(
                driver="qcow2",
                node_name="full",
                file={
                    "driver": "blkdebug",
                    "inject-error": [{"event": "write_aio", "errno": 28}],
                    "image": {"driver": "file", "filename": str(full)},
                },
            )
            await vm.cmd("blockdev-backup", job_id="backup1", device="disk", target="full",
                         sync="full")  # fmt: skip
            try:
                await vm.run_job("backup1", timeout=60)
            except trio_qemu.JobError as exc:
                print(f"second backup: {exc}")
            print(f"jobs left: {await vm.query_jobs()}")

        same = await img.compare(disk, backup, fmt="qcow2", second_fmt="qcow2")
        print(f"qemu-img compare: the backup {'matches' if same else 'DIFFERS FROM'} the disk")
        await img.verify_pattern(backup, 0x5A, 0, "16M", fmt="qcow2")
        print("qemu-io: the backup holds the 16 MiB pattern")


if __name__ == "__main__":
    trio.run(main)
