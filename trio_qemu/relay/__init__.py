"""TCP into the guest with no host port, through a relay on a virtio-serial channel.

A machine launched with ``relay=True`` (the tiny guest's ``config()`` sets it when the guest
has the relay) gets a virtio-serial port of its own, ``org.trio-qemu.relay``, on a
socketpair chardev like the guest shell's. In the guest, ``/bin/trio-relay`` (a small C
program built with the tiny guest, started and restarted by init) serves it: it makes TCP
connections and runs commands for the host, any number at once, each a stream with its own
flow control. On the host, :class:`Relay` is that channel's end; the machine's
:meth:`~trio_qemu.Machine.open_tcp_stream`, :meth:`~trio_qemu.Machine.forward_port`,
:meth:`~trio_qemu.Machine.wait_for_open_port` and the shell's ``copy_to``/``copy_from``
are built on it. The wire format, both ends, is described in ``relay/_protocol.py``.
"""

from .._util import publish as _publish
from ._relay import Relay as Relay
from ._stream import GuestProcess as GuestProcess
from ._stream import GuestStream as GuestStream

__all__ = ["GuestProcess", "GuestStream", "Relay"]

_publish(__name__, globals(), __all__)
