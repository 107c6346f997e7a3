"""The socketpairs between us and one QEMU: monitor, console, guest shell, guest agent.

Each channel is an AF_UNIX socketpair: our end becomes a Trio stream, QEMU inherits the other
end (``pass_fds``) and names it in its command line by number, so no path or port exists
that anything else could reach. Our copies of QEMU's ends are closed once QEMU has started
(or the launch failed); our ends are closed at teardown.
"""

from __future__ import annotations

import socket

import trio

from ._config import ChannelFds
from ._errors import LaunchError
from ._transport import socketpair_stream

__all__ = ["Channels"]


class Channels:
    """The channels of one machine.

    Args:
        name: the machine's name, for errors.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        #: our ends, by channel name ("monitor", "console", "shell", "agent")
        self.ours: dict[str, trio.SocketStream] = {}
        self._theirs: dict[str, socket.socket] = {}

    def open(self, channel: str) -> trio.SocketStream:
        """Make the socketpair for ``channel``; return our end.

        Raises:
            LaunchError: out of file descriptors (or another socket error).
        """
        try:
            ours, theirs = socketpair_stream()
        except OSError as exc:  # EMFILE/ENFILE: out of file descriptors
            raise LaunchError(
                f"cannot create the {channel} channel: {exc.strerror or exc}", name=self._name
            ) from exc
        self.ours[channel] = ours
        self._theirs[channel] = theirs
        return ours

    def fds(self) -> ChannelFds:
        """QEMU's ends by role, for the command line."""
        return ChannelFds(**{name: sock.fileno() for name, sock in self._theirs.items()})

    def pass_fds(self) -> list[int]:
        """QEMU's ends, for ``pass_fds``."""
        return [sock.fileno() for sock in self._theirs.values()]

    def close_theirs(self) -> None:
        """Close our copies of QEMU's ends (QEMU holds its own once started); idempotent."""
        for sock in self._theirs.values():
            sock.close()

    def close(self) -> None:
        """Close every end we hold; idempotent."""
        self.close_theirs()
        for stream in self.ours.values():
            stream.socket.close()
