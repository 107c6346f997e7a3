"""What a template is: its files, what a clone must match, and the clone's command line.

Pure except for :meth:`Template.verify` and :func:`load_template`, which read the template's
files. Nothing here starts QEMU: :mod:`._make` makes templates, :mod:`._clone` restores them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .._config import MachineConfig, resolve_accel
from .._errors import TemplateError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MEMORY_BACKEND_ID",
    "PER_MACHINE_FIELDS",
    "RAM_FILE",
    "STATE_FILE",
    "UNBOUND_FD",
    "Template",
    "TemplateError",
    "backed_config",
    "base_config",
    "check_template_config",
    "clone_ram_path",
    "digest",
    "file_stamp",
    "load_template",
    "memory_bytes",
    "normalize_arg",
    "normalized_argv",
    "qemu_release",
    "resolve_binary",
    "signature",
    "state_record",
    "unbind_fds",
    "unbound_fds",
]

FORMAT_VERSION: Final = 1
"""Bumped whenever the layout of a template changes; part of every cache key."""

RAM_FILE: Final = "ram"
"""The guest's RAM, in the template directory (QEMU's ``memory-backend-file``)."""
STATE_FILE: Final = "state"
"""The saved device state (a migration stream without the RAM), in the template directory."""
MANIFEST_FILE: Final = "manifest.json"
"""What the template was made from and what its files must look like."""

MEMORY_BACKEND_ID: Final = "mem0"
"""The id of the file-backed RAM object; template and clones name their RAM block alike."""

PER_MACHINE_FIELDS: Final = frozenset(
    {
        "name",
        "wrapper",
        "console_log",
        "console_buffer",
        "monitor_address",
        "base_temp_dir",
        "log_dir",
        "launch_timeout",
        "qmp_timeout",
        "shutdown_timeout",
        "event_buffer",
        "event_cache",
        "inherit_fds",
    }
)
"""The :class:`~trio_qemu.MachineConfig` fields a clone may set freely: they concern the host
side of one machine, not the guest. Every other field must keep the template's value (fd
numbers inside ``args`` and ``fds`` may differ: each machine has its own)."""

UNBOUND_FD: Final = "unbound"
"""What :meth:`Template.config` writes in place of an fd number the clone does not inherit
(the template's machine had it): QEMU refuses it at launch ("Invalid file descriptor
number"), never mistaking it for one of the clone's own fds."""

#: Option keys whose values are file descriptor numbers, in QEMU's ``key=value,...`` syntax
#: (or UNBOUND_FD in a clone's config).
_FD_OPTION = re.compile(
    r"(?:(?<=,)|^)(fd|fds|vhostfd|vhostfds|sock_fd|local\.str|remote\.str)="
    rf"(\d+(?::\d+)*|{UNBOUND_FD})(?=,|$)"
)
_MEMORY = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*$")
_UNITS: Final = {"": 20, "k": 10, "m": 20, "g": 30, "t": 40}
_VERSION = re.compile(r"version (\d+)\.(\d+)")


def memory_bytes(memory: int | str | None) -> int:
    """The guest RAM size in bytes of a ``MachineConfig.memory`` value (an int is MiB; a str
    is a size with an optional K/M/G/T suffix, MiB without).

    Raises:
        ValueError: None, or a value that is not a plain size (``-m size=...,slots=...``).
    """
    if memory is None:
        raise ValueError(
            "a template needs the memory size: give the config memory= (e.g. memory=256)"
        )
    if isinstance(memory, int) and not isinstance(memory, bool):
        return memory << 20
    match = _MEMORY.match(str(memory))
    if match is None:
        raise ValueError(f"a template needs a plain memory size, not memory={memory!r}")
    return int(match.group(1)) << _UNITS[match.group(2).lower()]


def qemu_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` from QEMU's ``--version`` line, or ``(0, 0)`` if it has none."""
    match = _VERSION.search(version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_template_config(config: MachineConfig) -> None:
    """Refuse, with ValueError, a config a template cannot be made of (before QEMU starts).

    It needs a machine type and a memory size (the RAM goes into a file-backed memory
    object the machine type is told to use), QMP (the state is saved through it), and no
    ``-incoming`` or memory backend of its own.
    """
    memory_bytes(config.memory)
    if not config.machine:
        raise ValueError('a template needs a machine type: give the config machine= ("q35")')
    if "memory-backend=" in config.machine:
        raise ValueError(
            f"machine={config.machine!r} already names a memory backend: a template "
            "provides its own (its RAM file)"
        )
    if not config.qmp:
        raise ValueError("a template needs QMP: qmp=False cannot save or restore a guest")
    for arg in config.args:
        if arg in ("-incoming", "--incoming", "-loadvm", "--loadvm"):
            raise ValueError(f"a template's config cannot have {arg} in args")


def _abspath(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))


def resolve_binary(config: MachineConfig) -> str:
    """The real path of the QEMU executable ``config`` runs.

    Raises:
        TemplateError: there is no such executable.
    """
    name = config.resolved_binary()
    found = shutil.which(name)
    if found is None:
        raise TemplateError(f"QEMU executable {name!r} not found (set binary= or $QEMU)")
    return os.path.realpath(found)


def normalize_arg(arg: str) -> str:
    """``arg`` with the fd numbers in its ``fd=``-like options replaced by ``N``."""
    return _FD_OPTION.sub(r"\1=N", arg)


def normalized_argv(config: MachineConfig) -> list[str]:
    """The part of ``config``'s command line a clone must match: no binary, no wrapper, the
    monitor on its placeholder fd, paths absolute, fd numbers and the memory size canonical."""
    canonical = config.replace(
        binary="qemu",
        wrapper=(),
        monitor_address=None,
        kernel=_abspath(config.kernel),
        initrd=_abspath(config.initrd),
        memory=f"{memory_bytes(config.memory)}B" if config.memory is not None else None,
    )
    return [normalize_arg(arg) for arg in canonical.argv()[1:]]


def file_stamp(path: str | os.PathLike[str]) -> list[Any]:
    """``[path, size, mtime_ns]`` of a file (``[path, None, None]`` when it is missing)."""
    text = os.path.abspath(os.fspath(path))
    try:
        info = os.stat(text)
    except OSError:
        return [text, None, None]
    return [text, info.st_size, info.st_mtime_ns]


def signature(
    config: MachineConfig, *, binary: str, version: str, key: str | None
) -> dict[str, Any]:
    """Everything a clone must match, as a JSON-able dict; its hash is the cache key.

    The QEMU executable (real path) and its ``--version`` line, the normalized command line
    (:func:`normalized_argv`), the kernel's and initrd's size and modification time (so a
    rebuilt guest makes a new template), and the caller's ``key``.
    """
    return {
        "format": FORMAT_VERSION,
        "binary": binary,
        "version": version,
        "argv": normalized_argv(config),
        "files": [file_stamp(p) for p in (config.kernel, config.initrd) if p is not None],
        "key": key,
    }


def digest(sig: Mapping[str, Any]) -> str:
    """The cache key of a :func:`signature`: 20 hex digits of its SHA-256."""
    text = json.dumps(sig, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def base_config(config: MachineConfig) -> MachineConfig:
    """``config`` without what belonged to the machine that made the template: its name,
    console log and fds (a clone brings its own)."""
    return config.replace(name=None, console_log=None, inherit_fds=(), fds=())


def _escape(value: str) -> str:
    return value.replace(",", ",,")


_CLONE_BACKEND = re.compile(
    rf"memory-backend-file,id={MEMORY_BACKEND_ID},size=\d+,mem-path=((?:[^,]|,,)*),share=off\Z"
)


def clone_ram_path(config: MachineConfig) -> str | None:
    """The template RAM file that ``config`` maps privately if it is a clone's config (made
    by :meth:`Template.config`: that backend and ``-incoming defer``), else None."""
    args = list(config.args)
    if args[-2:] != ["-incoming", "defer"]:
        return None
    for option, value in itertools.pairwise(args):
        if option in ("-object", "--object"):
            match = _CLONE_BACKEND.match(value)
            if match is not None:
                return match.group(1).replace(",,", ",")
    return None


def unbound_fds(config: MachineConfig) -> list[str]:
    """The ``fd=``-like options in ``config.args`` whose fd numbers QEMU would not inherit
    (they are not in ``inherit_fds`` or ``fds``): the fds of the machine that made a
    template, still in its clone's command line until something gives it fds of its own
    (``trio_qemu.network``'s ``attach`` does for a NIC)."""
    passed = {*config.inherit_fds, *(spec.fd for spec in config.fds)}
    unbound = []
    for arg in config.args:
        for match in _FD_OPTION.finditer(arg):
            if not _bound(match.group(2), passed):
                unbound.append(f"{match.group(0)} in {arg!r}")
    return unbound


def _bound(value: str, passed: set[int]) -> bool:
    return value != UNBOUND_FD and all(int(n) in passed for n in value.split(":"))


def unbind_fds(config: MachineConfig) -> MachineConfig:
    """``config`` with :data:`UNBOUND_FD` for every fd number in its ``args`` that it does
    not pass to QEMU (see :func:`unbound_fds`)."""
    passed = {*config.inherit_fds, *(spec.fd for spec in config.fds)}

    def unbind(match: re.Match[str]) -> str:
        if _bound(match.group(2), passed):
            return match.group(0)
        return f"{match.group(1)}={UNBOUND_FD}"

    return config.replace(args=[_FD_OPTION.sub(unbind, arg) for arg in config.args])


def backed_config(
    config: MachineConfig, ram: str | os.PathLike[str], size: int, *, share: bool
) -> MachineConfig:
    """``config`` with its RAM in ``ram``: the machine uses a ``memory-backend-file`` (shared
    for the template, a private copy-on-write mapping for a clone, which also gets
    ``-incoming defer``)."""
    backend = (
        f"memory-backend-file,id={MEMORY_BACKEND_ID},size={size},"
        f"mem-path={_escape(os.fspath(ram))},share={'on' if share else 'off'}"
    )
    args = [*config.args, "-object", backend]
    if not share:
        args += ["-incoming", "defer"]
    return config.replace(machine=f"{config.machine},memory-backend={MEMORY_BACKEND_ID}", args=args)


def _field_value(config: MachineConfig, field: str) -> Any:
    """A field as compared between a template and a clone."""
    value = getattr(config, field)
    if field == "args":
        return tuple(normalize_arg(a) for a in value)
    if field in ("kernel", "initrd"):
        return _abspath(value)
    if field == "memory":
        return memory_bytes(value) if value is not None else None
    if field == "accel":
        return resolve_accel(value)
    if field == "binary":
        try:
            return resolve_binary(config)
        except TemplateError:
            return config.resolved_binary()
    return value


@dataclass(frozen=True)
class Template:
    """A booted guest saved once, to be restored as many copy-on-write clones.

    Get one from :func:`ensure_template` (cached) or :func:`open_template` (temporary). Its
    directory holds the guest's RAM (``ram``, read-only once saved), the device state
    (``state``, a few hundred KB) and ``manifest.json``. A clone maps the RAM file
    privately, so the clones share the template's pages until they write to them.
    """

    path: Path
    """The template's directory."""
    key: str
    """Its cache key: a hash of everything a clone must match (see :func:`ensure_template`)."""
    base: MachineConfig
    """The config the template was made from, without its name, console log and fds:
    :meth:`config` starts from it."""
    ram_size: int
    """The guest RAM size in bytes (the size of the RAM file)."""
    qemu_version: str
    """The ``--version`` line of the QEMU that made it; clones need the same."""
    cached: bool = True
    """Whether it lives in the cache (:func:`ensure_template`) rather than for one block."""
    manifest: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    """The parsed ``manifest.json``."""

    @property
    def ram_path(self) -> Path:
        """The RAM file."""
        return self.path / RAM_FILE

    @property
    def state_path(self) -> Path:
        """The device state file."""
        return self.path / STATE_FILE

    @property
    def made_in(self) -> float | None:
        """Seconds it took to make (boot, prepare, save), from the manifest."""
        value = self.manifest.get("made_in")
        return float(value) if isinstance(value, int | float) else None

    def config(self, **fields: Any) -> MachineConfig:
        """The config of a clone: launch it (``open_machine``, ``start_machine``, ...), then
        :func:`restore` it; :func:`open_clone` does both.

        It is :attr:`base` with ``fields`` changed, its RAM a private copy-on-write mapping
        of the template's RAM file, and ``-incoming defer``. An fd number in ``args`` that
        the clone does not inherit (the template's machine had it, e.g. for a NIC on a
        network) becomes ``unbound``, which QEMU refuses at launch: a clone of a template
        with a NIC joins its network through ``network.attach(template.config(...))``,
        which gives the NIC its socket.

        Args:
            **fields: :class:`~trio_qemu.MachineConfig` fields. Those in
                :data:`PER_MACHINE_FIELDS` (name, console_log, log_dir, timeouts, ...)
                may take any value; others must keep the template's (``args`` and ``fds``
                may differ in fd numbers only).

        Returns:
            The clone's config.

        Raises:
            TemplateError: a field differs from the template's (machine type, memory,
                kernel, initrd, append, devices, args...): the message names each one.
            TypeError: an unknown field.
        """
        clone = self.base.replace(**fields)
        differences = [
            f"{name}={getattr(clone, name)!r} (the template has {getattr(self.base, name)!r})"
            for name in sorted(fields)
            if name not in PER_MACHINE_FIELDS
            and name != "fds"  # the maker's fds are not kept: the command line tells
            and _field_value(clone, name) != _field_value(self.base, name)
        ]
        if not differences:
            expected = self.manifest.get("signature", {}).get("argv")
            got = normalized_argv(clone)
            if expected is not None and got != expected:
                differences.append(
                    "the command line: "
                    + " ".join(_differing(got, expected))
                    + " (compare with the template's)"
                )
        if differences:
            raise TemplateError(
                f"the clone's config does not match template {self.key}: " + "; ".join(differences)
            )
        # The maker's fd numbers mean nothing here: never let QEMU take one of the clone's
        # own fds for them (trio_qemu.network's attach gives a NIC its socket).
        return backed_config(unbind_fds(clone), self.ram_path, self.ram_size, share=False)

    def verify(self) -> None:
        """Check, cheaply (``stat`` only), that the template's files are as they were made
        and that the kernel, the initrd and the QEMU executable did not change since.

        Raises:
            TemplateError: naming what is missing or changed.
        """
        problems = _stamp_problems(self.path, self.manifest)
        if problems:
            raise TemplateError(
                f"template {self.key} in {self.path} is damaged: {'; '.join(problems)}"
            )


def _differing(got: Sequence[str], expected: Sequence[str]) -> list[str]:
    """The clone's arguments that the template's command line lacks (or all, shortened)."""
    missing = [arg for arg in got if arg not in expected]
    extra = [f"-{arg}" for arg in expected if arg not in got]
    shown = [*(f"+{a}" for a in missing), *extra]
    return shown or ["(the same arguments in another order)"]


def _stamp_problems(path: Path, manifest: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, expected in ((RAM_FILE, manifest.get("ram")), (STATE_FILE, manifest.get("state"))):
        stamp = file_stamp(path / name)
        if not isinstance(expected, dict):
            problems.append(f"the manifest lacks {name}")
        elif stamp[1] is None:
            problems.append(f"{name} is missing")
        elif [stamp[1], stamp[2]] != [expected.get("size"), expected.get("mtime_ns")]:
            problems.append(
                f"{name} changed (size {stamp[1]}, was {expected.get('size')}; or modified)"
            )
    for recorded in manifest.get("signature", {}).get("files", []):
        if file_stamp(recorded[0]) != recorded:
            problems.append(f"{recorded[0]} changed or is missing since the template was made")
    qemu = manifest.get("qemu")
    if isinstance(qemu, list) and file_stamp(qemu[0]) != qemu:
        problems.append(f"QEMU ({qemu[0]}) changed since the template was made")
    return problems


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def state_record(path: Path) -> dict[str, Any]:
    """``size``, ``mtime_ns`` and ``sha256`` of a state file, for the manifest."""
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": _sha256(path)}


def load_template(
    path: Path, config: MachineConfig, sig: Mapping[str, Any], *, cached: bool = True
) -> tuple[Template | None, str]:
    """``(template, "")`` for the template in ``path`` if it is complete and was made for
    ``sig``, else ``(None, why)``, ``why`` being empty when ``path`` does not exist.

    Checks the manifest (format, signature), the RAM file's size and stamp, and the state
    file's size, stamp and SHA-256 (it is small).
    """
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return None, "" if not path.exists() else "its manifest is missing"
    except (OSError, ValueError) as exc:
        return None, f"its manifest is unreadable ({exc})"
    if not isinstance(manifest, dict):
        return None, "its manifest is not an object"
    if manifest.get("format") != FORMAT_VERSION or manifest.get("signature") != sig:
        return None, "its manifest was made for another config, QEMU or format"
    problems = _stamp_problems(path, manifest)
    if problems:
        return None, "; ".join(problems)
    size = memory_bytes(config.memory)
    if manifest["ram"].get("size") != size:
        return None, f"the RAM file has {manifest['ram'].get('size')} bytes, not {size}"
    try:
        if _sha256(path / STATE_FILE) != manifest["state"].get("sha256"):
            return None, "the state file's content changed"
    except OSError as exc:
        return None, f"the state file is unreadable ({exc})"
    template = Template(
        path=path,
        key=str(manifest.get("key")),
        base=base_config(config),
        ram_size=size,
        qemu_version=str(sig.get("version")),
        cached=cached,
        manifest=manifest,
    )
    return template, ""
