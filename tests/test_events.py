"""Pure tests of the event fan-out (`trio_qemu._events`): no QEMU.

``event_match`` against a table (QEMUMachine.event_match's docstring cases first), then
:class:`EventHub`: bounded subscriber buffers and the drop report, the bounded cache of
unclaimed events, ``wait`` claiming from that cache, and what ``close`` does to everyone.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_qemu import EventsDropped, QMPBadMessage, QMPConnectionClosed, QMPTimeout
from trio_qemu._events import EventHub, QMPEvent, event_match


def ev(name: str, **data: Any) -> QMPEvent:
    """An event shaped like QEMU's."""
    event: QMPEvent = {"event": name, "timestamp": {"seconds": 1, "microseconds": 2}}
    if data:
        event["data"] = data
    return event


# -- event_match ---------------------------------------------------------------------------

MATCH_CASES: list[tuple[str, object, object, bool]] = [
    # (id, event, match, expected); the first five are QEMUMachine.event_match's docstring
    ("qemu-none-matches-dict", {"foo": {"bar": 1}}, {"foo": None}, True),
    ("qemu-none-matches-int", {"foo": 5}, {"foo": None}, True),
    ("qemu-missing-nested-key", {"foo": {"bar": 1}}, {"foo": {"abc": None}}, False),
    ("qemu-nested-subset", {"foo": {"bar": 1, "rab": 2}}, {"foo": {"rab": 2}}, True),
    ("qemu-none-matches-anything", {"foo": {"bar": 1}}, None, True),
    ("none-matches-scalar", 5, None, True),
    ("none-matches-none", None, None, True),
    ("empty-dict-matches-any-dict", {"a": 1}, {}, True),
    ("missing-top-key", {"foo": 1}, {"bar": None}, False),
    ("equal-scalar", {"foo": 1}, {"foo": 1}, True),
    ("unequal-scalar", {"foo": 1}, {"foo": 2}, False),
    ("equal-string", {"reason": "host-qmp-quit"}, {"reason": "host-qmp-quit"}, True),
    ("unequal-string", {"reason": "host-qmp-quit"}, {"reason": "guest-shutdown"}, False),
    ("string-is-not-a-prefix-match", {"reason": "host-qmp-quit"}, {"reason": "host"}, False),
    ("dict-match-against-scalar-value", {"foo": 5}, {"foo": {"bar": 1}}, False),
    ("scalar-match-against-dict-value", {"foo": {"bar": 1}}, {"foo": 1}, False),
    ("dict-match-against-non-dict-event", 5, {"foo": None}, False),
    ("dict-match-against-list-event", ["foo"], {"foo": None}, False),
    ("scalar-against-scalar-equal", "STOP", "STOP", True),
    ("scalar-against-scalar-unequal", "STOP", "RESUME", False),
    ("list-equal", {"l": [1, {"a": 2}]}, {"l": [1, {"a": 2}]}, True),
    ("list-is-not-a-subset-match", {"l": [1, 2, 3]}, {"l": [1, 2]}, False),
    ("list-order-matters", {"l": [1, 2]}, {"l": [2, 1]}, False),
    ("list-elements-not-sub-dict-matched", {"l": [{"a": 1, "b": 2}]}, {"l": [{"a": 1}]}, False),
    ("bool-equal", {"guest": False}, {"guest": False}, True),
    ("bool-unequal", {"guest": False}, {"guest": True}, False),
    (
        "deep-subset",
        {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}},
        {"event": "SHUTDOWN", "data": {"reason": "host-qmp-quit"}},
        True,
    ),
    (
        "deep-mismatch",
        {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}},
        {"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}},
        False,
    ),
    ("wrong-event-name", {"event": "STOP"}, {"event": "RESUME"}, False),
]


@pytest.mark.parametrize(
    ("event", "match", "expected"),
    [pytest.param(e, m, x, id=i) for i, e, m, x in MATCH_CASES],
)
def test_event_match(event: object, match: object, expected: bool) -> None:
    assert event_match(event, match) is expected


# -- subscriptions -----------------------------------------------------------------------


async def test_subscription_gets_named_events_in_order() -> None:
    hub = EventHub()
    with hub.subscribe("STOP", "RESUME") as sub:
        for name in ["STOP", "SHUTDOWN", "RESUME", "STOP"]:
            hub.publish(ev(name))
        got = [sub.receive_nowait()["event"] for _ in range(3)]
        assert got == ["STOP", "RESUME", "STOP"]
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()


async def test_subscription_without_names_gets_everything_and_match_filters() -> None:
    hub = EventHub()
    with hub.subscribe() as everything, hub.subscribe(match={"data": {"n": 2}}) as only_two:
        for n in range(4):
            hub.publish(ev("X", n=n))
        assert [(await everything.receive())["data"]["n"] for _ in range(4)] == [0, 1, 2, 3]
        assert (await only_two.receive())["data"]["n"] == 2
        with pytest.raises(trio.WouldBlock):
            only_two.receive_nowait()


async def test_overflow_is_reported_once_then_buffered_events_arrive() -> None:
    hub = EventHub()
    sub = hub.subscribe("X", buffer=2)
    for n in range(5):
        hub.publish(ev("X", n=n))
    with pytest.raises(EventsDropped) as info:
        await sub.receive()
    assert info.value.count == 3
    assert sub.dropped == 3
    # the two that fit are the first two, and the drop is not reported again
    assert (await sub.receive())["data"]["n"] == 0
    assert (await sub.receive())["data"]["n"] == 1
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    # it keeps working after the report
    hub.publish(ev("X", n=5))
    assert (await sub.receive())["data"]["n"] == 5
    assert sub.dropped == 3


async def test_full_subscriber_never_blocks_publish_or_starves_others() -> None:
    hub = EventHub()
    full = hub.subscribe("X", buffer=1)
    other = hub.subscribe("X", buffer=100)
    for n in range(50):  # synchronous: it returns every time, nobody is reading yet
        hub.publish(ev("X", n=n))
    assert [other.receive_nowait()["data"]["n"] for _ in range(50)] == list(range(50))
    assert full.dropped == 49
    with pytest.raises(EventsDropped) as info:
        full.receive_nowait()
    assert info.value.count == 49
    assert full.receive_nowait()["data"]["n"] == 0


async def test_buffer_defaults_to_the_hubs_default() -> None:
    hub = EventHub(default_buffer=3)
    sub = hub.subscribe("X")
    for n in range(5):
        hub.publish(ev("X", n=n))
    assert sub.dropped == 2


def test_zero_buffer_is_rejected() -> None:
    hub = EventHub()
    with pytest.raises(ValueError):
        hub.subscribe("X", buffer=0)


def test_negative_buffer_is_rejected() -> None:
    with pytest.raises(ValueError):
        EventHub().subscribe("X", buffer=-1)


@pytest.mark.parametrize("sizes", [{"cache_size": -1}, {"default_buffer": 0}])
def test_hub_sizes_are_checked(sizes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="cache_size must be >= 0 and default_buffer >= 1"):
        EventHub(**sizes)
    EventHub(cache_size=0, default_buffer=1)  # the smallest allowed


async def test_leaving_a_subscription_unsubscribes() -> None:
    hub = EventHub()
    with hub.subscribe("X") as sub:
        hub.publish(ev("X", n=0))
    hub.publish(ev("X", n=1))
    with pytest.raises(trio.ClosedResourceError):
        sub.receive_nowait()


async def test_async_with_subscription_unsubscribes() -> None:
    hub = EventHub()
    async with hub.subscribe("X") as sub:
        hub.publish(ev("X", n=0))
        assert (await sub.receive())["data"]["n"] == 0
    hub.publish(ev("X", n=1))
    with pytest.raises(trio.ClosedResourceError):
        sub.receive_nowait()


# -- the unclaimed cache -----------------------------------------------------------------


def test_unclaimed_cache_is_bounded() -> None:
    hub = EventHub(cache_size=3)
    for n in range(5):
        hub.publish(ev("X", n=n))
    assert [e["data"]["n"] for e in hub.take_unclaimed()] == [2, 3, 4]
    assert hub.evicted == 2
    assert hub.take_unclaimed() == []  # taking empties it


def test_cache_size_zero_keeps_nothing() -> None:
    hub = EventHub(cache_size=0)
    hub.publish(ev("X"))
    assert hub.take_unclaimed() == []


def test_subscriptions_never_take_events_from_the_cache() -> None:
    # A task watching events must not make event_wait miss them (as QEMUMachine keeps every
    # event until a wait claims it).
    hub = EventHub()
    with hub.subscribe("STOP") as sub, hub.subscribe("X", buffer=1) as full:
        hub.publish(ev("STOP"))
        hub.publish(ev("X", n=0))
        hub.publish(ev("X", n=1))  # dropped for the full subscriber, still cached
        assert sub.receive_nowait()["event"] == "STOP"
        assert full.dropped == 1
    assert [e["event"] for e in hub.take_unclaimed()] == ["STOP", "X", "X"]


async def test_event_wait_sees_an_event_a_subscriber_also_got() -> None:
    hub = EventHub()
    with hub.subscribe() as watcher:
        hub.publish(ev("STOP"))
        got = await hub.wait([("STOP", None)], timeout=0)
        assert got["event"] == "STOP"
        assert watcher.receive_nowait() is got
    assert hub.take_unclaimed() == []  # the wait claimed it


# -- wait --------------------------------------------------------------------------------


async def test_wait_claims_from_the_cache_and_removes_it() -> None:
    hub = EventHub()
    hub.publish(ev("A", n=0))
    hub.publish(ev("B", n=1))
    hub.publish(ev("B", n=2))
    got = await hub.wait([("B", None)], timeout=0)
    assert got["data"]["n"] == 1  # the oldest matching one
    assert [(e["event"], e["data"]["n"]) for e in hub.take_unclaimed()] == [("A", 0), ("B", 2)]


async def test_wait_with_match_takes_the_matching_one_from_the_cache() -> None:
    hub = EventHub()
    for n in range(3):
        hub.publish(ev("X", n=n))
    got = await hub.wait([("X", {"data": {"n": 2}})], timeout=0)
    assert got["data"]["n"] == 2
    assert [e["data"]["n"] for e in hub.take_unclaimed()] == [0, 1]


async def test_wait_for_any_of_several_returns_the_first_to_arrive() -> None:
    hub = EventHub()
    hub.publish(ev("STOP"))
    hub.publish(ev("RESUME"))
    got = await hub.wait([("RESUME", None), ("STOP", None)], timeout=0)
    assert got["event"] == "STOP"
    got = await hub.wait([("RESUME", None), ("STOP", None)], timeout=0)
    assert got["event"] == "RESUME"


async def test_pending_wait_gets_a_later_event_which_is_then_not_cached() -> None:
    hub = EventHub()
    result: list[QMPEvent] = []

    async def waiter() -> None:
        result.append(await hub.wait([("X", {"data": {"n": 1}})], timeout=None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish(ev("X", n=0))  # does not match: cached
        hub.publish(ev("X", n=1))
    assert [e["data"]["n"] for e in result] == [1]
    assert [e["data"]["n"] for e in hub.take_unclaimed()] == [0]


async def test_wait_times_out(autojump_clock: trio.abc.Clock) -> None:
    hub = EventHub()
    hub.publish(ev("OTHER"))
    start = trio.current_time()
    with pytest.raises(QMPTimeout, match="no event X, Y within 5 s"):
        await hub.wait([("X", None), ("Y", None)], timeout=5)
    assert trio.current_time() - start == pytest.approx(5)
    # a timed-out wait leaves no waiter behind: the next event is cached
    hub.publish(ev("X"))
    assert [e["event"] for e in hub.take_unclaimed()] == ["OTHER", "X"]


async def test_wait_cancelled_after_delivery_keeps_the_event() -> None:
    """Cancel the waiting task right after the event was handed to it (same tick)."""
    hub = EventHub()
    result: list[QMPEvent] = []
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            result.append(await hub.wait([("X", None)], timeout=None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish(ev("X"))
        scope.cancel()
    # either the waiter got it or it went back to the cache: it is not lost
    assert len(result) + len(hub.take_unclaimed()) == 1


async def test_wait_cancelled_then_delivered_in_the_same_tick_keeps_the_event() -> None:
    """The cancel lands first, then the event is handed to the (still listed) waiter."""
    hub = EventHub()
    result: list[QMPEvent] = []
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            result.append(await hub.wait([("X", None)], timeout=None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        hub.publish(ev("X"))
    assert result == []
    assert [e["event"] for e in hub.take_unclaimed()] == ["X"]


async def test_cancelled_wait_does_not_consume_a_cached_event() -> None:
    hub = EventHub()
    hub.publish(ev("X"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await hub.wait([("X", None)], timeout=None)
    assert scope.cancelled_caught
    assert [e["event"] for e in hub.take_unclaimed()] == ["X"]


# -- close -------------------------------------------------------------------------------


async def test_close_with_error_fails_receive_and_wait() -> None:
    hub = EventHub()
    sub = hub.subscribe("X")
    hub.publish(ev("X", n=0))
    pending: list[BaseException] = []

    async def waiter() -> None:
        try:
            await hub.wait([("Y", None)], timeout=None)
        except QMPBadMessage as exc:
            pending.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        hub.close(QMPBadMessage("garbage from the peer"))
    assert len(pending) == 1
    assert hub.closed
    # what was buffered before the end is still delivered, then the error
    assert (await sub.receive())["data"]["n"] == 0
    with pytest.raises(QMPBadMessage, match="garbage"):
        await sub.receive()
    with pytest.raises(QMPBadMessage, match="garbage"):
        await hub.wait([("Z", None)], timeout=1)
    # an event that arrived before the end is still there for a wait
    assert (await hub.wait([("X", None)], timeout=1))["data"]["n"] == 0
    with pytest.raises(QMPBadMessage):
        async for _ in sub:
            pass
    # a subscription made after the end fails the same way
    with pytest.raises(QMPBadMessage):
        await hub.subscribe("X").receive()


async def test_close_clean_ends_iteration_and_wait_raises_closed() -> None:
    hub = EventHub()
    sub = hub.subscribe("X")
    hub.publish(ev("X", n=0))
    hub.publish(ev("X", n=1))
    pending: list[BaseException] = []

    async def waiter() -> None:
        try:
            await hub.wait([("Y", None)], timeout=None)
        except QMPConnectionClosed as exc:
            pending.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.closed is False
        hub.close(None)
    assert len(pending) == 1
    assert "QMP connection closed while waiting for an event" in str(pending[0])
    assert [e["data"]["n"] async for e in sub] == [0, 1]
    with pytest.raises(trio.EndOfChannel):
        await sub.receive()
    with pytest.raises(QMPConnectionClosed, match="QMP connection is closed: no more events"):
        await hub.wait([("Z", None)], timeout=1)
    assert [e async for e in hub.subscribe("X")] == []


async def test_wait_after_close_still_finds_cached_events() -> None:
    hub = EventHub()
    hub.publish(ev("X"))
    hub.close(None)
    assert (await hub.wait([("X", None)], timeout=0))["event"] == "X"
    with pytest.raises(QMPConnectionClosed):
        await hub.wait([("X", None)], timeout=0)


async def test_close_is_idempotent_and_the_first_error_wins() -> None:
    hub = EventHub()
    sub = hub.subscribe("X")
    hub.close(QMPBadMessage("first"))
    hub.close(QMPConnectionClosed("second"))
    hub.close(None)
    with pytest.raises(QMPBadMessage, match="first"):
        await sub.receive()
