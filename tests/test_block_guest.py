"""The tiny guest with a data disk: /dev/vda, mke2fs and mount in the guest, and its data
surviving an active commit into the base image, checked from the host (one boot)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from trio_qemu.block import Drive
from trio_qemu.block import images as img
from trio_qemu.guest import GuestImage
from trio_qemu.pytest_plugin import MachineFactory

#: 64 KiB of 0xab written at 12 MiB, past the 8 MiB file system
PATTERN = (
    "head -c 65536 /dev/zero | tr '\\000' '\\253' | dd of=/dev/vda bs=65536 seek=192 conv=fsync"
)


def test_disks_become_virtio_drives_and_load_the_file_system_driver(
    tiny_guest: GuestImage,
) -> None:
    config = tiny_guest.config(disks=["data.qcow2", Drive("x.raw", "raw", id="other")])
    assert [(d.file, d.format, d.id) for d in config.drives] == [
        ("data.qcow2", "qcow2", "disk0"),
        ("x.raw", "raw", "other"),
    ]
    assert "trio.modules=virtio_blk,crc32c_generic,ext4" in (config.append or "")
    assert "trio.modules" not in (tiny_guest.config().append or "")
    merged = tiny_guest.config(disks=["d.qcow2"], append="console=ttyS0 trio.modules=e1000")
    assert merged.append == "console=ttyS0 trio.modules=e1000,virtio_blk,crc32c_generic,ext4"


async def test_guest_data_survives_an_active_commit_into_the_base_image(
    machine: MachineFactory, tiny_guest: GuestImage, tmp_path: Path
) -> None:
    base = await img.create(tmp_path / "base.qcow2", "qcow2", "16M")
    top = await img.create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    vm = await machine(tiny_guest.config(disks=[top]), guest=True)
    run = partial(vm.shell.run, check=True, timeout=60)

    await run("mke2fs -q /dev/vda 8192 >/dev/null && mkdir -p /mnt && mount /dev/vda /mnt")
    await run("echo kept > /mnt/file && umount /mnt")
    await run(PATTERN)

    async with vm.start_job("block-commit", job_id="commit0", device="disk0") as job:
        info = await job.run()  # active layer: ready, then job-complete pivots to the base
    assert info.status == "null" and "ready" in info.statuses

    # The guest now reads the base image: its file system and file are there.
    await run("echo 3 > /proc/sys/vm/drop_caches && mount /dev/vda /mnt")
    assert (await run("cat /mnt/file")).stdout == b"kept\n"
    await run("umount /mnt")
    await vm.shutdown()

    await img.verify_pattern(base, 0xAB, "12M", "64k", fmt="qcow2")
    assert (await img.check(base)).ok
    assert (await img.info(base)).backing_filename is None
