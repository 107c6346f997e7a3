"""Live migration from one running machine to another, over a socketpair: no port, no path.

:func:`migrate` moves a running guest from ``src`` to ``dst``. The destination is a second
QEMU launched with the same machine, memory and devices plus ``-incoming defer``
(:func:`incoming_config` makes that config), so it waits, paused, for a migration stream.
The stream is a fresh ``socket.socketpair()``: one end goes to each QEMU over its QMP socket
with SCM_RIGHTS on the ``getfd`` command, under a name used once (QEMU takes the fd out of
its table when the migration starts and closes it when the migration ends, so every
migration needs a fresh ``getfd``), and the two sides are started with ``migrate
uri=fd:NAME`` and ``migrate-incoming uri=fd:NAME``. Nothing is listening anywhere, so
nothing can collide with another test or another user of the host.

Progress comes from QEMU's ``MIGRATION`` events, which QEMU sends only once the ``events``
capability is on; :func:`migrate` turns it on on both sides and subscribes to both before it
starts anything, so no event can be missed. It returns when both sides report
``completed``, with the source's ``query-migrate`` statistics.

What the machines look like afterwards (QEMU 7.2, checked by the tests):

- the source is paused in the ``postmigrate`` state: its guest now runs on the destination.
  Shut it down; ``cont`` would resume a second copy of the guest. Its ``vm.shell`` gets no
  answer: the guest is paused there.
- the destination is ``running`` (or ``paused`` if the source was paused). Its ``vm.shell``
  and ``vm.console`` work: the guest's agent and serial port carried on in the migrated guest,
  and the destination's chardevs are its own socketpairs, so the host ends are simply the
  destination machine's. Wait for nothing: the shell answers the next ``run``.
- a destination whose incoming migration fails exits at once with status 1 after printing
  why (QEMU 7.2 has no ``exit-on-error`` option). :func:`migrate` expects that exit: it is
  reported as a :class:`~trio_qemu.MigrationError` with QEMU's reason, not as
  :class:`~trio_qemu.MachineExited`, and the destination machine is cleaned up.

Measured here (QEMU 7.2, TCG, 2 cores): a 128 MiB tiny guest running a counter migrates in
0.47-0.48 s of wall time (``total-time`` 465-474 ms) with 12-20 ms of downtime and 72.9 MB
sent; a guest-less SeaBIOS q35 in 16-25 ms (1-2 ms downtime, ~1 MB).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any, Final

import trio
from qemu.qmp import ExecuteError

from ._config import MachineConfig
from ._errors import EventsDropped, MachineError, MigrationError
from ._events import Subscription
from ._machine import Machine

__all__ = ["SETTLE_TIMEOUT", "MigrationError", "incoming_config", "migrate"]

log = logging.getLogger("trio_qemu.migration")

SETTLE_TIMEOUT: Final = 10.0
"""Seconds :func:`migrate` allows, once a migration has failed, timed out or been cancelled,
for each step of settling: the other side to report (the source ``failed``/``cancelled``
after ``migrate_cancel``, a failed destination to exit), the clean-up (``migrate_cancel``,
``closefd`` of leftover fds), and the query for QEMU's reason. Here these take milliseconds;
the bound only matters when a QEMU stops answering."""

_TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
_EXITED: Final = "exited"
_names = itertools.count(1)


def incoming_config(config: MachineConfig, /, *, name: str | None = None) -> MachineConfig:
    """The config of a destination for ``config``'s machine: identical, plus ``-incoming defer``.

    Migration needs the same machine type, memory, devices and boot files on both sides
    (RAM and device state are copied, not the configuration), so only the name changes:
    ``name`` when given, else ``config.name`` with ``-incoming`` appended (or None, letting
    the machine pick a unique one, when ``config`` has no name). Host-side fields that may
    differ (``console_log``, ``log_dir``...) can be changed with ``.replace()`` afterwards.

    A QEMU started this way answers QMP at once but runs no guest until :func:`migrate`
    feeds it a stream: ``query-status`` says ``inmigrate``. Raises ValueError if
    ``config.args`` already asks for another ``-incoming`` (``defer`` is what
    :func:`migrate` needs); a config that already has ``-incoming defer`` keeps it once.
    """
    args = list(config.args)
    incoming = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-incoming"]
    if any(value != "defer" for value in incoming) or (args and args[-1] == "-incoming"):
        raise ValueError(
            f"config.args already has -incoming {' '.join(incoming)}: migrate() needs "
            "-incoming defer (it passes the stream over QMP)"
        )
    if not incoming:
        args += ["-incoming", "defer"]
    if name is None and config.name is not None:
        name = f"{config.name}-incoming"
    return config.replace(args=args, name=name)


async def migrate(
    src: Machine,
    dst: Machine,
    *,
    timeout: float = 120.0,
    capabilities: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Live-migrate ``src``'s guest into ``dst``; return the source's ``query-migrate``.

    ``dst`` must have been started with ``-incoming defer`` (see :func:`incoming_config`)
    and not have been migrated into yet: its ``query-status`` must be ``inmigrate``.
    ``capabilities`` are extra migration capabilities set on both sides (e.g.
    ``{"xbzrle": True}``); ``events`` is always on, because completion is followed through
    the ``MIGRATION`` events of both sides.

    The steps: check both statuses; set the capabilities on both; subscribe to
    ``MIGRATION`` on both; make a socketpair and pass one end to each QEMU with ``getfd``
    (our copies are closed right after, so that when one QEMU dies the other sees the
    stream break instead of writing into our buffer); ``migrate`` on the source first, then
    ``migrate-incoming`` on the destination (a source that refuses, e.g. because of a
    migration blocker, thus leaves the destination untouched and reusable); wait for both
    sides to report ``completed``.

    The returned dict is QEMU's, e.g. ``status``, ``total-time`` and ``downtime``
    (milliseconds), ``setup-time``, and ``ram`` with ``transferred`` and ``total`` (bytes).

    Timeouts and failures:

    - ``timeout`` (seconds) bounds everything from the first check to both sides'
      ``completed``. When it expires, ``migrate_cancel`` is sent to the source, up to
      :data:`SETTLE_TIMEOUT` more seconds are spent letting the source report
      ``cancelled`` (it then runs on as before) and the destination exit (QEMU 7.2 exits
      when an incoming migration breaks off), and :class:`~trio_qemu.MigrationError` says it
      timed out. A cancellation from outside takes the same path, then propagates.
    - When a side reports ``failed`` or ``cancelled``, or the destination exits, the other
      side gets up to :data:`SETTLE_TIMEOUT` s to report too, then
      :class:`~trio_qemu.MigrationError` is raised with QEMU's reason: the source's
      ``error-desc`` (from ``query-migrate``) and the destination's own output (a
      destination prints why it could not load the stream, e.g. a RAM size mismatch, and
      exits with status 1). During :func:`migrate` the destination's exit is expected: it is
      not reported as :class:`~trio_qemu.MachineExited` and the destination machine is
      cleaned up. The source's unexpected death stays a ``MachineExited`` in its nursery.
    - A command refused by QEMU (a capability, ``migrate``, ``migrate-incoming``) raises
      :class:`~trio_qemu.MigrationError` with QEMU's error; a wrong destination status raises
      it before anything is sent.

    On every path our copies of the socketpair are closed, and an fd a QEMU received but did
    not take (its command was refused or never sent) is released with ``closefd``: a failed
    migration leaves no fd behind, here or in either QEMU.
    """
    if src is dst:
        raise ValueError("cannot migrate a machine into itself")
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    caps = {"events": True}
    for capability, state in (capabilities or {}).items():
        if capability == "events" and not state:
            raise ValueError("the 'events' capability must stay on: migrate() waits on them")
        caps[capability] = bool(state)

    run = _Migration(src, dst, timeout)
    outcome: BaseException | dict[str, Any]
    try:
        outcome = await run.run(caps)
    finally:
        run.close_sockets()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class _Side:
    """What one QEMU has done so far in this migration."""

    def __init__(self, vm: Machine, role: str) -> None:
        self.vm = vm
        self.role = role
        #: the last MIGRATION status seen; None before any
        self.status: str | None = None
        #: QEMU exited during the migration
        self.exited = False
        #: the fd reached QEMU under our name (getfd answered)
        self.fd_given = False
        #: QEMU accepted migrate / migrate-incoming, so it owns (and will close) the fd
        self.started = False
        #: why events stopped coming (the QMP connection ended)
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Nothing more will happen on this side."""
        return not self.started or self.exited or self.status in _TERMINAL

    @property
    def final_status(self) -> str | None:
        """The status reported in a MigrationError: ``"exited"`` wins."""
        return _EXITED if self.exited else self.status

    def describe(self) -> str:
        text = f"{self.role} {self.vm.name}: {self.status or 'not started'}"
        if self.exited:
            rc = self.vm.returncode
            how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"status {rc}"
            text += f", then exited ({how})"
        return text


class _Migration:
    """One call of :func:`migrate`; see its docstring for the steps and timeouts."""

    def __init__(self, src: Machine, dst: Machine, timeout: float) -> None:
        self.src = _Side(src, "source")
        self.dst = _Side(dst, "destination")
        self.timeout = timeout
        self.fdname = f"trio-qemu-migration-{os.getpid()}-{next(_names)}-{secrets.token_hex(3)}"
        self.sockets: list[socket.socket] = []
        self.dst_exited = trio.Event()
        self._waiter_scope: trio.CancelScope | None = None
        self._follow_scope: trio.CancelScope | None = None
        self._settle_deadline = math.inf

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    # -- the whole run ---------------------------------------------------------------------
    async def run(self, caps: Mapping[str, bool]) -> BaseException | dict[str, Any]:
        """Run the migration; return the statistics or the error to raise (the caller raises
        it outside our nursery, so users never see an exception group)."""
        src, dst = self.src.vm, self.dst.vm
        outcome: BaseException | dict[str, Any] | None = None
        timed_out = False
        with trio.move_on_after(self.timeout) as deadline:
            try:
                await self._check_statuses()
                for vm in (src, dst):
                    await self._command(vm, "migrate-set-capabilities", {
                        "capabilities": [{"capability": c, "state": s} for c, s in caps.items()]
                    })  # fmt: skip
            except MigrationError as exc:
                return exc
        if deadline.cancelled_caught:
            return self._timeout_error()
        # Subscribe before anything can happen; leaving the block unsubscribes.
        with src.subscribe("MIGRATION") as src_events, dst.subscribe("MIGRATION") as dst_events:
            async with trio.open_nursery() as nursery:
                try:
                    # From here to the end the destination's exit is expected (see migrate()).
                    await nursery.start(self._expect_dst_exit)
                    with trio.CancelScope(deadline=deadline.deadline) as scope:
                        await self._start()
                        await self._follow(src_events, dst_events)
                    timed_out = scope.cancelled_caught
                    if self.src.status == "completed" and self.dst.status == "completed":
                        outcome = await self._statistics()
                except BaseException as exc:  # a refusal, or a cancel from outside: abort first
                    outcome = exc
                finally:
                    with trio.CancelScope(shield=True):
                        if outcome is None or isinstance(outcome, BaseException):
                            await self._abort(src_events, dst_events)
                        if self._waiter_scope is not None:
                            self._waiter_scope.cancel()
        if timed_out and outcome is None:
            return self._timeout_error()
        if outcome is None:
            return await self._failure()
        return outcome

    async def _check_statuses(self) -> None:
        status = await self._status(self.dst.vm)
        if status != "inmigrate":
            raise MigrationError(
                f"{self.dst.vm.name} cannot receive a migration: its status is {status!r}, "
                "not 'inmigrate'. Start the destination with -incoming defer "
                "(trio_qemu.migration.incoming_config(config)); a destination is used once."
            )
        status = await self._status(self.src.vm)
        if status == "inmigrate":
            raise MigrationError(
                f"{self.src.vm.name} cannot be a migration source: it is itself waiting for "
                "an incoming migration (status 'inmigrate')"
            )

    async def _status(self, vm: Machine) -> str:
        return str((await self._command(vm, "query-status"))["status"])

    async def _command(
        self, vm: Machine, command: str, args: Mapping[str, object] | None = None, **kw: Any
    ) -> Any:
        """Run a QMP command; QEMU refusing it becomes a MigrationError with its reason."""
        try:
            return await vm.cmd(command, args, **kw)
        except ExecuteError as exc:
            raise MigrationError(
                f"{vm.name} refused {command}: {exc}",
                source_status=self.src.status,
                destination_status=self.dst.status,
            ) from exc

    # -- steps -----------------------------------------------------------------------------
    async def _expect_dst_exit(self, *, task_status: trio.TaskStatus[None]) -> None:
        """While the migration runs, wait for the destination to exit, as an expected exit.

        ``Machine.wait`` marks the exit expected before its first checkpoint, so by the time
        ``started()`` lets :meth:`run` go on, a dying destination is no longer reported as
        ``MachineExited``; when it exits, ``wait`` cleans the machine up. Shielded from
        outside cancellation so the exit stays expected while :meth:`_abort` runs; cancelled
        through :attr:`_waiter_scope` at the very end (``wait`` then restores the flag).
        """
        with trio.CancelScope(shield=True) as scope:
            self._waiter_scope = scope
            task_status.started()
            await self.dst.vm.wait(timeout=None)
            self.dst.exited = True
            self.dst_exited.set()
            self._settle()

    async def _start(self) -> None:
        """Hand each QEMU its end of a fresh socketpair, then start the source, then the
        destination."""
        ours = socket.socketpair()
        self.sockets.extend(ours)
        for side, sock in zip((self.src, self.dst), ours, strict=True):
            await self._command(side.vm, "getfd", {"fdname": self.fdname}, fds=[sock.fileno()])
            side.fd_given = True
        # Each QEMU holds its own copy now; ours would keep a dead peer's end open.
        self.close_sockets()
        uri = f"fd:{self.fdname}"
        await self._command(self.src.vm, "migrate", {"uri": uri})
        self.src.started = True
        await self._command(self.dst.vm, "migrate-incoming", {"uri": uri})
        self.dst.started = True

    async def _follow(self, src_events: Subscription, dst_events: Subscription) -> None:
        """Follow both sides until each is done; once one fails, give the other
        :data:`SETTLE_TIMEOUT` s."""
        with trio.CancelScope() as scope:
            self._follow_scope = scope
            scope.deadline = self._settle_deadline
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._follow_side, self.src, src_events)
                    nursery.start_soon(self._follow_side, self.dst, dst_events)
            finally:
                self._follow_scope = None

    async def _follow_side(self, side: _Side, events: Subscription) -> None:
        while not side.done:
            try:
                event = await events.receive()
            except EventsDropped:  # a starved subscriber: ask for the state instead
                with trio.move_on_after(SETTLE_TIMEOUT):
                    side.status = await self._migration_status(side.vm) or side.status
                continue
            except (MachineError, trio.EndOfChannel) as exc:
                # The monitor closed: that QEMU exited. The destination's exit is expected
                # (_expect_dst_exit notes it once the machine is cleaned up): wait for that.
                side.error = exc
                self._settle()
                if side is self.dst:
                    await self.dst_exited.wait()
                else:
                    side.exited = True
                continue
            status = event.get("data", {}).get("status")
            if isinstance(status, str):
                side.status = status
                log.debug("%s: migration %s", side.vm.name, status)
        if side.status != "completed":
            self._settle()
            if side is self.dst and side.status == "failed":
                await self.dst_exited.wait()  # it prints why and exits: wait for its output

    def _settle(self) -> None:
        """Something went wrong: bound the wait for the rest to :data:`SETTLE_TIMEOUT`."""
        if self._settle_deadline == math.inf:
            self._settle_deadline = trio.current_time() + SETTLE_TIMEOUT
            if self._follow_scope is not None:
                self._follow_scope.deadline = min(
                    self._follow_scope.deadline, self._settle_deadline
                )

    async def _migration_status(self, vm: Machine) -> str | None:
        try:
            info = await vm.cmd("query-migrate", timeout=SETTLE_TIMEOUT)
        except (MachineError, ExecuteError):
            return None
        status = info.get("status")
        return status if isinstance(status, str) else None

    async def _abort(self, src_events: Subscription, dst_events: Subscription) -> None:
        """Shielded clean-up after a failure, a timeout or a cancel, bounded by
        :data:`SETTLE_TIMEOUT`: cancel the source's migration if it still runs, let both
        sides settle, release fds QEMU received but did not take."""
        self._settle()
        with trio.move_on_after(SETTLE_TIMEOUT):
            src = self.src
            if src.started and not src.done and src.vm.is_running():
                try:
                    await src.vm.cmd("migrate_cancel", timeout=SETTLE_TIMEOUT)
                except (MachineError, ExecuteError) as exc:
                    log.debug("%s: migrate_cancel: %r", src.vm.name, exc)
            if not (src.done and self.dst.done):
                await self._follow(src_events, dst_events)
            for side in (self.src, self.dst):
                if side.fd_given and not side.started and side.vm.is_running():
                    # Refused or never sent: the fd is still in QEMU's table under our name.
                    try:
                        await side.vm.qmp("closefd", {"fdname": self.fdname})
                    except MachineError as exc:
                        log.debug("%s: closefd: %r", side.vm.name, exc)

    # -- results ---------------------------------------------------------------------------
    async def _statistics(self) -> dict[str, Any]:
        info = await self.src.vm.cmd("query-migrate")
        assert isinstance(info, dict)
        log.info(
            "%s -> %s: migrated in %s ms (downtime %s ms, %s bytes)",
            self.src.vm.name,
            self.dst.vm.name,
            info.get("total-time"),
            info.get("downtime"),
            info.get("ram", {}).get("transferred"),
        )
        return info

    async def _reason(self) -> str:
        """QEMU's explanation: the source's ``error-desc`` and the exited destination's
        output (its last lines)."""
        parts: list[str] = []
        if self.src.vm.is_running():
            with trio.move_on_after(SETTLE_TIMEOUT):
                try:
                    info = await self.src.vm.cmd("query-migrate", timeout=SETTLE_TIMEOUT)
                except (MachineError, ExecuteError):
                    info = {}
                if info.get("error-desc"):
                    parts.append(f"{self.src.vm.name}: {info['error-desc']}")
        if self.dst.exited:
            output = self.dst.vm.log.strip()
            lines = output.splitlines()[-10:] if output else ["(no output)"]
            parts += [f"{self.dst.vm.name}: {line}" for line in lines]
        return "\n".join(parts)

    async def _failure(self) -> MigrationError:
        reason = await self._reason()
        return MigrationError(
            f"migration from {self.src.vm.name} to {self.dst.vm.name} failed "
            f"({self.src.describe()}; {self.dst.describe()})",
            source_status=self.src.final_status,
            destination_status=self.dst.final_status,
            reason=reason,
        )

    def _timeout_error(self) -> MigrationError:
        started = self.src.started
        return MigrationError(
            f"migration from {self.src.vm.name} to {self.dst.vm.name} did not complete "
            f"within {self.timeout} s"
            + (
                f"; it was cancelled ({self.src.describe()}; {self.dst.describe()})"
                if started
                else " (it had not started)"
            ),
            source_status=self.src.final_status,
            destination_status=self.dst.final_status,
        )
