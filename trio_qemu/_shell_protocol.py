"""The guest shell agent's line protocol, host side: framing, decoding, requests, ids, pings.

This module holds the wire format of :class:`~trio_qemu.Shell` (``_shell.py``) as pure code:
bytes in, bytes or values out, no Trio and no I/O. The shell keeps what needs its own state
and the clock (the channel, the lock, timeouts, kills, a gone agent); this module only says
what the bytes mean, so it can be read, and changed, apart from the shell's timing. The
protocol is described here, both ends of it, and nowhere else; the guest end is the shell
agent, ``trio_qemu/guest/files/trio-shell-agent.sh`` (``SHELL_AGENT_SCRIPT`` in ``_shell.py``).

The protocol is line based; every request and reply carries an id, and anything that does
not parse is ignored, so junk or a request cut short cannot derail it::

    host -> guest
      P <id> <id>                                   ping
      R <id> <max> <stdin-len> <command> <id>       run; then <stdin-len> bytes of base64
                                                    stdin and a newline, when stdin-len > 0
      K <id> <id>                                   kill the process group of run <id>
    guest -> host
      #R <pid>                                      the agent (re)started
      #P <id>                                       pong
      #B <id> <rc> <out-len> <err-len>              a result: base64 lines of stdout,
      #M <id>                                       then this, base64 lines of stderr,
      #E <id> <rc>                                  then this
      #X <id> <rc> <out-len> <err-len>              a result larger than <max>, not sent

Lines the guest sends start with ``#``, which base64 never contains. The command travels on
the request line with every byte outside ``A-Za-z0-9_./,:=+@-`` written as ``\\0ooo``
(octal), the escapes of ``printf %b``, a shell built-in (an empty command as ``-``): no byte
of it can break the framing, and the guest writes it to a file without starting a process
(a ``base64 -d`` cost ~10 ms of a ~40 ms run under TCG). The request line ends with its id
again, so a line cut short is never run. Ids
are made of ``0-9``, ``a-z`` and ``-`` (the agent ignores any other). Each request is sent
after a newline, which ends whatever line a request cut short may have left. The guest runs
each command in the background in a session of its own (``setsid sh -c ...``, which sources
the command's file) with stdout and
stderr in files, records its pid, and queues its result when it exits; a single writer sends
the queued results and pongs one whole reply at a time, so replies never interleave. A kill
request marks the run killed and kills its whole process group; the command looks at that
mark once it leads its session, so a kill that comes before the process group exists is not
lost.

The host's reader looks for control lines only (:class:`Framer`): a ``#`` starts one, and
the text between them, a result's base64, is decoded as it comes into one buffer per stream
(:class:`Reply`), so a line a dying writer left unfinished never swallows the next agent's
first line.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import logging
import re
import secrets
from collections.abc import Callable
from typing import Final

from ._errors import ShellError
from ._util import LineSplitter

__all__ = [
    "KILLED",
    "MAX_LINE",
    "MAX_PINGS",
    "Decoder",
    "Framer",
    "Pings",
    "Reply",
    "RequestIds",
    "ResultReader",
    "decode_command",
    "encode_run",
    "kill_request",
    "ping_request",
    "result_header",
    "run_request",
]

log = logging.getLogger("trio_qemu.shell")

#: The longest control line (``#...``) kept; a longer one is skipped (ours are < 100 bytes).
MAX_LINE: Final = 65536
#: Unanswered pings remembered (an answer to an older one is not recognised).
MAX_PINGS: Final = 64
#: The exit status the guest reports for a command killed by SIGKILL (128 + 9).
KILLED: Final = 137


# --- requests ---------------------------------------------------------------------------------


class RequestIds:
    """The ids of one shell's requests and pings: ``<token>-<n>``.

    The token is 6 random hex digits, chosen once per instance; ``n`` counts from 1. Both
    keep to the characters the agent accepts in an id.
    """

    __slots__ = ("_count", "_token")

    def __init__(self) -> None:
        self._token = secrets.token_hex(3)
        self._count = itertools.count(1)

    def new(self) -> bytes:
        """A new id.

        Returns:
            The id, never returned before by this instance.
        """
        return f"{self._token}-{next(self._count)}".encode()


class Pings:
    """Pings sent and not answered yet, each with a number the caller gives (an epoch).

    At most :data:`MAX_PINGS` are remembered: adding one more forgets the oldest, whose
    answer is then not recognised. ``rid in pings`` says whether ``rid`` is still unanswered.
    """

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent: dict[bytes, int] = {}

    def add(self, rid: bytes, epoch: int) -> None:
        """Remember a ping just made.

        Args:
            rid: the ping's id.
            epoch: handed back by :meth:`answer` when its pong comes.
        """
        self._sent[rid] = epoch
        if len(self._sent) > MAX_PINGS:
            del self._sent[next(iter(self._sent))]

    def answer(self, rid: bytes) -> int | None:
        """Note the pong for ``rid``, and forget the ping.

        Args:
            rid: the id the pong carries.

        Returns:
            The epoch given to :meth:`add` for ``rid``; None if ``rid`` is no ping awaiting
            an answer (already answered, forgotten, or never sent).
        """
        return self._sent.pop(rid, None)

    def __contains__(self, rid: object) -> bool:
        return rid in self._sent


#: The bytes a command keeps as they are on the request line; any other is escaped.
_PLAIN: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./,:=+@-"
)
_ESCAPES: Final = tuple(
    bytes([byte]) if byte in _PLAIN else b"\\0%03o" % byte for byte in range(256)
)


def encode_run(command: str, stdin: bytes | None) -> tuple[bytes, bytes]:
    """The command and stdin fields of a run request.

    Args:
        command: the command line, encoded as UTF-8.
        stdin: what the command reads on stdin; None or empty for none.

    Returns:
        The command with ``printf %b`` escapes (``-`` for an empty command) and the stdin's
        base64 (empty for none), for :func:`run_request`.

    Raises:
        UnicodeEncodeError: ``command`` cannot be encoded as UTF-8 (lone surrogates).
    """
    escapes = _ESCAPES
    encoded = b"".join([escapes[byte] for byte in command.encode()]) or b"-"
    return encoded, base64.b64encode(stdin) if stdin else b""


def decode_command(field: bytes) -> bytes:
    """The command bytes of a run request's command field (what the guest's ``printf %b``
    writes); the inverse of :func:`encode_run` for the command."""
    if field == b"-":
        return b""
    return re.sub(rb"\\0([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def run_request(rid: bytes, max_output: int, command: bytes, stdin_b64: bytes) -> bytes:
    """A run request, followed by its stdin if any.

    Args:
        rid: the run's id.
        max_output: the largest stdout plus stderr the guest may send back; a larger result
            comes as ``#X``, without its output.
        command: the command field, from :func:`encode_run`.
        stdin_b64: the stdin, from :func:`encode_run`.

    Returns:
        The bytes to send.
    """
    request = b"\nR %s %d %d %s %s\n" % (rid, max_output, len(stdin_b64), command, rid)
    if stdin_b64:
        request += stdin_b64 + b"\n"
    return request


def ping_request(rid: bytes) -> bytes:
    """A ping.

    Args:
        rid: the ping's id, which its pong carries.

    Returns:
        The bytes to send.
    """
    return b"\nP %s %s\n" % (rid, rid)


def kill_request(rid: bytes, ping: bytes | None = None) -> bytes:
    """A request to kill the process group of a run, with a ping along if asked.

    Args:
        rid: the run's id.
        ping: the id of a ping to send right after the kill, or None for no ping.

    Returns:
        The bytes to send.
    """
    request = b"\nK %s %s\n" % (rid, rid)
    if ping is not None:
        request += b"P %s %s\n" % (ping, ping)
    return request


# --- replies ----------------------------------------------------------------------------------


class Framer:
    """Splits what the guest sends into control lines and the base64 text between them.

    A control line runs from a ``#`` (base64 never holds one) to its newline. The text
    before it is a result's base64, handed to the :class:`Reply` being received or dropped.
    The caller hands each chunk it receives to :meth:`feed`, and takes control lines with
    :meth:`next_control` until that returns None; then it receives the next chunk.

    Args:
        on_overlong: called with the head of a control line longer than :data:`MAX_LINE`;
            that line is then skipped to its newline.
    """

    __slots__ = ("_control", "_data", "_in_control", "_pos")

    def __init__(self, on_overlong: Callable[[bytes], None]) -> None:
        self._data = b""
        self._pos = 0
        self._in_control = False
        self._control = LineSplitter(MAX_LINE, on_overlong)

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk received (once :meth:`next_control` has used up the last).

        Args:
            chunk: the bytes received.
        """
        self._data = chunk
        self._pos = 0

    def next_control(self, sink: Reply | None = None) -> bytes | None:
        """The next control line in the chunk, without its newline.

        A line cut short (its writer died) and followed by a whole one on the same line
        is dropped: the line returned starts at its last ``#``. Everything scanned is
        consumed, so after an exception from ``sink`` the scan goes on past that text.

        Args:
            sink: the result being received, fed the base64 text scanned on the way; None
                to drop that text (junk, or the result of another run).

        Returns:
            The line, starting with ``#``; None once the chunk is used up without one
            (then :meth:`feed` the next).

        Raises:
            ShellError: from ``sink``: the text is not base64, or more than it announced.
        """
        lines = self._control.lines
        data = self._data
        while self._pos < len(data):
            pos = self._pos
            if self._in_control:
                newline = data.find(b"\n", pos)
                end = len(data) if newline < 0 else newline + 1
                self._pos = end
                self._control.feed(data[pos:end])
                if newline >= 0:
                    self._in_control = False
                    if lines:
                        line = lines.popleft()
                        start = line.rfind(b"#")
                        return line[start:] if start > 0 else line
            else:
                mark = data.find(b"#", pos)
                end = len(data) if mark < 0 else mark
                self._pos = end
                self._in_control = mark >= 0
                if sink is not None and end > pos:
                    sink.feed(data[pos:end])
        return None


class Decoder:
    """One stream of a result (stdout or stderr), decoded from base64 as it arrives.

    The bytes go straight into one buffer of the announced size, allocated once; on CPython
    ``BytesIO.getvalue`` then hands that very buffer over as the result's ``bytes`` (no copy
    while nothing else holds a view of it). Only a base64 group cut by a chunk boundary (at
    most 3 characters) is carried from one chunk to the next.

    Args:
        length: the number of bytes the guest announced.
    """

    __slots__ = ("_buffer", "_carry", "_chars", "_limit", "_padded", "length")

    def __init__(self, length: int) -> None:
        self.length = length
        self._limit = 4 * (-(-length // 3))  # base64 of n bytes: 4 * ceil(n / 3) characters
        self._chars = 0
        self._carry = b""
        self._padded = False
        self._buffer = io.BytesIO()
        if length:
            self._buffer.seek(length - 1)
            self._buffer.write(b"\0")  # the whole buffer at once: it never grows
            self._buffer.seek(0)

    def feed(self, text: bytes) -> None:
        """Decode more of the stream.

        Args:
            text: base64, with newlines anywhere.

        Raises:
            ValueError: ``text`` is not base64, or more than announced.
        """
        text = text.translate(None, b"\n")
        if not text:
            return
        self._chars += len(text)
        if self._chars > self._limit:
            raise ValueError("more output than it announced")
        if self._carry:
            text = self._carry + text
        cut = len(text) - len(text) % 4
        self._carry = text[cut:]
        if not cut:
            return
        if self._padded:
            raise ValueError("bad base64: text after the padding")
        try:
            data = binascii.a2b_base64(text[:cut] if self._carry else text, strict_mode=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64: {exc}") from None
        self._padded = text[cut - 1] == 0x3D  # "="
        self._buffer.write(data)

    def finish(self) -> bytes:
        """The whole stream.

        Returns:
            The decoded bytes (the buffer is handed over, not kept).

        Raises:
            ValueError: they are not as many as announced.
        """
        decoded = self._buffer.tell()
        if self._carry or decoded != self.length:
            cut = " and a cut base64 group" if self._carry else ""
            raise ValueError(f"{decoded} bytes{cut} where it announced {self.length}")
        data = self._buffer.getvalue()
        self._buffer = io.BytesIO()
        return data


class Reply:
    """A result being received for one id: its stdout, then (from ``#M``) its stderr.

    Args:
        rid: the run's id.
        returncode: the exit status from the ``#B`` line.
        out_len: the length of stdout from the ``#B`` line.
        err_len: the length of stderr from the ``#B`` line.
    """

    __slots__ = ("decoders", "index", "returncode", "rid")

    def __init__(self, rid: bytes, returncode: int, out_len: int, err_len: int) -> None:
        self.rid = rid
        self.returncode = returncode
        self.decoders = (Decoder(out_len), Decoder(err_len))
        #: the stream being received: 0 for stdout, 1 for stderr (set on ``#M``)
        self.index = 0

    def feed(self, text: bytes) -> None:
        """Decode more of the current stream.

        Args:
            text: base64, with newlines anywhere.

        Raises:
            ShellError: ``text`` is not base64, or more than announced.
        """
        try:
            self.decoders[self.index].feed(text)
        except ValueError as exc:
            raise ShellError(f"the guest sent {exc} for {self.rid!r}") from None

    def finish(self) -> tuple[bytes, bytes]:
        """The whole result, once its ``#E`` came.

        Returns:
            Its stdout and its stderr.

        Raises:
            ShellError: either is not as long as announced.
        """
        try:
            stdout = self.decoders[0].finish()
            stderr = self.decoders[1].finish()
        except ValueError as exc:
            raise ShellError(f"the guest sent {exc} for {self.rid!r}") from None
        return stdout, stderr


def result_header(fields: list[bytes], line: bytes) -> tuple[int, int, int]:
    """The numbers of a ``#B`` or ``#X`` line.

    Args:
        fields: the line's fields after the id: ``<rc> <out-len> <err-len>``.
        line: the whole line, for the error message.

    Returns:
        The exit status, the length of stdout and the length of stderr.

    Raises:
        ShellError: they are not three integers.
    """
    try:
        a, b, c = (int(f) for f in fields)
    except ValueError:
        raise ShellError(f"the guest sent a malformed result header {line[:80]!r}") from None
    return a, b, c


class ResultReader:
    """Reads the result of one run from the control lines that come, skipping the rest.

    The lines are those of :meth:`Framer.next_control`, which hands the base64 text between
    them to :attr:`reply`; junk, pongs and the results of other ids are skipped.

    Args:
        name: the shell's name, for messages.
        rid: the run's id.
        command: the run's command line, for messages.
        max_output: the largest stdout plus stderr accepted.
        reply: the result as far as it was received before (a wait for it was cancelled),
            to go on with; None to wait for its start.
    """

    __slots__ = ("command", "max_output", "name", "reply", "rid")

    def __init__(
        self, name: str, rid: bytes, command: str, max_output: int, reply: Reply | None
    ) -> None:
        self.name = name
        self.rid = rid
        self.command = command
        self.max_output = max_output
        #: the result being received (from its ``#B``), else None
        self.reply = reply

    def take(self, line: bytes) -> Reply | None:
        """Take the next control line.

        Args:
            line: the line, starting with ``#``.

        Returns:
            The result once its ``#E`` came (:meth:`Reply.finish` gives its output); None
            until then.

        Raises:
            ShellError: its header is malformed or announces more than ``max_output``, it
                is too large to be sent (``#X``), or the agent restarted while sending it.
        """
        fields = line[1:].split(b" ")
        verb, lid = fields[0], fields[1] if len(fields) > 1 else b""
        reply, rid = self.reply, self.rid
        if verb == b"B":
            if lid != rid:  # a late result of another run: its text is dropped
                log.debug("%s: skipping a stale result for %r", self.name, lid)
                return None
            rc, out_len, err_len = result_header(fields[2:5], line)
            if out_len + err_len > self.max_output:
                raise ShellError(
                    f"{self.name}: the guest announced more output than max_output "
                    f"allows ({out_len}+{err_len} bytes)"
                )
            self.reply = Reply(rid, rc, out_len, err_len)
        elif verb == b"M" and reply is not None and lid == rid:
            reply.index = 1
        elif verb == b"E" and reply is not None and lid == rid:
            return reply
        elif verb == b"X" and lid == rid:
            rc, out_len, err_len = result_header(fields[2:5], line)
            raise ShellError(
                f"{self.name}: {self.command!r} (exit status {rc}) wrote {out_len} bytes to "
                f"stdout and {err_len} to stderr, more than max_output={self.max_output}"
            )
        elif verb == b"R" and reply is not None:
            raise ShellError(
                f"{self.name}: the guest shell agent restarted while it sent the result "
                f"of {self.command!r}"
            )
        elif verb not in (b"R", b"P", b"M", b"E", b"X"):
            log.debug("%s: ignoring %r", self.name, line[:80])
        return None
