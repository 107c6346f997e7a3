"""Tar streams of host directories, made and unpacked piece by piece, with a manifest.

``shell.copy_to`` and ``copy_from`` move directories as tar (busybox ``tar`` in the guest).
Python's :mod:`tarfile` reads and writes whole members through blocking file objects; these
two classes instead make (:class:`TarSource`) and unpack (:class:`TarSink`) a stream a chunk
at a time, so the caller can send or receive each chunk and memory stays bounded by one
chunk whatever the file sizes. Both record a manifest, ``{relative path: (size, sha256)}``
of every regular file, which the copy compares with the guest's ``sha256sum`` of the same
files. Headers are :class:`tarfile.TarInfo`'s (GNU format, which busybox reads, long names
included). Local file I/O is synchronous (small reads and writes of local files, as
elsewhere in trio_qemu): no threads.

:class:`TarSink` writes only inside its root: absolute names, ``..`` and names that lead
through a symlink are refused; it makes regular files, directories, symlinks and hard
links, and skips other members (devices, FIFOs), counting them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["BLOCK", "Manifest", "TarError", "TarSink", "TarSource"]

log = logging.getLogger("trio_qemu.shell")

BLOCK: Final = 512
#: Bytes of file data read per chunk.
CHUNK: Final = 256 * 1024
_ENCODING: Final = ("utf-8", "surrogateescape")

#: ``{relative path: (size, sha256 hex)}`` of the regular files of a tree.
Manifest = dict[str, tuple[int, str]]


class TarError(Exception):
    """A tar stream or a tree cannot be handled; the message says why (the copy turns it
    into a :class:`~trio_qemu.CopyError`)."""


def _padding(size: int) -> int:
    return -size % BLOCK


class TarSource:
    """The tar stream of the host directory ``root`` (its contents, as ``tar -C root .``).

    Iterate :meth:`chunks`; :attr:`manifest` is complete once it is exhausted, and
    :attr:`skipped` lists what was left out (sockets, FIFOs, devices).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: Manifest = {}
        self.skipped: list[str] = []

    def chunks(self) -> Iterator[bytes]:
        """The archive, in pieces of at most :data:`CHUNK` bytes (plus a header)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            base = Path(dirpath)
            names = sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]
            rel_dir = base.relative_to(self.root).as_posix()
            yield self._header(rel_dir + "/", os.lstat(base), tarfile.DIRTYPE)
            for name in names:
                path = base / name
                rel = path.relative_to(self.root).as_posix()
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    yield self._header(rel, info, tarfile.SYMTYPE, os.readlink(path))
                elif stat.S_ISREG(info.st_mode):
                    yield from self._file(path, rel, info)
                else:
                    self.skipped.append(rel)
            # symlinks to directories are members above, never walked into
            dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
        yield b"\0" * (2 * BLOCK)

    def _header(
        self, name: str, info: os.stat_result, kind: bytes, linkname: str = "", size: int = 0
    ) -> bytes:
        member = tarfile.TarInfo(name)
        member.type = kind
        member.mode = stat.S_IMODE(info.st_mode)
        member.mtime = int(info.st_mtime)
        member.size = size
        member.linkname = linkname
        member.uname = member.gname = "root"
        return member.tobuf(tarfile.GNU_FORMAT, *_ENCODING)

    def _file(self, path: Path, rel: str, info: os.stat_result) -> Iterator[bytes]:
        size = info.st_size
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            yield self._header(rel, info, tarfile.REGTYPE, size=size)
            left = size
            while left:
                chunk = file.read(min(CHUNK, left))
                if not chunk:
                    raise TarError(f"{path} shrank while it was copied")
                digest.update(chunk)
                left -= len(chunk)
                yield chunk
        if _padding(size):
            yield b"\0" * _padding(size)
        self.manifest[rel] = (size, digest.hexdigest())


class TarSink:
    """Unpacks a tar stream into the existing directory ``root``, fed a chunk at a time.

    :meth:`feed` each chunk, then :meth:`finish` (it checks the archive ended and sets the
    directories' modes). :attr:`manifest` lists the regular files written.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: Manifest = {}
        self.skipped: list[str] = []
        self._buffer = bytearray()
        self._ended = False
        #: the member whose data is being read: (kind, name, size left, padding)
        self._member: tarfile.TarInfo | None = None
        self._left = 0
        self._pad = 0
        self._file: int | None = None
        self._digest: hashlib._Hash | None = None
        self._rel = ""
        #: a GNU long name, long link name, or PAX record in progress: its bytes
        self._meta: bytearray | None = None
        self._meta_kind = b""
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._pax: dict[str, str] = {}
        self._dir_modes: list[tuple[Path, int, int]] = []

    def close(self) -> None:
        """Close a file left open by an interrupted stream (idempotent)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def feed(self, data: bytes) -> None:
        """Unpack what ``data`` completes."""
        view = memoryview(data)
        while view:
            if self._left or self._pad:
                view = self._body(view)
                continue
            if self._ended:
                return  # what follows the end marker (padding of the record) is ignored
            need = BLOCK - len(self._buffer)
            self._buffer += view[:need]
            view = view[need:]
            if len(self._buffer) == BLOCK:
                block = bytes(self._buffer)
                self._buffer.clear()
                self._header(block)

    def finish(self) -> None:
        """Check the archive ended where it should; set the directories' modes."""
        self.close()
        if not self._ended or self._left or self._pad:
            raise TarError("the tar stream ended before its end marker")
        for path, mode, mtime in reversed(self._dir_modes):
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))

    # --- internals -----------------------------------------------------------------------

    def _body(self, view: memoryview) -> memoryview:
        if self._left:
            size = min(self._left, len(view))
            take, view = view[:size], view[size:]
            self._left -= size
            if self._meta is not None:
                self._meta += take
            elif self._file is not None:
                assert self._digest is not None
                self._digest.update(take)
                while take:
                    take = take[os.write(self._file, take) :]
        else:
            skip = min(self._pad, len(view))
            self._pad -= skip
            view = view[skip:]
        if not self._left and not self._pad:
            self._member_done()
        return view

    def _header(self, block: bytes) -> None:
        if block == b"\0" * BLOCK:
            self._ended = True
            return
        try:
            member = tarfile.TarInfo.frombuf(block, *_ENCODING)
        except tarfile.HeaderError as exc:
            raise TarError(f"a bad tar header: {exc}") from exc
        kind = member.type
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE):  # fmt: skip
            if member.size > 1 << 20:
                raise TarError(f"a tar extension header of {member.size} bytes")
            self._meta = bytearray()
            self._meta_kind = kind
            self._start(member, member.size)
            return
        if self._long_name is not None:
            member.name = self._long_name
        if self._long_link is not None:
            member.linkname = self._long_link
        if "path" in self._pax:
            member.name = self._pax["path"]
        if "linkpath" in self._pax:
            member.linkname = self._pax["linkpath"]
        if "size" in self._pax:
            member.size = int(self._pax["size"])
        self._long_name = self._long_link = None
        self._pax = {}
        self._member_start(member)

    def _start(self, member: tarfile.TarInfo, size: int) -> None:
        self._member = member
        self._left = size
        self._pad = _padding(size)
        if not size:
            self._member_done()

    def _member_start(self, member: tarfile.TarInfo) -> None:
        rel = _relative(member.name)
        if rel is None:  # the root itself ("./"): its mode and time
            if member.isdir():
                self._dir_modes.append((self.root, member.mode & 0o7777, int(member.mtime)))
            self._start(member, member.size if member.isreg() else 0)
            return
        path = self._inside(rel)
        self._rel = rel
        if member.isreg():
            self._file = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            self._digest = hashlib.sha256()
        elif member.isdir():
            path.mkdir(exist_ok=True)
            self._dir_modes.append((path, member.mode & 0o7777, int(member.mtime)))
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = _relative(member.linkname)
            if target is None:
                raise TarError(f"a hard link to the root: {member.name!r}")
            os.link(self._inside(target), path, follow_symlinks=False)
            if target in self.manifest:
                self.manifest[rel] = self.manifest[target]
        else:
            self.skipped.append(rel)
        self._start(member, member.size if member.isreg() else 0)

    def _member_done(self) -> None:
        member, self._member = self._member, None
        if member is None:
            return
        if self._meta is not None:
            text = bytes(self._meta)
            self._meta = None
            if self._meta_kind == tarfile.GNUTYPE_LONGNAME:
                self._long_name = text.rstrip(b"\0").decode(*_ENCODING)
            elif self._meta_kind == tarfile.GNUTYPE_LONGLINK:
                self._long_link = text.rstrip(b"\0").decode(*_ENCODING)
            elif self._meta_kind == tarfile.XHDTYPE:
                self._pax = _pax_records(text)
            return
        if self._file is not None:
            assert self._digest is not None
            os.fchmod(self._file, member.mode & 0o7777)
            os.utime(self._file, (int(member.mtime), int(member.mtime)))
            self.close()
            self.manifest[self._rel] = (member.size, self._digest.hexdigest())
            self._digest = None

    def _inside(self, rel: str) -> Path:
        """``root/rel``, refusing a path through a symlink (its parent must be a real
        directory inside the root)."""
        path = self.root / rel
        parent = path.parent
        if os.path.realpath(parent) != os.path.join(
            os.path.realpath(self.root), *(Path(rel).parent.parts)
        ):
            raise TarError(f"refusing {rel!r}: it leads through a symlink")
        return path


def _relative(name: str) -> str | None:
    """A member name as a path relative to the root (None: the root itself); refuses
    absolute names and ``..``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise TarError(f"refusing the tar member {name!r}: it points outside the directory")
    return "/".join(parts) or None


def _pax_records(text: bytes) -> dict[str, str]:
    """The ``key=value`` records of a PAX extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        space = text.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(text[pos:space])
        except ValueError:
            break
        record = text[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode(*_ENCODING)] = value.decode(*_ENCODING)
        pos += length
    return records
