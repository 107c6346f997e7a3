"""Removable media: trays and media of CD-ROM and floppy drives, waited for through events.

QEMU moves a tray when asked (or when the guest lets it) and says so in ``DEVICE_TRAY_MOVED``
(``{"id": ..., "tray-open": ...}``). Each function here subscribes to that event for the
device, learns where the tray is from ``query-block``, sends the command and, when the tray
has to move, waits for the event: nothing sleeps, and a tray already where it should be
needs no wait. A floppy drive has no tray (QEMU reports none): its media change at once and
no event is awaited. Devices are named by their id (``Drive.id``, ``device_add``'s ``id``).

A guest can lock a tray (a mounted CD-ROM): opening it then asks the guest to eject, and
without a guest that answers the wait runs out (:class:`~trio_qemu.BlockTimeout`);
``force=True`` opens it anyway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._events import Subscription
from ._errors import BlockError, BlockTimeout
from ._monitor import Monitor, deadline_after, receive_until, run_command
from .nodes import DEVICE_TIMEOUT

__all__ = [
    "change_medium",
    "close_tray",
    "eject",
    "insert_medium",
    "open_tray",
    "remove_medium",
    "tray_is_open",
]

_READ_ONLY_MODES = {None: "retain", True: "read-only", False: "read-write"}


async def _command(vm: Monitor, command: str, arguments: Mapping[str, Any]) -> None:
    await run_command(vm, command, arguments, what=f"{command} of {arguments.get('id')!r}")


def _is_device(qdev: str, id: str) -> bool:
    """Whether ``query-block``'s ``qdev`` (``cd0`` or a QOM path) names the device ``id``."""
    return (
        qdev == id
        or qdev == f"/machine/peripheral/{id}"
        or (qdev.startswith(f"/machine/peripheral/{id}/"))
    )


async def _tray(vm: Monitor, id: str) -> tuple[bool, bool]:
    """Whether device ``id`` has a tray, and whether that tray is open."""
    entries = await vm.cmd("query-block")
    for entry in entries:
        if _is_device(str(entry.get("qdev", "")), id):
            return "tray_open" in entry, bool(entry.get("tray_open", False))
    known = ", ".join(sorted(repr(os.path.basename(str(e.get("qdev", "")))) for e in entries))
    raise BlockError(
        f"{vm.name}: no block device with id {id!r} (query-block lists: {known or 'none'})",
        command="query-block",
    )


async def tray_is_open(vm: Monitor, id: str) -> bool | None:
    """Whether the tray of device ``id`` is open; None for a device without a tray."""
    has_tray, is_open = await _tray(vm, id)
    return is_open if has_tray else None


async def _wait_tray(
    vm: Monitor, events: Subscription, id: str, want_open: bool, timeout: float | None
) -> None:
    deadline = deadline_after(timeout)
    what = f"the tray of {id!r} to {'open' if want_open else 'close'}"
    while True:
        event = await receive_until(events, deadline, what)
        if event is None:
            hint = (
                " (the guest may hold it locked: force=True opens it anyway)" if want_open else ""
            )
            raise BlockTimeout(
                f"{vm.name}: waited {timeout} s for {what}: no DEVICE_TRAY_MOVED{hint}",
                command="DEVICE_TRAY_MOVED",
            )
        if event.get("data", {}).get("tray-open") is want_open:
            return


def _subscribe(vm: Monitor, id: str) -> Subscription:
    return vm.subscribe("DEVICE_TRAY_MOVED", match={"data": {"id": id}})


async def open_tray(
    vm: Monitor, id: str, *, force: bool = False, timeout: float | None = DEVICE_TIMEOUT
) -> None:
    """Open the tray of device ``id`` (``blockdev-open-tray``) and wait until it is open.

    ``force=True`` opens a tray the guest has locked.
    """
    with _subscribe(vm, id) as events:
        has_tray, is_open = await _tray(vm, id)
        await _command(vm, "blockdev-open-tray", {"id": id, "force": force})
        if has_tray and not is_open:
            await _wait_tray(vm, events, id, True, timeout)


async def close_tray(vm: Monitor, id: str, *, timeout: float | None = DEVICE_TIMEOUT) -> None:
    """Close the tray of device ``id`` (``blockdev-close-tray``) and wait until it is closed."""
    with _subscribe(vm, id) as events:
        has_tray, is_open = await _tray(vm, id)
        await _command(vm, "blockdev-close-tray", {"id": id})
        if has_tray and is_open:
            await _wait_tray(vm, events, id, False, timeout)


async def eject(
    vm: Monitor, id: str, *, force: bool = False, timeout: float | None = DEVICE_TIMEOUT
) -> None:
    """Eject the medium of device ``id`` (``eject``: the tray opens and the medium goes)
    and wait until the tray is open. ``force=True`` ejects from a tray the guest locked."""
    with _subscribe(vm, id) as events:
        has_tray, is_open = await _tray(vm, id)
        await _command(vm, "eject", {"id": id, "force": force})
        if has_tray and not is_open:
            await _wait_tray(vm, events, id, True, timeout)


async def change_medium(
    vm: Monitor,
    id: str,
    file: str | os.PathLike[str],
    format: str,
    *,
    read_only: bool | None = None,
    timeout: float | None = DEVICE_TIMEOUT,
) -> None:
    """Put the image ``file`` (format ``format``) in device ``id``
    (``blockdev-change-medium``: the tray opens, the medium is swapped, the tray closes) and
    wait until the tray is closed.

    ``read_only``: True or False opens the new medium read-only or read-write; None keeps
    the drive's previous mode.
    """
    arguments = {
        "id": id,
        "filename": os.fspath(file),
        "format": format,
        "read-only-mode": _READ_ONLY_MODES[read_only],
    }
    with _subscribe(vm, id) as events:
        has_tray, _ = await _tray(vm, id)
        await _command(vm, "blockdev-change-medium", arguments)
        if has_tray:
            await _wait_tray(vm, events, id, False, timeout)


async def insert_medium(vm: Monitor, id: str, node_name: str) -> None:
    """Put the block node ``node_name`` (from ``blockdev_add``) into device ``id``, whose
    tray must be open and empty (``blockdev-insert-medium``); close the tray afterwards."""
    await _command(vm, "blockdev-insert-medium", {"id": id, "node-name": node_name})


async def remove_medium(vm: Monitor, id: str) -> None:
    """Take the medium out of device ``id``, whose tray must be open
    (``blockdev-remove-medium``); the node stays (``blockdev_del`` removes it)."""
    await _command(vm, "blockdev-remove-medium", {"id": id})
