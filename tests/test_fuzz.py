"""Cancellation fuzz (seeded, 214 cancellation points in all) against a real QEMU under TCG:
a run cut short at any point leaks nothing, and a machine whose block is cut ends gracefully.

- ``-machine none`` lifecycles (launch, QMP commands including ``query-qmp-schema``,
  subscriptions, event waits, concurrent calls, teardown), SeaBIOS console waits,
  ``shell.run`` in booted tiny guests, and a tiny-guest clone's restore on a switch
  (launch, ``migrate-incoming`` and ``cont``, the guest sync with its identity). Half the
  cuts are timed (``move_on_after``); the other half land after the N-th task step of the
  run, counted by a Trio instrument, so they fall exactly on a checkpoint (see
  :mod:`reliability`); the clone's cuts are all timed, spread over its phases.
- After every trial, a census (:mod:`census`): no QEMU child of this process (zombies
  included), exactly the fds of a baseline taken after a warm-up, no temporary directory
  left under a dedicated ``base_temp_dir``, no unix socket bound there.
- How each machine ended: a cut that lands in the user's block (or in the teardown, or after
  the run) must still end with QEMU obeying ``quit`` (exit status 0), never with a SIGKILL.
  Only a cut during the launch may leave no machine to quit.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from census import Census, assert_gone
from reliability import (
    BOOT_TIMEOUT,
    SEABIOS_LOOP,
    Calibration,
    Cut,
    Tally,
    calibrate,
    cut_after,
    draw_cut,
    ending,
    make_base,
)

import trio_qemu
from trio_qemu.guest import GuestImage
from trio_qemu.network import Switch
from trio_qemu.snapshot import Template, ensure_template, restore
from trio_qemu.snapshot._clone import _sync_guest

SEED = 20240607


def settle(run: Run, cut: Cut, landed: str, tally: Tally, census: Census, where: str) -> None:
    """Count how a trial ended and check it: the machine exists exactly once the launch is
    over ("launch" is the last mark before the opener yields, the next follows it without a
    checkpoint), a machine that existed ended gracefully, and nothing is left behind."""
    how = ending(run.vm)
    tally.add(cut, landed, how)
    assert (run.vm is None) == (landed == "launch"), f"{where}: {how}"
    if run.vm is not None:
        assert how == "graceful", f"{where}: QEMU ended {how}\n{run.vm.log[-2000:]}"
    census.check(where)


# -- -machine none and the console -------------------------------------------------------------
@dataclass
class Run:
    """One lifecycle run: the phases it reached, and its machine once launched."""

    marks: list[str] = field(default_factory=list)
    vm: trio_qemu.Machine | None = None


async def _none_lifecycle(base: Path, run: Run) -> None:
    run.marks.append("launch")
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], base_temp_dir=base
    ) as vm:
        run.vm = vm
        run.marks.append("command")
        assert (await vm.cmd("query-status"))["running"] is True
        run.marks.append("schema")
        schema = await vm.cmd("query-qmp-schema")
        assert isinstance(schema, list) and len(schema) > 100
        run.marks.append("subscription")
        async with vm.subscribe("STOP", "RESUME") as events:
            await vm.cmd("stop")
            assert (await events.receive())["event"] == "STOP"
            await vm.cmd("cont")
            assert (await events.receive())["event"] == "RESUME"
        run.marks.append("event_wait")
        await vm.cmd("stop")
        await vm.event_wait("STOP", timeout=30)
        await vm.cmd("cont")
        run.marks.append("concurrent")
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(vm.cmd, "query-status")
            nursery.start_soon(vm.hmp, "info version")
        run.marks.append("teardown")
    run.marks.append("completed")


async def _console_lifecycle(base: Path, run: Run) -> None:
    run.marks.append("launch")
    async with trio_qemu.open_machine(
        machine="q35,graphics=off", console=True, args=SEABIOS_LOOP, base_temp_dir=base
    ) as vm:
        run.vm = vm
        run.marks.append("wait_for")
        await vm.console.wait_for(b"SeaBIOS", timeout=30)
        run.marks.append("wait_for_regex")
        await vm.console.wait_for(re.compile(rb"No bootable device\.\s+Retrying"), timeout=30)
        run.marks.append("write")
        await vm.console.send_line("hello")
        run.marks.append("lines")
        seen = 0
        async for _ in vm.console.lines():
            seen += 1
            if seen == 3:
                break
        run.marks.append("wait_for_reboot")
        await vm.console.wait_for(b"SeaBIOS", timeout=30)  # the next boot: the cursor moved
        run.marks.append("teardown")
    run.marks.append("completed")


async def _fuzz(
    lifecycle: Callable[[Path, Run], Awaitable[None]],
    base: Path,
    trials: int,
    seed: int,
) -> tuple[Tally, Calibration]:
    rng = random.Random(seed)
    # The calibration runs are the warm-up too: lazily opened fds exist after them.
    calibration = await calibrate(partial(lifecycle, base, Run()))
    census = Census(base)
    tally = Tally()
    for trial in range(trials):
        cut = draw_cut(rng, trial, calibration, stretch=1.1)
        run = Run()
        with trio.fail_after(60), cut_after(cut) as (scope, _):
            await lifecycle(base, run)
        phase = run.marks[-1] if scope.cancelled_caught else "completed"
        if not scope.cancelled_caught:
            assert run.marks[-1] == "completed", run.marks
        where = f"trial {trial} ({cut.describe()}, landed in {phase})"
        settle(run, cut, phase, tally, census, where)
    return tally, calibration


async def test_cancel_fuzz_machine_none(tmp_path: Path) -> None:
    trials = 110
    start = time.monotonic()
    tally, calibration = await _fuzz(_none_lifecycle, make_base(tmp_path), trials, SEED)
    print(
        f"-machine none: {trials} trials in {time.monotonic() - start:.1f} s; an uncut run "
        f"{calibration.seconds * 1000:.0f} ms / {calibration.steps} steps; "
        f"{tally.landed()} cuts landed: {tally.phases}; endings: {tally.endings}"
    )
    assert tally.landed() >= trials * 0.75, tally.phases
    assert tally.total("launch") >= 1, tally.phases
    assert tally.total("teardown") >= 1, tally.phases
    assert sum(1 for p in ("command", "schema", "subscription", "event_wait", "concurrent")
               if tally.total(p)) >= 3, tally.phases  # fmt: skip


async def test_cancel_fuzz_console(tmp_path: Path) -> None:
    trials = 51
    start = time.monotonic()
    tally, calibration = await _fuzz(_console_lifecycle, make_base(tmp_path), trials, SEED + 1)
    print(
        f"console: {trials} trials in {time.monotonic() - start:.1f} s; an uncut run "
        f"{calibration.seconds * 1000:.0f} ms / {calibration.steps} steps; "
        f"{tally.landed()} cuts landed: {tally.phases}; endings: {tally.endings}"
    )
    assert tally.landed() >= trials * 0.75, tally.phases
    assert tally.total("launch") >= 1, tally.phases
    waits = ("wait_for", "wait_for_regex", "write", "lines", "wait_for_reboot")
    assert sum(1 for p in waits if tally.total(p)) >= 3, tally.phases


# -- a clone's restore, on a switch --------------------------------------------------------------
_CLONE_PHASES = ("launch", "restore", "sync", "command", "teardown")
#: Timed cuts per phase of an uncut run (10 in all): most where a clone is restored.
_CLONE_CUTS = (2, 3, 3, 1, 1)


@dataclass
class _Aim:
    """Cut ``scope`` ``offset`` seconds after the run enters ``phase``."""

    phase: str
    offset: float
    scope: trio.CancelScope


async def _clone_lifecycle(
    template: Template,
    base: Path,
    run: Run,
    starts: dict[str, float] | None = None,
    aim: _Aim | None = None,
) -> None:
    """``open_clone``'s two halves, step by step, for a clone on a switch: launch it
    (``switch.open_machines``), restore it (``migrate-incoming``, ``cont``), sync the guest
    with the clone's identity as the setup (clock, RNG, MAC, address: one guest command),
    use it, tear it down. ``starts`` gets each phase's start, in seconds from the run's."""
    begin = trio.current_time()

    def mark(phase: str) -> None:
        run.marks.append(phase)
        if starts is not None:
            starts[phase] = trio.current_time() - begin
        if aim is not None and aim.phase == phase:
            aim.scope.deadline = trio.current_time() + aim.offset

    mark("launch")
    async with Switch("fuzz").running() as switch:
        config = switch.attach(
            template.config(name="clone", base_temp_dir=base), ip="10.0.0.1/24"
        )
        async with switch.open_machines(config) as (vm,):
            run.vm = vm
            mark("restore")
            await restore(vm, template, sync_guest=False)
            mark("sync")
            await _sync_guest(vm, 60, sync=True, setup=switch.identity_command(vm))
            mark("command")
            result = await vm.shell.run("cat /sys/class/net/eth0/address", timeout=60)
            assert result.stdout.decode().strip() == switch.mac(vm)
            mark("teardown")
    mark("completed")


async def test_cancel_fuzz_clone_restore(tmp_path: Path, tiny_guest: GuestImage) -> None:
    """10 cuts spread over the phases of a clone's restore (each at a random time into its
    phase, within the phase's length in an uncut run), then 4 in ``switch.open_clones``:
    nothing is left behind, and a clone whose block was cut obeys ``quit``."""
    rng = random.Random(SEED + 3)
    base = make_base(tmp_path)
    with Switch("fuzz") as maker:
        config = maker.attach_template(tiny_guest.config(memory=128))
        template = await ensure_template(config, key="fuzz-clone-v1", cache_dir=tmp_path / "cache")
    # Two uncut runs: the warm-up (lazily opened fds), then the phases' start times.
    starts: dict[str, float] = {}
    for _ in range(2):
        await _clone_lifecycle(template, base, Run(), starts)
    census = Census(base)
    tally = Tally()
    start = time.monotonic()
    trial = 0
    for phase, cuts in zip(_CLONE_PHASES, _CLONE_CUTS, strict=True):
        after = list(starts)[list(starts).index(phase) + 1]
        for _ in range(cuts):
            # Timed from the moment the run enters the phase, so that it lands there
            # however the load stretches the phases before it.
            offset = rng.uniform(0.0, starts[after] - starts[phase])
            cut = Cut("time", offset)
            run = Run()
            with trio.fail_after(120), trio.CancelScope() as scope:
                await _clone_lifecycle(template, base, run, aim=_Aim(phase, offset, scope))
            landed = run.marks[-1] if scope.cancelled_caught else "completed"
            where = f"trial {trial} ({cut.describe()} into {phase}, landed in {landed})"
            settle(run, cut, landed, tally, census, where)
            trial += 1
    # And the one-call form, switch.open_clones: no machine to ask how it ended, but the
    # census must hold after cuts anywhere in it.
    for _ in range(4):
        cut = Cut("time", rng.uniform(0.0, starts["command"]))
        with trio.fail_after(120), cut_after(cut) as (scope, _):
            async with Switch("fuzz").running() as switch:
                config = switch.attach(
                    template.config(name="clone", base_temp_dir=base), ip="10.0.0.1/24"
                )
                async with switch.open_clones(template, config):
                    pass
        tally.add(cut, "open_clones" if scope.cancelled_caught else "completed", "?")
        census.check(f"trial {trial} (open_clones, {cut.describe()})")
        trial += 1
    print(
        f"clone restore: {trial} cuts in {time.monotonic() - start:.1f} s; phases of an uncut "
        + ", ".join(f"{p} {starts[p] * 1000:.0f} ms" for p in starts)
        + f"; landed: {tally.phases}; endings: {tally.endings}"
    )
    assert tally.landed() >= trial * 0.7, tally.phases
    assert tally.total("restore") + tally.total("sync") >= 4, tally.phases


# -- shell commands in a booted guest ------------------------------------------------------------
_STDIN = random.Random(SEED).randbytes(20000)


@dataclass(frozen=True)
class _Command:
    line: str
    expected: bytes | None  # None: never expected to finish (always cut short)
    stdin: bytes | None = None


_COMMANDS = [
    _Command("echo hi", b"hi\n"),
    _Command("sleep 0.1; echo slept", b"slept\n"),
    _Command("head -c 20000 /dev/zero | tr '\\0' a", b"a" * 20000),
    _Command("cat", _STDIN, _STDIN),
    _Command(
        "i=0; while [ $i -lt 100 ]; do echo $i; i=$((i+1)); done",
        b"".join(b"%d\n" % i for i in range(100)),
    ),
]
#: A command that outlives every cut: the cancel must kill it in the guest.
_FOREVER = _Command("echo started; sleep 31", None)
#: The first run after a cut must work, and at once: the cut command's result is read to its
#: end first (see test_shell_in_step_after_a_cancelled_run), within this many seconds.
_FIRST_OK_LIMIT = 2.0


async def _echo_ok(vm: trio_qemu.Machine) -> None:
    """``echo ok`` works right after a cut."""
    with trio.fail_after(_FIRST_OK_LIMIT):
        ok = await vm.shell.run("echo ok", timeout=60)
    assert (ok.returncode, ok.stdout) == (0, b"ok\n")


async def test_cancel_fuzz_shell(tmp_path: Path, tiny_guest: GuestImage) -> None:
    rng = random.Random(SEED + 2)
    base = make_base(tmp_path)
    guests, per_guest = 3, 13  # 12 cut shell.run calls per guest, then a cut of the block
    # Warm-up: a first machine, so lazily opened fds exist before the baseline.
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"], base_temp_dir=base):
        pass
    census = Census(base)
    tally = Tally()
    boots: list[float] = []
    start = time.monotonic()
    for round_ in range(guests):
        boot_start = time.monotonic()
        with trio.fail_after(300), trio.CancelScope() as outer:
            async with trio_qemu.open_machine(tiny_guest.config(base_temp_dir=base)) as vm:
                await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
                boots.append(time.monotonic() - boot_start)
                calibrations = {}
                for command in _COMMANDS:  # uncut: checks the outputs too
                    calibrations[command.line] = await calibrate(
                        partial(_run_checked, vm, command), times=1
                    )
                running = Census(base)
                for trial in range(per_guest - 1):
                    if trial == per_guest - 2:  # the command that must be killed
                        command = _FOREVER
                        cut = Cut("time", rng.uniform(0.0, 0.3))
                    else:
                        command = rng.choice(_COMMANDS)
                        cut = draw_cut(rng, trial, calibrations[command.line], stretch=1.1)
                    where = f"guest {round_} trial {trial}: {command.line!r}, {cut.describe()}"
                    with cut_after(cut) as (scope, _):
                        await _run_checked(vm, command)
                    tally.add(cut, "run" if scope.cancelled_caught else "completed", "running")
                    await _echo_ok(vm)
                    running.check(where, children={vm.pid or 0}, dirs={vm.temp_dir.name})
                # The cut "sleep 31" was killed in the guest (its process group), however soon
                # after sending the cut fell (test_shell_cancel_soon_after_sending_kills_...).
                left = await _guest_pids(vm, "sleep 31", wait=2.0)
                assert left == [], f"guest {round_}: {_FOREVER.line!r} at {cut.describe()}"
                # Last: cut the whole block while a command runs (teardown with a pending run).
                outer.deadline = trio.current_time() + rng.uniform(0.0, 0.2)
                await vm.shell.run(_FOREVER.line, timeout=120)
        assert outer.cancelled_caught
        how = ending(vm)
        tally.add(Cut("time", 0), "block", how)
        # A pending run does not keep QEMU from obeying quit.
        assert how == "graceful", f"guest {round_}: QEMU ended {how}\n{vm.log[-2000:]}"
        assert_gone(vm)
        census.check(f"after guest {round_}")
    print(
        f"shell: {guests} guests (boot to shell {min(boots):.1f}-{max(boots):.1f} s), "
        f"{guests * per_guest} cut points in {time.monotonic() - start:.1f} s: {tally.phases}; "
        f"endings: {tally.endings}"
    )
    assert tally.total("run") >= guests * (per_guest - 1) * 0.6, tally.phases


async def _guest_pids(vm: trio_qemu.Machine, args: str, wait: float) -> list[int]:
    """Pids of the guest's processes running ``args`` (or ``sh -c ...args``), looking again
    for up to ``wait`` s until there are none."""
    deadline = time.monotonic() + wait
    while True:
        ps = (await vm.shell.run("ps -o pid,args", timeout=30, check=True)).stdout.decode()
        pids = [
            int(line.split(None, 1)[0])
            for line in ps.splitlines()[1:]
            if line.rstrip().endswith(args) and "ps -o" not in line
        ]
        if not pids or time.monotonic() > deadline:
            return pids
        await trio.sleep(0.1)


async def _run_checked(vm: trio_qemu.Machine, command: _Command) -> None:
    result = await vm.shell.run(command.line, stdin=command.stdin, timeout=60)
    assert command.expected is not None, f"{command.line!r} was not cut short"
    assert (result.returncode, result.stdout) == (0, command.expected), command.line


async def test_shell_in_step_after_a_cancelled_run(tmp_path: Path, tiny_guest: GuestImage) -> None:
    big = "head -c 4000000 /dev/zero | tr '\\0' a"  # ~0.4 s, most of it the transfer
    async with trio_qemu.open_machine(tiny_guest.config(base_temp_dir=make_base(tmp_path))) as vm:
        await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        start = time.monotonic()
        assert len((await vm.shell.run(big, timeout=60)).stdout) == 4000000
        whole = time.monotonic() - start
        # Cut while the result arrives, then at once run the next command.
        for fraction in (0.4, 0.5, 0.6):
            with trio.move_on_after(whole * fraction):
                await vm.shell.run(big, timeout=60)
            with trio.fail_after(_FIRST_OK_LIMIT):
                ok = await vm.shell.run("echo ok", timeout=60)
            assert ok.stdout == b"ok\n"


async def test_shell_cancel_soon_after_sending_kills_the_command(
    tmp_path: Path, tiny_guest: GuestImage
) -> None:
    async with trio_qemu.open_machine(tiny_guest.config(base_temp_dir=make_base(tmp_path))) as vm:
        await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        for delay in (0.002, 0.005, 0.01):
            with trio.move_on_after(delay) as scope:
                await vm.shell.run(_FOREVER.line, timeout=60)
            assert scope.cancelled_caught
            await trio.sleep(0.5)  # the next run's R comes after the K: both are handled
            assert await _guest_pids(vm, "sleep 31", wait=2.0) == [], f"cut at {delay} s"
