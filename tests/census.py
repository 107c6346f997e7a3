"""What a test may leave behind, counted: our QEMU children, our open fds (number -> what
each points to), bound unix sockets, a machine's temporary directory; and what QEMU holds
(its fds, the kernel's view of its sockets).

:class:`Census` takes a baseline and checks all of it at once; the rest are the pieces.
"""

from __future__ import annotations

import gc
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import trio_qemu


# -- processes ---------------------------------------------------------------------------------
def qemu_children() -> set[int]:
    """Pids of our child processes running QEMU, zombies included (not reaped yet)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat_line = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        close = stat_line.rindex(b")")
        comm = stat_line[stat_line.index(b"(") + 1 : close]
        ppid = int(stat_line[close + 2 :].split()[1])
        if ppid == me and comm.startswith(b"qemu-system"):
            found.add(int(entry))
    return found


def pid_gone(pid: int | None) -> bool:
    """Whether ``pid`` no longer exists at all (exited *and* reaped)."""
    assert pid is not None
    return not Path(f"/proc/{pid}").exists()


def proc_text(pid: int | None, name: str) -> str:
    """The text of ``/proc/<pid>/<name>``."""
    with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="replace") as f:
        return f.read()


def assert_gone(vm: trio_qemu.Machine) -> None:
    """QEMU exited and was reaped, and the machine's temporary directory is gone."""
    assert vm.pid is not None
    assert not vm.is_running()
    assert pid_gone(vm.pid), f"QEMU pid {vm.pid} still exists"
    assert not vm.temp_dir.exists(), f"{vm.temp_dir} was not removed"


# -- fds -----------------------------------------------------------------------------------------
def open_fds(pid: int | str = "self") -> dict[int, str]:
    """fd number -> what it points to, for ``pid`` (default: this process).

    Compare these maps, not their sizes: an fd closed and another opened in between keeps
    the count and changes the map."""
    fds: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            fds[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:  # closed meanwhile (the listing's own fd, for one)
            continue
    return fds


def fd_changes(before: dict[int, str], now: dict[int, str]) -> str:
    """The difference between two :func:`open_fds` maps, for an assertion message."""
    new = {fd: t for fd, t in now.items() if before.get(fd) != t}
    gone = {fd: t for fd, t in before.items() if now.get(fd) != t}
    return f"new/changed {new}, gone/changed {gone}"


# -- unix sockets --------------------------------------------------------------------------------
def unix_paths_under(root: Path) -> list[str]:
    """Bound unix socket paths under ``root`` that exist in the kernel (even if unlinked)."""
    prefix = str(root)
    found = []
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.split(None, 7)
            if len(parts) == 8 and parts[7].strip().startswith(prefix):
                found.append(parts[7].strip())
    return found


def socket_files_under(root: Path) -> list[Path]:
    """Socket files (in the file system) under ``root``."""
    return [
        Path(d) / name
        for d, _, names in os.walk(root)
        for name in names
        if stat.S_ISSOCK(os.lstat(Path(d) / name).st_mode)
    ]


def socket_inodes(fds: dict[int, str]) -> dict[int, int]:
    """fd -> socket inode, for the fds of an :func:`open_fds` map that are sockets."""
    return {
        fd: int(target[len("socket:[") : -1])
        for fd, target in fds.items()
        if target.startswith("socket:[")
    }


_AF_UNIX, _NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 1, 4, 20
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_ERROR, _NLMSG_DONE = 0x1, 0x300, 2, 3
_UDIAG_SHOW_NAME, _UDIAG_SHOW_PEER, _UNIX_DIAG_NAME, _UNIX_DIAG_PEER = 0x1, 0x4, 0, 2
TCP_ESTABLISHED = 1


@dataclass(frozen=True)
class UnixSocket:
    type: int  # socket.SOCK_STREAM, ...
    state: int  # 1: connected, 10: listening
    path: str  # "" for an unnamed socket (a socketpair's ends)
    peer: int | None  # the peer's inode


def unix_sockets() -> dict[int, UnixSocket]:
    """Every AF_UNIX socket of the network namespace by inode, from the kernel's sock_diag
    (``ss -x`` reads the same): its type, state, bound path and peer."""
    found: dict[int, UnixSocket] = {}
    request = struct.pack(
        "=BBHIIIII", _AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_NAME | _UDIAG_SHOW_PEER, 0, 0
    )
    header = struct.pack(
        "=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.send(header + request)
        while True:
            data = nl.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag")
                _, stype, state, _, inode = struct.unpack_from("=BBBBI", data, offset + 16)
                path, peer = "", None
                attr, end = offset + 16 + 16, offset + length
                while attr + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    payload = data[attr + 4 : attr + alen]
                    if atype == _UNIX_DIAG_NAME:
                        path = payload.decode("utf-8", "replace")
                    elif atype == _UNIX_DIAG_PEER:
                        peer = struct.unpack("=I", payload)[0]
                    attr += (alen + 3) & ~3
                found[inode] = UnixSocket(stype, state, path, peer)
                offset += (length + 3) & ~3


def inet_sockets(inodes: set[int]) -> list[tuple[str, str, str, str]]:
    """(table, local address, remote address, state) of each inet socket in ``inodes``."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[9]) in inodes:
                found.append((table, fields[1], fields[2], fields[3]))
    return found


# -- the whole census ------------------------------------------------------------------------------
def _baseline_fds() -> dict[int, str]:
    # Garbage from earlier tests may still hold fds and free them at any later moment:
    # collect it first. Nothing is collected afterwards, so a leak that waits for the
    # garbage collector shows up.
    gc.collect()
    return open_fds()


@dataclass
class Census:
    """What this process holds now (under ``base``, a dedicated ``base_temp_dir``);
    :meth:`check` says what is left over since."""

    base: Path
    fds: dict[int, str] = field(default_factory=_baseline_fds)

    def check(
        self, where: str, children: set[int] | None = None, dirs: set[str] | None = None
    ) -> None:
        """No QEMU child but ``children``, nothing in ``base`` but ``dirs``, no socket bound
        under ``base``, exactly the fds of the baseline (same numbers, same targets)."""
        assert qemu_children() == (children or set()), f"{where}: QEMU children left"
        assert set(os.listdir(self.base)) == (dirs or set()), f"{where}: temp dirs left"
        assert unix_paths_under(self.base) == [], f"{where}: unix sockets bound under base"
        now = open_fds()
        assert now == self.fds, f"{where}: fds differ from the baseline: " + fd_changes(
            self.fds, now
        )
