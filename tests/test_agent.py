"""The guest agent: the qemu-ga variant of the tiny guest, and GuestAgent against it.

The protocol tests run against a fake qemu-ga on a socketpair (stale data before the sync, an
agent that starts late, refusals, end of file). The rest boot the tiny guest built with
``agent=True`` (from the user's cache, built once if needed) and drive the real qemu-ga.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from qemu.qmp import ExecuteError

from trio_qemu import (
    GuestCommandError,
    Machine,
    MachineError,
    MachineExited,
    QMPConnectionClosed,
    open_machine,
)
from trio_qemu._errors import AgentError, AgentTimeout
from trio_qemu._transport import socketpair_stream
from trio_qemu.agent import GuestAgent, open_agent
from trio_qemu.guest import (
    _AGENT_INITTAB,
    _AGENT_WRAPPER_SCRIPT,
    _LINK_PORTS_SCRIPT,
    _SHUTDOWN_SCRIPT,
    AGENT_WRAPPER_PATH,
    GuestImage,
    _parse_ldd,
    build_guest,
    ensure_guest,
)

BOOT_TIMEOUT = 60.0


# --- a fake qemu-ga -----------------------------------------------------------------------


class FakeAgent:
    """Speaks qemu-ga's side of the wire on a socketpair end: requests are JSON objects with
    no separator; a 0xFF byte is answered with an id-less error, as qemu-ga does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.requests: list[dict[str, Any]] = []
        self.sentinels = 0
        self._buf = ""
        self._decoder = json.JSONDecoder()

    async def receive(self) -> dict[str, Any] | None:
        """The next request (None at EOF); each 0xFF before it is answered with an error."""
        while True:
            text = self._buf.lstrip()
            if text.startswith("\ufffd"):
                self.sentinels += 1
                self._buf = text[1:]
                await self.send(b'{"error": {"class": "GenericError", "desc": "stray"}}\n')
                continue
            try:
                obj, end = self._decoder.raw_decode(text)
            except ValueError:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self._buf = text + data.decode("utf-8", "replace")
                continue
            self._buf = text[end:]
            self.requests.append(obj)
            return dict(obj)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer_sync(self, request: dict[str, Any], before: bytes = b"") -> None:
        assert request["execute"] == "guest-sync-delimited"
        sync_id = request["arguments"]["id"]
        await self.send(before + b'\xff{"return": %d}\n' % sync_id)

    async def serve(self, handler: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Answer requests with ``handler``'s reply (None: no reply) until EOF."""
        while (request := await self.receive()) is not None:
            if request["execute"] == "guest-sync-delimited":
                await self.answer_sync(request)
                continue
            reply = handler(request)
            if reply is not None:
                reply["id"] = request["id"]
                await self.send(json.dumps(reply).encode() + b"\n")


def pong(request: dict[str, Any]) -> dict[str, Any] | None:
    if request["execute"] == "guest-ping":
        return {"return": {}}
    return {"error": {"class": "CommandNotFound", "desc": f"{request['execute']} not found"}}


@asynccontextmanager
async def fake_pair(**options: Any) -> AsyncIterator[tuple[GuestAgent, FakeAgent]]:
    ours, theirs = socketpair_stream()
    peer = FakeAgent(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
    async with open_agent(ours, name="fake", **options) as agent:
        try:
            yield agent, peer
        finally:
            await peer.stream.aclose()
            await ours.aclose()


async def test_sync_discards_stale_data() -> None:
    """Junk, half a message, an old reply with an id and an old sync reply before the sync
    reply are all skipped; the request starts with the 0xFF sentinel."""
    async with fake_pair() as (agent, peer):
        raw = await peer.stream.receive_some(65536)
        assert raw.startswith(b"\xff{") and b"guest-sync-delimited" in raw
        peer._buf = raw.decode("utf-8", "replace")
        request = await peer.receive()
        assert request is not None and peer.sentinels == 1
        stale = b'garbage\n{"return": {}, "id": 1}\n\xff{"return": 12}\n{"half": '
        await peer.answer_sync(request, before=stale)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve, pong)
            await agent.wait_ready(5)
            await agent.ping(timeout=5)
            with pytest.raises(ExecuteError, match="not found"):
                await agent.cmd("guest-nothing", timeout=5)
            await agent.ping(timeout=5)  # still in step after an error reply
            nursery.cancel_scope.cancel()
        assert agent.synchronised and not agent.closed


async def test_sync_waits_for_a_late_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls made before the agent is up wait for the sync; the sync request is repeated and
    only the answer to the latest one counts."""
    monkeypatch.setattr("trio_qemu.agent._SYNC_FIRST", 0.05)
    async with fake_pair() as (agent, peer), trio.open_nursery() as nursery:
        answered = trio.Event()

        async def early_ping() -> None:
            await agent.ping(timeout=10)
            answered.set()

        nursery.start_soon(early_ping)
        await trio.sleep(0.3)  # several sync requests pile up meanwhile
        assert not agent.synchronised and not answered.is_set()
        syncs: list[dict[str, Any]] = []
        while len(syncs) < 3:
            request = await peer.receive()
            assert request is not None
            syncs.append(request)
        # Answer the older ones first (as a restarted agent would), then serve normally.
        for request in syncs:
            await peer.answer_sync(request)
        nursery.start_soon(peer.serve, pong)
        with trio.fail_after(5):
            await answered.wait()
        assert agent.synchronised
        nursery.cancel_scope.cancel()


async def test_wait_ready_timeout_and_eof() -> None:
    async with fake_pair() as (agent, peer):
        with pytest.raises(AgentTimeout, match=r"did not answer within 0\.2 s"):
            await agent.wait_ready(0.2)
        with pytest.raises(AgentTimeout):
            await agent.exec(["true"], timeout=0.2)
        await peer.stream.aclose()  # the channel ends before the agent ever answered
        with pytest.raises(QMPConnectionClosed), trio.fail_after(5):
            await agent.ping(timeout=10)
        assert agent.closed


async def test_eof_after_sync_and_fail() -> None:
    async with fake_pair() as (agent, peer), trio.open_nursery() as nursery:
        nursery.start_soon(peer.serve, pong)
        await agent.wait_ready(5)
        agent.fail(MachineError("the machine is gone"))
        with pytest.raises(MachineError, match="the machine is gone"):
            await agent.ping(timeout=5)
        nursery.cancel_scope.cancel()


async def test_exec_result_checks() -> None:
    """Truncated output and malformed replies become AgentError; a signal is 128+N."""
    statuses = [
        {"exited": True, "signal": 9},
        {"exited": True, "exitcode": 0, "out-data": "aGk=", "out-truncated": True},
        {"exited": True},
        {"exited": True, "exitcode": 0, "out-data": "!!"},
    ]

    def handler(request: dict[str, Any]) -> dict[str, Any] | None:
        if request["execute"] == "guest-exec":
            return {"return": {"pid": 42}}
        if request["execute"] == "guest-exec-status":
            return {"return": statuses.pop(0)}
        return pong(request)

    async with fake_pair() as (agent, peer), trio.open_nursery() as nursery:
        nursery.start_soon(peer.serve, handler)
        killed = await agent.exec(["sleep", "9"], timeout=5)
        assert (killed.returncode, killed.command) == (137, "sleep 9")
        with pytest.raises(AgentError, match="truncated"):
            await agent.exec(["yes"], timeout=5)
        with pytest.raises(AgentError, match="no exit status"):
            await agent.exec(["x"], timeout=5)
        with pytest.raises(AgentError, match="bad base64"):
            await agent.exec(["x"], timeout=5)
        with pytest.raises(TypeError):
            await agent.exec([], timeout=5)
        with pytest.raises(ValueError, match="mode must be one of"):
            await agent.shutdown("sideways")
        nursery.cancel_scope.cancel()


# --- the guest variant --------------------------------------------------------------------


def read_archives(blob: bytes) -> list[dict[str, tuple[int, bytes]]]:
    """The archives of a concatenated newc initramfs: name -> (mode, data), in order."""
    archives: list[dict[str, tuple[int, bytes]]] = []
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos < len(blob):
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = blob[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            archives.append(entries)
            entries = {}
        else:
            entries[name] = (mode, data)
    return archives


def test_agent_scripts_parse() -> None:
    for script in (_AGENT_WRAPPER_SCRIPT, _LINK_PORTS_SCRIPT, _SHUTDOWN_SCRIPT):
        subprocess.run(["busybox", "sh", "-n"], input=script.encode(), check=True)
    assert '-m virtio-serial -p "$port"' in _AGENT_WRAPPER_SCRIPT
    assert "port=/dev/virtio-ports/$name" in _AGENT_WRAPPER_SCRIPT
    assert _AGENT_INITTAB.startswith("::sysinit:") and _AGENT_INITTAB.endswith(
        f"::once:{AGENT_WRAPPER_PATH}\n"
    )


def test_shutdown_script_maps_qemu_ga_arguments(tmp_path: Path) -> None:
    """qemu-ga runs ``shutdown -h -P|-H|-r +0 MESSAGE``; the script picks the busybox
    command and always adds ``-f`` (checked with stub commands on the host)."""
    for name in ("poweroff", "halt", "reboot", "sync"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        stub.chmod(0o755)
    script = tmp_path / "shutdown"
    script.write_text(_SHUTDOWN_SCRIPT)
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for flag, expected in (("-P", "poweroff -f"), ("-H", "halt -f"), ("-r", "reboot -f")):
        argv = [str(script), "-h", flag, "+0", "hypervisor initiated shutdown"]
        out = subprocess.run(argv, env=env, capture_output=True, check=True).stdout.decode()
        assert out.splitlines() == ["sync", expected]


def test_parse_ldd() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibudev.so.1 => /x/libudev.so.1 (0x00007fa9)\n"
        "\tlibgone.so.3 => not found\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007fa9feb45000)\n"
    )
    assert _parse_ldd(text) == (
        {"libudev.so.1": "/x/libudev.so.1"},
        ["libgone.so.3"],
        "/lib64/ld-linux-x86-64.so.2",
    )


def test_config_needs_an_agent_image() -> None:
    plain = GuestImage(kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.cpio"), version="v")
    assert plain.config().agent is False
    with pytest.raises(ValueError, match=r"no guest agent.*agent=True"):
        plain.config(agent=True)
    with_agent = GuestImage(kernel=Path("/k/vmlinux"), initrd=Path("/k/i"), agent=True)
    assert with_agent.config().agent is True and with_agent.config(agent=True).agent is True
    assert with_agent.config(agent=False).agent is False
    argv = with_agent.config().argv()
    assert "virtserialport,bus=trio-vser.0,chardev=agent,name=org.qemu.guest_agent.0" in argv


@pytest.fixture(scope="module")
def plain_guest() -> GuestImage:
    return build_guest()


@pytest.fixture(scope="module")
def agent_guest() -> GuestImage:
    return build_guest(agent=True)


def test_variant_beside_the_plain_guest(plain_guest: GuestImage, agent_guest: GuestImage) -> None:
    """The plain guest is unchanged; the variant has its own key and the plain initramfs as
    its first archive."""
    assert not plain_guest.agent and agent_guest.agent
    assert agent_guest.version.startswith(plain_guest.version + "-qga_")
    assert agent_guest.initrd.parent != plain_guest.initrd.parent
    plain = plain_guest.initrd.read_bytes()
    blob = agent_guest.initrd.read_bytes()
    assert blob.startswith(plain)
    first, *rest = read_archives(plain)
    assert not rest and "usr/sbin/qemu-ga" not in first and "sbin/shutdown" not in first
    base, overlay = read_archives(blob)
    assert base == first
    assert overlay["usr/sbin/qemu-ga"][1].startswith(b"\x7fELF")
    libs = {name.rsplit("/", 1)[1] for name in overlay if name.startswith("lib/x86_64-linux-gnu/")}
    for lib in ("libc.so.6", "libglib-2.0.so.0", "libudev.so.1", "liburing.so.2",
                "libnuma.so.1", "libpcre2-8.so.0", "ld-linux-x86-64.so.2"):  # fmt: skip
        assert lib in libs
    assert overlay["lib64/ld-linux-x86-64.so.2"][1] == b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert overlay["etc/inittab"][1].decode() == _AGENT_INITTAB
    assert agent_guest.kernel.read_bytes()[:4096] == plain_guest.kernel.read_bytes()[:4096]


async def test_variant_build_in_a_fresh_cache(plain_guest: GuestImage, tmp_path: Path) -> None:
    """Built for real next to a copy of the plain guest, then reused from the cache."""
    cache = tmp_path / "cache"
    plain_dir = cache / "guest" / plain_guest.initrd.parent.name
    plain_dir.mkdir(parents=True)
    for item in plain_guest.initrd.parent.iterdir():
        os.link(item, plain_dir / item.name)
    messages: list[str] = []
    start = time.monotonic()
    image = await ensure_guest(
        cache_dir=cache, agent=True, progress=messages.append, _download_dir=tmp_path / "debs"
    )
    print(f"agent variant built in {time.monotonic() - start:.1f} s:", *messages, sep="\n  ")
    assert image.agent and image.initrd.is_relative_to(cache)
    assert any("downloading qemu-guest-agent" in m for m in messages)
    assert any(re.search(r"qemu-ga needs \d+ libraries", m) for m in messages)
    meta = json.loads((image.initrd.parent / "image.json").read_text())
    assert meta["base"] == plain_guest.version and meta["agent"] is True
    assert set(meta["agent_libraries"].values()) == {"package"}  # nothing from the host
    assert os.stat(image.kernel).st_ino == os.stat(plain_dir / "vmlinux").st_ino

    messages.clear()
    again = await ensure_guest(cache_dir=cache, agent=True, progress=messages.append)
    assert again == image and not messages
    plain = await ensure_guest(cache_dir=cache, progress=messages.append)
    assert plain.version == plain_guest.version and not plain.agent and not messages


# --- the real qemu-ga ---------------------------------------------------------------------


@asynccontextmanager
async def booted(image: GuestImage, **fields: Any) -> AsyncIterator[tuple[Machine, GuestAgent]]:
    """The agent guest, running, with its agent answering."""
    async with (
        open_machine(image.config(**fields)) as vm,
        open_agent(vm, name=f"{vm.name}.agent") as agent,
    ):
        start = time.monotonic()
        await agent.wait_ready(BOOT_TIMEOUT)
        print(f"agent ready {time.monotonic() - start:.2f} s after QMP")
        yield vm, agent


async def test_ping_and_info(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (_vm, agent):
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            await agent.ping(timeout=10)
            samples.append(time.perf_counter() - start)
        samples.sort()
        print(f"guest-ping: median {samples[10] * 1000:.2f} ms, min {samples[0] * 1000:.2f} ms")
        info = await agent.info()
        assert info["version"].startswith("7.")
        names = {c["name"] for c in info["supported_commands"] if c["enabled"]}
        wanted = {"guest-ping", "guest-sync-delimited", "guest-exec", "guest-exec-status"}
        wanted |= {"guest-file-open", "guest-file-read", "guest-file-write", "guest-shutdown"}
        assert wanted <= names
        shutdown = next(c for c in info["supported_commands"] if c["name"] == "guest-shutdown")
        assert shutdown["success-response"] is False  # why shutdown() gets no reply
        assert await agent.cmd("guest-get-host-name") == {"host-name": "trio-guest"}


async def test_exec(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (_vm, agent):
        ok = await agent.exec(["sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2"])
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"out\n", b"err\n")
        three = await agent.exec(["sh", "-c", "printf 'a\\0b'; printf 'oops' >&2; exit 3"])
        assert (three.returncode, three.stdout, three.stderr) == (3, b"a\0b", b"oops")
        assert three.command == shlex.join(
            ["sh", "-c", "printf 'a\\0b'; printf 'oops' >&2; exit 3"]
        )
        with pytest.raises(GuestCommandError) as failed:
            await agent.exec(["sh", "-c", "exit 3"], check=True)
        assert failed.value.returncode == 3
        with pytest.raises(ExecuteError, match="No such file"):
            await agent.exec(["/no/such/program"])

        data = bytes(range(256)) * 64
        cat = await agent.exec(["cat"], input=data)
        assert (cat.returncode, cat.stdout, cat.stderr) == (0, data, b"")
        env = await agent.exec(["/bin/sh", "-c", 'echo "$GREETING"'], env={"GREETING": "hi"})
        assert env.stdout == b"hi\n"

        samples = []
        for _ in range(10):
            start = time.perf_counter()
            result = await agent.exec(["echo", "hello"])
            samples.append(time.perf_counter() - start)
            assert result.stdout == b"hello\n"
        samples.sort()
        print(f"exec with output: median {samples[5] * 1000:.1f} ms, min {samples[0] * 1000:.1f}")


async def test_exec_timeout_kills(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (_vm, agent):
        start = time.monotonic()
        with pytest.raises(AgentTimeout, match="it was killed"):
            await agent.exec(["sleep", "1234"], timeout=1.0)
        assert time.monotonic() - start < 5
        ps = await agent.exec(["ps", "-o", "args"])
        assert b"sleep 1234" not in ps.stdout
        await agent.ping(timeout=5)  # still usable


async def test_files(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (_vm, agent):
        small = bytes(range(256))
        await agent.write_file("/tmp/small.bin", small)
        assert await agent.read_file("/tmp/small.bin") == small
        big = os.urandom(100 * 1024)
        start = time.perf_counter()
        await agent.write_file("/tmp/big.bin", big)
        wrote = time.perf_counter() - start
        start = time.perf_counter()
        assert await agent.read_file("/tmp/big.bin") == big
        read = time.perf_counter() - start
        print(f"100 KiB: write {wrote * 1000:.0f} ms, read {read * 1000:.0f} ms")
        checksum = await agent.exec(["md5sum", "/tmp/big.bin"])
        assert checksum.stdout.split()[0].decode() == hashlib.md5(big).hexdigest()
        await agent.write_file("/tmp/empty", b"")
        assert await agent.read_file("/tmp/empty") == b""
        with pytest.raises(AgentError, match="larger than max_size"):
            await agent.read_file("/tmp/big.bin", max_size=1000)
        with pytest.raises(ExecuteError, match="No such file"):
            await agent.read_file("/no/such/file")
        # Handles are closed after every transfer, even a failed one.
        handle = await agent.cmd("guest-file-open", path="/tmp/small.bin")
        assert isinstance(handle, int)
        await agent.cmd("guest-file-close", handle=handle)


async def test_shutdown_ends_qemu(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (vm, agent):
        assert "-no-reboot" in vm.argv
        codes: list[int | None] = []
        async with trio.open_nursery() as nursery:

            async def wait_for_exit() -> None:
                codes.append(await vm.wait(timeout=30))

            nursery.start_soon(wait_for_exit)  # QEMU's exit is expected from here on
            await trio.lowlevel.checkpoint()  # let vm.wait begin
            start = time.monotonic()
            await agent.shutdown()
        print(f"guest-shutdown to QEMU's exit: {time.monotonic() - start:.2f} s")
        assert codes == [0]
        with pytest.raises(MachineError):
            await agent.ping(timeout=5)


async def test_channel_closed_is_a_machine_error(agent_guest: GuestImage) -> None:
    async with booted(agent_guest) as (vm, agent):
        await vm.kill()
        with pytest.raises(MachineError), trio.fail_after(5):
            await agent.exec(["true"])


async def test_vm_agent(agent_guest: GuestImage) -> None:
    """``vm.agent``: the machine's own GuestAgent."""
    async with open_machine(agent_guest.config()) as vm:
        agent: GuestAgent = vm.agent
        await agent.wait_ready(BOOT_TIMEOUT)
        result = await agent.exec(["echo", "hi"])
        assert result.stdout == b"hi\n"
        await agent.shutdown()  # the machine expects QEMU's exit now: no MachineExited
        assert await vm.wait(timeout=30) == 0
    # QEMU exiting on its own (a guest panic, with -no-reboot) fails a pending call at once.
    with pytest.raises(MachineExited), trio.fail_after(BOOT_TIMEOUT):
        async with open_machine(agent_guest.config()) as vm:
            agent = vm.agent
            await agent.wait_ready(BOOT_TIMEOUT)
            await agent.exec(["sh", "-c", "echo c >/proc/sysrq-trigger"], timeout=30)
    async with open_machine(machine="none") as bare:
        with pytest.raises(MachineError, match="agent=True"):
            bare.agent  # noqa: B018
