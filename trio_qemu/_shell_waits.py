"""Waiting on guest state through the shell: retry a command until it succeeds or fails.

:class:`ShellWaits` is mixed into :class:`~trio_qemu.Shell`; it needs only the shell's
``name``, ``run`` and ``_operation`` (the cancel scope :meth:`~trio_qemu.Shell.close` cancels,
so that a wait ends at once with the machine's error when QEMU dies).

These waits poll: a busybox guest offers nothing the host could block on until a command
would give another answer (no inotify tool, no event channel), so the command is run again
every ``interval`` seconds until it answers as wanted or ``timeout`` runs out.
"""

from __future__ import annotations

import math
import shlex
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import trio

from ._errors import GuestWaitTimeout, ShellTimeout

if TYPE_CHECKING:
    from ._shell import GuestResult

__all__ = ["ShellWaits", "check_wait_args"]


def check_wait_args(timeout: float, interval: float) -> None:
    """Raise ValueError naming ``timeout`` or ``interval`` unless each is a positive number
    (``timeout`` may be ``math.inf``; ``interval`` must be finite)."""
    for name, value in (("timeout", timeout), ("interval", interval)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number of seconds, not {value!r}")
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    if math.isinf(interval):
        raise ValueError(f"interval must be finite, not {interval!r}")


class ShellWaits:
    """``wait_until_succeeds``, ``wait_until_fails`` and ``wait_for_file`` of a shell.

    Each polls (see the module docstring): the command runs, and runs again every
    ``interval`` seconds, until its exit status is the one waited for. Each run is bounded
    by the time left; a run still going when ``timeout`` expires is killed as
    :meth:`~trio_qemu.Shell.run` kills a timed-out command (which may take up to the
    shell's ``kill_timeout`` more). The runs take their turn with the shell's other
    commands, and the time spent waiting for that turn counts.
    """

    name: str

    async def run(  # pragma: no cover - provided by Shell
        self,
        command: str,
        *,
        timeout: float = 60.0,
        check: bool = False,
        stdin: bytes | None = None,
    ) -> GuestResult:
        raise NotImplementedError

    def _operation(self) -> AbstractContextManager[None]:  # pragma: no cover - Shell's
        raise NotImplementedError

    async def wait_until_succeeds(
        self, command: str, *, timeout: float = 60.0, interval: float = 0.5
    ) -> GuestResult:
        """Run ``command`` until it exits with status 0; return that run's result.

        Polls: the command runs again every ``interval`` seconds (a busybox guest has
        nothing to wait on instead).

        Args:
            command: a ``sh -c`` command line, as for :meth:`~trio_qemu.Shell.run`.
            timeout: seconds the whole wait may take.
            interval: seconds between the end of one run and the start of the next.

        Returns:
            The result of the first run that exited with status 0.

        Raises:
            GuestWaitTimeout: ``timeout`` expired first; it carries the last run's result
                (exit status and output) or the error that ended it.
            ValueError: ``timeout`` or ``interval`` is zero or negative.
            ShellError: the guest shell is gone or its channel broke.
            MachineExited: QEMU died meanwhile (at once, even between two runs).
        """
        return await self._wait(command, True, timeout, interval)

    async def wait_until_fails(
        self, command: str, *, timeout: float = 60.0, interval: float = 0.5
    ) -> GuestResult:
        """Run ``command`` until it exits with a non-zero status; return that run's result.

        Polls, as :meth:`wait_until_succeeds` does, and takes and raises the same.
        The :class:`~trio_qemu.GuestWaitTimeout` carries the last run that still succeeded.
        """
        return await self._wait(command, False, timeout, interval)

    async def wait_for_file(
        self, path: str, *, timeout: float = 60.0, interval: float = 0.5
    ) -> GuestResult:
        """Wait until ``path`` exists in the guest (a file, a directory, anything:
        ``test -e``); return the result of the ``test`` that found it.

        Polls, as :meth:`wait_until_succeeds` does (the tiny guest has no inotify tool),
        and raises the same. A relative ``path`` is taken from ``/``, where commands run.
        """
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty str, not {path!r}")
        return await self._wait(f"test -e {shlex.quote(path)}", True, timeout, interval)

    async def _wait(
        self, command: str, succeed: bool, timeout: float, interval: float
    ) -> GuestResult:
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, not {command!r}")
        check_wait_args(timeout, interval)
        wanted = "exit with status 0" if succeed else "fail (a non-zero exit status)"
        deadline = trio.current_time() + timeout
        attempts = 0
        last: GuestResult | None = None
        error: ShellTimeout | None = None
        # close() cancels this scope when QEMU dies: the wait then raises the machine's
        # error at once, even while it sleeps between two runs.
        with self._operation():
            while True:
                attempts += 1
                try:
                    last = await self.run(command, timeout=deadline - trio.current_time())
                    error = None
                except ShellTimeout as exc:  # this run took the rest of the time
                    error = exc
                else:
                    if (last.returncode == 0) == succeed:
                        return last
                now = trio.current_time()
                if error is not None or now + interval >= deadline:
                    break
                await trio.sleep(interval)
        raise GuestWaitTimeout(
            f"{self.name}: {command!r} did not {wanted} within {timeout} s "
            f"({attempts} run(s), every {interval} s)",
            command=command,
            timeout=timeout,
            attempts=attempts,
            result=last,
            error=error,
        ) from error
