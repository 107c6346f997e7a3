"""The relay channel's wire format, host side: frames, the handshake, credits (no I/O).

The relay multiplexes any number of byte streams over one virtio-serial port
(``org.trio-qemu.relay``, a socketpair chardev like the shell's). Its guest end is a small C
program, ``trio_qemu/guest/files/trio-relay.c`` (``/bin/trio-relay`` in the tiny guest,
started and respawned by init); its host end is :class:`~trio_qemu.relay.Relay`. Both ends
are described here, and nowhere else.

Frames
------

Everything on the channel is a frame: a 12-byte header and a payload::

    type: u8   0: u8 0: u8 0: u8   id: u32 (big endian)   length: u32 (big endian)   payload

``length`` is at most :data:`MAX_PAYLOAD`. A stream is named by its ``id``, chosen by the
host (never reused on one machine); id 0 is the channel itself. ::

    host -> guest
      Q 0 "trio-relay again"              start over: the relay drops every stream and says
                                          hello again (sent when the host starts)
      S 0 "trio-relay synch" <nonce:8> <window:u32>
                                          the answer to hello <nonce>: frames follow; the
                                          guest may send each stream <window> bytes to start
      T id <port:u16> <address>           connect to <address>:<port> (a numeric IPv4 or
                                          IPv6 address, or "localhost") in the guest
      X id <command>                      run /bin/sh -c <command> in a session of its own,
                                          in /, its stdin and stdout being the stream
      D id <bytes>                        data for the socket or the command's stdin
      E id                                end of data: shut the socket's write side (or
                                          close the command's stdin) once all is written
      W id <n:u32>                        credit: the host may be sent n more bytes
      C id                                the host is done: close the socket (kill the
                                          command's process group)
    guest -> host
      H 0 "trio-relay hello" <version:u32> <pid:u32> <nonce:8> <window:u32>
                                          a relay started (or started over); the host may
                                          send each stream <window> bytes to start
      O id                                the connection is made (the command started)
      F id <errno:u32> <text>             it could not be (ECONNREFUSED: nobody listens)
      D id <bytes>                        data from the socket or the command's stdout
      E id                                end of that data
      W id <n:u32>                        credit: the guest may be sent n more bytes
      R id <errno:u32> <text>             the socket broke in the guest (a reset): the
                                          stream is gone there
      Z id <status:u32> <stderr>          the command exited (status 128+N: killed by signal
                                          N) and its stdout and stderr ended; the first
                                          4 KiB of its stderr; the stream is gone there

Flow control
------------

Each end may send a stream only as many bytes as the other has granted it. The first grant
is the receiver's window, said in the handshake: the relay's in its hello (1 MiB, the buffer
it keeps per stream), the host's in its sync (:data:`WINDOW`, what a stream buffers for its
reader); the host may use less than the relay's. The sender has it when the stream opens
(the host on ``O``) and gets the bytes back in ``W`` frames as the receiver hands them on (to
the socket or the command in the guest, every 64 KiB and whenever its buffer empties; to the
stream's reader on the host, every quarter window). So each end holds at most its window
per stream in each direction, and one slow stream never holds up the others: the channel
is read all the time, and a frame never waits for a stream's reader.

The handshake
-------------

The channel outlives any one relay: init starts a new one if it dies, a clone's relay was
started by its template's host, and bytes meant for a dead relay may still sit in QEMU or
the socket. So a relay, when it starts (or is asked to start over by ``Q``, or reads
something that is not a frame), picks a random nonce, sends ``H`` with it and skips
everything it reads up to ``S`` with that nonce; a ``Q`` read meanwhile makes it repeat that
hello, same nonce. The host answers every new hello with its sync, first thing after
whatever frame it was writing; frames for streams of an earlier relay are dropped first,
and those streams fail. A repeated hello changes nothing. The host sends ``Q`` when it
starts, for a relay that said hello to somebody else (a clone's: it starts over), and after
the guest closed the port (for a relay whose hello may have come first).

The host, likewise, skips what it reads until a hello (:class:`FrameReader`): when it
starts, when the guest closed the port (QEMU's ``VSERPORT_CHANGE``: the relay died,
perhaps in the middle of a frame), and after anything that is not a frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEADER",
    "HELLO_PREFIX",
    "MAX_PAYLOAD",
    "VERSION",
    "WINDOW",
    "Frame",
    "FrameReader",
    "Hello",
    "again_frame",
    "encode",
    "errno_payload",
    "exit_payload",
    "open_tcp_payload",
    "parse_hello",
    "sync_frame",
]

#: The protocol's version, in the hello.
VERSION: Final = 1
#: Bytes in a frame header.
HEADER: Final = 12
#: The largest payload of one frame.
MAX_PAYLOAD: Final = 65536
#: What a stream buffers on the host for its reader: the guest may send it that much before
#: it is granted more (said in the sync).
WINDOW: Final = 256 * 1024

_HEADER = struct.Struct(">B3xII")
_HELLO_MAGIC: Final = b"trio-relay hello"
_SYNC_MAGIC: Final = b"trio-relay synch"
_AGAIN_MAGIC: Final = b"trio-relay again"
_HELLO_LENGTH: Final = 36
_U32 = struct.Struct(">I")

#: Frame types (one ASCII letter each, so a dump of the channel reads easily).
AGAIN, SYNC, OPEN_TCP, OPEN_EXEC, DATA, EOF, CREDIT, CLOSE = b"QSTXDEWC"
HELLO, OPENED, FAILED, RESET, EXITED = b"HOFRZ"
_GUEST_TYPES: Final = frozenset({HELLO, OPENED, FAILED, DATA, EOF, CREDIT, RESET, EXITED})

HELLO_PREFIX: Final = _HEADER.pack(HELLO, 0, _HELLO_LENGTH) + _HELLO_MAGIC
"""The first bytes of every hello: what :class:`FrameReader` looks for while it skips."""


def encode(type: int, sid: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame: the header, then ``payload`` (at most :data:`MAX_PAYLOAD` bytes)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame's payload is at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    return _HEADER.pack(type, sid, len(payload)) + payload


def again_frame() -> bytes:
    """``Q``: ask the relay to start over (drop its streams, say hello again)."""
    return encode(AGAIN, 0, _AGAIN_MAGIC)


def sync_frame(nonce: bytes, window: int) -> bytes:
    """``S``: the answer to the hello that carried ``nonce``; the guest may send each stream
    ``window`` bytes before it is granted more."""
    return encode(SYNC, 0, _SYNC_MAGIC + nonce + _U32.pack(window))


def credit_payload(n: int) -> bytes:
    """A ``W`` frame's payload: ``n`` more bytes may be sent."""
    return _U32.pack(n)


def open_tcp_payload(host: str, port: int) -> bytes:
    """A ``T`` frame's payload: the port, then the address as ASCII."""
    return struct.pack(">H", port) + host.encode("ascii")


def errno_payload(payload: bytes) -> tuple[int, str]:
    """The errno and text of an ``F`` or ``R`` frame."""
    if len(payload) < 4:
        return 0, payload.decode("utf-8", "replace")
    return _U32.unpack_from(payload)[0], payload[4:].decode("utf-8", "replace")


def exit_payload(payload: bytes) -> tuple[int, bytes]:
    """The exit status and stderr of a ``Z`` frame."""
    if len(payload) < 4:
        return -1, b""
    return _U32.unpack_from(payload)[0], bytes(payload[4:])


def credit_value(payload: bytes) -> int:
    """The credit of a ``W`` frame (0 for a malformed one)."""
    return _U32.unpack(payload)[0] if len(payload) == 4 else 0


@dataclass(frozen=True)
class Frame:
    """One frame read from the guest."""

    type: int
    """Its type (one of the guest's letters, as an int)."""
    sid: int
    """The stream it is about (0: the channel)."""
    payload: bytes
    """Its payload."""


@dataclass(frozen=True)
class Hello:
    """What a relay's hello says about it."""

    version: int
    """The protocol version it speaks."""
    pid: int
    """Its process id in the guest."""
    nonce: bytes
    """The nonce its sync must carry."""
    window: int
    """How much the host may send a stream before it is granted more."""


def parse_hello(payload: bytes) -> Hello:
    """The fields of a hello's payload (its magic checked by the reader)."""
    version, pid = struct.unpack_from(">II", payload, 16)
    (window,) = _U32.unpack_from(payload, 32)
    return Hello(version, pid, bytes(payload[24:32]), window)


class FrameReader:
    """Turns the bytes read from the channel into frames.

    It starts skipping: everything up to a hello (:data:`HELLO_PREFIX`) is dropped. So does
    it after :meth:`skip` (the relay died: what its last frame lacks never comes) and after
    anything that is not a frame from the guest (an unknown type, a bad header): the next
    relay's hello is found all the same. :attr:`skipped` counts the bytes dropped.
    """

    __slots__ = ("_buffer", "skipped", "skipping")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: whether bytes are being dropped until a hello
        self.skipping = True
        #: how many bytes were dropped
        self.skipped = 0

    def skip(self) -> None:
        """Drop what is buffered, and everything up to the next hello."""
        self.skipped += len(self._buffer)
        self._buffer.clear()
        self.skipping = True

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Add ``data``; yield every whole frame it completes, in order.

        A caller that stops iterating early (or calls :meth:`skip` meanwhile) loses
        nothing it has not seen: unyielded bytes stay buffered.
        """
        buffer = self._buffer
        buffer += data
        pos = 0
        try:
            while True:
                if self.skipping:
                    start = buffer.find(HELLO_PREFIX, pos)
                    if start < 0:
                        keep = max(pos, len(buffer) - len(HELLO_PREFIX) + 1)
                        self.skipped += keep - pos
                        pos = keep
                        return
                    self.skipped += start - pos
                    pos = start
                    self.skipping = False
                if len(buffer) - pos < HEADER:
                    return
                type_, sid, length = _HEADER.unpack_from(buffer, pos)
                if (
                    type_ not in _GUEST_TYPES
                    or length > MAX_PAYLOAD
                    or buffer[pos + 1 : pos + 4] != b"\0\0\0"
                    or (type_ == HELLO and length != _HELLO_LENGTH)
                ):
                    self.skipping = True
                    self.skipped += 1
                    pos += 1
                    continue
                end = pos + HEADER + length
                if len(buffer) < end:
                    return
                payload = bytes(buffer[pos + HEADER : end])
                pos = end
                if type_ == HELLO and not payload.startswith(_HELLO_MAGIC):
                    self.skipping = True
                    continue
                yield Frame(type_, sid, payload)
                if self.skipping:  # skip() was called while the frame was handled
                    return
        finally:
            if self._buffer is buffer:
                del buffer[:pos]
