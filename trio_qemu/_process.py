"""Spawning, supervising and stopping the QEMU process.

QEMU runs under ``trio.run_process`` started with ``nursery.start``, in a session of its own
(a terminal's Ctrl-C reaches us, not QEMU). Its stdout and stderr go straight to a log file,
so QEMU can never block on output and nothing needs draining; :meth:`QemuProcess.log_tail`
reads the end of that file (bounded) whenever diagnostics need it.

Stopping is explicit (:meth:`QemuProcess.kill`, :meth:`QemuProcess.terminate`); the
``deliver_cancel`` we give ``run_process`` kills the whole process group with SIGKILL at
once, because by the time a cancel reaches it the graceful path has been tried already.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

__all__ = ["QemuProcess"]

log = logging.getLogger("trio_qemu.process")

#: How much of QEMU's output diagnostics show, at most.
LOG_TAIL_BYTES = 64 * 1024


class QemuProcess:
    """One QEMU child process and its output log.

    :param argv: the full command line.
    :param pass_fds: fds QEMU inherits (socketpair ends, ``-add-fd`` fds).
    :param log_path: the file QEMU's stdout and stderr are written to.
    :param on_exit: called (synchronously) as soon as the process has exited and been reaped.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        log_path: Path,
        on_exit: Callable[[QemuProcess], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.pass_fds = tuple(pass_fds)
        self.log_path = log_path
        self._on_exit = on_exit
        self.process: trio.Process | None = None
        #: set once the process has exited and been reaped
        self.exited = trio.Event()
        self._saved_tail: str | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's pid (also its process group id), or None before it started."""
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped: negative for a signal, as in ``subprocess``."""
        return self.process.returncode if self.process is not None else None

    def is_running(self) -> bool:
        """Whether QEMU has started and not yet been reaped."""
        return self.process is not None and not self.exited.is_set()

    async def run(self, *, task_status: trio.TaskStatus[trio.Process]) -> None:
        """Start QEMU and wait for it to exit. For ``nursery.start``; started with the Process.

        Raises ``OSError`` (e.g. ``FileNotFoundError``) when it cannot be spawned.
        """
        with self._open_log() as log_file:
            try:
                await trio.run_process(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=self.pass_fds,
                    check=False,
                    start_new_session=True,
                    deliver_cancel=self._deliver_cancel,
                    task_status=_Started(self, task_status),
                )
            finally:
                if self.process is not None:
                    self.exited.set()
                    log.debug("pid %s exited with %s", self.pid, self.returncode)
                    if self._on_exit is not None:
                        self._on_exit(self)

    def _open_log(self) -> BinaryIO:
        # A local file opened once per launch: microseconds, not worth a thread.
        return open(self.log_path, "ab")

    async def _deliver_cancel(self, process: trio.Process) -> None:
        self.kill()

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        # The process group first (a wrapper's children too), then the pid itself in case
        # the child left the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL QEMU (and its process group). Reaping is done by :meth:`run`."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM QEMU: it shuts down in an orderly way, like ``quit``."""
        self._signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for QEMU to be reaped; return whether it was."""
        with trio.move_on_after(timeout):
            await self.exited.wait()
        return self.exited.is_set()

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        """The last ``limit`` bytes of QEMU's output, decoded leniently."""
        if self._saved_tail is not None:
            return self._saved_tail[-limit:]
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - limit))
                data = f.read()
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def save_tail(self) -> None:
        """Keep the log's tail in memory (before the file is removed with the temp dir)."""
        self._saved_tail = self.log_tail()


class _Started:
    """Forwards ``started(process)`` and records the Process before anyone else sees it."""

    def __init__(self, owner: QemuProcess, status: trio.TaskStatus[trio.Process]) -> None:
        self._owner = owner
        self._status = status

    def started(self, value: trio.Process | None = None) -> None:
        assert value is not None
        self._owner.process = value
        self._status.started(value)
