"""shell.copy_to / copy_from on clones of the tiny guest: exact bytes and modes both ways, a
directory both ways, bounded memory, cancellation and timeouts leaving nothing under the
final name, clear errors for wrong paths, and the shell usable afterwards."""

from __future__ import annotations

import os
import stat
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from trio_qemu import CopyError, Machine, ShellTimeout

#: every byte value, then some random ones: no byte may be mangled on the way
DATA = bytes(range(256)) * 1000 + os.urandom(333_333)


async def guest_ls(vm: Machine, directory: str) -> list[str]:
    result = await vm.shell.run(f"ls -A {directory}", check=True)
    return result.stdout.decode().split()


async def test_bytes_and_files_both_ways_exactly_with_modes(
    fresh_guest: Machine, tmp_path: Path
) -> None:
    shell = fresh_guest.shell
    seen: list[tuple[int, int | None]] = []
    await shell.copy_to(DATA, "/root/data.bin", mode=0o640, progress=lambda *a: seen.append(a))
    assert seen[-1] == (len(DATA), len(DATA)) and len(seen) > 1
    result = await shell.run("stat -c '%a %s' /root/data.bin; ls -A /root", check=True)
    assert result.stdout == f"640 {len(DATA)}\ndata.bin\n".encode()  # no temporary file left
    assert await shell.copy_from("/root/data.bin") == DATA

    await shell.copy_from("/root/data.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == DATA
    assert stat.S_IMODE(os.stat(tmp_path / "back.bin").st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["back.bin"]

    script = tmp_path / "run.sh"
    script.write_bytes(b"#!/bin/sh\necho ran\n")
    os.chmod(script, 0o751)
    await shell.copy_to(script, "/root/run.sh")  # the host file's mode by default
    result = await shell.run("stat -c %a /root/run.sh && /root/run.sh", check=True)
    assert result.stdout == b"751\nran\n"
    await shell.copy_to(b"", "/root/run.sh")  # replaces; an empty file is fine
    assert await shell.copy_from("/root/run.sh") == b""


async def test_a_directory_both_ways(fresh_guest: Machine, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "sub" / "deeper" / ("long-name-" * 12)).write_bytes(DATA[:5000])
    (source / "empty").write_bytes(b"")
    (source / "exe").write_bytes(b"#!/bin/sh\n")
    os.chmod(source / "exe", 0o700)
    os.chmod(source / "sub", 0o750)
    os.symlink("exe", source / "link")
    shell = fresh_guest.shell
    await shell.copy_to(source, "/root/tree")
    listing = await shell.run(
        "cd /root/tree && find . | sort && stat -c '%a' exe sub && readlink link", check=True
    )
    assert listing.stdout.decode().split() == [
        ".", "./empty", "./exe", "./link", "./sub", "./sub/deeper",
        "./sub/deeper/" + "long-name-" * 12, "700", "750", "exe",
    ]  # fmt: skip
    assert await guest_ls(fresh_guest, "/root") == ["tree"]

    await shell.copy_from("/root/tree", tmp_path / "back")
    back = tmp_path / "back"
    assert (back / "sub" / "deeper" / ("long-name-" * 12)).read_bytes() == DATA[:5000]
    assert stat.S_IMODE(os.stat(back / "exe").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(back / "sub").st_mode) == 0o750
    assert os.readlink(back / "link") == "exe"
    assert sorted(os.listdir(tmp_path)) == ["back", "tree"]


async def test_wrong_paths_are_clear_errors_and_the_shell_stays_usable(
    fresh_guest: Machine, tmp_path: Path
) -> None:
    shell = fresh_guest.shell
    with pytest.raises(CopyError, match="/nope: no such file or directory"):
        await shell.copy_from("/nope")
    with pytest.raises(CopyError, match="/etc: is a directory: give dst="):
        await shell.copy_from("/etc")
    with pytest.raises(CopyError, match="/etc: is a directory"):
        await shell.copy_to(b"x", "/etc")
    with pytest.raises(CopyError, match="exists, not a regular file"):
        await shell.copy_to(b"x", "/dev/null")
    with pytest.raises(CopyError, match="no such directory: /nodir"):
        await shell.copy_to(b"x", "/nodir/x")
    with pytest.raises(CopyError, match="already exists"):
        await shell.copy_to(tmp_path, "/etc")
    with pytest.raises(CopyError, match="no such file or directory"):
        await shell.copy_to(tmp_path / "missing", "/root/x")
    with pytest.raises(CopyError, match="is a directory"):
        await shell.copy_from("/etc/passwd", tmp_path)
    with pytest.raises(ValueError, match="guest_path"):
        await shell.copy_to(b"x", "/root/")
    assert (await shell.run("echo still here; ls -A /root /dev/null", check=True)).stdout == (
        b"still here\n/dev/null\n\n/root:\n"
    )


async def test_an_interrupted_copy_leaves_nothing_under_the_final_name(
    fresh_guest: Machine, tmp_path: Path
) -> None:
    """Cancelled, or out of time, mid-stream: neither the destination nor a temporary file
    remains, in the guest or on the host."""
    shell = fresh_guest.shell
    await shell.copy_to(b"old contents", "/root/keep")
    started = trio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield DATA
        started.set()
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shell.copy_to, stalls(), "/root/new")
            nursery.start_soon(shell.copy_to, stalls(), "/root/keep")
            await started.wait()
            await trio.sleep(0.2)  # let some of it reach the guest's temporary file
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert await guest_ls(fresh_guest, "/root") == ["keep"]
    assert await shell.copy_from("/root/keep") == b"old contents"

    with pytest.raises(ShellTimeout, match=r"took longer than 0\.5 s"):
        await shell.copy_to(stalls(), "/root/new", timeout=0.5)
    assert await guest_ls(fresh_guest, "/root") == ["keep"]

    await shell.run("dd if=/dev/zero of=/root/big bs=1M count=30 2>/dev/null", check=True)
    with trio.move_on_after(0.3):
        await shell.copy_from("/root/big", tmp_path / "big")
    assert os.listdir(tmp_path) == []
    assert (await shell.run("echo ok")).stdout == b"ok\n"


async def test_copies_stream_with_bounded_memory(fresh_guest: Machine, tmp_path: Path) -> None:
    """32 MiB each way through a host process that allocates a small fraction of it."""
    size = 32 << 20
    piece = os.urandom(1 << 20)

    async def generated() -> AsyncIterator[bytes]:
        for _ in range(size >> 20):
            yield piece

    shell = fresh_guest.shell
    tracemalloc.start()
    try:
        await shell.copy_to(generated(), "/root/big", verify=False, timeout=120)
        await shell.copy_from("/root/big", tmp_path / "big", verify=False, timeout=120)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "big").stat().st_size == size
    print(f"peak {peak / 2**20:.1f} MiB traced")
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB traced"
