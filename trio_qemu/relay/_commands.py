"""Guest TCP on a running machine: streams, forwarded ports, port waits.

:class:`GuestPorts` is mixed into :class:`~trio_qemu.Machine`; it needs only the machine's
``relay`` (the :class:`~trio_qemu.relay.Relay` of a machine launched with ``relay=True``).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import trio

from .._errors import GuestConnectionError, GuestConnectionRefused, RelayTimeout
from ._forward import forward_port
from ._relay import Relay, check_host, check_port
from ._stream import GuestStream

__all__ = ["GuestPorts"]


class GuestPorts:
    """``open_tcp_stream``, ``forward_port`` and ``wait_for_open_port`` of a machine."""

    name: str

    @property
    def relay(self) -> Relay:  # pragma: no cover - provided by Machine
        raise NotImplementedError

    async def open_tcp_stream(
        self, port: int, host: str = "127.0.0.1", *, timeout: float = 30.0
    ) -> GuestStream:
        """A TCP connection to ``host``:``port`` as seen from inside the guest, with no
        port on the host and no network device: ``async with await vm.open_tcp_stream(80)
        as stream: ...``.

        It goes through the relay (``relay=True``, as the tiny guest's ``config()`` gives
        when the guest has the relay): the connection is made in the guest, and the
        :class:`~trio_qemu.relay.GuestStream` returned (a ``trio.abc.HalfCloseableStream``)
        carries its bytes over the relay's virtio-serial port. ``send_eof`` shuts the
        guest socket's write side; ``receive_some`` returns ``b""`` at the guest side's end
        of data. Any number may be open at once, each with its own flow control.

        Args:
            port: the TCP port in the guest, 1-65535.
            host: an IP address as the guest sees it (default its loopback;
                ``"localhost"`` is 127.0.0.1); names are not resolved.
            timeout: bounds waiting for the relay (the guest may still be booting) and for
                the connection.

        Raises:
            GuestConnectionRefused: nobody listens there (also a ``ConnectionRefusedError``).
            GuestConnectionError: the connection failed otherwise (``errno`` says how).
            RelayTimeout: the relay did not say hello, or the connection was not made,
                within ``timeout``.
            RelayError: the machine has no relay channel, or the relay cannot be used.
            MachineExited: QEMU died meanwhile.
            ValueError: ``port``, ``host`` or ``timeout`` is not valid.
        """
        return await self.relay.open_tcp_stream(port, host, timeout=timeout)

    def forward_port(
        self,
        guest_port: int,
        host: tuple[str, int] = ("127.0.0.1", 0),
        *,
        guest_host: str = "127.0.0.1",
        connect_timeout: float = 30.0,
    ) -> AbstractAsyncContextManager[tuple[str, int]]:
        """Listen on the host at ``host`` and forward each connection to ``guest_port``
        in the guest, through the relay; for tools that need a real socket (an HTTP
        client, ssh).

        ``async with vm.forward_port(80) as (address, port): ...`` yields the address
        really bound (port 0: a free port is chosen). Each accepted connection gets its
        own :meth:`open_tcp_stream` and is copied both ways, half-closes included; one the
        guest refuses, or that breaks, is reset on the host side. Leaving the block stops
        listening and closes every forwarded connection. A connection's failures never end
        the block (they are logged at INFO on ``trio_qemu.relay``).

        Args:
            guest_port: the port in the guest, 1-65535.
            host: ``(address, port)`` to listen on: an IP address, and a port (0: any).
            guest_host: the address in the guest to connect to (default its loopback).
            connect_timeout: bounds each connection's :meth:`open_tcp_stream`.

        Raises:
            RelayError: the machine has no relay channel (at once).
            OSError: the host address cannot be bound.
            ValueError: an argument is not valid.
        """
        return forward_port(lambda: self.relay, guest_port, host, guest_host, connect_timeout)

    async def wait_for_open_port(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = 60.0,
        interval: float = 0.25,
    ) -> None:
        """Wait until something listens on ``host``:``port`` in the guest (TCP).

        Polls: it connects through the relay (:meth:`open_tcp_stream`) and closes the
        connection at once when it is made; a refused (or otherwise failed) connection is
        tried again ``interval`` seconds later, as nothing in the guest can be waited on
        for a port to open. The server sees that connection opened and closed.

        Raises:
            RelayTimeout: the port did not open within ``timeout`` seconds (the message
                says what the last try got), or the relay did not say hello in that time.
            RelayError: the machine has no relay channel.
            ValueError: an argument is not valid.
        """
        await self._wait_port(port, host, timeout, interval, want_open=True)

    async def wait_for_closed_port(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = 60.0,
        interval: float = 0.25,
    ) -> None:
        """Wait until nothing listens on ``host``:``port`` in the guest any more (a
        connection is refused).

        Polls, like :meth:`wait_for_open_port`: each try connects through the relay
        (and closes a connection that is made at once), every ``interval`` seconds.

        Raises:
            RelayTimeout: connections were still accepted after ``timeout`` seconds.
            RelayError: the machine has no relay channel.
            ValueError: an argument is not valid.
        """
        await self._wait_port(port, host, timeout, interval, want_open=False)

    async def _wait_port(
        self, port: int, host: str, timeout: float, interval: float, *, want_open: bool
    ) -> None:
        check_port(port)
        host = check_host(host)
        for field, value in (("timeout", timeout), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{field} must be a number of seconds, not {value!r}")
            if not 0 < value < float("inf") or (field == "timeout" and value != value):
                raise ValueError(f"{field} must be a positive number of seconds, not {value!r}")
        relay = self.relay
        last = "no connection was tried"
        deadline = trio.current_time() + timeout
        while True:
            left = deadline - trio.current_time()
            if left <= 0:
                break
            try:
                stream = await relay.open_tcp_stream(port, host, timeout=left)
            except GuestConnectionRefused as exc:
                last = f"refused: {exc}"
                if not want_open:
                    return
            except GuestConnectionError as exc:
                last = f"failed: {exc}"
            except RelayTimeout as exc:
                last = str(exc)
            else:
                await stream.aclose()
                last = "a connection was accepted"
                if want_open:
                    return
            await trio.sleep(min(interval, max(0.0, deadline - trio.current_time())))
        state = "open" if want_open else "close"
        raise RelayTimeout(
            f"{self.name}: port {host}:{port} in the guest did not {state} within {timeout} s "
            f"(last try: {last})"
        )
