"""Shell waits in the real guest: ``wait_until_succeeds``, ``wait_until_fails`` and
``wait_for_file`` poll a command until it answers as wanted, raise ``GuestWaitTimeout`` with
the last run's output, refuse bad timeouts, and end at once when QEMU dies."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import trio
import trio.testing

from trio_qemu import GuestWaitTimeout, Machine, MachineExited, ShellTimeout
from trio_qemu._shell import Shell
from trio_qemu.snapshot import Template, open_clone

#: A command that makes ``path`` appear (or vanish) in the guest after ``delay`` seconds,
#: in the background, so the run returns at once.
LATER = "(sleep {delay}; {action}) >/dev/null 2>&1 &"


async def test_waits_return_the_run_that_answered(fresh_guest: Machine) -> None:
    shell = fresh_guest.shell
    await shell.run(LATER.format(delay=0.6, action="echo ready > /tmp/flag"), check=True)
    start = time.monotonic()
    found = await shell.wait_for_file("/tmp/flag", timeout=20, interval=0.1)
    assert found.returncode == 0 and found.command == "test -e /tmp/flag"
    assert time.monotonic() - start >= 0.4  # it polled until the file came
    result = await shell.wait_until_succeeds("cat /tmp/flag", timeout=20, interval=0.1)
    assert (result.returncode, result.stdout) == (0, b"ready\n")

    await shell.run(LATER.format(delay=0.6, action="rm /tmp/flag"), check=True)
    gone = await shell.wait_until_fails("cat /tmp/flag", timeout=20, interval=0.1)
    assert gone.returncode == 1 and b"No such file" in gone.stderr


async def test_timeouts_carry_the_last_output(fresh_guest: Machine) -> None:
    shell = fresh_guest.shell
    with pytest.raises(GuestWaitTimeout) as caught:
        await shell.wait_until_succeeds("echo out; echo err >&2; exit 3", timeout=1.5, interval=0.1)
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert (error.returncode, error.stdout, error.stderr) == (3, b"out\n", b"err\n")
    assert error.attempts >= 2  # (the last one may have been killed, out of time)
    assert "did not exit with status 0 within 1.5 s" in str(error) and "err" in str(error)

    with pytest.raises(GuestWaitTimeout) as caught:
        await shell.wait_until_fails("echo still here", timeout=1, interval=0.1)
    assert (caught.value.returncode, caught.value.stdout) == (0, b"still here\n")

    with pytest.raises(GuestWaitTimeout, match="test -e /no/such"):
        await shell.wait_for_file("/no/such", timeout=0.5, interval=0.1)

    # A run still going when the time is up is killed; its ShellTimeout is the cause.
    with pytest.raises(GuestWaitTimeout) as caught:
        await shell.wait_until_succeeds("sleep 30", timeout=0.5)
    assert caught.value.result is None and caught.value.attempts == 1
    assert isinstance(caught.value.error, ShellTimeout)
    assert caught.value.__cause__ is caught.value.error
    assert (await shell.run("echo usable")).stdout == b"usable\n"


@pytest.mark.parametrize("name", ["timeout", "interval"])
@pytest.mark.parametrize("value", [0, -1, math.nan])
async def test_bad_timeouts_are_refused_before_running(name: str, value: float) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    shell = Shell(ours)  # no guest: nothing may be sent
    arguments = {"timeout": 5.0, "interval": 0.1, name: value}
    for wait in (shell.wait_until_succeeds, shell.wait_until_fails, shell.wait_for_file):
        with pytest.raises(ValueError, match=f"^{name} must be a positive number"):
            await wait("true", **arguments)
    with trio.move_on_after(0.01):
        assert await theirs.receive_some() == b"", "a request was sent"


async def test_qemu_dying_ends_a_wait_at_once(guest_template: Template) -> None:
    killed = ended = 0.0
    raised: BaseException | None = None
    with pytest.raises(MachineExited):
        async with open_clone(guest_template) as vm:

            async def kill_soon() -> None:
                nonlocal killed
                await trio.sleep(0.5)  # while the wait sleeps between two runs
                killed = time.monotonic()
                os.kill(vm.pid or 0, signal.SIGKILL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                try:
                    await vm.shell.wait_until_succeeds("false", timeout=60, interval=10)
                except MachineExited as exc:  # kept, not raised into the nursery
                    ended, raised = time.monotonic(), exc
    assert isinstance(raised, MachineExited)  # the wait itself raised the machine's error
    assert 0 < ended - killed < 1.0
