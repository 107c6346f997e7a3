"""Many machines at once: scenarios read as nurseries (issue: parallel multi-VM scenarios)."""

from __future__ import annotations

import pytest
import trio
from census import assert_gone, qemu_children

import trio_qemu
from trio_qemu.guest import GuestImage


async def test_eight_guests_boot_concurrently_to_their_shells(tiny_guest: GuestImage) -> None:
    configs = [tiny_guest.config(name=f"node{i}", memory=128) for i in range(8)]
    with trio.fail_after(180):
        async with trio_qemu.open_machines(*configs) as vms:
            async with trio.open_nursery() as nursery:
                for vm in vms:
                    nursery.start_soon(vm.shell.wait_ready, 150)
            results = {}

            async def hostname(vm: trio_qemu.Machine) -> None:
                results[vm.name] = await vm.shell.run("uname -n; echo $((6 * 7))", timeout=60)

            async with trio.open_nursery() as nursery:
                for vm in vms:
                    nursery.start_soon(hostname, vm)
    assert sorted(results) == [f"node{i}" for i in range(8)]
    assert all(r.returncode == 0 and r.stdout.endswith(b"42\n") for r in results.values())
    for vm in vms:
        assert vm.returncode == 0
        assert_gone(vm)


async def test_thirty_two_machines_launch_and_stop_together() -> None:
    configs = [
        trio_qemu.MachineConfig(name=f"m{i}", machine="none", args=["-nodefaults"])
        for i in range(32)
    ]
    with trio.fail_after(120):
        async with trio_qemu.open_machines(*configs) as vms:
            assert len(qemu_children()) == 32
            statuses = []

            async def status(vm: trio_qemu.Machine) -> None:
                statuses.append((await vm.cmd("query-status"))["status"])

            async with trio.open_nursery() as nursery:
                for vm in vms:
                    nursery.start_soon(status, vm)
            assert statuses == ["running"] * 32
    assert qemu_children() == set()
    assert all(vm.returncode == 0 for vm in vms)


async def test_one_failed_launch_cancels_the_others_and_names_the_machine() -> None:
    configs = [
        trio_qemu.MachineConfig(name=f"ok{i}", machine="none", args=["-nodefaults"])
        for i in range(6)
    ]
    configs.insert(3, trio_qemu.MachineConfig(name="broken", machine="bogus"))
    with trio.fail_after(60), pytest.raises(trio_qemu.LaunchError) as info:
        async with trio_qemu.open_machines(*configs):
            pytest.fail("the block must not run")  # pragma: no cover
    assert info.value.name == "broken"
    assert "unsupported machine type" in info.value.output  # the log tail is carried
    assert "broken" in str(info.value)
    assert qemu_children() == set()
