"""Classic libpcap capture files: a bounded, synchronous writer and a small reader.

The switch of :mod:`trio_qemu.network` (:meth:`Switch.start_capture
<trio_qemu.network.Switch.start_capture>`) records the frames it receives here, in the classic
format every tool reads (tcpdump, tshark, Wireshark): a 24-byte global header (magic
``0xa1b2c3d4``, version 2.4, link type 1 = Ethernet) followed by one 16-byte record header
(seconds, microseconds, captured length, original length) and the frame bytes per packet.

Writing is synchronous on purpose: one ``writev`` per frame, straight to the file with no
buffer in this process, so the file is complete and readable at every moment (while the
scenario still runs, or after a crash) and memory use does not depend on the traffic. A
write costs a few microseconds on a local file system, well below a TCG guest's frame rate.
The file's size is bounded by ``max_bytes``: once a record would pass it, frames are only
counted as not captured.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._util import ClosesOnExit

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SNAPLEN",
    "LINKTYPE_ETHERNET",
    "PCAP_MAGIC",
    "PcapRecord",
    "PcapWriter",
    "read_pcap",
]

log = logging.getLogger("trio_qemu.network")

PCAP_MAGIC: Final = 0xA1B2C3D4
"""The classic pcap magic number (microsecond timestamps)."""
_PCAP_MAGIC_NS: Final = 0xA1B23C4D
"""The variant with nanosecond timestamps (read, never written)."""
LINKTYPE_ETHERNET: Final = 1
"""The link type of Ethernet frames (``LINKTYPE_ETHERNET``/``DLT_EN10MB``)."""
DEFAULT_SNAPLEN: Final = 65535
"""Bytes of each frame kept by default (the whole frame for any MTU up to 64 KiB)."""
DEFAULT_MAX_BYTES: Final = 64 << 20
"""Default bound on a capture file's size: 64 MiB."""

_GLOBAL: Final = struct.Struct("<IHHiIII")
_RECORD: Final = struct.Struct("<IIII")


@dataclass(frozen=True)
class PcapRecord:
    """One packet read back from a capture file."""

    timestamp: float
    """Seconds since the epoch when the frame was captured."""
    data: bytes
    """The captured bytes (at most the file's snap length)."""
    original_length: int
    """The frame's length on the wire (more than ``len(data)`` if it was cut)."""


class PcapWriter(ClosesOnExit):
    """Append Ethernet frames to a classic pcap file, one ``writev`` per frame.

    The file is created (truncated) and its global header written at construction.
    ``snaplen`` is how many bytes of each frame are kept; ``max_bytes`` bounds the file's
    size (header included): a frame whose record would pass it is not written and is counted
    in :attr:`not_captured`. A write error (disk full, ...) is logged once, closes the file
    and ends the capture; later frames are counted in :attr:`not_captured` too, so a broken
    capture never stops the traffic it records. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        max_bytes: int = DEFAULT_MAX_BYTES,
        linktype: int = LINKTYPE_ETHERNET,
    ) -> None:
        if snaplen <= 0:
            raise ValueError(f"snaplen must be positive, not {snaplen!r}")
        if max_bytes < _GLOBAL.size:
            raise ValueError(f"max_bytes must be at least {_GLOBAL.size}, not {max_bytes!r}")
        self.path = Path(path)
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        #: frames written to the file
        self.frames = 0
        #: frames not written: the size bound was reached, or the capture failed
        self.not_captured = 0
        #: the file's size so far
        self.size = 0
        #: why the capture stopped early, if it did
        self.error: OSError | None = None
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        header = _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)
        try:
            self._write_all([header])
        except OSError:
            self.close()
            raise
        self.size = len(header)

    @property
    def closed(self) -> bool:
        """Whether the file is closed (by :meth:`close` or after a write error)."""
        return self._fd is None

    def write(self, frame: bytes | bytearray | memoryview, timestamp_ns: int | None = None) -> bool:
        """Record ``frame`` captured at ``timestamp_ns`` (default: now, ``time.time_ns()``).

        Returns whether it was written. Never raises for a full or failing file: see the
        class docstring.
        """
        if self._fd is None:
            self.not_captured += 1
            return False
        kept = frame[: self.snaplen]
        record_size = _RECORD.size + len(kept)
        if self.size + record_size > self.max_bytes:
            self.not_captured += 1
            return False
        when = time.time_ns() if timestamp_ns is None else timestamp_ns
        seconds, nanos = divmod(when, 1_000_000_000)
        header = _RECORD.pack(seconds & 0xFFFFFFFF, nanos // 1000, len(kept), len(frame))
        try:
            self._write_all([header, kept])
        except OSError as exc:
            log.warning("pcap capture %s stopped: %s", self.path, exc)
            self.error = exc
            self.not_captured += 1
            self.close()
            return False
        self.size += record_size
        self.frames += 1
        return True

    def _write_all(self, parts: list[bytes | bytearray | memoryview]) -> None:
        assert self._fd is not None
        written = os.writev(self._fd, parts)
        total = sum(len(part) for part in parts)
        if written < total:  # a short write to a regular file is rare: finish it
            rest = b"".join(bytes(part) for part in parts)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]

    def close(self) -> None:
        """Close the file; idempotent. Everything written is already in it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PcapWriter {str(self.path)!r} {state} frames={self.frames}>"


def read_pcap(path: str | os.PathLike[str]) -> Iterator[PcapRecord]:
    """The records of a classic pcap file, in order.

    Reads either byte order and the nanosecond variant. Raises ValueError for a file that is
    not classic pcap, whose link type is not Ethernet, or that ends inside a record (a file
    still being written may end inside one: read it again later).
    """
    data = Path(path).read_bytes()
    if len(data) < _GLOBAL.size:
        raise ValueError(f"{path}: too short for a pcap header ({len(data)} bytes)")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data)
        if magic in (PCAP_MAGIC, _PCAP_MAGIC_NS):
            break
    else:
        raise ValueError(f"{path}: not a classic pcap file (magic {data[:4].hex()})")
    divisor = 1e9 if magic == _PCAP_MAGIC_NS else 1e6
    _, _, _, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", data)
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, not Ethernet ({LINKTYPE_ETHERNET})")
    record = struct.Struct(order + "IIII")
    offset = _GLOBAL.size
    while offset < len(data):
        if offset + record.size > len(data):
            raise ValueError(f"{path}: ends inside a record header at offset {offset}")
        seconds, fraction, captured, original = record.unpack_from(data, offset)
        offset += record.size
        if offset + captured > len(data):
            raise ValueError(f"{path}: ends inside a record at offset {offset}")
        yield PcapRecord(
            seconds + fraction / divisor, data[offset : offset + captured], original
        )
        offset += captured
