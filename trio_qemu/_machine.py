"""A running QEMU machine: launch, supervision and teardown in one nursery.

:func:`open_machine` is the way in. Behind it, :class:`Machine` runs three service tasks:
the QEMU process (:mod:`._process`), the QMP reader (:mod:`._qmp`) and the console drain
(:mod:`._console`). Services run in shielded cancel scopes so that when the block is left
for any reason, even an outer cancel, they keep working through the shutdown sequence: the
``quit`` reply still arrives and the console is still drained. Only when QEMU is reaped are
they cancelled. Every step of that sequence has a deadline:

1. QEMU runs and QMP is up: send ``quit`` and wait up to ``shutdown_timeout`` for it to exit
   (without QMP: SIGTERM and the same wait).
2. Still running, or a hard stop was asked for: SIGKILL the process group and reap it.
3. Let the console drain read what QEMU printed last (up to 1 s; EOF is immediate).
4. Close the channels, cancel the services, remove the temporary directory.

If QEMU exits while the machine is in use and nobody asked it to, every pending call and
wait ends at once with :class:`~trio_qemu.MachineExited`, the body of ``open_machine`` is
cancelled, and the block raises that error.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from qemu.qmp import ExecuteError
from qemu.qmp.models import Greeting

from ._config import ChannelFds, MachineConfig
from ._console import Console
from ._errors import (
    AbnormalShutdown,
    LaunchError,
    MachineError,
    MachineExited,
    MachineTimeout,
    QMPConnectionClosed,
    QMPProtocolError,
    QMPTimeout,
)
from ._events import QMPEvent, Subscription
from ._process import QemuProcess
from ._qmp import QMPClient
from ._shell import Shell
from ._transport import Listener, socketpair_stream
from ._util import only_cancelled
from .agent import GuestAgent

__all__ = ["Machine", "open_machine", "open_machines", "start_machine"]

log = logging.getLogger("trio_qemu.machine")

_names = itertools.count(1)
#: A hard stop's wait for the kernel to reap a SIGKILLed QEMU; it is quick, but bounded.
_REAP_TIMEOUT = 10.0
#: How long a channel's EOF waits for QEMU's exit status, so that waiters get MachineExited
#: rather than a bare "closed" (a dying QEMU's EOF comes ~2 ms before it is reaped). Short,
#: because when QEMU closed a channel and runs on, that error must still come at once.
_EOF_GRACE = 0.25


def _merge(config: MachineConfig | None, fields: Mapping[str, Any]) -> MachineConfig:
    base = config if config is not None else MachineConfig()
    return base.replace(**fields) if fields else base


class Machine:
    """One QEMU virtual machine. Get one from :func:`open_machine` or :func:`start_machine`.

    Public state: :attr:`name`, :attr:`config`, :attr:`argv`, :attr:`pid`,
    :attr:`returncode`, :attr:`temp_dir`, :attr:`log_dir`, :attr:`log`, :attr:`console`.
    """

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        #: the label used in logs and errors
        self.name = config.name or f"qemu-{os.getpid()}-{next(_names)}"
        # The name as a file name part (temp dir, log file): no path separators.
        self._file_name = self.name.replace(os.sep, "_").replace("\0", "_") or "qemu"
        self.argv: list[str] = []
        self._temp_dir: Path | None = None
        self._log_dir: Path | None = None
        self._process: QemuProcess | None = None
        self._qmp: QMPClient | None = None
        self._console: Console | None = None
        self._shell: Shell | None = None
        self._agent: GuestAgent | None = None
        #: where lazily started services (the agent's reader) run; set by _launch
        self._nursery: trio.Nursery | None = None
        self._extra_streams: dict[str, trio.SocketStream] = {}
        #: our ends of the monitor and console connections, closed at teardown
        self._own_streams: list[trio.SocketStream] = []
        self._service_scopes: list[trio.CancelScope] = []
        self._expect_exit = False
        #: ``quit`` was sent through :meth:`qmp`/:meth:`cmd`: QEMU's exit is expected (as in
        #: ``QEMUMachine``), even if it is reaped before the caller gets to :meth:`wait`
        self._quit_issued = False
        self._stopping = False
        self._exit_error: MachineExited | None = None
        self._internal_error: BaseException | None = None
        self._launch_scope: trio.CancelScope | None = None
        self._on_death: Callable[[], None] | None = None
        self._launched = False
        self._teardown_started = False
        self._torn_down = trio.Event()
        self._console_drained = trio.Event()
        self._wake_supervisor = trio.Event()

    # -- state ---------------------------------------------------------------------------
    @property
    def temp_dir(self) -> Path:
        """The machine's private 0700 directory (removed at teardown)."""
        if self._temp_dir is None:
            raise MachineError(f"{self.name}: not launched yet")
        return self._temp_dir

    @property
    def log_dir(self) -> Path:
        """Where QEMU's output log is written (``config.log_dir`` or :attr:`temp_dir`)."""
        if self._log_dir is None:
            raise MachineError(f"{self.name}: not launched yet")
        return self._log_dir

    @property
    def pid(self) -> int | None:
        """QEMU's pid, or None before launch."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited (negative: killed by that signal)."""
        return self._process.returncode if self._process else None

    def is_running(self) -> bool:
        """Whether QEMU has been started and has not exited."""
        return self._process is not None and self._process.is_running()

    @property
    def exited(self) -> bool:
        """Whether QEMU has exited (and been reaped)."""
        return self._process is not None and self._process.exited.is_set()

    @property
    def log(self) -> str:
        """QEMU's own output (stdout and stderr) so far; the last 64 KiB at most."""
        return self._process.log_tail() if self._process else ""

    @property
    def log_path(self) -> Path | None:
        """The file QEMU's output is written to (removed at teardown unless ``log_dir``
        was given)."""
        return self._process.log_path if self._process else None

    @property
    def console(self) -> Console:
        """The serial console (needs ``console=True``)."""
        if self._console is None:
            raise MachineError(f"{self.name}: no console: launch it with console=True")
        return self._console

    @property
    def qmp_client(self) -> QMPClient:
        """The underlying QMP connection (needs ``qmp=True``)."""
        if self._qmp is None:
            raise MachineError(f"{self.name}: no QMP monitor: launch it with qmp=True")
        return self._qmp

    @property
    def greeting(self) -> Greeting | None:
        """QEMU's QMP greeting (with its version)."""
        return self._qmp.greeting if self._qmp else None

    @property
    def shell(self) -> Shell:
        """Commands in the guest over the dedicated shell channel (needs ``shell=True`` and a
        guest that runs the trio_qemu guest agent, like :mod:`trio_qemu.guest`'s)."""
        if self._shell is None:
            stream = self.channel("shell")
            self._shell = Shell(stream, name=f"{self.name}.shell", on_eof=self._on_qmp_eof)
            if self._torn_down.is_set() or self.failure is not None:
                self._shell.close(self.failure)
        return self._shell

    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent over the agent channel (needs ``agent=True`` and a guest that
        runs qemu-ga, like ``ensure_guest(agent=True)``'s). Its reader starts on first use;
        calls wait for the agent to answer within their own timeouts."""
        if self._agent is None:
            agent = GuestAgent(
                self.channel("agent"),
                name=f"{self.name}.agent",
                timeout=self.config.qmp_timeout,
                on_eof=self._on_qmp_eof,
                on_shutdown=self._agent_shutdown,
            )
            self._agent = agent
            if self._torn_down.is_set() or self.failure is not None or self._nursery is None:
                agent.fail(self.failure)
            else:
                self._nursery.start_soon(self._service, agent.run)
        return self._agent

    def _agent_shutdown(self, mode: str) -> None:
        """``guest-shutdown`` is being sent: when it will end QEMU, that exit is expected
        (as after ``quit``), not reported as MachineExited."""
        if mode == "powerdown" or (mode == "reboot" and "-no-reboot" in self.argv):
            self._quit_issued = True

    def channel(self, name: str) -> trio.SocketStream:
        """Our end of the ``shell`` or ``agent`` socketpair channel."""
        try:
            return self._extra_streams[name]
        except KeyError:
            raise MachineError(
                f"{self.name}: no {name} channel: launch it with {name}=True"
            ) from None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<Machine {self.name} pid={self.pid} {state}>"

    # -- QMP -----------------------------------------------------------------------------
    async def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Run a QMP command; return the raw response (``{"return": ...}`` or
        ``{"error": ...}``). Keyword arguments have ``_`` turned into ``-``; ``timeout=`` and
        ``fds=`` are options of the call (see :meth:`QMPClient.qmp`). Sending ``quit`` this
        way makes QEMU's exit expected: it is not reported as :class:`MachineExited`."""
        client = self.qmp_client
        if cmd == "quit":
            self._quit_issued = True
        return await client.qmp(cmd, args, **kwargs)

    async def cmd(self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command and return its value; raises ``qemu.qmp.ExecuteError``.
        ``quit`` makes QEMU's exit expected, as with :meth:`qmp`."""
        client = self.qmp_client
        if cmd == "quit":
            self._quit_issued = True
        return await client.cmd(cmd, args, **kwargs)

    async def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human monitor command (``info registers``); return its text output.

        HMP reports its own errors as text, not as QMP errors.
        """
        result = await self.qmp_client.cmd(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return str(result)

    async def screenshot(
        self, path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> Path:
        """Save the display as a PNG at ``path`` (QMP ``screendump``); return the path.

        Needs a display device: launch with ``display=True`` (or your own ``-device VGA``).
        QEMU writes the file itself, so ``path`` must be writable by QEMU's user.
        """
        # QEMU resolves a relative path against its own cwd: give it ours (a string join).
        target = Path(os.path.abspath(path))  # noqa: ASYNC240
        try:
            await self.qmp_client.cmd(
                "screendump", {"filename": str(target), "format": "png"}, timeout=timeout
            )
        except ExecuteError as exc:
            hint = ""
            if "no console" in str(exc).lower():
                hint = " (the machine has no display: launch it with display=True)"
            raise MachineError(f"{self.name}: screendump failed: {exc}{hint}") from exc
        return target

    def subscribe(
        self, *names: str, match: Mapping[str, object] | None = None, buffer: int | None = None
    ) -> Subscription:
        """A bounded stream of events named ``names`` (all when none) matching ``match``.

        Subscribe first, then act: ``async with vm.subscribe("STOP") as events: ...``.
        """
        return self.qmp_client.subscribe(*names, match=match, buffer=buffer)

    async def event_wait(
        self, name: str, timeout: float | None = 60.0, match: Mapping[str, object] | None = None
    ) -> QMPEvent:
        """The first event ``name`` matching ``match``, including an unclaimed earlier one.

        Raises :class:`~trio_qemu.QMPTimeout` after ``timeout`` s (None: no limit).
        """
        return await self.qmp_client.event_wait(name, timeout, match)

    async def events_wait(
        self,
        events: Iterable[tuple[str, Mapping[str, object] | None]],
        timeout: float | None = 60.0,
    ) -> QMPEvent:
        """The first event matching any of the ``(name, match)`` pairs."""
        return await self.qmp_client.events_wait(events, timeout)

    def get_events(self) -> list[QMPEvent]:
        """Take the events that arrived and that nobody has claimed (oldest first)."""
        return self.qmp_client.get_events()

    def clear_events(self) -> None:
        """Forget the unclaimed events."""
        self.qmp_client.get_events()

    async def send_fd_scm(self, fd: int) -> None:
        """Pass ``fd`` to QEMU over the monitor socket (then name it with ``getfd``)."""
        await self.qmp_client.send_fd_scm(fd)

    # -- launch --------------------------------------------------------------------------
    async def _launch(self, nursery: trio.Nursery) -> None:
        config = self.config
        self._nursery = nursery
        try:
            self._temp_dir = Path(
                tempfile.mkdtemp(prefix=f"trio-qemu-{self._file_name}-", dir=config.base_temp_dir)
            )
        except OSError as exc:
            raise LaunchError(
                f"cannot create the machine's temporary directory: {exc}", name=self.name
            ) from exc
        self._log_dir = Path(config.log_dir) if config.log_dir is not None else self._temp_dir
        theirs: list[socket.socket] = []
        listener: Listener | None = None
        try:
            fds: dict[str, int] = {}
            monitor_stream: trio.SocketStream | None = None
            console_stream: trio.SocketStream | None = None
            if config.qmp and config.monitor_address is None:
                monitor_stream, peer = socketpair_stream()
                self._own_streams.append(monitor_stream)
                theirs.append(peer)
                fds["monitor"] = peer.fileno()
            elif config.qmp:
                assert config.monitor_address is not None
                try:
                    listener = await Listener.open(config.monitor_address)
                except OSError as exc:
                    raise LaunchError(
                        f"cannot listen at monitor_address {config.monitor_address!r}: {exc}",
                        name=self.name,
                    ) from exc
            if config.console:
                console_stream, peer = socketpair_stream()
                self._own_streams.append(console_stream)
                theirs.append(peer)
                fds["console"] = peer.fileno()
            for channel in ("shell", "agent"):
                if getattr(config, channel):
                    stream, peer = socketpair_stream()
                    self._extra_streams[channel] = stream
                    theirs.append(peer)
                    fds[channel] = peer.fileno()
            # With a listener, QEMU must be told the address really bound (a port 0 is chosen).
            argv_config = config if listener is None else config.replace(
                monitor_address=listener.address
            )
            self.argv = argv_config.argv(ChannelFds(**fds))
            self._process = QemuProcess(
                self.argv,
                pass_fds=[*(s.fileno() for s in theirs), *config.pass_fds()],
                log_path=self._log_dir / f"{self._file_name}.log",
                on_exit=self._process_exited,
            )
            log.info("%s: starting %s", self.name, " ".join(self.argv))
            try:
                await nursery.start(self._service, self._process.run)
            except OSError as exc:
                raise LaunchError(
                    f"cannot start QEMU: {exc.strerror or exc}", argv=self.argv, name=self.name
                ) from exc
            finally:
                for peer in theirs:
                    peer.close()
            if config.console:
                assert console_stream is not None
                self._console = Console(
                    name=f"{self.name}.console",
                    buffer_size=config.console_buffer,
                    log_path=config.console_log,
                )
                await nursery.start(
                    self._service,
                    self._run_console,
                    _ExitAwareStream(console_stream, self._process),
                )
            if config.qmp:
                await self._connect_qmp(nursery, monitor_stream, listener)
            nursery.start_soon(self._supervise)
            self._launched = True
        except BaseException as exc:
            if listener is not None:
                listener.close()
            for peer in theirs:  # if we failed before QEMU was spawned
                peer.close()
            await self._teardown(hard=True, reason=exc)
            raise

    async def _connect_qmp(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | None,
        listener: Listener | None,
    ) -> None:
        """Connect and negotiate, racing QEMU's exit and ``launch_timeout``."""
        config = self.config
        assert self._process is not None
        failure: str | None = None
        cause: BaseException | None = None
        with trio.CancelScope() as scope:
            self._launch_scope = scope
            scope.relative_deadline = config.launch_timeout
            try:
                if listener is not None:
                    stream = await listener.accept(timeout=config.launch_timeout)
                    self._own_streams.append(stream)
                assert stream is not None
                self._qmp = QMPClient(
                    stream,
                    name=f"{self.name}.qmp",
                    timeout=config.qmp_timeout,
                    event_buffer=config.event_buffer,
                    event_cache=config.event_cache,
                )
                await self._qmp.handshake(timeout=config.launch_timeout)
            except QMPTimeout as exc:
                cause = exc
                failure = (
                    f"QEMU's monitor was not ready within launch_timeout={config.launch_timeout} s"
                )
            except QMPConnectionClosed as exc:
                cause = exc
                failure = "QEMU closed its monitor before it was ready"
            except QMPProtocolError as exc:
                cause = exc
                failure = f"QEMU's monitor broke the protocol: {exc}"
        self._launch_scope = None
        if scope.cancelled_caught and not self._process.exited.is_set():
            failure = (
                f"QEMU's monitor was not ready within launch_timeout={config.launch_timeout} s"
            )
        elif failure is not None or self._process.exited.is_set():
            # The monitor closed: give QEMU a moment to exit so we can report its status.
            await self._process.wait(_EOF_GRACE)
            if self._process.exited.is_set():
                failure = "QEMU exited before its monitor was ready"
            elif failure is None:  # pragma: no cover - exited flag implies failure
                failure = "QEMU's monitor closed during launch"
        if failure is not None:
            raise LaunchError(
                failure,
                argv=self.argv,
                returncode=self._process.returncode,
                output=self._process.log_tail(),
                name=self.name,
            ) from cause
        assert self._qmp is not None
        await nursery.start(self._service, self._run_qmp_reader)

    async def _run_console(
        self, stream: trio.abc.Stream, *, task_status: trio.TaskStatus[None]
    ) -> None:
        assert self._console is not None
        try:
            await self._console.run(stream, task_status=task_status)
        finally:
            self._console_drained.set()

    async def _run_qmp_reader(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self._qmp is not None
        await self._qmp.run(on_eof=self._on_qmp_eof, task_status=task_status)

    async def _on_qmp_eof(self) -> None:
        """QEMU closed its monitor: usually it is exiting, so wait briefly for its status."""
        if self._process is not None:
            await self._process.wait(_EOF_GRACE)

    async def _service(
        self,
        fn: Callable[..., Awaitable[None]],
        *args: Any,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one service task shielded from outside cancellation until teardown ends it.

        The shield goes up only once ``nursery.start`` has handed the task to the machine's
        nursery. If the launch is cancelled before that, Trio leaves the task where it was
        and it must stay cancellable: the process task then kills QEMU (our
        ``deliver_cancel``) instead of holding the launch forever.

        An error before the task has started propagates to ``nursery.start``; one after is
        an internal failure that stops the machine with a clear error.
        """
        with trio.CancelScope() as scope:
            status = _Status(task_status, scope)
            self._service_scopes.append(scope)
            if self._torn_down.is_set():
                scope.cancel()
            try:
                await fn(*args, task_status=status)
            except Exception as exc:
                if not status.started_called:
                    raise
                log.exception("%s: internal task %s failed", self.name, fn)
                self._fail_internal(exc)

    # -- supervision -----------------------------------------------------------------------
    def _process_exited(self, process: QemuProcess) -> None:
        """Called as soon as QEMU is reaped, from the process task."""
        if self._launch_scope is not None:
            self._launch_scope.cancel()
        if self._stopping or self._expect_exit or self._quit_issued or not self._launched:
            return
        error = MachineExited(self.name, process.returncode, process.log_tail(4096))
        log.warning("%s", error)
        self._exit_error = error
        self._fail_waiters(error)
        self._wake_supervisor.set()

    def _fail_internal(self, exc: BaseException) -> None:
        if self._internal_error is None and not self._stopping:
            error = MachineError(f"{self.name}: internal failure: {exc!r}")
            error.__cause__ = exc
            self._internal_error = error
            self._fail_waiters(error)
            self._wake_supervisor.set()

    def _fail_waiters(self, error: BaseException) -> None:
        if self._qmp is not None:
            self._qmp.fail(error)
        if self._console is not None:
            self._console.close(error)
        if self._shell is not None:
            self._shell.close(error)
        if self._agent is not None:
            self._agent.fail(error)

    async def _supervise(self) -> None:
        """Turns QEMU's unexpected death into teardown plus cancellation of the user's body,
        and an outer cancel into a full shutdown."""
        try:
            await self._wake_supervisor.wait()
        except trio.Cancelled:
            await self._teardown(hard=False, reason=None)
            raise
        failure = self._exit_error or self._internal_error
        if failure is None:
            return  # a normal teardown woke us
        await self._teardown(hard=True, reason=failure)
        if self._on_death is not None:
            self._on_death()
        else:
            raise failure

    @property
    def failure(self) -> BaseException | None:
        """Why the machine stopped on its own (QEMU died, or an internal task failed)."""
        return self._exit_error or self._internal_error

    # -- stopping ------------------------------------------------------------------------
    async def shutdown(self, hard: bool = False, timeout: float | None = None) -> None:
        """Stop QEMU and clean up; idempotent.

        Graceful: ``quit`` over QMP (SIGTERM without QMP), then up to ``timeout`` s
        (default ``shutdown_timeout``) for QEMU to exit; after that, or with ``hard=True``,
        SIGKILL. Raises :class:`~trio_qemu.AbnormalShutdown` when a graceful stop was asked
        for and QEMU had to be killed. The whole sequence is shielded from cancellation and
        bounded by its timeouts.
        """
        graceful_failed = await self._teardown(hard=hard, reason=None, timeout=timeout)
        if graceful_failed is not None:
            raise AbnormalShutdown(
                f"{self.name}: graceful shutdown failed ({graceful_failed}); QEMU was killed"
                f"\n  QEMU output:\n{self.log[-2000:]}"
            )

    async def kill(self) -> None:
        """SIGKILL QEMU now and clean up."""
        await self._teardown(hard=True, reason=None)

    async def wait_exited(self, timeout: float | None = 30.0) -> bool:
        """Wait up to ``timeout`` s (None: no limit) for QEMU to exit, for whatever reason;
        return whether it has. Unlike :meth:`wait` this changes nothing: an unexpected exit
        is still reported as :class:`~trio_qemu.MachineExited`."""
        if self._process is None:
            raise MachineError(f"{self.name}: not launched yet")
        return await self._process.wait(math.inf if timeout is None else timeout)

    async def wait(self, timeout: float | None = 30.0) -> int | None:
        """Wait for QEMU to exit on its own (e.g. the guest powered off), then clean up.

        Returns the exit status. Raises :class:`~trio_qemu.MachineTimeout` if QEMU still
        runs after ``timeout`` s (None: no limit); QEMU is left running then.
        """
        assert self._process is not None
        self._expect_exit = True
        try:
            if not await self._process.wait(math.inf if timeout is None else timeout):
                raise MachineTimeout(f"{self.name}: QEMU still runs after {timeout} s")
        finally:
            self._expect_exit = self._process.exited.is_set()
        await self._teardown(hard=True, reason=None)
        return self.returncode

    async def _teardown(
        self, *, hard: bool, reason: BaseException | None, timeout: float | None = None
    ) -> str | None:
        """The one shutdown sequence (see the module docstring). Concurrent callers wait for
        the first. Returns why a graceful stop failed, or None."""
        if self._teardown_started:
            with trio.CancelScope(shield=True):
                await self._torn_down.wait()
            return None
        self._teardown_started = True
        self._stopping = True
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        graceful_failed: str | None = None
        with trio.CancelScope(shield=True):
            try:
                graceful_failed = await self._stop_process(hard, timeout)
                if self._console is not None and self.exited:
                    # QEMU is gone: what it printed last is still in the socket. Read it
                    # to the end (EOF comes at once) before the drain is cancelled.
                    with trio.move_on_after(_EOF_GRACE):
                        await self._console_drained.wait()
            finally:
                self._cleanup()
        if reason is None and graceful_failed:
            log.warning("%s: %s", self.name, graceful_failed)
        return graceful_failed

    async def _stop_process(self, hard: bool, timeout: float) -> str | None:
        process = self._process
        if process is None or process.process is None or process.exited.is_set():
            return None
        graceful_failed: str | None = None
        if not hard:
            qmp = self._qmp
            if qmp is not None and not qmp.closed:
                with trio.move_on_after(timeout) as scope:
                    try:
                        await qmp.qmp("quit", timeout=timeout)
                    except (QMPConnectionClosed, MachineError) as exc:
                        log.debug("%s: quit: %r", self.name, exc)
                    await process.exited.wait()
                if scope.cancelled_caught:
                    graceful_failed = f"QEMU did not exit within {timeout} s of quit"
            else:
                process.terminate()
                if not await process.wait(timeout):
                    graceful_failed = f"QEMU did not exit within {timeout} s of SIGTERM"
        if not process.exited.is_set():
            process.kill()
            if not await process.wait(_REAP_TIMEOUT):  # pragma: no cover - kernel trouble
                log.error("%s: pid %s not reaped after SIGKILL", self.name, process.pid)
        return graceful_failed

    def _cleanup(self) -> None:
        """Close channels, end the services, remove the temp dir. Synchronous, no waits."""
        closed = QMPConnectionClosed(f"{self.name}: the machine is shut down")
        if self._qmp is not None:
            self._qmp.fail(self._exit_error or closed)
        if self._console is not None:  # an orderly end lets line iterators finish cleanly
            self._console.close(self._exit_error)
        if self._shell is not None:
            self._shell.close(self._exit_error or closed)
        if self._agent is not None:
            self._agent.fail(self._exit_error or closed)
        for stream in [*self._own_streams, *self._extra_streams.values()]:
            stream.socket.close()
        if self._process is not None:
            self._process.save_tail()
        for scope in self._service_scopes:
            scope.cancel()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._torn_down.set()
        self._wake_supervisor.set()


class _ExitAwareStream(trio.abc.Stream):
    """Our end of the console as the console drain sees it.

    When QEMU dies, its console reaches end of file (or breaks) a moment before QEMU is
    reaped. This reports that end only once QEMU's exit is known (waiting at most
    ``_EOF_GRACE`` s), so that console waiters fail with :class:`MachineExited` rather than
    a bare "the console ended", as the QMP reader's ``on_eof`` does for QMP.
    """

    def __init__(self, stream: trio.SocketStream, process: QemuProcess) -> None:
        self._stream = stream
        self._process = process

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            await self._process.wait(_EOF_GRACE)
            raise
        if not data:
            await self._process.wait(_EOF_GRACE)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Status:
    """A task status that remembers ``started()`` and then shields the service's scope.

    Trio moves a started task into the target nursery, unless the ``start`` call was
    cancelled meanwhile (then the task stays behind and must remain cancellable).
    """

    def __init__(self, inner: trio.TaskStatus[Any], scope: trio.CancelScope) -> None:
        self._inner = inner
        self._scope = scope
        self._origin = trio.lowlevel.current_task().parent_nursery
        self.started_called = False

    def started(self, value: Any = None) -> None:
        self.started_called = True
        self._inner.started(value)
        moved = trio.lowlevel.current_task().parent_nursery is not self._origin
        if moved or self._inner is trio.TASK_STATUS_IGNORED:
            self._scope.shield = True


async def start_machine(nursery: trio.Nursery, config: MachineConfig | None = None, /,
                        **fields: Any) -> Machine:
    """Launch a machine whose tasks live in ``nursery``; return once QMP is negotiated.

    The machine runs until :meth:`Machine.shutdown` or until the nursery is cancelled (then
    it is shut down gracefully, shielded and bounded). If QEMU dies unexpectedly,
    :class:`~trio_qemu.MachineExited` is raised into the nursery. Raises
    :class:`~trio_qemu.LaunchError` when QEMU cannot be started.
    """
    machine = Machine(_merge(config, fields))
    await machine._launch(nursery)
    return machine


@asynccontextmanager
async def open_machine(
    config: MachineConfig | None = None, /, **fields: Any
) -> AsyncIterator[Machine]:
    """Launch a machine for the block; leaving the block for any reason shuts it down.

    ``fields`` override ``config`` (``open_machine(machine="none")`` needs no config).
    On return QEMU has exited and been reaped, and its temporary files are gone. Raises
    :class:`~trio_qemu.LaunchError` if the launch fails,
    :class:`~trio_qemu.MachineExited` if QEMU dies while the block runs (the block is
    cancelled at once), :class:`~trio_qemu.AbnormalShutdown` if the final graceful stop
    failed. An exception from the block itself always wins over a teardown problem.
    """
    machine = Machine(_merge(config, fields))
    launch_error: BaseException | None = None
    body_error: BaseException | None = None
    graceful_failed: str | None = None
    body_scope = trio.CancelScope()
    machine._on_death = body_scope.cancel
    async with trio.open_nursery() as nursery:
        try:
            await machine._launch(nursery)
        except BaseException as exc:  # raised below, outside the nursery: no group
            launch_error = exc
        else:
            with body_scope:
                try:
                    yield machine
                except BaseException as exc:
                    body_error = exc
            graceful_failed = await machine._teardown(hard=False, reason=body_error)
    if launch_error is not None:
        raise launch_error
    failure = machine.failure
    if body_error is not None:
        if failure is not None and only_cancelled(body_error):
            raise failure from None
        raise body_error
    if failure is not None:
        raise failure
    if graceful_failed is not None:
        raise AbnormalShutdown(
            f"{machine.name}: graceful shutdown failed ({graceful_failed}); QEMU was killed"
        )


@asynccontextmanager
async def open_machines(*configs: MachineConfig) -> AsyncIterator[list[Machine]]:
    """Launch several machines concurrently; tear them all down concurrently on exit.

    If one launch fails the others are cancelled (and cleaned up) and its
    :class:`~trio_qemu.LaunchError`, which names the machine, is raised.
    """
    machines: list[Machine | None] = [None] * len(configs)
    errors: list[BaseException] = []
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:

        async def launch(index: int, config: MachineConfig) -> None:
            machine = Machine(config)
            try:
                await machine._launch(nursery)
            except trio.Cancelled:
                raise
            except BaseException as exc:
                errors.append(exc)
                launch_scope.cancel()
                return
            machines[index] = machine

        with trio.CancelScope() as launch_scope:
            async with trio.open_nursery() as launchers:
                for index, config in enumerate(configs):
                    launchers.start_soon(launch, index, config)
        started = [m for m in machines if m is not None]
        if not errors:
            with trio.CancelScope() as body_scope:
                for machine in started:
                    machine._on_death = body_scope.cancel
                try:
                    yield started
                except BaseException as exc:
                    body_error = exc
        async with trio.open_nursery() as stoppers:
            for machine in started:
                stoppers.start_soon(_stop_quietly, machine, body_error)
    failures = [m.failure for m in started if m.failure is not None]
    if errors:
        raise errors[0]
    if body_error is not None:
        if failures and only_cancelled(body_error):
            raise failures[0] from None
        raise body_error
    if failures:
        raise failures[0]


async def _stop_quietly(machine: Machine, reason: BaseException | None) -> None:
    await machine._teardown(hard=False, reason=reason)
