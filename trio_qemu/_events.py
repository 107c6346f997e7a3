"""Fan-out of QMP events to subscribers, with bounded memory everywhere.

One reader task calls :meth:`EventHub.publish` for each event. Every subscription has its
own bounded memory channel (``clone()`` is not broadcast) and gets its own copy of every
matching event; a full subscriber never blocks the reader: the event is dropped for that
subscriber, counted, and the next ``receive()`` raises :class:`~trio_qemu.EventsDropped` once.

Independently of subscriptions, every event that no ``wait()`` took goes to a bounded
cache, so ``event_wait`` finds an event that arrived before the wait began, as
``QEMUMachine.event_wait`` does (its events stay until a wait claims them or they are
cleared). A subscription watching events therefore never steals them from ``event_wait``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from ._errors import QMPConnectionClosed, QMPTimeout, copy_error
from ._util import BoundedStream

__all__ = ["EventHub", "QMPEvent", "Subscription", "event_match"]

T = TypeVar("T")

log = logging.getLogger("trio_qemu.events")

#: A QMP event as received: ``{"event": NAME, "data": {...}, "timestamp": {...}}``.
QMPEvent = dict[str, Any]


def event_match(event: object, match: object = None) -> bool:
    """Whether ``event`` matches the sub-dict ``match``, with ``QEMUMachine``'s semantics.

    ``match`` is checked recursively to be a subset of ``event``: every key of a mapping
    must be present with a matching value; ``None`` matches anything (so a ``None`` value
    cannot be asked for explicitly); any other value must be equal.

    >>> event_match({"foo": {"bar": 1}}, {"foo": None})
    True
    >>> event_match({"foo": {"bar": 1}}, {"foo": {"abc": None}})
    False
    >>> event_match({"foo": {"bar": 1, "rab": 2}}, {"foo": {"rab": 2}})
    True
    """
    if match is None:
        return True
    if isinstance(match, Mapping):
        if not isinstance(event, Mapping):
            return False
        return all(key in event and event_match(event[key], value) for key, value in match.items())
    return bool(event == match)


class Subscription(BoundedStream[QMPEvent]):
    """A stream of the events that match some names and a sub-dict, in arrival order.

    Use it as a (sync or async) context manager; leaving it unsubscribes. ``receive()``
    returns the next event; it raises :class:`~trio_qemu.EventsDropped` once after the buffer
    overflowed, the hub's error after the connection failed, and ``trio.EndOfChannel`` after a
    clean end. Async iteration ends at the clean end.
    """

    def __init__(
        self,
        hub: EventHub,
        names: frozenset[str] | None,
        match: Mapping[str, object] | None,
        buffer: int,
    ) -> None:
        super().__init__(buffer, registry=hub._subscriptions, raise_end=hub._raise_error)
        self.names = names
        self.match = match

    def _offer(self, event: QMPEvent) -> bool:
        """Deliver ``event`` if it matches; never blocks. Returns whether it matched."""
        if self.names is not None and event.get("event") not in self.names:
            return False
        if self.match is not None and not event_match(event, self.match):
            return False
        self._deliver(event)
        return True


class _Waiter:
    """One pending ``wait()``: the first matching event is handed to it."""

    __slots__ = ("done", "event", "pairs")

    def __init__(self, pairs: Sequence[tuple[str, Mapping[str, object] | None]]) -> None:
        self.pairs = pairs
        self.event: QMPEvent | None = None
        self.done = trio.Event()

    def accepts(self, event: QMPEvent) -> bool:
        name = event.get("event")
        return any(name == want and event_match(event, match) for want, match in self.pairs)


class EventHub:
    """Copies each published event to matching subscriptions, and hands it to every pending
    waiter it matches (concurrent waits for the same event all get it) or, if none, keeps it
    in the unclaimed cache."""

    def __init__(self, *, cache_size: int = 1000, default_buffer: int = 2048) -> None:
        if cache_size < 0 or default_buffer < 1:
            raise ValueError("cache_size must be >= 0 and default_buffer >= 1")
        self.default_buffer = default_buffer
        self._subscriptions: set[Subscription] = set()
        self._waiters: list[_Waiter] = []
        self._unclaimed: deque[QMPEvent] = deque(maxlen=cache_size)
        self._closed = False
        self._error: BaseException | None = None
        #: events pushed out of the full unclaimed cache
        self.evicted = 0

    # -- the reader's side -------------------------------------------------------------
    def publish(self, event: QMPEvent) -> None:
        """Deliver one event. Synchronous and non-blocking: the reader never waits here."""
        for sub in tuple(self._subscriptions):
            sub._offer(event)
        claimed = False
        if self._waiters:
            for waiter in tuple(self._waiters):
                if waiter.accepts(event):
                    waiter.event = event
                    waiter.done.set()
                    self._waiters.remove(waiter)
                    claimed = True
        if not claimed and self._unclaimed.maxlen:
            if len(self._unclaimed) == self._unclaimed.maxlen:
                self.evicted += 1
            self._unclaimed.append(event)

    def close(self, error: BaseException | None = None) -> None:
        """End every subscription and wait; later waits raise ``error`` (or a closed error).

        Idempotent; the first error given wins.
        """
        if self._closed:
            return
        self._closed = True
        self._error = error
        for sub in tuple(self._subscriptions):
            sub._send.close()
        for waiter in self._waiters:
            waiter.done.set()
        self._waiters.clear()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _raise_error(self) -> None:
        if self._error is not None:
            raise copy_error(self._error)

    # -- the users' side ---------------------------------------------------------------
    def subscribe(
        self,
        *names: str,
        match: Mapping[str, object] | None = None,
        buffer: int | None = None,
    ) -> Subscription:
        """Subscribe to the events called ``names`` (all events when none are given)."""
        sub = Subscription(
            self,
            frozenset(names) if names else None,
            match,
            self.default_buffer if buffer is None else buffer,
        )
        if self._closed:
            sub._send.close()
        else:
            self._subscriptions.add(sub)
        return sub

    def take_unclaimed(self) -> list[QMPEvent]:
        """Remove and return the cached events no ``wait()`` claimed, oldest first."""
        events = list(self._unclaimed)
        self._unclaimed.clear()
        return events

    async def wait(
        self,
        pairs: Iterable[tuple[str, Mapping[str, object] | None]],
        timeout: float | None = 60.0,
    ) -> QMPEvent:
        """The first event matching any ``(name, match)`` pair, claimed from the cache first.

        Raises :class:`~trio_qemu.QMPTimeout` after ``timeout`` seconds (``None``: no limit)
        and the hub's error (or :class:`~trio_qemu.QMPConnectionClosed`) once it is closed.
        """
        waiter = _Waiter(tuple(pairs))
        await trio.lowlevel.checkpoint_if_cancelled()  # before claiming: a cancel loses nothing
        for event in self._unclaimed:
            if waiter.accepts(event):
                self._unclaimed.remove(event)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return event
        if self._closed:
            await trio.lowlevel.checkpoint()
            self._raise_error()
            raise QMPConnectionClosed("the QMP connection is closed: no more events")
        self._waiters.append(waiter)
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await waiter.done.wait()
        except BaseException:
            if waiter.event is not None:  # delivered, then we were cancelled: keep it
                self._unclaimed.appendleft(waiter.event)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if waiter.event is not None:
            return waiter.event
        if self._closed:
            self._raise_error()
            raise QMPConnectionClosed("the QMP connection closed while waiting for an event")
        names = ", ".join(name for name, _ in waiter.pairs)
        raise QMPTimeout(f"no event {names} within {timeout} s")
