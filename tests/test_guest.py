"""The tiny test guest: the cpio writer, building and caching, and booting it under QEMU.

The builds here go into fresh temporary cache directories (downloading the two .deb files
once per module into a shared directory); the boot tests use the guest from the user's
cache (``build_guest()``, built once if needed), like the pytest plugin will.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from trio_qemu import ConsoleFailure, MachineConfig, MachineError, open_machine
from trio_qemu._errors import GuestBuildError
from trio_qemu._shell import SHELL_AGENT_PATH, SHELL_AGENT_SCRIPT, Shell
from trio_qemu.guest import (
    GUEST_ARGS,
    READY_MARKER,
    GuestImage,
    build_guest,
    default_cache_dir,
    ensure_guest,
    render_init,
)
from trio_qemu.guest.cpio import CpioWriter

BOOT_TIMEOUT = 60.0
PROMPT = b"trio-guest:/# "


# --- a tiny cpio reader, independent of the writer -------------------------------------------


@dataclass
class Entry:
    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int]
    nlink: int
    ino: int


def read_cpio(blob: bytes) -> list[Entry]:
    """Parse a newc archive strictly (alignment, magic, trailer), as the kernel would."""
    entries: list[Entry] = []
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _uid, _gid, nlink, _mtime, size = fields[:7]
        rdev = (fields[9], fields[10])
        namesize = fields[11]
        name_start = pos + 110
        name = blob[name_start : name_start + namesize - 1].decode()
        assert blob[name_start + namesize - 1] == 0
        pos = (name_start + namesize + 3) & ~3
        data = blob[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(blob), "bytes after the trailer"
            return entries
        entries.append(Entry(name, mode, data, rdev, nlink, ino))


def test_cpio_round_trip() -> None:
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        cpio.directory("bin")
        cpio.file("bin/hello", b"#!/bin/sh\necho hi\n", mode=0o755)
        cpio.file("odd", bytes(range(256)) * 3 + b"x")  # a size that needs padding
        cpio.file("empty", b"")
        cpio.symlink("bin/sh", "/bin/busybox")
        cpio.char_device("console", 5, 1)
        cpio.directory("/tmp", mode=0o1777)  # a leading slash is dropped
    blob = out.getvalue()
    assert len(blob) == cpio.size and len(blob) % 4 == 0
    entries = {e.name: e for e in read_cpio(blob)}
    assert list(entries) == ["bin", "bin/hello", "odd", "empty", "bin/sh", "console", "tmp"]
    assert stat.S_ISDIR(entries["bin"].mode) and entries["bin"].nlink == 2
    assert entries["bin/hello"].mode == stat.S_IFREG | 0o755
    assert entries["bin/hello"].data == b"#!/bin/sh\necho hi\n"
    assert entries["odd"].data == bytes(range(256)) * 3 + b"x"
    assert entries["empty"].data == b""
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISCHR(entries["console"].mode) and entries["console"].rdev == (5, 1)
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert len({e.ino for e in entries.values()}) == len(entries)


def test_cpio_is_read_by_busybox(tmp_path: Path) -> None:
    """busybox cpio (what a guest would use) lists and extracts what we write."""
    archive = tmp_path / "a.cpio"
    with open(archive, "wb") as file, CpioWriter(file) as cpio:
        cpio.directory("d")
        cpio.file("d/data", bytes(range(256)))
        cpio.symlink("d/link", "data")
    listing = subprocess.run(
        ["busybox", "cpio", "-t", "-F", str(archive)], check=True, capture_output=True
    )
    assert listing.stdout.split() == [b"d", b"d/data", b"d/link"]
    target = tmp_path / "x"
    target.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d", "-F", str(archive)],
        check=True,
        capture_output=True,
        cwd=target,
    )
    assert (target / "d" / "data").read_bytes() == bytes(range(256))
    assert os.readlink(target / "d" / "link") == "data"


def test_cpio_rejects_bad_entries() -> None:
    cpio = CpioWriter(io.BytesIO())
    cpio.file("a", b"")
    with pytest.raises(ValueError, match="duplicate"):
        cpio.file("a", b"")
    with pytest.raises(ValueError, match="invalid"):
        cpio.file("", b"")
    with pytest.raises(ValueError, match="invalid"):
        cpio.file("TRAILER!!!", b"")
    cpio.close()
    cpio.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        cpio.file("b", b"")


# --- pure parts of the guest module -------------------------------------------------------


def test_guest_image_config() -> None:
    image = GuestImage(kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.cpio"), version="v")
    config = image.config()
    assert isinstance(config, MachineConfig)
    assert (config.machine, config.memory, config.console, config.shell) == ("q35", 256, True, True)
    assert (config.kernel, config.initrd) == ("/k/vmlinux", "/k/initrd.cpio")
    assert config.append == image.append and "console=ttyS0" in image.append
    assert tuple(config.args) == GUEST_ARGS
    assert GUEST_ARGS == (
        "-nodefaults", "-no-reboot", "-cpu", "qemu64,+rdrand", "-device", "vmgenid"
    )  # fmt: skip
    changed = image.config(memory=128, name="g1", args=[*GUEST_ARGS, "-nic", "none"])
    assert (changed.memory, changed.name) == (128, "g1")
    assert changed.args == (*GUEST_ARGS, "-nic", "none")
    with pytest.raises(TypeError, match="no field"):
        image.config(bogus=1)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRIO_QEMU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "trio-qemu"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "trio-qemu"
    monkeypatch.setenv("TRIO_QEMU_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_guest_scripts_parse() -> None:
    """``sh -n`` accepts /init and the shell agent; no placeholder is left unfilled."""
    init = render_init()
    assert "@" not in re.sub(r"\$@|\"\$@\"", "", init)
    assert READY_MARKER in init and init.rstrip().endswith("exec /bin/busybox init")
    for script in (init, SHELL_AGENT_SCRIPT):
        subprocess.run(["busybox", "sh", "-n"], input=script.encode(), check=True)


# --- building and caching -----------------------------------------------------------------


@dataclass
class FreshBuild:
    image: GuestImage
    cache: Path
    debs: Path
    messages: list[str]
    seconds: float


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory: pytest.TempPathFactory) -> FreshBuild:
    """One build from nothing into an empty cache (the .deb files kept for other builds)."""
    cache = tmp_path_factory.mktemp("cache")
    debs = tmp_path_factory.mktemp("debs")
    messages: list[str] = []
    start = time.monotonic()
    image = trio.run(
        lambda: ensure_guest(cache_dir=cache, progress=messages.append, _download_dir=debs)
    )
    return FreshBuild(image, cache, debs, messages, time.monotonic() - start)


def test_build_from_nothing(fresh_build: FreshBuild) -> None:
    image, messages = fresh_build.image, fresh_build.messages
    text = "\n".join(messages)
    print(f"build from nothing: {fresh_build.seconds:.1f} s\n{text}")
    assert re.search(r"downloading linux-image-\S+ \S+ \([\d.]+ MB\)", text)
    assert "extracting" in text and "building the initramfs" in text
    assert image.kernel.parent == fresh_build.cache / "guest" / image.version
    assert image.kernel.read_bytes()[:4] == b"\x7fELF"
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", image.kernel_release)
    assert not [p for p in (fresh_build.cache / "guest").iterdir() if p.name.startswith(".")]


def test_initramfs_contents(fresh_build: FreshBuild) -> None:
    entries = {e.name: e for e in read_cpio(fresh_build.image.initrd.read_bytes())}
    release = fresh_build.image.kernel_release
    assert entries["init"].mode & 0o111 and entries["init"].data.decode() == render_init()
    assert entries[SHELL_AGENT_PATH.lstrip("/")].data.decode() == SHELL_AGENT_SCRIPT
    assert entries["bin/busybox"].data[:4] == b"\x7fELF"
    assert entries["bin/sh"].data == b"/bin/busybox"
    assert entries["dev/console"].rdev == (5, 1)
    inittab = entries["etc/inittab"].data.decode()
    assert f"::once:{SHELL_AGENT_PATH} /dev/virtio-ports/org.trio-qemu.shell\n" in inittab
    assert "::respawn:/bin/cttyhack /bin/sh -l\n" in inittab
    assert "::respawn:/bin/trio-relay org.trio-qemu.relay\n" in inittab
    assert fresh_build.image.relay and entries["bin/trio-relay"].data[:4] == b"\x7fELF"
    depmod = entries[f"lib/modules/{release}/modules.dep"].data.decode()
    for module in ("virtio_console", "virtio_pci", "virtio_net", "e1000", "9pnet_virtio"):
        assert re.search(rf"/{module}\.ko:", depmod), module
    # dependencies came along: virtio_net needs net_failover, which needs failover
    assert re.search(r"virtio_net\.ko:.*net_failover\.ko", depmod)
    modules = [n for n in entries if n.endswith(".ko")]
    assert all(f"lib/modules/{release}/{n.split('/', 3)[3]}" in entries for n in modules)
    assert len(fresh_build.image.initrd.read_bytes()) < 12 << 20


def file_identities(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` -> (inode, mtime in ns): a rewrite or a rename changes it."""
    return {
        path: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


async def test_cache_is_reused(fresh_build: FreshBuild) -> None:
    guests = fresh_build.cache / "guest"
    before = file_identities(guests)
    assert fresh_build.image.kernel in before and fresh_build.image.initrd in before
    messages: list[str] = []
    start = time.monotonic()
    again = await ensure_guest(cache_dir=fresh_build.cache, progress=messages.append)
    print(f"cached ensure_guest: {time.monotonic() - start:.2f} s")
    assert again == fresh_build.image
    assert messages == []  # nothing built, nothing downloaded
    assert file_identities(guests) == before  # the cached files themselves, untouched


async def test_concurrent_builders(fresh_build: FreshBuild, tmp_path: Path) -> None:
    """Two builders racing into one empty cache: both get the same complete guest."""
    images: list[GuestImage] = []
    messages: list[str] = []

    async def build() -> None:
        images.append(
            await ensure_guest(
                cache_dir=tmp_path, progress=messages.append, _download_dir=fresh_build.debs
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(build)
        nursery.start_soon(build)
    assert len(images) == 2 and images[0] == images[1]
    assert images[0].version == fresh_build.image.version
    assert [p.name for p in (tmp_path / "guest").iterdir()] == [images[0].version]
    assert images[0].initrd.read_bytes() == fresh_build.image.initrd.read_bytes()
    assert images[0].kernel.stat().st_size == fresh_build.image.kernel.stat().st_size
    # Both built (a build takes seconds, asking apt a fraction); the loser used the winner's.
    building = f"building the tiny guest {images[0].version} in {tmp_path / 'guest'}"
    assert messages.count(building) == 2
    assert messages.count("another process finished the same guest first; using its copy") == 1


async def test_missing_tools(
    fresh_build: FreshBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without apt: a clear error naming the way out, or the cached guest if there is one."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestBuildError, match=r"(?s)apt-cache is not installed.*kernel=") as info:
        await ensure_guest(cache_dir=tmp_path / "cache")
    assert isinstance(info.value, MachineError)
    messages: list[str] = []
    cached = await ensure_guest(cache_dir=fresh_build.cache, progress=messages.append)
    assert cached == fresh_build.image
    assert "using" in messages[0]


async def test_missing_dpkg_deb(
    fresh_build: FreshBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt works but dpkg-deb is missing: a clear error, and no half-built guest left."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("apt-cache", "apt-get"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))
    cache = tmp_path / "cache"
    with pytest.raises(GuestBuildError, match=r"(?s)dpkg-deb is not installed.*kernel="):
        await ensure_guest(cache_dir=cache, _download_dir=fresh_build.debs)
    assert list((cache / "guest").iterdir()) == []


# --- booting the guest ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    """The tiny guest from the user's cache (built once if needed)."""
    return build_guest()


async def test_boot_to_ready_marker(guest: GuestImage, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    start = time.monotonic()
    async with open_machine(guest.config(console_log=log)) as vm:
        await vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        print(f"boot to ready marker: {time.monotonic() - start:.2f} s")
        # An interactive shell runs on the console after the marker, with job control:
        # Ctrl-C interrupts the foreground command.
        await vm.console.wait_for(PROMPT, timeout=30)
        await vm.console.send_line("sleep 300; echo not interrupted")
        # ^C typed while the shell still reads its line would be just a character: wait
        # (through the shell channel) until sleep runs in the foreground.
        shell = Shell(vm.channel("shell"))
        await shell.run("until pidof sleep; do usleep 10000; done", timeout=30, check=True)
        await vm.console.write(b"\x03")
        await vm.console.wait_for(PROMPT, timeout=30)
        await vm.console.send_line("echo $((6 * 7)); tty")
        await vm.console.wait_for(b"42\r\n/dev/ttyS0", timeout=30)
    text = log.read_bytes()
    assert READY_MARKER.encode() in text and b"42" in text
    assert b"not interrupted" not in text.replace(b"; echo not interrupted", b"")
    assert b"Kernel panic" not in text


async def test_wait_for_fail_pattern_on_boot_log(guest: GuestImage) -> None:
    async with open_machine(guest.config()) as vm:
        with pytest.raises(ConsoleFailure, match="fail pattern") as info:
            await vm.console.wait_for(
                b"this text never appears", fail=[READY_MARKER], timeout=BOOT_TIMEOUT
            )
        match = info.value.match
        assert isinstance(match, re.Match) and match.group() == READY_MARKER.encode()


async def test_poweroff_and_hooks(guest: GuestImage) -> None:
    """trio.* kernel command-line hooks apply; ``poweroff`` in the guest ends QEMU."""
    config = guest.config(
        append=f"{guest.append} trio.hostname=hooked trio.ip=10.0.2.15/24 trio.gw=10.0.2.2",
        args=[*GUEST_ARGS, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
    )
    async with open_machine(config) as vm:
        shell = Shell(vm.channel("shell"))
        await shell.wait_ready(timeout=BOOT_TIMEOUT)
        result = await shell.run("hostname; ip -4 addr show eth0; ip route; uname -r")
        out = result.stdout.decode()
        assert out.startswith("hooked\n")
        assert "inet 10.0.2.15/24" in out and "default via 10.0.2.2" in out
        assert guest.kernel_release in out
        await shell.run("(sleep 1; poweroff) >/dev/null 2>&1 &", check=True)
        assert await vm.wait(timeout=30) == 0
