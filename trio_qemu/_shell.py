"""Commands in the guest, with exit status and exact output, over a dedicated channel.

The guest shell is not the serial console: it runs on a virtio-serial port of its own
(``org.trio-qemu.shell``, on a socketpair chardev, see ``MachineConfig.shell``), the way the
NixOS test driver keeps its backdoor shell apart from the log console. So the console stays a
clean record of what the guest printed, and nothing a command prints can be mistaken for the
protocol.

The guest side is the shell agent, :data:`SHELL_AGENT_SCRIPT`, a busybox ``sh`` loop the
tiny guest's ``/init`` starts. The line protocol between the two, with its framing, is
described in ``_shell_protocol.py``, which holds its host side as pure code (requests, ids,
pings, and the reader's framing and base64 decoding); this module holds :class:`Shell`, the
part that needs Trio and the shell's state: the channel, the lock, timeouts, kills, and
telling a gone agent.

On the host, a result whose id is not the one awaited (a command that was killed after a
timeout) is skipped whole. A run cancelled after its request was sent asks for the kill, and
the next call first reads that run's result to its end (bounded by ``kill_timeout``), so
nothing of it is pending when the next request goes out.

A dead agent shows in two ways. QEMU reports the guest closing its end of the port (the
``VSERPORT_CHANGE`` event, for a port device with an id); the owning machine passes that on
(:meth:`Shell.watch_port`), and runs fail at once until the port opens again. And a timed-out
run sends a ping along with its kill: an agent that answers neither is reported as such,
never as a command killed.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from ._errors import (
    EventsDropped,
    GuestCommandError,
    MachineError,
    ShellError,
    ShellTimeout,
    copy_error,
)
from ._shell_files import ShellFiles
from ._shell_protocol import (
    KILLED,
    MAX_LINE,
    Framer,
    Pings,
    Reply,
    RequestIds,
    ResultReader,
    encode_run,
    kill_request,
    ping_request,
    run_request,
)
from ._shell_waits import ShellWaits
from ._util import registered_scope

__all__ = ["SHELL_AGENT_PATH", "SHELL_AGENT_SCRIPT", "GuestResult", "Shell"]

log = logging.getLogger("trio_qemu.shell")

SHELL_AGENT_PATH: Final = "/bin/trio-shell-agent"
"""Where the tiny guest's initramfs holds :data:`SHELL_AGENT_SCRIPT`."""

# Read through the trio_qemu package, not trio_qemu.guest: importing this module must not
# import the guest builder.
SHELL_AGENT_SCRIPT: Final = (
    (importlib.resources.files("trio_qemu") / "guest" / "files" / "trio-shell-agent.sh")
    .read_bytes()
    .decode()
)
"""The guest side of :class:`Shell`, the shell agent: a busybox ``sh`` script taking the
port's path (``trio_qemu/guest/files/trio-shell-agent.sh``)."""

#: Bytes asked for per receive.
_RECEIVE_SIZE: Final = 65536
#: The first and the longest interval between pings while waiting for the agent.
_PING_FIRST: Final = 0.25
_PING_MAX: Final = 4.0


@dataclass(frozen=True)
class GuestResult:
    """The outcome of one command run in the guest."""

    command: str
    """The command line, as given to :meth:`Shell.run`."""
    returncode: int
    """Its exit status (128 + N when killed by signal N, as the shell reports it)."""
    stdout: bytes
    """Everything it wrote to stdout, byte for byte."""
    stderr: bytes
    """Everything it wrote to stderr, byte for byte."""

    def check_returncode(self) -> None:
        """Raise :class:`~trio_qemu.GuestCommandError` if :attr:`returncode` is not 0."""
        if self.returncode != 0:
            raise GuestCommandError(self.command, self.returncode, self.stdout, self.stderr)

    def __repr__(self) -> str:
        return (
            f"GuestResult(command={self.command!r}, returncode={self.returncode}, "
            f"stdout={_preview(self.stdout)}, stderr={_preview(self.stderr)})"
        )


def _preview(data: bytes) -> str:
    return repr(data) if len(data) <= 60 else f"{data[:60]!r}... ({len(data)} bytes)"


class _EventSource(Protocol):
    """What :meth:`Shell.watch_port` reads: a QMP event subscription (``vm.subscribe(...)``)."""

    async def receive(self) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


class Shell(ShellWaits, ShellFiles):
    """Run commands in the guest over the guest-shell channel; one command at a time.

    ``stream`` is our end of the channel (``vm.channel("shell")``); the caller keeps owning
    it (the machine closes it at teardown). ``name`` labels log and error messages.
    ``max_output`` bounds the stdout plus stderr of one command (a larger result raises
    :class:`~trio_qemu.ShellError` without being transferred). ``kill_timeout`` bounds how
    long the guest may take to answer what the shell asks of it on its own: to confirm the
    kill of a timed-out command, to send the result of a cancelled one (or go on sending
    it), to answer a ping. ``on_eof``, if given, is awaited when the channel reaches end of
    file or breaks, before the error is raised: an owning machine can wait there briefly
    for QEMU's exit and :meth:`close` the shell with its own error (``MachineExited``),
    which is then raised instead of a bare :class:`~trio_qemu.ShellError`. The first end of
    file makes the shell unusable: later calls fail at once.

    The guest-side agent can die while QEMU runs on (a command killed it). The owner learns
    it from QEMU (the ``VSERPORT_CHANGE`` event: the guest closed its end of the port) and
    tells the shell through :meth:`port_closed` (or :meth:`watch_port`): every call waiting
    for the agent then raises :class:`~trio_qemu.ShellError` at once, and so does every
    later :meth:`run`, until the port is opened again (:meth:`port_opened`: an agent
    started) or the agent answers a ping (:meth:`wait_ready` waits for that). Without that
    notice, a run that times out tells a dead agent from a live one with a ping sent
    along with the kill, and never claims a kill it did not see (see :meth:`run`).

    Memory: a result's stdout and stderr are decoded from base64 as they arrive, each into
    one buffer of its announced size (allocated when the result's header comes) that
    becomes the result's ``bytes``. On CPython, where ``BytesIO.getvalue`` hands that buffer
    over without a copy, a run's peak is the size of its output plus a few copies of one
    64 KiB chunk (``benchmarks/shell_memory.py`` measures 1.0x for 10 and 50 MB); where it
    copies, at most twice the output. Both are bounded by ``max_output`` (a larger result
    is refused before it is sent).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        name: str = "shell",
        max_output: int = 64 << 20,
        kill_timeout: float = 10.0,
        on_eof: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if max_output < 0:
            raise ValueError(f"max_output must be >= 0, not {max_output}")
        if not kill_timeout > 0:
            raise ValueError(f"kill_timeout must be positive, not {kill_timeout}")
        self._stream = stream
        self._on_eof = on_eof
        self.name = name
        self.max_output = max_output
        self.kill_timeout = kill_timeout
        self._lock = trio.Lock()
        self._ids = RequestIds()
        self._operations: set[trio.CancelScope] = set()
        self._close_error: BaseException | None = None
        self._closed = False
        self._broken: str | None = None
        #: the reader: control lines, and the base64 text between them
        self._framer = Framer(self._overlong)
        #: the result being received, kept across the wait for a killed command's result
        self._receiving: Reply | None = None
        #: a run cancelled once its request was sent (its kill asked for): its result is
        #: still to come, and is read to its end before anything else is sent
        self._cancelled: bytes | None = None
        #: whether the guest has begun sending that result (its ``#B`` came)
        self._cancelled_started = False
        #: why the agent is known to be gone (the guest closed the port), else None
        self._gone: str | None = None
        #: counts port_closed() calls: a pong proves the agent back only for a later ping
        self._epoch = 0
        #: the reason given to the last port_closed()
        self._gone_reason = ""
        #: why the agent is thought gone (it answered no ping lately), else None
        self._unanswered: str | None = None
        #: pings sent and not answered yet, with the epoch they were sent in
        self._pings = Pings()
        #: counts the pings answered that prove the agent there now (sent in this epoch)
        self._answered = 0
        #: the agent's pid from its last ``#R`` line
        self._agent_pid: bytes | None = None
        #: scopes waiting for the agent, cancelled by port_closed()
        self._agent_waits: set[trio.CancelScope] = set()
        #: set once a ping has been answered (:meth:`wait_ready`); cleared when it is gone
        self.ready = False

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self.agent_gone is not None:
            state = "agent gone"
        else:
            state = "ready" if self.ready else "not ready"
        return f"<Shell {self.name!r} {state}>"

    # --- public ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the channel broke."""
        return self._closed or self._broken is not None

    @property
    def agent_gone(self) -> str | None:
        """Why the guest's shell agent is known gone (its port closed) or did not answer
        lately; None when neither."""
        return self._gone or self._unanswered

    def close(self, error: BaseException | None = None) -> None:
        """End the shell; idempotent. Pending and future calls raise a copy of ``error``
        (or a :class:`~trio_qemu.ShellError` saying the shell is closed).

        Meant for the machine when QEMU dies, so waiting calls end at once with the
        machine's error. It does not close the stream (the caller owns it).
        """
        if self._closed:
            return
        self._closed = True
        self._close_error = error
        for scope in list(self._operations):
            scope.cancel()

    def port_closed(self, reason: str = "the guest closed its end of the shell port") -> None:
        """The guest-side agent is gone (QEMU saw the guest close the port: the agent
        exited or was killed). Calls waiting for it raise :class:`~trio_qemu.ShellError`
        at once, and so do later runs, without sending anything, until :meth:`port_opened`
        or an answered ping. Meant for the owning machine (see :meth:`watch_port`)."""
        if self._closed:
            return
        if self._gone is None:
            log.warning("%s: the guest shell is gone: %s", self.name, reason)
        self._gone = self._gone_reason = reason
        self._epoch += 1
        self.ready = False
        self._receiving = None  # nothing more comes of what that agent was doing
        self._cancelled = None
        for scope in list(self._agent_waits):
            scope.cancel()

    def port_opened(self) -> None:
        """The guest opened its end of the port (an agent started): runs are sent again."""
        if self._gone is not None:
            log.info("%s: the guest opened the shell port again", self.name)
            self._gone = None

    async def watch_port(
        self, events: _EventSource, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the guest's end of the shell port: ``events`` is a subscription to QEMU's
        ``VSERPORT_CHANGE`` events of the shell port's device (``{"data": {"id": ...,
        "open": bool}}``); each calls :meth:`port_closed` or :meth:`port_opened`. Runs
        until the events end (QEMU exited), then closes ``events``. For the owning machine's
        nursery, started as soon as QMP is up (before the guest opens the port)."""
        task_status.started()
        try:
            while True:
                try:
                    event = await events.receive()
                except EventsDropped:
                    continue  # the next event tells the state again
                except (trio.EndOfChannel, trio.ClosedResourceError, MachineError):
                    return
                state = (event.get("data") or {}).get("open")
                if state is True:
                    self.port_opened()
                elif state is False:
                    self.port_closed()
        finally:
            events.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the guest's shell agent answers a ping.

        The agent may not be running yet (the guest is booting, or the agent is being
        restarted after it was gone), so the ping is sent again when an agent announces
        that it started, and otherwise after 0.25 s, 0.5 s, ... up to every 4 s (a ping may
        be lost if the agent restarts); a pong to any of these pings counts, and makes a
        gone shell usable again. Raises :class:`~trio_qemu.ShellTimeout` after ``timeout``
        seconds, or the shell's close error if it is closed meanwhile.
        """
        with self._operation():
            with trio.move_on_after(timeout) as scope:
                async with self._lock:
                    await self._ping_until_answered(scope.deadline)
            if scope.cancelled_caught:
                gone = f"; it is gone: {self.agent_gone}" if self.agent_gone else ""
                raise ShellTimeout(
                    f"{self.name}: the guest shell did not answer within {timeout} s{gone} "
                    "(is the guest booted with the tiny guest's initramfs and shell=True?)"
                )

    async def run(
        self,
        command: str,
        *,
        timeout: float = 60.0,
        check: bool = False,
        stdin: bytes | None = None,
    ) -> GuestResult:
        """Run ``command`` with ``sh -c`` in the guest; return its exit status and output.

        stdin is ``/dev/null``, or ``stdin`` when given; stdout and stderr are captured
        exactly (any bytes, up to ``max_output`` together). Commands run one at a time:
        concurrent calls wait their turn. The command runs in ``/`` in a session of its own;
        background processes it starts may outlive it.

        ``timeout`` bounds the whole call, including waiting for earlier commands (and for
        the rest of the result of a command whose call was cancelled). When it expires the
        command's process group is killed and a ping goes along; the shell waits up to
        ``kill_timeout`` for the outcome and raises :class:`~trio_qemu.ShellTimeout` with
        whatever output came back, saying what it saw: the command was killed (or ended
        as the kill came), or the agent answered the ping but did not confirm the kill (its
        result may be lost); the shell stays usable. If the agent answered neither, it
        raises :class:`~trio_qemu.ShellError` saying so (the agent is gone, or the guest
        is not running): later runs first ping it and raise at once if it still does not
        answer within ``kill_timeout``.

        With ``check=True`` a non-zero status raises
        :class:`~trio_qemu.GuestCommandError`. Raises :class:`~trio_qemu.ShellError` if
        the guest's shell agent is gone (see :meth:`port_closed`), if the channel ends
        (QEMU exited) or the result is larger than ``max_output``, or the close error given
        to :meth:`close`.
        """
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, not {command!r}")
        encoded, stdin_b64 = encode_run(command, stdin)
        with self._operation():
            with trio.move_on_after(timeout) as wait_scope:
                await self._lock.acquire()
            if wait_scope.cancelled_caught:
                raise ShellTimeout(
                    f"{self.name}: {command!r} did not start within {timeout} s: earlier "
                    "commands were still running",
                    command=command,
                )
            try:
                stage = "the result of an earlier, cancelled command was still arriving"
                with (
                    trio.CancelScope(deadline=wait_scope.deadline) as skip_scope,
                    self._agent_wait(f"before {command!r} was sent"),
                ):
                    await self._skip_cancelled_result()
                    stage = "the guest shell agent, silent lately, did not answer a ping"
                    await self._check_agent(wait_scope.deadline)
                if skip_scope.cancelled_caught:
                    raise ShellTimeout(
                        f"{self.name}: {command!r} did not start within {timeout} s: {stage}",
                        command=command,
                    )
                rid = self._ids.new()
                request = run_request(rid, self.max_output, encoded, stdin_b64)
                sent = killed = False
                try:
                    with self._agent_wait(f"while {command!r} ran: its outcome is unknown"):
                        with trio.CancelScope(deadline=wait_scope.deadline) as scope:
                            await self._send(request, scope.deadline)
                            sent = True
                            reply = await self._await_reply(rid, command)
                        if scope.cancelled_caught:
                            if not sent:
                                raise ShellTimeout(
                                    f"{self.name}: sending {command!r} took longer than "
                                    f"{timeout} s",
                                    command=command,
                                )
                            killed = True
                            raise await self._kill_after_timeout(rid, command, timeout)
                except trio.Cancelled:
                    if sent and self._gone is None:
                        # Its result comes all the same: the next call reads it first.
                        self._cancelled = rid
                        self._cancelled_started = (
                            self._receiving is not None and self._receiving.rid == rid
                        )
                        self._receiving = None
                        if not killed:
                            await self._send_kill_quietly(rid)
                    raise
            finally:
                self._lock.release()
        if check:
            reply.check_returncode()
        return reply

    # --- internals -----------------------------------------------------------------------

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """A cancel scope :meth:`close` can cancel; turns that into the close error."""
        self._raise_if_closed()
        with registered_scope(self._operations) as scope:
            yield
        if scope.cancelled_caught:
            self._raise_if_closed()

    @contextmanager
    def _agent_wait(self, what: str) -> Iterator[None]:
        """A cancel scope :meth:`port_closed` can cancel; turns that into a ShellError
        saying the agent is gone, ``what`` saying what was going on."""
        with registered_scope(self._agent_waits) as scope:
            yield
        if scope.cancelled_caught:
            raise ShellError(f"{self.name}: the guest shell is gone ({self._gone_reason}) {what}")

    def _raise_if_closed(self) -> None:
        if self._closed:
            if self._close_error is not None:
                raise copy_error(self._close_error)
            raise ShellError(f"{self.name}: the shell is closed")
        if self._broken is not None:
            raise ShellError(f"{self.name}: the shell channel is unusable: {self._broken}")

    async def _check_agent(self, deadline: float) -> None:
        """Before a request: ShellError at once if the agent is known gone; if it did not
        answer lately, ping it first (up to ``kill_timeout``) and raise if it still does not."""
        if self._gone is not None:
            raise ShellError(f"{self.name}: the guest shell is gone: {self._gone}")
        if self._unanswered is None:
            return
        wait = min(deadline - trio.current_time(), self.kill_timeout)
        if not await self._ping(trio.current_time() + wait):
            raise ShellError(
                f"{self.name}: the guest shell agent does not answer ({self._unanswered}; "
                f"and not a ping within {wait:.3g} s either): it is gone, or the guest is not "
                "running; wait_ready() waits for it to come back"
            )

    # --- the reader: control lines, and the base64 text between them ---------------------

    async def _receive(self) -> None:
        """The next chunk into the reader; at end of file, the owner's error if any.

        The first end of file marks the shell unusable, so later calls fail at once."""
        try:
            chunk = await self._stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            chunk = b""
            ended = f"the guest shell channel broke: {exc!r}"
        else:
            ended = "the guest shell channel reached end of file (QEMU exited?)"
        if not chunk:
            # Raised outside the except block: callers see our error, not a chain of
            # transport internals.
            if self._broken is None:
                self._broken = ended
            await self._channel_ended()
            raise ShellError(f"{self.name}: {ended}")
        self._framer.feed(bytes(chunk))

    async def _next_control(self, sink: Reply | None = None) -> bytes:
        """The next control line: from a ``#`` (base64 never holds one) to its newline,
        without it. The text before it is a result's base64: it goes to ``sink``, or is
        dropped (junk, or the result of another run). The only checkpoint is the receive,
        so a cancel loses nothing."""
        while (line := self._framer.next_control(sink)) is None:
            await self._receive()
        return self._note(line)

    def _overlong(self, head: bytes) -> None:
        log.warning("%s: dropping a line longer than %d bytes: %r", self.name, MAX_LINE, head[:80])

    def _note(self, line: bytes) -> bytes:
        """What every reader notes of a control line: pongs, agent starts, and the end of a
        cancelled run's result (:attr:`_cancelled`). Returns the line."""
        fields = line.split(b" ", 2)
        verb, lid = fields[0], fields[1] if len(fields) > 1 else b""
        if verb == b"#P":
            epoch = self._pings.answer(lid)
            if epoch is not None:
                self._unanswered = None
                if epoch == self._epoch:  # sent after the last port_closed()
                    self._gone = None
                    self._answered += 1
                    self.ready = True
        elif verb == b"#R":
            pid = lid.decode(errors="replace")
            if self._agent_pid is not None and lid != self._agent_pid:
                log.info("%s: the guest shell agent restarted (pid %s)", self.name, pid)
                self._cancelled = None  # that agent never sends it (a late one is skipped)
            else:
                log.debug("%s: the guest shell agent started (pid %s)", self.name, pid)
            self._agent_pid = lid
        elif self._cancelled is not None and lid == self._cancelled:
            if verb in (b"#E", b"#X"):
                self._cancelled = None
            elif verb == b"#B":
                self._cancelled_started = True
        return line

    async def _skip_cancelled_result(self) -> None:
        """Read and drop the result of a run cancelled after its request was sent, up to
        its end, so that nothing of it is left to mix with what is sent next.

        Its kill was asked for, so the guest should start sending it at once: waiting for
        that is bounded by ``kill_timeout``, and so is each line once it comes (a large
        result takes a while). When the guest misses either bound, a ping tells: an agent
        that answers has lost that result (were it to come later, it is skipped like any
        late result); one that does not is reported (ShellError, and later runs ping first)."""
        if self._cancelled is None:
            return
        rid = self._cancelled
        deadline = trio.current_time() + self.kill_timeout
        while self._cancelled is not None:
            with trio.CancelScope(deadline=deadline) as scope:
                await self._next_control()
            if scope.cancelled_caught:
                break
            if self._cancelled_started:
                deadline = trio.current_time() + self.kill_timeout
        else:
            return
        self._cancelled = None
        if await self._ping(trio.current_time() + self.kill_timeout):
            log.warning(
                "%s: the result of cancelled command %r did not come within kill_timeout=%s s",
                self.name, rid, self.kill_timeout,
            )  # fmt: skip
            return
        self._unanswered = (
            f"it sent neither the result of cancelled command {rid!r} nor a pong, each "
            f"within kill_timeout={self.kill_timeout} s"
        )
        self.ready = False
        raise ShellError(
            f"{self.name}: the guest shell agent does not answer: {self._unanswered}; it is "
            "gone, or the guest is not running"
        )

    async def _channel_ended(self) -> None:
        """Let the owner react to the channel's end; raise its close error if it gave one."""
        if self._on_eof is not None:
            await self._on_eof()
        if self._closed:
            self._raise_if_closed()

    def _new_ping(self) -> bytes:
        """An id for a ping, remembered with the current epoch until answered (see
        :class:`Pings` for how many)."""
        rid = self._ids.new()
        self._pings.add(rid, self._epoch)
        return rid

    async def _ping(self, deadline: float) -> bool:
        """Ping the agent; whether it answered by ``deadline``."""
        rid = self._new_ping()
        await self._send(ping_request(rid), deadline)
        with trio.CancelScope(deadline=deadline):
            while rid in self._pings:
                await self._next_control()
        return rid not in self._pings

    async def _send(self, data: bytes, deadline: float) -> None:
        """Send ``data`` whole: a request cut short by a cancel would leave the guest
        reading stdin that never comes, so the send is shielded, bounded by ``deadline``.
        A send that misses it leaves the channel unusable."""
        await trio.lowlevel.checkpoint_if_cancelled()  # out of time before sending: no harm
        failure: Exception | None = None
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure = exc
        if failure is not None:
            self._broken = f"sending failed: {failure!r}"
            await self._channel_ended()
            raise ShellError(
                f"{self.name}: the guest shell channel broke: {failure!r}"
            ) from failure
        if scope.cancelled_caught:
            self._broken = "a request could not be sent in time (the guest is not reading)"
            raise ShellError(f"{self.name}: {self._broken}")

    async def _send_kill_quietly(self, rid: bytes) -> None:
        """Ask the guest to kill command ``rid`` while being cancelled: best effort, at most
        a second, and never an error that would replace the cancellation."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
            try:
                await self._send(kill_request(rid), trio.current_time() + 1.0)
            except Exception as exc:
                log.debug("%s: kill of %r not sent: %r", self.name, rid, exc)

    async def _kill_after_timeout(self, rid: bytes, command: str, timeout: float) -> ShellError:
        """Kill command ``rid`` (timed out) and ping the agent along; wait up to
        ``kill_timeout`` for the command's result, and return the error to raise, saying
        only what was seen: a ShellTimeout with the output that came back when the command
        ended or the agent answered, else a ShellError: the agent answered nothing."""
        deadline = trio.current_time() + self.kill_timeout
        ping = self._new_ping()
        await self._send(kill_request(rid, ping), deadline)
        late = f"{self.name}: {command!r} did not finish within {timeout} s"
        with trio.CancelScope(deadline=deadline):
            try:
                reply = await self._await_reply(rid, command)
            except ShellError as exc:
                if self._broken is not None or isinstance(exc, ShellTimeout):
                    raise
                return ShellTimeout(
                    f"{late}; it ended once the kill was sent, but its result was broken: {exc}",
                    command=command,
                )
            if reply.returncode == KILLED:
                how = "it was killed"
            else:
                how = f"it ended with status {reply.returncode} as the kill was sent"
            return ShellTimeout(
                f"{late}; {how}", command=command, stdout=reply.stdout, stderr=reply.stderr
            )
        if ping not in self._pings:
            log.debug("%s: no result for killed %r within %s s", self.name, rid, self.kill_timeout)
            return ShellTimeout(
                f"{late}; a kill was sent, and the guest shell agent answers, but it did not "
                f"confirm the command's end within kill_timeout={self.kill_timeout} s (its "
                "result is late or lost)",
                command=command,
            )
        self._receiving = None
        self._unanswered = (
            f"it answered neither the kill of {command!r} nor a ping within "
            f"kill_timeout={self.kill_timeout} s"
        )
        self.ready = False
        return ShellError(
            f"{late}, and the guest shell agent answered neither its kill nor a ping within "
            f"kill_timeout={self.kill_timeout} s: it is gone (killed?), or the guest is not "
            "running; whether the command still runs is unknown"
        )

    async def _ping_until_answered(self, deadline: float) -> None:
        interval = _PING_FIRST
        answered = self._answered
        while True:
            rid = self._new_ping()
            await self._send(ping_request(rid), deadline)
            with trio.move_on_after(interval):
                while True:
                    line = await self._next_control()
                    if self._answered != answered:
                        return
                    if line.startswith(b"#R "):
                        break  # ping again now: the agent may have missed earlier pings
            interval = min(interval * 2, _PING_MAX)

    async def _await_reply(self, rid: bytes, command: str) -> GuestResult:
        """Read until the result for ``rid``; skip everything else (junk, pongs, the
        results of other ids). A result partly received when a timeout interrupted the
        previous call for the same ``rid`` is continued."""
        reply = self._receiving if self._receiving and self._receiving.rid == rid else None
        self._receiving = None
        reader = ResultReader(self.name, rid, command, self.max_output, reply)
        try:
            while True:
                line = await self._next_control(reader.reply)
                if (done := reader.take(line)) is not None:
                    break
        except trio.Cancelled:
            self._receiving = reader.reply  # the rest may still be read (after a timeout's kill)
            raise
        stdout, stderr = done.finish()
        return GuestResult(command, done.returncode, stdout, stderr)
