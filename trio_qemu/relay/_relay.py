"""The host end of the relay channel: :class:`Relay` (the wire format is in ``_protocol.py``).

One reader task turns what the guest sends into calls on the streams (it never blocks on a
stream: the guest sends a stream only as much as it may hold); one writer task writes the
queued frames, whole and in order, so a cancelled sender never leaves half a frame on the
channel. Frames that must follow a stream's data (its data, end of data, close) wait in one
bounded queue; credits, opens and the handshake go in a small queue of their own, ahead of
it. The channel itself is never closed or shut while QEMU runs: QEMU would drop a
``socket,fd=`` chardev for good.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, TypeVar

import trio

from .._errors import (
    EventsDropped,
    GuestStreamBroken,
    MachineError,
    RelayError,
    RelayTimeout,
    copy_error,
)
from ._protocol import (
    CLOSE,
    CREDIT,
    DATA,
    EOF,
    EXITED,
    FAILED,
    HELLO,
    OPEN_EXEC,
    OPEN_TCP,
    OPENED,
    RESET,
    VERSION,
    WINDOW,
    Frame,
    FrameReader,
    Hello,
    again_frame,
    credit_value,
    encode,
    errno_payload,
    exit_payload,
    open_tcp_payload,
    parse_hello,
    sync_frame,
)
from ._stream import GuestProcess, GuestStream

__all__ = ["Relay"]

log = logging.getLogger("trio_qemu.relay")

_S = TypeVar("_S", bound=GuestStream)

#: Bytes of stream frames that may wait for the writer (senders wait beyond it).
_QUEUE_LIMIT: Final = 512 * 1024
#: Bytes the writer sends at once, at most (more when one frame is larger).
_BATCH: Final = 256 * 1024
#: Bytes asked for per read of the channel.
_RECEIVE_SIZE: Final = 256 * 1024

_NO_RELAY_HINT: Final = (
    "is the relay running in the guest? The tiny guest has it (/bin/trio-relay, started by "
    "init) when a C compiler was found as it was built"
)


class _EventSource(Protocol):
    """A QMP event subscription (``vm.subscribe("VSERPORT_CHANGE", ...)``)."""

    async def receive(self) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


class Relay:
    """The relay channel of one machine: TCP connections and commands in the guest, each a
    stream, any number at once, over one virtio-serial port.

    A machine launched with ``relay=True`` makes one (``vm.relay``) and runs it; most code
    uses the machine's methods built on it (:meth:`Machine.open_tcp_stream
    <trio_qemu.Machine.open_tcp_stream>`, ``forward_port``, ``wait_for_open_port``,
    ``shell.copy_to``...). The guest end is ``/bin/trio-relay`` in the tiny guest; the wire
    format is described in ``trio_qemu/relay/_protocol.py``.

    The relay is ready once the guest's relay has said hello (:meth:`wait_ready`); every
    open waits for that within its own timeout. If the relay dies in the guest (QEMU reports
    the port closed) or a new one says hello, the open streams fail with
    :class:`~trio_qemu.GuestStreamBroken` and the next hello (init starts a new relay) makes
    it ready again. When QEMU dies, every stream's operations, and every later call, raise
    the machine's error at once.

    Args:
        stream: our end of the channel; the caller keeps owning it (never closed here).
        name: for messages and logs.
        on_eof: awaited when the channel ends or breaks, before the error is decided: the
            machine waits there briefly for QEMU's exit and fails the relay with its error.
        window: how much each stream buffers for its reader (the guest may send it that much
            before it is granted more). What a stream sends unasked is the relay's own window,
            from its hello.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        name: str = "relay",
        on_eof: Callable[[], Awaitable[None]] | None = None,
        window: int = WINDOW,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or not 4096 <= window <= 1 << 26:
            raise ValueError(f"window must be 4096 to 64 MiB, not {window!r}")
        self._channel = stream
        #: the label of messages and logs
        self.name = name
        #: what a stream buffers for its reader (the guest may send that much unasked)
        self.window = window
        #: what a stream may send before the guest grants more (from the relay's hello)
        self.send_window = window
        self._on_eof = on_eof
        self._reader = FrameReader()
        self._streams: dict[int, GuestStream] = {}
        self._ids = itertools.count(1)
        self._control: deque[bytes] = deque()
        self._ordered: deque[bytes] = deque()
        self._queued = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self._ready_lot = trio.lowlevel.ParkingLot()
        self._ready = False
        #: why the relay cannot be used for now (wrong version), else None
        self._unusable: str | None = None
        self._error: BaseException | None = None
        self._ended = False
        #: the guest relay's pid, from its last hello
        self.relay_pid: int | None = None
        #: how many hellos were answered (a new relay, or one that started over)
        self.hellos = 0
        self._last_hello: Hello | None = None

    def __repr__(self) -> str:
        state = "failed" if self._error else "ready" if self._ready else "not ready"
        return f"<Relay {self.name!r} {state} streams={len(self._streams)}>"

    @property
    def ready(self) -> bool:
        """Whether a relay in the guest has said hello (and is not known gone since)."""
        return self._ready and self._error is None

    # --- public ------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the relay in the guest has said hello.

        Raises:
            RelayTimeout: it did not within ``timeout`` seconds (the guest is still booting,
                or has no relay).
            RelayError: the relay cannot be used (it speaks another protocol version).
        """
        _check_timeout(timeout)
        with trio.move_on_after(timeout) as scope:
            await self._until_ready()
        if scope.cancelled_caught:
            raise RelayTimeout(
                f"{self.name}: the guest relay did not say hello within {timeout} s: "
                f"{_NO_RELAY_HINT}"
            )

    async def open_tcp_stream(
        self, port: int, host: str = "127.0.0.1", *, timeout: float = 30.0
    ) -> GuestStream:
        """Connect to ``host``:``port`` inside the guest; return the stream.

        Args:
            port: the TCP port, 1-65535.
            host: an IPv4 or IPv6 address as the guest sees it (``"localhost"`` is
                127.0.0.1); names are not resolved.
            timeout: bounds the wait for the relay to be ready and for the connection.

        Raises:
            GuestConnectionRefused: nobody listens there (also a ``ConnectionRefusedError``).
            GuestConnectionError: the connection failed otherwise (its ``errno``).
            RelayTimeout: the relay or the connection was not ready within ``timeout``.
            ValueError: ``port``, ``host`` or ``timeout`` is not valid.
        """
        check_port(port, "port")
        host = check_host(host)
        _check_timeout(timeout)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return await self._open(
            lambda sid: GuestStream(self, sid, address),
            OPEN_TCP,
            open_tcp_payload(host, port),
            timeout,
            f"connecting to {address} in the guest",
        )

    async def open_process(self, command: str, *, timeout: float = 30.0) -> GuestProcess:
        """Start ``command`` (``/bin/sh -c``, in ``/``, a session of its own) in the guest;
        return its stdin and stdout as a stream (see :class:`GuestProcess`).

        Raises:
            RelayTimeout: the relay was not ready, or did not start it, within ``timeout``.
            RelayError: the relay could not start it (out of processes or memory).
        """
        if not isinstance(command, str) or "\0" in command:
            raise ValueError(f"command must be a str without NUL bytes, not {command!r}")
        _check_timeout(timeout)
        payload = command.encode()
        if len(payload) > 60000:
            raise ValueError(f"command is too long ({len(payload)} bytes; at most 60000)")
        return await self._open(
            lambda sid: GuestProcess(self, sid, command),
            OPEN_EXEC,
            payload,
            timeout,
            f"starting {command!r} in the guest",
        )

    # --- for the owning machine ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and write the channel until cancelled (the machine's teardown) or it ends.
        Starts by asking any relay already running to say hello again (a clone's relay
        said it to its template's host)."""
        self.send_control(again_frame())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._read_loop)
            task_status.started()

    async def watch_port(
        self, events: _EventSource, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the guest's end of the relay port: ``events`` is a subscription to QEMU's
        ``VSERPORT_CHANGE`` events of the relay port's device. A closed port (the relay
        died) calls :meth:`port_closed`. Runs until the events end; then closes them."""
        task_status.started()
        try:
            while True:
                try:
                    event = await events.receive()
                except EventsDropped:
                    continue
                except (trio.EndOfChannel, trio.ClosedResourceError, MachineError):
                    return
                if (event.get("data") or {}).get("open") is False:
                    self.port_closed()
        finally:
            events.close()

    def port_closed(self, reason: str = "the guest closed the relay port") -> None:
        """The relay in the guest is gone (killed or crashed): fail the open streams with
        :class:`~trio_qemu.GuestStreamBroken`, skip what it may have left half written,
        and wait for the next relay's hello (asking for one, for a relay that may already
        have said it)."""
        if self._error is not None:
            return
        log.warning("%s: the guest relay is gone: %s", self.name, reason)
        self._ready = False
        self._reader.skip()
        self._drop_streams(f"the guest relay is gone ({reason}: killed or crashed)")
        self.send_control(again_frame())

    def fail(self, error: BaseException) -> None:
        """End everything for good with ``error`` (QEMU died, the machine is shut down):
        every stream's operations and every later call raise a copy of it. Idempotent."""
        if self._error is not None:
            return
        self._error = error
        self._ready = False
        self._control.clear()
        self._ordered.clear()
        self._queued = 0
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(error)
        self._ready_lot.unpark_all()
        self._room_lot.unpark_all()

    def close(self, error: BaseException | None = None) -> None:
        """:meth:`fail` with ``error``, or with a :class:`~trio_qemu.RelayError` saying the
        machine is shut down. It does not close the channel (the caller owns it)."""
        self.fail(error or RelayError(f"{self.name}: the machine is shut down"))

    # --- for the streams -------------------------------------------------------------------

    def send_control(self, frame: bytes) -> None:
        """Queue ``frame`` ahead of the stream data (credits, opens, the handshake)."""
        if self._error is None:
            self._control.append(frame)
            self._writer_lot.unpark_all()

    def send_ordered(self, frame: bytes) -> None:
        """Queue ``frame`` after everything queued for the streams (data, EOF, close)."""
        if self._error is None:
            self._ordered.append(frame)
            self._queued += len(frame)
            self._writer_lot.unpark_all()

    async def wait_for_room(self) -> None:
        """Wait while the stream queue holds :data:`_QUEUE_LIMIT` bytes or more."""
        while self._queued >= _QUEUE_LIMIT and self._error is None:
            await self._room_lot.park()

    def forget(self, sid: int) -> None:
        """Stop routing frames to stream ``sid``."""
        self._streams.pop(sid, None)

    # --- internals -------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise copy_error(self._error)
        if self._unusable is not None:
            raise RelayError(f"{self.name}: {self._unusable}")

    async def _until_ready(self) -> None:
        while not self._ready:
            self._raise_if_failed()
            await self._ready_lot.park()
        self._raise_if_failed()

    async def _open(
        self,
        make: Callable[[int], _S],
        kind: int,
        payload: bytes,
        timeout: float,
        what: str,
    ) -> _S:
        waited_for_relay = True
        with trio.move_on_after(timeout) as scope:
            await self._until_ready()
            waited_for_relay = False
            sid = next(self._ids)
            stream = make(sid)
            self._streams[sid] = stream
            self.send_control(encode(kind, sid, payload))
            try:
                await stream._wait_opened()
            except BaseException:
                # Cancelled, timed out or failed: the guest may still open it, and must
                # then close it again.
                if stream._error is None:
                    self.send_ordered(encode(CLOSE, sid))
                self.forget(sid)
                stream._fail(RelayError(f"{self.name}: {what} was abandoned"))
                raise
            return stream
        assert scope.cancelled_caught
        if waited_for_relay:
            raise RelayTimeout(
                f"{self.name}: {what}: the guest relay did not say hello within {timeout} s: "
                f"{_NO_RELAY_HINT}"
            )
        raise RelayTimeout(f"{self.name}: {what} took longer than {timeout} s")

    def _drop_streams(self, reason: str) -> None:
        """Fail every open stream with GuestStreamBroken; drop what was queued for them."""
        self._ordered.clear()
        self._queued = 0
        self._room_lot.unpark_all()
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(GuestStreamBroken(f"{self.name}: {stream.description}: {reason}"))

    async def _channel_ended(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._on_eof is not None:
            await self._on_eof()
        if self._error is None:
            self.fail(RelayError(f"{self.name}: {reason}"))

    async def _write_loop(self) -> None:
        control, ordered = self._control, self._ordered
        while True:
            if not (control or ordered):
                await self._writer_lot.park()
                continue
            chunks: list[bytes] = []
            size = 0
            while control:
                frame = control.popleft()
                chunks.append(frame)
                size += len(frame)
            while ordered and size < _BATCH:
                frame = ordered.popleft()
                self._queued -= len(frame)
                chunks.append(frame)
                size += len(frame)
            self._room_lot.unpark_all()
            try:
                await self._channel.send_all(b"".join(chunks))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._channel_ended(f"the relay channel broke: {exc!r}")
                return

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._channel.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._channel_ended(f"the relay channel broke: {exc!r}")
                return
            if not data:
                await self._channel_ended("the relay channel reached end of file (QEMU exited?)")
                return
            if self._error is not None:
                continue
            for frame in self._reader.feed(data):
                self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.type
        if kind == HELLO:
            self._hello(frame.payload)
            return
        stream = self._streams.get(frame.sid)
        if stream is None:
            return  # closed here already (or a stale frame): nothing waits for it
        if kind == DATA:
            stream._on_data(frame.payload)
        elif kind == CREDIT:
            stream._on_credit(credit_value(frame.payload))
        elif kind == EOF:
            stream._on_eof()
        elif kind == OPENED:
            stream._on_opened()
        elif kind == FAILED:
            self.forget(frame.sid)
            stream._on_open_failed(*errno_payload(frame.payload))
        elif kind == RESET:
            stream._on_reset(*errno_payload(frame.payload))
        elif kind == EXITED and isinstance(stream, GuestProcess):
            stream._on_exit(*exit_payload(frame.payload))

    def _hello(self, payload: bytes) -> None:
        hello = parse_hello(payload)
        if self._last_hello == hello and self._unusable is None:
            # The same relay repeating its hello (it read our Q before our sync): the sync
            # it waits for is on its way, and what was opened since stays valid.
            if not self._ready:  # the guest's port closed meanwhile (an event of the past)
                self.send_control(sync_frame(hello.nonce, self.window))
                self._ready = True
                self._ready_lot.unpark_all()
            return
        self._last_hello = hello
        if self._streams:
            self._drop_streams(f"a new guest relay said hello (pid {hello.pid})")
        else:
            self._ordered.clear()
            self._queued = 0
        self._control.clear()
        self.relay_pid = hello.pid
        self.hellos += 1
        if hello.version != VERSION:
            self._ready = False
            self._unusable = (
                f"the guest relay speaks protocol version {hello.version}, this trio_qemu "
                f"version {VERSION}: rebuild the guest"
            )
            log.error("%s: %s", self.name, self._unusable)
            self._ready_lot.unpark_all()
            return
        self._unusable = None
        log.debug("%s: the guest relay said hello (pid %d)", self.name, hello.pid)
        self.send_window = min(max(hello.window, 4096), 1 << 26)
        self.send_control(sync_frame(hello.nonce, self.window))
        self._ready = True
        self._ready_lot.unpark_all()


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def check_port(port: int, field: str = "port") -> None:
    """Raise unless ``port`` is a TCP port number, 1-65535 (``field`` names it)."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{field} must be an int, not {port!r}")
    if not 0 < port < 65536:
        raise ValueError(f"{field} must be 1-65535, not {port}")


def check_host(host: str) -> str:
    """``host`` as the relay takes it: an IP address (``"localhost"``: 127.0.0.1)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"host must be an IPv4 or IPv6 address (or 'localhost'), not {host!r}: the relay "
            "does not resolve names"
        ) from None
