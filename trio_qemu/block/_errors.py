"""The disk errors: QEMU refusing a block command, a block job failing, qemu-img failing.

They sit in the error tree drawn in :mod:`trio_qemu._errors`, under ``MachineError``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import MachineError

__all__ = ["BlockError", "BlockTimeout", "ImageError", "ImageTimeout", "JobError", "JobTimeout"]


class BlockError(MachineError):
    """QEMU refused a block command, or a block wait ran out of time.

    Raised by the disk and block-job methods of a machine (``blockdev_add``, ``device_add``,
    ``device_del``, the tray and medium methods, a job's start). ``command`` is the QMP
    command, ``desc`` QEMU's own error text (empty when nothing was refused), and the
    ``qemu.qmp.ExecuteError`` is the ``__cause__``. QEMU runs on unharmed.
    """

    def __init__(self, message: str, *, command: str = "", desc: str = "") -> None:
        self.command = command
        self.desc = desc
        super().__init__(message)


class BlockTimeout(BlockError, TimeoutError):
    """A block wait (``device_del`` for ``DEVICE_DELETED``, a tray for
    ``DEVICE_TRAY_MOVED``) ran out of time; the request stays with QEMU (and the guest)."""


class JobError(BlockError):
    """A block job failed, was cancelled by someone else, could not start, or refused a verb.

    ``job_id`` is the job, ``status`` its last known status (``"null"`` once it is gone),
    ``desc`` QEMU's text (the job's error, ``"Operation canceled"``, or the refusal:
    ``Job 'job0' in state 'running' cannot accept command verb 'complete'``) and ``verb``
    the refused verb or command (else None). When a job failed, trio_qemu has dismissed or
    cancelled it: no job is left behind.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str,
        status: str | None = None,
        desc: str = "",
        verb: str | None = None,
        command: str = "",
    ) -> None:
        self.job_id = job_id
        self.status = status
        self.verb = verb
        super().__init__(message, command=command, desc=desc)


class JobTimeout(JobError, TimeoutError):
    """A block job did not finish (or reach the awaited status) in time; it was cancelled
    (``job-cancel``, dismissed when needed) and waited for, so the machine stays usable."""


class ImageError(MachineError):
    """``qemu-img`` or ``qemu-io`` failed.

    ``reason`` is the tool's own message (its last lines of error output), ``argv`` the
    command line, ``returncode`` its exit status (None when it was killed on a timeout) and
    ``output`` everything it wrote to stderr and stdout (the last 64 KiB at most).
    """

    def __init__(
        self,
        reason: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        self.reason = reason
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(reason)

    def __str__(self) -> str:
        parts = [self.reason]
        if self.returncode is not None:
            parts.append(f"  exit status: {self.returncode}")
        if self.argv:
            parts.append(f"  command line: {' '.join(self.argv)}")
        return "\n".join(parts)


class ImageTimeout(ImageError, TimeoutError):
    """``qemu-img`` or ``qemu-io`` outlived its timeout and was killed (an image it was
    creating is removed)."""
