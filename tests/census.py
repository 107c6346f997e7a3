"""What a test may leave behind, counted: our QEMU children, our open fds, a machine's traces."""

from __future__ import annotations

import os
from pathlib import Path

import trio_qemu


def qemu_children() -> set[int]:
    """Pids of our child processes running QEMU, zombies included (not reaped yet)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        close = stat.rindex(b")")
        comm = stat[stat.index(b"(") + 1 : close]
        ppid = int(stat[close + 2 :].split()[1])
        if ppid == me and comm.startswith(b"qemu-system"):
            found.add(int(entry))
    return found


def pid_gone(pid: int | None) -> bool:
    """Whether ``pid`` no longer exists at all (exited *and* reaped)."""
    assert pid is not None
    return not Path(f"/proc/{pid}").exists()


def open_fds() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def assert_gone(vm: trio_qemu.Machine) -> None:
    """QEMU exited and was reaped, and the machine's temporary directory is gone."""
    assert vm.pid is not None
    assert not vm.is_running()
    assert pid_gone(vm.pid), f"QEMU pid {vm.pid} still exists"
    assert not vm.temp_dir.exists(), f"{vm.temp_dir} was not removed"
