"""The relay: TCP streams into the guest (half-close, refusals, many at once), forwarded
ports, port waits, and its faults (QEMU killed with streams open, the relay killed in the
guest), on clones of the tiny guest; and its wire format's reader, without QEMU."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_qemu import (
    GuestConnectionRefused,
    GuestStreamBroken,
    Machine,
    MachineConfig,
    MachineExited,
    RelayError,
    RelayTimeout,
    open_clone,
)
from trio_qemu.pytest_plugin import MachineFactory
from trio_qemu.relay import GuestStream
from trio_qemu.relay._protocol import (
    DATA,
    HELLO,
    HELLO_PREFIX,
    FrameReader,
    encode,
)
from trio_qemu.snapshot import Template

#: An echo server (busybox nc, a cat per connection). Its listen backlog is 1: connections
#: made at once beyond that wait for the guest's TCP retransmissions, so concurrent streams
#: below get a server each.
ECHO = "nc -ll -p {port} -e cat >/dev/null 2>&1 &"


async def echo_server(vm: Machine, *ports: int) -> None:
    await vm.shell.run("\n".join(ECHO.format(port=port) for port in ports), check=True)
    for port in ports:
        await vm.wait_for_open_port(port, timeout=20, interval=0.05)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


async def test_a_stream_honours_half_close_and_eof(fresh_guest: Machine) -> None:
    """send_eof reaches the guest program as end of input; its end of output ends
    receive_some with b"" (and again after)."""
    vm = fresh_guest
    await vm.shell.run("nc -ll -p 7001 -e sh -c 'wc -c; echo done' >/dev/null 2>&1 &", check=True)
    await vm.wait_for_open_port(7001, timeout=20, interval=0.05)
    async with await vm.open_tcp_stream(7001) as stream:
        assert isinstance(stream, GuestStream)
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_all(os.urandom(300_000))  # more than one window
        await stream.send_eof()
        assert await read_all(stream) == b"300000\ndone\n"
        assert await stream.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"more")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


async def test_a_refused_connection_and_port_waits(fresh_guest: Machine) -> None:
    vm = fresh_guest
    with pytest.raises(GuestConnectionRefused) as info:
        await vm.open_tcp_stream(7003)
    assert isinstance(info.value, ConnectionRefusedError)
    assert (info.value.errno, info.value.port) == (errno.ECONNREFUSED, 7003)
    await vm.wait_for_closed_port(7003, timeout=5)  # at once
    with pytest.raises(RelayTimeout, match=r"did not open within 0.3 s .*refused"):
        await vm.wait_for_open_port(7003, timeout=0.3, interval=0.1)
    with pytest.raises(ValueError, match="port must be 1-65535"):
        await vm.open_tcp_stream(0)
    with pytest.raises(ValueError, match="does not resolve names"):
        await vm.open_tcp_stream(80, host="example.com")
    await echo_server(vm, 7003)
    await vm.shell.run("kill $(pidof nc)", check=True)
    await vm.wait_for_closed_port(7003, timeout=20, interval=0.05)


async def test_sixteen_concurrent_streams_each_get_their_own_bytes(fresh_guest: Machine) -> None:
    """16 echo connections at once, each moving more than its window both ways."""
    vm = fresh_guest
    await echo_server(vm, *range(7100, 7116))
    payloads = [os.urandom(300_000 + i) for i in range(16)]
    echoed: dict[int, bytes] = {}

    async def one(i: int) -> None:
        async with await vm.open_tcp_stream(7100 + i) as stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payloads[i])
                await stream.send_eof()

            nursery.start_soon(send)
            echoed[i] = await read_all(stream)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
    assert [echoed[i] == payloads[i] for i in range(16)] == [True] * 16


async def test_forward_port_serves_a_real_socket_client(fresh_guest: Machine) -> None:
    vm = fresh_guest
    await echo_server(vm, 7004)
    async with vm.forward_port(7004) as (host, port):
        assert host == "127.0.0.1" and port > 0
        client = await trio.open_tcp_stream(host, port)  # an ordinary host socket
        async with client:
            await client.send_all(b"through a host port\n" * 5000)
            await client.send_eof()
            assert await read_all(client) == b"through a host port\n" * 5000
        async with vm.forward_port(7005) as (host2, port2):  # nobody listens there
            refused = await trio.open_tcp_stream(host2, port2)
            with pytest.raises(trio.BrokenResourceError):  # reset, as a refusal would be
                await read_all(refused)
            await refused.aclose()
    with pytest.raises(OSError):  # no longer listening
        await trio.open_tcp_stream(host, port)


async def test_qemu_killed_ends_every_stream_at_once(guest_template: Template) -> None:
    async def waiting(stream: GuestStream, errors: list[BaseException]) -> None:
        try:
            await stream.receive_some()
        except MachineExited as exc:
            errors.append(exc)

    errors: list[BaseException] = []
    with trio.fail_after(60), pytest.raises(MachineExited):
        async with open_clone(guest_template) as vm:
            await echo_server(vm, 7006, 7008, 7009)
            streams = [await vm.open_tcp_stream(port) for port in (7006, 7008, 7009)]
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(waiting, stream, errors)
                await trio.testing.wait_all_tasks_blocked()
                assert vm.pid is not None
                os.kill(vm.pid, signal.SIGKILL)
                start = time.monotonic()
                await trio.sleep_forever()
    assert time.monotonic() - start < 2
    assert [type(e) for e in errors] == [MachineExited] * 3
    with pytest.raises(MachineExited):
        await streams[0].send_all(b"x")
    with pytest.raises(MachineExited):
        await vm.open_tcp_stream(7006)


async def test_a_relay_killed_in_the_guest_fails_its_streams_and_comes_back(
    fresh_guest: Machine,
) -> None:
    vm = fresh_guest
    await echo_server(vm, 7007)
    stream = await vm.open_tcp_stream(7007)
    old = vm.relay.relay_pid
    await vm.shell.run(f"kill -9 {old}", check=True)
    with trio.fail_after(5), pytest.raises(GuestStreamBroken, match="the guest relay is gone"):
        await stream.receive_some()
    assert isinstance(GuestStreamBroken("x"), trio.BrokenResourceError)
    await stream.aclose()
    # init starts a new relay; streams work again once it has said hello
    async with await vm.open_tcp_stream(7007, timeout=30) as again:
        await again.send_all(b"back")
        assert await again.receive_some() == b"back"
    assert vm.relay.relay_pid != old


async def test_without_a_relay_channel_the_error_says_so(machine: MachineFactory) -> None:
    vm = await machine(MachineConfig(machine="none", args=["-nodefaults"]))
    with pytest.raises(RelayError, match="no relay channel: launch it with relay=True"):
        await vm.open_tcp_stream(80)
    with pytest.raises(RelayError, match="no relay channel"):
        async with vm.forward_port(80):
            pass


# --- the wire format, without QEMU --------------------------------------------------------


def hello(window: int = 262144) -> bytes:
    payload = HELLO_PREFIX[12:] + (1).to_bytes(4, "big") + (42).to_bytes(4, "big")
    return encode(HELLO, 0, payload + b"N" * 8 + window.to_bytes(4, "big"))


def test_the_reader_skips_to_a_hello_and_resyncs_after_garbage() -> None:
    reader = FrameReader()
    stream = b"stale tail of a dead relay" + hello() + encode(DATA, 5, b"abc")
    frames = [f for i in range(0, len(stream), 7) for f in reader.feed(stream[i : i + 7])]
    assert [(chr(f.type), f.sid) for f in frames] == [("H", 0), ("D", 5)]
    assert frames[1].payload == b"abc"
    assert reader.skipped == len(b"stale tail of a dead relay")
    # Not a frame: skip to the next hello; a relay that died mid-frame (skip()) likewise.
    frames = list(reader.feed(b"\xff" * 20 + hello(1 << 20) + encode(DATA, 6, b"x")))
    assert [(chr(f.type), f.sid) for f in frames] == [("H", 0), ("D", 6)]
    assert list(reader.feed(encode(DATA, 7, b"y" * 100)[:50])) == []
    reader.skip()
    assert [chr(f.type) for f in reader.feed(encode(DATA, 7, b"y" * 100)[50:] + hello())] == ["H"]


# --- a guest built without a C compiler ---------------------------------------------------


async def test_without_a_compiler_the_guest_gets_a_sleeping_stub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trio_qemu.guest import GuestImage, relay_binary

    messages: list[str] = []
    with_cc = relay_binary.relay_digest()
    monkeypatch.setattr(relay_binary, "_compiler", lambda: None)
    assert relay_binary.relay_digest() != with_cc  # a compiler later makes a new guest
    assert await relay_binary.compile_relay(tmp_path, messages.append) is None
    assert "without the relay" in messages[0] and "gcc libc6-dev" in messages[0]
    assert b"sleep" in relay_binary.RELAY_STUB  # init restarts what exits: it must not
    image = GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i")
    assert image.relay is False and image.config().relay is False
    assert GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i", relay=True).config().relay


async def test_the_guest_http_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/guest_http.py: busybox httpd in the guest, fetched both ways."""
    path = Path(__file__).parent.parent / "examples" / "guest_http.py"
    spec = importlib.util.spec_from_file_location("guest_http_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with trio.fail_after(120):
        await example.main()
    out = capsys.readouterr().out
    assert "over open_tcp_stream: HTTP/1.1 200 OK -> b'<h1>Hello from the guest</h1>\\n'" in out
    assert "urllib through forward_port 127.0.0.1:" in out
