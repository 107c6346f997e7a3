"""QEMU never outlives its controller, and never dies before it: real controllers (a Python
process running ``open_machine``) killed by SIGKILL, SIGTERM and SIGINT, one kept alive past
Trio's idle-thread retirement, and :class:`QemuProcess` itself on small real processes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from trio_qemu import _process
from trio_qemu._process import QemuProcess
from trio_qemu._tempdirs import OWNER_FILE, remove_stale_dirs

ROOT = Path(__file__).resolve().parent.parent

#: A controller: launches a `-machine none` VM, prints "<QEMU pid> <temp dir>", holds the
#: VM for argv[2] s, then checks that QMP still answers and leaves the block.
CONTROLLER = r"""
import sys, trio, trio_qemu

async def main(base, hold):
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], base_temp_dir=base
    ) as vm:
        print(vm.pid, vm.temp_dir, flush=True)
        await trio.sleep(hold)
        status = await vm.cmd("query-status", timeout=10)
        print("alive", vm.is_running(), status["status"], flush=True)

try:
    trio.run(main, sys.argv[1], float(sys.argv[2]))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


class Controller:
    """A controller process and the QEMU it launched (a pidfd on it, opened while alive)."""

    def __init__(self, base: Path, hold: float) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", CONTROLLER, str(base), str(hold)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        line = self.readline(timeout=30)
        pid, temp_dir = line.split()
        self.qemu_pid = int(pid)
        self.temp_dir = Path(temp_dir)
        # QEMU is alive (the controller saw QMP up), so this pidfd is QEMU's, for good.
        self.qemu_pidfd = os.pidfd_open(self.qemu_pid)
        assert self.qemu_alive()

    def readline(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            pytest.fail(f"the controller printed nothing within {timeout} s")
        line = self.popen.stdout.readline()
        if not line:
            _, err = self.popen.communicate(timeout=10)
            pytest.fail(f"the controller ended early: {err}")
        return line

    def qemu_alive(self) -> bool:
        return not select.select([self.qemu_pidfd], [], [], 0)[0]

    def qemu_dies_within(self, seconds: float) -> float | None:
        """How long QEMU took to die (from now), or None if it still runs after ``seconds``.

        QEMU is not our child, but a pidfd on any process becomes readable when it exits:
        this waits on that, no polling."""
        start = time.monotonic()
        if select.select([self.qemu_pidfd], [], [], seconds)[0]:
            return time.monotonic() - start
        return None

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate(timeout=10)
        if self.qemu_alive():  # a failed test: leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.qemu_pid, signal.SIGKILL)
        os.close(self.qemu_pidfd)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path, hold=60)
    try:
        yield ctl
    finally:
        ctl.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_qemu_dies_with_a_killed_controller(
    controller: Controller, tmp_path: Path, sig: signal.Signals
) -> None:
    os.kill(controller.popen.pid, sig)
    took = controller.qemu_dies_within(1.0)
    assert took is not None, f"QEMU still runs 1 s after its controller got {sig.name}"
    assert controller.popen.wait(timeout=10) == -sig
    # The controller could not clean up: its directory is left, and is stale now.
    assert (controller.temp_dir / OWNER_FILE).is_file()
    assert remove_stale_dirs(tmp_path) == [controller.temp_dir]
    assert not controller.temp_dir.exists()


def test_sigint_tears_down_cleanly(controller: Controller) -> None:
    os.kill(controller.popen.pid, signal.SIGINT)
    out, err = controller.popen.communicate(timeout=30)
    assert controller.popen.returncode == 130, err
    assert out.strip() == "interrupted"
    assert controller.qemu_dies_within(0) is not None
    assert not Path(f"/proc/{controller.qemu_pid}").exists()  # reaped by the controller
    assert not controller.temp_dir.exists()


@pytest.mark.slow
def test_qemu_lives_as_long_as_its_controller(tmp_path: Path) -> None:
    # Trio retires an idle worker thread after 10 s, and a death signal set by a thread
    # fires when that thread exits: QEMU must still be up, and answering, well after that.
    ctl = Controller(tmp_path, hold=20)
    try:
        assert ctl.qemu_dies_within(19.0) is None, "QEMU died while its controller lived"
        assert ctl.readline(timeout=15).split() == ["alive", "True", "running"]
        assert ctl.popen.wait(timeout=30) == 0
        assert ctl.qemu_dies_within(0) is not None
        assert not ctl.temp_dir.exists()
    finally:
        ctl.close()


# -- QemuProcess on small real processes ------------------------------------------------


def _proc(argv: list[str], tmp_path: Path, exits: list[QemuProcess] | None = None) -> QemuProcess:
    def on_exit(process: QemuProcess) -> None:
        assert trio.lowlevel.currently_ki_protected()
        assert exits is not None
        exits.append(process)

    return QemuProcess(
        argv, log_path=tmp_path / "out.log", on_exit=on_exit if exits is not None else None
    )


async def test_exit_status_output_and_argv(tmp_path: Path) -> None:
    exits: list[QemuProcess] = []
    proc = _proc(["sh", "-c", 'echo "$0 here"; exit 3'], tmp_path, exits)
    assert not proc.started and proc.pid is None
    async with trio.open_nursery() as nursery:
        pid = await nursery.start(proc.run)
        assert proc.started and pid == proc.pid
    assert proc.returncode == 3 and proc.exited.is_set() and not proc.is_running()
    assert exits == [proc]
    assert proc.log_tail() == "sh here\n"  # argv[0] as given; setpriv exec'd itself away
    assert proc.argv[0] == "sh"


async def _eventually(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``predicate``: for a state nobody can signal us about. Bounded by ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.01)


async def test_cancelled_run_kills_the_group_and_reaps(tmp_path: Path) -> None:
    exits: list[QemuProcess] = []
    # A "wrapper" whose own child is in the same process group.
    proc = _proc(["sh", "-c", "sleep 30 & echo $!; wait"], tmp_path, exits)
    async with trio.open_nursery() as nursery:
        await nursery.start(proc.run)
        await _eventually(proc.log_tail)  # the wrapper printed its child's pid
        grandchild = os.pidfd_open(int(proc.log_tail()))
        nursery.cancel_scope.cancel()
    try:
        assert proc.returncode == -signal.SIGKILL
        assert exits == [proc]
        assert proc.pid is not None and _gone(proc.pid)
        with trio.fail_after(5):  # killed with the group; it is init's to reap
            await trio.lowlevel.wait_readable(grandchild)
    finally:
        os.close(grandchild)


async def test_terminate_and_kill_after_exit_are_harmless(tmp_path: Path) -> None:
    proc = _proc(["sleep", "30"], tmp_path)
    proc.kill()  # not started: nothing to do
    async with trio.open_nursery() as nursery:
        await nursery.start(proc.run)
        assert proc.is_running()
        proc.terminate()
        assert await proc.wait(5)
    assert proc.returncode == -signal.SIGTERM
    proc.kill()
    proc.terminate()


@pytest.mark.parametrize(
    ("program", "error"),
    [("/nonexistent/qemu", FileNotFoundError), ("no-such-qemu-binary", FileNotFoundError)],
)
async def test_missing_program_raises_before_spawning(
    tmp_path: Path, program: str, error: type[OSError]
) -> None:
    proc = _proc([program, "-version"], tmp_path)
    async with trio.open_nursery() as nursery:
        with pytest.raises(error) as info:
            await nursery.start(proc.run)
    assert info.value.filename == program
    assert info.value.errno == errno.ENOENT
    assert not proc.started and not proc.exited.is_set()


async def test_unexecutable_program(tmp_path: Path) -> None:
    script = tmp_path / "qemu"
    script.write_text("#!/bin/sh\n")
    proc = _proc([str(script)], tmp_path)
    with pytest.raises(PermissionError):
        await proc.run()
    assert not proc.started


def _unknowing_setpriv(tmp_path: Path) -> str:
    """A ``setpriv`` that does not know ``--pdeathsig`` (as busybox's)."""
    path = tmp_path / "setpriv"
    path.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '$1'\" >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("setpriv", ["missing", "busybox"])
async def test_without_setpriv_spawns_plainly_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setpriv: str
) -> None:
    fake = _unknowing_setpriv(tmp_path) if setpriv == "busybox" else None
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name: fake if name == "setpriv" else real_which(name)
    )
    monkeypatch.setattr(_process, "_setpriv", _process._SETPRIV_UNKNOWN)
    for _ in range(2):
        proc = _proc(["sh", "-c", "exit 4"], tmp_path)
        await proc.run()
        assert proc.returncode == 4
    warnings = [r for r in caplog.records if "setpriv" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_without_pidfd_waits_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.ENOSYS, "no pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = _proc(["sh", "-c", "exit 5"], tmp_path)
    await proc.run()
    assert proc.returncode == 5
    proc = _proc(["sleep", "30"], tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(proc.run)
        nursery.cancel_scope.cancel()
    assert proc.returncode == -signal.SIGKILL


async def test_spawn_is_cheap_and_qemu_is_our_direct_child(tmp_path: Path) -> None:
    proc = _proc(["sleep", "30"], tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(proc.run)
        assert proc.spawn_time is not None and proc.spawn_time < 0.5  # ~0.3 ms measured
        pid = proc.pid
        assert pid is not None
        assert int(_status(pid)["PPid"]) == os.getpid()
        # setpriv execs the program in its place: same pid (a moment after spawning).
        await _eventually(lambda: _status(pid)["Name"] == "sleep")
        nursery.cancel_scope.cancel()
