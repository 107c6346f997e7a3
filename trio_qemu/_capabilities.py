"""What a QEMU binary can do: its machine types, devices, accelerators and netdev backends.

QEMU is asked on its command line: ``-version``, ``-machine help``, ``-device help``,
``-accel help`` and ``-netdev help`` each print a list and exit (20-50 ms each; no QMP, no
guest). One pure function per output reads it (:func:`parse_version`,
:func:`parse_machines`, :func:`parse_devices`, :func:`parse_accelerators`,
:func:`parse_netdevs`); two runners feed them:

- :func:`qemu_capabilities` (async) runs the five commands at once with
  ``trio.run_process``;
- :func:`capabilities_blocking` (synchronous, for the pytest plugin's skip helpers and
  markers) runs them one after the other with ``subprocess.run``.

Either keeps the answer for the rest of the process, per binary, and both share it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from ._config import MachineConfig, kvm_usable
from ._errors import LaunchError
from ._util import ToolResult

__all__ = [
    "KINDS",
    "QemuCapabilities",
    "capabilities_blocking",
    "parse_accelerators",
    "parse_devices",
    "parse_machines",
    "parse_netdevs",
    "parse_version",
    "qemu_capabilities",
]

KINDS: Final = ("accel", "device", "machine", "netdev")
"""The kinds of capability :meth:`QemuCapabilities.missing` knows."""


@dataclass(frozen=True)
class QemuCapabilities:
    """What one QEMU binary offers, as its ``help`` options list it."""

    binary: str
    """The binary asked (its path when found on PATH)."""
    version: str
    """Its version, ``"7.2.22"`` (``-version``)."""
    machines: frozenset[str]
    """Machine type names and their aliases (``-machine help``): ``"q35"``,
    ``"pc-q35-7.2"``, ``"none"``..."""
    devices: frozenset[str]
    """Device types ``-device`` accepts, and their aliases (``-device help``: ``"e1000"``,
    ``"virtio-net-pci"`` and its alias ``"virtio-net"``...). Device types that exist but
    that ``-device`` refuses (not user-creatable, such as ``"hpet"`` or ``"PIIX3"``, which a
    machine type adds itself: 56 of them on QEMU 7.2 for x86-64) are not listed, unlike in
    QMP's ``qom-list-types``."""
    accelerators: frozenset[str]
    """Accelerators built in (``"tcg"``, ``"kvm"``...: ``-accel help``), whether or not this
    host can use them: see :meth:`accel_usable`. QEMU leaves ``"qtest"`` out of that list."""
    netdevs: frozenset[str]
    """``-netdev`` backend types built in (``"user"``, ``"tap"``, ``"stream"``...)."""

    def accel_usable(self, name: str) -> bool:
        """Whether accelerator ``name`` is built in and, for ``"kvm"``, works on this host
        (:func:`~trio_qemu.kvm_usable`)."""
        return name in self.accelerators and (name != "kvm" or kvm_usable())

    def missing(self, kind: str, name: str) -> str | None:
        """Why this QEMU cannot give ``name`` of ``kind`` (``"accel"``, ``"device"``,
        ``"machine"`` or ``"netdev"``), or None when it can. The reason is a sentence
        fit for a skip message.

        Raises:
            ValueError: ``kind`` is not one of those.
        """
        qemu = f"QEMU {self.binary} ({self.version})"
        if kind == "accel":
            if name not in self.accelerators:
                have = ", ".join(sorted(self.accelerators)) or "none"
                return f"{qemu} has no {name!r} accelerator (it has: {have})"
            if not self.accel_usable(name):
                return (
                    "KVM is not usable on this host (trio_qemu.kvm_usable() is False: "
                    "/dev/kvm must open read-write and the CPU show vmx or svm)"
                )
            return None
        known = {"device": self.devices, "machine": self.machines, "netdev": self.netdevs}
        if kind not in known:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if name in known[kind]:
            return None
        what = {"device": "device type", "machine": "machine type", "netdev": "netdev backend"}
        return f"{qemu} has no {what[kind]} {name!r}"


# --- reading QEMU's answers (pure) ----------------------------------------------------------

_VERSION: Final = re.compile(r"^QEMU emulator version (\d+\.\d+\.\d+)", re.MULTILINE)
_DEVICE: Final = re.compile(r'^name "([^"]+)"(?:, bus [^,]+)?(?:, alias "([^"]+)")?')


def parse_version(text: str) -> str:
    """The version in the output of ``qemu-system-* -version``: ``"7.2.22"`` from
    ``QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``.

    Raises:
        ValueError: ``text`` has no such line.
    """
    found = _VERSION.search(text)
    if found is None:
        raise ValueError("no 'QEMU emulator version X.Y.Z' line")
    return found.group(1)


def _list_after(header: str, text: str) -> list[str]:
    """The first word of each non-empty line after the line ``header``."""
    lines = text.splitlines()
    try:
        start = [line.strip() for line in lines].index(header) + 1
    except ValueError:
        raise ValueError(f"no {header!r} line") from None
    return [line.split()[0] for line in lines[start:] if line.strip()]


def parse_machines(text: str) -> frozenset[str]:
    """The machine types and aliases in the output of ``-machine help``.

    After ``Supported machines are:`` each line starts with a name; an alias has a line of
    its own (``q35   Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)``) besides its
    machine's.

    Raises:
        ValueError: the header is missing.
    """
    return frozenset(_list_after("Supported machines are:", text))


def parse_devices(text: str) -> frozenset[str]:
    """The device types and their aliases in the output of ``-device help``.

    Each device is a line ``name "ich9-ahci", bus PCI, alias "ahci"`` (bus, alias and
    ``desc "..."`` are optional) under a category header; the list holds only the devices
    ``-device`` can create.

    Raises:
        ValueError: no device line at all.
    """
    names: set[str] = set()
    for line in text.splitlines():
        found = _DEVICE.match(line)
        if found is not None:
            names.update(name for name in found.groups() if name)
    if not names:
        raise ValueError("no 'name \"...\"' device line")
    return frozenset(names)


def parse_accelerators(text: str) -> frozenset[str]:
    """The accelerators in the output of ``-accel help`` (``tcg``, ``kvm``...).

    QEMU lists every accelerator built into the binary, except ``qtest``, whether or not
    this host can use it.

    Raises:
        ValueError: the header ``Accelerators supported in QEMU binary:`` is missing.
    """
    return frozenset(_list_after("Accelerators supported in QEMU binary:", text))


def parse_netdevs(text: str) -> frozenset[str]:
    """The ``-netdev`` backend types in the output of ``-netdev help`` (``user``, ``tap``...).

    Raises:
        ValueError: the header ``Available netdev backend types:`` is missing.
    """
    return frozenset(_list_after("Available netdev backend types:", text))


#: The commands asked, in the order a failure is reported. ``-netdev help`` is answered only
#: once a machine is created: ``-machine none`` spares a default machine (some binaries have
#: none) and ``-display none`` the display modules.
_QUESTIONS: Final = (
    ("-version",),
    ("-machine", "help"),
    ("-device", "help"),
    ("-accel", "help"),
    ("-machine", "none", "-nodefaults", "-display", "none", "-netdev", "help"),
)

_T = TypeVar("_T")


def _parse(parse: Callable[[str], _T], answer: ToolResult) -> _T:
    """``answer`` read by ``parse``, or a :class:`LaunchError` naming the command and
    QEMU's output."""
    output = answer.output
    command = " ".join(answer.argv)
    if answer.returncode != 0:
        raise LaunchError(
            f"`{command}` failed",
            argv=answer.argv,
            returncode=answer.returncode,
            output=output,
        )
    try:
        return parse(answer.stdout.decode("utf-8", "replace"))
    except ValueError as exc:
        raise LaunchError(
            f"`{command}` printed {exc} (not a QEMU system emulator?)",
            argv=answer.argv,
            returncode=answer.returncode,
            output=output,
        ) from None


def _capabilities(binary: str, answers: Sequence[ToolResult]) -> QemuCapabilities:
    """The answers to :data:`_QUESTIONS`, in order, read (the first failure raised)."""
    version, machines, devices, accels, netdevs = answers
    return QemuCapabilities(
        binary=binary,
        version=_parse(parse_version, version),
        machines=_parse(parse_machines, machines),
        devices=_parse(parse_devices, devices),
        accelerators=_parse(parse_accelerators, accels),
        netdevs=_parse(parse_netdevs, netdevs),
    )


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _cannot_run(argv: Sequence[str], exc: OSError) -> LaunchError:
    return LaunchError(f"cannot run {argv[0]}: {exc.strerror or exc}", argv=argv)


def _timed_out(argv: Sequence[str], timeout: float) -> LaunchError:
    return LaunchError(
        f"`{' '.join(argv)}` did not finish within {timeout} s; it was killed",
        argv=argv,
    )


# --- asking QEMU: the cache and the two runners ---------------------------------------------


class _Cache:
    """The answers so far, per binary, for this process; one probe at a time per Trio run."""

    def __init__(self) -> None:
        self.answers: dict[str, QemuCapabilities] = {}
        self._lock: trio.Lock | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def lock(self) -> trio.Lock:
        # A trio.Lock belongs to one trio.run.
        token = trio.lowlevel.current_trio_token()
        if self._lock is None or self._token is not token:
            self._lock, self._token = trio.Lock(), token
        return self._lock


_CACHE = _Cache()


def _key(binary: str | None) -> str:
    name = MachineConfig(binary=binary).resolved_binary()
    return shutil.which(name) or name


async def qemu_capabilities(
    binary: str | None = None, *, timeout: float = 30.0
) -> QemuCapabilities:
    """What QEMU ``binary`` offers; asked once per binary and process, then cached.

    ``binary`` is as :attr:`MachineConfig.binary <trio_qemu.MachineConfig.binary>` (None:
    ``$QEMU``, else ``qemu-system-x86_64``). The first call runs ``binary -version``,
    ``-machine help``, ``-device help``, ``-accel help`` and ``-netdev help``, all at once
    (0.1-0.15 s in all), within ``timeout`` seconds for the lot; at the timeout, or when
    the call is cancelled, those still running are killed (SIGKILL) and reaped before it
    returns. A failure is not cached: the next call asks again.

    Raises:
        LaunchError: the binary cannot be run (not found, not executable), one of the
            commands failed or printed something else than QEMU would (not a QEMU system
            emulator), or they did not finish within ``timeout``. The error carries the
            command line and QEMU's output.
        ValueError: ``timeout`` is not a positive number of seconds (``math.inf``: no limit).
    """
    _check_timeout(timeout)
    key = _key(binary)
    async with _CACHE.lock():
        known = _CACHE.answers.get(key)
        if known is None:
            known = _CACHE.answers.setdefault(key, await _probe(key, timeout))
        return known


async def _kill(process: trio.Process) -> None:
    """``deliver_cancel`` for the help commands: nothing to wait for, SIGKILL at once."""
    process.kill()


async def _probe(binary: str, timeout: float) -> QemuCapabilities:
    argvs = [(binary, *args) for args in _QUESTIONS]
    answers: dict[int, ToolResult | OSError] = {}

    async def ask(index: int) -> None:
        argv = argvs[index]
        try:
            done = await trio.run_process(
                argv,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we kill it
                deliver_cancel=_kill,
            )
        except OSError as exc:  # kept, not raised: one error, the first in order, below
            answers[index] = exc
        else:
            answers[index] = ToolResult(argv, done.returncode, done.stdout, done.stderr)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for index in range(len(argvs)):
                nursery.start_soon(ask, index)
    results = []
    for index, argv in enumerate(argvs):
        answer = answers.get(index)
        if answer is None:
            raise _timed_out(argv, timeout)
        if isinstance(answer, OSError):
            raise _cannot_run(argv, answer) from answer
        results.append(answer)
    return _capabilities(binary, results)


def capabilities_blocking(binary: str | None = None, *, timeout: float = 30.0) -> QemuCapabilities:
    """:func:`qemu_capabilities` for synchronous code: the cached answer, else a probe.

    The probe runs the same commands one after the other with ``subprocess.run`` (the one
    running is killed at the timeout or on Ctrl-C), blocking the calling thread for
    0.15-0.3 s. Called from a running Trio loop (a synchronous helper in an ``async def``
    test) it blocks that loop too, once per binary and process: the price the pytest skip helpers
    pay for needing neither a second loop nor a thread. ``timeout`` bounds the whole probe,
    and failures raise the same errors, as for :func:`qemu_capabilities`.
    """
    _check_timeout(timeout)
    key = _key(binary)
    known = _CACHE.answers.get(key)
    if known is None:
        known = _CACHE.answers.setdefault(key, _probe_blocking(key, timeout))
    return known


def _probe_blocking(binary: str, timeout: float) -> QemuCapabilities:
    deadline = time.monotonic() + timeout
    results = []
    for args in _QUESTIONS:
        argv = (binary, *args)
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; run() kills it
                timeout=None if math.isinf(timeout) else max(deadline - time.monotonic(), 0.0),
            )
        except subprocess.TimeoutExpired:
            raise _timed_out(argv, timeout) from None
        except OSError as exc:
            raise _cannot_run(argv, exc) from exc
        results.append(ToolResult(argv, done.returncode, done.stdout, done.stderr))
    return _capabilities(binary, results)
