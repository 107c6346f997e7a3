"""``qemu-img``/``qemu-io`` from Trio (trio_qemu.block.images) and the pure Drive values,
against the real tools: a few MiB images in the test's own directory."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import trio

from trio_qemu import ImageError, ImageTimeout, MachineConfig
from trio_qemu.block import Drive
from trio_qemu.block import images as img


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a leftover qemu-img)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


async def test_chain_commit_rebase_and_the_parsed_reports(tmp_path: Path) -> None:
    base = await img.create(tmp_path / "base.qcow2", "qcow2", "4M")
    top = await img.create(tmp_path / "top.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    await img.write_pattern(top, 0xAB, "1M", "64k", fmt="qcow2")
    await img.verify_pattern(top, 0xAB, "1M", 65536, fmt="qcow2")

    chain = await img.backing_chain(top)
    assert [(i.format, i.virtual_size) for i in chain] == [("qcow2", 4 << 20)] * 2
    assert chain[0].backing_filename == "base.qcow2" and chain[0].backing_format == "qcow2"
    assert chain[0].full_backing_filename == str(base) and chain[1].backing_filename is None
    extents = await img.map(top, fmt="qcow2")
    data = [e for e in extents if e.data]
    assert [(e.start, e.length, e.depth) for e in data] == [(1 << 20, 65536, 0)]
    assert (await img.check(top)).ok

    await img.commit(top)  # into base.qcow2
    await img.verify_pattern(base, 0xAB, "1M", "64k", fmt="qcow2")
    copy = await img.convert(base, tmp_path / "copy.raw", fmt="qcow2", target_fmt="raw")
    assert await img.compare(base, copy, fmt="qcow2", second_fmt="raw")
    await img.write_pattern(copy, 0x01, 0, 512, fmt="raw")
    assert not await img.compare(base, copy, fmt="qcow2", second_fmt="raw")

    await img.rebase(top, None, unsafe=True)
    assert (await img.info(top)).backing_filename is None
    await img.resize(base, "+1M", fmt="qcow2")
    assert (await img.info(base, fmt="qcow2")).virtual_size == 5 << 20
    measured = await img.measure(size="64M")
    assert 0 < measured.required < measured.fully_allocated
    assert (await img.measure(path=base, fmt="qcow2")).required >= 65536
    assert "wrote 512/512 bytes" in await img.io(copy, "write -P 0x02 0 512", fmt="raw")


async def test_tool_failures_carry_the_tools_message_and_command_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    with pytest.raises(ImageError, match="No such file or directory") as caught:
        await img.info(missing)
    assert caught.value.returncode == 1 and str(missing) in caught.value.argv
    assert "command line: qemu-img info" in str(caught.value)

    raw = await img.create(tmp_path / "disk.raw", "raw", "1M")
    with pytest.raises(ImageError, match="Image is not in qcow2 format"):
        await img.info(raw, fmt="qcow2")
    await img.write_pattern(raw, 0x11, 0, "4k", fmt="raw")
    with pytest.raises(ImageError, match="Pattern verification failed at offset 0"):
        await img.verify_pattern(raw, 0x22, 0, "4k", fmt="raw")
    with pytest.raises(ImageError, match='qemu-io: command "bogus" not found'):
        await img.io(raw, "bogus", fmt="raw")


async def test_a_backing_loop_is_named(tmp_path: Path) -> None:
    await img.create(tmp_path / "a.qcow2", "qcow2", "1M")
    await img.create(tmp_path / "b.qcow2", backing="a.qcow2", backing_fmt="qcow2")
    await img.rebase(tmp_path / "a.qcow2", "b.qcow2", backing_fmt="qcow2", unsafe=True)
    with pytest.raises(ImageError, match="creates an infinite loop"):
        await img.backing_chain(tmp_path / "b.qcow2")


async def test_bad_arguments_are_refused_before_anything_runs(tmp_path: Path) -> None:
    target = tmp_path / "x.qcow2"
    with pytest.raises(ValueError, match="size is required"):
        await img.create(target, "qcow2")
    with pytest.raises(ValueError, match="backing_fmt is required"):
        await img.create(target, backing="base.qcow2")
    with pytest.raises(ValueError, match="format name"):
        await img.create(target, "qcow2 -o x", "1M")
    with pytest.raises(TypeError, match="number of bytes"):
        await img.create(target, "qcow2", True)
    with pytest.raises(ValueError, match="byte value"):
        await img.write_pattern(target, 256, 0, 1)
    assert os.listdir(tmp_path) == []


async def test_cancelled_or_timed_out_qemu_img_leaves_no_image(tmp_path: Path) -> None:
    # Full preallocation makes qemu-img write 2 GiB of zeroes: it is killed long before.
    slow = {"preallocation": "full"}
    with trio.move_on_after(0.3) as scope:
        await img.create(tmp_path / "cancelled.raw", "raw", "2G", options=slow)
    assert scope.cancelled_caught
    with pytest.raises(ImageTimeout, match=r"did not finish within 0\.3 s; it was killed"):
        await img.create(tmp_path / "late.raw", "raw", "2G", options=slow, timeout=0.3)
    assert os.listdir(tmp_path) == []  # neither the final names nor the temporary ones
    assert processes_naming(str(tmp_path)) == []


def test_drives_are_validated_and_become_blockdev_and_device_options() -> None:
    config = MachineConfig(
        machine="q35",
        drives=[
            Drive("/imgs/a,b.qcow2", "qcow2", serial="S1", options={"cache.direct": True}),
            Drive("cd.iso", "raw", interface="scsi-cd", id="cd0", read_only=True),
            Drive(interface="ide-cd", id="cd1"),
            Drive(interface="floppy", id="fd0"),
            Drive("s.raw", "raw", interface="scsi-hd", node_name="s", snapshot=True),
            Drive(None, "null-co", interface="none", node_name="n0", options={"size": 4096}),
        ],
    )
    argv = config.argv()
    pairs = list(itertools.pairwise(argv))
    blockdevs = [json.loads(v) for k, v in pairs if k == "-blockdev"]
    assert blockdevs == [
        {"driver": "qcow2", "node-name": "drive0", "cache": {"direct": True},
         "file": {"driver": "file", "filename": "/imgs/a,b.qcow2"}},
        {"driver": "raw", "node-name": "cd0", "read-only": True,
         "file": {"driver": "file", "filename": "cd.iso"}},
        {"driver": "null-co", "node-name": "n0", "size": 4096},
    ]  # fmt: skip
    devices = [v for k, v in pairs if k == "-device"]
    assert devices == [
        "virtio-scsi-pci,id=trio-scsi",
        "isa-fdc,id=trio-fdc",
        "virtio-blk-pci,id=drive0,drive=drive0,serial=S1",
        "scsi-cd,id=cd0,bus=trio-scsi.0,drive=cd0",
        "ide-cd,id=cd1",
        "floppy,id=fd0",
        "scsi-hd,id=drive4,bus=trio-scsi.0,drive=s",
    ]
    assert (
        "-drive",
        "if=none,id=s,driver=raw,file.driver=file,file.filename=s.raw,snapshot=on",
    ) in pairs
    assert "isa-fdc,id=trio-fdc" not in config.replace(machine="pc").argv()
    assert hash(config) == hash(config.replace())
    assert Drive.from_path("x.img", id="d") == Drive("x.img", "raw", id="d")


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: Drive("a.qcow2"), "needs a format"),
        (lambda: Drive(interface="virtio"), "empty removable drive"),
        (lambda: Drive("a", "qcow2", interface="sata"), "Drive.interface must be one of"),
        (lambda: Drive("a", "qcow2", node_name="9x"), "Drive.node_name must start with a letter"),
        (lambda: Drive("a", "qcow2", node_name="n" * 32), "at most 31 characters"),
        (lambda: Drive("a", "qcow2", options={"node-name": "x"}), "must not set 'node-name'"),
        (lambda: Drive("a", "qcow2", id="trio-scsi"), "controller trio_qemu adds"),
        (lambda: Drive.from_path("disk.bin"), "cannot tell the format"),
        (lambda: MachineConfig(drives=[Drive("a", "raw"), Drive("b", "raw", id="drive0")]),
         r"MachineConfig.drives\[1\] has the id 'drive0' of MachineConfig.drives\[0\]"),
        (lambda: MachineConfig(drives=["a.qcow2"]),  # type: ignore[list-item]
         r"MachineConfig.drives\[0\] must be a Drive"),
    ],
)  # fmt: skip
def test_bad_drives_are_refused_naming_the_field(make: object, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        make()  # type: ignore[operator]
