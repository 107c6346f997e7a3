"""One stream through the relay, host side: :class:`GuestStream` and :class:`GuestProcess`.

A stream holds at most :data:`~._protocol.WINDOW` bytes the guest sent and the reader has not
taken yet, and grants the guest more credit as the reader takes them; it sends only within
the credit the guest granted. Frames go out through its relay (:class:`_Sender`), which
writes them whole and in order; what the guest sends comes in through the relay's reader,
which calls the ``_on_...`` methods here (they never block).
"""

from __future__ import annotations

import errno as errno_module
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

from .._errors import (
    GuestConnectionError,
    GuestConnectionRefused,
    GuestStreamBroken,
    RelayError,
    RelayTimeout,
    copy_error,
)
from ._protocol import CLOSE, CREDIT, DATA, EOF, MAX_PAYLOAD, credit_payload, encode

__all__ = ["GuestProcess", "GuestStream"]


class _Sender(Protocol):
    """What a stream needs of its relay."""

    name: str
    #: what a stream buffers for its reader (the guest may send that much unasked)
    window: int
    #: what a stream may send before the guest grants more
    send_window: int

    def send_control(self, frame: bytes) -> None: ...

    def send_ordered(self, frame: bytes) -> None: ...

    async def wait_for_room(self) -> None: ...

    def forget(self, sid: int) -> None: ...


class GuestStream(trio.abc.HalfCloseableStream):
    """A byte stream to a TCP connection made inside the guest, through the relay.

    Get one from :meth:`Machine.open_tcp_stream <trio_qemu.Machine.open_tcp_stream>`. It is a
    Trio :class:`~trio.abc.HalfCloseableStream`: :meth:`send_eof` shuts the guest socket's
    write side once everything sent before has been written to it, :meth:`receive_some`
    returns ``b""`` once the guest side's peer shut its own (or closed), and ``async with``
    closes it.

    Errors: a connection reset in the guest (after the data that came before it), or the
    relay dying or restarting while the stream is open, raises
    :class:`~trio_qemu.GuestStreamBroken` (a ``trio.BrokenResourceError``); QEMU dying makes
    every operation raise the machine's error (:class:`~trio_qemu.MachineExited`) at once;
    using it after :meth:`aclose` raises ``trio.ClosedResourceError``.

    Memory: at most the relay's window (256 KiB) of received data waits here for the reader;
    the guest sends more only as it is read. :meth:`send_all` returns once the data is queued
    for the channel, within the credit the guest granted (up to 1 MiB waits in the guest for
    its socket).
    """

    def __init__(self, relay: _Sender, sid: int, description: str) -> None:
        self._relay = relay
        self._sid = sid
        #: what the stream is connected to, for messages (``"127.0.0.1:80"``)
        self.description = description
        self._buffer = bytearray()
        self._opened = False
        #: the guest ended its data (EOF)
        self._eof = False
        #: raised once the buffer is drained (a reset in the guest)
        self._broken: BaseException | None = None
        #: raised at once (the relay failed, QEMU died, the open failed)
        self._error: BaseException | None = None
        self._closed = False
        self._eof_sent = False
        #: bytes we may still send
        self._credit = 0
        #: bytes the guest may still send us
        self._allowed = relay.window
        #: bytes the reader took and we have not granted back yet
        self._taken = 0
        self._receive_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._relay.name}#{self._sid} {self.description}>"

    # --- the Stream interface ------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the guest side, in frames of at most 64 KiB, waiting for credit.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: the stream was closed, or :meth:`send_eof` called.
            GuestStreamBroken: the connection broke in the guest, or the relay is gone.
        """
        with self._guard("send"):
            await trio.lowlevel.checkpoint()
            with memoryview(data) as view, view.cast("B") as remaining:
                while True:
                    self._check_send()
                    if not remaining:
                        return
                    if self._credit <= 0:
                        await self._send_lot.park()
                        continue
                    await self._relay.wait_for_room()
                    self._check_send()
                    size = min(self._credit, MAX_PAYLOAD, len(remaining))
                    self._relay.send_ordered(encode(DATA, self._sid, remaining[:size]))
                    self._credit -= size
                    remaining = remaining[size:]

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the guest has granted credit (or the stream failed or closed)."""
        with self._guard("send"):
            await trio.lowlevel.checkpoint()
            while self._credit <= 0 and not (
                self._closed or self._error or self._broken or self._send_ended()
            ):
                await self._send_lot.park()

    async def send_eof(self) -> None:
        """End what we send: the guest shuts its socket's write side (or closes the
        command's stdin) once all data sent before is written. Idempotent."""
        with self._guard("send"):
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            if self._eof_sent:
                return
            if self._error is not None:
                raise copy_error(self._error)
            self._eof_sent = True
            if self._broken is None and not self._gone_in_guest():
                self._relay.send_ordered(encode(EOF, self._sid))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (default: all that is buffered, 256 KiB at most) of what the
        guest side sent; ``b""`` once it ended its data.

        Raises:
            trio.BusyResourceError: another task is receiving on this stream.
            trio.ClosedResourceError: the stream was closed.
            GuestStreamBroken: the connection broke in the guest (after the data that came
                before it), or the relay is gone.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        with self._guard("receive"):
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream is closed")
                if self._error is not None:
                    raise copy_error(self._error)
                if self._buffer:
                    break
                if self._eof:
                    return b""
                if self._broken is not None:
                    raise copy_error(self._broken)
                await self._receive_lot.park()
            size = len(self._buffer) if max_bytes is None else min(max_bytes, len(self._buffer))
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            self._taken += size
            if self._taken >= self._relay.window // 4 and not self._gone_in_guest():
                self._relay.send_control(encode(CREDIT, self._sid, credit_payload(self._taken)))
                self._allowed += self._taken
                self._taken = 0
            return data

    async def aclose(self) -> None:
        """Close the stream: the guest closes its socket (data already sent is still
        written to it first, as far as the socket takes it). Idempotent; never blocks."""
        self._close()
        await trio.lowlevel.checkpoint()

    # --- internals -----------------------------------------------------------------------

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opened and self._error is None and self._broken is None:
            self._relay.send_ordered(encode(CLOSE, self._sid))
        self._relay.forget(self._sid)
        self._wake()

    def _gone_in_guest(self) -> bool:
        """Whether the guest has forgotten this stream (nothing more may be sent for it)."""
        return False

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        attr = "_sending" if what == "send" else "_receiving"
        if getattr(self, attr):
            raise trio.BusyResourceError(f"another task is already {what}ing on {self!r}")
        setattr(self, attr, True)
        try:
            yield
        finally:
            setattr(self, attr, False)

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called: nothing more can be sent")
        if self._error is not None:
            raise copy_error(self._error)
        if self._broken is not None:
            raise copy_error(self._broken)
        ended = self._send_ended()
        if ended is not None:
            raise ended

    def _send_ended(self) -> BaseException | None:
        """Why nothing more can be sent although the stream is fine (a command exited)."""
        return None

    def _wake(self) -> None:
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()

    async def _wait_opened(self) -> None:
        """Until the guest said the stream is open; raise what the open failed with."""
        while not self._opened:
            if self._error is not None:
                raise copy_error(self._error)
            await self._receive_lot.park()

    # --- what the guest sent (called by the relay's reader; never blocks) -----------------

    def _on_opened(self) -> None:
        self._opened = True
        self._credit = self._relay.send_window
        self._wake()

    def _on_open_failed(self, number: int, text: str) -> None:
        self._fail(self._open_error(number, text))

    def _open_error(self, number: int, text: str) -> BaseException:
        host, _, port = self.description.rpartition(":")
        name = errno_module.errorcode.get(number, str(number))
        message = (
            f"{self._relay.name}: connecting to {self.description} in the guest failed: "
            f"{text} ({name})"
        )
        refused = number == errno_module.ECONNREFUSED
        kind = GuestConnectionRefused if refused else GuestConnectionError
        return kind(message, number, host, int(port) if port.isdigit() else 0)

    def _on_data(self, payload: bytes) -> None:
        if self._closed or self._error is not None:
            return
        self._allowed -= len(payload)
        if self._allowed < 0:
            self._fail(GuestStreamBroken(
                f"{self._relay.name}: the guest relay sent more than the credit it had on "
                f"{self.description} (a relay bug)"
            ))  # fmt: skip
            return
        self._buffer += payload
        self._receive_lot.unpark_all()

    def _on_eof(self) -> None:
        self._eof = True
        self._receive_lot.unpark_all()

    def _on_credit(self, n: int) -> None:
        self._credit += n
        self._send_lot.unpark_all()

    def _on_reset(self, number: int, text: str) -> None:
        name = errno_module.errorcode.get(number, str(number))
        self._broken = GuestStreamBroken(
            f"{self._relay.name}: the connection to {self.description} broke in the guest: "
            f"{text} ({name})"
        )
        self._relay.forget(self._sid)
        self._wake()

    def _fail(self, error: BaseException) -> None:
        """End every operation at once with ``error`` (the relay failed or is gone)."""
        if self._error is None:
            self._error = error
        self._wake()


class GuestProcess(GuestStream):
    """A command running in the guest, its stdin and stdout as a stream (through the relay).

    Get one from :meth:`Relay.open_process <trio_qemu.relay.Relay.open_process>`. It is a
    :class:`GuestStream`: what is sent is the command's stdin (:meth:`send_eof` closes it),
    what is received is its stdout. The command runs with ``/bin/sh -c`` in ``/``, in a
    session of its own; :meth:`aclose` kills its process group if it still runs. Its exit
    status and the first 4 KiB of its stderr come once it has exited and its stdout and
    stderr have ended (:meth:`wait`).
    """

    def __init__(self, relay: _Sender, sid: int, command: str) -> None:
        super().__init__(relay, sid, command)
        #: the command line
        self.command = command
        #: its exit status once known (128 + N: killed by signal N)
        self.returncode: int | None = None
        #: the first 4 KiB of its stderr, once it exited
        self.stderr = b""
        self._exited = trio.Event()

    def _gone_in_guest(self) -> bool:
        return self.returncode is not None

    def _send_ended(self) -> BaseException | None:
        if self.returncode is None:
            return None
        return GuestStreamBroken(
            f"{self._relay.name}: {self.command!r} exited (status {self.returncode}): its "
            "stdin takes nothing more"
        )

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opened and self._error is None and self.returncode is None:
            # The guest kills the command and still reports its exit: stay registered.
            self._relay.send_ordered(encode(CLOSE, self._sid))
        else:
            self._relay.forget(self._sid)
        self._wake()

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the command's exit status (``timeout`` seconds, None: no limit).

        Raises:
            RelayTimeout: it did not exit in time (it runs on; :meth:`aclose` kills it).
            GuestStreamBroken: the relay died or restarted first.
        """
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while self.returncode is None and self._error is None:
                await self._exited.wait()
        if self.returncode is not None:
            return self.returncode
        if self._error is not None:
            raise copy_error(self._error)
        raise RelayTimeout(f"{self._relay.name}: {self.command!r} did not exit within {timeout} s")

    def _open_error(self, number: int, text: str) -> BaseException:
        name = errno_module.errorcode.get(number, str(number))
        return RelayError(
            f"{self._relay.name}: the guest relay could not start {self.command!r}: {text} ({name})"
        )

    def _on_exit(self, status: int, stderr: bytes) -> None:
        self.returncode = status
        self.stderr = stderr
        self._eof = True
        self._relay.forget(self._sid)
        self._exited.set()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        super()._fail(error)
        self._exited.set()
