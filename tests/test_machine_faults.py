"""QEMU dying, exiting or hanging while a machine is in use, and body errors during teardown.

Every test asserts the exact type the user sees (``type(err) is X``): one of our errors or
the body's own exception, never an ExceptionGroup of internal tasks.
"""

from __future__ import annotations

import os
import signal

import pytest
import trio
from census import assert_gone

import trio_qemu
from trio_qemu import AbnormalShutdown, MachineExited

#: How soon after QEMU's death the block must have raised (the brief's bound).
PROMPT = 0.5






async def _kill_later(pid: int | None, delay: float, killed_at: list[float]) -> None:
    assert pid is not None
    await trio.sleep(delay)
    killed_at.append(trio.current_time())
    os.kill(pid, signal.SIGKILL)


async def _quit_behind_our_back(vm: trio_qemu.Machine, delay: float, sent_at: list[float]) -> None:
    await trio.sleep(delay)
    sent_at.append(trio.current_time())
    # The raw client: the machine does not know that this quit was asked for.
    await vm.qmp_client.qmp("quit")


# -- QEMU dies while we wait -------------------------------------------------------------
async def test_sigkill_during_event_wait() -> None:
    killed_at: list[float] = []
    async with trio.open_nursery() as nursery:
        with pytest.raises(MachineExited) as info:
            async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
                nursery.start_soon(_kill_later, vm.pid, 0.2, killed_at)
                await vm.event_wait("NEVER", timeout=30)
        raised_at = trio.current_time()
    assert type(info.value) is MachineExited
    assert info.value.returncode == -signal.SIGKILL
    assert vm.returncode == -signal.SIGKILL
    assert "killed by signal 9" in str(info.value)
    assert raised_at - killed_at[0] < PROMPT
    assert_gone(vm)


async def test_sigkill_during_console_wait_for() -> None:
    killed_at: list[float] = []
    async with trio.open_nursery() as nursery:
        with pytest.raises(MachineExited) as info:
            async with trio_qemu.open_machine(
                machine="none", console=True, args=["-nodefaults"]
            ) as vm:
                nursery.start_soon(_kill_later, vm.pid, 0.2, killed_at)
                await vm.console.wait_for(b"NEVER", timeout=30)
        raised_at = trio.current_time()
    assert type(info.value) is MachineExited
    assert info.value.returncode == -signal.SIGKILL
    assert vm.returncode == -signal.SIGKILL
    assert raised_at - killed_at[0] < PROMPT
    assert_gone(vm)


async def test_sigkill_while_body_sleeps() -> None:
    killed_at: list[float] = []
    body_cancelled = False
    async with trio.open_nursery() as nursery:
        with pytest.raises(MachineExited) as info:
            async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
                nursery.start_soon(_kill_later, vm.pid, 0.2, killed_at)
                try:
                    await trio.sleep(30)
                except trio.Cancelled:
                    body_cancelled = True
                    raise
        raised_at = trio.current_time()
    assert body_cancelled
    assert type(info.value) is MachineExited
    assert info.value.returncode == -signal.SIGKILL
    assert raised_at - killed_at[0] < PROMPT
    assert_gone(vm)


async def test_quit_behind_our_back_while_body_sleeps() -> None:
    sent_at: list[float] = []
    async with trio.open_nursery() as nursery:
        with pytest.raises(MachineExited) as info:
            async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
                nursery.start_soon(_quit_behind_our_back, vm, 0.1, sent_at)
                await trio.sleep(30)
        raised_at = trio.current_time()
    assert type(info.value) is MachineExited
    assert info.value.returncode == 0
    assert vm.returncode == 0
    assert "exit status 0" in str(info.value)
    assert raised_at - sent_at[0] < PROMPT
    assert_gone(vm)


async def test_sigkill_during_qmp_command_in_flight() -> None:
    # A command whose reply can never come: QEMU is SIGSTOPped, then killed. Our unread
    # command in QEMU's socket buffer makes the kernel reset the connection (ECONNRESET)
    # rather than end it cleanly; the caller must still see MachineExited.
    killed_at: list[float] = []
    caught: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
                assert vm.pid is not None
                os.kill(vm.pid, signal.SIGSTOP)
                nursery.start_soon(_kill_later, vm.pid, 0.2, killed_at)
                await vm.cmd("query-status", timeout=30)
        except Exception as exc:  # checked outside the nursery, so never in a group
            caught = exc
        raised_at = trio.current_time()
    assert type(caught) is MachineExited, repr(caught)
    assert caught.returncode == -signal.SIGKILL
    assert raised_at - killed_at[0] < PROMPT
    assert_gone(vm)


# -- QEMU hangs ----------------------------------------------------------------------------
async def test_sigstop_shutdown_raises_abnormal_shutdown() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGSTOP)
        start = trio.current_time()
        with pytest.raises(AbnormalShutdown) as info:
            await vm.shutdown(timeout=1)
        elapsed = trio.current_time() - start
        assert type(info.value) is AbnormalShutdown
        assert 0.9 <= elapsed < 3.0
        assert vm.returncode == -signal.SIGKILL  # SIGKILL works on a stopped process
        assert_gone(vm)
    # The block's own exit has nothing left to do and raises nothing.
    assert vm.returncode == -signal.SIGKILL


async def test_sigstop_block_exit_raises_abnormal_shutdown() -> None:
    start = trio.current_time()
    with pytest.raises(AbnormalShutdown) as info:
        async with trio_qemu.open_machine(
            machine="none", args=["-nodefaults"], shutdown_timeout=0.5
        ) as vm:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGSTOP)
    assert type(info.value) is AbnormalShutdown
    assert trio.current_time() - start < 3.0
    assert vm.returncode == -signal.SIGKILL
    assert_gone(vm)


# -- the body's own error always wins ------------------------------------------------------
async def test_body_exception_propagates_as_is() -> None:
    with pytest.raises(ValueError, match="from the body") as info:
        async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
            raise ValueError("from the body")
    assert type(info.value) is ValueError
    assert vm.returncode == 0  # still a graceful stop
    assert_gone(vm)


async def test_body_exception_wins_over_failed_graceful_stop() -> None:
    start = trio.current_time()
    with pytest.raises(ValueError, match="from the body") as info:
        async with trio_qemu.open_machine(
            machine="none", args=["-nodefaults"], shutdown_timeout=0.5
        ) as vm:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGSTOP)  # teardown's quit gets no answer: SIGKILL
            raise ValueError("from the body")
    assert type(info.value) is ValueError
    assert trio.current_time() - start < 3.0
    assert vm.returncode == -signal.SIGKILL
    assert_gone(vm)


async def test_body_exception_wins_over_qemu_death() -> None:
    with pytest.raises(ValueError, match="from the body") as info:
        async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGKILL)
            raise ValueError("from the body")
    assert type(info.value) is ValueError
    assert vm.returncode == -signal.SIGKILL
    assert_gone(vm)


async def test_outer_cancel_during_failed_graceful_stop_is_bounded() -> None:
    # An outer cancel while QEMU hangs: the teardown still runs to its end (SIGKILL after
    # shutdown_timeout) and the cancel is honoured, with nothing left behind.
    with trio.CancelScope() as scope:
        async with trio_qemu.open_machine(
            machine="none", args=["-nodefaults"], shutdown_timeout=0.5
        ) as vm:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGSTOP)
            scope.cancel()
            start = trio.current_time()
            await trio.sleep(30)
    assert scope.cancelled_caught
    assert 0.5 <= trio.current_time() - start < 3.0
    assert vm.returncode == -signal.SIGKILL
    assert_gone(vm)
