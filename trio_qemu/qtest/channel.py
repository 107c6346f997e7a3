"""The engine under :class:`~trio_qemu.QtestMachine`: one qtest channel, in step.

:class:`_QtestChannel` owns our end of the qtest socketpair. It sends well-formed request
lines, matches reply lines to them in order, and tracks the ``IRQ raise N`` / ``IRQ lower N``
lines QEMU sends at any time; :class:`~trio_qemu.qtest.QtestMachine` builds the public,
typed API on top of it. Also here: what an IRQ line becomes (:class:`IrqEvent`) and where it
goes (:class:`IrqSubscription`).

How it keeps requests and replies in step (a reader task, requests that take a reply
already there, a send lock, the reader's timer, abandoned slots whose late replies are
dropped) is told in :mod:`trio_qemu.qtest`. The checks QEMU's own parser
cannot express (is this path a device? does this GPIO exist? does the machine have a CPU?)
are made here, through QMP, after :mod:`~trio_qemu.qtest.protocol` checked the line.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import trio
from qemu.qmp import ExecuteError

from .._errors import QtestError, QtestInvalidRequest, QtestProtocolError, QtestTimeout, copy_error
from .._machine import Machine
from .._util import EOF_GRACE, BoundedStream, LineSplitter
from .protocol import MAX_TRANSFER, _parse_number

__all__ = ["MAX_IN_FLIGHT", "IrqEvent", "IrqSubscription"]

log = logging.getLogger("trio_qemu.qtest")

MAX_IN_FLIGHT: Final = 64
"""How many requests may await their replies at once (concurrent callers pipeline; more
wait for a slot). Abandoned requests count until their late reply arrives."""

_MAX_LINE: Final = 2 * MAX_TRANSFER + 64
"""The longest reply line accepted (a hex ``read`` of :data:`MAX_TRANSFER` bytes)."""

_READ_SIZE: Final = 65536
"""Bytes per read from the socket."""

_Deadline = float


@dataclass(frozen=True, slots=True)
class IrqEvent:
    """One ``IRQ raise N`` / ``IRQ lower N`` line from QEMU."""

    irq: int
    """The intercepted line's number (for ``irq_intercept_in ioapic``: the I/O APIC input)."""
    raised: bool
    """True for ``raise``, False for ``lower``."""


class IrqSubscription(BoundedStream[IrqEvent]):
    """A bounded stream of :class:`IrqEvent` in arrival order, from
    :meth:`QtestMachine.irq_events <trio_qemu.QtestMachine.irq_events>`.

    Use it as a (sync or async) context manager; leaving it unsubscribes. A full buffer never
    blocks the reader: the event is dropped and counted in :attr:`dropped`, and the next
    ``receive()`` raises :class:`~trio_qemu.EventsDropped` once. When the qtest channel ends,
    ``receive()`` raises its error (``trio.EndOfChannel`` after an orderly close) and async
    iteration stops.
    """

    def __init__(self, owner: _QtestChannel, buffer: int) -> None:
        super().__init__(
            buffer, registry=owner._irq_subscriptions, raise_end=owner._raise_unless_orderly
        )
        self._owner = owner

    def _offer(self, event: IrqEvent) -> None:
        self._deliver(event)

    async def receive(self, *, timeout: float | None = 60.0) -> IrqEvent:
        """The next IRQ event. Raises :class:`~trio_qemu.QtestTimeout` when none comes within
        ``timeout`` s (None: wait without limit), and see the class docstring."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            return await self._next()
        raise QtestTimeout(f"{self._owner.name}: no IRQ event within {timeout} s")


class _Pending:
    """One request awaiting its reply, in the order it was sent."""

    __slots__ = ("_event", "abandoned", "deadline", "done", "error", "queued", "reply")

    def __init__(self, deadline: _Deadline) -> None:
        self.deadline = deadline
        #: answered, failed or timed out (see :meth:`finish`)
        self.done = False
        #: made only when the caller has to wait (a reply taken at once needs none)
        self._event: trio.Event | None = None
        #: in the reply queue (its line is going out): the reader owns its in-flight slot
        self.queued = False
        self.reply: str | None = None
        self.error: BaseException | None = None
        #: the caller left (cancelled, timed out): drop the reply when it comes
        self.abandoned = False

    def finish(self) -> None:
        """Mark the request finished and wake its caller if it waits."""
        self.done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Wait until :meth:`finish` (a checkpoint either way)."""
        if self._event is None:
            self._event = trio.Event()
            if self.done:
                self._event.set()
        await self._event.wait()


def _short(line: str, limit: int = 80) -> str:
    return line if len(line) <= limit else line[:limit] + "..."


class _QtestChannel:
    """The request/reply engine of a qtest channel (see the module docstring).

    Subclassed by :class:`~trio_qemu.QtestMachine`, which adds the public requests. Start
    :meth:`_run_reader` in a nursery; :meth:`_close` ends the channel when the block ends.
    """

    def __init__(self, machine: Machine, stream: trio.SocketStream, *, timeout: float) -> None:
        self.machine = machine
        #: the default per-request timeout in seconds (from ``MachineConfig.qmp_timeout``)
        self.timeout = timeout
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._send_lock = trio.StrictFIFOLock()
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._pending: deque[_Pending] = deque()
        # The reader task's cancel scope, whose deadline is at or before the earliest pending
        # request's: the reader times requests out, so a request on the fast path needs no
        # cancel scope of its own (one per request cost ~20% of a round trip). None while the
        # reader task is not inside it.
        self._timer: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._orderly = False
        self._splitter = LineSplitter(_MAX_LINE, self._line_too_long)
        self._irq_levels: dict[int, bool] = {}
        self._irq_changed = trio.Event()
        self._irq_subscriptions: set[IrqSubscription] = set()
        #: how many IRQ lines arrived in all
        self.irq_count = 0
        #: replies that arrived for requests whose callers had left (and were dropped)
        self.discarded_replies = 0
        self._has_cpu: bool | None = None
        self._device_types: frozenset[str] | None = None

    @property
    def name(self) -> str:
        """The machine's name, used in errors and logs."""
        return self.machine.name

    # -- requests ----------------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> _Deadline:
        return trio.current_time() + (self.timeout if timeout is None else timeout)

    async def _request(self, line: str, memory: bool, deadline: _Deadline) -> str:
        """Send a line known to be well-formed; return its ``OK`` value or raise.

        The fast path (:meth:`_exchange`) needs the reader task running, a free slot, nobody
        else sending and time left; anything else goes through :meth:`_roundtrip`.
        """
        if self._error is not None:
            await trio.lowlevel.checkpoint()
            self._raise_error()
        if memory and not self._has_cpu:
            await self._check_cpu(line, deadline)
        if self._timer is None or self._send_lock.locked() or trio.current_time() >= deadline:
            reply = await self._roundtrip(line, deadline)
        else:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                reply = await self._roundtrip(line, deadline)
            else:
                reply = await self._exchange(line, deadline)
        if reply == "OK":
            return ""
        if reply.startswith("OK "):
            return reply[3:]
        status, _, reason = reply.partition(" ")
        raise QtestError(line, status, reason)

    # Protected from KeyboardInterrupt so that a Ctrl-C lands only at its awaits, never
    # between taking a slot, queueing it and writing its line (the channel would lose step).
    @trio.lowlevel.enable_ki_protection
    async def _exchange(self, line: str, deadline: _Deadline) -> str:
        """The fast path, with a slot already taken: no cancel scope of our own (the
        reader's timer times the request out) and, often, no wait for the reader either.

        A checkpoint: a cancel point before anything is sent, a schedule point after.
        """
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._slots.release()
            raise
        slot = _Pending(deadline)
        self._send_lock.acquire_nowait()
        try:
            self._pending.append(slot)
            slot.queued = True
            data = (line + "\n").encode("ascii")
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                await self._send_failed(exc)
            if sent < len(data):
                await self._send_rest(data[sent:], deadline)
        finally:
            self._send_lock.release()
        # QEMU often answers while we are still here: take the reply ourselves rather than
        # wait for the reader task to wake up and hand it over.
        self._read_now()
        if slot.done:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            timer = self._timer  # the reader may have moved on while we sent
            if timer is not None and deadline < timer.deadline:
                timer.deadline = deadline
            try:
                await slot.wait()
            finally:
                if not slot.done:
                    slot.abandoned = True
        return self._reply(slot, line)

    def _reply(self, slot: _Pending, line: str) -> str:
        """The reply of a finished slot, or the reason it has none (raised)."""
        if slot.error is not None:
            raise copy_error(slot.error)
        if slot.reply is None:
            if self._error is not None:
                self._raise_error()
            late = " (its late reply will be discarded)" if slot.queued else " (not sent)"
            raise QtestTimeout(f"{self.name}: no reply to qtest {_short(line)!r} in time{late}")
        return slot.reply

    async def _roundtrip(self, line: str, deadline: _Deadline) -> str:
        """Send ``line`` and wait for its reply line under a cancel scope of our own (the
        slow path: no reader timer, no free slot, or someone else sending)."""
        data = (line + "\n").encode("ascii")
        slot = _Pending(deadline)
        with trio.move_on_at(deadline):
            try:  # no checkpoint when a slot is free: the reply wait below is the checkpoint
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._slots.acquire()
            try:
                if trio.current_time() >= deadline:  # e.g. timeout=0: never send
                    await trio.sleep_forever()  # the expired scope ends it at once
                await self._send(data, slot, deadline)
                await slot.wait()
            finally:
                if not slot.queued:
                    self._slots.release()  # never queued: the reader will not release it
                elif not slot.done:
                    slot.abandoned = True
        return self._reply(slot, line)

    async def _send(self, data: bytes, slot: _Pending, deadline: _Deadline) -> None:
        """Queue ``slot`` and send ``data`` as one unit: the slot joins the reply queue only
        under the send lock, right before its line goes out, so queue order is wire order.

        The send is shielded (a cancel must not leave half a line on the wire) but still
        ends at ``deadline``; a send that stalls that long breaks the channel.
        """
        if self._error is not None:
            await trio.lowlevel.checkpoint()
            self._raise_error()
        async with self._send_lock:
            if self._error is not None:
                self._raise_error()
            self._pending.append(slot)
            slot.queued = True
            await self._send_rest(data, deadline)

    async def _send_rest(self, data: bytes, deadline: _Deadline) -> None:
        failure: BaseException | None = None
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                failure = exc
        if failure is not None:
            await self._send_failed(failure)
        if scope.cancelled_caught:
            error = QtestProtocolError(
                f"{self.name}: qtest channel unusable: sending a request stalled past its "
                "deadline (QEMU stopped reading), part of a line may be on the wire"
            )
            self._fail(error)
            raise copy_error(error)

    async def _send_failed(self, exc: BaseException) -> NoReturn:
        """A send failed (EPIPE: QEMU is gone). Fail the channel with QEMU's death when that
        becomes known within the grace period, else with a QtestProtocolError; raise it."""
        await self._wait_for_exit()
        self._fail(
            self.machine.failure
            or QtestProtocolError(f"{self.name}: qtest channel unusable: cannot send: {exc!r}")
        )
        assert self._error is not None
        error = copy_error(self._error)
        if error.__cause__ is None:
            error.__cause__ = exc
        raise error

    def _raise_error(self) -> None:
        if self._error is not None:
            raise copy_error(self._error)

    def _raise_unless_orderly(self) -> None:
        """For the IRQ streams: end quietly (EndOfChannel) after the block ended normally."""
        if not self._orderly:
            self._raise_error()

    # -- checks that need QEMU's state (through QMP) ------------------------------------
    async def _check_cpu(self, line: str, deadline: _Deadline) -> None:
        """Refuse a memory access on a machine without CPUs: QEMU would crash on it
        (qtest accesses memory through the first CPU's address space)."""
        if self._has_cpu is None:
            if self.machine.config.qmp:
                cpus = await self.machine.cmd(
                    "query-cpus-fast", timeout=max(deadline - trio.current_time(), 0.001)
                )
                self._has_cpu = bool(cpus)
            else:  # no QMP to ask: judge by the machine type
                machine = self.machine.config.machine or ""
                self._has_cpu = machine.split(",")[0] != "none"
        if not self._has_cpu:
            raise QtestInvalidRequest(
                line, "the machine has no CPU, and QEMU crashes on qtest memory accesses then"
            )

    async def _check_device(self, line: str, words: list[str], deadline: _Deadline) -> None:
        """Refuse IRQ commands on a QOM object that is not a device (QEMU would abort on
        the cast), and ``set_irq_in`` on a GPIO input that does not exist (QEMU asserts).

        A path QOM cannot resolve is let through: QEMU answers ``FAIL Unknown device``.
        """
        path = words[1]
        if not self.machine.config.qmp:
            raise QtestInvalidRequest(line, "this command needs QMP (qmp=True) to check the path")

        async def qmp(cmd: str, **args: object) -> Any:
            remaining = max(deadline - trio.current_time(), 0.001)
            return await self.machine.cmd(cmd, args, timeout=remaining)

        try:
            type_name = await qmp("qom-get", path=path, property="type")
        except ExecuteError:
            return  # unknown or ambiguous path: QEMU's own lookup fails too, and says so
        if self._device_types is None:
            types = await qmp("qom-list-types", implements="device", abstract=True)
            self._device_types = frozenset(t["name"] for t in types)
        if type_name not in self._device_types:
            raise QtestInvalidRequest(line, f"{path!r} is a {type_name}, not a device")
        if words[0] == "set_irq_in":
            gpio = f"{words[2]}[{_parse_number(words[3], signed=True)}]"
            properties = await qmp("qom-list", path=path)
            if not any(p["name"] == gpio for p in properties):
                raise QtestInvalidRequest(
                    line, f"{path!r} has no GPIO input {gpio} (QEMU would abort)"
                )

    # -- the reader --------------------------------------------------------------------
    async def _run_reader(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Read lines until EOF: replies to their requests, IRQ lines to the levels and the
        subscriptions. Never raises for a bad peer: the error goes to every pending and
        later request instead.

        Requests also read (:meth:`_read_now`): every read is handled in full before
        anything else runs, so lines are handled in wire order whoever read them.
        """
        task_status.started()
        fd = self._fd
        try:
            at_eof = False
            while not at_eof and self._error is None:
                # Runs until EOF or the earliest pending request's deadline; then that
                # request (and any other overdue one) is timed out and the reader goes on.
                with trio.CancelScope(deadline=self._earliest_deadline()) as self._timer:
                    while self._error is None:
                        try:
                            data = os.read(fd, _READ_SIZE)
                        except BlockingIOError:
                            await trio.lowlevel.wait_readable(fd)
                            continue
                        if not data:
                            at_eof = True
                            break
                        self._take(data)
                        # Let the callers just answered run (and send their next requests)
                        # before reading again; the cancel point while data keeps coming.
                        await trio.lowlevel.checkpoint()
                self._timer = None
                self._expire(trio.current_time())
            if at_eof:
                await self._on_eof()
        except OSError as exc:  # ECONNRESET and the like: QEMU is gone
            self._timer = None
            await self._on_eof(exc)
        except Exception as exc:  # a bug of ours: fail the channel, never the block
            self._timer = None
            self._reader_failed(exc)
        finally:
            self._timer = None

    def _read_now(self) -> None:
        """Handle what QEMU has sent so far, without waiting. EOF and socket errors are
        left to the reader task, which meets them on its next read."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except OSError:
            return
        if data:
            self._take(data)

    def _take(self, data: bytes) -> None:
        """Split ``data`` into lines and handle them; a bad line fails the channel."""
        lines = self._splitter.lines
        try:
            self._splitter.feed(data)
            while lines:
                self._dispatch(lines.popleft())
        except QtestProtocolError as exc:
            lines.clear()
            log.warning("%s", exc)
            self._fail(exc)
        except Exception as exc:  # a bug of ours: fail the channel, never the block
            lines.clear()
            self._reader_failed(exc)

    def _reader_failed(self, exc: Exception) -> None:
        log.exception("%s: the qtest reader failed", self.name)
        error = QtestProtocolError(f"{self.name}: the qtest reader failed: {exc!r}")
        error.__cause__ = exc
        self._fail(error)

    def _earliest_deadline(self) -> _Deadline:
        """The earliest deadline of a request still waiting for its reply (inf: none)."""
        return min((s.deadline for s in self._pending if not s.abandoned), default=math.inf)

    def _expire(self, now: _Deadline) -> None:
        """Time out the requests whose deadline has passed: their callers raise
        QtestTimeout, and their slots stay queued (abandoned) until the late reply comes."""
        for slot in self._pending:
            if not slot.abandoned and slot.deadline <= now:
                slot.abandoned = True
                slot.finish()

    def _line_too_long(self, head: bytes) -> NoReturn:
        raise QtestProtocolError(f"{self.name}: a qtest line longer than {_MAX_LINE} bytes", head)

    def _dispatch(self, raw: bytes) -> None:
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            raise QtestProtocolError(f"{self.name}: a qtest line that is not ASCII", raw) from None
        if line.startswith("IRQ "):
            self._on_irq(line, raw)
            return
        verb = line.partition(" ")[0]
        if verb not in ("OK", "FAIL", "ERR"):
            raise QtestProtocolError(f"{self.name}: not a qtest reply", raw)
        if not self._pending:
            raise QtestProtocolError(f"{self.name}: a qtest reply to no request", raw)
        slot = self._pending.popleft()
        self._slots.release()
        if slot.abandoned:
            self.discarded_replies += 1
            log.debug("%s: discarded the late reply %r", self.name, _short(line))
            return
        slot.reply = line
        slot.finish()

    def _on_irq(self, line: str, raw: bytes) -> None:
        words = line.split(" ")
        if len(words) != 3 or words[1] not in ("raise", "lower") or not words[2].isdigit():
            raise QtestProtocolError(f"{self.name}: a malformed qtest IRQ line", raw)
        event = IrqEvent(int(words[2]), words[1] == "raise")
        self._irq_levels[event.irq] = event.raised
        self.irq_count += 1
        for subscription in tuple(self._irq_subscriptions):
            subscription._offer(event)
        self._irq_changed.set()
        self._irq_changed = trio.Event()

    async def _on_eof(self, cause: BaseException | None = None) -> None:
        """QEMU closed the channel: usually it is exiting. Give the machine a moment to
        learn that, so waiters get :class:`~trio_qemu.MachineExited` when QEMU died."""
        await self._wait_for_exit()
        error = self.machine.failure or QtestProtocolError(
            f"{self.name}: QEMU closed the qtest channel (it exited or was shut down)"
        )
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        self._fail(error)

    async def _wait_for_exit(self) -> None:
        """Wait up to :data:`~trio_qemu._util.EOF_GRACE` s for QEMU's exit to be known to the
        machine, so waiters fail with :class:`~trio_qemu.MachineExited` rather than a bare
        "closed"."""
        await self.machine.wait_exited(EOF_GRACE)

    def _fail(self, error: BaseException, *, orderly: bool = False) -> None:
        """Fail every pending request and end every IRQ subscription with ``error``; later
        requests raise it too. ``orderly``: the block ended, IRQ streams just end.
        Idempotent: the first error wins."""
        if self._error is not None:
            return
        self._error = error
        self._orderly = orderly
        while self._pending:
            slot = self._pending.popleft()
            slot.error = error
            slot.finish()
            self._slots.release()
        for subscription in tuple(self._irq_subscriptions):
            subscription._send.close()
        self._irq_changed.set()
        if self._timer is not None:
            self._timer.cancel()  # the reader task stops

    def _close(self) -> None:
        """End the channel because its block ended: later requests raise "closed", IRQ
        streams just end."""
        self._fail(QtestProtocolError(f"{self.name}: the qtest machine is closed"), orderly=True)
