"""Guest TCP on a running machine: streams, forwarded ports, port waits.

:class:`GuestPorts` is mixed into :class:`~trio_qemu.Machine`.
"""

from __future__ import annotations

__all__ = ["GuestPorts"]


class GuestPorts:
    """``open_tcp_stream``, ``forward_port`` and ``wait_for_open_port`` of a machine."""
