"""Commands in the guest: the protocol against a scripted fake agent, then the real guest.

The fake agent (a Trio task on the other end of an in-memory stream) plays the guest side
of the protocol badly on purpose: junk lines, stale results, overlong lines, bad base64, a
closed channel; being pure logic, its timing tests run on ``autojump_clock``. The real-guest
tests boot the tiny guest once per test (about 2 s under TCG) and build :class:`Shell` on
the machine's shell channel.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import pytest
import trio
import trio.testing

from trio_qemu import Machine, MachineError, MachineExited, open_machine
from trio_qemu._config import SHELL_PORT_NAME
from trio_qemu._errors import GuestCommandError, ShellError, ShellTimeout
from trio_qemu._shell import SHELL_AGENT_PATH, GuestResult, Shell
from trio_qemu._shell_protocol import (
    MAX_PINGS,
    Framer,
    Pings,
    Reply,
    RequestIds,
    decode_command,
    encode_run,
    kill_request,
    ping_request,
    run_request,
)
from trio_qemu.guest import GuestImage, build_guest

BOOT_TIMEOUT = 60.0

# --- a scripted fake agent ------------------------------------------------------------------

Request = list[bytes]
Handler = Callable[[Request, trio.abc.Stream], Awaitable[None]]


def b64(data: bytes) -> bytes:
    """Base64 wrapped at 76 characters per line, like busybox's ``base64``."""
    text = base64.b64encode(data)
    return b"".join(text[i : i + 76] + b"\n" for i in range(0, len(text), 76))


def result(rid: bytes, rc: int, out: bytes = b"", err: bytes = b"") -> bytes:
    """A well-formed result frame."""
    return (
        b"#B %s %d %d %d\n" % (rid, rc, len(out), len(err))
        + b64(out)
        + b"#M %s\n" % rid
        + b64(err)
        + b"#E %s %d\n" % (rid, rc)
    )


async def fake_agent(stream: trio.abc.Stream, handler: Handler) -> None:
    """Read request lines (skipping blank ones and stdin payloads) and hand them on."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        if not line:
            continue
        fields = line.split(b" ")
        if fields[0] == b"R" and int(fields[3]):
            length = int(fields[3]) + 1
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            fields.append(base64.b64decode(buffer[:length]))
            buffer = buffer[length:]
        await handler(fields, stream)


async def echo_handler(fields: Request, stream: trio.abc.Stream) -> None:
    """Answer pings; run requests "succeed" with the command as stdout, stdin as stderr."""
    if fields[0] == b"P":
        await stream.send_all(b"#P %s\n" % fields[1])
    elif fields[0] == b"R":
        command = b"" if fields[4] == b"-" else decode_command(fields[4])
        stdin = fields[6] if len(fields) > 6 else b""
        await stream.send_all(result(fields[1], 0, command, stdin))


class MakeShell(Protocol):
    def __call__(self, handler: Handler, **kwargs: Any) -> Shell: ...


@pytest.fixture
def fake(nursery: trio.Nursery) -> MakeShell:
    """Make a Shell talking to a fake agent run by ``handler`` in the test's nursery."""

    def make(handler: Handler, **kwargs: Any) -> Shell:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(fake_agent, theirs, handler)
        return Shell(ours, **kwargs)

    return make


async def test_request_format_and_result(fake: MakeShell) -> None:
    shell = fake(echo_handler)
    await shell.wait_ready(timeout=5)
    assert shell.ready
    command = "printf '%s' \"$x\" | tr a b # ü\n"
    got = await shell.run(command, stdin=bytes(range(256)))
    assert got == GuestResult(command, 0, command.encode(), bytes(range(256)))
    assert (await shell.run("")).stdout == b""  # an empty command is sent as "-"


async def test_junk_stale_results_and_long_lines_are_skipped(
    fake: MakeShell,
) -> None:
    async def noisy(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] != b"R":
            return
        rid = fields[1]
        await stream.send_all(
            b"junk that is not protocol\n"
            + b"x" * 200_000  # an overlong line: dropped, with its end
            + b" still junk #E "
            + rid
            + b" 0\n"
            + result(b"stale-1", 137, b"old output")  # a killed command's late result
            + b"#" + b"y" * 100_000 + b"\n"  # an overlong control line: dropped
            + b"#P old\n#R 42\n"
            + b"#B stale-2 0 1000 0\nQUJD\n"  # a stale result cut short by ours
            + result(rid, 3, b"\x00\xff\n", b"err")
        )  # fmt: skip

    shell = fake(noisy)
    got = await shell.run("whatever")
    assert (got.returncode, got.stdout, got.stderr) == (3, b"\x00\xff\n", b"err")


async def test_a_line_cut_short_by_a_dying_agent(fake: MakeShell) -> None:
    """Base64 never holds a "#": whatever a dying writer left unfinished (a line of a result,
    or a control line), the next "#" starts a line again."""
    runs = 0

    async def dying(fields: Request, stream: trio.abc.Stream) -> None:
        nonlocal runs
        if fields[0] == b"P":
            await stream.send_all(
                b"#B old 0 30 0\nQUJDRE" + b"#R 7\n#B ol" + b"#P %s\n" % fields[1]
            )
        elif fields[0] == b"R":
            runs += 1
            rid = fields[1]
            if runs == 1:  # the agent restarts in the middle of our result
                await stream.send_all(b"#B %s 0 30 0\nQUJDRE\n#R 8\n" % rid)
            else:
                await stream.send_all(result(rid, 0, b"fine"))

    shell = fake(dying)
    await shell.wait_ready(timeout=5)
    with pytest.raises(ShellError, match="restarted while it sent the result of 'one'"):
        await shell.run("one")
    assert (await shell.run("two")).stdout == b"fine"


@pytest.mark.parametrize(
    "frame",
    [
        b"#B {rid} 0 3 0\n!!!!\n#M {rid}\n#E {rid} 0\n",  # not base64
        b"#B {rid} 0 5 0\nQUJD\n#M {rid}\n#E {rid} 0\n",  # shorter than announced
        b"#B {rid} 0 3 0\nQUJD\nQUJD\n#M {rid}\n#E {rid} 0\n",  # longer than announced
        b"#B {rid} zero 3 0\n",  # a malformed header
    ],
)
async def test_broken_results_raise_and_resync(fake: MakeShell, frame: bytes) -> None:
    calls = 0

    async def broken_once(fields: Request, stream: trio.abc.Stream) -> None:
        nonlocal calls
        if fields[0] == b"R":
            calls += 1
            if calls == 1:
                await stream.send_all(frame.replace(b"{rid}", fields[1]))
            else:
                await stream.send_all(result(fields[1], 0, b"fine"))

    shell = fake(broken_once)
    with pytest.raises(ShellError):
        await shell.run("one")
    assert (await shell.run("two")).stdout == b"fine"


async def test_max_output(fake: MakeShell) -> None:
    async def big(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] == b"R":
            assert fields[2] == b"100"  # the limit travels with the request
            rid = fields[1]
            if decode_command(fields[4]) == b"guest-checked":
                await stream.send_all(b"#X %s 0 500 20\n" % rid)
            else:  # a guest that ignores the limit: the header alone is refused
                await stream.send_all(result(rid, 0, b"y" * 500))
            await stream.send_all(result(b"late", 0) + b"#P x\n")

    shell = fake(big, max_output=100)
    with pytest.raises(ShellError, match="500 bytes to stdout and 20 to stderr"):
        await shell.run("guest-checked")
    with pytest.raises(ShellError, match="more output than max_output"):
        await shell.run("guest-ignored")


async def test_timeout_kills_and_keeps_partial_output(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    killed: list[bytes] = []

    async def slow(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] == b"K":
            assert fields[1] == fields[2]
            killed.append(fields[1])
            status = 137 if len(killed) == 1 else 0  # the second one ended as it was killed
            await stream.send_all(result(fields[1], status, b"partial"))
        elif fields[0] == b"R" and decode_command(fields[4]) != b"sleep":
            await stream.send_all(result(fields[1], 0, b"ok"))

    shell = fake(slow)
    start = trio.current_time()
    with pytest.raises(ShellTimeout, match=r"within 0\.2 s; it was killed$") as info:
        await shell.run("sleep", timeout=0.2)
    assert trio.current_time() - start == pytest.approx(0.2)  # the kill is confirmed at once
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, MachineError)
    assert (info.value.command, info.value.stdout) == ("sleep", b"partial")
    assert len(killed) == 1
    assert (await shell.run("next")).stdout == b"ok"
    with pytest.raises(ShellTimeout, match="it ended with status 0 as the kill was sent"):
        await shell.run("sleep", timeout=0.2)


async def test_timeout_while_the_result_arrives(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    """A timeout in the middle of a result: the rest of it is read, not waited for again."""
    payload = bytes(range(256)) * 100
    frame = result(b"{rid}", 0, payload)

    async def slow_transfer(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] == b"R":
            whole = frame.replace(b"{rid}", fields[1])
            await stream.send_all(whole[: len(whole) // 2])
        elif fields[0] == b"K":
            whole = frame.replace(b"{rid}", fields[1])
            await stream.send_all(whole[len(whole) // 2 :])

    shell = fake(slow_transfer, kill_timeout=5)
    start = trio.current_time()
    with pytest.raises(ShellTimeout) as info:
        await shell.run("big", timeout=0.3)
    assert trio.current_time() - start == pytest.approx(0.3)  # no waiting for kill_timeout
    assert info.value.stdout == payload


async def test_timeout_without_kill_confirmation(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    """The agent answers the ping sent with the kill, but the command's result never comes
    (its worker was killed): a timeout that says just that, not that it was killed."""

    async def deaf(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] == b"P":
            await stream.send_all(b"#P %s\n" % fields[1])
        elif fields[0] == b"R" and decode_command(fields[4]) == b"next":
            await stream.send_all(result(fields[1], 0, b"ok"))

    shell = fake(deaf, kill_timeout=0.3)
    start = trio.current_time()
    with pytest.raises(ShellTimeout, match="answers, but it did not confirm") as info:
        await shell.run("hang", timeout=0.2)
    assert trio.current_time() - start == pytest.approx(0.2 + 0.3)
    assert "killed" not in str(info.value) and info.value.stdout == b""
    assert shell.agent_gone is None
    assert (await shell.run("next")).stdout == b"ok"


async def test_timeout_with_a_silent_agent(fake: MakeShell, autojump_clock: trio.abc.Clock) -> None:
    """An agent that answers neither the kill nor the ping sent with it: a ShellError saying
    so (no claim of a kill); later runs ping first and fail within kill_timeout, sending
    nothing, until the agent answers again."""
    requests: list[bytes] = []
    alive = True

    async def dies(fields: Request, stream: trio.abc.Stream) -> None:
        nonlocal alive
        requests.append(fields[0])
        if fields[0] == b"R" and decode_command(fields[4]) == b"kill the agent":
            alive = False
        elif alive and fields[0] == b"P":
            await stream.send_all(b"#P %s\n" % fields[1])
        elif alive and fields[0] == b"R":
            await stream.send_all(result(fields[1], 0, b"ok"))

    shell = fake(dies, kill_timeout=0.5)
    start = trio.current_time()
    with pytest.raises(ShellError, match="answered neither its kill nor a ping") as info:
        await shell.run("kill the agent", timeout=2)
    assert not isinstance(info.value, ShellTimeout) and "was killed" not in str(info.value)
    assert trio.current_time() - start == pytest.approx(2 + 0.5)
    assert shell.agent_gone is not None and not shell.ready
    assert requests == [b"R", b"K", b"P"]

    start = trio.current_time()
    with pytest.raises(ShellError, match="does not answer") as info:
        await shell.run("echo hi", timeout=60)
    assert trio.current_time() - start == pytest.approx(0.5)  # not the run's timeout
    assert requests[3:] == [b"P"]  # the command was not sent

    alive = True  # the agent is back (restarted): it answers the next ping
    assert (await shell.run("echo hi")).stdout == b"ok"
    assert shell.agent_gone is None and shell.ready


async def test_port_closed_ends_runs_at_once(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    """The owner saw the guest close the port (the agent died): a run waiting for a result
    fails at once, saying so; later runs fail at once, sending nothing, until the port is
    opened again or the agent answers a ping."""
    requests: list[bytes] = []
    answer_pings = False

    async def agent(fields: Request, stream: trio.abc.Stream) -> None:
        requests.append(fields[0])
        if fields[0] == b"P" and answer_pings:
            await stream.send_all(b"#P %s\n" % fields[1])
        elif fields[0] == b"R" and decode_command(fields[4]) != b"hang":
            await stream.send_all(result(fields[1], 0, b"ok"))

    shell = fake(agent)

    async def close_port_soon() -> None:
        await trio.sleep(1)
        shell.port_closed()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_port_soon)
        with pytest.raises(ShellError, match=r"gone .* while 'hang' ran: its outcome is unknown"):
            await shell.run("hang", timeout=60)
    assert trio.current_time() - start == pytest.approx(1)
    assert shell.agent_gone == "the guest closed its end of the shell port"
    assert "agent gone" in repr(shell)

    with pytest.raises(ShellError, match="the guest shell is gone") as info:
        await shell.run("echo", timeout=60)
    assert not isinstance(info.value, ShellTimeout)
    assert trio.current_time() - start == pytest.approx(1)
    assert requests == [b"R"]

    shell.port_opened()  # an agent opened the port again
    assert (await shell.run("echo")).stdout == b"ok"

    # Without port_opened(): a pong to a ping sent after the close brings it back (one
    # sent before does not: it may have been answered by the agent that died).
    shell.port_closed("the agent was killed")
    with pytest.raises(ShellTimeout, match="it is gone: the agent was killed"):
        await shell.wait_ready(timeout=1)
    answer_pings = True
    await shell.wait_ready(timeout=5)
    assert shell.agent_gone is None and shell.ready
    assert (await shell.run("echo")).stdout == b"ok"


async def test_a_stale_pong_does_not_revive_a_gone_agent(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    """A pong to a ping sent before the port closed may come from the agent that died."""
    pings: list[bytes] = []

    async def late(fields: Request, stream: trio.abc.Stream) -> None:
        if fields[0] == b"P":
            pings.append(fields[1])
            if len(pings) > 1:  # only ever the answer to the first ping, late
                await stream.send_all(b"#P %s\n" % pings[0])

    shell = fake(late)
    with pytest.raises(ShellTimeout):
        await shell.wait_ready(timeout=0.1)
    shell.port_closed()
    with pytest.raises(ShellTimeout, match="it is gone"):
        await shell.wait_ready(timeout=5)
    assert len(pings) > 2 and shell.agent_gone is not None and not shell.ready


async def test_watch_port_follows_the_port_events() -> None:
    send, receive = trio.open_memory_channel[dict[str, Any]](10)
    ours, _theirs = trio.testing.memory_stream_pair()
    shell = Shell(ours)
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.watch_port, receive)
        await send.send({"event": "VSERPORT_CHANGE", "data": {"id": "p", "open": True}})
        await trio.testing.wait_all_tasks_blocked()
        assert shell.agent_gone is None
        await send.send({"event": "VSERPORT_CHANGE", "data": {"id": "p", "open": False}})
        await trio.testing.wait_all_tasks_blocked()
        assert shell.agent_gone == "the guest closed its end of the shell port"
        await send.send({"event": "VSERPORT_CHANGE", "data": {"id": "p", "open": True}})
        await trio.testing.wait_all_tasks_blocked()
        assert shell.agent_gone is None
        await send.aclose()  # the events end (QEMU exited): the watcher returns
    with pytest.raises(trio.ClosedResourceError):
        receive.receive_nowait()  # and closed its subscription


async def test_wait_ready_pings_again_when_the_agent_starts(
    fake: MakeShell, autojump_clock: trio.abc.Clock
) -> None:
    pings: list[bytes] = []

    async def late_start(fields: Request, stream: trio.abc.Stream) -> None:
        pings.append(fields[1])
        if len(pings) == 1:  # "not running yet": the first ping is lost
            await stream.send_all(b"#R 123\n")
        else:
            await stream.send_all(b"#P %s\n" % fields[1])

    shell = fake(late_start)
    start = trio.current_time()
    await shell.wait_ready(timeout=5)
    assert trio.current_time() - start < 0.25  # no waiting for the retry interval
    assert len(pings) == 2 and pings[0] != pings[1]


async def test_wait_ready_timeout(fake: MakeShell) -> None:
    async def silent(fields: Request, stream: trio.abc.Stream) -> None:
        pass

    shell = fake(silent)
    with pytest.raises(ShellTimeout, match=r"did not answer within 0\.5 s"):
        await shell.wait_ready(timeout=0.5)


async def test_end_of_file_and_close() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    shell = Shell(ours)
    async with trio.open_nursery() as nursery:

        async def close_peer() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await theirs.aclose()

        nursery.start_soon(close_peer)
        with pytest.raises(ShellError, match="end of file"):
            await shell.run("x")

    # An owner's on_eof hook can replace the bare end-of-file error with its own.
    ours, theirs = trio.testing.memory_stream_pair()
    died = MachineError("QEMU exited: killed by signal 9")

    async def on_eof() -> None:
        shell.close(died)

    shell = Shell(ours, on_eof=on_eof)
    await theirs.aclose()
    with pytest.raises(MachineError, match="signal 9"):
        await shell.run("x")

    ours, theirs = trio.testing.memory_stream_pair()
    shell = Shell(ours)
    error = MachineError("QEMU died")
    async with trio.open_nursery() as nursery:

        async def close_shell() -> None:
            await trio.testing.wait_all_tasks_blocked()
            shell.close(error)

        nursery.start_soon(close_shell)
        with pytest.raises(MachineError, match="QEMU died") as info:
            await shell.run("x")
    assert info.value is not error  # a copy per raise
    assert shell.closed
    with pytest.raises(MachineError, match="QEMU died"):
        await shell.wait_ready()


class SharedStream(trio.abc.Stream):
    """A stream that lets several tasks send and receive at once (each call whole), as a
    socket would: with it, only the shell's own lock keeps two runs apart."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self._sending = trio.Lock()
        self._receiving = trio.Lock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        async with self._receiving:
            return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_concurrent_runs_are_serialised(nursery: trio.Nursery) -> None:
    """The fake agent reads on while each command "runs" (it answers from a task of its
    own, later), so two runs in the guest at once would show: it fails the test there."""
    running: set[bytes] = set()
    most = 0
    send_lock = trio.Lock()

    async def finish(rid: bytes, output: bytes, stream: trio.abc.Stream) -> None:
        await trio.sleep(0.005)
        running.discard(rid)
        async with send_lock:
            await stream.send_all(result(rid, 0, output))

    async def concurrent(fields: Request, stream: trio.abc.Stream) -> None:
        nonlocal most
        if fields[0] == b"R":
            assert not running, f"{fields[1]!r} was sent while {sorted(running)} still ran"
            running.add(fields[1])
            most = max(most, len(running))
            nursery.start_soon(finish, fields[1], decode_command(fields[4]), stream)

    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(fake_agent, theirs, concurrent)
    shell = Shell(SharedStream(ours))
    outputs: dict[int, bytes] = {}

    async def run(i: int) -> None:
        outputs[i] = (await shell.run(f"cmd {i}")).stdout

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(run, i)
    assert outputs == {i: f"cmd {i}".encode() for i in range(20)}
    assert most == 1


def test_check_returncode() -> None:
    ok = GuestResult("true", 0, b"", b"")
    ok.check_returncode()
    bad = GuestResult("false", 1, b"out", b"err")
    with pytest.raises(GuestCommandError, match="'false' exited with status 1") as info:
        bad.check_returncode()
    error = info.value
    assert (error.command, error.returncode, error.stdout, error.stderr) == (
        "false", 1, b"out", b"err",
    )  # fmt: skip
    assert "stdout=b'out'" in repr(bad)


# --- the protocol's pure parts (trio_qemu._shell_protocol) ------------------------------------


def test_request_bytes() -> None:
    """The exact bytes (the fake agent above skips blank lines, the real one parses fields)."""
    command, stdin = encode_run("echo hi", b"in")
    assert (command, stdin) == (b"echo\\0040hi", b"aW4=")
    assert encode_run("", None) == (b"-", b"")
    assert run_request(b"t-1", 99, command, stdin) == b"\nR t-1 99 4 echo\\0040hi t-1\naW4=\n"
    assert run_request(b"t-2", 99, b"-", b"") == b"\nR t-2 99 0 - t-2\n"
    assert ping_request(b"t-3") == b"\nP t-3 t-3\n"
    assert kill_request(b"t-1") == b"\nK t-1 t-1\n"
    assert kill_request(b"t-1", b"t-4") == b"\nK t-1 t-1\nP t-4 t-4\n"
    ids = RequestIds()
    first, second = ids.new(), ids.new()
    assert first.endswith(b"-1") and second.endswith(b"-2") and first[:-1] == second[:-1]
    assert set(first.decode()) <= set("0123456789abcdef-")


def test_framer_across_chunks_and_pings_forget_the_oldest() -> None:
    framer = Framer(lambda head: None)
    reply = Reply(b"r", 0, 5, 0)
    lines = []
    # A control line and a base64 group, each cut by a chunk boundary; a cut-short line.
    for chunk in (b"#B r 0 5 0\nQUJD", b"REU=\n#M", b" r\n#B ol#E r 0\n"):
        framer.feed(chunk)
        while (line := framer.next_control(reply)) is not None:
            lines.append(line)
    assert lines == [b"#B r 0 5 0", b"#M r", b"#E r 0"]
    assert reply.finish() == (b"ABCDE", b"")
    pings = Pings()
    for i in range(MAX_PINGS + 1):
        pings.add(b"p-%d" % i, i)
    assert b"p-0" not in pings and pings.answer(b"p-0") is None
    assert pings.answer(b"p-1") == 1 and b"p-1" not in pings


# --- the real guest ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    """The tiny guest from the user's cache (built once if needed)."""
    return build_guest()


@pytest.fixture
async def vm(guest: GuestImage) -> AsyncIterator[Machine]:
    async with open_machine(guest.config()) as machine:
        yield machine


@pytest.fixture
async def shell(vm: Machine) -> Shell:
    await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
    return vm.shell


async def test_exit_codes_and_streams(shell: Shell) -> None:
    for code in (0, 1, 42):
        got = await shell.run(f"echo out{code}; echo err{code} >&2; exit {code}")
        assert (got.returncode, got.stdout, got.stderr) == (
            code, f"out{code}\n".encode(), f"err{code}\n".encode(),
        )  # fmt: skip
    assert (await shell.run("false")).returncode == 1
    assert (await shell.run("kill -9 $$")).returncode == 137


async def test_all_byte_values(shell: Shell) -> None:
    escapes = "".join(f"\\{value:03o}" for value in range(256))
    assert (await shell.run(f"printf '{escapes}'")).stdout == bytes(range(256))
    assert (await shell.run("cat", stdin=bytes(range(256)))).stdout == bytes(range(256))
    # The command itself may hold any character but NUL.
    weird = "".join(chr(c) for c in range(1, 128)) + "é€"
    got = await shell.run("cat >/tmp/w <<'EOF'\n" + weird + "\nEOF\ncat /tmp/w")
    assert got.stdout == weird.encode() + b"\n"


async def test_one_mebibyte_exact(shell: Shell) -> None:
    start = time.monotonic()
    got = await shell.run("yes 0123456789abcdef | head -c 1048576")
    assert got.stdout == (b"0123456789abcdef\n" * (1 + (1 << 20) // 17))[: 1 << 20]
    data = os.urandom(1 << 20)
    got = await shell.run("cat; cat /dev/null >&2", stdin=data)
    assert got.stdout == data and got.stderr == b""
    got = await shell.run("cat >&2", stdin=data)
    assert got.stderr == data and got.stdout == b""
    print(f"3 MiB through the shell in {time.monotonic() - start:.2f} s")


async def test_timeout_kills_the_command_and_the_shell_stays_usable(shell: Shell) -> None:
    start = time.monotonic()
    with pytest.raises(ShellTimeout, match=r"within 1\.0 s; it was killed$") as info:
        await shell.run("echo started; sleep 300 & sleep 301", timeout=1.0)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 5
    assert info.value.stdout == b"started\n"
    assert (await shell.run("echo ok")).stdout == b"ok\n"
    # The whole process group is gone, the background sleep too.
    processes = (await shell.run("ps -o args", check=True)).stdout
    assert b"trio-shell-agent" in processes and b"sleep 30" not in processes


async def test_ten_concurrent_runs(shell: Shell) -> None:
    results: dict[int, GuestResult] = {}

    async def run(i: int) -> None:
        results[i] = await shell.run(f"echo {i}; echo e{i} >&2; usleep {(10 - i) * 1000}; exit {i}")

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(run, i)
    for i in range(10):
        assert (results[i].returncode, results[i].stdout, results[i].stderr) == (
            i, f"{i}\n".encode(), f"e{i}\n".encode(),
        )  # fmt: skip


async def test_check_raises_guest_command_error(shell: Shell) -> None:
    with pytest.raises(GuestCommandError) as info:
        await shell.run("echo so; echo sad >&2; exit 3", check=True)
    error = info.value
    assert (error.command, error.returncode, error.stdout, error.stderr) == (
        "echo so; echo sad >&2; exit 3", 3, b"so\n", b"sad\n",
    )  # fmt: skip
    assert isinstance(error, MachineError)
    assert (await shell.run("true", check=True)).returncode == 0


async def test_background_processes_do_not_hold_the_result(shell: Shell) -> None:
    start = time.monotonic()
    got = await shell.run("sleep 100 >/dev/null 2>&1 & echo started")
    assert got.stdout == b"started\n" and time.monotonic() - start < 5


async def test_max_output_in_the_guest(vm: Machine) -> None:
    shell = Shell(vm.channel("shell"), max_output=1000)
    await shell.wait_ready(timeout=BOOT_TIMEOUT)
    assert len((await shell.run("head -c 1000 /dev/zero")).stdout) == 1000
    with pytest.raises(ShellError, match="more than max_output=1000"):
        await shell.run("head -c 999 /dev/zero; echo too much >&2")
    assert (await shell.run("echo after")).stdout == b"after\n"


async def test_run_before_the_agent_is_up(vm: Machine) -> None:
    """A request sent while the guest still boots waits in the channel until it is read."""
    shell = Shell(vm.channel("shell"))
    got = await shell.run("cat /proc/uptime", timeout=BOOT_TIMEOUT)
    assert got.returncode == 0 and not shell.ready


async def test_finished_runs_are_removed_in_batches(shell: Shell) -> None:
    """The agent keeps a directory per run; a finished run's is marked sent, its files are
    emptied at once, and it is removed with others every 32 results (one rm for many), so
    neither the directories nor their data pile up."""
    count = 70
    start = time.monotonic()
    for _ in range(count):
        assert (await shell.run("true")).returncode == 0
    rate = count / (time.monotonic() - start)
    print(f"shell.run('true'): {rate:.0f} round trips/s")
    listing = await shell.run("ls /run/trio-shell", check=True)
    left = listing.stdout.split()
    # This run's own directory, the ones finished since the last batch, and none older.
    assert 1 <= len(left) <= 32 + 1, left
    # What a finished run read and printed does not wait for its directory's removal.
    size = 4 << 20
    result = await shell.run(f"head -c {size} /dev/zero", stdin=bytes(size), check=True)
    assert len(result.stdout) == size
    used = await shell.run("du -sk /run/trio-shell", check=True)
    assert int(used.stdout.split()[0]) < 1024, used


#: A command that kills the guest's shell agent: the agent, its writer and its workers are
#: one process group (the command's parent, ``$PPID``, is one of the workers), and so are
#: all holders of the agent's end of the port; the command leads a session of its own.
KILL_THE_AGENT = "read -r _ _ _ _ group _ </proc/$PPID/stat; kill -9 -$group"


async def test_a_lost_result_is_not_reported_as_killed(vm: Machine) -> None:
    """``kill -9 $PPID`` kills the agent's worker that waits for the command: the agent lives
    on, but that command's result never comes. The timeout says so, not "killed"."""
    shell = Shell(vm.channel("shell"), kill_timeout=2)
    await shell.wait_ready(timeout=BOOT_TIMEOUT)
    start = time.monotonic()
    with pytest.raises(ShellTimeout, match="answers, but it did not confirm") as info:
        await shell.run("kill -9 $PPID", timeout=2)
    assert 4 <= time.monotonic() - start < 10
    assert "killed" not in str(info.value)
    assert (await shell.run("echo ok")).stdout == b"ok\n"


async def test_an_agent_killed_by_its_command_is_reported_at_once(vm: Machine) -> None:
    """QEMU reports the guest closing the port (``VSERPORT_CHANGE``, which the machine passes
    on to its shell): the run that killed the agent fails at once, and so do later ones,
    until an agent runs again. (The tiny guest's init starts the agent once, never again.)"""
    shell = vm.shell
    await shell.wait_ready(timeout=BOOT_TIMEOUT)
    start = time.monotonic()
    with pytest.raises(ShellError, match=r"gone .* while .* ran: its outcome is unknown") as info:
        await shell.run(KILL_THE_AGENT, timeout=20)
    assert not isinstance(info.value, ShellTimeout)
    assert time.monotonic() - start < 5  # not the run's timeout
    start = time.monotonic()
    with pytest.raises(ShellError, match="the guest shell is gone: the guest closed its end"):
        await shell.run("echo hi", timeout=20)
    assert time.monotonic() - start < 1
    # Started again (here by hand, on the console), the agent serves the same shell.
    await vm.console.send_line(
        f"{SHELL_AGENT_PATH} /dev/virtio-ports/{SHELL_PORT_NAME} </dev/null >/dev/null 2>&1 &"
    )
    await shell.wait_ready(timeout=30)
    assert (await shell.run("echo back", check=True)).stdout == b"back\n"


async def test_kill_minus_one_in_the_guest_is_reported_at_once(vm: Machine) -> None:
    """``kill -9 -1`` kills every process but init and the caller: the agent too."""
    await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
    start = time.monotonic()
    with pytest.raises(ShellError, match="the guest shell is gone") as info:
        await vm.shell.run("kill -9 -1", timeout=20)
    assert not isinstance(info.value, ShellTimeout)
    assert time.monotonic() - start < 5
    with pytest.raises(ShellError, match="the guest shell is gone"):
        await vm.shell.run("true", timeout=20)


async def test_qemu_dying_ends_a_pending_run(guest: GuestImage, nursery: trio.Nursery) -> None:
    """No hang: QEMU's death ends a run that waits for a result, within moments."""

    async def kill_qemu(vm: Machine) -> None:
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)

    start = time.monotonic()
    with trio.fail_after(30), pytest.raises(MachineExited) as info:
        async with open_machine(guest.config()) as vm:
            await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
            nursery.start_soon(kill_qemu, vm)
            start = time.monotonic()
            await vm.shell.run("sleep 300", timeout=120)
    assert info.value.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 2
