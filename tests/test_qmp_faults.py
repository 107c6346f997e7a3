"""QMPClient against a misbehaving fake QMP server (tests/fakepeer.py).

Every bad behaviour must end in its own error of ours, quickly (each body runs under
``trio.fail_after(2)``), with the client closed and every pending call, wait and subscription
receiving the error.
"""

from __future__ import annotations

import contextlib
import json
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from fakepeer import DEFAULT_GREETING, FakePeer, encode, encode_all, fake_pair, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp.error import ProtocolError, QMPError

from trio_qemu import (
    EventsDropped,
    MachineError,
    QMPBadMessage,
    QMPClient,
    QMPConnectionClosed,
    QMPGreetingError,
    QMPNegotiationError,
    QMPProtocolError,
    QMPTimeout,
    QMPUnexpectedReply,
    open_qmp,
)
from trio_qemu._qmp import DEFAULT_MAX_MESSAGE_SIZE

BOUND = 2.0  # seconds: every test body must finish within this
PROMPT = 1.5  # seconds: "promptly" for one failure, with room for a loaded 2-core machine


class Harness:
    """Makes client/peer pairs and closes them all after the test."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._opened: list[tuple[QMPClient, FakePeer]] = []

    def pair(self, *, timeout: float = 10.0, **options: Any) -> tuple[QMPClient, FakePeer]:
        """A client that has not shaken hands yet, and its peer."""
        stream, peer = fake_pair()
        client = QMPClient(stream, timeout=timeout, **options)
        self._opened.append((client, peer))
        return client, peer

    async def connect(
        self, *, negotiate: bool = True, timeout: float = 10.0, **options: Any
    ) -> tuple[QMPClient, FakePeer]:
        """A client past the handshake (unless ``negotiate=False``) with its reader running."""
        client, peer = self.pair(timeout=timeout, **options)
        if negotiate:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.handshake)
                await client.handshake()
        await self._nursery.start(client.run)
        return client, peer

    async def aclose(self) -> None:
        for client, peer in self._opened:
            await client.aclose()
            await peer.aclose()


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = Harness(nursery)
    yield h
    await h.aclose()


async def _capture(results: dict[str, object], key: str, fn: Callable[[], Awaitable[Any]]) -> None:
    try:
        results[key] = await fn()
    except Exception as exc:
        results[key] = exc


async def provoke(
    client: QMPClient, peer: FakePeer, payload: bytes, *, close: bool = False
) -> dict[str, object]:
    """With a call, an event wait and a subscription pending, let the peer send ``payload``
    (then hang up with ``close``); return what each of the three ended with."""
    results: dict[str, object] = {}
    with client.subscribe("NEVER_SENT", buffer=4) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_capture, results, "call", partial(client.cmd, "query-status"))
            nursery.start_soon(
                _capture, results, "wait", partial(client.event_wait, "NEVER_SENT", None)
            )
            nursery.start_soon(_capture, results, "sub", sub.receive)
            request = await peer.read_request()
            assert request["execute"] == "query-status"
            await trio.testing.wait_all_tasks_blocked()
            if payload:
                await peer.send_raw(payload)
            if close:
                await peer.aclose()
    return results


def _event_line(size: int) -> bytes:
    return encode(make_event("BIG", {"blob": "e" * size}))


BAD_INPUT = [
    # 1. not JSON
    pytest.param(b"{not json}\r\n", False, {}, QMPBadMessage, id="not-json"),
    pytest.param(b"\r\n{\r\n", False, {}, QMPBadMessage, id="half-object-line"),
    # 2. JSON that is not an object
    pytest.param(b"[1, 2]\r\n", False, {}, QMPBadMessage, id="list"),
    pytest.param(b'"hello"\r\n', False, {}, QMPBadMessage, id="string"),
    pytest.param(b"42\r\n", False, {}, QMPBadMessage, id="number"),
    pytest.param(b"null\r\n", False, {}, QMPBadMessage, id="null"),
    # 5. oversized lines
    pytest.param(
        _event_line(2000), False, {"max_message_size": 1024}, QMPBadMessage, id="oversized-line"
    ),
    pytest.param(
        b"a" * 2000, False, {"max_message_size": 1024}, QMPBadMessage, id="oversized-no-newline"
    ),
    pytest.param(
        _event_line(300) + _event_line(2000),
        False,
        {"max_message_size": 1024},
        QMPBadMessage,
        id="oversized-after-a-good-line",
    ),
    # 6. unknown id
    pytest.param(encode({"return": {}, "id": 999}), False, {}, QMPUnexpectedReply, id="unknown-id"),
    # 7. no id, unhashable id, id of another type that equals ours
    pytest.param(
        encode({"error": {"class": "GenericError", "desc": "nope"}}),
        False,
        {},
        QMPUnexpectedReply,
        id="error-without-id",
    ),
    pytest.param(encode({"return": {}}), False, {}, QMPUnexpectedReply, id="return-without-id"),
    pytest.param(encode({"return": {}, "id": [1]}), False, {}, QMPUnexpectedReply, id="list-id"),
    pytest.param(
        encode({"return": {}, "id": {"a": 1}}), False, {}, QMPUnexpectedReply, id="dict-id"
    ),
    pytest.param(encode({"return": {}, "id": True}), False, {}, QMPUnexpectedReply, id="true-id"),
    pytest.param(encode({"return": {}, "id": 1.0}), False, {}, QMPUnexpectedReply, id="float-id"),
    # 8. EOF in the middle of a line
    pytest.param(b'{"return": {}, "id"', True, {}, QMPBadMessage, id="eof-mid-line"),
    # 9. not UTF-8
    pytest.param(b'{"return": "\xff\xfe", "id": 1}\r\n', False, {}, QMPBadMessage, id="not-utf8"),
    pytest.param(b"\xc3\x28\r\n", False, {}, QMPBadMessage, id="bad-utf8-only"),
    # 11. neither a reply nor an event
    pytest.param(encode({"foo": 1}), False, {}, QMPBadMessage, id="neither"),
    pytest.param(encode({}), False, {}, QMPBadMessage, id="empty-object"),
    # an event whose name is not a string (would crash a named subscription)
    pytest.param(
        encode({"event": [1], "timestamp": {}}), False, {}, QMPBadMessage, id="event-list-name"
    ),
    pytest.param(encode({"event": 5}), False, {}, QMPBadMessage, id="event-number-name"),
]


@pytest.mark.parametrize(("payload", "close", "options", "expected"), BAD_INPUT)
async def test_bad_input_fails_everything_pending(
    harness: Harness,
    payload: bytes,
    close: bool,
    options: dict[str, Any],
    expected: type[QMPProtocolError],
) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect(**options)
        results = await provoke(client, peer, payload, close=close)
        for key, outcome in results.items():
            assert isinstance(outcome, expected), (key, outcome)
            assert outcome.raw, (key, outcome)  # the offending bytes are shown
        assert client.closed
        assert isinstance(client.error, expected)
        # distinct copies, so tracebacks do not pile up on one instance
        assert len({id(outcome) for outcome in results.values()}) == 3
        with pytest.raises(expected):
            await client.cmd("query-status")
        with pytest.raises(expected):
            await client.event_wait("ANY", timeout=None)


async def test_clean_eof_fails_pending_call_with_connection_closed(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        results = await provoke(client, peer, b"", close=True)
        assert isinstance(results["call"], QMPConnectionClosed)
        assert isinstance(results["wait"], QMPConnectionClosed)
        assert isinstance(results["sub"], trio.EndOfChannel)  # a clean end of the events
        assert client.closed
        assert client.error is None
        with pytest.raises(QMPConnectionClosed):
            await client.cmd("query-status")


async def test_clean_eof_after_whitespace_is_clean(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        results = await provoke(client, peer, b"\r\n  \r\n ", close=True)
        assert isinstance(results["call"], QMPConnectionClosed)
        assert client.error is None


# -- 3, 4, 10: the handshake ---------------------------------------------------------------
@pytest.mark.parametrize(
    "greeting",
    [
        {"hello": 1},
        {"QMP": 5},
        {"QMP": {"version": {}, "capabilities": 3}},
        {"QMP": {"version": 5}},
    ],
)
async def test_bad_greeting(harness: Harness, greeting: object) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()
        await peer.send_greeting(greeting)
        with pytest.raises(QMPGreetingError) as info:
            await client.handshake()
        assert info.value.raw is not None
        assert json.loads(info.value.raw) == greeting
        assert client.closed
        assert isinstance(client.error, QMPGreetingError)
        with pytest.raises(QMPGreetingError):
            await client.cmd("query-status")


@pytest.mark.parametrize("greeting", [b"[1]\r\n", b"garbage\r\n", b"\xff\r\n"])
async def test_greeting_not_an_object(harness: Harness, greeting: bytes) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()
        await peer.send_raw(greeting)
        with pytest.raises(QMPBadMessage):
            await client.handshake()
        assert client.closed


async def test_eof_before_greeting(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()
        await peer.aclose()
        with pytest.raises(QMPConnectionClosed):
            await client.handshake()
        assert client.closed


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"error": {"class": "CommandNotFound", "desc": "no"}}, QMPNegotiationError),
        ({"return": 5}, QMPNegotiationError),
        ({"return": {"x": 1}}, QMPNegotiationError),
        ({"event": "STOP", "timestamp": {}}, QMPNegotiationError),
        (b"not json\r\n", QMPBadMessage),
        (b"", QMPConnectionClosed),
    ],
)
async def test_bad_negotiation(harness: Harness, answer: object, expected: type[Exception]) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()

        async def server() -> None:
            await peer.send_greeting()
            request = await peer.read_request()
            assert request == {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
            if answer == b"":
                await peer.aclose()
            elif isinstance(answer, bytes):
                await peer.send_raw(answer)
            else:
                await peer.send(answer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(expected):
                await client.handshake()
        assert client.closed


async def test_greeting_without_oob_negotiates_without_arguments(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.handshake, {"QMP": {"version": {}, "capabilities": []}})
            greeting = await client.handshake()
        assert list(greeting.QMP.capabilities) == []
        assert peer.requests == [{"execute": "qmp_capabilities"}]


async def test_no_greeting_times_out(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, _peer = harness.pair(timeout=30.0)
        start = trio.current_time()
        with pytest.raises(QMPTimeout):
            await client.handshake(timeout=0.2)
        assert 0.2 <= trio.current_time() - start < PROMPT
        assert client.closed
        assert isinstance(client.error, QMPTimeout)


async def test_no_negotiation_answer_times_out(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair(timeout=0.2)
        await peer.send_greeting()
        with pytest.raises(QMPTimeout):
            await client.handshake()
        assert client.closed


async def test_unanswered_command_times_out_and_connection_stays_usable(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect(timeout=30.0)
        start = trio.current_time()
        with pytest.raises(QMPTimeout):
            await client.cmd("stuck", timeout=0.2)
        assert trio.current_time() - start < PROMPT
        assert not client.closed
        stuck = await peer.read_request()
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                request = await peer.read_request()
                await peer.reply(stuck, "late")  # dropped quietly
                await peer.reply(request, "fresh")

            nursery.start_soon(server)
            assert await client.cmd("query-status") == "fresh"
        assert not client.closed


# -- 12-16, 20: replies and events that must get through -----------------------------------
async def test_slow_drip(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = harness.pair()

        async def server() -> None:
            await peer.drip(encode(DEFAULT_GREETING), delay=0)
            await peer.read_request()
            await peer.drip(encode({"return": {}}), delay=0.001)
            request = await peer.read_request()
            await peer.drip(encode({"return": {"status": "running"}, "id": request["id"]}))
            await peer.drip(encode(make_event("STOP")), delay=0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            await client.handshake()
            nursery.start_soon(client.run)
            assert await client.cmd("query-status") == {"status": "running"}
            event = await client.event_wait("STOP", timeout=1)
            assert event["event"] == "STOP"
            await client.aclose()


async def test_event_flood_during_a_command(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        sub = client.subscribe("FLOOD", buffer=16)
        count = 10_000

        async def server() -> None:
            request = await peer.read_request()
            flood = encode_all(make_event("FLOOD", {"seq": i}, i) for i in range(count))
            await peer.send_raw(flood)
            await peer.reply(request, {"status": "running"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await client.cmd("query-status") == {"status": "running"}
        with pytest.raises(EventsDropped) as info:
            await sub.receive()
        assert info.value.count == count - 16
        assert sub.dropped == count - 16
        assert [sub.receive_nowait()["data"]["seq"] for _ in range(16)] == list(range(16))
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
        assert not client.closed
        sub.close()


async def test_replies_out_of_order(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        results: dict[str, object] = {}

        async def call(name: str) -> None:
            results[name] = await client.cmd(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first")
            nursery.start_soon(call, "second")
            one = await peer.read_request()
            two = await peer.read_request()
            await peer.send(
                {"return": two["execute"], "id": two["id"]},
                {"return": one["execute"], "id": one["id"]},
            )
        assert results == {"first": "first", "second": "second"}
        assert not client.closed


async def test_duplicate_reply(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()

        async def server() -> None:
            request = await peer.read_request()
            reply = {"return": "once", "id": request["id"]}
            await peer.send(reply, reply)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await client.cmd("query-status") == "once"
        with pytest.raises(QMPUnexpectedReply):
            await client.event_wait("NEVER_SENT", timeout=None)
        assert client.closed
        assert isinstance(client.error, QMPUnexpectedReply)


async def test_huge_allowed_event(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        blob = (string.ascii_letters * (1024 * 1024 // len(string.ascii_letters) + 1))[: 1 << 20]
        with client.subscribe("BIG") as sub:
            await peer.event("BIG", {"blob": blob})
            event = await sub.receive()
        assert event["data"]["blob"] == blob
        assert len(encode(event)) > DEFAULT_MAX_MESSAGE_SIZE // 10
        assert not client.closed


async def test_event_at_exactly_the_limit(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect(max_message_size=1024)
        line = encode(make_event("EDGE", {"blob": ""}))
        blob = "x" * (1024 - len(line) + 1)  # the line without "\n" is exactly 1024 bytes
        await peer.event("EDGE", {"blob": blob})
        event = await client.event_wait("EDGE", timeout=1)
        assert event["data"]["blob"] == blob
        assert not client.closed


async def test_late_reply_for_cancelled_call_is_dropped(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.cmd, "slow")
            slow = await peer.read_request()
            nursery.cancel_scope.cancel()
        await peer.reply(slow, "late")
        await trio.testing.wait_all_tasks_blocked()
        assert not client.closed

        async def server() -> None:
            request = await peer.read_request()
            await peer.reply(request, "next")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await client.cmd("query-status") == "next"
        assert not client.closed


# -- 17, 18: trouble while we send ---------------------------------------------------------
@pytest.mark.parametrize("read_first", [0, 65536])
async def test_peer_closes_while_we_send(harness: Harness, read_first: int) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect()

        async def closer() -> None:
            await peer.discard_some(read_first)
            await peer.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(closer)
            with pytest.raises(QMPConnectionClosed):
                await client.cmd("big", blob="x" * (8 << 20))
        assert client.closed


@pytest.mark.parametrize(
    ("client_timeout", "call_timeout"), [(0.3, None), (30.0, 0.3)], ids=["client", "call"]
)
async def test_peer_stops_reading_while_we_send(
    harness: Harness, client_timeout: float, call_timeout: float | None
) -> None:
    with trio.fail_after(BOUND):
        client, _peer = await harness.connect(timeout=client_timeout)
        start = trio.current_time()
        with pytest.raises(QMPTimeout):
            await client.cmd("big", blob="x" * (4 << 20), timeout=call_timeout)
        assert 0.3 <= trio.current_time() - start < PROMPT
        assert client.closed  # half a message may be on the wire: the stream is out of sync
        with pytest.raises(QMPTimeout):
            await client.cmd("query-status")


async def test_concurrent_callers_behind_a_stalled_send_time_out(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, _peer = await harness.connect(timeout=30.0)
        results: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _capture,
                results,
                "big",
                partial(client.cmd, "big", blob="x" * (4 << 20), timeout=0.5),
            )
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(
                _capture, results, "small", partial(client.cmd, "query-status", timeout=0.2)
            )
        assert isinstance(results["big"], QMPTimeout)
        assert isinstance(results["small"], QMPTimeout)


async def test_a_call_that_times_out_waiting_to_send_is_never_sent(harness: Harness) -> None:
    """A call whose deadline passes while it waits behind a slow send gives up unsent: its
    bytes never follow later (their reply would look foreign and close the connection)."""
    with trio.fail_after(BOUND):
        client, peer = await harness.connect(timeout=30.0)
        results: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _capture, results, "big", partial(client.cmd, "big", blob="x" * (4 << 20))
            )
            await trio.testing.wait_all_tasks_blocked()  # the big send is stalled
            with pytest.raises(QMPTimeout):
                await client.cmd("small", timeout=0.2)
            big = await peer.read_request()  # the peer reads again: the big send ends
            assert big["execute"] == "big"
            await peer.reply(big, "done")
        assert results["big"] == "done"

        async def server() -> None:
            request = await peer.read_request()
            assert request["execute"] == "query-status"  # not "small"
            await peer.reply(request, "next")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await client.cmd("query-status") == "next"
        assert not client.closed


# -- 19, 21: open_qmp ----------------------------------------------------------------------
async def test_open_qmp_raises_the_protocol_error_itself() -> None:
    stream, peer = fake_pair()

    async def server() -> None:
        await peer.handshake()
        await trio.sleep(0.05)
        await peer.send_raw(b"garbage\r\n")

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            start = trio.current_time()
            with pytest.raises(QMPBadMessage) as info:
                async with open_qmp(stream, timeout=1.0):
                    await trio.sleep_forever()
            assert not isinstance(info.value, BaseExceptionGroup)
            assert trio.current_time() - start < PROMPT
    await peer.aclose()


@pytest.mark.parametrize("waiting_on", ["call", "event_wait", "subscription"])
async def test_open_qmp_peer_hangs_up_during_the_block(waiting_on: str) -> None:
    # A clean EOF is no protocol error: the block is not cancelled (after "quit" a body goes
    # on, e.g. to wait for QEMU's exit), but whatever it waits on in the client ends promptly.
    stream, peer = fake_pair()

    async def server() -> None:
        await peer.handshake()
        if waiting_on == "call":
            await peer.read_request()
        else:
            await trio.sleep(0.05)
        await peer.aclose()

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            start = trio.current_time()
            async with open_qmp(stream, timeout=30.0) as client:
                if waiting_on == "call":
                    with pytest.raises(QMPConnectionClosed):
                        await client.cmd("quit")
                elif waiting_on == "event_wait":
                    with pytest.raises(QMPConnectionClosed):
                        await client.event_wait("NEVER_SENT", timeout=None)
                else:
                    with client.subscribe() as sub:
                        assert [event async for event in sub] == []
                assert client.closed
                assert client.error is None
            assert trio.current_time() - start < PROMPT


async def test_open_qmp_body_error_wins() -> None:
    stream, peer = fake_pair()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.handshake)
            with pytest.raises(KeyError):
                async with open_qmp(stream, timeout=1.0):
                    raise KeyError("mine")
    await peer.aclose()


async def test_negotiate_false_round_trip(harness: Harness) -> None:
    with trio.fail_after(BOUND):
        client, peer = await harness.connect(negotiate=False)
        assert client.greeting is None

        async def server() -> None:
            request = await peer.read_request()
            assert request == {"execute": "guest-ping", "id": request["id"]}
            await peer.reply(request)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await client.cmd("guest-ping") == {}
        assert peer.requests[0]["execute"] == "guest-ping"  # no qmp_capabilities was sent


async def test_open_qmp_negotiate_false() -> None:
    stream, peer = fake_pair()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)
            async with open_qmp(stream, negotiate=False, timeout=1.0) as client:
                assert await client.cmd("guest-info") == {}
                assert await client.cmd("guest-ping") == {}
        assert [r["execute"] for r in peer.requests] == ["guest-info", "guest-ping"]
    await peer.aclose()


# -- 22: the error family ------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls",
    [QMPProtocolError, QMPGreetingError, QMPNegotiationError, QMPBadMessage, QMPUnexpectedReply],
)
def test_protocol_errors_are_qemu_qmp_protocol_errors(cls: type[QMPProtocolError]) -> None:
    assert issubclass(cls, ProtocolError)
    assert issubclass(cls, MachineError)
    error = cls("boom", b"raw bytes")
    assert isinstance(error, ProtocolError)
    assert isinstance(error, MachineError)
    assert error.error_message == "boom"
    assert error.raw == b"raw bytes"
    assert "boom" in str(error) and "raw bytes" in str(error)


def test_other_errors_are_machine_errors() -> None:
    assert issubclass(QMPConnectionClosed, MachineError)
    assert issubclass(QMPConnectionClosed, QMPError)
    assert issubclass(QMPTimeout, MachineError)
    assert issubclass(QMPTimeout, TimeoutError)


# -- the fuzzer ----------------------------------------------------------------------------
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_ids = st.just(1) | st.integers(-2, 5) | _json
_messages = st.one_of(
    st.builds(lambda i, v: {"return": v, "id": i}, _ids, _json),
    st.builds(lambda v: {"return": v}, _json),
    st.builds(lambda i: {"error": {"class": "GenericError", "desc": "no"}, "id": i}, _ids),
    st.builds(
        lambda n, d: {"event": n, "data": d, "timestamp": {"seconds": 1, "microseconds": 2}},
        st.sampled_from(["FOO", "BAR", "BAZ"]) | _json,
        _json,
    ),
    st.dictionaries(st.text(max_size=6), _json, max_size=3),
)
_lines = _messages.map(lambda m: json.dumps(m).encode()) | st.binary(max_size=64)
_line_streams = st.builds(
    lambda lines, sep, last: sep.join(lines) + (sep if last else b""),
    st.lists(_lines, max_size=20),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)


async def _drain(sub: Any) -> None:
    while True:
        try:
            await sub.receive()
        except EventsDropped:
            continue
        except (trio.EndOfChannel, QMPProtocolError, QMPConnectionClosed):
            return


async def _fuzz_one(data: bytes, max_size: int) -> None:
    stream, peer = fake_pair()
    client = QMPClient(stream, timeout=2.0, max_message_size=max_size)
    outcomes: dict[str, object] = {}

    async def expect_ours(key: str, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            outcomes[key] = await fn()
        except (QMPProtocolError, QMPConnectionClosed) as exc:
            outcomes[key] = exc

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.handshake)
                await client.handshake()
            named = client.subscribe("FOO", buffer=2)
            everything = client.subscribe(buffer=2)
            matching = client.subscribe("BAR", match={"data": {"a": None}}, buffer=2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)  # must return by itself, never raise
                nursery.start_soon(expect_ours, "call", partial(client.qmp, "query-status"))
                nursery.start_soon(
                    expect_ours, "wait", partial(client.event_wait, "BAR", None, {"data": None})
                )
                for sub in (named, everything, matching):
                    nursery.start_soon(_drain, sub)
                await peer.read_request()
                with contextlib.suppress(trio.BrokenResourceError):  # the client gave up first
                    await peer.send_raw(data)
                await peer.aclose()
        assert client.closed
        assert set(outcomes) == {"call", "wait"}
        call = outcomes["call"]
        if isinstance(call, dict):
            assert call.get("id") == 1
    finally:
        await client.aclose()
        await peer.aclose()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=512) | _line_streams,
    max_size=st.sampled_from([256, DEFAULT_MAX_MESSAGE_SIZE]),
)
def test_fuzz_reader(data: bytes, max_size: int) -> None:
    trio.run(_fuzz_one, data, max_size)
