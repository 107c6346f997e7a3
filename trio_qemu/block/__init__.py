"""Disks, images and block jobs: the storage side of QEMU, without sleeping or polling.

Three parts, as QEMU's own iotests use them:

- **Images** (:mod:`trio_qemu.block.images`): ``qemu-img`` and ``qemu-io`` from Trio, each
  with a timeout, parsed JSON results and :class:`~trio_qemu.ImageError` carrying the
  tool's message and command line (``from trio_qemu.block import images as img``).
- **Drives** (:class:`Drive`): frozen, validated disks for ``MachineConfig(drives=...)``,
  turned into ``-blockdev`` nodes and ``-device`` front ends (virtio-blk, scsi-hd/scsi-cd on
  virtio-scsi, ide-hd/ide-cd, floppy); and at run time ``vm.blockdev_add(...)``,
  ``vm.device_add(...)``, ``vm.device_del(id)`` (waits for ``DEVICE_DELETED``) and the
  removable-media methods (``vm.open_tray``, ``close_tray``, ``eject``, ``change_medium``,
  ``insert_medium``, ``remove_medium``: each waits for ``DEVICE_TRAY_MOVED``).
- **Jobs** (:class:`Job`): mirror, commit, stream, backup followed through
  ``JOB_STATUS_CHANGE`` and ``BLOCK_JOB_*`` events::

      await vm.cmd("blockdev-mirror", job_id="m0", device="disk0", target="copy",
                   sync="full")
      info = await vm.run_job("m0")          # ready -> job-complete -> gone: JobInfo

      async with vm.start_job("blockdev-backup", job_id="b0", device="disk0",
                              target="bak", sync="full", auto_finalize=False) as job:
          info = await job.run()             # sends job-finalize when it is pending

  ``run_job`` loses nothing that happened before it was called (the job may already be
  ready, or done); a failed job raises :class:`~trio_qemu.JobError` with QEMU's text; on a
  timeout or a cancellation the job is cancelled and waited for, and the machine stays
  usable.

The tiny guest sees disks too: ``image.config(disks=["data.qcow2"])`` gives it
``/dev/vda`` with the ext2/ext4 driver loaded, and busybox ``mke2fs`` and ``mount`` work on
it (see :meth:`trio_qemu.guest.GuestImage.config`).
"""

from .._util import publish as _publish
from . import images
from ._errors import BlockError, BlockTimeout, ImageError, ImageTimeout, JobError, JobTimeout
from .drives import FDC_ID, INTERFACES, REMOVABLE_INTERFACES, SCSI_CONTROLLER_ID, Drive
from .jobs import JOB_CLEANUP_TIMEOUT, JOB_EVENTS, JOB_STATUSES, JOB_TIMEOUT, Job, JobInfo
from .nodes import DEVICE_TIMEOUT

__all__ = [
    "DEVICE_TIMEOUT",
    "FDC_ID",
    "INTERFACES",
    "JOB_CLEANUP_TIMEOUT",
    "JOB_EVENTS",
    "JOB_STATUSES",
    "JOB_TIMEOUT",
    "REMOVABLE_INTERFACES",
    "SCSI_CONTROLLER_ID",
    "BlockError",
    "BlockTimeout",
    "Drive",
    "ImageError",
    "ImageTimeout",
    "Job",
    "JobError",
    "JobInfo",
    "JobTimeout",
    "images",
]

_publish(__name__, globals(), __all__)
