"""Disks on a machine's command line: :class:`Drive`, a frozen and validated value.

A drive is a block node graph (one ``-blockdev`` option, in QEMU's JSON syntax so that no
file name needs escaping) and a front end (one ``-device``): ``virtio`` (virtio-blk-pci, the
guest's ``/dev/vdX``), ``scsi-hd`` and ``scsi-cd`` (on a virtio-scsi controller added once,
id ``trio-scsi``), ``ide-hd`` and ``ide-cd`` (the machine's IDE or AHCI buses), ``floppy``
(on q35 an ``isa-fdc`` controller, id ``trio-fdc``, is added; the pc machine has one), or
``none`` (the node alone, for jobs and ``-machine none``)::

    MachineConfig(
        machine="q35",
        drives=[
            Drive("disk.qcow2", "qcow2"),                        # id drive0, /dev/vda
            Drive("iso.raw", "raw", interface="ide-cd", id="cd0", read_only=True),
            Drive(interface="scsi-cd", id="cd1"),                # empty: no medium yet
            Drive(None, "null-co", interface="none", node_name="null0",
                  options={"size": 1 << 20}),                    # a node with no file
        ],
    )

Nothing here touches the file system or QEMU: :func:`drives_argv` is pure, and every field
is checked when a drive is made (``ValueError``/``TypeError`` naming the field).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Final, cast

__all__ = [
    "FDC_ID",
    "INTERFACES",
    "REMOVABLE_INTERFACES",
    "SCSI_CONTROLLER_ID",
    "Drive",
    "check_drives",
    "drives_argv",
]

OptionValue = str | int | float | bool

INTERFACES: Final = ("virtio", "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "floppy", "none")
"""The front ends a :class:`Drive` can have (``none``: the block node only)."""

REMOVABLE_INTERFACES: Final = ("scsi-cd", "ide-cd", "floppy")
"""Front ends with removable media (the tray and medium methods work on them; a drive on
one of them may be empty)."""

SCSI_CONTROLLER_ID: Final = "trio-scsi"
"""The id of the virtio-scsi controller added for ``scsi-hd``/``scsi-cd`` drives."""

FDC_ID: Final = "trio-fdc"
"""The id of the floppy controller added for ``floppy`` drives on q35."""

_DEVICES: Final = {
    "virtio": "virtio-blk-pci",
    "scsi-hd": "scsi-hd",
    "scsi-cd": "scsi-cd",
    "ide-hd": "ide-hd",
    "ide-cd": "ide-cd",
    "floppy": "floppy",
}
_SUFFIX_FORMATS: Final = {
    ".qcow2": "qcow2",
    ".raw": "raw",
    ".img": "raw",
    ".vmdk": "vmdk",
    ".vdi": "vdi",
    ".vhdx": "vhdx",
    ".qed": "qed",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_NODE_NAME_MAX = 31  # QEMU keeps node names in a 32-byte buffer
_FORMAT = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
#: Options set through fields, refused in ``options``.
_RESERVED = frozenset({"driver", "node-name", "read-only"})


def _check_name(value: object, field: str, *, limit: int = 127) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > limit:
        raise ValueError(
            f"Drive.{field} must start with a letter and hold only letters, digits, '-', '.' "
            f"and '_' (at most {limit} characters), not {value!r}"
        )


@dataclass(frozen=True)
class Drive:
    """One disk: an image (or an empty removable drive) and how the machine sees it.

    ``Drive(file, format)``: ``file`` is the image, ``format`` its format (``qcow2``,
    ``raw``...). With no ``file``, ``format`` names a driver that needs none (``null-co``,
    with ``options={"size": ...}``), and with neither the drive is an empty removable one
    (a CD-ROM or floppy with no medium). :class:`~trio_qemu.MachineConfig` takes them in
    ``drives=``; ``vm.blockdev_add(drive)`` adds the node of one at run time.
    """

    file: str | os.PathLike[str] | None = None
    """The image file (opened with the ``file`` protocol driver), or None."""
    format: str | None = None
    """The format driver on top of ``file`` (required with it), or a driver that needs no
    file."""
    _: KW_ONLY
    interface: str = "virtio"
    """The front end, one of :data:`INTERFACES`."""
    id: str | None = None
    """The device's id (``-device ...,id=``), used by ``device_del`` and the tray and medium
    methods. None: ``drive<N>``, N its place in ``MachineConfig.drives``."""
    node_name: str | None = None
    """The block node's name, used by ``blockdev-*`` commands and jobs (``device=``). None:
    the same as :attr:`id`."""
    read_only: bool = False
    """Open the image read-only."""
    snapshot: bool = False
    """Writes go to a temporary overlay that QEMU drops when it exits (QEMU's
    ``snapshot=on``): the image itself is never written. Such a drive is a ``-drive``
    option rather than a ``-blockdev`` one (QEMU makes the overlay in ``$TMPDIR``, default
    ``/var/tmp``, and unlinks it at once, so nothing stays even if QEMU is killed); its node
    name is then the drive's (BlockBackend's) name, which jobs accept too."""
    serial: str | None = None
    """A serial number the guest sees (``/sys/block/vdX/serial``)."""
    options: Mapping[str, OptionValue] | tuple[tuple[str, OptionValue], ...] = ()
    """More ``-blockdev`` options for the format node; dotted keys reach nested ones, e.g.
    ``{"discard": "unmap", "cache.direct": True, "file.aio": "threads"}``. Stored as a
    sorted tuple of pairs (a drive is hashable). ``driver``, ``node-name`` and ``read-only``
    come from the fields and are refused here."""

    def __post_init__(self) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the one at fault."""
        if self.file is not None:
            if not isinstance(self.file, str | os.PathLike) or not isinstance(
                os.fspath(self.file), str
            ):
                raise TypeError(
                    f"Drive.file must be a path (str or os.PathLike), not {self.file!r}"
                )
            if not os.fspath(self.file):
                raise ValueError("Drive.file must not be empty")
        if self.format is not None and (
            not isinstance(self.format, str) or not _FORMAT.match(self.format)
        ):
            raise ValueError(
                f"Drive.format must be a driver name such as 'qcow2', not {self.format!r}"
            )
        if self.file is not None and self.format is None:
            raise ValueError(
                f"Drive({os.fspath(self.file)!r}) needs a format (e.g. Drive(path, 'qcow2')): "
                "QEMU does not guess it for a -blockdev node"
            )
        if self.interface not in INTERFACES:
            raise ValueError(
                f"Drive.interface must be one of {', '.join(INTERFACES)}, not {self.interface!r}"
            )
        if self.empty and self.interface not in REMOVABLE_INTERFACES:
            raise ValueError(
                "a Drive with no file and no format is an empty removable drive: its interface "
                f"must be one of {', '.join(REMOVABLE_INTERFACES)}, not {self.interface!r}"
            )
        _check_name(self.id, "id")
        _check_name(self.node_name, "node_name", limit=_NODE_NAME_MAX)
        for name in (self.id, self.node_name):
            if name in (SCSI_CONTROLLER_ID, FDC_ID):
                raise ValueError(f"{name!r} is the id of a controller trio_qemu adds")
        for field in ("read_only", "snapshot"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"Drive.{field} must be a bool, not {getattr(self, field)!r}")
        if self.snapshot and self.file is None:
            raise ValueError("Drive.snapshot needs a file: the overlay goes over an image")
        if self.serial is not None and (
            not isinstance(self.serial, str)
            or not self.serial
            or not self.serial.isprintable()
            or "," in self.serial
        ):
            raise ValueError(
                f"Drive.serial must be printable text without commas, not {self.serial!r}"
            )
        object.__setattr__(self, "options", _normalise_options(self.options, self.empty))

    @classmethod
    def from_path(cls, file: str | os.PathLike[str], **fields: Any) -> Drive:
        """A drive for image ``file`` with the format its suffix names (``.qcow2``;
        ``.raw`` and ``.img`` are raw; ``.vmdk``, ``.vdi``, ``.vhdx``, ``.qed``); ``fields``
        are the other fields.

        Raises:
            ValueError: the suffix names no format (say it: ``Drive(file, "raw")``).
        """
        suffix = os.path.splitext(os.fspath(file))[1].lower()
        fmt = _SUFFIX_FORMATS.get(suffix)
        if fmt is None:
            raise ValueError(
                f"cannot tell the format of {os.fspath(file)!r} from its suffix: give a "
                f"Drive(path, format) (known suffixes: {', '.join(sorted(_SUFFIX_FORMATS))})"
            )
        return cls(file, fmt, **fields)

    @property
    def empty(self) -> bool:
        """Whether this is an empty removable drive (no file, no format: no node)."""
        return self.file is None and self.format is None

    @property
    def removable(self) -> bool:
        """Whether the front end has removable media (see :data:`REMOVABLE_INTERFACES`)."""
        return self.interface in REMOVABLE_INTERFACES

    def blockdev_options(self, node_name: str | None = None) -> dict[str, Any]:
        """The node's ``blockdev-add`` arguments (and ``-blockdev`` JSON).

        ``node_name`` overrides :attr:`node_name`/:attr:`id`; one of them must be set.

        Raises:
            ValueError: the drive is empty, or has no name.
        """
        name = node_name or self.node_name or self.id
        if name is None:
            raise ValueError("the Drive has no node_name (and no id to take it from)")
        if self.empty:
            raise ValueError("an empty removable Drive has no block node")
        assert self.format is not None
        node: dict[str, Any] = {"driver": self.format, "node-name": name}
        if self.file is not None:
            node["file"] = {"driver": "file", "filename": os.fspath(self.file)}
        if self.read_only:
            node["read-only"] = True
        for key, value in _pairs(self):
            _put(node, key.split("."), value)
        return node


def _pairs(drive: Drive) -> tuple[tuple[str, OptionValue], ...]:
    """The drive's options (normalised to sorted pairs when it was made)."""
    return cast("tuple[tuple[str, OptionValue], ...]", drive.options)


def _normalise_options(options: object, empty: bool) -> tuple[tuple[str, OptionValue], ...]:
    items: Sequence[Any]
    if isinstance(options, Mapping):
        items = list(options.items())
    elif isinstance(options, tuple | list):
        items = list(options)
    else:
        raise TypeError(f"Drive.options must be a mapping, not {options!r}")
    pairs: dict[str, OptionValue] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"Drive.options must map names to values, not {item!r}")
        key, value = item
        if not isinstance(key, str) or not key or "," in key or "=" in key or ".." in key:
            raise ValueError(f"Drive.options: bad option name {key!r}")
        if key in _RESERVED:
            raise ValueError(
                f"Drive.options must not set {key!r}: it comes from the drive's fields"
            )
        if not isinstance(value, str | int | float | bool):
            raise TypeError(f"Drive.options[{key!r}] must be a str, int, float or bool")
        pairs[key] = value
    if pairs and empty:
        raise ValueError("an empty removable Drive has no node for options")
    return tuple(sorted(pairs.items()))


def _put(node: dict[str, Any], path: list[str], value: OptionValue) -> None:
    """Set a dotted option into nested dicts, e.g. ``cache.direct`` -> ``{"cache": {...}}``."""
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"Drive.options: {'.'.join(path)!r} goes below a plain value")
        node = child
    node[path[-1]] = value


def _resolve(drives: Sequence[Drive]) -> list[tuple[Drive, str, str]]:
    """Each drive with its id and node name (the defaults filled in)."""
    resolved = []
    for index, drive in enumerate(drives):
        device_id = drive.id or f"drive{index}"
        resolved.append((drive, device_id, drive.node_name or device_id))
    return resolved


def check_drives(drives: Sequence[object], field: str = "MachineConfig.drives") -> None:
    """Check a machine's drives together: each is a :class:`Drive`, ids and node names are
    unique (defaults included). Raises ``TypeError``/``ValueError`` naming the drive."""
    for index, drive in enumerate(drives):
        if not isinstance(drive, Drive):
            raise TypeError(f"{field}[{index}] must be a Drive, not {drive!r}")
    seen_ids: dict[str, int] = {}
    seen_nodes: dict[str, int] = {}
    for index, (drive, device_id, node) in enumerate(_resolve(cast("Sequence[Drive]", drives))):
        if drive.interface != "none":
            if device_id in seen_ids:
                raise ValueError(
                    f"{field}[{index}] has the id {device_id!r} of {field}[{seen_ids[device_id]}]"
                )
            seen_ids[device_id] = index
        if not drive.empty:
            if node in seen_nodes:
                raise ValueError(
                    f"{field}[{index}] has the node name {node!r} of {field}[{seen_nodes[node]}]"
                )
            seen_nodes[node] = index


def _machine_type(machine: str | None) -> str:
    return (machine or "").split(",", 1)[0]


def _drive_option(drive: Drive, node: str) -> str:
    """A ``-drive`` option (for ``snapshot=on``): ``key=value`` pairs, commas doubled."""
    assert drive.file is not None and drive.format is not None
    pairs: list[tuple[str, OptionValue]] = [
        ("if", "none"),
        ("id", node),
        ("driver", drive.format),
        ("file.driver", "file"),
        ("file.filename", os.fspath(drive.file)),
        ("snapshot", True),
    ]
    if drive.read_only:
        pairs.append(("read-only", True))
    pairs += list(_pairs(drive))
    return ",".join(f"{key}={_text(value)}" for key, value in pairs)


def _text(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def drives_argv(drives: Sequence[Drive], machine: str | None = None) -> list[str]:
    """The QEMU options for ``drives``: controllers first, then each drive's node and device.

    ``machine`` is the ``-machine`` value: on q35 a floppy drive needs a controller added.
    """
    argv: list[str] = []
    if any(d.interface in ("scsi-hd", "scsi-cd") for d in drives):
        argv += ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER_ID}"]
    kind = _machine_type(machine)
    if any(d.interface == "floppy" for d in drives) and (
        kind.startswith("q35") or kind.startswith("pc-q35")
    ):
        argv += ["-device", f"isa-fdc,id={FDC_ID}"]
    for drive, device_id, node in _resolve(drives):
        if drive.snapshot:
            argv += ["-drive", _drive_option(drive, node)]
        elif not drive.empty:
            options = drive.blockdev_options(node)
            argv += ["-blockdev", json.dumps(options, separators=(",", ":"))]
        if drive.interface == "none":
            continue
        device = f"{_DEVICES[drive.interface]},id={device_id}"
        if drive.interface in ("scsi-hd", "scsi-cd"):
            device += f",bus={SCSI_CONTROLLER_ID}.0"
        if not drive.empty:
            device += f",drive={node}"
        if drive.serial is not None:
            device += f",serial={drive.serial}"
        argv += ["-device", device]
    return argv
