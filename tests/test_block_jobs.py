"""Block jobs, nodes, devices and removable media against real QEMU, as QEMU's iotests
drive them (commit 040, mirror 041, the job state machine 219, removable media 118).

Jobs run on ``-machine none`` (no guest, ~25 ms to start) with 4 MiB qcow2 images; a job
is kept running with ``speed=``/``buf_size=`` (64 KiB/s: the 4 MiB would take a minute) and
let go with ``set_speed(0)``. Media need IDE and PCI: a guest-less q35, stopped (``-S``) so
that not even its firmware touches the drives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from trio_qemu import BlockError, BlockTimeout, JobError, JobTimeout, Machine, MachineConfig
from trio_qemu.block import Drive, JobInfo
from trio_qemu.block import images as img
from trio_qemu.pytest_plugin import MachineFactory

BARE = MachineConfig(machine="none", args=["-nodefaults"])
#: a mirror that stays "running" (64 KiB/s, 64 KiB at a time) until set_speed(0)
SLOW: dict[str, Any] = {"speed": 65536, "buf_size": 65536}
#: what a job goes through from start to gone, when nothing pauses it
DONE = ("waiting", "pending", "concluded", "null")


def node(path: Path, name: str, **fields: Any) -> Drive:
    return Drive(path, "qcow2", interface="none", node_name=name, **fields)


@pytest.fixture
async def disks(tmp_path: Path) -> dict[str, Path]:
    """src (4 MiB, 0xab in its first MiB) and empty dst and dst2 of the same size."""
    src = await img.create(tmp_path / "src.qcow2", "qcow2", "4M")
    await img.write_pattern(src, 0xAB, 0, "1M", fmt="qcow2")
    return {
        "src": src,
        "dst": await img.create(tmp_path / "dst.qcow2", "qcow2", "4M"),
        "dst2": await img.create(tmp_path / "dst2.qcow2", "qcow2", "4M"),
    }


async def bare_vm(machine: MachineFactory, disks: dict[str, Path]) -> Machine:
    return await machine(BARE, drives=[node(path, name) for name, path in disks.items()])


async def no_jobs_and_alive(vm: Machine) -> None:
    assert await vm.query_jobs() == []
    assert (await vm.cmd("query-status"))["running"] is True


def ends_done(info: JobInfo) -> bool:
    return info.status == "null" and info.statuses[-4:] == DONE


async def test_mirror_becomes_ready_then_completes_onto_the_target(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await bare_vm(machine, disks)
    async with vm.start_job(
        "blockdev-mirror", job_id="m0", device="src", target="dst", sync="full"
    ) as job:
        assert (await job.wait("ready")).status == "ready"
        ready = await job.query()  # events say little about progress; query-jobs does
        assert ready.type == "mirror" and ready.current == ready.total == 4 << 20
        info = await job.run()
    assert ends_done(info) and "ready" in info.statuses and info.error is None
    await no_jobs_and_alive(vm)
    await vm.shutdown()  # QEMU keeps qcow2 metadata cached until it closes the image
    await img.verify_pattern(disks["dst"], 0xAB, 0, "1M", fmt="qcow2")


async def test_run_job_loses_nothing_that_happened_before_it_was_called(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await bare_vm(machine, disks)
    # Already ready (iotests start jobs with vm.cmd, then wait).
    async with vm.subscribe("BLOCK_JOB_READY") as events:
        await vm.cmd("blockdev-mirror", job_id="m1", device="src", target="dst", sync="full")
        await events.receive()
    assert ends_done(await vm.run_job("m1"))
    # Already done and dismissed: found among the events nobody claimed.
    async with vm.subscribe("JOB_STATUS_CHANGE", match={"data": {"status": "null"}}) as events:
        await vm.cmd("blockdev-backup", job_id="b1", device="src", target="dst2", sync="full")
        await events.receive()
    info = await vm.run_job("b1")
    assert info.type == "backup" and ends_done(info)
    # Failed before the call: its error is not lost either.
    await vm.blockdev_add(await full_target(disks["src"].parent, "enospc"))
    async with vm.subscribe("JOB_STATUS_CHANGE", match={"data": {"status": "null"}}) as events:
        await vm.cmd("blockdev-backup", job_id="b2", device="src", target="enospc", sync="full")
        await events.receive()
    with pytest.raises(JobError, match="failed: No space left on device"):
        await vm.run_job("b2")
    with pytest.raises(JobError, match="no job 'b1'"):  # its events were consumed
        await vm.run_job("b1")
    await no_jobs_and_alive(vm)


async def test_commit_of_a_middle_layer_then_of_the_active_layer(
    machine: MachineFactory, tmp_path: Path
) -> None:
    base = await img.create(tmp_path / "base.qcow2", "qcow2", "4M")
    mid = await img.create(tmp_path / "mid.qcow2", backing=base, backing_fmt="qcow2")
    top = await img.create(tmp_path / "top.qcow2", backing=mid, backing_fmt="qcow2")
    await img.write_pattern(mid, 0x11, "1M", "64k", fmt="qcow2")
    await img.write_pattern(top, 0x22, "2M", "64k", fmt="qcow2")
    vm = await machine(BARE, drives=[
        node(base, "base"),
        node(mid, "mid", options={"backing": "base"}),
        node(top, "top", options={"backing": "mid"}),
    ])  # fmt: skip

    async with vm.start_job(
        "block-commit", job_id="c1", device="top", top_node="mid", base_node="base"
    ) as job:
        middle = await job.run()
    assert ends_done(middle) and "ready" not in middle.statuses  # ends by itself

    async with vm.start_job("block-commit", job_id="c2", device="top") as job:
        active = await job.run()  # an active commit is ready first, then completed
    assert ends_done(active) and "ready" in active.statuses
    await no_jobs_and_alive(vm)
    await vm.shutdown()
    await img.verify_pattern(base, 0x11, "1M", "64k", fmt="qcow2")
    await img.verify_pattern(base, 0x22, "2M", "64k", fmt="qcow2")


async def test_stream_pulls_the_backing_data_into_the_top_image(
    machine: MachineFactory, tmp_path: Path
) -> None:
    base = await img.create(tmp_path / "base.qcow2", "qcow2", "4M")
    top = await img.create(tmp_path / "top.qcow2", backing=base, backing_fmt="qcow2")
    await img.write_pattern(base, 0x33, 0, "128k", fmt="qcow2")
    vm = await machine(BARE, drives=[
        node(base, "base"), node(top, "top", options={"backing": "base"})])  # fmt: skip
    async with vm.start_job("block-stream", job_id="s1", device="top") as job:
        assert ends_done(await job.run())
    await no_jobs_and_alive(vm)
    await vm.shutdown()
    assert (await img.info(top)).backing_filename is None
    await img.verify_pattern(top, 0x33, 0, "128k", fmt="qcow2")


async def test_a_snapshot_drive_takes_writes_but_leaves_its_image_alone(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await machine(BARE, drives=[
        node(disks["src"], "src"), node(disks["dst"], "scratch", snapshot=True)])  # fmt: skip
    async with vm.start_job("blockdev-backup", device="src", target="scratch", sync="full") as job:
        assert ends_done(await job.run())
    await vm.shutdown()
    await img.verify_pattern(disks["dst"], 0x00, 0, "1M", fmt="qcow2")  # still empty
    assert (await img.map(disks["dst"], fmt="qcow2"))[0].data is False


async def test_backup_in_all_four_auto_finalize_auto_dismiss_modes(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await bare_vm(machine, disks)
    for auto_finalize in (True, False):
        for auto_dismiss in (True, False):
            async with vm.start_job(
                "blockdev-backup", device="src", target="dst", sync="full",
                auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
            ) as job:  # fmt: skip
                info = await job.run()
            assert ends_done(info), (auto_finalize, auto_dismiss, info)
            assert await vm.query_jobs() == []

    # By hand, as iotest 219 does: the job waits in pending, then in concluded.
    async with vm.start_job(
        "blockdev-backup", job_id="b9", device="src", target="dst", sync="full",
        auto_finalize=False, auto_dismiss=False,
    ) as job:  # fmt: skip
        assert (await job.wait("pending")).status == "pending"
        assert (await job.query()).status == "pending"  # it stays there
        await job.finalize()
        assert (await job.wait("concluded")).error is None
        await job.dismiss()
        assert (await job.wait("null")).status == "null"
    # A status the job only passes through is still seen by wait().
    async with vm.start_job(
        "blockdev-backup", device="src", target="dst", sync="full", speed=65536
    ) as job:
        await job.set_speed(0)
        assert (await job.wait("pending")).status == "pending"
        assert ends_done(await job.run())
    # run_job told nothing: QEMU's own flags (query-block-jobs) say what it must do. The
    # job started before run_job subscribed, so it may already be pending (a 4 MiB backup
    # is quick) and its statuses start from there; with neither flag set it can only end
    # if run_job finalized (concluded) and dismissed (null) it.
    await vm.cmd("blockdev-backup", job_id="b10", device="src", target="dst", sync="full",
                 auto_finalize=False, auto_dismiss=False)  # fmt: skip
    attached = await vm.run_job("b10")
    assert attached.status == "null" and attached.error is None, attached
    assert attached.statuses[-2:] == ("concluded", "null"), attached
    await no_jobs_and_alive(vm)


async def test_pause_resume_and_a_refused_verb_with_qemus_message(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await bare_vm(machine, disks)
    async with vm.start_job(
        "blockdev-mirror", job_id="job0", device="src", target="dst", sync="full", **SLOW
    ) as job:
        with pytest.raises(JobError) as refused:
            await job.complete()
        message = "Job 'job0' in state 'running' cannot accept command verb 'complete'"
        assert refused.value.desc == message and message in str(refused.value)
        assert refused.value.verb == "complete" and refused.value.job_id == "job0"
        await job.pause()
        assert (await job.wait("paused")).status == "paused"
        await job.resume()
        await job.wait("running")
        await job.set_speed(0)
        assert ends_done(await job.run())
    await no_jobs_and_alive(vm)


async def full_target(directory: Path, name: str) -> dict[str, Any]:
    """A new 4 MiB qcow2 node whose every write fails with ENOSPC (blkdebug)."""
    path = await img.create(directory / f"{name}.qcow2", "qcow2", "4M")
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 28}],
            "image": {"driver": "file", "filename": str(path)},
        },
    }


async def test_bad_input_and_faults_are_our_errors_and_leave_no_job(
    machine: MachineFactory, disks: dict[str, Path], tmp_path: Path
) -> None:
    vm = await bare_vm(machine, disks)
    with pytest.raises(BlockError, match=r"Could not open .*missing.qcow2.*No such file"):
        await vm.blockdev_add(Drive(tmp_path / "missing.qcow2", "qcow2", node_name="m"))
    raw = await img.create(tmp_path / "plain.raw", "raw", "1M")
    with pytest.raises(BlockError, match="Image is not in qcow2 format"):
        await vm.blockdev_add(Drive(raw, "qcow2", node_name="w"))
    with pytest.raises(BlockError, match="Duplicate nodes with node-name='src'") as dup:
        await vm.blockdev_add(driver="null-co", node_name="src")
    assert dup.value.command == "blockdev-add"
    await img.create(tmp_path / "a.qcow2", "qcow2", "1M")
    await img.create(tmp_path / "b.qcow2", backing="a.qcow2", backing_fmt="qcow2")
    await img.rebase(tmp_path / "a.qcow2", "b.qcow2", backing_fmt="qcow2", unsafe=True)
    with pytest.raises(
        BlockError, match=r"is a loop: qemu-img: Backing file .* creates an infinite loop"
    ):
        await vm.blockdev_add(Drive(tmp_path / "b.qcow2", "qcow2", node_name="loop"))

    with pytest.raises(JobError, match="Cannot find device='nope' nor node-name='nope'"):
        async with vm.start_job("blockdev-mirror", device="nope", target="dst", sync="full"):
            pass
    async with vm.start_job(
        "blockdev-mirror", job_id="busy", device="src", target="dst", sync="full", **SLOW
    ) as job:
        with pytest.raises(JobError, match="Node 'dst' is busy: block device is in use by"):
            async with vm.start_job("blockdev-backup", device="dst", target="dst2", sync="full"):
                pass
        await job.cancel()
    assert (await job.query()).status == "null"

    # The target fills up: QEMU's text, and the job is gone (dismissed when it waited).
    await vm.blockdev_add(await full_target(tmp_path, "full"))
    for extra in ({}, {"auto_dismiss": False}, {"on_target_error": "stop"}):
        with pytest.raises(
            JobError, match=r"No space left on device|stopped on a write error"
        ) as caught:
            async with vm.start_job(
                "blockdev-backup", device="src", target="full", sync="full", **extra
            ) as job:
                await job.run()
        assert caught.value.job_id == job.id
        await no_jobs_and_alive(vm)


async def test_a_timeout_or_a_cancellation_cancels_the_job_and_waits_for_it(
    machine: MachineFactory, disks: dict[str, Path]
) -> None:
    vm = await bare_vm(machine, disks)
    progress: list[JobInfo] = []
    await vm.cmd("blockdev-mirror", job_id="t1", device="src", target="dst", sync="full", **SLOW)
    with pytest.raises(JobTimeout, match=r"'t1' .* waited 1.0 s to end .*; it was cancelled"):
        await vm.run_job("t1", timeout=1.0, on_progress=progress.append, progress_interval=0.1)
    assert progress and all(p.total == 4 << 20 and p.status == "running" for p in progress)
    await no_jobs_and_alive(vm)

    await vm.cmd("blockdev-mirror", job_id="t2", device="src", target="dst", sync="full", **SLOW)
    with trio.move_on_after(0.3) as scope:
        await vm.run_job("t2")
    assert scope.cancelled_caught
    await no_jobs_and_alive(vm)

    with trio.move_on_after(0.3) as scope:
        async with vm.start_job(
            "blockdev-mirror", job_id="t3", device="src", target="dst", sync="full", **SLOW
        ) as job:
            await job.wait("ready")
    assert scope.cancelled_caught and (await job.query()).status == "null"
    await no_jobs_and_alive(vm)


async def test_removable_media_on_ide_cd_and_scsi_cd_and_device_del(
    machine: MachineFactory, tmp_path: Path
) -> None:
    one = await img.create(tmp_path / "one.raw", "raw", "1M")
    two = await img.create(tmp_path / "two.qcow2", "qcow2", "1M")
    root_port = ["-device", "pcie-root-port,id=rp1,chassis=1"]  # a slot that hotplugs
    # -S: no guest code runs (SeaBIOS would probe the drives and load a CD-ROM's tray).
    vm = await machine(machine="q35", args=["-nodefaults", "-S", *root_port], drives=[
        Drive(one, "raw", interface="ide-cd", id="cd0", read_only=True),
        Drive(interface="scsi-cd", id="cd1"),
        Drive(interface="floppy", id="fd0"),
    ])  # fmt: skip

    async def medium(id: str) -> str | None:
        for entry in await vm.cmd("query-block"):
            if entry.get("qdev") == id:
                inserted = entry.get("inserted")
                return None if inserted is None else str(inserted["file"])
        raise AssertionError(id)

    for cd in ("cd0", "cd1"):  # ide-cd (with a medium) and scsi-cd (empty)
        assert await vm.tray_is_open(cd) is False
        await vm.open_tray(cd)
        assert await vm.tray_is_open(cd) is True
        await vm.open_tray(cd)  # already open: no event to wait for
        await vm.close_tray(cd)
        assert await vm.tray_is_open(cd) is False
        await vm.change_medium(cd, two, "qcow2", read_only=True)
        assert await vm.tray_is_open(cd) is False and await medium(cd) == str(two)
        await vm.eject(cd)
        assert await vm.tray_is_open(cd) is True and await medium(cd) is None

    # iotest 118's long way round: a node of our own into the open tray.
    await vm.blockdev_add(Drive(one, "raw", node_name="disc", read_only=True))
    await vm.insert_medium("cd1", "disc")
    await vm.close_tray("cd1")
    assert await medium("cd1") == str(one)
    await vm.open_tray("cd1")
    await vm.remove_medium("cd1")
    await vm.blockdev_del("disc")

    assert await vm.tray_is_open("fd0") is None  # a floppy has no tray: no events
    await vm.change_medium("fd0", one, "raw")
    assert await medium("fd0") == str(one)
    with pytest.raises(BlockError, match="no block device with id 'nope'"):
        await vm.open_tray("nope")

    # SCSI disks unplug at once: device_del returns on DEVICE_DELETED.
    await vm.blockdev_add(Drive(two, "qcow2", node_name="hd"))
    await vm.device_add("scsi-hd", id="hd1", drive="hd", bus="trio-scsi.0")
    await vm.device_del("hd1")
    with pytest.raises(BlockError, match="Device 'hd1' not found"):
        await vm.device_del("hd1")
    await vm.blockdev_del("hd")
    # A PCI disk with no guest to release it is never deleted: the wait runs out.
    await vm.blockdev_add(Drive(two, "qcow2", node_name="vd"))
    await vm.device_add("virtio-blk-pci", id="vd1", drive="vd", bus="rp1")
    with pytest.raises(BlockTimeout, match=r"'vd1' was not deleted within 0.2 s"):
        await vm.device_del("vd1", timeout=0.2)
