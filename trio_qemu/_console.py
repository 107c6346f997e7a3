"""The serial console of one VM: an always-on drain, a bounded ring buffer, expect and write.

QEMU's serial device blocks the guest as soon as its socket's buffer is full (about 278
bytes of SeaBIOS output on a socketpair), so :meth:`Console.run` reads the console from the
moment QEMU starts until teardown, whether or not anybody waits for output. Everything else
works on what it recorded:

* the last ``buffer_size`` bytes are kept in memory (:meth:`Console.output`,
  :meth:`Console.tail`); older output is dropped, but every byte goes to ``log_path`` if one
  was given;
* :meth:`Console.wait_for` searches the output that arrived after its previous match,
  woken by each new chunk (never polling), with a timeout and optional fail patterns;
* :meth:`Console.lines` (or ``async for line in console``) iterates over complete lines;
* :meth:`Console.write` and :meth:`Console.send_line` type into the console.

Offsets are absolute positions in the stream (byte ``0`` is the first byte QEMU ever sent),
so cursors stay meaningful while the ring buffer moves on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import IO, TypeAlias

import trio

from ._errors import ConsoleClosed, ConsoleFailure, ConsoleTimeout, MachineError, copy_error

__all__ = ["Console", "ConsolePattern"]

_log = logging.getLogger("trio_qemu.console")

#: What :meth:`Console.wait_for` accepts: ``bytes`` and ``str`` are literal text (``str`` is
#: encoded as UTF-8); a compiled ``bytes`` regular expression is used as it is.
ConsolePattern: TypeAlias = bytes | str | re.Pattern[bytes]

_RECEIVE_SIZE = 65536
#: Bytes of output before the search start that a regular expression can see, so that
#: ``^``, ``\b`` and short look-behinds judge the cursor position by the real preceding text.
_REGEX_CONTEXT = 256
_TAIL_SIZE = 4096



@dataclass(slots=True)
class _Search:
    """One pattern of one :meth:`Console.wait_for` call and how far it has been searched."""

    regex: re.Pattern[bytes]
    #: for a literal: ``len - 1``, the bytes before the searched end a match could still
    #: start in; ``None`` for a regex (searched again from the cursor on every wake-up)
    overlap: int | None
    shown: str
    #: no match starts before this absolute offset
    next_start: int


def _make_search(pattern: ConsolePattern, start: int) -> _Search:
    if isinstance(pattern, str):
        pattern = pattern.encode("utf-8")
    if isinstance(pattern, bytes | bytearray | memoryview):
        literal = bytes(pattern)
        if not literal:
            raise ValueError("an empty pattern would match anywhere")
        return _Search(re.compile(re.escape(literal)), len(literal) - 1, repr(literal), start)
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, bytes):
            raise TypeError(
                f"console patterns are bytes: compile the regex from bytes, not {pattern!r}"
            )
        return _Search(pattern, None, f"re.compile({pattern.pattern!r})", start)
    raise TypeError(f"a console pattern is bytes, str or a compiled bytes regex, not {pattern!r}")


class Console:
    """The serial console of one VM.

    Create it, run :meth:`run` in a nursery on the host end of the console's socket for as
    long as QEMU lives, and use the rest from any task. Memory use is bounded by about
    ``2 * buffer_size + 64 KiB``.

    The console *ends* at end of file (QEMU closed its side, usually because it exited), when
    :meth:`run` stops for any other reason (cancelled, the connection broke), or when
    :meth:`close` is called. After that, waits and line iterators still see what was recorded
    but raise instead of waiting for more.
    """

    def __init__(
        self,
        *,
        name: str = "console",
        buffer_size: int = 1 << 20,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, not {buffer_size}")
        self._name = name
        self._buffer_size = buffer_size
        self._log_path = log_path
        #: holds the stream from absolute offset ``_base`` to ``_total``; trimmed back to
        #: ``buffer_size`` bytes whenever it grows past twice that (amortised O(1) per byte)
        self._buf = bytearray()
        self._base = 0
        self._total = 0
        #: where the next :meth:`wait_for` starts searching (absolute)
        self._cursor = 0
        self._new_data = trio.lowlevel.ParkingLot()
        self._wait_lock = trio.Lock()
        self._send_lock = trio.StrictFIFOLock()
        self._stream: trio.abc.Stream | None = None
        self._started = False
        self._running = False
        self._ended = False
        self._end_reason = ""
        self._clean_eof = False
        self._close_called = False
        self._end_error: BaseException | None = None

    # --- introspection ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name used in error and log messages (usually the machine's name)."""
        return self._name

    @property
    def buffer_size(self) -> int:
        """How many of the most recent bytes :meth:`output` keeps."""
        return self._buffer_size

    @property
    def log_path(self) -> str | os.PathLike[str] | None:
        """The file every byte of output is appended to, or ``None``."""
        return self._log_path

    @property
    def total_bytes(self) -> int:
        """How many bytes the console has received since it started (retained or not)."""
        return self._total

    @property
    def held_bytes(self) -> int:
        """How many bytes of output the console holds in memory now: at most twice
        :attr:`buffer_size` (the ring buffer is trimmed back when it passes that)."""
        return len(self._buf)

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is draining the stream right now."""
        return self._running

    @property
    def ended(self) -> bool:
        """Whether the console has ended (end of file, drain stopped, or :meth:`close`)."""
        return self._ended

    def output(self) -> bytes:
        """All retained output: the last ``buffer_size`` bytes (or fewer) received."""
        return self._slice(self._retained_start, self._total)

    def tail(self, n: int = _TAIL_SIZE) -> bytes:
        """The last ``n`` bytes of output (fewer if less is retained)."""
        if n <= 0:
            return b""
        return self._slice(max(self._retained_start, self._total - n), self._total)

    def __repr__(self) -> str:
        if self._ended:
            state = f"ended: {self._end_reason}"
        else:
            state = "running" if self._running else "not running"
        return f"<Console {self._name!r} {state}, {self._total} bytes received>"

    @property
    def _retained_start(self) -> int:
        return max(self._base, self._total - self._buffer_size)

    def _slice(self, start: int, end: int) -> bytes:
        """A copy of the stream from ``start`` to ``end`` (absolute, both retained)."""
        with memoryview(self._buf) as view:
            return bytes(view[start - self._base : end - self._base])

    # --- the drain -------------------------------------------------------------------

    async def run(
        self,
        stream: trio.abc.Stream,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drain ``stream`` until end of file or cancellation; meant for ``nursery.start``.

        Opens the log file (an error opening it is raised before ``started()``), calls
        ``task_status.started()``, then reads chunks of up to 64 KiB: each goes to the log
        file (written and flushed at once), then to the ring buffer, then wakes every waiter.
        It never stops reading while the stream is open, whatever the waiters do. At end of
        file, or if the connection breaks, the console ends and ``run`` returns normally; when
        cancelled (the machine's teardown) the console ends too and ``Cancelled`` propagates.
        The log file is closed in every case. A failing log file (disk full) is logged and
        abandoned; draining goes on. ``run`` keeps ``stream`` for :meth:`write` while it runs,
        but never closes it: the caller owns it. It can run only once per console.
        """
        if self._started:
            raise RuntimeError(f"{self._name}: Console.run() can only be called once")
        self._started = True
        try:
            log_file = self._open_log()
        except BaseException:
            self._end("the console log could not be opened")
            raise
        self._stream = stream
        self._running = True
        reason = "the console drain stopped"
        clean = False
        try:
            task_status.started()
            _log.debug("%s: console drain started", self._name)
            while True:
                try:
                    chunk = await stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"the console connection broke: {exc!r}"
                    _log.debug("%s: %s", self._name, reason)
                    break
                if not chunk:
                    reason, clean = "end of file", True
                    _log.debug("%s: console end of file after %d bytes", self._name, self._total)
                    break
                if log_file is not None:
                    log_file = self._write_log(log_file, chunk)
                self._append(chunk)
        finally:
            self._running = False
            self._stream = None
            if log_file is not None:
                try:
                    log_file.close()
                except OSError as exc:
                    _log.warning("%s: closing console log %s: %s", self._name, self._log_path, exc)
            self._end(reason, clean_eof=clean)

    def _open_log(self) -> IO[bytes] | None:
        # Deliberately synchronous: a local file, opened once, no worker threads.
        if self._log_path is None:
            return None
        return open(self._log_path, "ab")  # closed in run()'s finally

    def _write_log(self, log_file: IO[bytes], chunk: bytes | bytearray) -> IO[bytes] | None:
        """Append ``chunk`` to the log; on failure give the log up, never the drain."""
        try:
            log_file.write(chunk)
            log_file.flush()
        except OSError as exc:
            _log.warning(
                "%s: writing console log %s failed, no longer logging: %s",
                self._name,
                self._log_path,
                exc,
            )
            with contextlib.suppress(OSError):
                log_file.close()
            return None
        return log_file

    def _append(self, chunk: bytes | bytearray) -> None:
        buf = self._buf
        buf += chunk
        self._total += len(chunk)
        if len(buf) > 2 * self._buffer_size:
            drop = len(buf) - self._buffer_size
            del buf[:drop]
            self._base += drop
        self._new_data.unpark_all()

    def _end(self, reason: str, *, clean_eof: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_reason = reason
        self._clean_eof = clean_eof
        self._new_data.unpark_all()

    def close(self, error: BaseException | None = None) -> None:
        """End the console from outside, e.g. because QEMU died; idempotent.

        Every current and future :meth:`wait_for`, :meth:`write` and line iterator that would
        have to wait raises a copy of ``error``, or without one a :class:`ConsoleTimeout`
        saying the console is closed. Only the first call counts. If the console had already
        ended by itself (end of file, drain stopped), ``error`` still replaces the generic
        "closed" error from then on, and line iterators raise it instead of stopping.

        This does not stop :meth:`run`: output that still arrives is recorded and logged, so
        QEMU never stalls on its console. Cancel ``run`` to stop draining.
        """
        if self._close_called:
            return
        self._close_called = True
        if error is not None:
            self._end_error = error
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: console closed (%r)", self._name, error)
        self._end("closed" if error is None else f"closed: {error!r}")
        # Wake waiters even if the console had ended already: they must see the new error.
        self._new_data.unpark_all()

    def _closed_error(self, what: str) -> BaseException:
        if self._end_error is not None:
            return copy_error(self._end_error)
        return ConsoleClosed(
            f"{self._name}: the console ended ({self._end_reason}) {what}", self.tail()
        )

    # --- expect ----------------------------------------------------------------------

    async def wait_for(
        self,
        pattern: ConsolePattern,
        *,
        timeout: float = 60.0,
        fail: Sequence[ConsolePattern] = (),
    ) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in the output after the previous match; return it.

        ``bytes`` and ``str`` patterns are literal text (``str`` as UTF-8); a compiled
        ``bytes`` regex is used as it is and sees up to 256 bytes before the search start as
        context (so ``^`` and ``\\b`` judge positions by the real preceding text). The search
        starts at the console's single cursor: the end of the previous successful match, or
        the oldest retained byte if that was dropped from the ring buffer already. Output
        already received counts: if it holds a match, this returns without waiting.

        Use ``match.group()``, ``groups()`` and ``groupdict()``: the match is made on an
        internal copy of part of the output, so ``start()``, ``end()``, ``span()`` and
        ``string`` are relative to that copy, not to :meth:`output`.

        ``fail`` is a sequence of patterns (a single pattern is accepted too) that must not
        appear first: if one matches before ``pattern`` (at an earlier position in the
        stream; at the same position the fail pattern wins), :class:`ConsoleFailure` is raised
        with that match and the tail of the output, and the cursor moves past it. On success
        the cursor moves to the end of the match.

        ``timeout`` (seconds; ``math.inf`` for none) bounds the whole call, including waiting
        for another ``wait_for`` to finish. When it expires, :class:`ConsoleTimeout` names
        the pattern and the timeout and carries the last 4 KiB of output; the cursor stays.
        If the console ends before a match, the error given to :meth:`close` (a copy) or a
        :class:`ConsoleTimeout` saying the console ended is raised; the cursor stays.

        Concurrent calls share the one cursor and run one after another (a lock, in arrival
        order), like pexpect; tasks that follow output independently should use
        :meth:`lines`. Literal patterns re-search only the last ``len(pattern) - 1`` bytes
        plus the new data on each wake-up; regexes re-search from the cursor, which is at
        most ``buffer_size`` bytes of work per wake-up.
        """
        if isinstance(fail, bytes | bytearray | str | re.Pattern):
            fail = (fail,)
        searches = [_make_search(pattern, self._cursor)]
        searches += [_make_search(p, self._cursor) for p in fail]
        debug = _log.isEnabledFor(logging.DEBUG)
        if debug:
            _log.debug("%s: waiting for %s (timeout %s s)", self._name, searches[0].shown, timeout)
        with trio.move_on_after(timeout) as scope:
            async with self._wait_lock:
                for search in searches:
                    search.next_start = self._cursor
                while True:
                    found = self._search(searches)
                    if found is not None:
                        start, match, search = found
                        self._cursor = start + match.end() - match.start()
                        if search is not searches[0]:
                            if debug:
                                _log.debug("%s: fail pattern %s matched", self._name, search.shown)
                            raise ConsoleFailure(
                                f"{self._name}: fail pattern {search.shown} appeared while "
                                f"waiting for {searches[0].shown}",
                                match,
                                self.tail(),
                            )
                        if debug:
                            _log.debug("%s: matched %r", self._name, match.group())
                        return match
                    if self._ended:
                        raise self._closed_error(f"while waiting for {searches[0].shown}")
                    await self._new_data.park()
        assert scope.cancelled_caught
        if debug:
            _log.debug("%s: timed out waiting for %s", self._name, searches[0].shown)
        raise ConsoleTimeout(
            f"{self._name}: timed out after {timeout} s waiting for {searches[0].shown} "
            "on the console",
            self.tail(),
        )

    def _search(self, searches: list[_Search]) -> tuple[int, re.Match[bytes], _Search] | None:
        """The earliest match of any pattern in the unsearched output, with its position."""
        retained, end = self._retained_start, self._total
        if searches[0].next_start < retained and _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s: %d bytes after the cursor were dropped from the ring buffer",
                self._name,
                retained - searches[0].next_start,
            )
        window = end
        for search in searches:
            search.next_start = max(search.next_start, retained)
            context = _REGEX_CONTEXT if search.overlap is None else 0
            window = min(window, search.next_start - context)
        window = max(window, retained)
        # A copy (at most ``buffer_size`` bytes): the returned match keeps it alive, and a
        # view of the ring buffer kept alive would stop the drain from resizing it.
        data = self._slice(window, end)
        best: tuple[tuple[int, bool, int], re.Match[bytes], _Search] | None = None
        for rank, search in enumerate(searches):
            match = search.regex.search(data, search.next_start - window)
            if match is None:
                if search.overlap is not None:
                    search.next_start = max(search.next_start, end - search.overlap)
                continue
            # Earlier in the stream wins; at the same position a fail pattern (rank > 0)
            # wins, the first given first.
            key = (window + match.start(), rank == 0, rank)
            if best is None or key < best[0]:
                best = (key, match, search)
        return None if best is None else (best[0][0], best[1], best[2])

    # --- lines -----------------------------------------------------------------------

    def lines(self) -> AsyncIterator[bytes]:
        """Iterate over complete lines, from the oldest retained output on.

        Each iterator has its own position, independent of :meth:`wait_for`'s cursor. Lines
        come without their ``b"\\n"`` and without a ``b"\\r"`` before it. If the iterator
        falls so far behind that its position leaves the ring buffer, it continues from the
        oldest retained byte (so that line may be cut at its start). At a clean end of file it
        yields the unterminated last line, if any, then stops. If the console ended otherwise
        (:meth:`close`, drain stopped or broken), it yields the complete lines it has, then
        raises the close error (see :meth:`close`); it never waits once the console ended.
        """
        return _LineIterator(self)

    def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for line in console`` is ``async for line in console.lines()``."""
        return self.lines()

    # --- input -----------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the console (the guest's serial input).

        Writes are serialised in arrival order. Raises the error given to :meth:`close` (a
        copy) if there was one, else :class:`MachineError` if :meth:`run` is not running or
        the console has ended or the connection breaks.
        """
        if isinstance(data, str):
            raise TypeError("Console.write takes bytes; use send_line() for text")
        async with self._send_lock:
            stream = self._stream
            if stream is None or self._ended:
                raise self._not_writable()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._not_writable(f"the console connection broke: {exc!r}") from exc

    async def send_line(self, line: str | bytes, *, newline: bytes = b"\n") -> None:
        """Send ``line`` (``str`` as UTF-8) followed by ``newline`` in one write."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        await self.write(bytes(line) + newline)

    def _not_writable(self, reason: str | None = None) -> BaseException:
        if self._end_error is not None:
            return copy_error(self._end_error)
        if reason is None:
            if self._ended:
                reason = f"the console ended ({self._end_reason})"
            elif not self._started:
                reason = "Console.run() has not been started"
            else:
                reason = "Console.run() is not running"
        return MachineError(f"{self._name}: cannot write to the console: {reason}")


class _LineIterator:
    """An async iterator of console lines with its own absolute position.

    A plain class rather than an async generator, so that nothing is ever suspended inside a
    cancel scope between two ``__anext__`` calls.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._pos = console._retained_start
        #: no b"\n" between ``_pos`` and ``_scanned``: long lines are not re-scanned
        self._scanned = self._pos

    def __aiter__(self) -> _LineIterator:
        return self

    async def __anext__(self) -> bytes:
        console = self._console
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            line = self._next_line()
            if line is None and console._ended:
                line = self._last_line()
            if line is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return line
            await console._new_data.park()

    def _next_line(self) -> bytes | None:
        console = self._console
        retained = console._retained_start
        if self._pos < retained:
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "%s: a line iterator lost %d bytes that left the ring buffer",
                    console._name,
                    retained - self._pos,
                )
            self._pos = retained
        base = console._base
        newline = console._buf.find(b"\n", max(self._scanned, self._pos) - base)
        if newline < 0:
            self._scanned = console._total
            return None
        line = console._slice(self._pos, base + newline)
        self._pos = self._scanned = base + newline + 1
        return line[:-1] if line.endswith(b"\r") else line

    def _last_line(self) -> bytes:
        """What the iterator yields once the console ended and no complete line is left."""
        console = self._console
        orderly = console._clean_eof or console._close_called  # EOF, or close() without error
        if not orderly or console._end_error is not None:
            raise console._closed_error("while reading lines")
        if self._pos >= console._total:
            raise StopAsyncIteration
        line = console._slice(self._pos, console._total)
        self._pos = self._scanned = console._total
        return line[:-1] if line.endswith(b"\r") else line
