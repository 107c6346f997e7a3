"""Tests of MachineConfig, the argv builder and the accel="auto" probe.

All but the last few are pure. The ``test_qemu_*`` ones run the real QEMU on a built argv
to show it accepts it (skipped where there is no QEMU).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from trio_qemu import LaunchError, _config
from trio_qemu._config import (
    PLACEHOLDER_FDS,
    ChannelFds,
    FdSpec,
    MachineConfig,
    check_paths,
    kvm_usable,
    resolve_accel,
)

BASE = ["qemu-system-x86_64", "-display", "none", "-vga", "none"]
MONITOR = ["-chardev", "socket,id=mon,fd=3", "-mon", "chardev=mon,mode=control"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No user override of the binary or the accelerator leaks into these tests."""
    monkeypatch.delenv("QEMU", raising=False)
    monkeypatch.delenv("TRIO_QEMU_ACCEL", raising=False)


def _fake_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, flags: str, device: bool) -> None:
    """Point the KVM probe at a fake device and cpuinfo under ``tmp_path``."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nflags\t\t: {flags}\n"
    )
    kvm = tmp_path / "kvm"
    if device:
        kvm.write_bytes(b"")
    monkeypatch.setattr(_config, "KVM_DEVICE", str(kvm))
    monkeypatch.setattr(_config, "CPUINFO", str(cpuinfo))


# --- the default and the field defaults ------------------------------------------------


def test_default_argv() -> None:
    assert MachineConfig().argv(accel="tcg") == [*BASE, *MONITOR, "-accel", "tcg"]


def test_defaults() -> None:
    config = MachineConfig()
    assert config.accel == "auto"
    assert config.qmp is True
    assert config.console is False
    assert config.console_buffer == 1024 * 1024
    assert (config.launch_timeout, config.qmp_timeout, config.shutdown_timeout) == (30, 30, 30)
    assert (config.event_buffer, config.event_cache) == (2048, 1000)
    assert config.args == config.wrapper == ()
    assert config.fds == ()
    assert config.pass_fds() == ()


def test_placeholder_fds_documented_numbers() -> None:
    assert ChannelFds(monitor=3, console=4, shell=5, agent=6, relay=7) == PLACEHOLDER_FDS
    config = MachineConfig(console=True, shell=True, agent=True, relay=True)
    assert config.argv(accel=None) == config.argv(PLACEHOLDER_FDS, accel=None)


def test_argv_resolves_auto_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_QEMU_ACCEL", "kvm")
    assert MachineConfig().argv()[-2:] == ["-accel", "kvm"]
    assert MachineConfig(accel="whpx").argv()[-2:] == ["-accel", "whpx"]
    assert "-accel" not in MachineConfig(accel=None).argv()
    # An explicit accel= overrides the field; "auto" given there is resolved too.
    assert MachineConfig(accel="whpx").argv(accel="tcg")[-2:] == ["-accel", "tcg"]
    assert MachineConfig().argv(accel="auto")[-2:] == ["-accel", "kvm"]
    assert "-accel" not in MachineConfig().argv(accel=None)


def test_binary_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MachineConfig().resolved_binary() == "qemu-system-x86_64"
    monkeypatch.setenv("QEMU", "/opt/qemu/bin/qemu-system-x86_64")
    assert MachineConfig().resolved_binary() == "/opt/qemu/bin/qemu-system-x86_64"
    assert MachineConfig(binary="qemu-kvm").resolved_binary() == "qemu-kvm"
    assert MachineConfig(binary="qemu-kvm").argv(accel=None)[0] == "qemu-kvm"


# --- the monitor --------------------------------------------------------------------------


def test_monitor_socketpair_fd() -> None:
    argv = MachineConfig().argv(ChannelFds(monitor=17), accel=None)
    assert argv == [
        *BASE,
        "-chardev",
        "socket,id=mon,fd=17",
        "-mon",
        "chardev=mon,mode=control",
    ]


@pytest.mark.parametrize("as_path", [False, True])
def test_monitor_unix_path(as_path: bool) -> None:
    address: str | Path = Path("/run/vm/qmp.sock") if as_path else "/run/vm/qmp.sock"
    argv = MachineConfig(monitor_address=address).argv(accel=None)
    assert argv == [
        *BASE,
        "-chardev",
        "socket,id=mon,path=/run/vm/qmp.sock",
        "-mon",
        "chardev=mon,mode=control",
    ]


def test_monitor_tcp() -> None:
    argv = MachineConfig(monitor_address=("127.0.0.1", 4444)).argv(accel=None)
    assert argv == [
        *BASE,
        "-chardev",
        "socket,id=mon,host=127.0.0.1,port=4444",
        "-mon",
        "chardev=mon,mode=control",
    ]


def test_qmp_false_has_no_monitor() -> None:
    argv = MachineConfig(qmp=False).argv(ChannelFds(), accel=None)
    assert argv == BASE


# --- the console --------------------------------------------------------------------------


def test_console_default_index() -> None:
    argv = MachineConfig(console=True, qmp=False).argv(accel=None)
    assert argv == [*BASE, "-chardev", "socket,id=console,fd=4", "-serial", "chardev:console"]


def test_console_index_2() -> None:
    config = MachineConfig(console=True, console_index=2, qmp=False)
    assert config.argv(ChannelFds(console=9), accel=None) == [
        *BASE,
        "-chardev",
        "socket,id=console,fd=9",
        "-serial",
        "null",
        "-serial",
        "null",
        "-serial",
        "chardev:console",
    ]


def test_console_device() -> None:
    config = MachineConfig(console=True, console_device="isa-serial,index=3", qmp=False)
    assert config.argv(accel=None) == [
        *BASE,
        "-chardev",
        "socket,id=console,fd=4",
        "-device",
        "isa-serial,index=3,chardev=console",
    ]


def test_console_log_and_buffer_are_not_argv(tmp_path: Path) -> None:
    plain = MachineConfig(console=True).argv(accel=None)
    logged = MachineConfig(console=True, console_log=tmp_path / "c.log", console_buffer=4096)
    assert logged.argv(accel=None) == plain


# --- shell, agent, display, fds, wrapper, args -------------------------------------------


def test_shell_and_agent() -> None:
    config = MachineConfig(shell=True, agent=True, qmp=False)
    assert config.argv(ChannelFds(shell=11, agent=12), accel=None) == [
        *BASE,
        "-device",
        "virtio-serial-pci,id=trio-vser",
        "-chardev",
        "socket,id=shell,fd=11",
        "-device",
        "virtserialport,bus=trio-vser.0,chardev=shell,name=org.trio-qemu.shell,id=trio-shell-port",
        "-chardev",
        "socket,id=agent,fd=12",
        "-device",
        "virtserialport,bus=trio-vser.0,chardev=agent,name=org.qemu.guest_agent.0",
    ]


def test_agent_alone_gets_the_bus_once() -> None:
    argv = MachineConfig(agent=True, qmp=False).argv(accel=None)
    assert argv.count("virtio-serial-pci,id=trio-vser") == 1
    assert "socket,id=agent,fd=6" in argv
    assert not any("id=shell" in arg for arg in argv)


def test_display() -> None:
    argv = MachineConfig(display=True, qmp=False).argv(accel=None)
    assert argv == ["qemu-system-x86_64", "-display", "none", "-vga", "std"]


def test_fds() -> None:
    config = MachineConfig(
        fds=[FdSpec(7, 1), FdSpec(fd=8, fdset=2, opaque="disk,ro")],
        qmp=False,
    )
    assert config.fds == (FdSpec(7, 1), FdSpec(8, 2, "disk,ro"))
    assert config.pass_fds() == (7, 8)
    assert config.argv(accel=None) == [
        *BASE,
        "-add-fd",
        "fd=7,set=1",
        "-add-fd",
        "fd=8,set=2,opaque=disk,,ro",
    ]


def test_wrapper_and_args_order(tmp_path: Path) -> None:
    config = MachineConfig(
        wrapper=["taskset", "-c", "0"],
        args=["-nodefaults", "-S"],
        machine="q35,graphics=off",
        memory=256,
        smp="2,sockets=1",
        kernel=tmp_path / "vmlinux",
        initrd=str(tmp_path / "initrd"),
        append="console=ttyS0 quiet",
        console=True,
    )
    assert config.wrapper == ("taskset", "-c", "0")
    assert config.args == ("-nodefaults", "-S")
    assert config.argv(accel="tcg") == [
        "taskset",
        "-c",
        "0",
        *BASE,
        *MONITOR,
        "-machine",
        "q35,graphics=off",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-smp",
        "2,sockets=1",
        "-kernel",
        str(tmp_path / "vmlinux"),
        "-initrd",
        str(tmp_path / "initrd"),
        "-append",
        "console=ttyS0 quiet",
        "-chardev",
        "socket,id=console,fd=4",
        "-serial",
        "chardev:console",
        "-nodefaults",
        "-S",
    ]


def test_full_order() -> None:
    """Every section in the documented order, args last."""
    config = MachineConfig(
        wrapper=("nice",),
        machine="q35",
        memory="1G",
        console=True,
        shell=True,
        agent=True,
        fds=(FdSpec(20, 0),),
        args=("-S",),
    )
    argv = config.argv(accel="tcg")
    firsts = [
        argv.index(arg)
        for arg in (
            "nice",
            "qemu-system-x86_64",
            "-display",
            "-vga",
            "socket,id=mon,fd=3",
            "-mon",
            "-machine",
            "-accel",
            "-m",
            "socket,id=console,fd=4",
            "virtio-serial-pci,id=trio-vser",
            "socket,id=shell,fd=5",
            "socket,id=agent,fd=6",
            "-add-fd",
            "-S",
        )
    ]
    assert firsts == sorted(firsts)
    assert argv[-1] == "-S"


def test_comma_escaping() -> None:
    argv = MachineConfig(monitor_address="/tmp/a,b/qmp,sock").argv(accel=None)
    assert "socket,id=mon,path=/tmp/a,,b/qmp,,sock" in argv
    argv = MachineConfig(monitor_address=("host,x", 1)).argv(accel=None)
    assert "socket,id=mon,host=host,,x,port=1" in argv
    # -kernel/-initrd/-append are taken verbatim by QEMU: no doubling there.
    argv = MachineConfig(kernel="/k,1", initrd="/i,2", append="a,b", qmp=False).argv(accel=None)
    assert argv[-6:] == ["-kernel", "/k,1", "-initrd", "/i,2", "-append", "a,b"]


def test_missing_channel_fd() -> None:
    with pytest.raises(ValueError, match=r"ChannelFds\.console"):
        MachineConfig(console=True).argv(ChannelFds(monitor=3), accel=None)
    with pytest.raises(ValueError, match=r"ChannelFds\.monitor"):
        MachineConfig().argv(ChannelFds(), accel=None)
    with pytest.raises(ValueError, match=r"ChannelFds\.agent"):
        MachineConfig(agent=True, qmp=False).argv(ChannelFds(shell=5), accel=None)
    # A path or TCP monitor needs no fd.
    MachineConfig(monitor_address="/x").argv(ChannelFds(), accel=None)


# --- accel="auto" -----------------------------------------------------------------------


def test_resolve_accel_passthrough() -> None:
    assert resolve_accel(None) is None
    assert resolve_accel("tcg") == "tcg"
    assert resolve_accel("kvm") == "kvm"
    assert resolve_accel("tcg,thread=single") == "tcg,thread=single"


def test_resolve_accel_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_kvm(monkeypatch, tmp_path, flags="fpu vmx sse", device=True)
    monkeypatch.setenv("TRIO_QEMU_ACCEL", "tcg")
    assert resolve_accel("auto") == "tcg"
    assert MachineConfig().argv()[-2:] == ["-accel", "tcg"]
    monkeypatch.setenv("TRIO_QEMU_ACCEL", "")  # empty: no override
    assert resolve_accel("auto") == "kvm"
    # The override replaces only "auto", never an explicit choice or None.
    monkeypatch.setenv("TRIO_QEMU_ACCEL", "kvm")
    assert resolve_accel("tcg") == "tcg"
    assert resolve_accel(None) is None


def test_auto_without_vmx_is_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_kvm(monkeypatch, tmp_path, flags="fpu sse sse2 hypervisor", device=True)
    assert kvm_usable() is False
    assert resolve_accel("auto") == "tcg"


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_auto_with_flag_and_device_is_kvm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str
) -> None:
    _fake_kvm(monkeypatch, tmp_path, flags=f"fpu {flag} sse", device=True)
    assert kvm_usable() is True
    assert resolve_accel("auto") == "kvm"
    assert MachineConfig().argv()[-2:] == ["-accel", "kvm"]


def test_auto_with_flag_but_no_device_is_tcg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_kvm(monkeypatch, tmp_path, flags="fpu vmx", device=False)
    assert resolve_accel("auto") == "tcg"


def test_probe_is_pure_over_its_arguments(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu vmxnot svmish\n")  # substrings are not flags
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    assert _config._probe_kvm(str(device), str(cpuinfo)) is False
    cpuinfo.write_text("flags\t: fpu svm\n")
    assert _config._probe_kvm(str(device), str(cpuinfo)) is True
    assert _config._probe_kvm(str(tmp_path / "missing"), str(cpuinfo)) is False
    assert _config._probe_kvm(str(device), str(tmp_path / "missing")) is False


def test_resolve_accel_auto_on_this_machine() -> None:
    """These machines have /dev/kvm but no vmx/svm: KVM cannot boot Linux, so TCG."""
    assert resolve_accel("auto") == "tcg"


# --- validation and replace() ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"launch_timeout": 0}, "launch_timeout"),
        ({"qmp_timeout": -1.0}, "qmp_timeout"),
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout"),
        ({"console_buffer": 0, "console": True}, "console_buffer"),
        ({"event_buffer": 0}, "event_buffer"),
        ({"event_cache": -5}, "event_cache"),
        ({"memory": 0}, "memory"),
        ({"smp": -1}, "smp"),
        ({"console": True, "console_index": -1}, "console_index"),
        ({"console_index": 1}, "needs console=True"),
        ({"console_device": "virtconsole"}, "needs console=True"),
        ({"console_log": "/tmp/c.log"}, "needs console=True"),
        ({"console": True, "console_device": "x", "console_index": 1}, "console_index"),
        ({"monitor_address": ("localhost",)}, r"\(host: str, port: int\)"),
        ({"monitor_address": (4444, "localhost")}, r"\(host: str, port: int\)"),
        ({"monitor_address": ("localhost", 70000)}, "port"),
        ({"monitor_address": ""}, "monitor_address"),
        ({"monitor_address": 4444}, "monitor_address"),
        ({"monitor_address": "/tmp/q.sock", "qmp": False}, "needs qmp=True"),
        ({"binary": ""}, r"MachineConfig\.binary must name a QEMU executable, not ''"),
        ({"binary": "  "}, "MachineConfig.binary"),
        ({"args": ["-nodefaults", "-daemonize"]}, "must not contain '-daemonize'.*detach"),
        ({"args": ["--daemonize"]}, "must not contain '--daemonize'"),
        ({"log_dir": ""}, "MachineConfig.log_dir"),
        ({"console": True, "console_log": ""}, "MachineConfig.console_log"),
        ({"base_temp_dir": ""}, "MachineConfig.base_temp_dir"),
        ({"log_dir": 5}, "MachineConfig.log_dir"),
    ],
)
def test_validation_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MachineConfig(**fields)


def test_binary_type_error() -> None:
    with pytest.raises(TypeError, match=r"MachineConfig\.binary must be a str"):
        MachineConfig(binary=Path("/usr/bin/qemu-system-x86_64"))  # type: ignore[arg-type]


def test_daemonize_refused_by_replace_too() -> None:
    config = MachineConfig(args=["-nodefaults"])
    with pytest.raises(ValueError, match="-daemonize"):
        config.replace(args=[*config.args, "-daemonize"])
    # Only the option itself: a value that merely contains the word is fine.
    assert MachineConfig(args=["-name", "no-daemonize"]).args == ("-name", "no-daemonize")


# --- check_paths: what a launch checks on the file system before QEMU starts -------------


def test_check_paths_accepts_good_paths(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    check_paths(MachineConfig(log_dir=tmp_path, console=True, console_log=log))
    assert log.exists()  # created, as the console would a moment later
    check_paths(MachineConfig())  # nothing to check


def test_check_paths_missing_log_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(LaunchError) as info:
        check_paths(MachineConfig(log_dir=missing), name="vm1")
    text = str(info.value)
    assert text.startswith(f"vm1: log_dir {str(missing)!r} does not exist")
    assert "No such file or directory" in text
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_check_paths_log_dir_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(LaunchError, match=r"log_dir .* is not a directory"):
        check_paths(MachineConfig(log_dir=a_file))


def test_check_paths_log_dir_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root may write anywhere, so ask os.access what it would say to anyone else.
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(LaunchError, match=r"log_dir .* is not writable"):
            check_paths(MachineConfig(log_dir=tmp_path))


@pytest.mark.parametrize(
    ("where", "cause"),
    [("missing-dir/console.log", "No such file or directory"), ("", "Is a directory")],
)
def test_check_paths_unopenable_console_log(tmp_path: Path, where: str, cause: str) -> None:
    path = tmp_path / where
    with pytest.raises(LaunchError) as info:
        check_paths(MachineConfig(console=True, console_log=path), name="vm2")
    text = str(info.value)
    assert text.startswith(f"vm2: cannot open console_log {str(path)!r}: ")
    assert cause in text
    assert isinstance(info.value.__cause__, OSError)


def test_check_paths_leaves_a_fifo_console_log_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening (and closing) a FIFO would block, or give its reader an end of file.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    check_paths(MachineConfig(console=True, console_log=fifo))  # returns at once
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(LaunchError, match=r"cannot open console_log .*: not writable"):
            check_paths(MachineConfig(console=True, console_log=fifo))


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="args"):
        MachineConfig(args="-S")
    with pytest.raises(TypeError, match="wrapper"):
        MachineConfig(wrapper=["nice", 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="fds"):
        MachineConfig(fds=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="fd"):
        FdSpec(-1, 0)


def test_frozen_and_hashable() -> None:
    config = MachineConfig(args=["-S"])
    with pytest.raises(AttributeError):
        config.name = "x"  # type: ignore[misc]
    assert hash(config) == hash(MachineConfig(args=("-S",)))
    assert config == MachineConfig(args=("-S",))


def test_replace() -> None:
    config = MachineConfig(name="a", args=("-S",))
    changed = config.replace(name="b", wrapper=["nice"])  # Any: lists are fine
    assert (changed.name, changed.args, changed.wrapper) == ("b", ("-S",), ("nice",))
    assert config.name == "a"
    with pytest.raises(ValueError, match="needs console=True"):
        config.replace(console_index=1)


def test_replace_unknown_field() -> None:
    with pytest.raises(TypeError, match=r"'colour', 'sizee'.*valid fields: binary, args") as info:
        MachineConfig().replace(sizee=1, colour="red", name="ok")
    assert "shutdown_timeout" in str(info.value)


# --- the real QEMU accepts what we build ---------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


class _SyncQMP:
    """The least QMP client that can check a freshly started QEMU answers."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self._file = sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting
        assert self.cmd("qmp_capabilities") == {}

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        assert line, "QEMU closed the monitor"
        message: dict[str, Any] = json.loads(line)
        return message

    def cmd(self, name: str, **args: Any) -> Any:
        self._file.write(json.dumps({"execute": name, "arguments": args}).encode())
        self._file.flush()
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            assert "error" not in message, message


@contextmanager
def _running(argv: list[str], pass_fds: tuple[int, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=pass_fds,
    )  # fmt: skip
    try:
        yield proc
    finally:
        try:
            output = proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        # QEMU exits 0 after "quit"; anything else means it disliked the argv.
        assert proc.returncode == 0, output.decode(errors="replace")


@needs_qemu
def test_qemu_accepts_socketpair_channels() -> None:
    """q35 paused (-S) with every socketpair channel, VGA and an fd set."""
    pairs = {name: socket.socketpair() for name in ("monitor", "console", "shell", "agent")}
    read_end, write_end = os.pipe()
    try:
        channels = ChannelFds(**{name: child.fileno() for name, (_, child) in pairs.items()})
        config = MachineConfig(
            machine="q35",
            accel="tcg",
            memory=64,
            console=True,
            console_index=1,
            shell=True,
            agent=True,
            display=True,
            fds=(FdSpec(read_end, 3, opaque="pipe,read"),),
            args=("-nodefaults", "-S"),
        )
        argv = config.argv(channels)
        pass_fds = (*(child.fileno() for _, child in pairs.values()), *config.pass_fds())
        with _running(argv, pass_fds):
            for _, child in pairs.values():
                child.close()
            qmp = _SyncQMP(pairs["monitor"][0])
            labels = {dev["label"] for dev in qmp.cmd("query-chardev")}
            assert {"mon", "console", "shell", "agent"} <= labels
            fdsets = qmp.cmd("query-fdsets")
            assert [(s["fdset-id"], s["fds"][0]["opaque"]) for s in fdsets] == [(3, "pipe,read")]
            assert qmp.cmd("query-status")["status"] == "prelaunch"
            qmp.cmd("quit")
    finally:
        for parent, child in pairs.values():
            parent.close()
            child.close()
        os.close(read_end)
        os.close(write_end)


@needs_qemu
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_qemu_connects_to_monitor_address(kind: str, tmp_path: Path) -> None:
    """QEMU connects out to a unix path (with a comma in it) or a TCP address we listen on."""
    if kind == "unix":
        directory = tmp_path / "a,b"
        directory.mkdir()
        path = directory / "q.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        address: Path | tuple[str, int] = path
    else:
        listener = socket.socket(socket.AF_INET)
        listener.bind(("127.0.0.1", 0))
        address = ("127.0.0.1", listener.getsockname()[1])
    listener.settimeout(10)
    with listener:
        listener.listen(1)
        config = MachineConfig(monitor_address=address, machine="none", args=("-nodefaults",))
        with _running(config.argv(accel="tcg")):
            conn, _ = listener.accept()
            with conn:
                _SyncQMP(conn).cmd("quit")


def test_inherit_fds_are_passed_but_add_nothing_to_argv() -> None:
    config = MachineConfig(
        qmp=False, fds=[FdSpec(7, 1)], inherit_fds=[9, 10], args=["-netdev", "socket,id=n,fd=9"]
    )
    assert config.pass_fds() == (7, 9, 10)
    assert config.argv(accel=None)[-4:] == ["-add-fd", "fd=7,set=1", "-netdev", "socket,id=n,fd=9"]
    with pytest.raises(TypeError, match="inherit_fds"):
        MachineConfig(inherit_fds=[-1])
