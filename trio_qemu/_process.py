"""Spawning, supervising and stopping the QEMU process.

QEMU never outlives its controller
    QEMU runs as ``setpriv --pdeathsig KILL -- qemu ...``: util-linux's ``setpriv`` asks the
    kernel (``PR_SET_PDEATHSIG``) to SIGKILL it when its parent goes away, then execs QEMU,
    which keeps that setting, the pid and the parent. So when the Python process running us
    dies for any reason (SIGKILL from the OOM killer, SIGTERM from a CI job being cancelled,
    a crash), QEMU gets SIGKILL at once. QEMU stays our direct child: we reap it ourselves
    and see its real exit status.

    The death signal belongs to the *thread* that forked, not to the process: a thread
    that exits kills the children it forked. ``trio.run_process`` forks in a worker thread
    that retires after 10 s idle, which would kill QEMU 10 s after launch. So we fork from
    the Trio thread itself, which lives as long as ``trio.run``: ``subprocess.Popen`` called
    synchronously. Python uses ``vfork`` here and returns once ``setpriv`` has been exec'd:
    it blocks the event loop for about 0.3 ms (median measured; a few ms on a loaded
    machine), comparable to what ``trio.run_process`` spends in its thread. The first launch of a
    process also checks, once, that ``setpriv`` knows ``--pdeathsig`` (about 4 ms).

    SIGKILL, not SIGTERM: a QEMU whose controller is gone must go for sure and at once;
    nobody is left to wait for an orderly shutdown that may hang.

    Without a usable ``setpriv`` (missing, or busybox's, which lacks ``--pdeathsig``) QEMU
    is spawned plainly and a warning is logged once: it then survives a controller killed
    by SIGKILL or SIGTERM. Limits: a controller killed in the half millisecond between the
    fork and ``setpriv``'s ``prctl`` leaves that one QEMU behind (``setpriv`` cannot tell
    that its parent already died); a command wrapper (``MachineConfig.wrapper``) gets the
    death signal, not the QEMU it runs.

Output
    QEMU's stdout and stderr go straight to a log file, so QEMU can never block on output
    and nothing needs draining; :meth:`QemuProcess.log_tail` reads the end of that file
    (bounded) whenever diagnostics need it.

Waiting and stopping
    QEMU runs in a session of its own (a terminal's Ctrl-C reaches us, not QEMU). Its exit
    is awaited through a pidfd (``wait_readable``), then it is reaped at once. Stopping is
    explicit (:meth:`QemuProcess.kill`, :meth:`QemuProcess.terminate`). When
    :meth:`QemuProcess.run` is cancelled, it sends SIGKILL to the process group at once
    (the graceful path has been tried by then) and returns only once QEMU is reaped, or
    after ``REAP_TIMEOUT`` s if the kernel cannot reap it (logged as an error).
    :meth:`QemuProcess.run` is protected from ``KeyboardInterrupt``: a Ctrl-C cannot land
    between the fork and our recording the pid, nor in the middle of the cleanup; Trio
    delivers it to the main task instead, whose unwinding cancels us.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

__all__ = ["QemuProcess", "death_signal_prefix"]

log = logging.getLogger("trio_qemu.process")

#: How much of QEMU's output diagnostics show, at most.
LOG_TAIL_BYTES = 64 * 1024

#: How long a cancelled :meth:`QemuProcess.run` waits for SIGKILL'd QEMU to be reaped.
REAP_TIMEOUT = 10.0

_SETPRIV_UNKNOWN = "?"
_setpriv: str | None = _SETPRIV_UNKNOWN


def death_signal_prefix() -> list[str]:
    """The command prefix that makes a child die with its parent (``setpriv --pdeathsig
    KILL --``), or ``[]`` when no ``setpriv`` that can do it is installed (warned about once).

    The first call looks ``setpriv`` up in ``PATH`` and checks it knows ``--pdeathsig``
    (util-linux 2.33+; busybox's does not) by running it once: about 4 ms, once per process.
    """
    global _setpriv
    if _setpriv == _SETPRIV_UNKNOWN:
        _setpriv = _find_setpriv()
    return [] if _setpriv is None else [_setpriv, "--pdeathsig", "KILL", "--"]


def _find_setpriv() -> str | None:
    path = shutil.which("setpriv")
    problem = "not found"
    if path is not None:
        try:
            probe = subprocess.run(
                [path, "--pdeathsig", "KILL", "--", path, "--version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            problem = f"unusable ({exc})"
        else:
            if probe.returncode == 0:
                return path
            problem = f"at {path} does not support --pdeathsig"
    log.warning(
        "setpriv (util-linux) %s: QEMU will outlive this process if it is killed "
        "(SIGKILL, SIGTERM) instead of shut down",
        problem,
    )
    return None


def _resolve(program: str) -> str:
    """The executable ``program`` names, as exec would find it, or the ``OSError`` that
    spawning it directly would raise (``setpriv`` would only report it in QEMU's log)."""
    if os.sep in program:
        path: str | None = program
    else:
        path = shutil.which(program)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return path


class QemuProcess:
    """One QEMU child process and its output log.

    :param argv: the full command line (as QEMU and error messages show it; the
        ``setpriv`` prefix is not part of it).
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
        if not argv:
            raise ValueError("an empty command line")
        self.argv = list(argv)
        self.pass_fds = tuple(pass_fds)
        self.log_path = log_path
        self._on_exit = on_exit
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        #: set once the process has exited and been reaped
        self.exited = trio.Event()
        self._saved_tail: str | None = None
        #: how long spawning took (seconds), once started
        self.spawn_time: float | None = None

    @property
    def started(self) -> bool:
        """Whether QEMU has been spawned (it may have exited since)."""
        return self._popen is not None

    @property
    def pid(self) -> int | None:
        """QEMU's pid (also its process group id), or None before it started."""
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped: negative for a signal, as in ``subprocess``."""
        return self._popen.returncode if self._popen is not None else None

    def is_running(self) -> bool:
        """Whether QEMU has started and not yet been reaped."""
        return self._popen is not None and not self.exited.is_set()

    @trio.lowlevel.enable_ki_protection
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Start QEMU and wait for it to exit. For ``nursery.start``, which returns QEMU's pid
        as soon as it is spawned.

        Raises ``OSError`` (e.g. ``FileNotFoundError``) when it cannot be spawned. Cancelled,
        it kills QEMU's process group with SIGKILL and returns once QEMU is reaped (at most
        ``REAP_TIMEOUT`` s).
        """
        if self._popen is not None:
            raise RuntimeError("QemuProcess.run() called twice")
        with self._open_log() as log_file:
            popen = self._spawn(log_file)
        try:
            task_status.started(popen.pid)
            await self._wait_reaped()
        finally:
            try:
                if popen.returncode is None:  # cancelled (or failed) while QEMU runs
                    self.kill()
                    with trio.CancelScope(shield=True), trio.move_on_after(REAP_TIMEOUT):
                        await self._wait_reaped()
            finally:
                self._close_pidfd()
                if popen.returncode is None:  # pragma: no cover - kernel trouble
                    log.error("pid %s not reaped %s s after SIGKILL", popen.pid, REAP_TIMEOUT)
                else:
                    self.exited.set()
                    log.debug("pid %s exited with %s", popen.pid, popen.returncode)
                    if self._on_exit is not None:
                        self._on_exit(self)

    def _spawn(self, log_file: BinaryIO) -> subprocess.Popen[bytes]:
        """Fork and exec from this (the Trio) thread; record the child before returning.

        Runs inside :meth:`run`'s KeyboardInterrupt protection, without a checkpoint.
        """
        _resolve(self.argv[0])  # setpriv finds it the same way (execvp, same PATH)
        argv = [*death_signal_prefix(), *self.argv]
        start = time.perf_counter()
        self._popen = popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=self.pass_fds,
            start_new_session=True,
        )
        self.spawn_time = time.perf_counter() - start
        try:
            # Race-free: the child is ours and unreaped, so its pid cannot be reused.
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError) as exc:  # kernel < 5.3, or a seccomp filter
            log.debug("pidfd_open unavailable (%r): waiting in a thread", exc)
        log.debug("spawned pid %s in %.2f ms", popen.pid, self.spawn_time * 1000)
        return popen

    async def _wait_reaped(self) -> None:
        """Wait until the child has exited, then reap it (here, in the Trio thread)."""
        popen = self._popen
        assert popen is not None
        if popen.returncode is not None:
            return
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            # waitid(WNOWAIT) only observes the exit; reaping stays with us, so a thread
            # abandoned on cancel never touches a pid that could be reused.
            await trio.to_thread.run_sync(_wait_exit_no_reap, popen.pid, abandon_on_cancel=True)
        popen.wait()  # exited already: returns at once

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)

    def _open_log(self) -> BinaryIO:
        # A local file opened once per launch: microseconds, not worth a thread.
        return open(self.log_path, "ab")

    def _signal(self, sig: signal.Signals) -> None:
        popen = self._popen
        if popen is None or popen.returncode is not None:
            return  # never spawned, or reaped: the pid may belong to someone else now
        # The process group first (a wrapper's children too), then the pid itself in case
        # the child left the group. Until we reap it, the pid stays ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, sig)

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


def _wait_exit_no_reap(pid: int) -> None:
    """Block until ``pid`` (our child) has exited, leaving it unreaped."""
    while True:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
        except ChildProcessError:  # reaped by someone else: nothing more to wait for
            pass
        return
