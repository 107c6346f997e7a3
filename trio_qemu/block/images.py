"""Disk images from Trio: ``qemu-img`` and ``qemu-io``, each run with a timeout.

Every function runs the real binary (``qemu-img`` and ``qemu-io`` from qemu-utils, or
``$QEMU_IMG`` and ``$QEMU_IO``) as a child process with a deadline, and raises
:class:`~trio_qemu.ImageError` with the tool's own message, its command line and its exit
status when it fails (:class:`~trio_qemu.ImageTimeout` when it outlives ``timeout``; it is
killed then). A cancelled call kills the tool and reaps it before the cancellation goes on.
Output is parsed from ``--output=json`` where qemu-img has it::

    from trio_qemu.block import images as img

    base = await img.create(tmp / "base.qcow2", "qcow2", "64M")
    top = await img.create(tmp / "top.qcow2", "qcow2", backing=base, backing_fmt="qcow2")
    await img.write_pattern(top, 0xAB, 0, "1M", fmt="qcow2")
    chain = await img.backing_chain(top)            # (top, base): ImageInfo each
    await img.commit(top)                           # into base
    await img.verify_pattern(base, 0xAB, 0, "1M", fmt="qcow2")

:func:`create` and :func:`convert` write the new image under a temporary name in the same
directory and rename it into place when the tool has succeeded: a failed, timed-out or
cancelled call leaves no half-written image under the final name (a relative backing file
name resolves from the same directory either way).

Paths are file names; a relative one that qemu-img would read as a protocol (``a:b``) or an
option (``-x``) is passed as ``./a:b``. Sizes and offsets are bytes (an ``int``) or
qemu-img's own notation (``"64M"``, ``"1G"``, ``"+1M"`` for :func:`resize`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import ImageError
from ._run import ToolResult, run_tool

__all__ = [
    "IMAGE_TIMEOUT",
    "QEMU_IMG_ENV",
    "QEMU_IO_ENV",
    "CheckResult",
    "ImageInfo",
    "MapEntry",
    "Measure",
    "backing_chain",
    "check",
    "commit",
    "compare",
    "convert",
    "create",
    "info",
    "io",
    "map",
    "measure",
    "rebase",
    "resize",
    "verify_pattern",
    "write_pattern",
]

IMAGE_TIMEOUT: Final = 60.0
"""The default ``timeout`` (seconds) of every ``qemu-img``/``qemu-io`` call."""

QEMU_IMG_ENV: Final = "QEMU_IMG"
"""Environment variable naming the ``qemu-img`` binary (default: ``qemu-img`` on PATH)."""

QEMU_IO_ENV: Final = "QEMU_IO"
"""Environment variable naming the ``qemu-io`` binary (default: ``qemu-io`` on PATH)."""

PathArg = str | os.PathLike[str]
SizeArg = int | str
OptionValue = str | int | bool

_FORMAT = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SIZE = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?[bkKMGTPE]?$")


# -- argument checks -------------------------------------------------------------------------
def _path(value: object, what: str) -> str:
    """``value`` as a file name for a qemu tool's command line (see the module docstring)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{what} must be a path (str or os.PathLike), not {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty path, not {value!r}")
    if not os.path.isabs(text) and (text.startswith("-") or ":" in text.split("/", 1)[0]):
        return "./" + text
    return text


def _format(value: object, what: str) -> str:
    if not isinstance(value, str) or not _FORMAT.match(value):
        raise ValueError(f"{what} must be an image format name such as 'qcow2', not {value!r}")
    return value


def _size(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be a number of bytes (int) or a size such as '64M'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, not {value}")
        return str(value)
    if not _SIZE.match(value):
        raise ValueError(f"{what} must be a size such as 65536, '64k' or '1G', not {value!r}")
    return value


def _options(options: Mapping[str, OptionValue] | None, what: str = "options") -> list[str]:
    """``-o key=value,...`` (commas in values doubled, booleans as on/off)."""
    if not options:
        return []
    parts = []
    for key, value in options.items():
        if not isinstance(key, str) or not key or "," in key or "=" in key:
            raise ValueError(f"{what}: bad option name {key!r}")
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int | str):
            text = str(value)
        else:
            raise TypeError(f"{what}[{key!r}] must be a str, int or bool, not {value!r}")
        parts.append(f"{key}={text.replace(',', ',,')}")
    return ["-o", ",".join(parts)]


def qemu_img() -> str:
    """The ``qemu-img`` to run: ``$QEMU_IMG`` or ``qemu-img``."""
    return os.environ.get(QEMU_IMG_ENV) or "qemu-img"


def qemu_io_binary() -> str:
    """The ``qemu-io`` to run: ``$QEMU_IO`` or ``qemu-io``."""
    return os.environ.get(QEMU_IO_ENV) or "qemu-io"


def _fmt_args(flag: str, fmt: str | None, what: str) -> list[str]:
    return [] if fmt is None else [flag, _format(fmt, what)]


async def _img(*args: str, timeout: float | None, ok: Sequence[int] = (0,)) -> ToolResult:
    return await run_tool([qemu_img(), *args], timeout=timeout, ok=ok)


def _json(result: ToolResult) -> Any:
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        raise ImageError(
            f"{result.argv[1]}: qemu-img printed something that is not JSON: {exc}",
            argv=result.argv,
            returncode=result.returncode,
            output=result.output,
        ) from exc


# -- parsed results --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """One image as ``qemu-img info --output=json`` describes it."""

    filename: str
    """The file name as qemu-img printed it."""
    format: str
    """The image format (``qcow2``, ``raw``...)."""
    virtual_size: int
    """The disk size the guest sees, in bytes."""
    actual_size: int | None = None
    """The space the file takes on the host, in bytes."""
    backing_filename: str | None = None
    """The backing file name as stored in the image, or None."""
    full_backing_filename: str | None = None
    """That name resolved (relative names from the image's directory)."""
    backing_format: str | None = None
    """The backing file's format as stored in the image."""
    cluster_size: int | None = None
    """The cluster size, for formats that have one."""
    dirty: bool = False
    """Whether the image is marked dirty (not closed cleanly)."""
    encrypted: bool = False
    """Whether the image is encrypted."""
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Everything qemu-img printed, as parsed (snapshots, format-specific data...)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageInfo:
        """Parse one object of ``qemu-img info --output=json``."""
        return cls(
            filename=str(data.get("filename", "")),
            format=str(data.get("format", "")),
            virtual_size=int(data.get("virtual-size", 0)),
            actual_size=data.get("actual-size"),
            backing_filename=data.get("backing-filename"),
            full_backing_filename=data.get("full-backing-filename"),
            backing_format=data.get("backing-filename-format"),
            cluster_size=data.get("cluster-size"),
            dirty=bool(data.get("dirty-flag", False)),
            encrypted=bool(data.get("encrypted", False)),
            data=dict(data),
        )


@dataclass(frozen=True)
class CheckResult:
    """What ``qemu-img check --output=json`` found (0 for a count qemu-img left out)."""

    filename: str
    """The image checked."""
    format: str
    """Its format."""
    check_errors: int = 0
    """Errors that kept the check itself from completing parts of the image."""
    corruptions: int = 0
    """Corruptions found (and not fixed)."""
    leaks: int = 0
    """Leaked clusters found (and not fixed)."""
    corruptions_fixed: int = 0
    """Corruptions repaired (with ``repair=``)."""
    leaks_fixed: int = 0
    """Leaked clusters repaired (with ``repair=``)."""
    image_end_offset: int | None = None
    """Where the image's data ends in the file."""
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Everything qemu-img printed, as parsed."""

    @property
    def ok(self) -> bool:
        """No check error, corruption or leak is left."""
        return not (self.check_errors or self.corruptions or self.leaks)


@dataclass(frozen=True)
class MapEntry:
    """One extent of ``qemu-img map --output=json``."""

    start: int
    """Where the extent starts in the guest's view, in bytes."""
    length: int
    """Its length in bytes."""
    depth: int
    """How far down the backing chain its data is (0: the image itself)."""
    present: bool
    """Whether some image of the chain has it (False: unallocated everywhere)."""
    zero: bool
    """Whether it reads as zeroes."""
    data: bool
    """Whether it is stored as data (not as zeroes or a hole)."""
    offset: int | None = None
    """Where its data is in the file at ``depth``, when qemu-img can say."""


@dataclass(frozen=True)
class Measure:
    """``qemu-img measure``: the space a new image would need, in bytes."""

    required: int
    """With the data that is allocated now."""
    fully_allocated: int
    """With every cluster allocated."""


# -- qemu-img --------------------------------------------------------------------------------
def _temporary_beside(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")


async def _create_into(path: PathArg, what: str, make: Callable[[str], Awaitable[None]]) -> Path:
    """Run ``make(temporary_name)`` and rename its result onto ``path``; on any failure
    (cancellation included) remove the temporary file and leave ``path`` alone."""
    final = _path(path, what)
    temporary = _temporary_beside(final)
    try:
        await make(temporary)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return Path(os.fspath(path))


async def create(
    path: PathArg,
    fmt: str = "qcow2",
    size: SizeArg | None = None,
    *,
    backing: PathArg | None = None,
    backing_fmt: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    timeout: float | None = IMAGE_TIMEOUT,
) -> Path:
    """Create an image (``qemu-img create``); return its path.

    Args:
        path: the new image (replaced if it exists).
        fmt: its format.
        size: its virtual size; may be left out with ``backing`` (the backing file's size).
        backing: a backing file, stored as given: a relative name is relative to the new
            image's directory.
        backing_fmt: the backing file's format; required with ``backing`` (qemu-img no
            longer guesses it).
        options: ``-o`` options, e.g. ``{"cluster_size": 65536, "lazy_refcounts": True}``.
        timeout: seconds before qemu-img is killed (None: no limit).

    Raises:
        ImageError: qemu-img refused (its message); nothing is left at ``path``.
        ImageTimeout: it took longer than ``timeout``.
    """
    args = ["create", "-q", "-f", _format(fmt, "fmt")]
    if backing is not None:
        if backing_fmt is None:
            raise ValueError(
                "backing_fmt is required with backing: qemu-img no longer probes the format "
                "of a backing file (give e.g. backing_fmt='qcow2')"
            )
        args += ["-b", os.fspath(backing), "-F", _format(backing_fmt, "backing_fmt")]
    elif backing_fmt is not None:
        raise ValueError("backing_fmt was given without backing")
    elif size is None:
        raise ValueError("size is required for an image without a backing file")
    args += _options(options)
    sizes = [] if size is None else [_size(size, "size")]

    async def make(temporary: str) -> None:
        await _img(*args, temporary, *sizes, timeout=timeout)

    return await _create_into(path, "path", make)


async def info(
    path: PathArg,
    *,
    fmt: str | None = None,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> ImageInfo:
    """``qemu-img info --output=json``, parsed.

    ``force_share=True`` (``-U``) reads an image a running QEMU holds open (its data may be
    changing meanwhile).
    """
    result = await _img(
        "info", "--output=json", *_fmt_args("-f", fmt, "fmt"), *(["-U"] if force_share else []),
        _path(path, "path"), timeout=timeout,
    )  # fmt: skip
    data = _json(result)
    if not isinstance(data, dict):
        raise ImageError("qemu-img info printed no object", argv=result.argv, output=result.output)
    return ImageInfo.from_json(data)


async def backing_chain(
    path: PathArg,
    *,
    fmt: str | None = None,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> tuple[ImageInfo, ...]:
    """The image and its backing files, top first (``qemu-img info --backing-chain``).

    A chain that loops is an :class:`~trio_qemu.ImageError` with qemu-img's message
    ("Backing file 'a.qcow2' creates an infinite loop.").
    """
    result = await _img(
        "info", "--output=json", "--backing-chain", *_fmt_args("-f", fmt, "fmt"),
        *(["-U"] if force_share else []), _path(path, "path"), timeout=timeout,
    )  # fmt: skip
    data = _json(result)
    if not isinstance(data, list):
        data = [data]
    return tuple(ImageInfo.from_json(item) for item in data)


async def check(
    path: PathArg,
    *,
    fmt: str | None = None,
    repair: str | None = None,
    timeout: float | None = IMAGE_TIMEOUT,
) -> CheckResult:
    """``qemu-img check --output=json``: the image's consistency.

    A damaged image is a result (see :attr:`CheckResult.ok`), not an error; ``repair`` is
    ``"leaks"`` or ``"all"`` to fix what can be fixed. Raises
    :class:`~trio_qemu.ImageError` when the check cannot be done (a missing file, a format
    without checks).
    """
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    # Exit status 2: corruptions found; 3: leaks found. Both come with the JSON report.
    result = await _img(
        "check", "--output=json", *_fmt_args("-f", fmt, "fmt"),
        *(["-r", repair] if repair else []), _path(path, "path"), timeout=timeout, ok=(0, 2, 3),
    )  # fmt: skip
    data = _json(result)
    return CheckResult(
        filename=str(data.get("filename", "")),
        format=str(data.get("format", "")),
        check_errors=int(data.get("check-errors", 0)),
        corruptions=int(data.get("corruptions", 0)),
        leaks=int(data.get("leaks", 0)),
        corruptions_fixed=int(data.get("corruptions-fixed", 0)),
        leaks_fixed=int(data.get("leaks-fixed", 0)),
        image_end_offset=data.get("image-end-offset"),
        data=dict(data),
    )


async def convert(
    source: PathArg,
    target: PathArg,
    *,
    fmt: str | None = None,
    target_fmt: str = "qcow2",
    options: Mapping[str, OptionValue] | None = None,
    compress: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> Path:
    """Copy ``source`` (format ``fmt``, probed when None) into a new image ``target`` of
    format ``target_fmt`` (``qemu-img convert``); return ``target``'s path.

    ``compress=True`` compresses (formats that can). The target appears under its name only
    once complete (see the module docstring).
    """
    args = [
        "convert", *_fmt_args("-f", fmt, "fmt"), "-O", _format(target_fmt, "target_fmt"),
        *_options(options), *(["-c"] if compress else []), _path(source, "source"),
    ]  # fmt: skip

    async def make(temporary: str) -> None:
        await _img(*args, temporary, timeout=timeout)

    return await _create_into(target, "target", make)


async def resize(
    path: PathArg,
    size: SizeArg,
    *,
    fmt: str | None = None,
    shrink: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> None:
    """Change an image's virtual size (``qemu-img resize``): ``"+1M"`` grows it by 1 MiB.

    Shrinking needs ``shrink=True`` (data past the new end is lost).
    """
    await _img(
        "resize", "-q", *_fmt_args("-f", fmt, "fmt"), *(["--shrink"] if shrink else []),
        _path(path, "path"), _size(size, "size"), timeout=timeout,
    )  # fmt: skip


async def commit(
    path: PathArg,
    *,
    fmt: str | None = None,
    base: PathArg | None = None,
    drop: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> None:
    """Write an overlay's data into its backing file (``qemu-img commit``).

    ``base`` commits through the chain down to that image (default: the direct backing
    file); ``drop=True`` leaves the overlay as it is (else it is emptied).
    """
    await _img(
        "commit", "-q", *_fmt_args("-f", fmt, "fmt"),
        *(["-b", _path(base, "base")] if base is not None else []), *(["-d"] if drop else []),
        _path(path, "path"), timeout=timeout,
    )  # fmt: skip


async def rebase(
    path: PathArg,
    backing: PathArg | None,
    *,
    backing_fmt: str | None = None,
    fmt: str | None = None,
    unsafe: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> None:
    """Give an image another backing file (``qemu-img rebase``); None removes it.

    A safe rebase (the default) copies whatever differs between the old and the new backing
    file into the image; ``unsafe=True`` only rewrites the name (``-u``). ``backing`` is
    stored as given (relative to the image's directory).
    """
    args = ["rebase", *_fmt_args("-f", fmt, "fmt"), *(["-u"] if unsafe else [])]
    if backing is None:
        args += ["-b", ""]
    else:
        if backing_fmt is None:
            raise ValueError("backing_fmt is required with backing (e.g. backing_fmt='qcow2')")
        args += ["-b", os.fspath(backing), "-F", _format(backing_fmt, "backing_fmt")]
    await _img(*args, _path(path, "path"), timeout=timeout)


async def compare(
    first: PathArg,
    second: PathArg,
    *,
    fmt: str | None = None,
    second_fmt: str | None = None,
    strict: bool = False,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> bool:
    """Whether two images hold the same data (``qemu-img compare``).

    ``strict=True`` also tells a size difference or allocated-vs-unallocated zeroes apart.
    """
    result = await _img(
        "compare", *_fmt_args("-f", fmt, "fmt"), *_fmt_args("-F", second_fmt, "second_fmt"),
        *(["-s"] if strict else []), *(["-U"] if force_share else []),
        _path(first, "first"), _path(second, "second"), timeout=timeout, ok=(0, 1),
    )  # fmt: skip
    return result.returncode == 0


async def map(
    path: PathArg,
    *,
    fmt: str | None = None,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> tuple[MapEntry, ...]:
    """Where an image's data is (``qemu-img map --output=json``), extent by extent."""
    result = await _img(
        "map", "--output=json", *_fmt_args("-f", fmt, "fmt"), *(["-U"] if force_share else []),
        _path(path, "path"), timeout=timeout,
    )  # fmt: skip
    return tuple(
        MapEntry(
            start=int(item["start"]),
            length=int(item["length"]),
            depth=int(item.get("depth", 0)),
            present=bool(item.get("present", True)),
            zero=bool(item.get("zero", False)),
            data=bool(item.get("data", False)),
            offset=item.get("offset"),
        )
        for item in _json(result)
    )


async def measure(
    *,
    size: SizeArg | None = None,
    path: PathArg | None = None,
    fmt: str | None = None,
    target_fmt: str = "qcow2",
    options: Mapping[str, OptionValue] | None = None,
    timeout: float | None = IMAGE_TIMEOUT,
) -> Measure:
    """The space an image of format ``target_fmt`` would need (``qemu-img measure``): for a
    new image of ``size`` bytes, or for a converted copy of the image at ``path``."""
    if (size is None) == (path is None):
        raise ValueError("give exactly one of size= (a new image) and path= (a copy)")
    what = ["--size", _size(size, "size")] if size is not None else [
        *_fmt_args("-f", fmt, "fmt"), _path(path, "path")]  # fmt: skip
    result = await _img(
        "measure", "--output=json", "-O", _format(target_fmt, "target_fmt"),
        *_options(options), *what, timeout=timeout,
    )  # fmt: skip
    data = _json(result)
    return Measure(required=int(data["required"]), fully_allocated=int(data["fully-allocated"]))


# -- qemu-io ---------------------------------------------------------------------------------
async def io(
    path: PathArg,
    *commands: str,
    fmt: str | None = None,
    read_only: bool = False,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> str:
    """Run ``qemu-io`` commands (``"write -P 0xab 0 64k"``, ``"read -P 0xab 0 64k"``,
    ``"discard 0 1M"``...) on an image, in order; return what qemu-io printed.

    ``force_share=True`` (``-U``, read-only) opens an image a running QEMU holds. Raises
    :class:`~trio_qemu.ImageError` when a command fails (a pattern that does not match,
    an I/O error, an unknown command) with qemu-io's message.
    """
    if not commands:
        raise ValueError("give at least one qemu-io command, e.g. 'read 0 64k'")
    args: list[str] = [*_fmt_args("-f", fmt, "fmt")]
    if read_only or force_share:
        args.append("-r")
    if force_share:
        args.append("-U")
    for command in commands:
        if not isinstance(command, str) or not command.strip() or "\n" in command:
            raise ValueError(f"a qemu-io command must be one non-empty line, not {command!r}")
        args += ["-c", command]
    result = await run_tool(
        [qemu_io_binary(), *args, _path(path, "path")], timeout=timeout, ok=(0, 1)
    )
    text = result.stdout.decode("utf-8", "replace")
    # qemu-io prints a failed command's complaint on stdout or stderr, and exits 1.
    if result.returncode != 0 or "Pattern verification failed" in text:
        lines = [line.strip() for line in result.output.splitlines() if line.strip()]
        failed = [line for line in lines if _IO_FAILURE.search(line)]
        raise ImageError(
            f"qemu-io: {(failed or lines or ['(no message)'])[-1]}",
            argv=result.argv,
            returncode=result.returncode,
            output=result.output,
        )
    return text


_IO_FAILURE = re.compile(r"failed|error|not found|can't|cannot|invalid", re.IGNORECASE)


def _pattern(pattern: object) -> str:
    if isinstance(pattern, bool) or not isinstance(pattern, int) or not 0 <= pattern <= 255:
        raise ValueError(f"pattern must be a byte value 0..255, not {pattern!r}")
    return f"0x{pattern:02x}"


async def write_pattern(
    path: PathArg,
    pattern: int,
    offset: SizeArg,
    length: SizeArg,
    *,
    fmt: str | None = None,
    timeout: float | None = IMAGE_TIMEOUT,
) -> None:
    """Fill ``length`` bytes at ``offset`` with the byte ``pattern`` (qemu-io ``write -P``)."""
    await io(
        path,
        f"write -P {_pattern(pattern)} {_size(offset, 'offset')} {_size(length, 'length')}",
        fmt=fmt,
        timeout=timeout,
    )


async def verify_pattern(
    path: PathArg,
    pattern: int,
    offset: SizeArg,
    length: SizeArg,
    *,
    fmt: str | None = None,
    force_share: bool = False,
    timeout: float | None = IMAGE_TIMEOUT,
) -> None:
    """Check that ``length`` bytes at ``offset`` all hold ``pattern`` (qemu-io ``read -P``).

    Raises:
        ImageError: they do not ("Pattern verification failed at offset ..."), or the image
            cannot be read.
    """
    await io(
        path,
        f"read -P {_pattern(pattern)} {_size(offset, 'offset')} {_size(length, 'length')}",
        fmt=fmt,
        read_only=True,
        force_share=force_share,
        timeout=timeout,
    )
