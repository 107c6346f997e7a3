"""Faults from QEMU's side, against a real QEMU under TCG: each gives a clear error within
half a second (:data:`reliability.PROMPT_ERROR`), on every channel, and leaves nothing
behind.

- The guest powers off (``-no-reboot``): pending waits end with ``MachineExited``.
- QEMU closes the console, the monitor or the guest-shell channel while it keeps running.
  QEMU 7.2 refuses ``chardev-remove`` of a chardev in use ("is busy") and ``chardev-change``
  of a monitor's chardev ("Chardev user does not support chardev hotswap"); the serial port
  and virtio-serial ports do support ``chardev-change`` to a ``null`` backend, which makes
  QEMU close our socketpair. For the monitor, a copy of QEMU's own end is taken with
  ``pidfd_getfd(2)`` and shut down: QEMU then sees the connection end and closes its fd
  itself.
- Someone else SIGKILLs QEMU during the launch, the block or the teardown: the temp files go
  all the same.

SIGKILL while waiting, SIGSTOP and a ``quit`` behind our back are in test_machine_faults.py;
QEMU dying with its controller is in test_process.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from census import (
    Census,
    assert_gone,
    fd_changes,
    open_fds,
    qemu_children,
    socket_inodes,
    unix_sockets,
)
from reliability import BOOT_TIMEOUT, PROMPT_ERROR, SEABIOS_LOOP, make_base, poll

import trio_qemu
from trio_qemu import (
    ConsoleClosed,
    LaunchError,
    MachineConfig,
    MachineError,
    MachineExited,
    QMPConnectionClosed,
    ShellError,
)
from trio_qemu.guest import GuestImage

PROMPT = b"trio-guest:/# "

Errors = dict[str, tuple[Exception, float]]


async def _record(name: str, fn: Callable[[], Awaitable[object]], errors: Errors) -> None:
    """Run ``fn``; note what it raised, and when."""
    try:
        await fn()
    except Exception as exc:
        errors[name] = (exc, time.monotonic())


def _chardev_fd(vm: trio_qemu.Machine, chardev: str) -> int:
    """The fd number QEMU got for ``chardev`` (from its command line)."""
    prefix = f"socket,id={chardev},fd="
    return int(next(a for a in vm.argv if a.startswith(prefix))[len(prefix) :])


async def _wait_fd_closed(pid: int, fd: int) -> None:
    await poll(lambda: fd not in open_fds(pid))


# -- QEMU exits on its own -----------------------------------------------------------------------
def _wait_for_zombie(pid: int, seen: list[float]) -> None:
    """In a thread: block until ``pid`` has exited (without reaping it); note the time."""
    with contextlib.suppress(ChildProcessError):  # already reaped by Trio: it exited just now
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    seen.append(time.monotonic())


def _shutdown_event_time(vm: trio_qemu.Machine) -> float | None:
    """The wall-clock time of QEMU's SHUTDOWN event, from the QMP transcript."""
    for line in vm.qmp_client.transcript():
        if '"SHUTDOWN"' in line and line.startswith("<-"):
            stamp = json.loads(line[3:])["timestamp"]
            return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    return None


async def test_guest_poweroff_ends_pending_waits_with_machine_exited(
    tmp_path: Path, tiny_guest: GuestImage
) -> None:
    base = make_base(tmp_path)
    errors: Errors = {}
    exited: list[float] = []
    with trio.fail_after(120), pytest.raises(MachineExited) as info:
        async with trio_qemu.open_machine(tiny_guest.config(base_temp_dir=base)) as vm:
            await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
            assert "-no-reboot" in vm.argv
            assert vm.pid is not None
            await vm.shell.run("(sleep 0.5; poweroff -f) >/dev/null 2>&1 &", check=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, _wait_for_zombie, vm.pid, exited,
                            abandon_on_cancel=True)
                )  # fmt: skip
                waits: dict[str, Callable[[], Awaitable[object]]] = {
                    "shell.run": partial(vm.shell.run, "sleep 300", timeout=120),
                    "event_wait": partial(vm.event_wait, "NEVER", timeout=120),
                    "console.wait_for": partial(vm.console.wait_for, b"NEVER", timeout=120),
                }
                for name, wait in waits.items():
                    nursery.start_soon(_record, name, wait, errors)
    raised_at, raised_wall = time.monotonic(), time.time()
    assert type(info.value) is MachineExited
    assert info.value.returncode == 0
    assert vm.returncode == 0
    await poll(lambda: bool(exited))
    shutdown_at = _shutdown_event_time(vm)
    assert shutdown_at is not None
    report = {"block": raised_at - exited[0]}
    for name, (error, at) in errors.items():
        assert type(error) is MachineExited, (name, error)
        assert error.returncode == 0
        report[name] = at - exited[0]
    assert set(errors) == {"shell.run", "event_wait", "console.wait_for"}
    print(
        "guest poweroff -f: seconds from QEMU's exit to the error: "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in report.items())
        + f"; from its SHUTDOWN event to the block's error "
        f"{(raised_wall - shutdown_at) * 1000:.1f} ms"
    )
    assert max(report.values()) < PROMPT_ERROR, report
    assert raised_wall - shutdown_at < PROMPT_ERROR
    assert_gone(vm)
    assert os.listdir(base) == []


# -- QEMU closes a channel and runs on -----------------------------------------------------------
async def test_guest_shell_channel_closed_then_poweroff_with_wait(
    tmp_path: Path, tiny_guest: GuestImage
) -> None:
    """QEMU closes the guest-shell channel (``chardev-change`` to null) while the guest runs:
    the pending run ends with ShellError and later runs fail at once; the machine runs on.
    Then the guest powers off through the console with ``vm.wait()`` waiting: that returns 0
    and the block ends quietly."""
    base = make_base(tmp_path)
    errors: Errors = {}
    with trio.fail_after(120):
        async with trio_qemu.open_machine(tiny_guest.config(base_temp_dir=base)) as vm:
            await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
            assert vm.pid is not None
            shell_fd = _chardev_fd(vm, "shell")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _record, "shell.run", partial(vm.shell.run, "sleep 300", timeout=120), errors
                )
                await trio.testing.wait_all_tasks_blocked(0.05)
                closed_at = time.monotonic()
                await vm.cmd("chardev-change", id="shell", backend={"type": "null", "data": {}})
            error, at = errors["shell.run"]
            elapsed = at - closed_at
            print(f"shell channel closed by QEMU: {type(error).__name__} after {elapsed:.3f} s")
            assert isinstance(error, ShellError), repr(error)
            assert elapsed < PROMPT_ERROR
            await _wait_fd_closed(vm.pid, shell_fd)
            # The next runs find the channel broken at once, the first one included.
            for attempt in range(2):
                start = time.monotonic()
                with pytest.raises(ShellError):
                    await vm.shell.run("true", timeout=30)
                assert time.monotonic() - start < PROMPT_ERROR, f"run {attempt} after the close"
            assert vm.is_running() and vm.failure is None
            assert (await vm.cmd("query-status"))["running"] is True

            # The console shell still answers: power off from there, with wait() running.
            await vm.console.wait_for(PROMPT, timeout=30)
            await vm.console.send_line("echo $((6 * 7))-alive")
            await vm.console.wait_for(b"42-alive\r\n", timeout=30)
            async with trio.open_nursery() as nursery:
                statuses: list[int | None] = []

                async def wait() -> None:
                    statuses.append(await vm.wait(timeout=60))

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked(0.02)
                await vm.console.send_line("poweroff -f")
            assert statuses == [0]
    assert vm.returncode == 0
    assert_gone(vm)
    assert os.listdir(base) == []


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (a post-5.1 syscall)


def shut_down_qemus_end(pid: int, fd: int) -> None:
    """Shut down QEMU's own end (its ``fd``) of a socketpair, as if QEMU closed it.

    QEMU 7.2 offers no command that closes a monitor in use, so a copy of QEMU's fd is
    taken with pidfd_getfd(2) and shut down for reading and writing; QEMU then sees the end
    of the connection and closes its fd itself.
    """
    pidfd = os.pidfd_open(pid)
    try:
        copy = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"pidfd_getfd: {os.strerror(errno)}")
    finally:
        os.close(pidfd)
    with socket.socket(fileno=copy) as sock:
        sock.shutdown(socket.SHUT_RDWR)


async def _close_monitor_under_pending_calls(vm: trio_qemu.Machine) -> tuple[Errors, float]:
    """A command in flight (QEMU stopped) and an event wait, then QEMU's end closed."""
    assert vm.pid is not None
    errors: Errors = {}
    fd = _chardev_fd(vm, "mon")
    async with trio.open_nursery() as nursery:
        wait = partial(vm.event_wait, "NEVER", timeout=60)
        nursery.start_soon(_record, "event_wait", wait, errors)
        os.kill(vm.pid, signal.SIGSTOP)  # so that the command really is in flight
        nursery.start_soon(_record, "cmd", partial(vm.cmd, "query-status", timeout=60), errors)
        await trio.testing.wait_all_tasks_blocked(0.05)
        closed_at = time.monotonic()
        shut_down_qemus_end(vm.pid, fd)
        os.kill(vm.pid, signal.SIGCONT)
    await _wait_fd_closed(vm.pid, fd)  # QEMU closed its end itself
    return errors, closed_at


async def test_monitor_closed_by_qemu(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], base_temp_dir=base
    ) as vm:
        assert (await vm.cmd("query-status"))["running"] is True
        assert vm.pid is not None
        before = open_fds()
        ours = socket_inodes(before)
        mon_peer = unix_sockets()[socket_inodes(open_fds(vm.pid))[_chardev_fd(vm, "mon")]].peer
        errors, closed_at = await _close_monitor_under_pending_calls(vm)
        assert set(errors) == {"event_wait", "cmd"}
        for name, (error, at) in errors.items():
            assert type(error) is QMPConnectionClosed, (name, error)
            assert isinstance(error, MachineError)
            print(f"monitor closed by QEMU: {name} raised {type(error).__name__} "
                  f"after {at - closed_at:.3f} s")  # fmt: skip
            assert at - closed_at < PROMPT_ERROR, name
        # QEMU runs on without a monitor; the machine is not failed, calls fail at once.
        assert vm.is_running() and vm.failure is None
        start = time.monotonic()
        with pytest.raises(QMPConnectionClosed):
            await vm.cmd("query-status")
        assert time.monotonic() - start < PROMPT_ERROR
        # No new fd; at most our end of the monitor is gone (the reader closes it when the
        # connection breaks; after a clean end of file it stays open until teardown).
        now = open_fds()
        mine = {fd for fd, inode in ours.items() if inode == mon_peer}
        assert {fd: t for fd, t in now.items() if before.get(fd) != t} == {}, fd_changes(
            before, now
        )
        assert {fd for fd in before if fd not in now} <= mine, fd_changes(before, now)
        assert qemu_children() == {vm.pid}
    # Teardown without QMP: SIGTERM by pid, which QEMU obeys (exit status 0).
    assert vm.returncode == 0
    assert "terminating on signal 15" in vm.log
    assert_gone(vm)
    assert os.listdir(base) == []


async def test_console_closed_by_qemu(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    errors: Errors = {}
    async with trio_qemu.open_machine(
        machine="q35,graphics=off", console=True, args=SEABIOS_LOOP, base_temp_dir=base
    ) as vm:
        assert vm.pid is not None
        await vm.console.wait_for(b"No bootable device", timeout=30)
        fd = _chardev_fd(vm, "console")

        async def iterate() -> None:
            async for _ in vm.console.lines():
                pass
            raise ConsoleClosed("the line iterator ended quietly")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _record, "wait_for", partial(vm.console.wait_for, b"NEVER", timeout=60), errors
            )
            nursery.start_soon(_record, "lines", iterate, errors)
            await trio.testing.wait_all_tasks_blocked(0.02)
            closed_at = time.monotonic()
            await vm.cmd("chardev-change", id="console", backend={"type": "null", "data": {}})
        await _wait_fd_closed(vm.pid, fd)
        assert set(errors) == {"wait_for", "lines"}
        for name, (error, at) in errors.items():
            print(f"console closed by QEMU: {name}: {type(error).__name__} "
                  f"after {at - closed_at:.3f} s")  # fmt: skip
            assert at - closed_at < PROMPT_ERROR, name
        error = errors["wait_for"][0]
        assert type(error) is ConsoleClosed
        assert isinstance(error, MachineError)
        assert "end of file" in str(error)
        assert b"No bootable device" in error.tail
        assert "quietly" in str(errors["lines"][0])  # iterators simply end
        # Writing now fails with a MachineError; QEMU and its monitor are unaffected, and
        # SeaBIOS, writing to the null backend now, keeps rebooting.
        with pytest.raises(MachineError, match="console"):
            await vm.console.write(b"x")
        assert vm.is_running() and vm.failure is None
        await vm.event_wait("RESET", timeout=30)
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0  # quit over QMP
    assert_gone(vm)
    assert os.listdir(base) == []


# -- someone else SIGKILLs QEMU --------------------------------------------------------------------
async def _kill_first_qemu_child(known: set[int], killed: list[int]) -> None:
    while True:
        new = qemu_children() - known
        if new:
            pid = min(new)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        await trio.lowlevel.checkpoint()


async def _kill_later(pid: int, delay: float) -> None:
    await trio.sleep(delay)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("moment", ["launch", "body", "teardown"])
async def test_temp_files_removed_when_someone_else_sigkills_qemu(
    tmp_path: Path, moment: str
) -> None:
    base = make_base(tmp_path)
    config = MachineConfig(
        machine="q35,graphics=off", console=True, args=SEABIOS_LOOP, base_temp_dir=str(base)
    )
    async with trio_qemu.open_machine(config):  # warm-up
        pass
    census = Census(base)
    outcome: BaseException | None = None
    vm: trio_qemu.Machine | None = None
    with trio.fail_after(60):
        if moment == "launch":
            killed: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_kill_first_qemu_child, qemu_children(), killed)
                try:
                    async with trio_qemu.open_machine(config) as vm:
                        await trio.sleep(30)
                except (LaunchError, MachineExited) as exc:
                    outcome = exc
            assert killed
        elif moment == "body":
            try:
                async with trio_qemu.open_machine(config) as vm:
                    await vm.console.wait_for(b"SeaBIOS", timeout=30)
                    assert vm.pid is not None and any(vm.temp_dir.iterdir())
                    os.kill(vm.pid, signal.SIGKILL)
                    await trio.sleep(30)
            except MachineExited as exc:
                outcome = exc
        else:
            async with (
                trio.open_nursery() as nursery,
                trio_qemu.open_machine(config, shutdown_timeout=30) as vm,
            ):
                assert vm.pid is not None
                os.kill(vm.pid, signal.SIGSTOP)  # teardown's quit gets no answer ...
                nursery.start_soon(_kill_later, vm.pid, 0.3)  # ... someone kills QEMU
    print(f"SIGKILL from outside during {moment}: {type(outcome).__name__}")
    if moment != "teardown":
        assert type(outcome) in (LaunchError, MachineExited), repr(outcome)
        assert getattr(outcome, "returncode", None) == -signal.SIGKILL
    if vm is not None:
        assert vm.returncode == -signal.SIGKILL
        assert_gone(vm)
    census.check(f"SIGKILL during {moment}")
