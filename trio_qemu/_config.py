"""What a machine is: :class:`MachineConfig` and the pure QEMU command-line builder.

Nothing here starts a process or opens a socket (the file system is read only by the one
cached KVM probe behind ``accel="auto"`` and by :func:`check_paths`, which a launch calls
before QEMU starts), so every option can be tested without QEMU. The machine module creates
the socketpairs and hands their child-side fd numbers to :meth:`MachineConfig.argv` as a
:class:`ChannelFds`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

from ._errors import LaunchError
from .block.drives import Drive, check_drives, drives_argv

__all__ = [
    "ACCEL_ENV",
    "AGENT_PORT_NAME",
    "CPUINFO",
    "DEFAULT_BINARY",
    "DETACHING_OPTIONS",
    "KVM_DEVICE",
    "PLACEHOLDER_FDS",
    "RELAY_PORT_ID",
    "RELAY_PORT_NAME",
    "SHELL_PORT_NAME",
    "ChannelFds",
    "FdSpec",
    "MachineConfig",
    "check_paths",
    "kvm_usable",
    "resolve_accel",
]

DEFAULT_BINARY: Final = "qemu-system-x86_64"
"""The QEMU binary used when neither ``binary`` nor ``$QEMU`` names one (found on PATH)."""

KVM_DEVICE = "/dev/kvm"
"""The KVM device the ``accel="auto"`` probe opens (a module global so tests can point it
elsewhere)."""

CPUINFO = "/proc/cpuinfo"
"""Where the ``accel="auto"`` probe looks for the vmx/svm CPU flags (patchable for tests)."""

ACCEL_ENV: Final = "TRIO_QEMU_ACCEL"
"""Environment variable that, when set and non-empty, replaces ``accel="auto"``."""

SHELL_PORT_NAME: Final = "org.trio-qemu.shell"
"""The virtio-serial port name of the guest-shell channel (``/dev/virtio-ports/<name>``)."""
SHELL_PORT_ID: Final = "trio-shell-port"
"""The guest-shell port device's id: QEMU names it in ``VSERPORT_CHANGE`` events."""

RELAY_PORT_NAME: Final = "org.trio-qemu.relay"
"""The virtio-serial port name of the relay channel (TCP streams and file copies)."""
RELAY_PORT_ID: Final = "trio-relay-port"
"""The relay port device's id: QEMU names it in ``VSERPORT_CHANGE`` events."""

AGENT_PORT_NAME: Final = "org.qemu.guest_agent.0"
"""The virtio-serial port name the QEMU guest agent looks for by default."""

_VSER_ID: Final = "trio-vser"

DETACHING_OPTIONS: Final = frozenset({"-daemonize", "--daemonize"})
"""QEMU options refused in :attr:`MachineConfig.args`: with them QEMU forks, its first process
exits at once and the daemon runs on out of our reach (not our child, so neither supervised,
killed nor reaped). QEMU accepts every option with one or two dashes."""


@dataclass(frozen=True)
class FdSpec:
    """A file descriptor handed to QEMU as a member of an fd set (``-add-fd``).

    The fd is inherited by QEMU under the same number (``pass_fds``), so it must stay open
    in this process until QEMU has started.
    """

    fd: int
    """The fd number, in this process and in QEMU."""
    fdset: int
    """The fd set it joins; QEMU code refers to it as ``/dev/fdset/<fdset>``."""
    opaque: str | None = None
    """Free-form text QEMU shows for this fd in ``query-fdsets``."""

    def __post_init__(self) -> None:
        """Reject negative or non-integer numbers early, with a clear message."""
        for field in ("fd", "fdset"):
            value = getattr(self, field)
            if not _is_int(value) or value < 0:
                raise ValueError(f"FdSpec.{field} must be an integer >= 0, not {value!r}")
        if self.opaque is not None and not isinstance(self.opaque, str):
            raise TypeError(f"FdSpec.opaque must be a str or None, not {self.opaque!r}")

    def option(self) -> str:
        """The ``-add-fd`` option value, e.g. ``fd=7,set=1,opaque=disk``."""
        value = f"fd={self.fd},set={self.fdset}"
        if self.opaque is not None:
            value += f",opaque={_escape(self.opaque)}"
        return value


@dataclass(frozen=True)
class ChannelFds:
    """The fd numbers QEMU inherits for each socketpair channel.

    ``pass_fds`` gives the child the same numbers as the parent, so these are simply the
    child-side ends' ``fileno()``. A channel the config does not use may stay ``None``.
    """

    monitor: int | None = None
    """The QMP monitor's end (used when ``qmp`` is on and ``monitor_address`` is None)."""
    console: int | None = None
    """The serial console's end (used when ``console`` is on)."""
    shell: int | None = None
    """The guest-shell virtio-serial port's end (used when ``shell`` is on)."""
    agent: int | None = None
    """The guest-agent virtio-serial port's end (used when ``agent`` is on)."""
    relay: int | None = None
    """The relay's virtio-serial port's end (used when ``relay`` is on)."""


PLACEHOLDER_FDS: Final = ChannelFds(monitor=3, console=4, shell=5, agent=6, relay=7)
"""The fd numbers :meth:`MachineConfig.argv` shows when it is given no :class:`ChannelFds`:
the lowest numbers a child could get after stdin/stdout/stderr, in a fixed order, so the
command line can be shown and compared before any socket exists."""


class _Unset(enum.Enum):
    """Sentinel type for "argument not given" where ``None`` has a meaning of its own."""

    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET

_SEQUENCE_FIELDS: Final = ("args", "wrapper", "fds", "inherit_fds", "drives")


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    """Everything needed to launch one QEMU machine; an immutable value.

    Sequence fields accept any sequence (a list is fine) and are stored as tuples, so a
    config is hashable and can be shared between machines. :meth:`replace` makes a changed
    copy; :meth:`argv` is the full command line.
    """

    binary: str | None = None
    """The QEMU executable. None: ``$QEMU`` if set, else ``qemu-system-x86_64``, looked up
    on PATH when QEMU is started (see :meth:`resolved_binary`). An empty name is refused."""
    args: Sequence[str] = ()
    """Extra QEMU arguments, appended after everything else (so they can add to, and for
    options QEMU lets repeat, override what the other fields produce). Options that would
    detach QEMU from this process (``DETACHING_OPTIONS``: ``-daemonize``) are refused."""
    wrapper: Sequence[str] = ()
    """A command QEMU runs under, put before the binary, e.g. ``("taskset", "-c", "0")``.
    It must run QEMU as itself (``exec``) or stay its parent until it exits: a wrapper that
    forks QEMU off and exits (``setsid -f``) looks to us like QEMU exiting."""
    name: str | None = None
    """A label for logs and error messages; the machine picks one when None."""
    machine: str | None = None
    """The ``-machine`` value, e.g. ``"none"``, ``"q35"``, ``"q35,graphics=off"``; None
    leaves QEMU's default."""
    accel: str | None = "auto"
    """The ``-accel`` value. ``"auto"``: ``kvm`` only where KVM really works, else ``tcg``
    (see :func:`resolve_accel`); None: no ``-accel`` option; anything else is passed as is."""
    memory: int | str | None = None
    """Guest RAM for ``-m``: an int is MiB, a str is passed as is (``"1G"``)."""
    smp: int | str | None = None
    """The ``-smp`` value: an int is the CPU count, a str is passed as is."""
    kernel: str | os.PathLike[str] | None = None
    """A kernel to boot directly (``-kernel``)."""
    initrd: str | os.PathLike[str] | None = None
    """An initramfs for that kernel (``-initrd``)."""
    append: str | None = None
    """The kernel command line (``-append``)."""
    console: bool = False
    """True: a serial console on a socketpair chardev with id ``console``, always drained
    by the machine (an undrained console stalls the guest)."""
    console_device: str | None = None
    """A device to carry the console instead of a serial port: gives
    ``-device <console_device>,chardev=console`` in place of ``-serial chardev:console``."""
    console_index: int = 0
    """Which serial port is the console: that many ``-serial null`` come first (as
    ``qemu.machine`` does), so 1 makes it the guest's ttyS1."""
    console_log: str | os.PathLike[str] | None = None
    """A file the console output is also appended to (by the console module, not QEMU);
    created if missing, in a directory that must exist (checked at launch)."""
    console_buffer: int = 1 << 20
    """Size in bytes of the in-memory ring buffer of recent console output."""
    monitor_address: str | os.PathLike[str] | tuple[str, int] | None = None
    """Where QMP runs. None: a socketpair whose fd QEMU inherits (no path, no port); a
    path: a unix socket we listen on and QEMU connects to; ``(host, port)``: the same over
    TCP (port 0: a free port chosen at launch)."""
    qmp: bool = True
    """False: no monitor at all (the machine then has no ``qmp``/``cmd``/events)."""
    base_temp_dir: str | os.PathLike[str] | None = None
    """Where the machine's temporary directory is made; None: ``tempfile.gettempdir()``."""
    log_dir: str | os.PathLike[str] | None = None
    """Where QEMU's output log goes (an existing, writable directory: checked at launch,
    before QEMU starts); None: the machine's temporary directory."""
    launch_timeout: float = 30.0
    """Seconds from starting QEMU to a negotiated QMP connection before launch fails."""
    qmp_timeout: float = 30.0
    """Default per-command QMP timeout in seconds."""
    shutdown_timeout: float = 30.0
    """Seconds a graceful shutdown may take before QEMU is killed."""
    event_buffer: int = 2048
    """Default channel size of each event subscription; a full one drops (and counts).
    One 64 KiB read from a flooding QEMU holds ~540 events, all published before any
    subscriber runs: 2048 absorbs a few such reads (a few MiB at most)."""
    event_cache: int = 1000
    """How many unclaimed events are kept for ``event_wait`` (oldest dropped first)."""
    fds: Sequence[FdSpec] = ()
    """File descriptors passed to QEMU into fd sets (``-add-fd``); see :meth:`pass_fds`."""
    inherit_fds: Sequence[int] = ()
    """More file descriptors QEMU inherits as they are, for options of :attr:`args` that name
    them (``-netdev dgram,...,local.str=N``, ``-chardev socket,fd=N``). The caller keeps
    them open until the machine has started and closes its copies afterwards."""
    shell: bool = False
    """True: a virtio-serial port named ``org.trio-qemu.shell`` for the guest shell."""
    agent: bool = False
    """True: a virtio-serial port named ``org.qemu.guest_agent.0`` for the guest agent."""
    relay: bool = False
    """True: a virtio-serial port named ``org.trio-qemu.relay`` for the guest relay (TCP
    streams into the guest, ``forward_port``, file copies; see :mod:`trio_qemu.relay`). The
    tiny guest's ``config()`` turns it on when that guest has the relay."""
    display: bool = False
    """True: a standard VGA device (``-vga std``) so ``screendump`` works; QEMU still runs
    with ``-display none``."""
    drives: Sequence[Drive] = ()
    """Disks (:class:`~trio_qemu.block.Drive`): each a ``-blockdev`` node and a ``-device``
    front end, after the other devices and before :attr:`args`. Ids and node names must be
    unique (a drive without an id is ``drive<N>``, N its index)."""

    def __post_init__(self) -> None:
        """Normalise sequences to tuples and reject inconsistent settings with ValueError."""
        for field in _SEQUENCE_FIELDS:
            value = getattr(self, field)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise TypeError(
                    f"MachineConfig.{field} must be a sequence (list or tuple), not {value!r}"
                )
            object.__setattr__(self, field, tuple(value))
        for field in ("args", "wrapper"):
            for item in getattr(self, field):
                if not isinstance(item, str):
                    raise TypeError(f"MachineConfig.{field} items must be str, not {item!r}")
        for item in self.args:
            if item in DETACHING_OPTIONS:
                raise ValueError(
                    f"MachineConfig.args must not contain {item!r}: QEMU would detach from "
                    "this process (fork, and its first process exit at once), and trio_qemu "
                    "can only supervise, stop and reap a QEMU that stays its child"
                )
        if self.binary is not None:
            if not isinstance(self.binary, str):
                raise TypeError(
                    f"MachineConfig.binary must be a str (or None), not {self.binary!r}"
                )
            if not self.binary.strip():
                raise ValueError(
                    f"MachineConfig.binary must name a QEMU executable, not {self.binary!r} "
                    "(None: $QEMU, else qemu-system-x86_64)"
                )
        for field in ("log_dir", "console_log", "base_temp_dir"):
            value = getattr(self, field)
            if value is not None and (
                not isinstance(value, str | os.PathLike)
                or not isinstance(os.fspath(value), str)
                or not os.fspath(value)
            ):
                raise ValueError(
                    f"MachineConfig.{field} must be a non-empty path (str or "
                    f"os.PathLike[str]) or None, not {value!r}"
                )
        for spec in self.fds:
            if not isinstance(spec, FdSpec):
                raise TypeError(f"MachineConfig.fds items must be FdSpec, not {spec!r}")
        for fd in self.inherit_fds:
            if not _is_int(fd) or fd < 0:
                raise TypeError(f"MachineConfig.inherit_fds items must be fds >= 0, not {fd!r}")
        check_drives(self.drives)

        for field in ("launch_timeout", "qmp_timeout", "shutdown_timeout"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and not isinstance(value, bool)) or not (
                value > 0
            ):
                raise ValueError(f"MachineConfig.{field} must be a positive number, not {value!r}")
        for field in ("console_buffer", "event_buffer", "event_cache"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"MachineConfig.{field} must be a positive integer, not {value!r}")
        for field in ("memory", "smp"):
            value = getattr(self, field)
            if _is_int(value) and value <= 0:
                raise ValueError(f"MachineConfig.{field} must be positive, not {value!r}")

        if not _is_int(self.console_index) or self.console_index < 0:
            raise ValueError(
                f"MachineConfig.console_index must be an integer >= 0, not {self.console_index!r}"
            )
        if not self.console:
            given = [
                f"{field}={getattr(self, field)!r}"
                for field, unset in (
                    ("console_device", None),
                    ("console_log", None),
                    ("console_index", 0),
                )
                if getattr(self, field) != unset
            ]
            if given:
                raise ValueError(f"{', '.join(given)} needs console=True")
        if self.console_device is not None and self.console_index != 0:
            raise ValueError(
                "console_index applies to serial ports only; it cannot be combined with "
                f"console_device={self.console_device!r}"
            )

        address = self.monitor_address
        if isinstance(address, tuple):
            if not (
                len(address) == 2
                and isinstance(address[0], str)
                and address[0]
                and _is_int(address[1])
                and 0 <= address[1] < 65536
            ):
                raise ValueError(
                    "MachineConfig.monitor_address as a tuple must be (host: str, port: int) "
                    f"with 0 <= port < 65536 (0: any free port), not {address!r}"
                )
        elif address is not None and (
            not isinstance(address, str | os.PathLike)
            or not isinstance(os.fspath(address), str)
            or not os.fspath(address)
        ):
            raise ValueError(
                "MachineConfig.monitor_address must be a unix socket path (str or "
                f"os.PathLike[str]) or a (host, port) tuple, not {address!r}"
            )
        if not self.qmp and address is not None:
            raise ValueError(
                f"monitor_address={address!r} needs qmp=True (qmp=False means no monitor)"
            )

    def replace(self, **fields: Any) -> Self:
        """A copy with ``fields`` changed (validated again like a new config).

        Raises TypeError naming any unknown field and listing the valid ones, rather than
        ``dataclasses.replace``'s bare ``__init__`` error.
        """
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise TypeError(
                f"MachineConfig has no field(s) {', '.join(map(repr, unknown))}; "
                f"valid fields: {', '.join(valid)}"
            )
        return dataclasses.replace(self, **fields)

    def resolved_binary(self) -> str:
        """The QEMU executable to run: ``binary``, else ``$QEMU``, else the default name.

        A bare name is left for the process spawner to find on PATH.
        """
        if self.binary:
            return self.binary
        return os.environ.get("QEMU") or DEFAULT_BINARY

    def pass_fds(self) -> tuple[int, ...]:
        """The fds of :attr:`fds` and :attr:`inherit_fds`, to add to the channel fds in
        ``pass_fds`` at launch."""
        return (*(spec.fd for spec in self.fds), *self.inherit_fds)

    def argv(
        self,
        fds: ChannelFds | None = None,
        *,
        accel: str | _Unset | None = _UNSET,
    ) -> list[str]:
        """The full command line, wrapper first and :attr:`args` last.

        ``fds`` are the inherited fd numbers of the socketpair channels; None shows the
        ``PLACEHOLDER_FDS`` (monitor 3, console 4, shell 5, agent 6, relay 7). ``accel``
        replaces :attr:`accel` (a machine resolves it once and passes the result); when not
        given, :attr:`accel` goes through :func:`resolve_accel`, which may probe KVM once.

        Raises ValueError if a channel the config uses has no fd in ``fds``.
        """
        channels = PLACEHOLDER_FDS if fds is None else fds
        chosen_accel = resolve_accel(self.accel if accel is _UNSET else accel)

        argv = [*self.wrapper, self.resolved_binary(), "-display", "none"]
        argv += ["-vga", "std" if self.display else "none"]

        if self.qmp:
            address = self.monitor_address
            if address is None:
                backend = f"fd={_need(channels.monitor, 'monitor')}"
            elif isinstance(address, tuple):
                host, port = address
                backend = f"host={_escape(host)},port={port}"
            else:
                backend = f"path={_escape(os.fspath(address))}"
            argv += ["-chardev", f"socket,id=mon,{backend}", "-mon", "chardev=mon,mode=control"]

        if self.machine is not None:
            argv += ["-machine", self.machine]
        if chosen_accel is not None:
            argv += ["-accel", chosen_accel]
        if self.memory is not None:
            argv += ["-m", str(self.memory)]
        if self.smp is not None:
            argv += ["-smp", str(self.smp)]
        # -kernel/-initrd/-append reach QEMU verbatim (not QemuOpts): no comma escaping.
        if self.kernel is not None:
            argv += ["-kernel", os.fspath(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", os.fspath(self.initrd)]
        if self.append is not None:
            argv += ["-append", self.append]

        if self.console:
            argv += ["-chardev", f"socket,id=console,fd={_need(channels.console, 'console')}"]
            if self.console_device is not None:
                argv += ["-device", f"{self.console_device},chardev=console"]
            else:
                argv += ["-serial", "null"] * self.console_index
                argv += ["-serial", "chardev:console"]

        if self.shell or self.agent or self.relay:
            argv += ["-device", f"virtio-serial-pci,id={_VSER_ID}"]
        for enabled, channel, fd, port_name, port_id in (
            (self.shell, "shell", channels.shell, SHELL_PORT_NAME, SHELL_PORT_ID),
            (self.agent, "agent", channels.agent, AGENT_PORT_NAME, None),
            (self.relay, "relay", channels.relay, RELAY_PORT_NAME, RELAY_PORT_ID),
        ):
            if enabled:
                argv += [
                    "-chardev",
                    f"socket,id={channel},fd={_need(fd, channel)}",
                    "-device",
                    f"virtserialport,bus={_VSER_ID}.0,chardev={channel},name={port_name}"
                    + (f",id={port_id}" if port_id else ""),
                ]

        for spec in self.fds:
            argv += ["-add-fd", spec.option()]
        argv += drives_argv(self.drives, self.machine)
        argv += self.args
        return argv


def check_paths(config: MachineConfig, *, name: str | None = None) -> None:
    """Check, before QEMU is started, the paths a launch writes to; raise :class:`LaunchError`
    naming the field and the cause.

    - ``log_dir`` must be an existing directory we may create files in;
    - ``console_log`` must open for appending: a regular file is opened here (and created if
      missing, as the console would a moment later), then closed again; a FIFO or device is
      only checked for write permission (opening it would disturb its reader).

    ``name`` is the machine's name, for the error message. Only the file system is touched;
    the config itself was validated when it was made.
    """
    if config.log_dir is not None:
        path = os.fspath(config.log_dir)
        try:
            info = os.stat(path)
        except OSError as exc:
            what = "does not exist" if isinstance(exc, FileNotFoundError) else "is unusable"
            raise LaunchError(f"log_dir {path!r} {what}: {exc}", name=name) from exc
        if not stat.S_ISDIR(info.st_mode):
            raise LaunchError(f"log_dir {path!r} is not a directory", name=name)
        if not os.access(path, os.W_OK | os.X_OK):
            raise LaunchError(
                f"log_dir {path!r} is not writable: QEMU's output log cannot be created there",
                name=name,
            )
    if config.console_log is not None:
        path = os.fspath(config.console_log)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise LaunchError(f"cannot open console_log {path!r}: {exc}", name=name) from exc
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # A FIFO or a device: opening and closing it here would disturb its reader.
            if not os.access(path, os.W_OK):
                raise LaunchError(f"cannot open console_log {path!r}: not writable", name=name)
            return
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666))
        except OSError as exc:
            raise LaunchError(f"cannot open console_log {path!r}: {exc}", name=name) from exc


def _is_int(value: object) -> bool:
    """True for a real int (``bool`` is an int subclass but never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _escape(value: str) -> str:
    """Quote ``value`` for a QEMU ``key=value,...`` option string: commas are doubled."""
    return value.replace(",", ",,")


def _need(fd: int | None, channel: str) -> int:
    """The fd for ``channel``, or a ValueError saying the ChannelFds lacks it."""
    if fd is None:
        raise ValueError(f"the config uses the {channel} channel but ChannelFds.{channel} is None")
    return fd


_FLAGS_LINE = re.compile(r"^flags\s*:(.*)$", re.MULTILINE)


def _probe_kvm(device: str, cpuinfo: str) -> bool:
    """Whether KVM can really run a guest, judged from these two paths only.

    ``device`` must open read-write, and some ``flags`` line of ``cpuinfo`` must show
    ``vmx`` (Intel) or ``svm`` (AMD). The second check matters: a nested "PVM" KVM opens
    and answers ``query-kvm`` yet cannot boot a stock Linux kernel, and it shows neither flag.
    """
    try:
        handle = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(handle)
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError:
        return False
    return any({"vmx", "svm"} & set(flags.split()) for flags in _FLAGS_LINE.findall(text))


_probe_kvm_cached = functools.cache(_probe_kvm)


def kvm_usable() -> bool:
    """Whether ``accel="auto"`` may choose KVM here (see ``_probe_kvm``).

    Probed once per (``KVM_DEVICE``, ``CPUINFO``) pair and cached.
    """
    return _probe_kvm_cached(KVM_DEVICE, CPUINFO)


def resolve_accel(accel: str | None) -> str | None:
    """The ``-accel`` value for ``accel``: only ``"auto"`` changes.

    ``"auto"`` becomes ``$TRIO_QEMU_ACCEL`` when that is set and non-empty (a user's
    override, e.g. ``kvm`` on a host the probe misjudges), else ``"kvm"`` if
    :func:`kvm_usable`, else ``"tcg"``. None (no ``-accel``) and other values pass through.
    """
    if accel != "auto":
        return accel
    override = os.environ.get(ACCEL_ENV, "").strip()
    if override and override != "auto":
        return override
    return "kvm" if kvm_usable() else "tcg"
