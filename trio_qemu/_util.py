"""Trio plumbing shared by every module: one home for each idiom.

- :func:`open_service_nursery` and :class:`BlockOutcome`: run background tasks around a
  caller's ``async with`` block and re-raise the block's own error bare, never inside an
  ``ExceptionGroup`` of our internal tasks.
- :func:`only_cancelled` and :func:`keyboard_interrupt_in`: classify what a block raised.
- :data:`EOF_GRACE`: how long a channel's end of file waits for QEMU's exit status.
- :class:`LineSplitter`: the one newline framer behind the QMP, shell, qtest and agent readers.
- :class:`BoundedStream`: a subscriber's bounded stream (QMP events, qtest IRQs).
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, Self, TypeVar

import trio

from ._errors import EventsDropped

__all__ = [
    "EOF_GRACE",
    "BlockOutcome",
    "BoundedStream",
    "ClosesOnExit",
    "LineSplitter",
    "ShieldOnStart",
    "keyboard_interrupt_in",
    "only_cancelled",
    "open_service_nursery",
    "protected_asynccontextmanager",
    "publish",
    "registered_scope",
]

T = TypeVar("T")
P = ParamSpec("P")

EOF_GRACE: Final = 0.25
"""How long a channel's end of file waits for QEMU's exit status (seconds).

A dying QEMU closes its sockets ~2 ms before it is reaped; waiting this long lets waiters get
:class:`~trio_qemu.MachineExited` rather than a bare "closed". Short, because when QEMU closed
a channel and runs on, that error must still come at once (well within 0.5 s)."""


def only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``trio.Cancelled`` or a group holding nothing else."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


def keyboard_interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` in ``exc`` (itself or anywhere in its groups), or None.

    Trio may raise Ctrl-C's ``KeyboardInterrupt`` inside any task, so it can reach an opener
    wrapped in groups of internal tasks; the openers re-raise it bare, as Trio advises.
    """
    if exc is None:
        return None
    if isinstance(exc, KeyboardInterrupt):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = keyboard_interrupt_in(inner)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class ToolResult:
    """How a host command (``qemu-img``, ``qemu-io``, a QEMU probe) ended: its command line,
    exit status and what it wrote."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def output(self) -> str:
        """stderr then stdout, decoded (for error messages)."""
        return (self.stderr + self.stdout).decode("utf-8", "replace")


class BlockOutcome:
    """What the caller's block raised, kept to be re-raised outside our nursery.

    Use :meth:`capture` around the ``yield`` of an opener, then :meth:`reraise` once the
    nursery has closed. ``KeyboardInterrupt`` anywhere wins and comes out bare.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        #: the block's exception, or None when it ended normally
        self.error: BaseException | None = None

    def reraise(self, failure: BaseException | None = None) -> None:
        """Raise the block's error, if any. When the block was only cancelled and ``failure``
        (why our side cancelled it) is given, raise ``failure`` instead; else return."""
        error = self.error
        if error is None:
            return
        interrupt = keyboard_interrupt_in(error)
        if interrupt is not None:
            raise interrupt
        if failure is not None and only_cancelled(error):
            raise failure from None
        raise error


class _ProtectedContext(Generic[T]):
    """An async context manager whose enter and exit run protected from KeyboardInterrupt."""

    __slots__ = ("_context",)

    def __init__(self, context: AbstractAsyncContextManager[T]) -> None:
        self._context = context

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> T:
        return await self._context.__aenter__()

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._context.__aexit__(exc_type, exc, tb)


def protected_asynccontextmanager(
    func: Callable[P, AsyncIterator[T]],
) -> Callable[P, AbstractAsyncContextManager[T]]:
    """``@asynccontextmanager`` whose enter and exit are protected from KeyboardInterrupt.

    ``contextlib``'s own frames between an ``async with`` and the generator are not: a
    Ctrl-C landing in one of them leaves the generator suspended at its ``yield`` and its
    nursery abandoned (Trio then reports "Parent Task exited prematurely"). Protected, Trio
    delivers the Ctrl-C at a checkpoint inside the generator, whose clean-up then runs.
    """
    factory = asynccontextmanager(func)

    @functools.wraps(func)
    def helper(*args: P.args, **kwargs: P.kwargs) -> AbstractAsyncContextManager[T]:
        return _ProtectedContext(factory(*args, **kwargs))

    helper.__returns_acontextmanager__ = True  # type: ignore[attr-defined]  # for the docs
    return helper


@asynccontextmanager
async def open_service_nursery(
    *,
    on_exit: Callable[[], None] | None = None,
    failure: Callable[[], BaseException | None] | None = None,
) -> AsyncIterator[trio.Nursery]:
    """A nursery for background service tasks around the caller's block.

    The block's own exception is re-raised bare once the nursery has closed (never in a
    group). On the way out ``on_exit()`` runs (e.g. fail the pending calls), then the
    services are cancelled. If the block ended only because it was cancelled and
    ``failure()`` returns an error (a service failed and cancelled it), that error is raised.
    A ``KeyboardInterrupt`` raised in a service task comes out bare too.
    """
    outcome = BlockOutcome()
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:  # re-raised below, outside the nursery: no group
                outcome.error = exc
            finally:
                if on_exit is not None:
                    on_exit()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        interrupt = keyboard_interrupt_in(group)
        if interrupt is not None:
            raise interrupt from None
        raise
    outcome.reraise(failure() if failure is not None else None)


class LineSplitter:
    """Splits received bytes into newline-terminated lines, holding a bounded remainder.

    :meth:`feed` appends complete lines (without the newline) to :attr:`lines`. A line
    longer than ``max_line`` is handed to ``on_overflow``: if that raises, the error
    propagates; if it returns, the oversized line is skipped to its newline. Blank lines are
    kept unless ``skip_blank``.
    """

    __slots__ = ("_buf", "_max", "_on_overflow", "_skip_blank", "_skipping", "lines")

    def __init__(
        self,
        max_line: int,
        on_overflow: Callable[[bytes], None] | None = None,
        *,
        skip_blank: bool = False,
    ) -> None:
        self._max = max_line
        self._on_overflow = on_overflow
        self._skip_blank = skip_blank
        self._buf = bytearray()
        self._skipping = False
        #: complete lines not yet taken, oldest first
        self.lines: deque[bytes] = deque()

    @property
    def pending(self) -> bytes:
        """The partial line held so far (for diagnostics and EOF checks)."""
        return bytes(self._buf)

    def feed(self, data: bytes | bytearray) -> None:
        """Add ``data``; complete lines go to :attr:`lines`."""
        buf = self._buf
        scan = len(buf)
        buf += data
        start = 0
        while (nl := buf.find(b"\n", scan)) >= 0:
            if self._skipping:
                self._skipping = False
            elif nl - start > self._max:
                head = bytes(buf[start : min(nl, start + 200)])
                del buf[: nl + 1]  # consistent state even if the overflow handler raises
                start = scan = 0
                self._overflow(head)
                continue
            else:
                line = bytes(buf[start:nl])
                if not self._skip_blank or line.strip():
                    self.lines.append(line)
            start = scan = nl + 1
        if start:
            del buf[:start]
        if len(buf) > self._max:
            head = bytes(buf[:200])
            buf.clear()
            reported, self._skipping = self._skipping, True
            if not reported:
                self._overflow(head)

    def _overflow(self, head: bytes) -> None:
        if self._on_overflow is not None:
            self._on_overflow(head)


class ClosesOnExit:
    """Mixin: ``with obj:`` calls ``obj.close()`` on the way out (``close`` is the owner's)."""

    def close(self) -> None:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def registered_scope(registry: set[trio.CancelScope]) -> Iterator[trio.CancelScope]:
    """A cancel scope kept in ``registry`` while it is open, so that whoever owns the registry
    can cancel every such scope at once (e.g. when a channel closes); check
    ``scope.cancelled_caught`` afterwards to tell that apart."""
    with trio.CancelScope() as scope:
        registry.add(scope)
        try:
            yield scope
        finally:
            registry.discard(scope)


class BoundedStream(ClosesOnExit, Generic[T]):
    """A subscriber's bounded stream: the publisher never blocks, overflow is counted.

    :meth:`_deliver` (the publisher's side) drops an item when the buffer is full and counts
    it in :attr:`dropped`; the next ``receive()`` raises :class:`~trio_qemu.EventsDropped`
    once, then the stream goes on. When the source ends, ``raise_end()`` (the owner's error,
    if any) is called, else ``trio.EndOfChannel`` is raised and async iteration stops. Use it
    as a (sync or async) context manager; leaving it unsubscribes (removes it from
    ``registry``) and discards what is buffered.
    """

    def __init__(
        self, buffer: int, *, registry: set[Any], raise_end: Callable[[], None]
    ) -> None:
        if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
            raise ValueError(f"a subscription's buffer must hold at least one item, not {buffer!r}")
        self._registry = registry
        self._raise_end = raise_end
        self._send, self._receive = trio.open_memory_channel[T](buffer)
        #: items dropped for this subscriber because its buffer was full
        self.dropped = 0
        self._unreported = 0

    def _deliver(self, item: T) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
            self._unreported += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _raise_if_dropped(self) -> None:
        if self._unreported:
            count, self._unreported = self._unreported, 0
            raise EventsDropped(count)

    async def _next(self) -> T:
        self._raise_if_dropped()
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            self._raise_end()
            raise

    async def receive(self) -> T:
        """The next item, waiting without limit (see the class docstring for what it raises)."""
        return await self._next()

    def receive_nowait(self) -> T:
        """The next buffered item, else raise ``trio.WouldBlock``."""
        self._raise_if_dropped()
        try:
            return self._receive.receive_nowait()
        except trio.EndOfChannel:
            self._raise_end()
            raise

    def close(self) -> None:
        """Unsubscribe; buffered items are discarded."""
        self._registry.discard(self)
        self._send.close()
        self._receive.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        """The next item, waiting without limit (bound the loop with a cancel scope)."""
        try:
            return await self._next()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ShieldOnStart:
    """A task status that shields the service's cancel scope once ``started()`` moved it.

    Trio moves a started task into the target nursery, unless the ``start`` call was
    cancelled meanwhile; then the task stays behind and must remain cancellable. Records
    whether ``started()`` was called (:attr:`started_called`).
    """

    def __init__(self, inner: trio.TaskStatus[Any], scope: trio.CancelScope) -> None:
        self._inner = inner
        self._scope = scope
        self._origin = trio.lowlevel.current_task().parent_nursery
        self.started_called = False

    def started(self, value: Any = None) -> None:
        self.started_called = True
        self._inner.started(value)
        moved = trio.lowlevel.current_task().parent_nursery is not self._origin
        if moved or self._inner is trio.TASK_STATUS_IGNORED:
            self._scope.shield = True


def publish(module_name: str, namespace: dict[str, Any], names: Iterable[str]) -> None:
    """Set ``__module__`` of the public classes and functions in ``names`` to ``module_name``.

    Tracebacks, reprs and the API docs then say ``trio_qemu.MachineExited`` rather than
    the private module it is defined in (as Trio does). Only objects defined inside
    ``trio_qemu`` are touched; methods of classes follow their class's qualified name.
    """
    for name in names:
        obj = namespace[name]
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not module.startswith("trio_qemu."):
            continue
        if isinstance(obj, type) or callable(obj):
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = module_name
