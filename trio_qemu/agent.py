"""The QEMU guest agent (``qemu-ga``) from the host: ping, exec, files, shutdown.

``qemu-ga`` runs in the guest on a virtio-serial port (``org.qemu.guest_agent.0``; see
``MachineConfig.agent`` and ``ensure_guest(agent=True)``) and speaks QMP's wire format
without QMP's greeting and capability negotiation. :class:`GuestAgent` drives it with our
:class:`~trio_qemu.QMPClient` (one reader task, id-tagged requests, any number in flight) and
adds what the agent protocol needs on top:

- **Resynchronisation.** The channel may hold stale bytes (a reply nobody read, half a request
  from an earlier client), so the agent protocol asks a client to begin with
  ``guest-sync-delimited``: send a ``0xFF`` byte (qemu-ga then drops any partial request it
  holds, answering that stray byte with an error that has no id) and the command with a random
  id; qemu-ga answers ``0xFF`` followed by ``{"return": <id>}``. :meth:`GuestAgent.run` does
  this below the QMP client, on the raw stream: everything before that reply is discarded,
  and only then does the QMP client start reading (its line reader would reject the ``0xFF``
  and the id-less error). After that, ids keep requests and replies paired: a reply that comes
  after its caller gave up is dropped by id, so no further resynchronisation is needed.
- **Waiting for the guest.** A port the guest has not opened yet is not read by QEMU: what we
  send waits in the socket until qemu-ga starts. The sync request is therefore sent once at
  the start and again after 0.5 s, 1 s, 2 s, ... (at most every 8 s) in case an agent that
  restarted lost it; only the reply to the latest one counts.
- **Polling.** ``guest-exec`` returns a pid at once and the agent has no way to announce that
  the process ended, so :meth:`GuestAgent.exec` polls ``guest-exec-status``. That poll is
  imposed by the protocol; it is kept short and bounded (2 ms after the start, doubling up to
  every 50 ms).
- **Shutdown.** A successful ``guest-shutdown`` is never answered (its schema says
  ``success-response: false``); only a refusal is. See :meth:`GuestAgent.shutdown`.

Measured on these machines (2 cores, TCG, the tiny guest): ``ping`` 0.4-1.2 ms median,
``exec`` of a command with output about 7 ms median on a quiet host (about 30 ms while other
VMs keep the host busy); see the README for more.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import trio

from ._errors import AgentError, AgentTimeout, QMPConnectionClosed, QMPTimeout, copy_error
from ._qmp import QMPClient
from ._shell import GuestResult
from ._util import open_service_nursery, protected_asynccontextmanager

__all__ = [
    "DEFAULT_AGENT_MESSAGE_SIZE",
    "SHUTDOWN_MODES",
    "GuestAgent",
    "open_agent",
]

log = logging.getLogger("trio_qemu.agent")

DEFAULT_AGENT_MESSAGE_SIZE: Final = 64 << 20
"""The largest reply accepted from the agent (64 MiB). qemu-ga captures at most 16 MiB of
each of a command's stdout and stderr; base64 in one ``guest-exec-status`` reply that is
about 45 MB."""

SHUTDOWN_MODES: Final = ("powerdown", "halt", "reboot")
"""The modes ``guest-shutdown`` accepts."""

_SENTINEL: Final = b"\xff"
#: Bytes asked for per receive while resynchronising.
_RECEIVE_SIZE: Final = 65536
#: The first and the longest interval between sync requests while waiting for the agent.
_SYNC_FIRST: Final = 0.5
_SYNC_MAX: Final = 8.0
#: A sync request that cannot be sent within this time is skipped (the socket is full:
#: the guest is not reading; the earlier requests are still waiting in it).
_SYNC_SEND_TIMEOUT: Final = 1.0
#: ``guest-exec-status`` polling: the first wait and the longest one.
_POLL_FIRST: Final = 0.002
_POLL_MAX: Final = 0.05
#: File transfer chunk sizes (raw bytes per ``guest-file-read``/``guest-file-write``). A
#: write request carries its chunk as base64 JSON (about 4/3 the size), which stays well
#: below the socket buffer, so a request never waits half-sent for the guest.
_READ_CHUNK: Final = 256 << 10
_WRITE_CHUNK: Final = 96 << 10
#: How long cleanup steps may take: closing a file handle, killing a timed-out command.
_CLEANUP_TIMEOUT: Final = 5.0
#: Default bound of :meth:`GuestAgent.read_file`.
_DEFAULT_MAX_FILE: Final = 64 << 20


class _HasChannel(Protocol):
    """Anything with a ``channel(name)`` stream, like :class:`~trio_qemu.Machine`."""

    def channel(self, name: str) -> trio.SocketStream: ...


class GuestAgent:
    """A client of the QEMU guest agent on one stream (our end of the agent channel).

    Start :meth:`run` as a task (it resynchronises, then reads replies) or use
    :func:`open_agent`, which does. Calls made before the agent has answered the sync wait
    for it, within their own ``timeout``. Every method is safe to call from several tasks at
    once; replies are paired with requests by id.

    Args:
        stream: our end of the channel (``vm.channel("agent")``). The caller owns it; the
            reader closes it when the peer ends the connection.
        name: a label for logs and error messages.
        timeout: the default bound in seconds of :meth:`ping`, :meth:`info` and :meth:`cmd`.
        max_message_size: the largest reply accepted (a larger one is a protocol error that
            ends the connection).
        on_eof: awaited when the channel reaches end of file, before pending calls fail: an
            owning machine waits there briefly for QEMU's exit status and fails the agent
            with its own error (:meth:`fail`), which calls then raise instead of
            :class:`~trio_qemu.QMPConnectionClosed`.
        on_shutdown: called with the mode just before ``guest-shutdown`` is sent, so an
            owning machine can expect QEMU to exit (as it does after ``quit``).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        name: str = "agent",
        timeout: float = 30.0,
        max_message_size: int = DEFAULT_AGENT_MESSAGE_SIZE,
        on_eof: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[str], None] | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.name = name
        self.timeout = timeout
        self._stream = stream
        self._max_message_size = max_message_size
        self._on_eof = on_eof
        self._on_shutdown = on_shutdown
        self._client: QMPClient | None = None
        self._settled = trio.Event()  # synchronised, or failed
        self._error: BaseException | None = None
        self._failed = False
        self._running = False
        #: cancelled by :meth:`fail` to end the resynchronisation at once
        self._sync_scope = trio.CancelScope()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ready" if self.synchronised else "not synced")
        return f"<GuestAgent {self.name!r} {state}>"

    # -- state ---------------------------------------------------------------------------
    @property
    def synchronised(self) -> bool:
        """Whether the agent has answered the initial ``guest-sync-delimited``."""
        return self._client is not None

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (EOF, a protocol error, or :meth:`fail`)."""
        return self._failed or (self._client is not None and self._client.closed)

    @property
    def client(self) -> QMPClient | None:
        """The QMP client on the channel, once synchronised (None before)."""
        return self._client

    def fail(self, error: BaseException | None = None) -> None:
        """End the connection: pending and later calls raise a copy of ``error`` (None: a
        :class:`~trio_qemu.QMPConnectionClosed`). Idempotent; the first reason wins.

        Meant for an owning machine when QEMU dies or is shut down. It does not close the
        stream (the owner does)."""
        if self._failed:
            return
        self._failed = True
        self._error = error
        if self._client is not None:
            self._client.fail(error)
        self._sync_scope.cancel()
        self._settled.set()

    def _closed_error(self, what: str) -> BaseException:
        if self._error is not None:
            return copy_error(self._error)
        if self._client is not None and self._client.error is not None:
            return copy_error(self._client.error)
        return QMPConnectionClosed(f"{self.name}: the guest agent channel is closed ({what})")

    # -- the reader ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resynchronise with the agent, then read its replies until the channel ends.

        Reports itself started at once (the agent may not be running yet: the guest may
        still be booting). Returns when the channel ends or :meth:`fail` is called before
        the agent answered; never raises for a bad peer (calls raise the error instead).
        Cancel it to stop it. It may run only once.
        """
        if self._running:
            raise RuntimeError(f"{self.name}: GuestAgent.run() is already running or has run")
        self._running = True
        task_status.started()
        if self._failed:
            return
        synced = False
        with self._sync_scope:
            try:
                synced = await self._synchronise()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("%s: channel broke while resynchronising: %r", self.name, exc)
        if not synced:
            if not self._failed and self._on_eof is not None:
                await self._on_eof()
            self.fail(None)
            return
        client = QMPClient(
            self._stream,
            name=self.name,
            timeout=self.timeout,
            max_message_size=self._max_message_size,
            event_buffer=1,
            event_cache=1,
        )
        if self._failed:  # failed while the sync reply was being read
            client.fail(self._error)
        self._client = client
        self._settled.set()
        await client.run(on_eof=self._on_eof)

    async def _synchronise(self) -> bool:
        """Send ``0xFF`` + ``guest-sync-delimited`` and discard input up to its reply.

        Returns False at end of file or when :meth:`fail` was called meanwhile. The request
        is repeated with a growing interval (see the module docstring); only the reply to
        the latest one ends the wait, since earlier ones are answered before it.
        """
        interval = _SYNC_FIRST
        latest = await self._send_sync()
        deadline = trio.current_time() + interval
        line = bytearray()
        in_reply = False  # after a 0xFF, collecting the line that follows it
        while not self._failed:
            with trio.move_on_at(deadline):
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return False
                cut = data.rfind(_SENTINEL)
                if cut >= 0:
                    line = bytearray(data[cut + 1 :])
                    in_reply = True
                elif in_reply:
                    line += data
                if in_reply and (end := line.find(b"\n")) >= 0:
                    in_reply = False
                    if _is_sync_reply(bytes(line[:end]), latest):
                        rest = bytes(line[end + 1 :])
                        if rest.strip():
                            log.debug("%s: discarding %r after the sync", self.name, rest)
                        return True
                    log.debug("%s: skipping stale sync reply %r", self.name, bytes(line[:end]))
                if len(line) > self._max_message_size:
                    line.clear()
                    in_reply = False
                continue
            interval = min(interval * 2, _SYNC_MAX)
            latest = await self._send_sync(latest)
            deadline = trio.current_time() + interval
        return False

    async def _send_sync(self, previous: int | None = None) -> int:
        """Send one sync request; return its id (``previous`` if it could not be sent)."""
        sync_id = secrets.randbelow(1 << 31)
        request = (
            _SENTINEL
            + json.dumps(
                {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}},
                separators=(",", ":"),
            ).encode()
        )
        with trio.move_on_after(_SYNC_SEND_TIMEOUT) as scope:
            await self._stream.send_all(request)
        if scope.cancelled_caught and previous is not None:
            # Part of it may be in the socket: the next request's 0xFF makes qemu-ga drop it.
            log.debug("%s: the agent channel is full; sync request not sent", self.name)
            return previous
        return sync_id

    # -- calls ---------------------------------------------------------------------------
    async def _ready_client(self, deadline: float) -> QMPClient:
        """The QMP client once synchronised, waiting until ``deadline`` at most."""
        if not self._settled.is_set():
            with trio.move_on_at(deadline):
                await self._settled.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self._failed or (self._client is not None and self._client.closed):
            raise self._closed_error("cannot send")
        if self._client is None:
            raise AgentTimeout(
                f"{self.name}: the guest agent did not answer (is qemu-ga running in the "
                "guest? the tiny guest has it with ensure_guest(agent=True))"
            )
        return self._client

    async def _call(
        self, client: QMPClient, command: str, args: Mapping[str, object], deadline: float
    ) -> Any:
        """``command`` through ``client`` whose reply timeout lies just past ``deadline``,
        so the caller's own scope (at ``deadline``) is what ends a late call."""
        remaining = max(deadline - trio.current_time(), 0.0) + 1.0
        return await client.cmd(command, args, timeout=remaining)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the agent has answered the sync and answers a ``guest-ping``.

        Raises :class:`~trio_qemu.AgentTimeout` after ``timeout`` seconds (the guest is
        still booting, or runs no agent), or the connection's error if it ends first.
        """
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as scope:
            client = await self._ready_client(deadline)
            await self._call(client, "guest-ping", {}, deadline)
        if scope.cancelled_caught:
            raise AgentTimeout(f"{self.name}: the guest agent did not answer within {timeout} s")

    async def cmd(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        **kwargs: object,
    ) -> Any:
        """Run any agent command; return its ``return`` value.

        ``kwargs`` are arguments with ``_`` turned into ``-`` (``args`` are passed as
        they are). Raises ``qemu.qmp.ExecuteError`` when the agent refuses,
        :class:`~trio_qemu.AgentTimeout` after ``timeout`` seconds (default: the agent's),
        including the wait for the first sync.
        """
        arguments: dict[str, object] = dict(args) if args else {}
        arguments.update({key.replace("_", "-"): value for key, value in kwargs.items()})
        timeout = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as scope:
            client = await self._ready_client(deadline)
            return await self._call(client, command, arguments, deadline)
        assert scope.cancelled_caught
        raise AgentTimeout(f"{self.name}: no answer to {command} within {timeout} s")

    async def ping(self, *, timeout: float | None = None) -> None:
        """``guest-ping``: returns when the agent answers."""
        await self.cmd("guest-ping", timeout=timeout)

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``guest-info``: the agent's ``version`` and its ``supported_commands`` (each a
        dict with ``name``, ``enabled`` and ``success-response``)."""
        result = await self.cmd("guest-info", timeout=timeout)
        if not isinstance(result, dict):
            raise AgentError(f"{self.name}: guest-info returned {result!r}")
        return result

    async def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> GuestResult:
        """Run ``argv`` in the guest (no shell: ``argv[0]`` is looked up on the agent's PATH)
        and return its exit status and exact stdout and stderr.

        ``input`` is written to its stdin (else stdin is empty); ``env``, when given,
        replaces its whole environment. The result's ``command`` is ``shlex.join(argv)``;
        its ``returncode`` is 128 + N when the process was killed by signal N, as
        :meth:`Shell.run <trio_qemu.Shell.run>` reports it. With ``check=True`` a non-zero
        status raises :class:`~trio_qemu.GuestCommandError`.

        The agent cannot announce the end of a process, so its status is polled (see the
        module docstring). ``timeout`` bounds the whole call: when it expires the process
        is killed (SIGKILL to its pid, not to its children, through another ``guest-exec``
        of ``kill``; best effort, at most 5 s) and :class:`~trio_qemu.AgentTimeout` is
        raised. Raises ``qemu.qmp.ExecuteError`` when the agent cannot start it (e.g. no
        such program) and :class:`~trio_qemu.AgentError` when qemu-ga truncated the output
        (it keeps at most 16 MiB of each stream).
        """
        argv = list(argv)
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise TypeError(f"argv must be a non-empty sequence of str, not {argv!r}")
        command = shlex.join(argv)
        arguments: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if env is not None:
            arguments["env"] = [f"{key}={value}" for key, value in env.items()]
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode("ascii")
        deadline = trio.current_time() + timeout
        pid: int | None = None
        client: QMPClient | None = None
        status: dict[str, Any] | None = None
        try:
            with trio.move_on_at(deadline):
                client = await self._ready_client(deadline)
                started = await self._call(client, "guest-exec", arguments, deadline)
                pid = _field(started, "pid", int, "guest-exec")
                status = await self._poll_exec(client, pid, deadline)
        except trio.Cancelled:
            if pid is not None and client is not None:
                await self._kill_quietly(client, pid, trio.current_time() + 1.0)
            raise
        if status is None:
            if pid is None or client is None:
                raise AgentTimeout(f"{self.name}: {command!r} did not start within {timeout} s")
            await self._kill_quietly(client, pid, trio.current_time() + _CLEANUP_TIMEOUT)
            raise AgentTimeout(
                f"{self.name}: {command!r} did not finish within {timeout} s; it was killed"
            )
        result = self._exec_result(command, status)
        if check:
            result.check_returncode()
        return result

    async def _poll_exec(self, client: QMPClient, pid: int, deadline: float) -> dict[str, Any]:
        """``guest-exec-status`` until the process has exited (protocol-imposed polling)."""
        delay = _POLL_FIRST
        while True:
            await trio.sleep(delay)
            status = await self._call(client, "guest-exec-status", {"pid": pid}, deadline)
            if not isinstance(status, dict):
                raise AgentError(f"{self.name}: guest-exec-status returned {status!r}")
            if status.get("exited"):
                return status
            delay = min(delay * 2, _POLL_MAX)

    def _exec_result(self, command: str, status: dict[str, Any]) -> GuestResult:
        """A :class:`GuestResult` from a final ``guest-exec-status`` reply."""
        for stream in ("out", "err"):
            if status.get(f"{stream}-truncated"):
                raise AgentError(
                    f"{self.name}: {command!r} wrote more to std{stream} than qemu-ga keeps "
                    "(16 MiB); its output was truncated"
                )
        if isinstance(status.get("exitcode"), int):
            returncode = int(status["exitcode"])
        elif isinstance(status.get("signal"), int):
            returncode = 128 + int(status["signal"])
        else:
            raise AgentError(f"{self.name}: guest-exec-status has no exit status: {status!r}")
        stdout = self._b64(status.get("out-data", ""), "guest-exec-status")
        stderr = self._b64(status.get("err-data", ""), "guest-exec-status")
        return GuestResult(command, returncode, stdout, stderr)

    async def _kill_quietly(self, client: QMPClient, pid: int, deadline: float) -> None:
        """Kill process ``pid`` and collect its status (so qemu-ga forgets it): best
        effort, shielded, until ``deadline``; never raises."""
        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                killer = await self._call(
                    client, "guest-exec", {"path": "kill", "arg": ["-KILL", str(pid)]}, deadline
                )
                kill_pid = _field(killer, "pid", int, "guest-exec")
                for target in (kill_pid, pid):
                    await self._poll_exec(client, target, deadline)
            except Exception as exc:
                log.debug("%s: killing guest pid %s: %r", self.name, pid, exc)

    async def read_file(
        self,
        path: str,
        *,
        timeout: float = 60.0,
        max_size: int = _DEFAULT_MAX_FILE,
    ) -> bytes:
        """The contents of the guest file ``path``, read in 256 KiB chunks.

        Raises :class:`~trio_qemu.AgentError` if it is larger than ``max_size`` bytes (the
        whole file is held in memory), ``qemu.qmp.ExecuteError`` if the agent cannot open
        or read it, :class:`~trio_qemu.AgentTimeout` after ``timeout`` seconds.
        """
        deadline = trio.current_time() + timeout
        parts: list[bytes] = []
        with trio.move_on_at(deadline) as scope:
            client = await self._ready_client(deadline)
            handle = await self._open(client, path, "r", deadline)
            try:
                total = 0
                while True:
                    chunk = await self._call(
                        client, "guest-file-read", {"handle": handle, "count": _READ_CHUNK},
                        deadline,
                    )  # fmt: skip
                    data = self._b64(
                        _field(chunk, "buf-b64", str, "guest-file-read"), "guest-file-read"
                    )
                    total += len(data)
                    if total > max_size:
                        raise AgentError(
                            f"{self.name}: {path} is larger than max_size={max_size} bytes"
                        )
                    parts.append(data)
                    if chunk.get("eof") or not data:
                        break
            finally:
                await self._close_quietly(client, handle)
        if scope.cancelled_caught:
            raise AgentTimeout(f"{self.name}: reading {path} took longer than {timeout} s")
        return b"".join(parts)

    async def write_file(self, path: str, data: bytes, *, timeout: float = 60.0) -> None:
        """Create or truncate the guest file ``path`` and write ``data`` to it.

        Sent in 96 KiB chunks (base64); the file is closed (flushed) before this returns.
        Raises ``qemu.qmp.ExecuteError`` if the agent cannot open or write it,
        :class:`~trio_qemu.AgentError` on a short write, :class:`~trio_qemu.AgentTimeout`
        after ``timeout`` seconds (the file may then be partly written).
        """
        view = memoryview(data)
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as scope:
            client = await self._ready_client(deadline)
            handle = await self._open(client, path, "w", deadline)
            closed = False
            try:
                for start in range(0, len(view), _WRITE_CHUNK):
                    chunk = view[start : start + _WRITE_CHUNK]
                    reply = await self._call(
                        client,
                        "guest-file-write",
                        {"handle": handle, "buf-b64": base64.b64encode(chunk).decode("ascii")},
                        deadline,
                    )
                    written = _field(reply, "count", int, "guest-file-write")
                    if written != len(chunk):
                        raise AgentError(
                            f"{self.name}: short write to {path}: {written} of {len(chunk)} bytes"
                        )
                await self._call(client, "guest-file-close", {"handle": handle}, deadline)
                closed = True
            finally:
                if not closed:
                    await self._close_quietly(client, handle)
        if scope.cancelled_caught:
            raise AgentTimeout(f"{self.name}: writing {path} took longer than {timeout} s")

    async def _open(self, client: QMPClient, path: str, mode: str, deadline: float) -> int:
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, not {path!r}")
        handle = await self._call(client, "guest-file-open", {"path": path, "mode": mode}, deadline)
        if not isinstance(handle, int):
            raise AgentError(f"{self.name}: guest-file-open returned {handle!r}")
        return handle

    async def _close_quietly(self, client: QMPClient, handle: int) -> None:
        """Close a guest file handle: shielded, at most 5 s, never raises."""
        deadline = trio.current_time() + _CLEANUP_TIMEOUT
        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                await self._call(client, "guest-file-close", {"handle": handle}, deadline)
            except Exception as exc:
                log.debug("%s: closing guest file handle %s: %r", self.name, handle, exc)

    async def shutdown(self, mode: str = "powerdown", *, timeout: float = 5.0) -> None:
        """Ask the guest to shut down (``guest-shutdown``): ``powerdown``, ``halt`` or
        ``reboot``.

        qemu-ga never answers a shutdown that works (its schema says ``success-response:
        false``), only one it could not start (``/sbin/shutdown`` failed): that raises
        ``qemu.qmp.ExecuteError``. So this returns when the channel closes (the guest
        powered off and QEMU exited) or, failing that, once ``timeout`` seconds passed
        without a refusal. With ``-no-reboot`` (the tiny guest's default) ``powerdown`` and
        ``reboot`` make QEMU exit; wait for it with ``vm.wait(timeout)``. ``halt`` stops
        the guest's CPUs but leaves QEMU running.
        """
        if mode not in SHUTDOWN_MODES:
            raise ValueError(f"mode must be one of {', '.join(SHUTDOWN_MODES)}, not {mode!r}")
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as scope:
            client = await self._ready_client(deadline)
            if self._on_shutdown is not None:
                self._on_shutdown(mode)
            try:
                await client.cmd("guest-shutdown", {"mode": mode}, timeout=timeout)
            except QMPConnectionClosed:
                return  # the guest is gone: what was asked for
            except QMPTimeout:
                return  # no refusal in time: the shutdown is under way
        if scope.cancelled_caught and self._client is None:
            raise AgentTimeout(f"{self.name}: the guest agent did not answer within {timeout} s")

    def _b64(self, text: object, command: str) -> bytes:
        if not isinstance(text, str):
            raise AgentError(f"{self.name}: {command} sent {text!r} instead of base64")
        try:
            return binascii.a2b_base64(text, strict_mode=True) if text else b""
        except binascii.Error as exc:
            raise AgentError(f"{self.name}: {command} sent bad base64: {exc}") from exc


def _is_sync_reply(line: bytes, sync_id: int) -> bool:
    """Whether ``line`` (after a 0xFF) is ``{"return": sync_id}``."""
    try:
        reply = json.loads(line)
    except ValueError:
        return False
    return isinstance(reply, dict) and reply.get("return") == sync_id


def _field(reply: object, key: str, kind: type, command: str) -> Any:
    """``reply[key]`` checked to be a ``kind``; AgentError otherwise."""
    if not isinstance(reply, dict) or not isinstance(reply.get(key), kind):
        raise AgentError(f"{command} returned {reply!r} (no {kind.__name__} {key!r})")
    return reply[key]


@protected_asynccontextmanager
async def open_agent(
    target: trio.abc.Stream | _HasChannel,
    *,
    ready_timeout: float | None = None,
    **options: Any,
) -> AsyncIterator[GuestAgent]:
    """A :class:`GuestAgent` with its reader running for the block.

    ``target`` is the agent channel's stream, or a machine launched with ``agent=True``
    (its ``channel("agent")`` is used). One reader per channel: on a machine that offers
    ``vm.agent``, use either that or this, not both. With ``ready_timeout`` the block
    starts only once :meth:`GuestAgent.wait_ready` succeeded. ``options`` go to
    :class:`GuestAgent`. On the way out the reader is cancelled; the stream stays open (it
    belongs to the caller).
    """
    stream = target if isinstance(target, trio.abc.Stream) else target.channel("agent")
    agent = GuestAgent(stream, **options)
    async with open_service_nursery(on_exit=agent.fail) as nursery:
        await nursery.start(agent.run)
        if ready_timeout is not None:
            await agent.wait_ready(ready_timeout)
        yield agent
