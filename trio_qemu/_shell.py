"""Commands in the guest, with exit status and exact output, over a dedicated channel.

The guest shell is not the serial console: it runs on a virtio-serial port of its own
(``org.trio-qemu.shell``, on a socketpair chardev, see ``MachineConfig.shell``), the way the
NixOS test driver keeps its backdoor shell apart from the log console. So the console stays a
clean record of what the guest printed, and nothing a command prints can be mistaken for the
protocol.

The guest side is :data:`GUEST_AGENT_SCRIPT`, a busybox ``sh`` loop the tiny guest's
``/init`` starts. The protocol is line based; every request and reply carries an id, and
anything that does not parse is ignored, so junk or a request cut short cannot derail it::

    host -> guest
      P <id> <id>                                   ping
      R <id> <max> <stdin-len> <command-b64> <id>   run; then <stdin-len> bytes of base64
                                                    stdin and a newline, when stdin-len > 0
      K <id> <id>                                   kill the process group of run <id>
    guest -> host
      #R <pid>                                      the agent (re)started
      #P <id>                                       pong
      #B <id> <rc> <out-len> <err-len>              a result: base64 lines of stdout,
      #M <id>                                       then this, base64 lines of stderr,
      #E <id> <rc>                                  then this
      #X <id> <rc> <out-len> <err-len>              a result larger than <max>, not sent

Lines the guest sends start with ``#``, which base64 never contains. The command is
base64-encoded on the request line, so no byte of it can break the framing; the request line
ends with its id again, so a line cut short is never run. The guest runs each command in the
background in a session of its own (``setsid sh -c ...``) with stdout and stderr in files,
records its pid, and queues its result when it exits; a single writer sends the queued
results and pongs one whole reply at a time, so replies never interleave. A kill request
marks the run killed and kills its whole process group; the command looks at that mark once
it leads its session, so a kill that comes before the process group exists is not lost.

On the host, a result whose id is not the one awaited (a command that was killed after a
timeout) is skipped whole. A run cancelled after its request was sent asks for the kill, and
the next call first reads that run's result to its end (bounded by ``kill_timeout``), so
nothing of it is pending when the next request goes out.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import trio

from ._errors import GuestCommandError, ShellError, ShellTimeout, copy_error

__all__ = ["GUEST_AGENT_PATH", "GUEST_AGENT_SCRIPT", "GuestResult", "Shell"]

log = logging.getLogger("trio_qemu.shell")

GUEST_AGENT_PATH: Final = "/bin/trio-shell-agent"
"""Where the tiny guest's initramfs holds :data:`GUEST_AGENT_SCRIPT`."""

GUEST_AGENT_SCRIPT: Final = r"""#!/bin/sh
# trio-qemu guest shell agent (see trio_qemu/_shell.py for the protocol).
# Usage: trio-shell-agent /dev/virtio-ports/org.trio-qemu.shell
port=${1:?usage: trio-shell-agent PORT}
work=/run/trio-shell
mkdir -p "$work" /dev/virtio-ports

link_ports() {
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        n=
        read -r n <"$p/name" 2>/dev/null
        [ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
    done
}

# No virtio-serial device at all: nothing to serve.
for d in /sys/bus/virtio/drivers/virtio_console/virtio* ''; do [ -e "$d" ] && break; done
[ -n "$d" ] || exit 0

# virtio_console learns port names from QEMU asynchronously, and the kernel offers nothing a
# shell can block on for it: look again every 20 ms, for at most 20 s.
i=0
until [ -e "$port" ]; do
    link_ports
    [ -e "$port" ] && break
    i=$((i + 1))
    [ "$i" -le 1000 ] || exit 1
    usleep 20000
done

# worker ID MAX DIR: run DIR/cmd, then queue its result for the writer.
# The command leads a session (and process group) of its own, and looks at the kill flag only
# once it does: a kill request that came before that is seen there, and one that comes after
# finds the process group (from the K handler, or from here once the pid is recorded).
worker() {
    id=$1 max=$2 d=$3
    cmd=$(base64 -d "$d/cmd")
    in=/dev/null
    [ -e "$d/in" ] && in=$d/in
    setsid sh -c '[ -e "$1" ] && exit 137; exec sh -c "$2"' sh "$d/kill" "$cmd" \
        <"$in" >"$d/out" 2>"$d/err" 3>&- 4>&- &
    pid=$!
    echo "$pid" >"$d/pid"
    [ -e "$d/kill" ] && kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid"
    printf 'R %s %s %s\n' "$id" "$?" "$max" >&4
}

# writer: the only one who writes to the host once started, one reply at a time, so the
# results of commands that end close together never interleave on the channel. It takes
# "R ID RC MAX" (a worker's command ended) and "P ID" (a ping) lines from the queue.
writer() {
    while read -r what id rc max; do
        case "$what" in
        P)
            printf '#P %s\n' "$id"
            ;;
        R)
            d=$work/$id
            set -- $(stat -c %s "$d/out" "$d/err" 2>/dev/null) 0 0
            if [ $(($1 + $2)) -gt "$max" ]; then
                printf '#X %s %s %s %s\n' "$id" "$rc" "$1" "$2"
            else
                printf '#B %s %s %s %s\n' "$id" "$rc" "$1" "$2"
                [ "$1" = 0 ] || base64 "$d/out"
                printf '#M %s\n' "$id"
                [ "$2" = 0 ] || base64 "$d/err"
                printf '#E %s %s\n' "$id" "$rc"
            fi
            # Renamed first: a kill request can no longer add a file to it (see K).
            mv "$d" "$d.sent" && rm -rf "$d.sent"
            ;;
        esac
    done
}

exec 3<>"$port" || exit 1
cd /
# The queue: a FIFO held open for reading and writing (so it never ends), then unlinked.
queue=$work/queue.$$
rm -f "$queue"
mkfifo "$queue" && exec 4<>"$queue" || exit 1
rm -f "$queue"
printf '#R %s\n' "$$" >&3
set -f
writer <&4 >&3 &
while :; do
    line=
    if ! IFS= read -r line <&3 && [ -z "$line" ]; then
        sleep 1  # end of file: nobody on the host side; look again later
        continue
    fi
    set -- $line
    case "$1" in
    P)
        [ "$#" = 3 ] && [ "$2" = "$3" ] && printf 'P %s\n' "$2" >&4
        ;;
    R)
        [ "$#" = 6 ] && [ "$2" = "$6" ] || continue
        case "$2" in *[!0-9a-z-]*) continue ;; esac
        case "$3$4" in *[!0-9]*) continue ;; esac
        d=$work/$2
        mkdir "$d" 2>/dev/null || continue
        if [ "$4" != 0 ]; then
            dd bs=65536 count=$(($4 + 1)) iflag=count_bytes,fullblock <&3 2>/dev/null |
                base64 -d >"$d/in" 2>/dev/null
        fi
        if [ "$5" = - ]; then true >"$d/cmd"; else echo "$5" >"$d/cmd"; fi
        worker "$2" "$3" "$d" &
        ;;
    K)
        [ "$#" = 3 ] && [ "$2" = "$3" ] || continue
        case "$2" in *[!0-9a-z-]*) continue ;; esac
        # Only while the run's directory exists (until its result is sent). "true", not
        # ":": a failed redirection of a special built-in would end this shell.
        if true 2>/dev/null >"$work/$2/kill"; then
            pid=
            read -r pid 2>/dev/null <"$work/$2/pid"
            [ -z "$pid" ] || kill -KILL -- "-$pid" 2>/dev/null
        fi
        ;;
    esac
done
"""
"""The guest side of :class:`Shell`: a busybox ``sh`` script taking the port's path."""

#: Bytes asked for per receive.
_RECEIVE_SIZE: Final = 65536
#: The longest line kept outside a result (base64 lines are 76 characters).
_MAX_LINE: Final = 65536
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


class _ChannelEnded(ShellError):
    """The channel reached end of file or broke (QEMU closed its end: it is exiting)."""


class _Lines:
    """Complete lines from a byte stream, with bounded memory.

    A line longer than ``max_line`` without a newline is dropped (its end too), since no
    line of the protocol is that long; only the current chunk and partial line are held.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_line: int) -> None:
        self._stream = stream
        self._max_line = max_line
        self._lines: deque[bytes] = deque()
        self._partial = bytearray()
        self._skipping = False

    async def next(self) -> bytes:
        """The next line without its newline; ShellError at end of file."""
        while not self._lines:
            try:
                chunk = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ChannelEnded(f"the guest shell channel broke: {exc!r}") from exc
            if not chunk:
                raise _ChannelEnded("the guest shell channel reached end of file (QEMU exited?)")
            self._feed(bytes(chunk))
        return self._lines.popleft()

    def _feed(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        last = parts.pop()
        if parts:
            first = parts[0]
            if self._skipping:
                self._skipping = False
                parts = parts[1:]
            elif self._partial:
                parts[0] = bytes(self._partial) + first
            self._partial.clear()
            self._lines.extend(parts)
        if self._skipping:
            return
        self._partial += last
        if len(self._partial) > self._max_line:
            log.warning("guest shell: dropping a line longer than %d bytes", self._max_line)
            self._partial.clear()
            self._skipping = True


class _Reply:
    """A result being received for one id: the base64 lines of stdout, then of stderr."""

    def __init__(self, rid: bytes, returncode: int, out_len: int, err_len: int) -> None:
        self.rid = rid
        self.returncode = returncode
        self.lengths = (out_len, err_len)
        self.parts: tuple[list[bytes], list[bytes]] = ([], [])
        self.sizes = [0, 0]
        self.index = 0

    def add(self, line: bytes) -> None:
        self.sizes[self.index] += len(line)
        # base64 of n bytes is 4 * ceil(n / 3) characters; anything beyond is a broken peer.
        if self.sizes[self.index] > 4 * (-(-self.lengths[self.index] // 3)):
            raise ShellError(f"the guest sent more output than it announced for {self.rid!r}")
        self.parts[self.index].append(line)

    def decode(self, index: int) -> bytes:
        text = b"".join(self.parts[index])
        try:
            data = binascii.a2b_base64(text, strict_mode=True) if text else b""
        except binascii.Error as exc:
            raise ShellError(f"the guest sent bad base64 for {self.rid!r}: {exc}") from exc
        if len(data) != self.lengths[index]:
            raise ShellError(
                f"the guest announced {self.lengths[index]} bytes for {self.rid!r} "
                f"but sent {len(data)}"
            )
        return data


class Shell:
    """Run commands in the guest over the guest-shell channel; one command at a time.

    ``stream`` is our end of the channel (``vm.channel("shell")``); the caller keeps owning
    it (the machine closes it at teardown). ``name`` labels log and error messages.
    ``max_output`` bounds the stdout plus stderr of one command (a larger result raises
    :class:`~trio_qemu.ShellError` without being transferred). ``kill_timeout`` is how long a
    timed-out command's kill may take to be confirmed before the shell gives up waiting (the
    next command then skips the late result); after a call cancelled once its command was
    sent, the next call reads that command's result first, and the shell becomes unusable if
    the guest does not start sending it (or stalls in it) for ``kill_timeout``. ``on_eof``,
    if given, is awaited when the channel reaches end of file or breaks, before the error is
    raised: an owning machine can wait there briefly for QEMU's exit and :meth:`close` the
    shell with its own error (``MachineExited``), which is then raised instead of a bare
    :class:`~trio_qemu.ShellError`. The first end of file makes the shell unusable: later
    calls fail at once.

    Memory is bounded by about ``2 * max_output`` (base64 text and decoded bytes of one
    result) plus 64 KiB per partial line.
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
        self._lines = _Lines(stream, _MAX_LINE)
        self._on_eof = on_eof
        self.name = name
        self.max_output = max_output
        self.kill_timeout = kill_timeout
        self._lock = trio.Lock()
        self._token = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._operations: set[trio.CancelScope] = set()
        self._close_error: BaseException | None = None
        self._closed = False
        self._broken: str | None = None
        #: the result being received, kept across the wait for a killed command's result
        self._receiving: _Reply | None = None
        #: a run cancelled once its request was sent (its kill asked for): its result is
        #: still to come, and is read to its end before anything else is sent
        self._cancelled: bytes | None = None
        #: whether the guest has begun sending that result (its ``#B`` came)
        self._cancelled_started = False
        #: set once a ping has been answered (:meth:`wait_ready`)
        self.ready = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ready" if self.ready else "not ready")
        return f"<Shell {self.name!r} {state}>"

    # --- public ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the channel broke."""
        return self._closed or self._broken is not None

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

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the guest's shell agent answers a ping.

        The agent may not be running yet (the guest is booting), so the ping is sent again
        when the agent announces that it started, and otherwise after 0.25 s, 0.5 s, ... up
        to every 4 s (a ping may be lost if the agent restarts); a pong to any of these pings
        counts. Raises :class:`~trio_qemu.ShellTimeout` after ``timeout`` seconds, or the
        shell's close error if it is closed meanwhile.
        """
        with self._operation():
            with trio.move_on_after(timeout) as scope:
                async with self._lock:
                    await self._skip_cancelled_result()
                    await self._ping_until_answered(scope.deadline)
            if scope.cancelled_caught:
                raise ShellTimeout(
                    f"{self.name}: the guest shell did not answer within {timeout} s "
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
        the rest of the result of a command whose call was cancelled). When it
        expires the command's process group is killed (waiting up to ``kill_timeout`` for
        the guest to confirm) and :class:`~trio_qemu.ShellTimeout` is raised with whatever
        output came back; the shell stays usable. With ``check=True`` a non-zero status
        raises :class:`~trio_qemu.GuestCommandError`. Raises
        :class:`~trio_qemu.ShellError` if the channel ends (QEMU exited) or the result is
        larger than ``max_output``, or the close error given to :meth:`close`.
        """
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, not {command!r}")
        encoded = base64.b64encode(command.encode()) or b"-"
        stdin_b64 = base64.b64encode(stdin) if stdin else b""
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
                with trio.CancelScope(deadline=wait_scope.deadline) as skip_scope:
                    await self._skip_cancelled_result()
                if skip_scope.cancelled_caught:
                    raise ShellTimeout(
                        f"{self.name}: {command!r} did not start within {timeout} s: the "
                        "result of an earlier, cancelled command was still arriving",
                        command=command,
                    )
                rid = self._new_id()
                request = b"\nR %s %d %d %s %s\n" % (
                    rid, self.max_output, len(stdin_b64), encoded, rid,
                )  # fmt: skip
                if stdin_b64:
                    request += stdin_b64 + b"\n"
                sent = killed = False
                try:
                    with trio.CancelScope(deadline=wait_scope.deadline) as scope:
                        await self._send(request, scope.deadline)
                        sent = True
                        reply = await self._await_reply(rid, command)
                    if scope.cancelled_caught:
                        if not sent:
                            raise ShellTimeout(
                                f"{self.name}: sending {command!r} took longer than {timeout} s",
                                command=command,
                            )
                        await self._send(
                            b"\nK %s %s\n" % (rid, rid), trio.current_time() + self.kill_timeout
                        )
                        killed = True
                        raise await self._kill_after_timeout(rid, command, timeout)
                except trio.Cancelled:
                    if sent:
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
        with trio.CancelScope() as scope:
            self._operations.add(scope)
            try:
                yield
            finally:
                self._operations.discard(scope)
        if scope.cancelled_caught:
            self._raise_if_closed()

    def _raise_if_closed(self) -> None:
        if self._closed:
            if self._close_error is not None:
                raise copy_error(self._close_error)
            raise ShellError(f"{self.name}: the shell is closed")
        if self._broken is not None:
            raise ShellError(f"{self.name}: the shell channel is unusable: {self._broken}")

    async def _next_line(self) -> bytes:
        """The next line from the guest; at end of file, the owner's error if it has one.

        The first end of file marks the shell unusable, so later calls fail at once. Every
        reader notes here when the result of a cancelled run (:attr:`_cancelled`) ends."""
        try:
            line = await self._lines.next()
        except _ChannelEnded as exc:
            if self._broken is None:
                self._broken = str(exc)
            await self._channel_ended()
            raise
        if self._cancelled is not None and line[:1] == b"#":
            fields = line.split(b" ", 2)
            if len(fields) > 1 and fields[1] == self._cancelled:
                if fields[0] in (b"#E", b"#X"):
                    self._cancelled = None
                elif fields[0] == b"#B":
                    self._cancelled_started = True
        return line

    async def _skip_cancelled_result(self) -> None:
        """Read and drop the result of a run cancelled after its request was sent, up to
        its end, so that nothing of it is left to mix with what is sent next.

        Its kill was asked for, so the guest should start sending it at once: waiting for
        that is bounded by ``kill_timeout``, and so is each line once it comes (a large
        result takes a while). The shell is unusable if the guest misses either bound."""
        if self._cancelled is None:
            return
        rid = self._cancelled
        deadline = trio.current_time() + self.kill_timeout
        while self._cancelled is not None:
            with trio.CancelScope(deadline=deadline) as scope:
                await self._next_line()
            if scope.cancelled_caught:
                self._broken = (
                    f"the guest did not send the result of cancelled command {rid!r} within "
                    f"kill_timeout={self.kill_timeout} s"
                )
                raise ShellError(f"{self.name}: {self._broken}")
            if self._cancelled_started:
                deadline = trio.current_time() + self.kill_timeout

    async def _channel_ended(self) -> None:
        """Let the owner react to the channel's end; raise its close error if it gave one."""
        if self._on_eof is not None:
            await self._on_eof()
        if self._closed:
            self._raise_if_closed()

    def _new_id(self) -> bytes:
        return f"{self._token}-{next(self._ids)}".encode()

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
                await self._send(b"\nK %s %s\n" % (rid, rid), trio.current_time() + 1.0)
            except Exception as exc:
                log.debug("%s: kill of %r not sent: %r", self.name, rid, exc)

    async def _kill_after_timeout(self, rid: bytes, command: str, timeout: float) -> ShellTimeout:
        """Wait up to ``kill_timeout`` for the result of command ``rid``, whose kill was just
        sent, and return the ShellTimeout to raise (with the output the guest sent back)."""
        message = f"{self.name}: {command!r} did not finish within {timeout} s; it was killed"
        with trio.move_on_after(self.kill_timeout):
            try:
                reply = await self._await_reply(rid, command)
            except ShellError as exc:
                if self._broken is not None or isinstance(exc, ShellTimeout):
                    raise
                log.debug("%s: result of killed %r: %s", self.name, rid, exc)
            else:
                return ShellTimeout(
                    message, command=command, stdout=reply.stdout, stderr=reply.stderr
                )
        log.debug("%s: no result for killed %r within %s s", self.name, rid, self.kill_timeout)
        return ShellTimeout(message, command=command)

    async def _ping_until_answered(self, deadline: float) -> None:
        sent: set[bytes] = set()
        interval = _PING_FIRST
        while True:
            rid = self._new_id()
            sent.add(rid)
            await self._send(b"\nP %s %s\n" % (rid, rid), deadline)
            with trio.move_on_after(interval):
                while True:
                    line = await self._next_line()
                    if line.startswith(b"#P ") and line[3:] in sent:
                        self.ready = True
                        return
                    if line.startswith(b"#R "):
                        log.debug("%s: the guest shell agent started (%r)", self.name, line)
                        break  # ping again now: the agent may have missed earlier pings
            interval = min(interval * 2, _PING_MAX)

    async def _await_reply(self, rid: bytes, command: str) -> GuestResult:
        """Read lines until the result for ``rid``; skip everything else (junk, pongs, the
        results of other ids). A result partly received when a timeout interrupted the
        previous call for the same ``rid`` is continued."""
        reply = self._receiving if self._receiving and self._receiving.rid == rid else None
        self._receiving = None
        while True:
            line = await self._next_line()
            if not line.startswith(b"#"):
                if reply is not None:
                    reply.add(line)
                continue
            fields = line[1:].split(b" ")
            verb, lid = fields[0], fields[1] if len(fields) > 1 else b""
            if verb == b"B":
                if lid != rid:  # a late result of another run: its lines are not taken
                    log.debug("%s: skipping a stale result for %r", self.name, lid)
                    continue
                rc, out_len, err_len = _ints(fields[2:5], line)
                if out_len + err_len > self.max_output:
                    raise ShellError(
                        f"{self.name}: the guest announced more output than max_output "
                        f"allows ({out_len}+{err_len} bytes)"
                    )
                reply = self._receiving = _Reply(rid, rc, out_len, err_len)
            elif verb == b"M" and reply is not None and lid == rid:
                reply.index = 1
            elif verb == b"E" and reply is not None and lid == rid:
                self._receiving = None
                stdout = reply.decode(0)
                stderr = reply.decode(1)
                return GuestResult(command, reply.returncode, stdout, stderr)
            elif verb == b"X" and lid == rid:
                rc, out_len, err_len = _ints(fields[2:5], line)
                raise ShellError(
                    f"{self.name}: {command!r} (exit status {rc}) wrote {out_len} bytes to "
                    f"stdout and {err_len} to stderr, more than max_output={self.max_output}"
                )
            elif verb not in (b"R", b"P", b"M", b"E", b"X"):
                log.debug("%s: ignoring %r", self.name, line[:80])


def _ints(fields: list[bytes], line: bytes) -> tuple[int, int, int]:
    try:
        a, b, c = (int(f) for f in fields)
    except ValueError:
        raise ShellError(f"the guest sent a malformed result header {line[:80]!r}") from None
    return a, b, c
