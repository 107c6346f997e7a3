"""Machine temporary directories: created with a record of their owner, removed loudly,
and cleaned up after controllers that died without removing theirs.

Each machine has a private (0700) directory ``trio-qemu-<name>-XXXXXXXX`` under the base
temporary directory. :func:`create_machine_dir` writes an owner file into it: the creating
process's pid, that process's start time (``/proc/<pid>/stat`` field 22, so a reused pid is
not mistaken for the owner), the boot id and the pid namespace. A controller killed by
SIGKILL or SIGTERM cannot remove its directory; :func:`remove_stale_dirs` (called at each
launch, and by ``python -m trio_qemu clean``) removes the directories whose owner is dead.

A directory is removed only when all of these hold: its name starts with ``trio-qemu-``; it
is a real directory (not a symlink) owned by our uid; it holds our owner file (a regular
file) that parses; the owner was recorded in our pid namespace; and the owner is dead (the
boot id changed, or no process with that pid and start time exists). Anything else is left
alone. Two cleaners at once are fine: a directory that vanishes under one is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "OWNER_FILE",
    "PREFIX",
    "create_machine_dir",
    "remove_machine_dir",
    "remove_stale_dirs",
]

log = logging.getLogger("trio_qemu.tempdirs")

#: Every machine directory's name starts with this.
PREFIX = "trio-qemu-"
#: The owner record inside a machine directory.
OWNER_FILE = ".trio-qemu-owner"
#: Owner files are tiny; anything bigger is not ours.
_OWNER_MAX = 4096


def _start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot), or None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise  # we cannot tell: never take a live owner for dead
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; field 3 follows
    # the last ")", so field 22 is the 20th after it.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # a zombie is dead, only not reaped yet
        return None
    return int(fields[19])


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - no /proc
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # pragma: no cover - no /proc
        return ""


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """What identifies process ``pid`` (default: this one) for as long as it lives."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    if start is None:
        raise ProcessLookupError(pid)
    return {"pid": pid, "start": start, "boot": _boot_id(), "pidns": _pid_namespace()}


def create_machine_dir(name: str, base: str | os.PathLike[str] | None = None) -> Path:
    """Create ``trio-qemu-<name>-XXXXXXXX`` (mode 0700) under ``base`` (default: the system
    temporary directory) with an owner record for this process; return its path.

    Raises ``OSError`` if it cannot be created (nothing is left behind then).
    """
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{name}-", dir=base))
    try:
        data = json.dumps(owner_record()).encode()
        # Written aside, then renamed: a cleaner never sees a half-written record (and a
        # directory without a record is never removed).
        partial = path / f"{OWNER_FILE}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path / OWNER_FILE)
    except BaseException:
        # Ours, just made, holding at most the partial record: plain unlink and rmdir need no
        # file descriptor, so this works even when we ran out of them (EMFILE).
        for leftover in (path / f"{OWNER_FILE}.partial", path / OWNER_FILE):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return path


def remove_machine_dir(path: str | os.PathLike[str]) -> bool:
    """Remove a machine directory and everything in it; return whether it is gone.

    A failure is logged as a warning (with what could not be removed), never raised: the
    machine is shut down by then, and ``python -m trio_qemu clean`` can finish the job.
    """
    failures: list[str] = []

    def record(func: Any, failed: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):  # gone already is what we want
            failures.append(f"{failed}: {exc}")

    _rmtree(Path(path), record)
    if failures:
        log.warning("could not remove the machine directory %s: %s", path, "; ".join(failures[:3]))
        return False
    return True


def remove_stale_dirs(
    base: str | os.PathLike[str] | None = None, *, dry_run: bool = False
) -> list[Path]:
    """Remove the machine directories under ``base`` (default: the system temporary
    directory) whose owner process is dead; return them (with ``dry_run``, only return
    them). Never raises ``OSError``: a base that cannot be read has nothing to clean.

    Cost: one ``scandir`` of ``base``, plus for each ``trio-qemu-*`` entry an ``lstat``,
    one small read and a ``/proc/<pid>/stat`` read.
    """
    base_path = Path(tempfile.gettempdir() if base is None else base)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base_path))
    except OSError as exc:
        log.debug("cannot scan %s for stale machine directories: %s", base_path, exc)
        return removed
    context = _Context()
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        path = Path(entry.path)
        if not _is_stale(path, context):
            continue
        if dry_run:
            removed.append(path)
            continue
        if remove_machine_dir(path):
            log.info("removed stale machine directory %s", path)
            removed.append(path)
    return removed


class _Context:
    """What identifies this boot, namespace and user, read once per scan."""

    def __init__(self) -> None:
        self.boot = _boot_id()
        self.pidns = _pid_namespace()
        self.uid = os.getuid()


def _is_stale(path: Path, context: _Context) -> bool:
    try:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != context.uid:
            return False  # a symlink, a file, or someone else's
        record = _read_owner(path)
    except OSError:  # vanished (another cleaner), or unreadable: not ours to judge
        return False
    if record is None or record["pidns"] != context.pidns:
        return False  # no record of ours, or an owner whose pids we cannot see
    if record["boot"] != context.boot:
        return True  # recorded before a reboot: that process is long gone
    try:
        return bool(_start_time(record["pid"]) != record["start"])
    except OSError:  # out of fds: cannot tell, so it stays
        return False


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The directory's owner record, or None if it has none that is ours and well-formed."""
    try:
        fd = os.open(path / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink in its place
        log.debug("%s: unreadable owner file: %s", path, exc)
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(_OWNER_MAX + 1)
    if len(data) > _OWNER_MAX:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not (
        isinstance(record, dict)
        and type(record.get("pid")) is int
        and type(record.get("start")) is int
        and isinstance(record.get("boot"), str)
        and isinstance(record.get("pidns"), str)
    ):
        return None
    return record


def _rmtree(path: Path, on_error: Any) -> None:
    """``shutil.rmtree`` (the fd-based, symlink-safe one on Linux), reporting each failure
    as ``on_error(func, path, exc)``."""
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:

        def onerror(func: Any, failed: str, exc_info: Any) -> None:
            on_error(func, failed, exc_info[1])

        shutil.rmtree(path, onerror=onerror)
