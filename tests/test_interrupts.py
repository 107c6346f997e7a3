"""Ctrl-C anywhere: a bare KeyboardInterrupt, nothing left behind, never a hang.

Each trial is its own ``trio.run`` (so the test is the main task that Trio delivers Ctrl-C
to) around ``open_machine(machine="none")`` or ``open_machines``, and ends with a census:
QEMU reaped, the machine's temp dir gone, no fd of ours left open.

- Every checkpoint: a Trio instrument raises a real SIGINT at the N-th task step of the
  run, for N = 1, 2, ... until a run completes before the N-th step; so Ctrl-C lands once at
  (or right after) every await of launch, use and teardown.
- Every clean-up step of teardown raises KeyboardInterrupt itself (monkeypatched).
- Random moments: ``setitimer`` fires SIGINT after a random delay within a calibrated run's
  length, 500 times (``TRIO_QEMU_SOAK=1``: 5,000).

A hang would block the run forever, so each test arms ``faulthandler`` to dump every
thread's stack and end the process if a trial takes longer than its bound.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from census import pid_gone, qemu_children

import trio_qemu
import trio_qemu._machine as machine_module
from trio_qemu._console import Console
from trio_qemu._process import QemuProcess
from trio_qemu._qmp import QMPClient
from trio_qemu._tempdirs import remove_machine_dir

SOAK = os.environ.get("TRIO_QEMU_SOAK") == "1"
#: Longest a single trial may take before it counts as a hang (QEMU launch + teardown).
TRIAL_BOUND = 30


@contextlib.contextmanager
def hang_guard(seconds: float = TRIAL_BOUND) -> Iterator[None]:
    """Dump all stacks and end the process if the block hangs (no other way out of one)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def fd_set() -> set[tuple[int, str]]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    return out


@dataclass
class Trial:
    """One run: what it launched and how it ended."""

    base: Path
    pids: list[int] = field(default_factory=list)
    outcome: str = ""
    #: how it failed, as text: holding the exception would keep trio.run's frames alive
    error: str = ""


# The scenarios play a program whose own frames are KI-protected, so Trio delivers Ctrl-C at
# a checkpoint. An unprotected frame can take a KeyboardInterrupt at any bytecode, including
# the one between an ``async with``'s ``__aenter__`` returning and its block starting, where
# CPython never calls ``__aexit__``: the context manager (ours, or Trio's own nursery) is
# then abandoned and Trio fails the run with TrioInternalError. No library can close that
# window in its caller's frame; everything from ``__aenter__`` to ``__aexit__`` is ours and
# protected (``_util.protected_asynccontextmanager``).
@trio.lowlevel.enable_ki_protection
async def _one_machine(trial: Trial) -> None:
    async with trio_qemu.open_machine(machine="none", base_temp_dir=trial.base) as vm:
        assert vm.pid is not None
        trial.pids.append(vm.pid)
        await vm.cmd("query-status")
        async with vm.subscribe("STOP") as events:
            await vm.cmd("stop")
            await events.receive()
        await vm.cmd("cont")


@trio.lowlevel.enable_ki_protection
async def _two_machines(trial: Trial) -> None:
    configs = [
        trio_qemu.MachineConfig(machine="none", name=f"m{i}", base_temp_dir=trial.base)
        for i in range(2)
    ]
    async with trio_qemu.open_machines(*configs) as vms:
        for vm in vms:
            assert vm.pid is not None
            trial.pids.append(vm.pid)
        async with trio.open_nursery() as nursery:
            for vm in vms:
                nursery.start_soon(vm.cmd, "query-status")


SCENARIOS: dict[str, Callable[[Trial], Awaitable[None]]] = {
    "open_machine": _one_machine,
    "open_machines": _two_machines,
}


def run_trial(
    scenario: Callable[[Trial], Awaitable[None]],
    base: Path,
    instruments: list[trio.abc.Instrument] | None = None,
    delay: float | None = None,
) -> Trial:
    """Run one trial in its own ``trio.run``; record a bare KI as ``interrupted``.

    With ``delay``, SIGINT fires that long after the scenario starts inside ``trio.run``
    (Trio's own set-up and tear-down around the run are not ours to test)."""
    trial = Trial(base)

    async def armed(trial: Trial) -> None:
        if delay is not None:
            signal.setitimer(signal.ITIMER_REAL, delay)
        try:
            await scenario(trial)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    try:
        with hang_guard():
            trio.run(armed, trial, instruments=instruments or [])
            trial.outcome = "completed"
    except KeyboardInterrupt:
        trial.outcome = "interrupted"
    except BaseException as exc:
        trial.outcome = "error"
        trial.error = "".join(traceback.format_exception(exc))
    return trial


def check_trial(trial: Trial, fds_before: set[tuple[int, str]], what: str) -> None:
    assert trial.outcome in ("completed", "interrupted"), (
        f"{what}: expected a bare KeyboardInterrupt or success, got:\n{trial.error}"
    )
    for pid in trial.pids:
        assert pid_gone(pid), f"{what}: QEMU pid {pid} still exists"
    assert not qemu_children(), f"{what}: QEMU children left: {qemu_children()}"
    left = list(trial.base.iterdir())
    assert not left, f"{what}: left behind in base_temp_dir: {left}"
    gc.collect()
    fds_after = fd_set()
    assert fds_after <= fds_before, f"{what}: fds left open: {fds_after - fds_before}"


class SigintAtStep(trio.abc.Instrument):
    """Raises a real SIGINT right before the ``at``-th task step of the run."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.at:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ctrl_c_at_every_step(tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    run_trial(scenario, tmp_path)  # warm-up: imports, QEMU's files in the page cache
    fds_before = fd_set()
    outcomes: dict[str, int] = {}
    at = 0
    while True:
        at += 1
        counter = SigintAtStep(at)
        trial = run_trial(scenario, tmp_path, [counter])
        check_trial(trial, fds_before, f"{name}: SIGINT before task step {at}")
        outcomes[trial.outcome] = outcomes.get(trial.outcome, 0) + 1
        if trial.outcome == "completed" and counter.steps < at:
            break  # the run ended before the step: every step has had its Ctrl-C
        assert at < 5000, "the run never completes"
    assert outcomes["interrupted"] >= 20, outcomes


@pytest.mark.parametrize(
    "step",
    [
        "remove_machine_dir",
        "QemuProcess.kill",
        "QemuProcess.save_tail",
        "QMPClient.fail",
        "Console.close",
    ],
)
def test_ctrl_c_inside_each_clean_up_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A KeyboardInterrupt raised by a clean-up step itself: the other steps still run,
    waiters are released (no hang), and the interrupt comes out bare."""
    raised: list[str] = []

    def interrupting(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not raised:
                raised.append(step)
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        return wrapper

    owner: Any = {
        "remove_machine_dir": machine_module,
        "QemuProcess.kill": QemuProcess,
        "QemuProcess.save_tail": QemuProcess,
        "QMPClient.fail": QMPClient,
        "Console.close": Console,
    }[step]
    attribute = step.rsplit(".", 1)[-1]
    monkeypatch.setattr(owner, attribute, interrupting(getattr(owner, attribute)))

    async def scenario(trial: Trial) -> None:
        config = trio_qemu.MachineConfig(
            machine="q35", args=["-machine", "graphics=off"], console=True,
            base_temp_dir=trial.base,
        )
        async with trio_qemu.open_machine(config) as vm:
            assert vm.pid is not None
            trial.pids.append(vm.pid)
            await vm.cmd("query-status")

    fds_before = fd_set()
    trial = run_trial(scenario, tmp_path)
    assert raised == [step]
    assert trial.outcome == "interrupted", trial.error
    if step == "remove_machine_dir":
        # The interrupted step is the removal itself: the directory may stay; the next
        # launch leaves it alone (its owner is alive), `python -m trio_qemu clean` too.
        for leftover in tmp_path.iterdir():
            remove_machine_dir(leftover)
    check_trial(trial, fds_before, f"KeyboardInterrupt in {step}")


# A Ctrl-C can land in the test's own (unprotected) frame between creating an `async with`
# block's __aexit__ coroutine and awaiting it; Python then warns that it was never awaited.
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
# The injected SIGINT can also land in a garbage-collector callback (a WeakSet's), where
# Python can only print "Exception ignored"; pytest turns that into this warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_at_random_moments(tmp_path: Path) -> None:
    trials = 5000 if SOAK else 500
    rng = random.Random(20261129)
    run_trial(_one_machine, tmp_path)  # warm-up
    started = time.monotonic()
    for _ in range(3):
        run_trial(_one_machine, tmp_path)
    length = (time.monotonic() - started) / 3
    fds_before = fd_set()
    previous = signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    outcomes: dict[str, int] = {}
    try:
        for index in range(trials):
            delay = rng.uniform(0.0005, length * 1.1)
            scenario = _one_machine if index % 4 else _two_machines
            trial = run_trial(scenario, tmp_path, delay=delay)
            check_trial(trial, fds_before, f"trial {index}: SIGINT after {delay * 1000:.1f} ms")
            outcomes[trial.outcome] = outcomes.get(trial.outcome, 0) + 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes.get("interrupted", 0) >= trials // 2, outcomes
