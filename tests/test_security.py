"""Security, against a real QEMU under TCG: what QEMU is given, and what runs on the host.

- Channels are AF_UNIX socketpairs: every socket QEMU holds is one end of a pair whose other
  end is ours (checked in QEMU's fd table and with the kernel's sock_diag); no path, no
  listener.
- Nothing QEMU owns is an inet socket unless asked for (a TCP monitor), and then no listener
  is left open.
- The machine's temporary directory is 0700 and ours; the user's base directory is untouched.
- No shell runs on the host: the library's source is scanned for every way to start one.
- Values reach QEMU literally: shell metacharacters in arguments and names are characters.

Temp files going even when QEMU is SIGKILLed: test_faults.py.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import stat
from pathlib import Path

import pytest
from census import (
    TCP_ESTABLISHED,
    assert_gone,
    inet_sockets,
    open_fds,
    proc_text,
    qemu_children,
    socket_files_under,
    socket_inodes,
    unix_paths_under,
    unix_sockets,
)
from reliability import make_base

import trio_qemu
from trio_qemu import MachineConfig
from trio_qemu.guest import GuestImage

ROOT = Path(__file__).resolve().parent.parent

_ALL_CHANNELS = MachineConfig(
    machine="q35", console=True, shell=True, agent=True, display=True, args=["-S", "-nodefaults"]
)


@pytest.mark.parametrize("kind", ["none", "all-channels", "tiny-guest"])
async def test_channels_are_unnamed_socketpairs(
    tmp_path: Path, kind: str, tiny_guest: GuestImage
) -> None:
    """Every socket QEMU holds is one end of an AF_UNIX socketpair whose other end is ours:
    the fds named on its command line, nothing else; no path, no listener, no inet socket.
    (``-S``: the guest need not run for this.)"""
    base = make_base(tmp_path)
    if kind == "none":
        config = MachineConfig(machine="none", args=["-nodefaults"])
    elif kind == "all-channels":
        config = _ALL_CHANNELS
    else:
        config = tiny_guest.config(args=[*tiny_guest.config().args, "-S"])
    async with trio_qemu.open_machine(config, base_temp_dir=base) as vm:
        assert vm.pid is not None
        theirs = socket_inodes(open_fds(vm.pid))
        ours = set(socket_inodes(open_fds()).values())
        table = unix_sockets()
        named = {int(n) for n in re.findall(r"^socket,id=\w+,fd=(\d+)$", "\n".join(vm.argv), re.M)}
        channels = 1 + config.console + config.shell + config.agent + config.relay
        assert len(named) == channels
        assert set(theirs) == named, (theirs, vm.argv)
        for fd, inode in theirs.items():
            sock = table.get(inode)
            assert sock is not None, f"QEMU's fd {fd} is not an AF_UNIX socket"
            assert sock.type == socket.SOCK_STREAM, sock
            assert sock.state == TCP_ESTABLISHED, sock
            assert sock.path == "", f"QEMU's fd {fd} is bound to {sock.path!r}"
            assert sock.peer in ours, f"QEMU's fd {fd}: its peer is not one of our sockets"
            assert table[sock.peer].path == ""
        assert inet_sockets(set(theirs.values())) == []
        assert socket_files_under(base) == [] and unix_paths_under(base) == []
        assert stat.S_IMODE(vm.temp_dir.stat().st_mode) == 0o700
    assert_gone(vm)


async def test_nothing_listens_unless_asked(tmp_path: Path) -> None:
    """A TCP monitor is the one way to get an inet socket: the listener is ours, on the
    loopback address asked for, and gone once QEMU has connected to it."""
    ours_before = set(socket_inodes(open_fds()).values())
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], monitor_address=("127.0.0.1", 0),
        base_temp_dir=make_base(tmp_path),
    ) as vm:  # fmt: skip
        assert vm.pid is not None
        theirs = set(socket_inodes(open_fds(vm.pid)).values())
        qemu_inet = inet_sockets(theirs)
        assert len(qemu_inet) == 1, qemu_inet
        table, _, remote, state = qemu_inet[0]
        assert table == "tcp" and state == "01"  # connected out, not listening
        assert remote.startswith("0100007F:")  # to 127.0.0.1
        new_ours = set(socket_inodes(open_fds()).values()) - ours_before
        assert all(s[3] != "0A" for s in inet_sockets(new_ours)), "a listener is left open"
        assert (await vm.cmd("query-status"))["running"] is True
    assert_gone(vm)


async def test_temp_dir_is_private(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    base.chmod(0o755)
    async with trio_qemu.open_machine(
        machine="none", console=True, args=["-nodefaults"], base_temp_dir=base
    ) as vm:
        assert vm.temp_dir.parent == base
        assert stat.S_IMODE(vm.temp_dir.stat().st_mode) == 0o700
        assert vm.temp_dir.stat().st_uid == os.getuid()
        assert vm.log_path is not None and vm.log_path.parent == vm.temp_dir
        assert [p for p in vm.temp_dir.iterdir() if not p.is_file()] == []
    assert stat.S_IMODE(base.stat().st_mode) == 0o755  # the user's directory is untouched
    assert os.listdir(base) == []


# Host processes may only be started with an argv list (no shell in between).
_SPAWNERS = {"run_process", "open_process", "Popen", "run", "call", "check_call",
             "check_output", "create_subprocess_exec"}  # fmt: skip
_FORBIDDEN = re.compile(
    r"^(os\.(system|popen|exec\w*|spawn\w*|posix_spawn\w*)|subprocess\.(getoutput|getstatusoutput)"
    r"|asyncio\.create_subprocess_shell|pty\.spawn|commands\.\w+)$"
)
_SHELLS = {"sh", "bash", "dash", "zsh", "ash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def host_shell_uses(source: str, filename: str = "<source>") -> list[str]:
    """Places in ``source`` that would run a host command through a shell (or could)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "pty"):
            for alias in node.names:
                if _FORBIDDEN.match(f"{node.module}.{alias.name}"):
                    found.append(f"{where}: imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if _FORBIDDEN.match(name):
            found.append(f"{where}: calls {name}")
        # ``relay.open_process`` runs its command in the guest, never on the host.
        if name.rsplit(".", 1)[-1] not in _SPAWNERS or name in ("trio.run", "relay.open_process"):
            continue
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"{where}: {name}(shell=...)")
        if node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant | ast.JoinedStr) and isinstance(
                getattr(first, "value", ""), str
            ):
                found.append(f"{where}: {name} with a command string")
            if isinstance(first, ast.List) and first.elts:
                head = first.elts[0]
                if isinstance(head, ast.Constant) and head.value in _SHELLS:
                    found.append(f"{where}: {name} runs {head.value}")
    return found


def test_the_scanner_finds_host_shells() -> None:
    bad = """
import os, subprocess, asyncio, trio
from os import system
os.system("x")
os.popen("x")
subprocess.run("ls -l", shell=True)
subprocess.Popen(["ls"], shell=flag)
subprocess.getoutput("x")
trio.run_process(f"ls {x}")
trio.run_process(["sh", "-c", "x"])
asyncio.create_subprocess_shell("x")
os.execvp("sh", ["sh"])
"""
    assert len(host_shell_uses(bad)) == 11, host_shell_uses(bad)
    good = """
config = image.config(shell=True)
trio.run(main)
trio.run_process(["apt-get", "download", name], check=False)
subprocess.run(argv, shell=False)
"""
    assert host_shell_uses(good) == []


def test_no_shell_is_ever_invoked_on_the_host() -> None:
    sources = sorted((ROOT / "trio_qemu").rglob("*.py"))
    assert len(sources) > 10
    found = [u for path in sources for u in host_shell_uses(path.read_text(), path.name)]
    assert found == []


async def test_values_reach_qemu_literally(tmp_path: Path) -> None:
    """Shell metacharacters in arguments and in the machine's name are just characters:
    QEMU is exec'd directly by us (its parent is this process, its argv exactly ours)."""
    base = make_base(tmp_path)
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}1) `touch {marker}2` ; touch {marker}3 | touch {marker}4 && x"
    name = "n$(id)`id`;x|y&z"  # the name becomes file names ("/" would be replaced by "_")
    async with trio_qemu.open_machine(
        machine="none",
        name=name,
        args=["-nodefaults", "-name", evil],
        base_temp_dir=base,
    ) as vm:
        assert (await vm.cmd("query-name"))["name"] == evil
        cmdline = proc_text(vm.pid, "cmdline").split("\0")[:-1]
        assert cmdline == vm.argv
        assert vm.pid in qemu_children()  # our direct child: no shell in between
        assert vm.temp_dir.parent == base
        assert vm.temp_dir.name.startswith(f"trio-qemu-{name}-")
        assert vm.log_path is not None and vm.log_path.name == f"{name}.log"
    assert_gone(vm)
    assert os.listdir(tmp_path) == [base.name]  # no marker file was created
    assert os.listdir(base) == []
