"""Shared by the reliability tests (test_fuzz.py, test_faults.py, test_security.py, and the
soak): cutting a run short at a random point, their constants, a dedicated base temp dir,
polling. What a run may leave behind is counted by :mod:`census`.

Cutting a run short: half the cuts are timed (a cancel scope's deadline); the other half land
after the N-th task step of the run, counted by a Trio instrument, so they fall exactly on a
checkpoint. Both are drawn from a calibration: the duration and step count of uncut runs.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

import trio_qemu

#: A q35 machine with no boot device: SeaBIOS prints its banner, finds nothing to boot, and
#: reboots at once, forever.
SEABIOS_LOOP = ["-nodefaults", "-boot", "reboot-timeout=0"]
#: How long the tiny guest may take to boot to its shell (TCG on a loaded machine).
BOOT_TIMEOUT = 90.0
#: The bound for a fault: a clear error within this many seconds, on every channel.
PROMPT_ERROR = 0.5


def make_base(tmp_path: Path) -> Path:
    """A fresh directory to use as ``base_temp_dir``: it holds nothing but our machines."""
    base = tmp_path / "base"
    base.mkdir()
    return base


async def poll(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, looking every 10 ms; fail after ``timeout`` s."""
    with trio.fail_after(timeout):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


# -- cutting a run short -----------------------------------------------------------------------
class _StepCounter(trio.abc.Instrument):
    """Counts task steps (one step = a task running from one checkpoint to the next);
    at step ``cancel_at`` it cancels ``scope`` (from the run loop's own callback queue)."""

    def __init__(self, scope: trio.CancelScope, cancel_at: int | None) -> None:
        self.scope = scope
        self.cancel_at = cancel_at
        self.steps = 0
        self._token = trio.lowlevel.current_trio_token()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.cancel_at:
            self._token.run_sync_soon(self.scope.cancel)


@dataclass
class Cut:
    """Where to cut a run short: after ``amount`` seconds ("time") or task steps ("steps")."""

    kind: str
    amount: float

    def describe(self) -> str:
        unit = "s" if self.kind == "time" else "steps"
        return f"{self.kind} cut at {self.amount:.4g} {unit}"


@contextlib.contextmanager
def cut_after(cut: Cut | None) -> Iterator[tuple[trio.CancelScope, _StepCounter]]:
    """A cancel scope cancelled by ``cut`` (never, for None); the counter counts steps."""
    with trio.CancelScope() as scope:
        counter = _StepCounter(scope, int(cut.amount) if cut and cut.kind == "steps" else None)
        if cut is not None and cut.kind == "time":
            scope.deadline = trio.current_time() + cut.amount
        trio.lowlevel.add_instrument(counter)
        try:
            yield scope, counter
        finally:
            trio.lowlevel.remove_instrument(counter)


@dataclass
class Calibration:
    seconds: float
    steps: int


async def calibrate(run: Callable[[], Awaitable[object]], times: int = 3) -> Calibration:
    """Run ``run`` uncut ``times`` times; its median duration and its fewest steps (how many
    steps a run takes moves with the load, e.g. how QEMU's output is split into reads: cuts
    counted in steps are drawn within the shortest run seen, so that they land in the run)."""
    durations: list[float] = []
    steps: list[int] = []
    for _ in range(times):
        with cut_after(None) as (_, counter):
            start = time.monotonic()
            await run()
        durations.append(time.monotonic() - start)
        steps.append(counter.steps)
    return Calibration(sorted(durations)[times // 2], min(steps))


def draw_cut(rng: random.Random, trial: int, calibration: Calibration, stretch: float) -> Cut:
    """Even trials are timed, odd ones counted in steps, both spread over ``stretch`` times
    a whole uncut run (so a few cuts fall after the end: the run completes)."""
    if trial % 2 == 0:
        return Cut("time", rng.uniform(0.0, stretch * calibration.seconds))
    return Cut("steps", rng.randint(1, max(1, int(stretch * calibration.steps))))


def ending(vm: trio_qemu.Machine | None) -> str:
    """How a run's machine ended: "graceful" (QEMU obeyed ``quit``, or SIGTERM without a
    monitor: exit status 0), "killed" (SIGKILL), "no machine" (the run never got one)."""
    if vm is None:
        return "no machine"
    assert not vm.is_running(), f"{vm!r} still runs"
    if vm.returncode == 0:
        return "graceful"
    if vm.returncode == -signal.SIGKILL:
        return "killed"
    return f"exit status {vm.returncode}"


@dataclass
class Tally:
    """Where the cuts landed, per kind of cut; how the machine ended, per phase."""

    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    endings: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, cut: Cut, phase: str, ending: str) -> None:
        kind = self.phases.setdefault(cut.kind, {})
        kind[phase] = kind.get(phase, 0) + 1
        endings = self.endings.setdefault(phase, {})
        endings[ending] = endings.get(ending, 0) + 1

    def total(self, phase: str) -> int:
        return sum(kind.get(phase, 0) for kind in self.phases.values())

    def landed(self) -> int:
        return sum(n for kind in self.phases.values() for p, n in kind.items() if p != "completed")
