"""A point-to-point :class:`Link`: two machines on one datagram socketpair, QEMU to QEMU."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Self

from .._errors import NetworkError
from .._util import protected_asynccontextmanager
from ._base import _Network

__all__ = ["Link"]


class Link(_Network):
    """Two machines joined by one datagram socketpair, QEMU to QEMU.

    ``link.attach(config_a)`` and ``link.attach(config_b)`` give each config one end; a third
    attach raises ValueError. Nothing runs in this process: frames never pass through it, so
    a link adds no latency (a 1.6 ms median ping round trip under TCG here, the guests' own
    cost). Its only control is QEMU's ``set_link`` (:meth:`set_nic_link`). When one QEMU
    exits the other keeps running with its carrier up; its frames then go nowhere.

    ``name`` is the netdev id in both QEMUs and seeds the MACs; a machine on two links needs
    two names. Use it as ``with Link() as link:``, ``async with Link().running() as link:``
    or call :meth:`close`: our copies of the ends are closed on leaving, on every path.
    """

    def __init__(self, name: str = "link") -> None:
        super().__init__(name)
        self._ends: list[socket.socket] = []

    def _check_before_end(self, name: str) -> None:
        if len(self._attachments) >= 2:
            raise ValueError(
                f"{self.name}: a link joins two machines ({', '.join(self._attachments)}); "
                "use a Switch for more"
            )

    def _new_end(self, name: str) -> socket.socket:
        if not self._ends:
            self._ends = list(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
        end = self._ends[len(self._attachments)]
        if end.fileno() < 0:
            raise NetworkError(f"{self.name}: the link's second end was closed by a failed attach")
        return end

    def _drop_end(self, name: str) -> None:
        if not self._attachments:  # the pair was made for this attach: drop both ends
            for end in self._ends:
                end.close()
            self._ends = []

    def close(self) -> None:
        super().close()
        for end in self._ends:
            end.close()  # an end never attached (a link with one machine)
        self._ends = []

    @protected_asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """The link for the block; closed on leaving (a link has no task to run, this is
        for symmetry with :meth:`Switch.running`)."""
        with self:
            yield self

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Link {self.name!r} {state} {' <-> '.join(self._attachments) or '(empty)'}>"
