"""``vm.invariant``: checked on entry and every interval, fails the block with
``InvariantViolated`` (the failing output, or the check's exception) as soon as it stops
holding, never outlives the block, lets the block's own exception and Ctrl-C through bare,
and gives way to ``MachineExited`` when QEMU dies.

Callable checks need no guest: they run on a ``-machine none`` QEMU. Guest commands run in
a clone of the tiny guest.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest
import trio

from trio_qemu import InvariantViolated, Machine, MachineError, MachineExited, ShellTimeout
from trio_qemu.pytest_plugin import MachineFactory
from trio_qemu.snapshot import Template, open_clone


@pytest.fixture
async def bare(machine: MachineFactory) -> Machine:
    return await machine(machine="none", args=["-nodefaults"])


async def test_guest_command_violated_fails_the_block(fresh_guest: Machine) -> None:
    shell = fresh_guest.shell
    await shell.run("echo fine > /tmp/state", check=True)
    # It holds through a block...
    async with fresh_guest.invariant("cat /tmp/state", interval=0.1):
        await trio.sleep(0.5)
    # ... and fails one as soon as it breaks.
    reached = False
    start = time.monotonic()
    with pytest.raises(InvariantViolated) as caught:
        async with fresh_guest.invariant("cat /tmp/state", interval=0.2):
            await shell.run("rm /tmp/state", check=True)
            await trio.sleep(30)
            reached = True
    assert not reached and time.monotonic() - start < 10
    error = caught.value
    assert error.check == "cat /tmp/state" and error.checks >= 1
    assert error.returncode == 1 and b"No such file" in error.stderr
    assert "invariant guest command 'cat /tmp/state' exited with status 1" in str(error)
    assert error.__cause__ is None and error.__suppress_context__

    # Broken on entry: the block never runs.
    with pytest.raises(InvariantViolated, match="after holding 0 time"):
        async with fresh_guest.invariant("cat /tmp/state"):
            pytest.fail("the block ran")
    # A command that outlives the timeout is a violation too.
    with pytest.raises(InvariantViolated, match="could not run") as caught:
        async with fresh_guest.invariant("sleep 30", timeout=0.3):
            pass
    assert isinstance(caught.value.error, ShellTimeout)
    assert (await shell.run("echo usable")).stdout == b"usable\n"


async def test_callable_checked_on_entry_then_every_interval(bare: Machine) -> None:
    calls: list[float] = []

    async def running() -> bool:
        calls.append(trio.current_time())
        return (await bare.cmd("query-status"))["running"] is True

    async with bare.invariant(running, interval=0.1):
        assert len(calls) == 1  # once on entry, before the block
        await trio.sleep(0.55)
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert len(calls) >= 3 and min(gaps) >= 0.099  # every interval, never more often
    after = len(calls)
    await trio.sleep(0.3)
    assert len(calls) == after  # the checking task ended with the block


async def test_callable_violations_carry_what_happened(bare: Machine) -> None:
    state: dict[str, object] = {"value": True}

    async def flag() -> object:
        return state["value"]

    with pytest.raises(InvariantViolated, match="returned 0") as caught:
        async with bare.invariant(flag, interval=0.05):
            state["value"] = 0
            await trio.sleep(10)
    assert caught.value.value == 0 and caught.value.error is None

    async def broken() -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(InvariantViolated, match="disk on fire") as caught:
        async with bare.invariant(broken):
            pass
    assert isinstance(caught.value.error, RuntimeError)
    assert caught.value.__cause__ is caught.value.error

    async def hangs() -> None:
        await trio.sleep_forever()

    with pytest.raises(InvariantViolated, match=r"did not finish within 0\.2 s") as caught:
        async with bare.invariant(hangs, timeout=0.2):
            pass
    assert isinstance(caught.value.error, TimeoutError)


async def test_the_blocks_own_exception_wins(bare: Machine) -> None:
    async def holds() -> None:
        return None

    async def breaks_soon() -> bool:
        return trio.current_time() < deadline

    with pytest.raises(KeyError) as caught:  # bare, not in an ExceptionGroup
        async with bare.invariant(holds, interval=0.05):
            await trio.sleep(0.1)
            raise KeyError("mine")
    assert caught.type is KeyError
    # Even when the invariant broke meanwhile and the block raises while cancelled.
    deadline = trio.current_time() + 0.1
    with pytest.raises(ZeroDivisionError):
        async with bare.invariant(breaks_soon, interval=0.05):
            try:
                await trio.sleep(10)
            finally:
                1 / 0  # noqa: B018
    with pytest.raises(KeyboardInterrupt):
        async with bare.invariant(holds, interval=0.05):
            raise KeyboardInterrupt


async def test_bad_arguments(bare: Machine) -> None:
    async def holds() -> None:
        return None

    def not_async() -> bool:
        return True

    for name, arguments in (("interval", {"interval": 0}), ("timeout", {"timeout": -1})):
        with pytest.raises(ValueError, match=f"^{name} must be a positive"):
            async with bare.invariant(holds, **arguments):
                pass
    with pytest.raises(TypeError, match=r"guest command .* or an async callable"):
        async with bare.invariant(42):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="not an awaitable"):
        async with bare.invariant(not_async):  # type: ignore[arg-type]
            pass
    with pytest.raises(MachineError, match="no shell channel"):
        async with bare.invariant("true"):
            pass


async def test_qemu_dying_raises_the_machines_error(guest_template: Template) -> None:
    with pytest.raises(MachineExited):
        async with open_clone(guest_template) as vm, vm.invariant("true", interval=0.1):
            os.kill(vm.pid or 0, signal.SIGKILL)
            await trio.sleep(30)
