"""A QEMU Monitor Protocol client native to Trio.

One :class:`QMPClient` owns one byte stream. :meth:`QMPClient.handshake` reads the greeting
and negotiates capabilities; then :meth:`QMPClient.run`, the only reader, routes each reply
to the caller waiting on its id and each event to :class:`~trio_qemu._events.EventHub`. Any
number of commands may be in flight. A caller that is cancelled or times out abandons its id
and its late reply is dropped quietly, so the stream stays in sync.

Bad input closes the connection and fails every pending call and wait with one of our
:class:`~trio_qemu.QMPProtocolError` subclasses; EOF fails them with
:class:`~trio_qemu.QMPConnectionClosed`. Messages are encoded and decoded with
``qemu.qmp.Message``; nothing of ``qemu.qmp``'s asyncio machinery is used.
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import math
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import trio
from qemu.qmp import ExecuteError, Message
from qemu.qmp.models import ErrorResponse, Greeting

from ._errors import (
    QMPBadMessage,
    QMPConnectionClosed,
    QMPGreetingError,
    QMPNegotiationError,
    QMPProtocolError,
    QMPTimeout,
    QMPUnexpectedReply,
    copy_error,
)
from ._events import EventHub, QMPEvent, Subscription
from ._transport import Address, Listener, connect, read_fd
from ._util import LineSplitter, only_cancelled, protected_asynccontextmanager

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "QMPClient", "open_qmp"]

log = logging.getLogger("trio_qemu.qmp")

#: The largest message accepted from the peer unless told otherwise (10 MiB).
DEFAULT_MAX_MESSAGE_SIZE = 10 * 1024 * 1024
_TRANSCRIPT_CLIP = 2048


def _convert_keys(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``QEMUMachine``'s convention: ``some_arg=`` becomes ``"some-arg"``."""
    return {key.replace("_", "-"): value for key, value in kwargs.items()}


class _LineReader:
    """Reads newline-terminated messages from a stream, with a size limit."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int) -> None:
        self._stream = stream
        # A socket is read through its fd: one non-blocking read, else wait until readable.
        # Trio's own path costs a failed recv() and more Python per wake-up, and a QMP
        # round trip is mostly such wake-ups.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._max = max_size
        self._splitter = LineSplitter(max_size, self._too_large, skip_blank=True)
        self._lines = self._splitter.lines

    def _too_large(self, head: bytes) -> None:
        raise QMPBadMessage(f"message larger than the limit of {self._max} bytes", head)

    async def _receive(self) -> bytes | bytearray:
        if self._fd is None:
            return await self._stream.receive_some(65536)
        return await read_fd(self._fd)

    async def next_line(self) -> bytes | None:
        """The next message without its newline, or ``None`` at a clean EOF."""
        while not self._lines:
            data = await self._receive()
            if not data:
                pending = self._splitter.pending
                if pending.strip():
                    raise QMPBadMessage("EOF in the middle of a message", pending[:200])
                return None
            self._splitter.feed(data)
        return self._lines.popleft()


def _deadline_of(slot: _Pending | None) -> float:
    return math.inf if slot is None else slot.deadline


class _Pending:
    """One command waiting for its reply."""

    __slots__ = ("deadline", "done", "error", "reply", "sent", "timed_out")

    def __init__(self, deadline: float) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        #: set just before the first byte may go out: a reply may come from then on
        self.sent = False
        #: when the call gives up (Trio time); the reader task enforces it
        self.deadline = deadline
        #: set by the reader task when the deadline passed with no reply
        self.timed_out = False


class QMPClient:
    """A QMP connection over one Trio stream.

    Use :func:`~trio_qemu.open_qmp` to get a running client; a machine builds its own. The
    lifecycle is ``handshake()`` (optional: the guest agent has no greeting), then ``run()``
    as a task, then ``close()``.

    :param stream: a connected byte stream (a ``trio.SocketStream`` is needed for fd passing).
    :param timeout: the default timeout in seconds of every call and of the handshake.
    :param max_message_size: the largest message accepted from the peer.
    :param event_buffer: default buffer of a subscription.
    :param event_cache: how many unclaimed events are kept for ``event_wait``.
    :param transcript: how many recent messages (both ways) are kept for diagnostics.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        name: str = "qmp",
        timeout: float = 30.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        event_buffer: int = 2048,
        event_cache: int = 1000,
        transcript: int = 64,
    ) -> None:
        if max_message_size < 64:
            raise ValueError("max_message_size must be at least 64 bytes")
        self.name = name
        self.timeout = timeout
        self.events = EventHub(cache_size=event_cache, default_buffer=event_buffer)
        #: the server's greeting, once ``handshake()`` has read it
        self.greeting: Greeting | None = None
        self._stream = stream
        self._reader = _LineReader(stream, max_message_size)
        # The reader task's cancel scope, whose deadline is the earliest pending call's: the
        # reader ends calls that time out, so a call needs no cancel scope of its own (one per
        # call cost ~10% of a round trip). None while the reader task is not running.
        self._timer: trio.CancelScope | None = None
        self._send_lock = trio.StrictFIFOLock()
        # The socket's fd for the fast send path (None: not a socket stream; use send_all).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._ids = itertools.count(1)
        self._pending: dict[object, _Pending] = {}
        self._abandoned: set[object] = set()
        self._on_eof: Callable[[], Awaitable[None]] | None = None
        self._transcript: deque[tuple[str, bytes]] = deque(maxlen=transcript)
        self._error: BaseException | None = None
        self._closed = False
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- state ---------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        """Why the connection ended, if it ended badly (or was failed from outside)."""
        return self._error

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (EOF, error, ``fail()`` or ``close()``)."""
        return self._closed

    def transcript(self) -> list[str]:
        """The last messages exchanged, oldest first, as ``"-> ..."``/``"<- ..."`` lines."""
        return [f"{d} {raw.decode('utf-8', 'replace')}" for d, raw in self._transcript]

    def _record(self, direction: str, raw: bytes) -> None:
        if len(raw) > _TRANSCRIPT_CLIP:
            raw = raw[:_TRANSCRIPT_CLIP] + b"...(%d bytes)" % len(raw)
        self._transcript.append((direction, raw))
        if self._debug:
            log.debug("%s %s %s", self.name, direction, raw.decode("utf-8", "replace"))

    def fail(self, error: BaseException | None) -> None:
        """End the connection: every pending call and wait raises ``error``.

        With ``error=None`` (a clean end) calls raise :class:`~trio_qemu.QMPConnectionClosed`
        and subscriptions simply end. The first reason wins; later calls do nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._error = error
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = error
            slot.done.set()
        self.events.close(error)

    async def aclose(self) -> None:
        """Fail what is pending (as a clean close) and close the stream."""
        self.fail(None)
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def _closed_error(self, what: str) -> BaseException:
        if self._error is not None:
            return copy_error(self._error)
        return QMPConnectionClosed(f"{self.name}: the QMP connection is closed ({what})")

    # -- handshake -------------------------------------------------------------------------
    async def handshake(self, *, negotiate: bool = True, timeout: float | None = None) -> Greeting:
        """Read the greeting and, with ``negotiate``, run ``qmp_capabilities``.

        ``oob`` is enabled when the server offers it. Raises
        :class:`~trio_qemu.QMPGreetingError`, :class:`~trio_qemu.QMPNegotiationError`,
        :class:`~trio_qemu.QMPTimeout` or :class:`~trio_qemu.QMPConnectionClosed`; on any of
        them the connection is failed.
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(timeout):
                greeting = await self._read_greeting()
                if negotiate:
                    await self._negotiate(greeting)
        except trio.TooSlowError:
            error = QMPTimeout(f"{self.name}: no QMP greeting/negotiation within {timeout} s")
            self.fail(error)
            raise error from None
        except (QMPProtocolError, QMPConnectionClosed) as exc:  # EOF: closed as documented
            self.fail(exc)
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            closed = QMPConnectionClosed(f"{self.name}: connection lost during the handshake")
            self.fail(closed)
            raise closed from exc
        return greeting

    async def _read_greeting(self) -> Greeting:
        line = await self._reader.next_line()
        if line is None:
            raise QMPConnectionClosed(f"{self.name}: EOF before the QMP greeting")
        self._record("<-", line)
        raw = self._decode(line)
        try:
            greeting = Greeting(raw)
        except (KeyError, TypeError) as exc:
            raise QMPGreetingError(f"not a QMP greeting: {exc}", line) from exc
        self.greeting = greeting
        return greeting

    async def _negotiate(self, greeting: Greeting) -> None:
        request: dict[str, object] = {"execute": "qmp_capabilities"}
        if "oob" in greeting.QMP.capabilities:
            request["arguments"] = {"enable": ["oob"]}
        await self._send(bytes(Message(request)))
        line = await self._reader.next_line()
        if line is None:
            raise QMPConnectionClosed(f"{self.name}: EOF during capability negotiation")
        self._record("<-", line)
        reply = self._decode(line)
        if "error" in reply:
            raise QMPNegotiationError(f"qmp_capabilities refused: {reply['error']!r}", line)
        if reply.get("return") != {}:
            raise QMPNegotiationError("unexpected answer to qmp_capabilities", line)

    # -- reading -------------------------------------------------------------------------
    def _decode(self, line: bytes) -> dict[str, Any]:
        """One message as a dict: the checks of ``qemu.qmp.Message`` (JSON, an object), plus
        strict UTF-8. Decoded with ``json`` directly: wrapping each message in ``Message``
        and copying it out doubled the reader's cost per event (3.0 vs 1.5 us measured),
        and the reader must keep pace with QEMU's event floods."""
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise QMPBadMessage(f"malformed QMP message: {exc}", line) from exc
        if not isinstance(obj, dict):
            raise QMPBadMessage("QMP message is not a JSON object", line)
        return obj

    async def run(
        self,
        *,
        on_eof: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read until EOF, routing replies and events. Returns when the connection ends.

        It never raises for a bad peer: the error is kept in :attr:`error` and raised to
        every pending call and wait instead. Cancel it (or ``close()``) to stop it.
        ``on_eof`` runs at EOF (and when a send finds the peer gone) before pending calls
        are failed, so an owner can fail them with a better reason first (a machine waits to
        learn QEMU's exit status).
        """
        self._on_eof = on_eof
        task_status.started()
        reader = self._reader
        try:
            at_eof = False
            while not at_eof:
                with trio.CancelScope(deadline=self._earliest_deadline()) as self._timer:
                    while True:
                        line = await reader.next_line()
                        if line is None:
                            at_eof = True
                            break
                        self._dispatch(line)
                self._timer = None
                self._expire(trio.current_time())
            log.debug("%s: EOF", self.name)
            if on_eof is not None:
                await on_eof()
            self.fail(None)
        except QMPProtocolError as exc:
            log.warning("%s: %s; closing the connection", self.name, exc)
            self.fail(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # ECONNRESET: the peer died with our bytes unread. For the owner that is an EOF.
            if not self._closed and on_eof is not None:
                await on_eof()
            if not self._closed:
                closed = QMPConnectionClosed(f"{self.name}: the QMP connection broke: {exc!r}")
                closed.__cause__ = exc
                self.fail(closed)
        finally:
            self._timer = None
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def _earliest_deadline(self) -> float:
        return min((slot.deadline for slot in self._pending.values()), default=math.inf)

    def _expire(self, now: float) -> None:
        """End the calls whose deadline has passed (they raise QMPTimeout); a late reply to
        one is then ignored."""
        for msg_id, slot in list(self._pending.items()):
            if slot.deadline <= now:
                del self._pending[msg_id]
                slot.timed_out = True
                if slot.sent:
                    self._abandoned.add(msg_id)
                slot.done.set()

    def _dispatch(self, line: bytes) -> None:
        self._record("<-", line)
        msg = self._decode(line)
        if "event" in msg:
            if not isinstance(msg["event"], str):  # unhashable names broke subscriptions
                raise QMPBadMessage("an event whose name is not a string", line)
            self.events.publish(msg)
            return
        if "return" not in msg and "error" not in msg:
            raise QMPBadMessage("message is neither a reply nor an event", line)
        if "id" not in msg:
            what = "an error" if "error" in msg else "a reply"
            raise QMPUnexpectedReply(f"{what} with no id", line)
        msg_id = msg["id"]
        # Our ids are ints. Anything else was never sent, even when it compares equal to one
        # (true, 1.0) or can't be hashed (a list: `{}.pop([])` passes, `[] in set()` raises).
        if type(msg_id) is not int:
            raise QMPUnexpectedReply(f"a reply with an id we never sent ({msg_id!r})", line)
        slot = self._pending.pop(msg_id, None)
        if slot is None:
            if msg_id in self._abandoned:
                self._abandoned.discard(msg_id)
                return
            raise QMPUnexpectedReply(f"a reply with an id we never sent ({msg_id!r})", line)
        slot.reply = msg
        slot.done.set()

    # -- writing -------------------------------------------------------------------------
    async def _send(
        self, data: bytes, fds: Sequence[int] = (), slot: _Pending | None = None
    ) -> None:
        """Send one whole message. Shielded so a cancel can't leave half a message on the wire;
        bounded by the client timeout and by the caller's deadlines (a call's ``timeout``),
        after either of which the connection is failed.

        Fast path: when nobody else is sending, the bytes go out with one non-blocking write
        and no scheduler round trip (a QMP call's latency is mostly such round trips). That
        path does not checkpoint; every caller awaits the reply right after, which does.
        """
        if self._closed:
            raise self._closed_error("cannot send")
        if self._fd is not None and not fds and not self._send_lock.locked():
            self._send_lock.acquire_nowait()
            try:
                if slot is not None:
                    slot.sent = True
                try:
                    sent = os.write(self._fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise await self._send_failed(exc) from exc
                if sent < len(data):
                    await self._send_shielded(data[sent:], (), _deadline_of(slot))
            finally:
                self._send_lock.release()
        else:
            # Our turn may come after the call's deadline: then it is not sent at all (the
            # reader task, or the call's own scope, ends the call with QMPTimeout).
            acquired = False
            with trio.move_on_at(_deadline_of(slot)):
                await self._send_lock.acquire()
                acquired = True
            if not acquired:
                return
            try:
                if slot is not None:
                    if slot.done.is_set():  # it timed out while it waited for its turn
                        return
                    slot.sent = True
                await self._send_shielded(data, fds, _deadline_of(slot))
            finally:
                self._send_lock.release()
        self._record("->", data)

    async def _send_failed(self, exc: BaseException) -> BaseException:
        """The peer is gone (EPIPE...): let the owner learn why first (``on_eof``: a dying
        QEMU is reaped a moment later), then fail the connection; return the error to raise."""
        if not self._closed and self._on_eof is not None:
            with trio.CancelScope(shield=True):
                await self._on_eof()
        self.fail(QMPConnectionClosed(f"{self.name}: cannot send: {exc!r}"))
        return self._closed_error("cannot send")

    async def _send_shielded(
        self, data: bytes, fds: Sequence[int], call_deadline: float = math.inf
    ) -> None:
        deadline = min(
            trio.current_time() + self.timeout, trio.current_effective_deadline(), call_deadline
        )
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                if fds:
                    await self._send_with_fds(data, fds)
                else:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise await self._send_failed(exc) from exc
        if scope.cancelled_caught:
            stalled = QMPTimeout(f"{self.name}: the peer stopped reading (send stalled)")
            self.fail(stalled)
            # A caller's deadline passed: let its own scope end it (a call then raises the
            # connection's error, this QMPTimeout); else the client timeout did it.
            await trio.lowlevel.checkpoint_if_cancelled()
            raise stalled

    async def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        stream = self._stream
        if not isinstance(stream, trio.SocketStream) or stream.socket.family != socket.AF_UNIX:
            raise TypeError("file descriptors can only be passed over a unix socket")
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = await stream.socket.sendmsg([data], ancillary)
        if sent < len(data):
            await stream.send_all(data[sent:])

    async def send_fd_scm(self, fd: int) -> None:
        """Pass ``fd`` to the peer with SCM_RIGHTS (on one space byte); name it with ``getfd``.

        Prefer ``qmp("getfd", {"fdname": ...}, fds=[fd])``, which sends the fd with the
        command itself.
        """
        await self._send(b" ", (fd,))

    # -- commands ------------------------------------------------------------------------
    async def qmp(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        fds: Sequence[int] = (),
        oob: bool = False,
        **kwargs: object,
    ) -> dict[str, Any]:
        """Run ``cmd`` and return the raw response (``{"return": ...}`` or ``{"error": ...}``).

        ``kwargs`` are arguments with ``_`` turned into ``-``; ``args`` are passed as they are.
        ``fds`` are sent with the command (SCM_RIGHTS), e.g. for ``getfd`` or ``add-fd``.
        Raises :class:`~trio_qemu.QMPTimeout` after ``timeout`` seconds (default: the
        client's) and the connection's error if it ends first.
        """
        arguments: dict[str, object] = dict(args) if args else {}
        if kwargs:
            arguments.update(_convert_keys(kwargs))
        request: dict[str, object] = {"exec-oob" if oob else "execute": cmd}
        if arguments:
            request["arguments"] = arguments
        msg_id = next(self._ids)
        request["id"] = msg_id
        data = json.dumps(request, separators=(",", ":")).encode("utf-8")
        return await self._call(msg_id, data, cmd, timeout, fds)

    # Protected from KeyboardInterrupt so that a Ctrl-C lands only at its awaits, never between
    # a write and the bookkeeping that lets the reader recognise the late reply.
    @trio.lowlevel.enable_ki_protection
    async def _call(
        self, msg_id: int, data: bytes, cmd: str, timeout: float | None, fds: Sequence[int]
    ) -> dict[str, Any]:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise self._closed_error(f"cannot run {cmd}")
        timeout = self.timeout if timeout is None else timeout
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        slot = _Pending(deadline)
        timer = self._timer
        if timer is None:  # no reader task to enforce the deadline: a scope of our own
            with trio.CancelScope(deadline=deadline):
                await self._exchange(msg_id, slot, data, fds)
        else:
            if deadline < timer.deadline:
                timer.deadline = deadline
            await self._exchange(msg_id, slot, data, fds)
        if slot.error is not None or (slot.reply is None and self._closed):
            raise self._closed_error(f"no reply to {cmd}")
        if slot.reply is None:
            assert slot.timed_out or timer is None
            raise QMPTimeout(f"{self.name}: no reply to {cmd} within {timeout} s")
        return slot.reply

    async def _exchange(
        self, msg_id: int, slot: _Pending, data: bytes, fds: Sequence[int]
    ) -> None:
        """Send the request and wait for its slot to be done; a call given up before its
        reply leaves the id to be ignored when the reply comes late."""
        try:
            self._pending[msg_id] = slot
            await self._send(data, fds, slot)
            await slot.done.wait()
        finally:
            if (
                not slot.done.is_set()
                and self._pending.pop(msg_id, None) is not None
                and slot.sent
            ):
                self._abandoned.add(msg_id)

    async def cmd(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        fds: Sequence[int] = (),
        oob: bool = False,
        **kwargs: object,
    ) -> Any:
        """Run ``cmd`` and return its ``return`` value; raise ``qemu.qmp.ExecuteError``
        (with the error class and description) when QEMU refuses it."""
        reply = await self.qmp(cmd, args, timeout=timeout, fds=fds, oob=oob, **kwargs)
        if "error" in reply:
            request: dict[str, object] = {"execute": cmd}
            if args or kwargs:
                request["arguments"] = {**(args or {}), **_convert_keys(kwargs)}
            raise ExecuteError(ErrorResponse(reply), Message(request), Message(reply))
        return reply["return"]

    # -- events --------------------------------------------------------------------------
    def subscribe(
        self,
        *names: str,
        match: Mapping[str, object] | None = None,
        buffer: int | None = None,
    ) -> Subscription:
        """Events named ``names`` (all when none) that match ``match``, in a bounded channel."""
        return self.events.subscribe(*names, match=match, buffer=buffer)

    async def event_wait(
        self, name: str, timeout: float | None = 60.0, match: Mapping[str, object] | None = None
    ) -> QMPEvent:
        """The first event ``name`` matching ``match``, including one that already arrived."""
        return await self.events.wait([(name, match)], timeout)

    async def events_wait(
        self,
        events: Iterable[tuple[str, Mapping[str, object] | None]],
        timeout: float | None = 60.0,
    ) -> QMPEvent:
        """The first event matching any ``(name, match)`` pair (see :meth:`event_wait`)."""
        return await self.events.wait(events, timeout)

    def get_events(self) -> list[QMPEvent]:
        """Take the events that arrived and that nobody has claimed yet."""
        return self.events.take_unclaimed()


@protected_asynccontextmanager
async def open_qmp(
    target: Address | trio.abc.Stream,
    *,
    server: bool = False,
    negotiate: bool = True,
    timeout: float = 30.0,
    **options: Any,
) -> AsyncIterator[QMPClient]:
    """Connect to a QMP server, negotiate, and keep a reader running for the block.

    ``target`` is a connected stream, a unix socket path or a TCP ``(host, port)``. With
    ``server=True`` we listen at the address and take the first connection (QEMU started
    with ``-chardev socket,path=...`` or ``host=...,port=...`` connects to us). ``negotiate
    =False`` skips the greeting and negotiation (the guest agent has neither). ``options``
    go to :class:`QMPClient`.

    If the peer breaks the protocol while the block runs, the block is cancelled and that
    error is raised. After a clean hang-up (e.g. after ``quit``) calls and waits raise
    :class:`~trio_qemu.QMPConnectionClosed` and subscriptions end, but the block itself is
    not interrupted. The stream is closed on the way out.
    """
    if isinstance(target, trio.abc.Stream):
        stream: trio.abc.Stream = target
    elif server:
        listener = await Listener.open(target)
        try:
            stream = await listener.accept(timeout=timeout)
        finally:
            listener.close()
    else:
        stream = await connect(target, timeout=timeout)
    client = QMPClient(stream, timeout=timeout, **options)
    try:
        if negotiate:
            await client.handshake()
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            reader_done = trio.Event()

            async def read() -> None:
                try:
                    await client.run()
                finally:
                    reader_done.set()
                if client.error is not None:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            try:
                yield client
            except BaseException as exc:  # re-raised below, outside the nursery: no group
                body_error = exc
            nursery.cancel_scope.cancel()
        if body_error is not None:
            if only_cancelled(body_error) and client.error is not None:
                raise copy_error(client.error)
            raise body_error
        if client.error is not None and reader_done.is_set():
            raise copy_error(client.error)
    finally:
        await client.aclose()
