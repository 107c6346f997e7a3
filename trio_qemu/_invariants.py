"""Conditions that must hold for the length of a block (``vm.invariant``).

:class:`Invariants` is mixed into :class:`~trio_qemu.Machine`; it needs only the machine's
``name``, ``shell`` and ``failure``.

An invariant polls: whether a guest service still answers, or a file still holds what it
should, is nothing the host can be told about, so the check runs again every ``interval``
seconds (like the NixOS test driver's polling conditions). The checking task lives in a
nursery of the ``async with`` block itself, so it can never outlive the block.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

import trio

from ._errors import InvariantViolated, copy_error
from ._shell_waits import check_wait_args
from ._util import open_service_nursery, protected_asynccontextmanager

if TYPE_CHECKING:
    from ._shell import GuestResult, Shell

__all__ = ["Check", "Invariants"]

Check: TypeAlias = "str | Callable[[], Awaitable[object]]"
"""What ``vm.invariant`` checks: a guest command that must succeed, or an async callable
that returns a truthy value or None while the condition holds."""


class _Probe:
    """One invariant's check: runs it once and tells whether it held."""

    def __init__(self, machine: Invariants, check: Check, timeout: float) -> None:
        self._machine = machine
        self._check = check
        self._timeout = timeout
        self._shell: Shell | None = None
        if isinstance(check, str):
            self._shell = machine.shell  # no shell channel: MachineError now
            self.label = check
        elif callable(check):
            self.label = getattr(check, "__qualname__", None) or repr(check)
        else:
            raise TypeError(
                f"check must be a guest command (str) or an async callable, not {check!r}"
            )
        #: how many times the check has held
        self.checks = 0

    def _violated(
        self,
        how: str,
        *,
        error: BaseException | None = None,
        result: GuestResult | None = None,
        value: object = None,
    ) -> BaseException:
        failure = self._machine.failure
        if error is not None and failure is not None:
            return copy_error(failure)  # QEMU died: that is the story, not the invariant
        what = f"guest command {self.label!r}" if self._shell else f"check {self.label}"
        violation = InvariantViolated(
            f"{self._machine.name}: invariant {what} {how} (after holding {self.checks} time(s))",
            check=self.label,
            checks=self.checks,
            result=result,
            error=error,
            value=value,
        )
        violation.__cause__ = error
        violation.__suppress_context__ = True
        return violation

    async def once(self) -> BaseException | None:
        """Run the check; return the error to raise when it did not hold, else None."""
        if self._shell is not None:
            assert isinstance(self._check, str)
            try:
                result = await self._shell.run(self._check, timeout=self._timeout)
            except Exception as exc:
                return self._violated(f"could not run: {exc}", error=exc)
            if result.returncode != 0:
                return self._violated(f"exited with status {result.returncode}", result=result)
        else:
            assert not isinstance(self._check, str)
            value: object = None
            with trio.move_on_after(self._timeout) as scope:
                try:
                    awaitable = self._check()
                except Exception as exc:
                    return self._violated(f"raised {exc!r}", error=exc)
                if not inspect.isawaitable(awaitable):
                    error = TypeError(
                        f"check {self.label} returned {awaitable!r}, not an awaitable: it "
                        "must be an async callable"
                    )
                    if self.checks == 0:
                        raise error  # a programming error, found at entry
                    return self._violated("returned no awaitable", error=error)
                try:
                    value = await awaitable
                except Exception as exc:
                    return self._violated(f"raised {exc!r}", error=exc)
            if scope.cancelled_caught:
                return self._violated(
                    f"did not finish within {self._timeout} s",
                    error=TimeoutError(f"check {self.label} took over {self._timeout} s"),
                )
            if value is not None and not value:
                return self._violated(f"returned {value!r}", value=value)
        self.checks += 1
        return None


class Invariants:
    """``async with vm.invariant(check)`` for a :class:`~trio_qemu.Machine`."""

    name: str

    @property
    def shell(self) -> Shell:  # pragma: no cover - provided by Machine
        raise NotImplementedError

    @property
    def failure(self) -> BaseException | None:  # pragma: no cover - provided by Machine
        raise NotImplementedError

    @protected_asynccontextmanager
    async def invariant(
        self, check: Check, *, interval: float = 1.0, timeout: float = 30.0
    ) -> AsyncIterator[None]:
        """Fail the block as soon as ``check`` stops holding.

        ``async with vm.invariant("pidof httpd"): ...`` runs the check once on entry (a
        failure there raises before the block runs), then again every ``interval`` seconds
        (from the end of one check to the start of the next) in a task of its own while
        the block runs. It polls: nothing in the guest can announce that a condition broke.
        When a check fails, the block is cancelled and :class:`~trio_qemu.InvariantViolated`
        is raised from the ``async with``, carrying the failing output or exception. The
        checking task lives inside the block's own nursery: it ends with the block, on
        every path.

        ``check`` is either:

        - a guest command (``str``) that must exit with status 0, run through
          :attr:`shell` with ``timeout``. It takes its turn with the block's own shell
          commands, and the time spent waiting for that turn counts: give ``timeout``
          room for the block's longest command;
        - an async callable taking no arguments: it holds while it returns a truthy value
          or None; it is violated when it returns any other falsy value (``False``,
          ``0``, ``""``...), raises an exception, or takes longer than ``timeout``.

        An exception raised by the block itself wins and comes out as it is (never in an
        ``ExceptionGroup``), and so does a ``KeyboardInterrupt``. If QEMU dies, a failing
        check raises the machine's error (:class:`~trio_qemu.MachineExited`) instead.

        Args:
            check: the guest command, or the async callable.
            interval: seconds between two checks.
            timeout: seconds one check may take.

        Raises:
            InvariantViolated: the check failed (on entry or during the block).
            ValueError: ``interval`` or ``timeout`` is zero or negative.
            TypeError: ``check`` is neither a str nor an async callable.
            MachineError: ``check`` is a command but the machine has no shell channel.
        """
        check_wait_args(timeout, interval)
        probe = _Probe(self, check, timeout)
        failure = await probe.once()
        if failure is not None:
            raise failure
        violation: BaseException | None = None
        body_scope = trio.CancelScope()

        async def watch() -> None:
            nonlocal violation
            while True:
                await trio.sleep(interval)
                failed = await probe.once()
                if failed is not None:
                    violation = failed
                    body_scope.cancel()
                    return

        # The block's own error wins (a KeyboardInterrupt too); an outer cancellation that
        # met a violation gives way to it; a violation that only cancelled the block (its
        # scope caught that) is raised below.
        async with open_service_nursery(failure=lambda: violation) as nursery:
            nursery.start_soon(watch)
            with body_scope:
                yield
        if violation is not None:
            raise violation
