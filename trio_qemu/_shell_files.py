"""Files both ways between host and guest: ``shell.copy_to`` and ``shell.copy_from``.

:class:`ShellFiles` is mixed into :class:`~trio_qemu.Shell`. A copy does not go through the
shell's command channel (one command at a time, base64): it runs busybox tools in the guest
through the machine's relay (:mod:`trio_qemu.relay`; the machine hands it to its shell,
:meth:`ShellFiles.use_relay`), each a stream with flow control, alongside the shell's
commands. Directories travel as tar (busybox ``tar`` in the guest; :mod:`._tar` on the host).

What every copy keeps to:

- **Streamed, bounded memory.** The host reads and writes its files 256 KiB at a time and
  the relay bounds what is in flight, so a file of any size needs a few MiB at most
  (``copy_from`` into ``bytes`` excepted: the result is the file). The guest writes straight
  to the file (its page cache).
- **Checked.** The host hashes what it sends or receives (SHA-256) and counts it; the guest
  runs ``sha256sum`` on the file it wrote or read (for a directory, on every regular file):
  they must match, or :class:`~trio_qemu.CopyError` says which differs. ``verify=False``
  checks the sizes only (busybox's SHA-256 runs at about 30 MB/s under TCG).
- **All or nothing.** What is written goes under a temporary name beside the destination
  (``.NAME.trio-part-XXXXXXXX``) and is renamed once checked. On an error, a timeout or a
  cancellation the temporary file is removed (in the guest once the writer has been killed
  and reaped, within :data:`CLEANUP_TIMEOUT`, 10 s), so nothing half written is ever found under
  the destination's name. The shell is not involved, so it stays usable whatever happens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import secrets
import shlex
import shutil
import stat
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, overload

import trio

from ._errors import CopyError, GuestStreamBroken, RelayError, ShellTimeout
from ._tar import CHUNK, Manifest, TarError, TarSink, TarSource

if TYPE_CHECKING:
    from .relay import GuestProcess, Relay

__all__ = ["CLEANUP_TIMEOUT", "ShellFiles"]

log = logging.getLogger("trio_qemu.shell")

CLEANUP_TIMEOUT: Final = 10.0
"""Seconds a failed or cancelled copy may take to kill its guest-side writer and remove its
temporary file (shielded from cancellation)."""

#: A copy's progress callback: ``progress(bytes_done, bytes_total_or_None)``.
Progress = Callable[[int, int | None], None]


class ShellFiles:
    """``copy_to`` and ``copy_from`` of a shell (through the machine's relay)."""

    name: str
    _relay_source: Callable[[], Relay] | None = None

    def use_relay(self, source: Callable[[], Relay]) -> None:
        """How copies reach the guest's relay: ``source()`` returns it (or raises why there
        is none). Set by the machine that made the shell."""
        self._relay_source = source

    def _relay(self) -> Relay:
        if self._relay_source is None:
            raise RelayError(
                f"{self.name}: copies go through the machine's relay, and this shell has "
                "none (the shell of a machine launched with relay=True has)"
            )
        return self._relay_source()

    async def copy_to(
        self,
        src: str | os.PathLike[str] | bytes | bytearray | memoryview | AsyncIterable[bytes],
        guest_path: str,
        *,
        mode: int | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        verify: bool = True,
        timeout: float = 300.0,
    ) -> None:
        """Copy ``src`` to ``guest_path`` in the guest, exactly.

        ``src`` is a host path (a file, or a directory: its tree, as tar), bytes, or an
        async iterable of bytes. A file is written under a temporary name beside
        ``guest_path``, checked (size and SHA-256 against what was sent), given its mode
        and renamed over ``guest_path`` (an existing file is replaced). A directory becomes
        ``guest_path``, which must not exist yet; the modes, symlinks and modification
        times of its tree are kept (sockets, FIFOs and devices are left out).

        Args:
            src: what to copy.
            guest_path: the destination in the guest (absolute, or relative to ``/``); its
                parent directory must exist.
            mode: the file's permission bits; default: the host file's, or 0o644 for bytes
                and iterables. Not for directories (their tree keeps its own).
            progress: called as ``progress(bytes_sent, total)`` after every piece (``total``
                None when unknown: an iterable, a directory).
            verify: check the SHA-256 in the guest (about 2 s per 64 MiB under TCG); False
                checks the size only.
            timeout: bounds the whole copy; removing what an interrupted copy wrote may
                take up to 10 s more (shielded from cancellation).

        Raises:
            CopyError: a path is missing or of the wrong kind (``guest_path`` a directory
                when copying a file, or existing when copying a directory), the guest could
                not write, or the check failed. Nothing is left under ``guest_path`` then.
            ShellTimeout: the copy took longer than ``timeout`` (nothing is left either).
            RelayError: the machine has no relay, or it is gone (its streams broke).
            MachineExited: QEMU died meanwhile.
            ValueError: an argument is not valid.
        """
        target = _guest_path(guest_path)
        _check_timeout(timeout)
        if mode is not None and (
            isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777
        ):
            raise ValueError(f"mode must be permission bits 0-0o7777, not {mode!r}")
        relay = self._relay()
        what = _describe(src)
        with trio.move_on_after(timeout) as scope:
            if isinstance(src, str | os.PathLike):
                path = Path(src)
                info = _host_stat(path)
                if stat.S_ISDIR(info.st_mode):
                    if mode is not None:
                        raise ValueError("mode applies to a file; a directory keeps its modes")
                    await _send_tree(relay, path, target, progress, verify)
                    return
                if not stat.S_ISREG(info.st_mode):
                    raise CopyError(f"{path}: not a regular file or directory", path=str(path))
                chunks = _read_file(path)
                total: int | None = info.st_size
                mode = stat.S_IMODE(info.st_mode) if mode is None else mode
            elif isinstance(src, bytes | bytearray | memoryview):
                chunks = _slices(memoryview(src).cast("B"))
                total = memoryview(src).nbytes
            elif isinstance(src, AsyncIterable):
                chunks = _checked(src)
                total = None
            else:
                raise TypeError(
                    f"src must be a host path, bytes or an async iterable of bytes, not {src!r}"
                )
            await _send_file(relay, chunks, total, target, 0o644 if mode is None else mode,
                             progress, verify)  # fmt: skip
            return
        assert scope.cancelled_caught
        raise ShellTimeout(
            f"{self.name}: copying {what} to {guest_path!r} took longer than {timeout} s; "
            "nothing was left under that name",
            command=f"copy_to {guest_path}",
        )

    @overload
    async def copy_from(
        self,
        guest_path: str,
        dst: None = None,
        *,
        progress: Callable[[int, int | None], None] | None = None,
        verify: bool = True,
        timeout: float = 300.0,
    ) -> bytes: ...

    @overload
    async def copy_from(
        self,
        guest_path: str,
        dst: str | os.PathLike[str],
        *,
        progress: Callable[[int, int | None], None] | None = None,
        verify: bool = True,
        timeout: float = 300.0,
    ) -> None: ...

    async def copy_from(
        self,
        guest_path: str,
        dst: str | os.PathLike[str] | None = None,
        *,
        progress: Callable[[int, int | None], None] | None = None,
        verify: bool = True,
        timeout: float = 300.0,
    ) -> bytes | None:
        """Copy ``guest_path`` out of the guest, exactly: return its bytes (``dst`` None),
        or write it to the host path ``dst``.

        A file written to ``dst`` goes under a temporary name beside it, is checked (size
        and SHA-256 against the guest's ``sha256sum``), gets the guest file's mode and is
        renamed over ``dst``. A directory (``dst`` needed) becomes ``dst``, which must not
        exist yet, with the modes, symlinks and modification times of its tree.

        Args:
            guest_path: a file or directory in the guest (absolute, or relative to ``/``).
            dst: None, or the host path to write.
            progress: called as ``progress(bytes_received, total)`` after every piece
                (``total`` None for a directory).
            verify: check the SHA-256 (the guest's is computed alongside the transfer);
                False checks the size only.
            timeout: bounds the whole copy.

        Returns:
            The file's bytes when ``dst`` is None, else None.

        Raises:
            CopyError: ``guest_path`` does not exist, is not a regular file or directory,
                is a directory and ``dst`` is None, ``dst`` is a directory (or, for a
                directory, exists), or the check failed. Nothing is left at ``dst`` then.
            ShellTimeout: the copy took longer than ``timeout``.
            RelayError: the machine has no relay, or it is gone.
            MachineExited: QEMU died meanwhile.
        """
        source = _guest_path(guest_path)
        _check_timeout(timeout)
        target = None if dst is None else Path(dst)
        if target is not None and _is_dir(target):
            raise CopyError(
                f"{target}: is a directory (give the path of the copy itself)", path=str(target)
            )
        relay = self._relay()
        with trio.move_on_after(timeout) as scope:
            return await _receive(relay, source, target, progress, verify)
        assert scope.cancelled_caught
        raise ShellTimeout(
            f"{self.name}: copying {guest_path!r} out of the guest took longer than "
            f"{timeout} s; nothing was left at the destination",
            command=f"copy_from {guest_path}",
        )


# --- to the guest -----------------------------------------------------------------------


async def _send_file(
    relay: Relay,
    chunks: AsyncIterator[bytes],
    total: int | None,
    target: str,
    mode: int,
    progress: Progress | None,
    verify: bool,
) -> None:
    part = _part_name(target)
    q, qp = shlex.quote(target), shlex.quote(part)
    receive = (
        f"f={q} p={qp}\n{_PARENT_CHECK}\n"
        f"{_FILE_CHECK}\n"
        'exec cat > "$p"'
    )
    async with _guest_writer(relay, receive, part) as process:
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in chunks:
                await process.send_all(chunk)
                digest.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(size, total)
            await process.send_eof()
        except GuestStreamBroken:
            if process.returncode is None:
                raise  # the relay is gone, not the command
        await _check_exit(process, target)
        check_hash = (
            'h=$(sha256sum < "$p") || exit 1\n'
            f'[ "${{h%% *}}" = {digest.hexdigest()} ] || '
            '{ echo "its SHA-256 in the guest differs from what was sent" >&2; exit 3; }\n'
        )
        finish = (
            f"f={q} p={qp}\n"
            's=$(stat -c %s "$p") || exit 1\n'
            f'[ "$s" = {size} ] || {{ echo "the guest wrote $s bytes of {size}" >&2; exit 3; }}\n'
            + (check_hash if verify else "")
            + f'chmod {mode:o} "$p" || exit 1\n'
            f"{_FILE_CHECK}\n"
            'mv -f "$p" "$f"'
        )
        await _run(relay, finish, target)


async def _send_tree(
    relay: Relay, root: Path, target: str, progress: Progress | None, verify: bool
) -> None:
    part = _part_name(target)
    q, qp = shlex.quote(target), shlex.quote(part)
    receive = (
        f'f={q} p={qp}\n{_PARENT_CHECK}\n{_ABSENT_CHECK}\nmkdir "$p" && cd "$p" && exec tar -xf -'
    )
    tree = TarSource(root)
    async with _guest_writer(relay, receive, part) as process:
        sent = 0
        try:
            for chunk in _tar_chunks(tree):
                await process.send_all(chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent, None)
            await process.send_eof()
        except GuestStreamBroken:
            if process.returncode is None:
                raise
        await _check_exit(process, target)
        if tree.skipped:
            log.info("copy_to %s: left out (not files, directories or symlinks): %s",
                     target, ", ".join(tree.skipped[:20]))  # fmt: skip
        listing = await _run(relay, f"cd {qp} && {_listing(verify)}", target)
        _compare(tree.manifest, listing, verify, target)
        await _run(relay, f'f={q} p={qp}\n{_ABSENT_CHECK}\nmv "$p" "$f"', target)


@contextmanager
def _tar_errors(path: str) -> Iterator[None]:
    try:
        yield
    except TarError as exc:
        raise CopyError(f"{path}: {exc}", path=path) from exc
    except OSError as exc:
        raise CopyError(f"{exc.filename or path}: {exc.strerror or exc}", path=path) from exc


def _tar_chunks(tree: TarSource) -> Iterator[bytes]:
    with _tar_errors(str(tree.root)):
        yield from tree.chunks()


class _guest_writer:
    """``async with _guest_writer(relay, command, part) as process``: run ``command`` in the
    guest; on any way out but success, kill it, wait for it and remove ``part``."""

    def __init__(self, relay: Relay, command: str, part: str) -> None:
        self._relay = relay
        self._command = command
        self._part = part
        self._process: GuestProcess | None = None

    async def __aenter__(self) -> GuestProcess:
        self._process = await self._relay.open_process(self._command, timeout=math.inf)
        return self._process

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            if self._process is not None:
                await self._process.aclose()
            return
        await _remove_in_guest(self._relay, self._process, self._part)


async def _remove_in_guest(relay: Relay, process: GuestProcess | None, part: str) -> None:
    """Kill ``process`` (if it runs), wait for its exit, then ``rm -rf part``: shielded,
    within :data:`CLEANUP_TIMEOUT`; failures are logged (the relay may be gone)."""
    with trio.CancelScope(shield=True) as scope:
        scope.relative_deadline = CLEANUP_TIMEOUT
        try:
            if process is not None:
                await process.aclose()
                await process.wait()
            remover = await relay.open_process(f"rm -rf -- {shlex.quote(part)}")
            await remover.send_eof()
            await remover.wait()
            await remover.aclose()
        except Exception as exc:
            log.info("%s: could not remove %s in the guest: %r", relay.name, part, exc)
    if scope.cancelled_caught:
        log.warning("%s: removing %s in the guest took over %s s", relay.name, part,
                    CLEANUP_TIMEOUT)  # fmt: skip


# --- from the guest ----------------------------------------------------------------------


async def _receive(
    relay: Relay, source: str, target: Path | None, progress: Progress | None, verify: bool
) -> bytes | None:
    q = shlex.quote(source)
    hash_alongside = 'sha256sum < "$f" >&2 &\n' if verify else ""
    command = (
        f"f={q}\n"
        'if [ -d "$f" ]; then printf "D\\n"; cd "$f" && exec tar -cf - .; fi\n'
        'if [ ! -e "$f" ]; then echo "no such file or directory" >&2; exit 2; fi\n'
        'if [ ! -f "$f" ]; then echo "not a regular file or directory" >&2; exit 22; fi\n'
        "printf 'F %s\\n' \"$(stat -L -c '%s %a' \"$f\")\" || exit 1\n"
        + hash_alongside
        + 'exec cat "$f"'
    )
    process = await relay.open_process(command, timeout=math.inf)
    try:
        head, rest = await _header_line(process, source)
        if head == b"D":
            if target is None:
                raise CopyError(
                    f"{source}: is a directory: give dst= a host path to copy it to",
                    path=source,
                )
            await _receive_tree(relay, process, rest, source, target, progress, verify)
            return None
        kind, size_text, mode_text = [*head.split(), b"", b""][:3]
        if kind != b"F" or not size_text.isdigit():
            raise CopyError(f"{source}: unexpected answer from the guest: {head[:80]!r}")
        size, mode = int(size_text), int(mode_text or b"644", 8)
        if target is None:
            data = bytearray()
            digest, got = await _receive_into(process, rest, data.extend, size, progress)
            await _check_file(process, source, size, got, digest, verify)
            return bytes(data)
        with _host_part(target) as part:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                digest, got = await _receive_into(
                    process, rest, lambda b: _write_all(fd, b), size, progress
                )
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            await _check_file(process, source, size, got, digest, verify)
            os.replace(part, target)
        return None
    finally:
        await process.aclose()


async def _receive_tree(
    relay: Relay,
    process: GuestProcess,
    first: bytes,
    source: str,
    target: Path,
    progress: Progress | None,
    verify: bool,
) -> None:
    if _lexists(target):
        raise CopyError(
            f"{target}: already exists (a directory is copied to a new path)", path=str(target)
        )
    with _host_part(target, directory=True) as part:
        sink = TarSink(part)
        try:
            with _tar_errors(str(target)):
                await _receive_into(process, first, sink.feed, None, progress)
                await _check_exit(process, source)
                sink.finish()
        finally:
            sink.close()
        listing = await _run(relay, f"cd {shlex.quote(source)} && {_listing(verify)}", source)
        _compare(sink.manifest, listing, verify, source)
        if _lexists(target):
            raise CopyError(f"{target}: appeared while copying", path=str(target))
        os.rename(part, target)


async def _header_line(process: GuestProcess, source: str) -> tuple[bytes, bytes]:
    """The first line the guest command prints (the kind of ``source``), and what came after
    it in the same piece."""
    buffered = b""
    while b"\n" not in buffered[:4096]:
        if len(buffered) > 4096:
            raise CopyError(f"{source}: unexpected answer from the guest: {buffered[:80]!r}")
        chunk = await process.receive_some()
        if not chunk:
            await _check_exit(process, source)
            raise CopyError(f"{source}: the guest sent nothing", path=source)
        buffered += chunk
    head, _, rest = buffered.partition(b"\n")
    return head, rest


async def _receive_into(
    process: GuestProcess,
    first: bytes,
    sink: Callable[[bytes], object],
    total: int | None,
    progress: Progress | None,
) -> tuple[str, int]:
    """Pass everything the command prints to ``sink``; return its SHA-256 and size."""
    digest = hashlib.sha256()
    got = 0
    chunk = first
    while True:
        if chunk:
            digest.update(chunk)
            sink(chunk)
            got += len(chunk)
            if progress is not None:
                progress(got, total)
        chunk = await process.receive_some()
        if not chunk:
            return digest.hexdigest(), got


async def _check_file(
    process: GuestProcess, source: str, size: int, got: int, digest: str, verify: bool
) -> None:
    await _check_exit(process, source)
    if got != size:
        raise CopyError(f"{source}: {got} bytes arrived of {size} (did it change?)", path=source)
    if verify:
        guest = process.stderr.split(b" ", 1)[0].decode(errors="replace")
        if guest != digest:
            raise CopyError(
                f"{source}: its SHA-256 in the guest ({guest or 'none'}) differs from what "
                f"arrived ({digest})",
                path=source,
            )


@contextmanager
def _host_part(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target``, removed unless it was renamed away."""
    part = target.with_name(f".{target.name}.trio-part-{secrets.token_hex(4)}")
    try:
        if directory:
            part.mkdir()
        yield part
    except FileNotFoundError as exc:
        if exc.filename in (str(part), part):
            raise CopyError(f"{target.parent}: no such directory", path=str(target)) from exc
        raise
    finally:
        if os.path.lexists(part):
            if directory:
                shutil.rmtree(part, ignore_errors=True)
            else:
                part.unlink(missing_ok=True)


# --- shared ------------------------------------------------------------------------------

#: sh: fail unless the parent directory of "$f" exists.
_PARENT_CHECK: Final = (
    'd=${f%/*}; if [ ! -d "${d:-/}" ]; then echo "no such directory: ${d:-/}" >&2; exit 2; fi'
)
#: sh: fail if "$f" exists and is not a regular file (a directory, a device...).
_FILE_CHECK: Final = (
    'if [ -d "$f" ]; then echo "is a directory" >&2; exit 21; fi\n'
    'if [ -e "$f" ] && [ ! -f "$f" ]; then echo "exists, not a regular file" >&2; exit 22; fi'
)
#: sh: fail if "$f" exists (a directory is copied to a new path).
_ABSENT_CHECK: Final = (
    'if [ -e "$f" ] || [ -L "$f" ]; then '
    'echo "already exists (a directory is copied to a new path)" >&2; exit 17; fi'
)


def _listing(verify: bool) -> str:
    """sh: list the regular files under the current directory with their SHA-256 (or
    size)."""
    if verify:
        return "find . -type f -exec sha256sum {} +"
    return "find . -type f -exec stat -c '%s  %n' {} +"


def _compare(manifest: Manifest, listing: bytes, verify: bool, path: str) -> None:
    """Raise CopyError unless ``listing`` (the guest's) names the same files, with the same
    SHA-256 (or sizes), as ``manifest``."""
    guest: dict[str, str] = {}
    for line in listing.splitlines():
        value, _, name = line.partition(b"  ")
        guest[name.decode(errors="surrogateescape").removeprefix("./")] = value.decode()
    ours = {name: (digest if verify else str(size)) for name, (size, digest) in manifest.items()}
    if guest == ours:
        return
    missing = sorted(set(ours) - set(guest))
    extra = sorted(set(guest) - set(ours))
    differ = sorted(name for name in set(ours) & set(guest) if ours[name] != guest[name])
    details = "; ".join(
        f"{label}: {', '.join(names[:5])}"
        for label, names in (("missing", missing), ("unexpected", extra), ("differ", differ))
        if names
    )
    raise CopyError(f"{path}: the copy does not match the guest's files ({details})", path=path)


async def _run(relay: Relay, command: str, path: str) -> bytes:
    """Run ``command`` in the guest; its stdout; CopyError with its stderr if it fails."""
    process = await relay.open_process(command, timeout=math.inf)
    async with process:
        await process.send_eof()
        output = bytearray()
        while chunk := await process.receive_some():
            output += chunk
        await _check_exit(process, path)
    return bytes(output)


async def _check_exit(process: GuestProcess, path: str) -> None:
    status = await process.wait()
    if status != 0:
        why = process.stderr.decode(errors="replace").strip() or f"exit status {status}"
        raise CopyError(f"{path}: {why}", path=path)


def _guest_path(path: str) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"guest_path must be a non-empty str without NUL, not {path!r}")
    normal = posixpath.normpath(posixpath.join("/", path))
    if normal == "/" or path.endswith("/"):
        raise ValueError(f"guest_path must name a file or directory to write, not {path!r}")
    return normal


def _part_name(target: str) -> str:
    head, tail = posixpath.split(target)
    return posixpath.join(head, f".{tail}.trio-part-{secrets.token_hex(4)}")


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _host_stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CopyError(f"{path}: no such file or directory", path=str(path)) from None
    except OSError as exc:
        raise CopyError(f"{path}: {exc.strerror or exc}", path=str(path)) from exc


def _describe(src: object) -> str:
    if isinstance(src, bytes | bytearray | memoryview):
        return f"{memoryview(src).nbytes} bytes"
    if isinstance(src, str | os.PathLike):
        return repr(os.fspath(src))
    return "an async iterable"


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    """A host file in pieces of 256 KiB (plain reads: local files, no threads)."""
    with open(path, "rb") as file:  # noqa: ASYNC230 - small reads of a local file
        while chunk := file.read(CHUNK):
            yield chunk


async def _slices(view: memoryview) -> AsyncIterator[bytes]:
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK].tobytes()


async def _checked(source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError(f"the async iterable gave {chunk!r}, not bytes")
        yield bytes(chunk)


# Local file work is synchronous (small, quick operations on local files; no threads).


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _is_dir(path: Path) -> bool:
    """A directory, not a symlink to one."""
    return stat.S_ISDIR(os.lstat(path).st_mode) if os.path.lexists(path) else False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
