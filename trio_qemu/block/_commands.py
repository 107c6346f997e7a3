"""Block devices and jobs on a running machine.

:class:`BlockCommands` is mixed into :class:`~trio_qemu.Machine`. It needs only what
:class:`~trio_qemu.block._monitor.Monitor` names (the machine's ``name``, ``cmd``,
``subscribe`` and ``events_wait``); the work is done in :mod:`.nodes`, :mod:`.jobs` and
:mod:`.media`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from . import jobs, media, nodes
from ._monitor import Monitor
from .drives import Drive
from .jobs import JOB_TIMEOUT, Job, JobInfo
from .nodes import DEVICE_TIMEOUT

__all__ = ["BlockCommands"]


class BlockCommands:
    """``blockdev_add``, ``device_add``/``device_del``, ``run_job`` and media of a machine."""

    def _monitor(self) -> Monitor:
        return cast("Monitor", self)

    # -- nodes and devices -------------------------------------------------------------------
    async def blockdev_add(
        self,
        options: Drive | Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> str:
        """Add a block node (``blockdev-add``); return its node name.

        ``options``: a :class:`~trio_qemu.block.Drive` (its node) or the command's
        arguments; keyword ``fields`` are added with ``_`` turned into ``-``
        (``vm.blockdev_add(driver="null-co", node_name="n0", size=1 << 20)``).

        Raises:
            BlockError: QEMU refused it (its text: a missing image, a wrong format, a node
                name already used; a backing chain that loops is named as such).
        """
        return await nodes.blockdev_add(self._monitor(), options, timeout=timeout, **fields)

    async def blockdev_del(self, node_name: str, *, timeout: float | None = None) -> None:
        """Remove a node added with ``blockdev-add`` (:class:`~trio_qemu.BlockError` if
        QEMU refuses: it is in use)."""
        await nodes.blockdev_del(self._monitor(), node_name, timeout=timeout)

    async def device_add(
        self, driver: str, /, *, id: str, timeout: float | None = None, **props: Any
    ) -> str:
        """Plug a device (``device_add``) with properties ``props`` as QEMU names them
        (``vm.device_add("scsi-hd", id="d1", drive="n0", bus="trio-scsi.0")``); return its
        id. Raises :class:`~trio_qemu.BlockError` with QEMU's text when refused."""
        return await nodes.device_add(self._monitor(), driver, id=id, timeout=timeout, **props)

    async def device_del(self, id: str, *, timeout: float | None = DEVICE_TIMEOUT) -> None:
        """Unplug device ``id`` and wait for its ``DEVICE_DELETED`` event.

        Raises:
            BlockError: QEMU refused (no such device...).
            BlockTimeout: no ``DEVICE_DELETED`` within ``timeout`` seconds (a PCI device
                needs a guest that releases it).
        """
        await nodes.device_del(self._monitor(), id, timeout=timeout)

    # -- jobs ----------------------------------------------------------------------------------
    def start_job(
        self, command: str, /, *, timeout: float | None = None, **args: Any
    ) -> AbstractAsyncContextManager[Job]:
        """``async with vm.start_job("blockdev-mirror", job_id="m0", ...) as job:``
        subscribe to the job's events, then start it; see :func:`trio_qemu.block.start_job`.

        If the block raises (a cancellation included), the job is cancelled and waited for.
        """
        return jobs.start_job(self._monitor(), command, timeout=timeout, **args)

    def attach_job(
        self, job_id: str, *, auto_finalize: bool = True, auto_dismiss: bool = True
    ) -> AbstractAsyncContextManager[Job]:
        """``async with vm.attach_job("m0") as job:`` follow a job started with
        :meth:`cmd`; see :func:`trio_qemu.block.attach_job`."""
        return jobs.attach_job(
            self._monitor(), job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss
        )

    async def run_job(
        self,
        job_id: str,
        *,
        complete_on_ready: bool = True,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        timeout: float | None = JOB_TIMEOUT,
        on_progress: Callable[[JobInfo], object] | None = None,
        progress_interval: float = 1.0,
    ) -> JobInfo:
        """Drive job ``job_id`` (started with :meth:`cmd`, maybe already ready or done) to
        its end: complete it once ready, finalize and dismiss it when it was started with
        ``auto-finalize``/``auto-dismiss`` off (say so with ``auto_finalize=False`` /
        ``auto_dismiss=False``); return its final :class:`~trio_qemu.block.JobInfo`.

        Raises:
            JobError: it failed (QEMU's error text), was cancelled by someone else, or no
                such job exists; it is gone when this is raised.
            JobTimeout: it did not end within ``timeout`` seconds; it was cancelled and
                waited for. A cancellation of the call does the same, then goes on.
        """
        return await jobs.run_job(
            self._monitor(),
            job_id,
            complete_on_ready=complete_on_ready,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            timeout=timeout,
            on_progress=on_progress,
            progress_interval=progress_interval,
        )

    async def query_jobs(self, *, timeout: float | None = None) -> list[JobInfo]:
        """Every job QEMU has now (``query-jobs``), as :class:`~trio_qemu.block.JobInfo`."""
        return await jobs.query_jobs(self._monitor(), timeout=timeout)

    # -- removable media -------------------------------------------------------------------
    async def tray_is_open(self, id: str) -> bool | None:
        """Whether the tray of device ``id`` is open (None: it has no tray)."""
        return await media.tray_is_open(self._monitor(), id)

    async def open_tray(
        self, id: str, *, force: bool = False, timeout: float | None = DEVICE_TIMEOUT
    ) -> None:
        """Open the tray of device ``id`` and wait for ``DEVICE_TRAY_MOVED`` (``force``:
        even if the guest locked it). :class:`~trio_qemu.BlockTimeout` after ``timeout``."""
        await media.open_tray(self._monitor(), id, force=force, timeout=timeout)

    async def close_tray(self, id: str, *, timeout: float | None = DEVICE_TIMEOUT) -> None:
        """Close the tray of device ``id`` and wait for ``DEVICE_TRAY_MOVED``."""
        await media.close_tray(self._monitor(), id, timeout=timeout)

    async def eject(
        self, id: str, *, force: bool = False, timeout: float | None = DEVICE_TIMEOUT
    ) -> None:
        """Eject the medium of device ``id`` and wait until its tray is open."""
        await media.eject(self._monitor(), id, force=force, timeout=timeout)

    async def change_medium(
        self,
        id: str,
        file: str | os.PathLike[str],
        format: str,
        *,
        read_only: bool | None = None,
        timeout: float | None = DEVICE_TIMEOUT,
    ) -> None:
        """Put image ``file`` of format ``format`` in device ``id``
        (``blockdev-change-medium``) and wait until its tray has closed again."""
        await media.change_medium(
            self._monitor(), id, file, format, read_only=read_only, timeout=timeout
        )

    async def insert_medium(self, id: str, node_name: str) -> None:
        """Put node ``node_name`` into device ``id``, whose tray is open and empty."""
        await media.insert_medium(self._monitor(), id, node_name)

    async def remove_medium(self, id: str) -> None:
        """Take the medium out of device ``id``, whose tray is open (the node stays)."""
        await media.remove_medium(self._monitor(), id)
