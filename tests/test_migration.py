"""Live migration over a socketpair, against real QEMUs under TCG.

Most tests migrate a guest-less q35 machine (SeaBIOS only: ~1 MB to send, ~30 ms): enough to
exercise every path of :func:`migrate`. Slow migrations for the timeout, cancel and kill
tests come from QEMU's own ``max-bandwidth`` parameter, not from a big guest. One test
migrates the tiny Linux guest with a counter running and reads it on the destination.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import trio

from trio_qemu import Machine, MachineConfig
from trio_qemu.guest import GuestImage
from trio_qemu.migration import MigrationError, incoming_config, migrate
from trio_qemu.pytest_plugin import MachineFactory

BARE = MachineConfig(machine="q35", memory=128, args=["-nodefaults"])
#: bytes/s: SeaBIOS's ~0.9 MB then takes ~9 s to send, plenty for timeout/cancel/kill tests
SLOW = 100_000


def fds(pid: int | str = "self") -> set[str]:
    """The open fd numbers of a process."""
    return set(os.listdir(f"/proc/{pid}/fd"))


async def status(vm: Machine) -> str:
    return str((await vm.cmd("query-status"))["status"])


async def slow_down(vm: Machine) -> None:
    await vm.cmd("migrate-set-parameters", {"max-bandwidth": SLOW})


# --- the destination config -------------------------------------------------------------


def test_incoming_config_adds_defer_and_keeps_the_rest() -> None:
    config = BARE.replace(name="a", kernel="/k", smp=2)
    dst = incoming_config(config)
    assert dst.args == ("-nodefaults", "-incoming", "defer")
    assert dst.replace(args=config.args, name="a") == config
    assert dst.name == "a-incoming"
    assert incoming_config(config, name="b").name == "b"
    assert incoming_config(BARE).name is None  # the machine picks a unique one
    assert incoming_config(dst).args == dst.args  # idempotent
    assert dst.argv()[-2:] == ["-incoming", "defer"]
    with pytest.raises(ValueError, match="-incoming defer"):
        incoming_config(BARE.replace(args=["-incoming", "tcp:0:4444"]))


# --- migrations that work -----------------------------------------------------------------


async def test_migrate_bare_machine_twice_in_a_row(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE))
    dst2 = await machine(incoming_config(BARE))
    ours = fds()
    qemu_fds = {vm.pid: fds(vm.pid) for vm in (src, dst, dst2) if vm.pid is not None}

    stats = await migrate(src, dst, timeout=30)
    assert stats["status"] == "completed"
    assert stats["total-time"] >= stats["downtime"] >= 0
    assert stats["ram"]["total"] >= 128 << 20
    assert 0 < stats["ram"]["transferred"] < stats["ram"]["total"]
    assert await status(src) == "postmigrate"
    assert await status(dst) == "running"

    # The destination is now a running source; a fresh fd name makes the second one work.
    stats2 = await migrate(dst, dst2, timeout=30)
    assert stats2["status"] == "completed"
    assert await status(dst) == "postmigrate"
    assert await status(dst2) == "running"

    assert fds() <= ours  # our socketpair copies are closed
    for vm in (src, dst, dst2):  # each QEMU took its fd and closed it at the end
        assert vm.pid is not None
        assert fds(vm.pid) == qemu_fds[vm.pid]


async def test_running_guest_keeps_counting_on_the_destination(
    machine: MachineFactory, tiny_guest: GuestImage
) -> None:
    src = await machine(guest=True, memory=128)
    dst = await machine(incoming_config(src.config))
    await src.shell.run(
        "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done'"
        " >/dev/null 2>&1 &",
        check=True,
    )
    started = await src.shell.run(
        "until [ -s /tmp/count ]; do sleep 0.1; done; cat /tmp/count", check=True, timeout=30
    )

    stats = await migrate(src, dst, timeout=60)
    assert stats["status"] == "completed"
    assert stats["ram"]["transferred"] > 10 << 20  # a booted Linux, not just zero pages

    # The guest's shell agent carried on; the destination's channel is its own socketpair.
    first = await dst.shell.run("cat /tmp/count", check=True)
    second = await dst.shell.run("sleep 1; cat /tmp/count", check=True)
    assert int(started.stdout) <= int(first.stdout) < int(second.stdout)
    assert await status(src) == "postmigrate"
    assert await status(dst) == "running"


# --- migrations that must not or cannot happen ------------------------------------------


async def test_destination_without_incoming_defer_is_refused(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(BARE)
    with pytest.raises(MigrationError, match=r"'running', not 'inmigrate'.*-incoming defer"):
        await migrate(src, dst)
    assert await status(src) == "running"
    assert await status(dst) == "running"
    with pytest.raises(ValueError, match="itself"):
        await migrate(src, src)


async def test_incompatible_destination_fails_with_qemus_reason(
    machine: MachineFactory,
) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE).replace(memory=256))
    assert src.pid is not None
    ours, theirs = fds(), fds(src.pid)

    with pytest.raises(MigrationError) as caught:
        await migrate(src, dst, timeout=30)
    error = caught.value
    assert "Size mismatch: pc.ram" in error.reason  # the destination's own words
    assert "Size mismatch: pc.ram" in str(error)
    assert error.source_status == "failed"
    assert error.destination_status == "exited"
    # The destination's exit was expected: cleaned up, no MachineExited anywhere.
    assert dst.returncode == 1 and dst.failure is None
    assert await status(src) == "running"
    assert (await src.cmd("query-migrate"))["status"] == "failed"
    assert fds() <= ours
    assert fds(src.pid) == theirs


async def test_destination_killed_midway(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE))
    await slow_down(src)
    assert src.pid is not None
    ours, theirs = fds(), fds(src.pid)
    errors: list[MigrationError] = []

    async def run() -> None:
        with pytest.raises(MigrationError) as caught:
            await migrate(src, dst, timeout=60)
        errors.append(caught.value)

    active = dst.subscribe("MIGRATION", match={"data": {"status": "active"}})
    with trio.fail_after(30), active:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await active.receive()
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGKILL)
    [error] = errors
    assert "killed by signal 9" in str(error)
    assert error.destination_status == "exited"
    assert error.source_status == "failed"
    assert "Unable to write to socket" in error.reason
    assert dst.returncode == -signal.SIGKILL and dst.failure is None
    assert await status(src) == "running"
    assert fds() <= ours
    assert fds(src.pid) == theirs


async def test_timeout_cancels_the_migration(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE))
    await slow_down(src)
    assert src.pid is not None
    theirs = fds(src.pid)
    with trio.fail_after(20):
        with pytest.raises(MigrationError, match=r"did not complete within 0\.5 s.*cancelled"):
            await migrate(src, dst, timeout=0.5)
    info: dict[str, Any] = await src.cmd("query-migrate")
    assert info["status"] == "cancelled"
    assert await status(src) == "running"  # the source runs on as before
    assert dst.returncode == 1 and dst.failure is None  # its stream broke off: it exited
    assert fds(src.pid) == theirs


async def test_cancel_from_outside_aborts_the_migration(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE))
    await slow_down(src)
    with trio.move_on_after(0.5) as scope:
        await migrate(src, dst)
    assert scope.cancelled_caught
    assert (await src.cmd("query-migrate"))["status"] == "cancelled"
    assert await status(src) == "running"
    assert dst.returncode == 1 and dst.failure is None


async def test_refused_capability_leaves_both_sides_usable(machine: MachineFactory) -> None:
    src = await machine(BARE)
    dst = await machine(incoming_config(BARE))
    with pytest.raises(MigrationError, match="refused migrate-set-capabilities"):
        await migrate(src, dst, capabilities={"no-such-capability": True})
    with pytest.raises(ValueError, match="events"):
        await migrate(src, dst, capabilities={"events": False})
    assert await status(dst) == "inmigrate"
    stats = await migrate(src, dst, timeout=30, capabilities={"xbzrle": True})
    assert stats["status"] == "completed"
