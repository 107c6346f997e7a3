"""The exceptions trio_qemu raises.

The disk errors (``BlockError``, ``JobError``, ``ImageError`` and their timeouts) live with
the disks, in ``trio_qemu/block/_errors.py``; the tree shows them all. Every error a user sees
is a :class:`MachineError` (or ``qemu.qmp.ExecuteError`` for a
command QEMU refused; or a bare ``KeyboardInterrupt`` for Ctrl-C, never wrapped in a group).
Protocol errors also derive from ``qemu.qmp``'s own classes, so code written against
``qemu.qmp`` keeps catching them. Every ``...Timeout`` is also a ``TimeoutError``::

    MachineError
     +-- LaunchError              QEMU could not start, or stalled/died before QMP was ready
     +-- MachineExited            QEMU died while in use (exit status, its output)
     +-- MachineTimeout           a wait on the machine itself (wait())
     +-- AbnormalShutdown         a graceful stop failed; QEMU was killed
     +-- ConsoleError             the serial console (each carries the console's tail)
     |    +-- ConsoleTimeout      wait_for saw no match in time
     |    +-- ConsoleClosed       the console ended while waited on
     |    +-- ConsoleFailure      a fail pattern appeared first
     +-- EventsDropped            a subscription's buffer overflowed (raised once)
     +-- QMPTimeout               a QMP exchange took too long
     |    +-- AgentTimeout        (also an AgentError)
     +-- QMPConnectionClosed      (also qemu.qmp.QMPError) the monitor ended
     +-- QMPProtocolError         (also qemu.qmp.ProtocolError) the peer broke QMP
     |    +-- QMPGreetingError, QMPNegotiationError, QMPBadMessage, QMPUnexpectedReply
     +-- GuestBuildError          the tiny guest could not be built
     +-- GuestCommandError        a guest command with check=True failed
     +-- GuestWaitTimeout         (also TimeoutError) a shell wait ran out of time (last output)
     +-- InvariantViolated        a condition of vm.invariant() stopped holding
     +-- UnknownKeyError          (also ValueError) a key or character send_key/send_text
     |                            cannot send (nothing was sent)
     +-- ShellError               the guest shell channel failed or is gone
     |    +-- ShellTimeout        a guest command outlived its timeout (it was killed)
     |    +-- CopyError           a file copy failed: a path missing or of the wrong kind,
     |                            the guest could not write, or the integrity check failed
     +-- RelayError               the guest relay (TCP into the guest, copies) is missing,
     |    |                       does not answer or is gone
     |    +-- RelayTimeout        (also TimeoutError) no hello, connection or port in time
     |    +-- GuestStreamBroken   (also trio.BrokenResourceError) a stream broke: a reset in
     |    |                       the guest, or the relay died or restarted
     |    +-- GuestConnectionError  (also ConnectionError) a connect in the guest failed
     |         +-- GuestConnectionRefused  (also ConnectionRefusedError) nobody listens
     +-- MigrationError           a migration was refused, failed or timed out
     +-- TemplateError            a snapshot template could not be made or restored, or a
     |                            clone's config does not match its template
     +-- QtestError               qemu answered FAIL/ERR to a qtest request
     |    +-- QtestTimeout        no answer in time
     +-- QtestInvalidRequest      (also ValueError) refused before sending
     +-- QtestProtocolError       the qtest channel is unusable
     +-- BlockError               QEMU refused a block command (its text), or a block wait
     |    |                       (device_del, a tray) ran out of time
     |    +-- BlockTimeout        (also TimeoutError)
     |    +-- JobError            a block job failed, could not start or was refused a verb
     |         +-- JobTimeout     (also TimeoutError) it was cancelled and waited for
     +-- ImageError               qemu-img or qemu-io failed (its message, command line)
     |    +-- ImageTimeout        (also TimeoutError) it was killed
     +-- NetworkError             a network helper failed
     |    +-- NetworkTimeout
     +-- AgentError               the QEMU guest agent could not do what was asked
          +-- AgentTimeout
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
from qemu.qmp.error import ProtocolError, QMPError

if TYPE_CHECKING:
    from ._shell import GuestResult

__all__ = [
    "AbnormalShutdown",
    "AgentError",
    "AgentTimeout",
    "ConsoleClosed",
    "ConsoleError",
    "ConsoleFailure",
    "ConsoleTimeout",
    "CopyError",
    "EventsDropped",
    "GuestBuildError",
    "GuestCommandError",
    "GuestConnectionError",
    "GuestConnectionRefused",
    "GuestStreamBroken",
    "GuestWaitTimeout",
    "InvariantViolated",
    "LaunchError",
    "MachineError",
    "MachineExited",
    "MachineTimeout",
    "MigrationError",
    "NetworkError",
    "NetworkTimeout",
    "QMPBadMessage",
    "QMPConnectionClosed",
    "QMPGreetingError",
    "QMPNegotiationError",
    "QMPProtocolError",
    "QMPTimeout",
    "QMPUnexpectedReply",
    "QtestError",
    "QtestInvalidRequest",
    "QtestProtocolError",
    "QtestTimeout",
    "RelayError",
    "RelayTimeout",
    "ShellError",
    "ShellTimeout",
    "TemplateError",
    "UnknownKeyError",
]


def copy_error(error: BaseException) -> BaseException:
    """A fresh copy of ``error`` to raise in one more task (``error`` itself if it won't copy).

    One failure (QEMU died, the peer broke the protocol) ends many waits at once; raising
    the same exception object in several tasks would splice their tracebacks together.
    """
    try:
        clone = copy.copy(error)
    except Exception:
        return error
    if type(clone) is not type(error):
        return error
    clone.__cause__ = error.__cause__
    clone.__suppress_context__ = error.__suppress_context__
    return clone.with_traceback(None)


def _tail(text: str, lines: int = 20) -> str:
    """The last ``lines`` lines of ``text``, indented for an error message."""
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    " + line for line in kept) if kept else "    (empty)"


class MachineError(Exception):
    """Base class of every error raised by trio_qemu."""


class LaunchError(MachineError):
    """QEMU could not be started, or exited or stalled before it was ready.

    Carries the exit code (``None`` while QEMU still ran, e.g. on ``launch_timeout``),
    the full command line and QEMU's own output so far.
    """

    def __init__(
        self,
        reason: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        output: str = "",
        name: str | None = None,
    ) -> None:
        self.reason = reason
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        self.name = name
        super().__init__(reason)

    def __str__(self) -> str:
        who = f"{self.name}: " if self.name else ""
        parts = [f"{who}{self.reason}"]
        if self.returncode is not None:
            parts.append(f"  exit status: {self.returncode}")
        if self.argv:
            parts.append(f"  command line: {' '.join(self.argv)}")
        parts.append("  QEMU output:\n" + _tail(self.output))
        return "\n".join(parts)


class MachineExited(MachineError):
    """QEMU exited while the machine was in use and nobody asked it to.

    ``returncode`` follows ``subprocess``: negative for a signal (-9 is SIGKILL).
    """

    def __init__(self, name: str, returncode: int | None, log_tail: str = "") -> None:
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(name, returncode, log_tail)

    def __str__(self) -> str:
        rc = self.returncode
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        return f"{self.name}: QEMU exited unexpectedly ({how})\n  QEMU output:\n" + _tail(
            self.log_tail
        )


class MachineTimeout(MachineError, TimeoutError):
    """A wait on the machine itself (e.g. ``wait()`` for QEMU to exit) ran out of time."""


class AbnormalShutdown(MachineError):
    """A graceful stop was asked for but failed; QEMU was killed instead.

    The machine is gone and reaped when this is raised; ``__cause__`` says why the
    graceful path failed when there was an exception.
    """


class ConsoleError(MachineError):
    """Base of the serial console's errors. ``tail`` is the console's recent output, shown
    after the message."""

    def __init__(self, message: str, tail: bytes = b"") -> None:
        self.tail = tail
        super().__init__(message)

    def __str__(self) -> str:
        text = self.tail.decode("utf-8", "replace")
        return f"{self.args[0]}\n  console tail:\n" + _tail(text)


class ConsoleTimeout(ConsoleError, TimeoutError):
    """``console.wait_for`` saw no match in time."""


class ConsoleClosed(ConsoleError):
    """The console ended (QEMU exited, the machine shut down) while something waited on it.

    When QEMU died unexpectedly the waiters get :class:`MachineExited` instead.
    """


class ConsoleFailure(ConsoleError):
    """A fail pattern given to ``console.wait_for`` appeared before the awaited one;
    ``match`` is that pattern's match."""

    def __init__(self, message: str, match: object = None, tail: bytes = b"") -> None:
        self.match = match
        super().__init__(message, tail)


class EventsDropped(MachineError):
    """A subscription's buffer was full and ``count`` events were not delivered to it.

    Raised once by the next ``receive()``; the subscription goes on working after it.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(f"{count} event(s) dropped: the subscription's buffer was full")


class QMPTimeout(MachineError, TimeoutError):
    """A QMP exchange (greeting, negotiation or command) took longer than its timeout."""


class QMPConnectionClosed(MachineError, QMPError):
    """The QMP connection ended (EOF, or closed by us) while something still needed it."""


class QMPProtocolError(MachineError, ProtocolError):
    """The peer broke the QMP protocol. The connection is closed when this is raised."""

    def __init__(self, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        #: the offending bytes (shortened), when there were some
        self.raw = raw

    def __str__(self) -> str:
        if self.raw is None:
            return self.error_message
        shown = self.raw if len(self.raw) <= 200 else self.raw[:200] + b"..."
        return f"{self.error_message}\n  received: {shown!r}"


class QMPGreetingError(QMPProtocolError):
    """The first message was not a valid QMP greeting."""


class QMPNegotiationError(QMPProtocolError):
    """``qmp_capabilities`` was refused or answered with something else."""


class QMPBadMessage(QMPProtocolError):
    """A message was not JSON, not an object, not UTF-8, oversized, or cut short by EOF."""


class QMPUnexpectedReply(QMPProtocolError):
    """A reply had an id we never sent, or an error came back with no id at all."""


class GuestBuildError(MachineError):
    """The tiny test guest could not be built (a Debian tool is missing or failed).

    ``reason`` is the message; it says how to boot a kernel and initramfs of one's own.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class GuestCommandError(MachineError):
    """A command run in the guest with ``check=True`` exited with a non-zero status.

    Carries the ``command``, its ``returncode`` and its exact ``stdout`` and ``stderr``.
    """

    def __init__(self, command: str, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(command, returncode, stdout, stderr)

    def __str__(self) -> str:
        text = (self.stderr or self.stdout)[-2000:].decode("utf-8", "replace")
        return (
            f"guest command {self.command!r} exited with status {self.returncode}\n"
            "  its output:\n" + _tail(text)
        )


class ShellError(MachineError):
    """The guest-shell channel failed: it closed (QEMU exited), the guest broke the
    protocol, or a reply exceeded the shell's ``max_output``."""


class ShellTimeout(ShellError, TimeoutError):
    """A guest command outlived its timeout; its kill was sent (the message says whether
    the guest confirmed it) and the shell stays usable.

    ``stdout`` and ``stderr`` hold what the command wrote before it was killed, when the
    guest sent it back in time (else empty).
    """

    def __init__(self, message: str, *, command: str = "", stdout: bytes = b"",
                 stderr: bytes = b"") -> None:
        self.command = command
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(message)



class _CarriesResult:
    """``returncode``, ``stdout`` and ``stderr`` of the guest command run an error carries
    (``result``, a ``GuestResult``, or None: then None, ``b""`` and ``b""``)."""

    result: GuestResult | None

    @property
    def returncode(self) -> int | None:
        """The run's exit status (None when there is no run)."""
        return self.result.returncode if self.result is not None else None

    @property
    def stdout(self) -> bytes:
        """What the run wrote to stdout."""
        return self.result.stdout if self.result is not None else b""

    @property
    def stderr(self) -> bytes:
        """What the run wrote to stderr."""
        return self.result.stderr if self.result is not None else b""

    def _result_text(self) -> str:
        text = (self.stdout + self.stderr)[-2000:].decode("utf-8", "replace")
        return f"exit status {self.returncode}, output:\n" + _tail(text)


class GuestWaitTimeout(_CarriesResult, MachineError, TimeoutError):
    """A shell wait (``shell.wait_until_succeeds``, ``wait_until_fails``,
    ``wait_for_file``) ran out of time before the command answered as wanted.

    ``command`` is the command polled, ``timeout`` the time given and ``attempts`` how
    many runs were made. ``result`` is the last run that completed (a ``GuestResult``,
    None if none did), and ``returncode``, ``stdout`` and ``stderr`` are its exit status
    and output (None and empty without one). ``error`` is the
    :class:`ShellTimeout` of a last run that was still going when the time ran out and was
    killed (also the ``__cause__``), else None.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str,
        timeout: float,
        attempts: int,
        result: GuestResult | None = None,
        error: ShellTimeout | None = None,
    ) -> None:
        self.command = command
        self.timeout = timeout
        self.attempts = attempts
        self.result = result
        self.error = error
        super().__init__(message)

    def __str__(self) -> str:
        parts = [str(self.args[0])]
        if self.result is not None:
            parts.append("  last run: " + self._result_text())
        if self.error is not None:
            parts.append(f"  the run after it: {self.error}")
        return "\n".join(parts)


class InvariantViolated(_CarriesResult, MachineError):
    """A condition checked by ``vm.invariant()`` stopped holding during its block.

    ``check`` names what was checked (the guest command, or the callable's name) and
    ``checks`` how many times it had held before. For a guest command that exited with a
    non-zero status, ``result`` is its ``GuestResult`` and ``returncode``, ``stdout`` and
    ``stderr`` its exit status and output. ``error`` is the exception the check raised (a
    callable's own error, a :class:`ShellTimeout` or :class:`ShellError` of a guest
    command, or ``TimeoutError`` for a callable that outlived its timeout), also the
    ``__cause__``; None when the check answered (a failed command, a falsy value).
    ``value`` is what a callable returned, when it returned.
    """

    def __init__(
        self,
        message: str,
        *,
        check: str,
        checks: int,
        result: GuestResult | None = None,
        error: BaseException | None = None,
        value: object = None,
    ) -> None:
        self.check = check
        self.checks = checks
        self.result = result
        self.error = error
        self.value = value
        super().__init__(message)

    def __str__(self) -> str:
        parts = [str(self.args[0])]
        if self.result is not None:
            parts.append("  " + self._result_text())
        return "\n".join(parts)


class UnknownKeyError(MachineError, ValueError):
    """``send_key`` was given a key name QEMU does not know, or ``send_text`` a character
    it cannot type. Raised before anything is sent: the guest got no key at all.

    ``key`` is the offending name (or character) and ``given`` the whole argument.
    """

    def __init__(self, message: str, *, key: str, given: str) -> None:
        self.key = key
        self.given = given
        super().__init__(message)


class CopyError(ShellError):
    """``shell.copy_to`` or ``shell.copy_from`` failed: a path is missing or of the wrong
    kind (a directory where a file is expected, or the other way round), the guest could
    not write or read it (its error is in the message), or what arrived does not match what
    was sent (size and SHA-256). ``path`` is the path concerned. Nothing is left under the
    destination's name then, and the shell stays usable."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0],), self.__dict__)


class RelayError(MachineError):
    """The guest relay (``vm.open_tcp_stream``, ``vm.forward_port``, file copies) failed:
    the machine has no relay channel, the guest has no relay or it does not answer, or the
    relay is gone (killed in the guest: a new one started by the guest's init is used
    again once it says hello)."""


class RelayTimeout(RelayError, TimeoutError):
    """A relay operation ran out of time: the relay did not say hello, a connection in the
    guest was not made, or a port did not open (or close) in time."""


class GuestStreamBroken(RelayError, trio.BrokenResourceError):
    """A stream through the relay broke: the connection was reset in the guest, or the
    relay died or restarted while it was open. Also a ``trio.BrokenResourceError``, what
    Trio streams raise when the other end breaks."""


class GuestConnectionError(RelayError, ConnectionError):
    """A connection the relay tried to make in the guest failed.

    ``errno`` is the guest's error number (``errno.ECONNREFUSED``...), ``host`` and
    ``port`` the address tried.
    """

    def __init__(
        self, message: str, errno: int | None = None, host: str = "", port: int = 0
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.errno, self.host, self.port), self.__dict__)

    def __str__(self) -> str:
        return str(self.args[0])


class GuestConnectionRefused(GuestConnectionError, ConnectionRefusedError):
    """Nobody listens at that address in the guest (``ECONNREFUSED``)."""


class MigrationError(MachineError):
    """A live migration was refused, failed or timed out (and was then cancelled).

    ``source_status`` and ``destination_status`` are the last migration states each side
    reported (``"failed"``, ``"cancelled"``, ``"active"``...; ``"exited"`` when that QEMU
    exited; None when it never started). ``reason`` is QEMU's own explanation when there is
    one: the source's ``error-desc`` and the tail of the destination's output (a QEMU whose
    incoming migration fails prints why and exits).
    """

    def __init__(
        self,
        message: str,
        *,
        source_status: str | None = None,
        destination_status: str | None = None,
        reason: str = "",
    ) -> None:
        self.source_status = source_status
        self.destination_status = destination_status
        self.reason = reason
        super().__init__(message)

    def __str__(self) -> str:
        if not self.reason:
            return str(self.args[0])
        return f"{self.args[0]}\n  QEMU's reason:\n" + _tail(self.reason)


class TemplateError(MachineError):
    """A template could not be made, found or restored, or a clone does not match its
    template (the message names the difference, or quotes QEMU's reason)."""


class QtestError(MachineError):
    """QEMU answered a qtest request with ``FAIL`` or ``ERR``.

    ``line`` is the request as sent, ``status`` is ``"FAIL"`` or ``"ERR"`` and ``reason``
    the rest of QEMU's reply (``"Unknown command 'clock_step'"``). The channel stays usable.
    """

    def __init__(self, line: str, status: str, reason: str) -> None:
        self.line = line
        self.status = status
        self.reason = reason
        super().__init__(line, status, reason)

    def __str__(self) -> str:
        return f"qtest {self.line!r} answered {self.status}: {self.reason or '(no reason)'}"


class QtestInvalidRequest(MachineError, ValueError):
    """A qtest request was refused before it was sent, because QEMU would abort on it.

    QEMU's qtest server asserts on a malformed line (a missing argument, a bad number, an
    empty line, a ``\\r``...) and the whole VM dies; so every line is checked first.
    ``line`` is the refused request and ``reason`` says what is wrong with it. Nothing was
    sent: the channel and QEMU are unaffected.
    """

    def __init__(self, line: str, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(line, reason)

    def __str__(self) -> str:
        return f"refused qtest request {self.line!r}: {self.reason}"


class QtestProtocolError(MachineError):
    """The qtest channel is unusable: QEMU sent something that is not qtest, closed the
    channel, a send stalled, or the qtest machine is closed. ``raw`` holds the offending
    bytes (shortened) when there were some. Every later request raises this error too."""

    def __init__(self, message: str, raw: bytes | None = None) -> None:
        self.raw = raw
        super().__init__(message)

    def __str__(self) -> str:
        if self.raw is None:
            return str(self.args[0])
        shown = self.raw if len(self.raw) <= 200 else self.raw[:200] + b"..."
        return f"{self.args[0]}\n  received: {shown!r}"


class QtestTimeout(QtestError, TimeoutError):
    """A qtest request (or an IRQ wait) got no answer in time.

    For a request the channel stays in step: its late reply is recognised and discarded.
    ``status`` is ``"TIMEOUT"`` and ``reason`` the message.
    """

    def __init__(self, message: str, line: str = "") -> None:
        self.line = line
        self.status = "TIMEOUT"
        self.reason = message
        MachineError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0])


class NetworkError(MachineError):
    """A network helper of :mod:`trio_qemu.network` failed: a guest-side check went wrong
    (e.g. ``ping``'s output could not be read) or the network is closed."""


class NetworkTimeout(NetworkError, TimeoutError):
    """A network wait ran out of time (e.g. a NIC's carrier in the guest did not come up)."""


class AgentError(MachineError):
    """The QEMU guest agent (``vm.agent``) could not do what was asked: its reply had the
    wrong shape, or a limit was hit (output qemu-ga truncated, a file larger than
    ``max_size``). A refusal by the agent itself is a ``qemu.qmp.ExecuteError`` instead, and
    a closed channel is :class:`QMPConnectionClosed` (or :class:`MachineExited`)."""


class AgentTimeout(AgentError, QMPTimeout):
    """A guest agent operation outlived its ``timeout`` (the agent never came up, or a
    command run with ``exec`` did not finish; that command was killed)."""
