"""Block nodes and devices at run time: ``blockdev-add``/``-del``, ``device_add``/``_del``.

Each refusal is a :class:`~trio_qemu.BlockError` quoting QEMU ("Duplicate nodes with
node-name='disk0'", "Could not open 'x.qcow2': No such file or directory", "Image is not in
qcow2 format"), with the ``ExecuteError`` as its cause; QEMU runs on. A node whose backing
chain loops only makes QEMU say it cannot lock the file again, so when ``blockdev-add`` of a
file node fails on a backing file, ``qemu-img`` looks at the chain and the error says that
it loops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from qemu.qmp import ExecuteError

from . import images
from ._errors import BlockError, BlockTimeout, ImageError
from ._monitor import Monitor, deadline_after, error_text, receive_until, run_command
from .drives import Drive

__all__ = ["DEVICE_TIMEOUT", "blockdev_add", "blockdev_del", "device_add", "device_del"]

log = logging.getLogger("trio_qemu.block")

DEVICE_TIMEOUT: Final = 30.0
"""The default wait (seconds) for ``DEVICE_DELETED`` and ``DEVICE_TRAY_MOVED``."""

#: How long the loop diagnosis may take after a refused blockdev-add.
_DIAGNOSIS_TIMEOUT: Final = 10.0


def _dashed(fields: Mapping[str, object]) -> dict[str, object]:
    return {key.replace("_", "-"): value for key, value in fields.items()}


def _filename(options: Mapping[str, Any]) -> str | None:
    """The image file a ``blockdev-add`` opens through the ``file`` driver, if one."""
    child = options.get("file")
    if isinstance(child, Mapping) and child.get("driver") == "file":
        name = child.get("filename")
        return name if isinstance(name, str) else None
    return None


async def _loop_hint(options: Mapping[str, Any], desc: str) -> str:
    """Why a backing file could not be opened, when the reason is a loop in the chain."""
    filename = _filename(options)
    if filename is None or "backing" not in desc.lower():
        return ""
    try:
        await images.backing_chain(filename, force_share=True, timeout=_DIAGNOSIS_TIMEOUT)
    except ImageError as exc:
        if "infinite loop" in exc.reason:
            return f"; the backing chain of {filename} is a loop: {exc.reason}"
    return ""


async def blockdev_add(
    vm: Monitor,
    options: Drive | Mapping[str, Any] | None = None,
    /,
    *,
    timeout: float | None = None,
    **fields: Any,
) -> str:
    """Add a block node (``blockdev-add``); return its node name.

    ``options`` is a :class:`Drive` (its node: format, file, read-only, options) or the
    command's arguments as QEMU spells them; keyword ``fields`` are added with ``_`` turned
    into ``-`` (``node_name="n0"``).
    """
    if isinstance(options, Drive):
        arguments: dict[str, Any] = options.blockdev_options()
    else:
        arguments = dict(options or {})
    arguments.update(_dashed(fields))
    node = arguments.get("node-name")
    if not isinstance(node, str) or not node:
        raise ValueError("blockdev_add needs a node_name (a top-level node must have one)")
    try:
        await vm.cmd("blockdev-add", arguments, timeout=timeout)
    except ExecuteError as exc:
        desc = error_text(exc)
        hint = await _loop_hint(arguments, desc)
        raise BlockError(
            f"{vm.name}: blockdev-add of node {node!r} refused: {desc}{hint}",
            command="blockdev-add",
            desc=desc,
        ) from exc
    return node


async def blockdev_del(vm: Monitor, node_name: str, *, timeout: float | None = None) -> None:
    """Remove a node added with ``blockdev-add`` (it must be unused)."""
    await run_command(
        vm, "blockdev-del", {"node-name": node_name},
        what=f"blockdev-del of node {node_name!r}", timeout=timeout,
    )  # fmt: skip


async def device_add(
    vm: Monitor, driver: str, /, *, id: str, timeout: float | None = None, **props: Any
) -> str:
    """Plug a device (``device_add``); return its id.

    ``props`` are the device's properties as QEMU names them (``drive="n0"``,
    ``bus="trio-scsi.0"``; names with a dash through ``**{"num-queues": 2}``).
    """
    await run_command(
        vm, "device_add", {"driver": driver, "id": id, **props},
        what=f"device_add {driver} (id {id!r})", timeout=timeout,
    )  # fmt: skip
    return id


async def device_del(vm: Monitor, id: str, *, timeout: float | None = DEVICE_TIMEOUT) -> None:
    """Unplug a device and wait for QEMU's ``DEVICE_DELETED`` for it.

    SCSI, USB and removable devices go at once; a PCI device needs the guest to let it go
    (a guest that does not answer leaves it plugged in: :class:`~trio_qemu.BlockTimeout`
    after ``timeout`` seconds, the request staying with the guest).
    """
    with vm.subscribe("DEVICE_DELETED", match={"data": {"device": id}}) as events:
        await run_command(vm, "device_del", {"id": id}, what=f"device_del of {id!r}")
        deadline = deadline_after(timeout)
        if await receive_until(events, deadline, f"DEVICE_DELETED of {id!r}") is None:
            raise BlockTimeout(
                f"{vm.name}: device {id!r} was not deleted within {timeout} s (a PCI device "
                "needs the guest to release it)",
                command="device_del",
            )
