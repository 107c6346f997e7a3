"""A host port forwarded to a port in the guest, through the relay (``vm.forward_port``).

Each connection accepted on the host listener gets a stream of its own through the relay
(:meth:`Relay.open_tcp_stream <trio_qemu.relay.Relay.open_tcp_stream>`), and two pumps copy
both ways, each passing on its side's end of data (half-close) to the other. A connection
the guest refuses, or one that breaks on either side, is reset on the host (``SO_LINGER``
0), as a refused or broken TCP connection would be. Nothing a connection does ends the
forwarding: its failures are logged (``trio_qemu.relay``), never raised into the block.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Final

import trio

from .._errors import MachineError
from .._util import open_service_nursery, protected_asynccontextmanager
from ._relay import Relay, check_host, check_port

__all__ = ["forward_port"]

log = logging.getLogger("trio_qemu.relay")

#: Bytes a pump moves per receive.
_CHUNK: Final = 256 * 1024


@protected_asynccontextmanager
async def forward_port(
    relay: Callable[[], Relay],
    guest_port: int,
    host: tuple[str, int],
    guest_host: str,
    connect_timeout: float,
) -> AsyncIterator[tuple[str, int]]:
    """See :meth:`Machine.forward_port <trio_qemu.Machine.forward_port>`."""
    check_port(guest_port, "guest_port")
    guest_host = check_host(guest_host)
    bind_host, bind_port = _check_bind(host)
    the_relay = relay()  # no relay channel: raise before anything is bound
    listeners = await trio.open_tcp_listeners(bind_port, host=bind_host)
    try:
        address = listeners[0].socket.getsockname()
        bound = (str(address[0]), int(address[1]))
        name = f"{the_relay.name}: forward {bound[0]}:{bound[1]} -> {guest_host}:{guest_port}"
        handler = partial(_serve_one, the_relay, guest_port, guest_host, connect_timeout, name)
        async with open_service_nursery() as nursery:
            nursery.start_soon(
                partial(trio.serve_listeners, handler, listeners, handler_nursery=nursery)
            )
            yield bound
    finally:
        for listener in listeners:
            listener.socket.close()


def _check_bind(host: tuple[str, int]) -> tuple[str, int]:
    if not (isinstance(host, tuple) and len(host) == 2):
        raise TypeError(f"host must be a (address, port) tuple, not {host!r}")
    address, port = host
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"host[0] must be an IP address to listen on (e.g. '127.0.0.1'), not {address!r}"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"host[1] must be a port 0-65535 (0: any free port), not {port!r}")
    return address, port


async def _serve_one(
    relay: Relay,
    guest_port: int,
    guest_host: str,
    connect_timeout: float,
    name: str,
    client: trio.SocketStream,
) -> None:
    """Forward one accepted connection; never raises (its failures are logged)."""
    try:
        try:
            guest = await relay.open_tcp_stream(guest_port, guest_host, timeout=connect_timeout)
        except (MachineError, OSError) as exc:
            log.info("%s: %s", name, exc)
            _reset(client)
            return
        async with guest, trio.open_nursery() as pumps:
            broken: list[BaseException] = []
            pumps.start_soon(_pump, client, guest, pumps.cancel_scope, broken)
            pumps.start_soon(_pump, guest, client, pumps.cancel_scope, broken)
        if broken:
            log.info("%s: a connection broke: %s", name, broken[0])
            _reset(client)
    except Exception as exc:  # a connection must never end the forwarding
        log.warning("%s: %r", name, exc)
        _reset(client)
    finally:
        client.socket.close()


async def _pump(
    source: trio.abc.HalfCloseableStream,
    sink: trio.abc.HalfCloseableStream,
    both: trio.CancelScope,
    broken: list[BaseException],
) -> None:
    """Copy ``source`` to ``sink`` and pass its end of data on; on a failure on either side
    note it and stop both directions."""
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, MachineError, OSError) as exc:
        broken.append(exc)
        both.cancel()


def _reset(client: trio.SocketStream) -> None:
    """Make the host side see a reset when the socket closes (linger on, timeout 0)."""
    with contextlib.suppress(OSError):  # already closed
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
