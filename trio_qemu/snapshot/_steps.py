"""The QMP steps templates and clones share: capabilities, passing a file, following a
migration to its end."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from typing import Final

import trio
from qemu.qmp import ExecuteError

from .._errors import EventsDropped, MachineError
from .._events import Subscription
from .._machine import Machine
from ._template import TemplateError

__all__ = [
    "EXITED",
    "TERMINAL",
    "command",
    "drop_fd",
    "error_desc",
    "fdname",
    "follow",
    "give_fd",
    "set_capabilities",
]

log = logging.getLogger("trio_qemu.snapshot")

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
"""Migration statuses after which nothing more happens."""
EXITED: Final = "exited"
"""What :func:`follow` returns when QEMU went away before a terminal status."""

_names = itertools.count(1)


def fdname() -> str:
    """A name for one ``getfd`` (QEMU takes the fd out of its table when it is used)."""
    return f"trio-qemu-snapshot-{os.getpid()}-{next(_names)}-{secrets.token_hex(3)}"


async def set_capabilities(vm: Machine, state: bool = True) -> None:
    """``x-ignore-shared`` (RAM in a shared file is neither saved nor loaded: the clones map
    it) and ``events`` (``MIGRATION`` events tell when it is done): on, or back off."""
    capabilities = [{"capability": name, "state": state} for name in ("x-ignore-shared", "events")]
    await command(vm, "migrate-set-capabilities", {"capabilities": capabilities})


async def command(vm: Machine, name: str, args: dict[str, object] | None = None) -> object:
    """A QMP command; QEMU refusing it is a :class:`TemplateError` with its reason."""
    try:
        return await vm.cmd(name, args)
    except ExecuteError as exc:
        raise TemplateError(f"{vm.name}: QEMU refused {name}: {exc}") from exc


async def give_fd(vm: Machine, path: str | os.PathLike[str], flags: int, name: str) -> None:
    """Open ``path`` with ``flags`` and hand the fd to QEMU under ``name`` (SCM_RIGHTS with
    ``getfd``); our copy is closed at once, whatever happens."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        try:
            await vm.cmd("getfd", {"fdname": name}, fds=[fd])
        except ExecuteError as exc:
            raise TemplateError(f"{vm.name}: QEMU refused getfd: {exc}") from exc
    finally:
        os.close(fd)


async def drop_fd(vm: Machine, name: str) -> None:
    """Best effort: release an fd QEMU received but did not use (bounded)."""
    with trio.move_on_after(5):
        try:
            await vm.qmp("closefd", {"fdname": name})
        except MachineError as exc:
            log.debug("%s: closefd: %r", vm.name, exc)


async def follow(vm: Machine, events: Subscription) -> str:
    """Wait for the migration's terminal status (``completed``, ``failed``,
    ``cancelled``), or :data:`EXITED` when QEMU goes away first. Unbounded: the caller
    bounds it."""
    while True:
        try:
            event = await events.receive()
        except EventsDropped:  # a starved subscriber: ask for the state instead
            status = await _query(vm)
        except (MachineError, trio.EndOfChannel):
            return EXITED
        else:
            status = (event.get("data") or {}).get("status")
        if status in TERMINAL:
            assert isinstance(status, str)
            return status


async def _query(vm: Machine) -> str | None:
    try:
        info = await vm.cmd("query-migrate", timeout=10)
    except ExecuteError:
        return None
    status = info.get("status")
    return status if isinstance(status, str) else None


async def error_desc(vm: Machine) -> str:
    """QEMU's reason for a failed migration (``query-migrate``'s ``error-desc``), or ``""``."""
    with trio.move_on_after(5):
        try:
            info = await vm.cmd("query-migrate", timeout=5)
        except (MachineError, ExecuteError):
            return ""
        return str(info.get("error-desc") or "")
    return ""
