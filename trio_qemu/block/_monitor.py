"""What the block helpers need from a machine: its name, QMP commands and events.

:class:`~trio_qemu.Machine` satisfies :class:`Monitor`; so does anything else with the
same methods (the helpers never touch the machine's lifecycle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import trio
from qemu.qmp import ExecuteError

from .._errors import QMPConnectionClosed
from .._events import QMPEvent, Subscription
from ._errors import BlockError

__all__ = ["Monitor", "deadline_after", "error_text", "receive_until", "run_command"]


class Monitor(Protocol):
    """A QMP peer: ``cmd``, ``subscribe`` and ``events_wait`` as on a machine."""

    name: str

    async def cmd(
        self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any
    ) -> Any: ...

    def subscribe(
        self, *names: str, match: Mapping[str, object] | None = None, buffer: int | None = None
    ) -> Subscription: ...

    async def events_wait(
        self,
        events: Iterable[tuple[str, Mapping[str, object] | None]],
        timeout: float | None = 60.0,
    ) -> QMPEvent: ...


def error_text(error: ExecuteError) -> str:
    """QEMU's own description of why it refused a command."""
    try:
        return str(error.error.error.desc)
    except AttributeError:  # pragma: no cover - qemu.qmp always fills it in
        return str(error)


async def run_command(
    vm: Monitor,
    command: str,
    arguments: Mapping[str, Any],
    *,
    what: str,
    timeout: float | None = None,
) -> Any:
    """Run QMP ``command``; QEMU's refusal becomes a :class:`~trio_qemu.BlockError` saying
    ``"<machine>: <what> refused: <QEMU's description>"``."""
    try:
        return await vm.cmd(command, arguments, timeout=timeout)
    except ExecuteError as exc:
        desc = error_text(exc)
        raise BlockError(f"{vm.name}: {what} refused: {desc}", command=command, desc=desc) from exc


def deadline_after(timeout: float | None) -> float:
    """The Trio deadline ``timeout`` seconds from now (None: never)."""
    return math.inf if timeout is None else trio.current_time() + timeout


async def receive_until(events: Subscription, deadline: float, what: str) -> QMPEvent | None:
    """The next event of ``events``, or None once ``deadline`` has passed.

    Raises the machine's error (:class:`~trio_qemu.MachineExited`...) when it stops, and
    :class:`~trio_qemu.QMPConnectionClosed` naming ``what`` was awaited when the monitor
    ends cleanly.
    """
    with trio.move_on_at(deadline):
        try:
            return await events.receive()
        except trio.EndOfChannel:
            raise QMPConnectionClosed(
                f"the QMP connection closed while waiting for {what}"
            ) from None
    return None
