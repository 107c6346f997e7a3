"""Networks between virtual machines: a point-to-point :class:`Link` and a :class:`Switch`.

Both need no root, no TAP device, no port and no path. Every NIC is backed by one end of an
``AF_UNIX``/``SOCK_DGRAM`` socketpair that QEMU inherits (``MachineConfig.inherit_fds``) and
names in ``-netdev dgram,id=ID,local.type=fd,local.str=FD``; on such a socket one datagram
is exactly one Ethernet frame (no FCS, no length prefix). QEMU 7.2 also takes a SOCK_STREAM
end (``-netdev stream,server=off,addr.type=fd,...``, frames with a 4-byte length prefix);
both carried ping here, and datagrams were chosen because the kernel keeps the frame
boundaries and because a link and a switch port are then the same thing.

- A :class:`Link` joins exactly two machines with one socketpair: frames go from QEMU to
  QEMU, nothing in between (this process holds no end once the machines run).
- A :class:`Switch` gives every machine a socketpair to a Trio task in this process, which
  learns source MACs, forwards unicast frames to the learned port and floods broadcast,
  multicast and unknown destinations. Because it is ours, a test can partition the network
  (:meth:`Switch.partition`, :meth:`Switch.heal`), lose or delay frames per link
  (:meth:`Switch.set_loss`, :meth:`Switch.set_delay`), pull a cable
  (:meth:`Switch.set_link`) and capture every frame into a pcap file
  (:meth:`Switch.start_capture`) that tshark and Wireshark open.

A scenario::

    from trio_qemu.network import Switch, ping

    image = await trio_qemu.ensure_guest()
    async with Switch().running() as switch:
        a = switch.attach(image.config(name="a"), ip="10.0.0.1/24")
        b = switch.attach(image.config(name="b"), ip="10.0.0.2/24")
        c = switch.attach(image.config(name="c"), ip="10.0.0.3/24")
        async with switch.open_machines(a, b, c) as (va, vb, vc):
            await va.shell.wait_ready()
            switch.partition({"a", "b"}, {"c"})
            assert not (await ping(va, "10.0.0.3", count=2, wait=1)).ok
            switch.heal()

:meth:`attach <Switch.attach>` returns a copy of the machine's config with the NIC added
(a deterministic MAC derived from the network's and the machine's names) and, with ``ip=``,
the kernel command-line hook ``trio.ip=ADDR/PREFIX`` that the tiny guest's ``/init``
(:mod:`trio_qemu.guest`) applies at boot, so no DHCP is needed.

**Clones** (:mod:`trio_qemu.snapshot`) join a network with their own identity. A guest
reads its MAC, address and host name when it boots, and a clone did not boot: it resumes
the template's guest, whose NIC, and the command line a clone must keep, were the
template's. So the template is made with the network's NIC but no address
(:meth:`attach_template <Switch.attach_template>`), :meth:`attach <Switch.attach>` plugs
each clone's config into that NIC (only the socket's fd number changes) and remembers
the clone's MAC, address and host name, and :meth:`open_clones <Switch.open_clones>` sets
them in the guest right after the restore, in the same guest command as the clock and
the RNG seed::

    async with Switch("lab").running() as switch:
        template = await ensure_template(switch.attach_template(image.config(memory=256)))
        configs = [switch.attach(template.config(name=f"c{i}"), ip=f"10.0.0.{i + 1}/24")
                   for i in range(8)]
        async with switch.open_clones(template, *configs) as vms:
            assert (await ping(vms[0], "10.0.0.8")).ok

The identity (:meth:`identity_command <Switch.identity_command>`, one guest command of 4-5
processes) takes the interface down if it is up (its routes, neighbours and IPv6 addresses
go), flushes its addresses, sets the MAC and brings it up (virtio-net tells QEMU through
its control queue, so QEMU's receive filter and ``query-rx-filter``'s ``main-mac``
follow; e1000 through its receive-address registers), adds the address and the default
route, sets the host name (default: the machine's name) and sends one unsolicited ARP
(busybox ``arping -U``) so that neighbours and the switch learn the MAC at once.

Limits: the NIC's ``mac=`` in QEMU's command line stays the template's (the MAC the
guest uses is in ``query-rx-filter``, for virtio-net); the guest needs busybox-like
``ip`` and a shell or the agent; an e1000 NIC takes 1-3 s to get its carrier after
coming up (:func:`wait_carrier`), and an IPv6 address goes through duplicate address
detection (~1 s), as at boot; the template's network name is part of its command line,
so its clones join networks of that name; whatever the template's guest derived from its
network identity during ``prepare`` (a service bound to an address, a file holding the
host name) stays the template's. Restores set QEMU's ``announce-rounds`` to 0, so a
clone never announces the template's MAC.

**File descriptors.** Each attach creates a socketpair now (the config must name the fd
QEMU inherits); until the machine has started, this process holds QEMU's end as well. Those
copies are closed by :meth:`release <Switch.release>` (called for you by
:meth:`open_machines <Switch.open_machines>` once the machines run) and in any case when the
network is closed: on leaving :meth:`running <Switch.running>` or a ``with`` block, or by
:meth:`close <Switch.close>`, on every path (return, error, launch failure, cancellation).
Attach inside ``running()`` and nothing can leak.

**Bounds.** The switch holds at most one frame per port at a time outside its delay line;
it never waits to send: a frame for a peer whose socket buffer is full is dropped and
counted (:class:`PortStats`), as a real switch drops on a full egress queue. The delay line
holds at most ``max_delayed`` frames and ``max_delayed_bytes`` bytes, the MAC table
``mac_table_size`` entries, and a capture file ``max_bytes`` bytes. Everything else is in
the kernel's socket buffers (about 212 KiB per direction per port).

Guest-side helpers run over the tiny guest's shell channel (``vm.shell``) and bound every
wait inside the guest: :func:`ping` (parses busybox's summary), :func:`wait_carrier`
(polls ``/sys/class/net/IFACE/carrier`` in the guest; an e1000 NIC takes 1-3 s to get
carrier, virtio-net has it at once) and :func:`set_nic_link` (QEMU's own ``set_link``).

The package's modules: ``addressing`` (MACs, IP hooks, port
references), ``link``, ``switch``,
``pcap`` (capture files) and ``guest`` (the
helpers that act on a running machine). Import from ``trio_qemu.network`` itself.
"""

from .._errors import NetworkError, NetworkTimeout
from .._util import publish as _publish
from ._base import DEFAULT_NIC, IDENTITY_TIMEOUT
from .addressing import PortRef, mac_address, with_ip
from .guest import PingResult, parse_ping, ping, set_nic_link, wait_carrier
from .link import Link
from .pcap import PcapRecord, PcapWriter, read_pcap
from .switch import Direction, PortStats, Switch

__all__ = [
    "DEFAULT_NIC",
    "IDENTITY_TIMEOUT",
    "Direction",
    "Link",
    "NetworkError",
    "NetworkTimeout",
    "PcapRecord",
    "PcapWriter",
    "PingResult",
    "PortRef",
    "PortStats",
    "Switch",
    "mac_address",
    "parse_ping",
    "ping",
    "read_pcap",
    "set_nic_link",
    "wait_carrier",
    "with_ip",
]

_publish(__name__, globals(), __all__)
