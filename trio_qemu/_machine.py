"""A running QEMU machine: launch, supervision and teardown in one nursery.

:class:`Machine` runs three service tasks: the QEMU process (:mod:`._process`), the QMP
reader (:mod:`._qmp`) and the console drain (:mod:`._console`); the openers in
:mod:`._openers` wrap it for users. Services run in shielded cancel scopes so that when the
block is left for any reason, even an outer cancel, they keep working through the shutdown
sequence: the ``quit`` reply still arrives and the console is still drained. Only when QEMU
is reaped are they cancelled. Every step of that sequence has a deadline:

1. QEMU runs and QMP is up: send ``quit`` and wait up to ``shutdown_timeout`` for it to exit
   (without QMP: SIGTERM and the same wait).
2. Still running, or a hard stop was asked for: SIGKILL the process group.
3. Let the console drain read what QEMU printed last (up to :data:`~._util.EOF_GRACE`).
4. :meth:`Machine._release`: close the channels, cancel the services, remove the temporary
   directory. It is synchronous, protected from ``KeyboardInterrupt`` and runs in a
   ``finally``: a Ctrl-C (or any error) at any await of steps 1-3 skips to a SIGKILL and
   still releases everything, so no waiter is left hanging.

The machine's code is protected from ``KeyboardInterrupt`` (``enable_ki_protection``): Trio
then delivers Ctrl-C only at a checkpoint of the task that runs ``trio.run``'s main
function, never halfway through a state change of ours.

The lifecycle is one :class:`MachineState`; whether QEMU's exit is an error is decided in
one place, :meth:`Machine.exit_expected`. If QEMU exits while the machine is ``RUNNING`` and
nobody said to expect it, every pending call and wait ends at once with
:class:`~trio_qemu.MachineExited`, and the owner is told (``on_failure``) so it can cancel
the user's block.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from qemu.qmp.models import Greeting

from ._channels import Channels
from ._config import SHELL_PORT_ID, MachineConfig, check_paths
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
from ._guest_channels import GuestChannels
from ._invariants import Invariants
from ._keys import KeyboardInput
from ._monitor import MonitorCommands
from ._process import QemuProcess
from ._qmp import QMPClient
from ._shell import Shell
from ._tempdirs import create_machine_dir, remove_machine_dir, remove_stale_dirs
from ._transport import ExitAwareStream, Listener
from ._util import EOF_GRACE, ShieldOnStart
from .agent import GuestAgent
from .block._commands import BlockCommands
from .relay._commands import GuestPorts
from .relay._relay import Relay

__all__ = ["Machine", "MachineState"]

log = logging.getLogger("trio_qemu.machine")

_names = itertools.count(1)
#: A hard stop's wait for the kernel to reap a SIGKILLed QEMU; it is quick, but bounded.
_REAP_TIMEOUT = 10.0

_ki_protected = trio.lowlevel.enable_ki_protection


class MachineState(enum.Enum):
    """Where a :class:`Machine` is in its life; it only moves forward.

    ``IDLE`` (made, not launched) -> ``LAUNCHING`` (QEMU spawned, QMP not yet ready) ->
    ``RUNNING`` (in use; an unexpected exit is an error) -> ``STOPPING`` (the shutdown
    sequence runs) -> ``STOPPED`` (QEMU gone or killed, channels closed, temp dir removed).
    A failed launch goes from ``LAUNCHING`` to ``STOPPING`` as well.
    """

    IDLE = "idle"
    LAUNCHING = "launching"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Machine(
    GuestChannels, MonitorCommands, KeyboardInput, Invariants, BlockCommands, GuestPorts
):
    """One QEMU virtual machine. Get one from :func:`~trio_qemu.open_machine` or
    :func:`~trio_qemu.start_machine`.

    Public state: :attr:`name`, :attr:`config`, :attr:`state`, :attr:`argv`, :attr:`pid`,
    :attr:`returncode`, :attr:`temp_dir`, :attr:`log_dir`, :attr:`log`, :attr:`console`.

    Args:
        config: what to launch.
        on_failure: called once QEMU died unexpectedly (or an internal task failed) and the
            machine was torn down; without it that error is raised into the nursery.
    """

    def __init__(
        self, config: MachineConfig, *, on_failure: Callable[[], None] | None = None
    ) -> None:
        #: the configuration it was launched with
        self.config = config
        #: the label used in logs and errors
        self.name = config.name or f"qemu-{os.getpid()}-{next(_names)}"
        # The name as a file name part (temp dir, log file): no path separators.
        self._file_name = self.name.replace(os.sep, "_").replace("\0", "_") or "qemu"
        #: QEMU's full command line (empty before launch)
        self.argv: list[str] = []
        self._state = MachineState.IDLE
        #: why QEMU's exit is expected while running ("quit", "wait", ...), or None
        self._expected_exit: str | None = None
        self._on_failure = on_failure
        self._temp_dir: Path | None = None
        self._log_dir: Path | None = None
        self._process: QemuProcess | None = None
        self._qmp: QMPClient | None = None
        self._console: Console | None = None
        self._shell: Shell | None = None
        self._agent: GuestAgent | None = None
        self._relay: Relay | None = None
        #: where lazily started services (the agent's reader) run; set by launch()
        self._nursery: trio.Nursery | None = None
        self._channels = Channels(self.name)
        #: a monitor connection accepted from a listener (monitor_address), closed at teardown
        self._accepted: trio.SocketStream | None = None
        self._service_scopes: list[trio.CancelScope] = []
        self._exit_error: MachineExited | None = None
        self._internal_error: BaseException | None = None
        self._launch_scope: trio.CancelScope | None = None
        self._released = trio.Event()
        self._console_drained = trio.Event()
        self._wake_supervisor = trio.Event()

    @property
    def state(self) -> MachineState:
        """The lifecycle state (see :class:`MachineState`)."""
        return self._state

    def exit_expected(self) -> bool:
        """Whether QEMU exiting now would be expected, rather than a :class:`MachineExited`.

        The one place this is decided: expected unless the machine is ``RUNNING`` and
        nobody announced the exit (``quit`` through :meth:`qmp`/:meth:`cmd`, :meth:`wait`, a
        guest shutdown through the agent, or :meth:`expect_exit`).
        """
        return self._state is not MachineState.RUNNING or self._expected_exit is not None

    def expect_exit(self, reason: str | None = "expected") -> None:
        """Announce that QEMU is about to exit on purpose (``reason`` is for logs), so the
        exit is not reported as :class:`~trio_qemu.MachineExited`; None withdraws it."""
        self._expected_exit = reason

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

    def _unusable(self) -> bool:
        """Whether a channel client made now must start closed (stopped, or failed)."""
        return self._state is MachineState.STOPPED or self.failure is not None

    def __repr__(self) -> str:
        return f"<Machine {self.name} pid={self.pid} {self._state.value} rc={self.returncode}>"

    # -- launch --------------------------------------------------------------------------
    @_ki_protected
    async def launch(self, nursery: trio.Nursery) -> None:
        """Start QEMU with its service tasks in ``nursery``; return once QMP is negotiated.

        The lower layer of :func:`~trio_qemu.start_machine` (which is this on a new
        machine). A machine launches once. Raises :class:`~trio_qemu.LaunchError` when QEMU
        cannot be started or its monitor is not ready in time; nothing is left behind then.
        """
        if self._state is not MachineState.IDLE:
            raise MachineError(f"{self.name}: a machine launches once (it is {self._state.value})")
        self._state = MachineState.LAUNCHING
        try:
            await self._launch(nursery)
        except BaseException:
            # Whatever failed (or a Ctrl-C at a checkpoint): nothing may be left behind.
            await self._teardown(hard=True)
            raise
        self._state = MachineState.RUNNING
        if self._process is not None and self._process.exited.is_set():
            self._process_exited(self._process)  # it died in the last moment of the launch

    async def _launch(self, nursery: trio.Nursery) -> None:
        config = self.config
        self._nursery = nursery
        check_paths(config, name=self.name)  # log_dir, console_log: before anything is made
        self._make_temp_dir()
        self._log_dir = Path(config.log_dir) if config.log_dir is not None else self.temp_dir
        channels = self._channels
        listener: Listener | None = None
        try:
            if config.qmp and config.monitor_address is None:
                channels.open("monitor")
            elif config.qmp:
                assert config.monitor_address is not None
                try:
                    listener = await Listener.open(config.monitor_address)
                except OSError as exc:
                    raise LaunchError(
                        f"cannot listen at monitor_address {config.monitor_address!r}: {exc}",
                        name=self.name,
                    ) from exc
            for channel in ("console", "shell", "agent", "relay"):
                if getattr(config, channel):
                    channels.open(channel)
            # With a listener, QEMU must be told the address really bound (a port 0 is chosen).
            argv_config = config if listener is None else config.replace(
                monitor_address=listener.address
            )
            self.argv = argv_config.argv(channels.fds())
            self._process = QemuProcess(
                self.argv,
                pass_fds=[*channels.pass_fds(), *config.pass_fds()],
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
                channels.close_theirs()
            if config.console:
                self._console = Console(
                    name=f"{self.name}.console",
                    buffer_size=config.console_buffer,
                    log_path=config.console_log,
                )
                stream = ExitAwareStream(channels.ours["console"], self._process.wait, EOF_GRACE)
                await nursery.start(self._service, self._run_console, stream)
            if config.qmp:
                await self._connect_qmp(nursery, channels.ours.get("monitor"), listener)
                if config.shell:  # QEMU says when the guest closes the shell port
                    port = {"data": {"id": SHELL_PORT_ID}}
                    events = self.subscribe("VSERPORT_CHANGE", match=port)
                    await nursery.start(self._service, self.shell.watch_port, events)
            if config.relay:
                await self._start_relay(nursery)
            nursery.start_soon(self._supervise)
        finally:
            if listener is not None:
                listener.close()
            channels.close_theirs()  # if we failed before QEMU was spawned

    @_ki_protected
    def _make_temp_dir(self) -> None:
        """Create the private temp dir (its owner recorded) and remove dead controllers'."""
        base = self.config.base_temp_dir
        remove_stale_dirs(base)  # never raises: a base it cannot read has nothing to clean
        try:
            self._temp_dir = create_machine_dir(self._file_name, base)
        except OSError as exc:
            raise LaunchError(
                f"cannot create the machine's temporary directory in base_temp_dir="
                f"{str(base) if base is not None else '(the default)'}: {exc}",
                name=self.name,
            ) from exc

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
                    self._accepted = stream
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
            await self._process.wait(EOF_GRACE)
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
            await self._process.wait(EOF_GRACE)

    @_ki_protected
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
            status = ShieldOnStart(task_status, scope)
            self._service_scopes.append(scope)
            if self._released.is_set():
                scope.cancel()
            try:
                await fn(*args, task_status=status)
            except Exception as exc:
                if not status.started_called:
                    raise
                log.exception("%s: internal task %s failed", self.name, fn)
                self._fail_internal(exc)

    # -- supervision -----------------------------------------------------------------------
    @_ki_protected
    def _process_exited(self, process: QemuProcess) -> None:
        """Called as soon as QEMU is reaped, from the process task."""
        if self._launch_scope is not None:
            self._launch_scope.cancel()
        if self.exit_expected():
            return
        error = MachineExited(self.name, process.returncode, process.log_tail(4096))
        log.warning("%s", error)
        self._exit_error = error
        self._fail_waiters(error)
        self._wake_supervisor.set()

    def _fail_internal(self, exc: BaseException) -> None:
        if self._internal_error is None and self._state is MachineState.RUNNING:
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
        if self._relay is not None:
            self._relay.fail(error)

    @_ki_protected
    async def _supervise(self) -> None:
        """Turns QEMU's unexpected death into teardown plus ``on_failure`` (or the error in
        the nursery), and an outer cancel into a full shutdown."""
        try:
            await self._wake_supervisor.wait()
        except trio.Cancelled:
            await self._teardown(hard=False)
            raise
        failure = self.failure
        if failure is None:
            return  # a normal teardown woke us
        await self._teardown(hard=True)
        if self._on_failure is not None:
            self._on_failure()
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
        SIGKILL. The whole sequence is shielded from cancellation and bounded by its
        timeouts; a ``KeyboardInterrupt`` during it turns it into a hard stop, completes the
        clean-up, and is then re-raised.

        Raises:
            AbnormalShutdown: a graceful stop was asked for and QEMU had to be killed.
        """
        graceful_failed = await self._teardown(hard=hard, timeout=timeout)
        if graceful_failed is not None:
            raise AbnormalShutdown(
                f"{self.name}: graceful shutdown failed ({graceful_failed}); QEMU was killed"
                f"\n  QEMU output:\n{self.log[-2000:]}"
            )

    async def kill(self) -> None:
        """SIGKILL QEMU now and clean up."""
        await self._teardown(hard=True)

    async def wait_exited(self, timeout: float | None = 30.0) -> bool:
        """Wait up to ``timeout`` s (None: no limit) for QEMU to exit, for whatever reason;
        return whether it has. Unlike :meth:`wait` this changes nothing: an unexpected exit
        is still reported as :class:`~trio_qemu.MachineExited`."""
        if self._process is None:
            raise MachineError(f"{self.name}: not launched yet")
        return await self._process.wait(math.inf if timeout is None else timeout)

    async def wait(self, timeout: float | None = 30.0) -> int | None:
        """Wait for QEMU to exit on its own (e.g. the guest powered off), then clean up.

        Returns the exit status. QEMU's exit is expected while this waits.

        Raises:
            MachineTimeout: QEMU still runs after ``timeout`` s (None: no limit); it is left
                running then.
        """
        process = self._process
        if process is None:
            raise MachineError(f"{self.name}: not launched yet")
        previous = self._expected_exit
        self._expected_exit = "wait"
        try:
            if not await process.wait(math.inf if timeout is None else timeout):
                raise MachineTimeout(f"{self.name}: QEMU still runs after {timeout} s")
        finally:
            if not process.exited.is_set():
                self._expected_exit = previous
        await self._teardown(hard=True)
        return self.returncode

    @_ki_protected
    async def _teardown(self, *, hard: bool, timeout: float | None = None) -> str | None:
        """The one shutdown sequence (see the module docstring); concurrent callers wait for
        the first. Returns why a graceful stop failed, or None.

        Whatever happens at its awaits (a Ctrl-C, an error), :meth:`_release` runs."""
        if self._state in (MachineState.STOPPING, MachineState.STOPPED):
            with trio.CancelScope(shield=True):
                await self._released.wait()
            return None
        self._state = MachineState.STOPPING
        graceful_failed: str | None = None
        try:
            with trio.CancelScope(shield=True):
                timeout = self.config.shutdown_timeout if timeout is None else timeout
                graceful_failed = await self._stop_process(hard, timeout)
                if self._console is not None and self.exited:
                    # QEMU is gone: what it printed last is still in the socket. Read it
                    # to the end (EOF comes at once) before the drain is cancelled.
                    with trio.move_on_after(EOF_GRACE):
                        await self._console_drained.wait()
        finally:
            self._release()
        if graceful_failed and self.failure is None:
            log.warning("%s: %s", self.name, graceful_failed)
        return graceful_failed

    async def _stop_process(self, hard: bool, timeout: float) -> str | None:
        process = self._process
        if process is None or not process.is_running():
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

    @_ki_protected
    def _release(self) -> None:
        """Kill QEMU if it still runs, close channels, end the services, remove the temp dir.

        Synchronous, idempotent, protected from ``KeyboardInterrupt``; every step runs even
        if an earlier one raised (the first error is re-raised at the end), and the machine
        always ends ``STOPPED`` with every waiter released.
        """
        if self._released.is_set():
            return
        self._state = MachineState.STOPPED
        closed = QMPConnectionClosed(f"{self.name}: the machine is shut down")
        steps: list[Callable[[], object]] = []
        if self._process is not None:
            steps += [self._process.kill, self._process.save_tail]
        if self._qmp is not None:
            qmp = self._qmp
            steps.append(lambda: qmp.fail(self._exit_error or closed))
        if self._console is not None:  # an orderly end lets line iterators finish cleanly
            console = self._console
            steps.append(lambda: console.close(self._exit_error))
        if self._shell is not None:
            shell = self._shell
            steps.append(lambda: shell.close(self._exit_error or closed))
        if self._agent is not None:
            agent = self._agent
            steps.append(lambda: agent.fail(self._exit_error or closed))
        if self._relay is not None:
            relay = self._relay
            steps.append(lambda: relay.close(self._exit_error))
        steps.append(self._channels.close)
        if self._accepted is not None:
            steps.append(self._accepted.socket.close)
        steps += [scope.cancel for scope in self._service_scopes]
        if self._temp_dir is not None:
            temp_dir = self._temp_dir
            steps.append(lambda: remove_machine_dir(temp_dir))
        first_error: BaseException | None = None
        try:
            for step in steps:
                try:
                    step()
                except BaseException as exc:
                    log.warning("%s: clean-up step %r failed: %r", self.name, step, exc)
                    first_error = first_error or exc
        finally:
            self._released.set()
            self._wake_supervisor.set()
        if first_error is not None:
            raise first_error

