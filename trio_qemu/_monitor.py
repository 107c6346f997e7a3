"""What a machine offers over its QMP monitor: commands, HMP, screenshots, events, fds.

:class:`MonitorCommands` is mixed into :class:`~trio_qemu.Machine`; it needs only the
machine's ``name``, ``qmp_client`` and ``expect_exit``, so the lifecycle code in
:mod:`._machine` and these conveniences stay apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from ._errors import MachineError
from ._events import QMPEvent, Subscription
from ._qmp import QMPClient

__all__ = ["MonitorCommands"]


class MonitorCommands:
    """QMP conveniences of a :class:`~trio_qemu.Machine` (see :class:`~trio_qemu.QMPClient`
    for the options every call takes)."""

    name: str

    @property
    def qmp_client(self) -> QMPClient:  # pragma: no cover - provided by Machine
        raise NotImplementedError

    def expect_exit(self, reason: str | None = "expected") -> None:  # pragma: no cover
        raise NotImplementedError

    async def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Run a QMP command; return the raw response (``{"return": ...}`` or
        ``{"error": ...}``). Keyword arguments have ``_`` turned into ``-``; ``timeout=`` and
        ``fds=`` are options of the call (see :meth:`QMPClient.qmp`). Sending ``quit`` this
        way makes QEMU's exit expected: it is not reported as :class:`MachineExited`."""
        client = self.qmp_client
        if cmd == "quit":
            self.expect_exit("quit")
        return await client.qmp(cmd, args, **kwargs)

    async def cmd(self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command and return its value; raises ``qemu.qmp.ExecuteError``.
        ``quit`` makes QEMU's exit expected, as with :meth:`qmp`."""
        client = self.qmp_client
        if cmd == "quit":
            self.expect_exit("quit")
        return await client.cmd(cmd, args, **kwargs)

    async def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human monitor command (``info registers``); return its text output.

        HMP reports its own errors as text, not as QMP errors.
        """
        result = await self.qmp_client.cmd(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return str(result)

    async def screenshot(
        self, path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> Path:
        """Save the display as a PNG at ``path`` (QMP ``screendump``); return the path.

        Needs a display device: launch with ``display=True`` (or your own ``-device VGA``).
        QEMU writes the file itself, so ``path`` must be writable by QEMU's user.
        """
        # QEMU resolves a relative path against its own cwd: give it ours (a string join).
        target = Path(os.path.abspath(path))  # noqa: ASYNC240
        try:
            await self.qmp_client.cmd(
                "screendump", {"filename": str(target), "format": "png"}, timeout=timeout
            )
        except ExecuteError as exc:
            hint = ""
            if "no console" in str(exc).lower():
                hint = " (the machine has no display: launch it with display=True)"
            raise MachineError(f"{self.name}: screendump failed: {exc}{hint}") from exc
        return target

    def subscribe(
        self, *names: str, match: Mapping[str, object] | None = None, buffer: int | None = None
    ) -> Subscription:
        """A bounded stream of events named ``names`` (all when none) matching ``match``.

        Subscribe first, then act: ``async with vm.subscribe("STOP") as events: ...``.
        """
        return self.qmp_client.subscribe(*names, match=match, buffer=buffer)

    async def event_wait(
        self, name: str, timeout: float | None = 60.0, match: Mapping[str, object] | None = None
    ) -> QMPEvent:
        """The first event ``name`` matching ``match``, including an unclaimed earlier one.

        Raises :class:`~trio_qemu.QMPTimeout` after ``timeout`` s (None: no limit).
        """
        return await self.qmp_client.event_wait(name, timeout, match)

    async def events_wait(
        self,
        events: Iterable[tuple[str, Mapping[str, object] | None]],
        timeout: float | None = 60.0,
    ) -> QMPEvent:
        """The first event matching any of the ``(name, match)`` pairs."""
        return await self.qmp_client.events_wait(events, timeout)

    def get_events(self) -> list[QMPEvent]:
        """Take the events that arrived and that nobody has claimed (oldest first)."""
        return self.qmp_client.get_events()

    def clear_events(self) -> None:
        """Forget the unclaimed events."""
        self.qmp_client.get_events()

    async def send_fd_scm(self, fd: int) -> None:
        """Pass ``fd`` to QEMU over the monitor socket (then name it with ``getfd``)."""
        await self.qmp_client.send_fd_scm(fd)
