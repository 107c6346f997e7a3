"""Unit tests of the Trio plumbing in ``trio_qemu._util`` (no QEMU; fast)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_qemu import EventsDropped
from trio_qemu._util import (
    BlockOutcome,
    BoundedStream,
    LineSplitter,
    ShieldOnStart,
    keyboard_interrupt_in,
    only_cancelled,
    open_service_nursery,
    publish,
)


class Boom(Exception):
    """What a raising ``on_overflow`` raises; carries the head it was given."""

    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        self.head = head


def raising(head: bytes) -> None:
    raise Boom(head)


def is_head_of(head: bytes, line: bytes) -> bool:
    """Whether ``head``, given to ``on_overflow``, is the over-long ``line``'s first 200
    bytes (for a complete line shorter than that, what follows it may come along)."""
    return head.startswith(line[:200]) and len(head) <= 200


async def a_cancelled() -> trio.Cancelled:
    """A real ``trio.Cancelled`` (Trio offers no public constructor)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("the checkpoint was not cancelled")


# --- LineSplitter --------------------------------------------------------------------------


def test_lines_split_across_feeds() -> None:
    splitter = LineSplitter(100)
    splitter.feed(b"hel")
    assert list(splitter.lines) == []
    assert splitter.pending == b"hel"
    splitter.feed(b"lo")
    assert splitter.pending == b"hello"
    splitter.feed(b" world\nnex")
    assert list(splitter.lines) == [b"hello world"]
    assert splitter.pending == b"nex"
    splitter.feed(b"t")
    splitter.feed(b"\n")  # the newline alone
    assert list(splitter.lines) == [b"hello world", b"next"]
    assert splitter.pending == b""
    splitter.feed(bytearray(b"from a bytearray\n"))
    assert splitter.lines.pop() == b"from a bytearray"


def test_several_lines_per_feed_oldest_first() -> None:
    splitter = LineSplitter(100)
    splitter.feed(b"one\ntwo\n\nthree\nfou")
    assert list(splitter.lines) == [b"one", b"two", b"", b"three"]
    assert splitter.lines.popleft() == b"one"  # taken lines are gone; the rest stay
    splitter.feed(b"r\r\n")
    assert list(splitter.lines) == [b"two", b"", b"three", b"four\r"]  # only b"\n" is cut
    assert all(type(line) is bytes for line in splitter.lines)
    assert splitter.pending == b""


def test_pending_is_a_copy() -> None:
    splitter = LineSplitter(100)
    splitter.feed(b"part")
    held = splitter.pending
    splitter.feed(b"ial")
    assert held == b"part"
    assert splitter.pending == b"partial"


def test_blank_lines_kept_unless_skip_blank() -> None:
    data = b"\na\n  \n\r\n\t\nb\n\n"
    kept = LineSplitter(100)
    kept.feed(data)
    assert list(kept.lines) == [b"", b"a", b"  ", b"\r", b"\t", b"b", b""]
    skipping = LineSplitter(100, skip_blank=True)
    skipping.feed(data)
    assert list(skipping.lines) == [b"a", b"b"]
    skipping.feed(b" x \n")
    assert skipping.lines.pop() == b" x "  # not blank: kept as it is, unstripped


def test_a_line_of_exactly_max_line_bytes_is_fine() -> None:
    splitter = LineSplitter(10, raising)
    splitter.feed(b"x" * 10)  # held whole: not over the limit yet
    assert splitter.pending == b"x" * 10
    splitter.feed(b"\n" + b"y" * 10 + b"\n")
    assert list(splitter.lines) == [b"x" * 10, b"y" * 10]


def test_complete_overlong_line_with_raising_on_overflow() -> None:
    splitter = LineSplitter(10, raising)
    with pytest.raises(Boom) as info:
        splitter.feed(b"ok\n" + b"x" * 11 + b"\nafter\n")
    assert is_head_of(info.value.head, b"x" * 11)
    assert list(splitter.lines) == [b"ok"]  # the lines before it were taken


def test_overflow_head_is_the_first_200_bytes() -> None:
    line = bytes(range(256)).replace(b"\n", b"-") * 2
    splitter = LineSplitter(300, raising)
    with pytest.raises(Boom) as info:
        splitter.feed(line + b"\n")
    assert info.value.head == line[:200]
    unterminated = LineSplitter(300, raising)
    unterminated.feed(line[:300])
    with pytest.raises(Boom) as info:
        unterminated.feed(line[300:])
    assert info.value.head == line[:200]


def test_unterminated_overlong_line_with_raising_on_overflow() -> None:
    splitter = LineSplitter(10, raising)
    splitter.feed(b"ok\n" + b"x" * 6)
    splitter.feed(b"x" * 4)  # 10 bytes held: at the limit, not past it
    assert splitter.pending == b"x" * 10
    with pytest.raises(Boom) as info:
        splitter.feed(b"x")  # no newline yet, but the line already exceeds the limit
    assert info.value.head == b"x" * 11
    assert list(splitter.lines) == [b"ok"]
    assert splitter.pending == b""  # what was held is dropped, not kept growing


def test_complete_overlong_line_skipped_then_recovers() -> None:
    heads: list[bytes] = []
    splitter = LineSplitter(10, heads.append)
    splitter.feed(b"a\n" + b"y" * 11 + b"\nb\n")
    assert list(splitter.lines) == [b"a", b"b"]
    assert len(heads) == 1 and is_head_of(heads[0], b"y" * 11)
    # an over-long line whose start came in an earlier feed (held, under the limit then)
    splitter.feed(b"z" * 8)
    splitter.feed(b"z" * 8 + b"\nc\n")
    assert list(splitter.lines) == [b"a", b"b", b"c"]
    assert len(heads) == 2 and is_head_of(heads[1], b"z" * 16)
    assert splitter.pending == b""


def test_unterminated_overlong_line_skipped_to_its_newline() -> None:
    heads: list[bytes] = []
    splitter = LineSplitter(10, heads.append)
    splitter.feed(b"first\n" + b"y" * 8)
    splitter.feed(b"y" * 8)  # past the limit without a newline: reported once, dropped
    assert heads == [b"y" * 16]
    assert splitter.pending == b""
    for _ in range(5):  # the same line keeps growing: no second report, nothing held
        splitter.feed(b"y" * 25)
        assert splitter.pending == b""
    assert heads == [b"y" * 16]
    assert list(splitter.lines) == [b"first"]
    # its end, and the next lines, in one feed: the tail is not taken for a line
    splitter.feed(b"yy-tail\nnext\nafter")
    assert list(splitter.lines) == [b"first", b"next"]
    assert splitter.pending == b"after"
    splitter.feed(b"\n" + b"w" * 12 + b"\nlast\n")  # and overflow is reported again
    assert list(splitter.lines) == [b"first", b"next", b"after", b"last"]
    assert len(heads) == 2 and is_head_of(heads[1], b"w" * 12)


def test_unterminated_overlong_line_ending_in_a_later_feed_alone() -> None:
    heads: list[bytes] = []
    splitter = LineSplitter(4, heads.append)
    splitter.feed(b"12345")
    splitter.feed(b"\n")  # the newline that ends the skipped line, alone
    splitter.feed(b"ok\n")
    assert list(splitter.lines) == [b"ok"]
    assert heads == [b"12345"]


def test_overlong_line_without_on_overflow_is_skipped_silently() -> None:
    splitter = LineSplitter(4)
    splitter.feed(b"abcde\nok\n")
    splitter.feed(b"abcdefgh")  # past the limit unterminated
    splitter.feed(b"ij\nfine\n")
    assert list(splitter.lines) == [b"ok", b"fine"]


# --- only_cancelled and keyboard_interrupt_in ----------------------------------------------


async def test_only_cancelled() -> None:
    cancelled = await a_cancelled()
    other = await a_cancelled()
    assert only_cancelled(cancelled)
    assert only_cancelled(BaseExceptionGroup("g", [cancelled]))
    assert only_cancelled(
        BaseExceptionGroup("outer", [other, BaseExceptionGroup("inner", [cancelled])])
    )
    assert not only_cancelled(ValueError())
    assert not only_cancelled(KeyboardInterrupt())
    assert not only_cancelled(BaseExceptionGroup("g", [cancelled, ValueError()]))
    assert not only_cancelled(
        BaseExceptionGroup("outer", [cancelled, BaseExceptionGroup("inner", [other, KeyError()])])
    )


def test_keyboard_interrupt_in() -> None:
    ki = KeyboardInterrupt()
    assert keyboard_interrupt_in(None) is None
    assert keyboard_interrupt_in(ValueError()) is None
    assert keyboard_interrupt_in(ki) is ki
    assert keyboard_interrupt_in(ExceptionGroup("g", [ValueError(), KeyError()])) is None
    assert keyboard_interrupt_in(BaseExceptionGroup("g", [ValueError(), ki])) is ki
    nested = BaseExceptionGroup(
        "outer",
        [
            ValueError(),
            ExceptionGroup("no KI here", [KeyError()]),
            BaseExceptionGroup("mid", [BaseExceptionGroup("inner", [RuntimeError(), ki])]),
        ],
    )
    assert keyboard_interrupt_in(nested) is ki


# --- BlockOutcome --------------------------------------------------------------------------


def test_reraise_without_an_error_returns() -> None:
    outcome = BlockOutcome()
    assert outcome.error is None
    outcome.reraise()
    outcome.reraise(RuntimeError("a failure is raised only instead of a Cancelled"))


def test_reraise_plain_error_as_it_is() -> None:
    outcome = BlockOutcome()
    error = ValueError("the block's own")
    outcome.error = error
    with pytest.raises(ValueError) as info:
        outcome.reraise()
    assert info.value is error
    # a failure does not replace a real error
    with pytest.raises(ValueError) as info:
        outcome.reraise(RuntimeError("ours"))
    assert info.value is error


def test_reraise_keyboard_interrupt_in_a_group_bare() -> None:
    ki = KeyboardInterrupt()
    outcome = BlockOutcome()
    outcome.error = BaseExceptionGroup("g", [ValueError(), BaseExceptionGroup("h", [ki])])
    with pytest.raises(KeyboardInterrupt) as info:
        outcome.reraise()
    assert info.value is ki
    with pytest.raises(KeyboardInterrupt) as info:
        outcome.reraise(RuntimeError("ours"))  # KeyboardInterrupt wins over a failure
    assert info.value is ki


async def test_reraise_replaces_only_cancelled_with_the_failure() -> None:
    for error in (await a_cancelled(), BaseExceptionGroup("g", [await a_cancelled()])):
        outcome = BlockOutcome()
        outcome.error = error
        failure = RuntimeError("the service failed")
        with pytest.raises(RuntimeError) as info:
            outcome.reraise(failure)
        assert info.value is failure
        assert info.value.__cause__ is None and info.value.__suppress_context__
        # without a failure the Cancelled itself goes on
        with pytest.raises(BaseException) as raw:
            outcome.reraise()
        assert raw.value is error


async def test_reraise_keeps_a_group_that_is_not_only_cancelled() -> None:
    outcome = BlockOutcome()
    outcome.error = BaseExceptionGroup("g", [await a_cancelled(), ValueError("real")])
    with pytest.RaisesGroup(trio.Cancelled, ValueError) as info:
        outcome.reraise(RuntimeError("ours"))
    assert info.value is outcome.error


# --- open_service_nursery ------------------------------------------------------------------


async def test_service_nursery_block_error_comes_out_bare() -> None:
    error = ValueError("from the block")
    with pytest.raises(ValueError) as info:
        async with open_service_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            raise error
    assert info.value is error  # not an ExceptionGroup around it


async def test_service_nursery_normal_exit_cancels_services() -> None:
    finished: list[str] = []

    async def service() -> None:
        try:
            await trio.sleep_forever()
        finally:
            finished.append("service")

    with trio.fail_after(5):
        async with open_service_nursery() as nursery:
            nursery.start_soon(service)
            await trio.testing.wait_all_tasks_blocked()
    assert finished == ["service"]


@pytest.mark.parametrize("block_raises", [False, True], ids=["normal", "error"])
async def test_on_exit_runs_before_services_are_cancelled(block_raises: bool) -> None:
    """What ``on_exit`` does (fail the pending calls) reaches the services before they are
    cancelled: a service woken by it is scheduled normally, not with ``Cancelled``."""
    seen: list[str] = []
    woken = trio.Event()
    nurseries: list[trio.Nursery] = []

    def on_exit() -> None:
        seen.append(f"on_exit, cancel_called={nurseries[0].cancel_scope.cancel_called}")
        woken.set()

    async def service() -> None:
        try:
            await woken.wait()
        except trio.Cancelled:
            seen.append("service cancelled while waiting")
            raise
        seen.append("service woken by on_exit")
        await trio.sleep_forever()

    expected: contextlib.AbstractContextManager[Any] = (
        pytest.raises(ValueError) if block_raises else contextlib.nullcontext()
    )
    with trio.fail_after(5), expected:
        async with open_service_nursery(on_exit=on_exit) as nursery:
            nurseries.append(nursery)
            nursery.start_soon(service)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []
            if block_raises:
                raise ValueError
    assert seen == ["on_exit, cancel_called=False", "service woken by on_exit"]


async def test_service_keyboard_interrupt_comes_out_bare() -> None:
    ki = KeyboardInterrupt()

    async def service() -> None:
        await trio.lowlevel.checkpoint()
        raise ki

    with trio.fail_after(5), pytest.raises(KeyboardInterrupt) as info:
        async with open_service_nursery() as nursery:
            nursery.start_soon(service)
            await trio.sleep_forever()
    assert info.value is ki


async def test_block_keyboard_interrupt_comes_out_bare() -> None:
    ki = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        async with open_service_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise ki
    assert info.value is ki


async def test_service_error_comes_out_in_a_group() -> None:
    """A service's own error (not KeyboardInterrupt) is an internal task's: in a group."""

    async def service() -> None:
        await trio.lowlevel.checkpoint()
        raise OSError("service broke")

    with trio.fail_after(5), pytest.RaisesGroup(OSError):
        async with open_service_nursery() as nursery:
            nursery.start_soon(service)
            await trio.sleep_forever()


async def test_failure_replaces_a_cancelled_blocks_cancelled() -> None:
    """A service that fails records why and cancels the nursery: the block, cancelled,
    ends with that failure (bare), not with Cancelled."""
    failure: list[BaseException] = []

    async def reader(nursery: trio.Nursery) -> None:
        await trio.lowlevel.checkpoint()
        failure.append(ConnectionError("the peer went away"))
        nursery.cancel_scope.cancel()

    def why() -> BaseException | None:
        return failure[0] if failure else None

    with trio.fail_after(5), pytest.raises(ConnectionError) as info:
        async with open_service_nursery(failure=why) as nursery:
            nursery.start_soon(reader, nursery)
            await trio.sleep_forever()
    assert info.value is failure[0]


async def test_failure_does_not_replace_a_real_error_or_a_normal_end() -> None:
    failure = ConnectionError("ours")
    with pytest.raises(ValueError):
        async with open_service_nursery(failure=lambda: failure):
            raise ValueError("the block's own")
    async with open_service_nursery(failure=lambda: failure):
        pass  # ended normally: nothing to replace


# --- ShieldOnStart -------------------------------------------------------------------------


async def test_shield_on_start_shields_only_a_moved_task() -> None:
    shields: list[bool] = []

    async def service(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            status = ShieldOnStart(task_status, scope)
            assert status.started_called is False
            status.started("ready")
            assert status.started_called is True
            shields.append(scope.shield)
            scope.shield = False  # let the test end it
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        assert await nursery.start(service) == "ready"  # moved into the nursery: shielded
        nursery.start_soon(service)  # no start() to move it: shielded at once
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with trio.CancelScope() as cancelled:
        async with trio.open_nursery() as nursery:
            cancelled.cancel()  # start() cancelled: the task is not moved and stays cancellable
            await nursery.start(service)
    assert cancelled.cancelled_caught
    assert shields == [True, True, False]


# --- BoundedStream --------------------------------------------------------------------------


def make_stream(
    buffer: int = 2, raise_end: Callable[[], None] = lambda: None
) -> tuple[BoundedStream[int], set[Any]]:
    registry: set[Any] = set()
    stream = BoundedStream[int](buffer, registry=registry, raise_end=raise_end)
    registry.add(stream)
    return stream, registry


async def test_drops_are_counted_reported_once_then_items_flow() -> None:
    stream, _ = make_stream(buffer=2)
    for item in range(5):
        stream._deliver(item)  # the publisher never blocks
    assert stream.dropped == 3
    with pytest.raises(EventsDropped) as info:
        await stream.receive()
    assert info.value.count == 3
    assert await stream.receive() == 0  # the first ones stayed, in order
    assert stream.receive_nowait() == 1
    with pytest.raises(trio.WouldBlock):
        stream.receive_nowait()
    stream._deliver(5)
    assert await stream.receive() == 5  # reported once: no second EventsDropped
    # a new overflow is reported again, counting only the new drops
    for item in range(6, 10):
        stream._deliver(item)
    assert stream.dropped == 5
    with pytest.raises(EventsDropped) as info:
        stream.receive_nowait()
    assert info.value.count == 2
    assert [stream.receive_nowait(), await stream.receive()] == [6, 7]


async def test_bounded_stream_end_and_async_iteration() -> None:
    stream, _ = make_stream(buffer=4)
    for item in (1, 2, 3):
        stream._deliver(item)
    stream._send.close()  # the source ends (what the owners do)
    assert [item async for item in stream] == [1, 2, 3]  # buffered items first
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()

    def owner_error() -> None:
        raise ConnectionError("the owner's error")

    failing, _ = make_stream(raise_end=owner_error)
    failing._deliver(1)
    failing._send.close()
    assert await failing.receive() == 1
    with pytest.raises(ConnectionError):
        await failing.receive()
    with pytest.raises(ConnectionError):
        failing.receive_nowait()


async def test_close_unsubscribes_and_discards() -> None:
    stream, registry = make_stream()
    stream._deliver(1)
    stream.close()
    assert registry == set()
    stream._deliver(2)  # a late publish after closing is ignored, not a drop
    assert stream.dropped == 0
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive()
    stream.close()  # idempotent

    sync_stream, registry = make_stream()
    with sync_stream:
        assert registry == {sync_stream}
    assert registry == set()
    async_stream, registry = make_stream()
    async with async_stream:
        assert registry == {async_stream}
    assert registry == set()


@pytest.mark.parametrize("buffer", [0, -1, True, 1.5, "2"])
def test_bounded_stream_buffer_must_be_a_positive_int(buffer: Any) -> None:
    with pytest.raises(ValueError, match="at least one item"):
        BoundedStream[int](buffer, registry=set(), raise_end=lambda: None)


def test_bounded_stream_buffer_of_one() -> None:
    stream, _ = make_stream(buffer=1)  # the smallest buffer allowed: holds one item
    stream._deliver(1)
    stream._deliver(2)
    assert stream.dropped == 1


# --- publish --------------------------------------------------------------------------------


def test_publish_renames_only_trio_qemu_objects() -> None:
    class Ours:
        pass

    def ours_function() -> None:
        pass

    class Foreign:
        pass

    class Lookalike:
        pass

    class Instance:
        pass

    class Unlisted:
        pass

    for obj in (Ours, ours_function, Instance, Unlisted):
        obj.__module__ = "trio_qemu._private"
    Foreign.__module__ = "somewhere.else"
    Lookalike.__module__ = "trio_qemu_extras.mod"  # a prefix, not a submodule
    instance = Instance()
    namespace: dict[str, Any] = {
        "Ours": Ours,
        "ours_function": ours_function,
        "Foreign": Foreign,
        "Lookalike": Lookalike,
        "instance": instance,
        "CONSTANT": 0.25,
        "Unlisted": Unlisted,
    }
    # Ours after foreign names: skipping one must not end the loop.
    publish("trio_qemu", namespace, ["Foreign", "Ours", "Lookalike", "ours_function"])
    assert Ours.__module__ == "trio_qemu"
    assert ours_function.__module__ == "trio_qemu"
    assert Foreign.__module__ == "somewhere.else"
    assert Lookalike.__module__ == "trio_qemu_extras.mod"
    assert Unlisted.__module__ == "trio_qemu._private"
    publish("trio_qemu", namespace, ["instance", "CONSTANT"])  # neither class nor function
    assert Instance.__module__ == "trio_qemu._private"
    assert "__module__" not in vars(instance)


def test_publish_skips_objects_that_refuse_a_new_module() -> None:
    class Sealed(type):  # like a type defined in C: its attributes cannot be set
        def __setattr__(cls, name: str, value: Any) -> None:
            raise TypeError(f"cannot set {name!r}")

    class Immutable(metaclass=Sealed):
        __module__ = "trio_qemu._private"

    class Slotted:  # its instances have no __dict__: their __module__ is read-only
        __slots__ = ()
        __module__ = "trio_qemu._private"

        def __call__(self) -> None:
            pass

    class Ours:
        __module__ = "trio_qemu._private"

    namespace = {"Immutable": Immutable, "callable_instance": Slotted(), "Ours": Ours}
    publish("trio_qemu", namespace, ["Immutable", "callable_instance", "Ours"])
    assert Immutable.__module__ == "trio_qemu._private"
    assert Ours.__module__ == "trio_qemu"


def test_public_names_are_published() -> None:
    import trio_qemu

    assert trio_qemu.EventsDropped.__module__ == "trio_qemu"
    assert trio_qemu.open_machine.__module__ == "trio_qemu"
    assert EventsDropped.__module__ == "trio_qemu"
