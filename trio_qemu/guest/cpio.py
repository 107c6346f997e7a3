"""A minimal writer for the cpio "newc" format, the format Linux unpacks as an initramfs.

These machines have no ``cpio`` package, and the tiny guest's initramfs needs only
directories, regular files, symlinks and a character device or two, so a few dozen lines of
Python replace the host tool. The archive is uncompressed on purpose: QEMU's PVH boot path
hands it to the kernel as is, and an uncompressed initramfs boots measurably faster under TCG
than a gzip one (no decompression in the guest).

Every header field is an 8-digit hex number; the name (with its NUL) and the data are each
padded to a multiple of 4 bytes; the archive ends with the ``TRAILER!!!`` entry. Timestamps
default to 0 and inode numbers count up from 1, so the same input gives the same bytes.
"""

from __future__ import annotations

import stat
from typing import BinaryIO, Final

__all__ = ["CpioWriter"]

_MAGIC: Final = b"070701"
_TRAILER: Final = "TRAILER!!!"


class CpioWriter:
    """Write a newc cpio archive to a binary file object, entry by entry.

    Names are stored as given, without a leading ``/`` (``"bin/busybox"``); parent
    directories are not created implicitly, so add them first (the kernel's unpacker needs
    a directory before its entries). Call :meth:`close` (or use ``with``) to write the
    trailer; the file object itself stays open and belongs to the caller.
    """

    def __init__(self, file: BinaryIO, *, mtime: int = 0) -> None:
        self._file = file
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False
        #: bytes written so far (the archive size once closed)
        self.size = 0

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()

    def directory(self, name: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        """Add a directory ``name`` with permission bits ``mode``."""
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2, uid=uid, gid=gid)

    def file(
        self, name: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        """Add a regular file ``name`` holding ``data``."""
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data, uid=uid, gid=gid)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name`` pointing at ``target`` (stored as the link's data)."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, *, mode: int = 0o600) -> None:
        """Add a character device node (e.g. ``dev/console``, 5:1).

        No privilege is needed to *write* one: the guest kernel creates it when unpacking.
        """
        self._entry(name, stat.S_IFCHR | (mode & 0o7777), b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the ``TRAILER!!!`` entry; idempotent. Nothing may be added afterwards."""
        if not self._closed:
            self._header(_TRAILER, ino=0, mode=0, nlink=1, size=0)
            self._closed = True

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        uid: int = 0,
        gid: int = 0,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        if self._closed:
            raise ValueError("the cpio archive is closed already")
        name = name.lstrip("/")
        if not name or name == _TRAILER or "\0" in name:
            raise ValueError(f"invalid cpio entry name {name!r}")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        self._ino += 1
        self._header(
            name, ino=self._ino, mode=mode, nlink=nlink, size=len(data), uid=uid, gid=gid,
            rdev=rdev,
        )  # fmt: skip
        self._write(data)
        self._pad()

    def _header(
        self,
        name: str,
        *,
        ino: int,
        mode: int,
        nlink: int,
        size: int,
        uid: int = 0,
        gid: int = 0,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            ino, mode, uid, gid, nlink, self._mtime, size,
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        for value in fields:
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"cpio header field out of range for {name!r}: {value}")
        self._write(_MAGIC + b"".join(b"%08X" % value for value in fields) + encoded)
        self._pad()

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def _pad(self) -> None:
        if self.size % 4:
            self._write(b"\0" * (4 - self.size % 4))
