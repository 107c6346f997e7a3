"""Soak: many launch/teardown cycles with flat fds and memory; many VMs with many commands
in flight and every reply back at its own caller.

The default run checks both at a small size (30 cycles; 8 VMs x 200 commands). The full size
(500 cycles; 32 VMs x 1000 commands) runs only with ``TRIO_QEMU_SOAK=1``: it is the same
check, longer, so without the variable it is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import pytest
import trio
from census import Census, fd_changes, open_fds, qemu_children
from reliability import make_base

import trio_qemu
from trio_qemu import MachineConfig

SOAK = os.environ.get("TRIO_QEMU_SOAK") == "1"
soak = pytest.mark.skipif(
    not SOAK,
    reason="soak size: a longer variant of the test above; set TRIO_QEMU_SOAK=1 to run it",
)


def rss_kib() -> int:
    """This process's resident set size in KiB."""
    with open("/proc/self/status") as f:
        return int(re.findall(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)[0])


# -- launch/teardown cycles --------------------------------------------------------------------
async def _cycles(
    base: Path, count: int, every: int, warm_up: int
) -> tuple[Census, list[dict[int, str]], list[int], float]:
    """``count`` launch/query/teardown cycles after ``warm_up`` ones. The census (the fd
    map's baseline) is taken after the warm-up, before the counted cycles; the fd map and
    RSS (KiB) are sampled after every ``every``-th cycle. Returns the census, the samples
    and the seconds per cycle."""
    census: Census | None = None
    fds: list[dict[int, str]] = []
    rss: list[int] = []
    start = 0.0
    for cycle in range(warm_up + count):
        if cycle == warm_up:
            # collects earlier tests' garbage first, so none frees fds mid-curve
            census = Census(base)
            start = time.monotonic()
        with trio.fail_after(60):
            async with trio_qemu.open_machine(
                machine="none", args=["-nodefaults"], base_temp_dir=base
            ) as vm:
                assert (await vm.cmd("query-status"))["running"] is True
        assert vm.returncode == 0
        done = cycle + 1 - warm_up
        if done > 0 and done % every == 0:
            fds.append(open_fds())
            rss.append(rss_kib())
    assert census is not None
    return census, fds, rss, (time.monotonic() - start) / count


def _curve(name: str, every: int, values: list[int]) -> str:
    points = " ".join(f"{(i + 1) * every}:{v}" for i, v in enumerate(values))
    return f"{name} (cycle:value) {points}"


def _assert_fds_flat(census: Census, every: int, samples: list[dict[int, str]]) -> None:
    """Every sampled fd map is the baseline's: same numbers, same targets."""
    for i, sample in enumerate(samples):
        assert sample == census.fds, f"after cycle {(i + 1) * every}: " + fd_changes(
            census.fds, sample
        )


async def test_launch_teardown_cycles_small(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    census, fds, rss, per_cycle = await _cycles(base, count=30, every=1, warm_up=5)
    print(f"30 cycles, {per_cycle * 1000:.0f} ms each")
    print(_curve("fds", 1, [len(sample) for sample in fds]))
    print(_curve("RSS KiB", 1, rss))
    _assert_fds_flat(census, 1, fds)  # not one fd more, less or different, ever
    assert max(rss) - rss[0] < 4096, rss  # KiB: no trend visible at this size
    census.check("after the cycles")


@soak
async def test_launch_teardown_cycles_soak(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    every = 10
    census, fds, rss, per_cycle = await _cycles(base, count=500, every=every, warm_up=20)
    print(f"500 cycles, {per_cycle * 1000:.0f} ms each")
    print(_curve("fds", every, [len(sample) for sample in fds]))
    print(_curve("RSS KiB", every, rss))
    first, last = slice(0, 100 // every), slice(-100 // every, None)
    rss_first, rss_last = statistics.mean(rss[first]), statistics.mean(rss[last])
    print(
        f"first 100 cycles: {rss_first / 1024:.1f} MiB RSS; last 100: {rss_last / 1024:.1f} MiB RSS"
    )
    _assert_fds_flat(census, every, fds)
    assert rss_last - rss_first < 2048, rss  # KiB
    census.check("after the soak")


# -- many VMs, many commands in flight ---------------------------------------------------------
_DEVICE = re.compile(r"Device '/n(\d+)' not found")


async def _ask(vm: trio_qemu.Machine, number: int) -> int:
    """A command whose answer carries ``number``: HMP ``print`` (odd) or a refused
    ``qom-get`` naming it (even; the error is routed like a reply)."""
    if number % 2:
        text = await vm.hmp(f"print {number}", timeout=300)
        return int(text.strip(), 16)
    reply = await vm.qmp("qom-get", path=f"/n{number}", property="x", timeout=300)
    found = _DEVICE.search(reply["error"]["desc"])
    assert found is not None, reply
    return int(found.group(1))


async def _many(base: Path, machines: int, commands: int) -> float:
    """``commands`` concurrent commands on each of ``machines`` VMs, all at once; checks
    that every caller got its own answer; returns the commands per second."""
    configs = [
        MachineConfig(
            name=f"soak{i}", machine="none", args=["-nodefaults"], base_temp_dir=str(base)
        )
        for i in range(machines)
    ]
    answers: list[dict[int, int]] = [{} for _ in range(machines)]

    async def one(index: int, vm: trio_qemu.Machine, number: int) -> None:
        answers[index][number] = await _ask(vm, number)

    with trio.fail_after(600):
        async with trio_qemu.open_machines(*configs) as vms:
            assert len(qemu_children()) == machines
            start = time.monotonic()
            async with trio.open_nursery() as nursery:
                for index, vm in enumerate(vms):
                    for k in range(commands):
                        nursery.start_soon(one, index, vm, index * 1_000_000 + k)
            elapsed = time.monotonic() - start
    for index in range(machines):
        got = answers[index]
        assert len(got) == commands, f"VM {index}: {commands - len(got)} answers lost"
        wrong = {n: a for n, a in got.items() if n != a}
        assert not wrong, f"VM {index}: answers at the wrong caller: {list(wrong.items())[:5]}"
    for vm in vms:
        assert vm.returncode == 0
    return machines * commands / elapsed


async def test_concurrent_commands_small(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"], base_temp_dir=base):
        pass  # warm-up for the fd baseline
    census = Census(base)
    rate = await _many(base, machines=8, commands=200)
    print(f"8 VMs x 200 concurrent commands: {rate:.0f} commands/s, none lost or misrouted")
    census.check("after 8 x 200")


@soak
async def test_concurrent_commands_soak(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"], base_temp_dir=base):
        pass
    census = Census(base)
    rate = await _many(base, machines=32, commands=1000)
    print(f"32 VMs x 1000 concurrent commands: {rate:.0f} commands/s, none lost or misrouted")
    census.check("after 32 x 1000")
