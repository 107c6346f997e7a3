"""The public surface: explicit, complete and documented (in the spirit of trio's own check)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import trio_qemu

INIT = Path(trio_qemu.__file__)


def test_all_names_exist_and_are_documented() -> None:
    undocumented = []
    for name in trio_qemu.__all__:
        obj = getattr(trio_qemu, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
            undocumented.append(name)
    assert undocumented == []


def test_every_reexport_is_explicit_and_listed() -> None:
    # `from x import name as name` is the explicit re-export form type checkers honour.
    tree = ast.parse(INIT.read_text())
    reexported = {
        alias.asname
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    assert reexported == set(trio_qemu.__all__)


def test_design_api_names_are_public() -> None:
    # The names users and scenarios write against (README, "A tour").
    for name in (
        "open_machine", "start_machine", "open_machines", "MachineConfig", "Machine",
        "MachineError", "LaunchError", "MachineExited", "AbnormalShutdown",
        "QMPProtocolError", "ConsoleTimeout", "ExecuteError",
    ):  # fmt: skip
        assert name in trio_qemu.__all__, name
    for attr in (
        "qmp", "cmd", "subscribe", "event_wait", "events_wait", "send_fd_scm", "console",
        "shell", "agent", "hmp", "screenshot", "shutdown", "kill", "wait", "is_running", "log",
        "pid", "returncode", "temp_dir", "log_dir",
    ):  # fmt: skip
        assert hasattr(trio_qemu.Machine, attr), attr
    unlaunched = trio_qemu.Machine(trio_qemu.MachineConfig(name="x"))
    assert unlaunched.name == "x" and unlaunched.argv == []
    assert callable(trio_qemu.guest.ensure_guest)
    assert callable(trio_qemu.qtest.open_qtest_machine)


#: Every public name of release 0.1, by the module users imported it from. The package
#: layout changed since (guest/, network/ and qtest/ became packages); these must still
#: import from the same place.
PUBLIC_IN_0_1: dict[str, list[str]] = {
    "trio_qemu": [
        "AbnormalShutdown", "AgentError", "AgentTimeout", "ChannelFds", "Console",
        "ConsoleClosed", "ConsoleFailure", "ConsoleTimeout", "EventsDropped", "ExecuteError",
        "FdSpec", "GuestAgent", "GuestBuildError", "GuestCommandError", "GuestImage",
        "GuestResult", "LaunchError", "Machine", "MachineConfig", "MachineError",
        "MachineExited", "MachineTimeout", "MigrationError", "NetworkError", "NetworkTimeout",
        "QMPBadMessage", "QMPClient", "QMPConnectionClosed", "QMPEvent", "QMPGreetingError",
        "QMPNegotiationError", "QMPProtocolError", "QMPTimeout", "QMPUnexpectedReply",
        "QtestError", "QtestInvalidRequest", "QtestMachine", "QtestProtocolError",
        "QtestTimeout", "Shell", "ShellError", "ShellTimeout", "Subscription", "build_guest",
        "ensure_guest", "event_match", "incoming_config", "kvm_usable", "migrate",
        "open_agent", "open_machine", "open_machines", "open_qmp", "open_qtest_machine",
        "resolve_accel", "start_machine",
    ],
    "trio_qemu.guest": [
        "AGENT_LIBRARY_PACKAGES", "AGENT_PACKAGE", "AGENT_WRAPPER_PATH", "BOOT_MODULES",
        "CACHE_ENV", "DEFAULT_APPEND", "GUEST_ARGS", "GUEST_MODULES", "READY_MARKER",
        "GuestImage", "build_guest", "default_cache_dir", "ensure_guest",
    ],
    "trio_qemu.network": [
        "DEFAULT_NIC", "Direction", "Link", "NetworkError", "NetworkTimeout", "PcapRecord",
        "PcapWriter", "PingResult", "PortRef", "PortStats", "Switch", "mac_address",
        "parse_ping", "ping", "read_pcap", "set_nic_link", "wait_carrier", "with_ip",
    ],
    "trio_qemu.qtest": [
        "CHARDEV_ID", "COMMANDS", "DEFAULT_MACHINE", "MAX_IN_FLIGHT", "MAX_TRANSFER",
        "IrqEvent", "IrqSubscription", "QtestError", "QtestInvalidRequest", "QtestMachine",
        "QtestProtocolError", "QtestTimeout", "check_line", "open_qtest_machine", "qtest_args",
    ],
    "trio_qemu.agent": ["DEFAULT_AGENT_MESSAGE_SIZE", "SHUTDOWN_MODES", "GuestAgent", "open_agent"],
    "trio_qemu.migration": ["SETTLE_TIMEOUT", "MigrationError", "incoming_config", "migrate"],
    "trio_qemu.pytest_plugin": ["MachineFactory"],
}  # fmt: skip


def test_every_0_1_name_still_imports_from_where_it_did() -> None:
    missing = []
    for module_name, names in PUBLIC_IN_0_1.items():
        module = importlib.import_module(module_name)
        public = set(getattr(module, "__all__", ()))
        for name in names:
            if not hasattr(module, name) or name not in public:
                missing.append(f"{module_name}.{name}")
    assert missing == []


def test_public_objects_name_their_public_module() -> None:
    """Tracebacks and reprs say ``trio_qemu.MachineExited``, not ``trio_qemu._errors``."""
    private = []
    for name in trio_qemu.__all__:
        obj = getattr(trio_qemu, name)
        module = getattr(obj, "__module__", "")
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and module.startswith("trio_qemu."):
            private.append(f"{name}: {module}")
    assert private == []
    assert repr(trio_qemu.MachineExited) == "<class 'trio_qemu.MachineExited'>"
