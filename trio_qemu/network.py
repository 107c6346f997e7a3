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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import ipaddress
import itertools
import logging
import math
import os
import random
import re
import shlex
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self, TypeAlias

import trio

from ._config import MachineConfig
from ._errors import NetworkError, NetworkTimeout
from ._machine import Machine, open_machines
from ._pcap import DEFAULT_MAX_BYTES, DEFAULT_SNAPLEN, PcapRecord, PcapWriter, read_pcap

__all__ = [
    "DEFAULT_NIC",
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

log = logging.getLogger("trio_qemu.network")

DEFAULT_NIC: Final = "virtio-net-pci"
"""The NIC model :meth:`Switch.attach` and :meth:`Link.attach` give a machine by default
(virtio-net has carrier at once; ``e1000`` also works, and takes 1-3 s to get carrier)."""

PortRef: TypeAlias = str | Machine | MachineConfig
"""How a port or an attached machine is named in the methods below: by its name, or by the
machine or config carrying that name."""

Direction: TypeAlias = Literal["both", "in", "out"]
"""Which way across a switch port a loss or delay setting applies: ``"in"`` is from the
machine into the switch, ``"out"`` from the switch to the machine."""

#: QEMU ids: a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_MAC: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
#: The largest frame QEMU's dgram netdev sends (NET_BUFSIZE: 4096 + 65536).
_MAX_FRAME: Final = 69632
#: Frames read from one port before the port task lets the others run.
_RECEIVE_BATCH: Final = 64
#: An Ethernet header: destination, source, EtherType.
_ETH_HEADER: Final = 14
#: How often the guest checks the carrier while :func:`wait_carrier` waits (seconds).
_CARRIER_POLL: Final = 0.05
#: Extra time a guest command gets beyond its own bound before ``vm.shell.run`` gives up.
_SHELL_MARGIN: Final = 10.0


# --- helpers for configs ---------------------------------------------------------------------


def mac_address(*parts: str) -> str:
    """A deterministic, locally administered unicast MAC (``02:xx:xx:xx:xx:xx``) for
    ``parts`` (e.g. the network's and the machine's names): the first 5 bytes of their
    SHA-256. The same names give the same MAC on every run, so captures and ARP tables are
    reproducible."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])


def with_ip(
    config: MachineConfig,
    ip: str,
    *,
    iface: str = "eth0",
    gateway: str | None = None,
    hostname: str | None = None,
) -> MachineConfig:
    """``config`` with the tiny guest's network hooks added to its kernel command line.

    ``ip`` is ``ADDR/PREFIX`` (``"10.0.0.1/24"``, IPv6 too); the guest's ``/init`` brings
    ``iface`` up and adds the address before it prints its ready marker, so the address is
    there when ``vm.shell.wait_ready()`` returns. ``gateway`` becomes the default route and
    ``hostname`` the guest's host name. The hook configures one interface per guest: a
    config whose command line already has ``trio.ip=`` is refused (configure more interfaces
    with ``vm.shell.run("ip addr add ...")``).

    Raises ValueError for a malformed address, a config that boots no kernel (only a kernel
    command line carries the hooks), or a second ``trio.ip=``.
    """
    if "/" not in ip:
        raise ValueError(f"ip must be ADDR/PREFIX (e.g. '10.0.0.1/24'), not {ip!r}")
    interface = ipaddress.ip_interface(ip)
    if config.kernel is None:
        raise ValueError(
            "with_ip needs a config that boots a kernel: the guest's /init reads trio.ip= from "
            "the kernel command line (use trio_qemu.guest's image.config())"
        )
    append = config.append or ""
    if re.search(r"(?:^|\s)trio\.ip=", append):
        raise ValueError(
            f"{config.name or 'the config'}: its kernel command line already sets trio.ip= "
            "(the hook configures one interface); add more addresses with "
            "vm.shell.run('ip addr add ADDR/PREFIX dev IFACE')"
        )
    hooks = [f"trio.ip={interface.with_prefixlen}"]
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,15}", iface):
        raise ValueError(f"iface must be an interface name like 'eth0', not {iface!r}")
    if iface != "eth0":
        hooks.append(f"trio.iface={iface}")
    if gateway is not None:
        hooks.append(f"trio.gw={ipaddress.ip_address(gateway)}")
    if hostname is not None:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,63}", hostname):
            raise ValueError(f"hostname must be letters, digits, '.' and '-', not {hostname!r}")
        hooks.append(f"trio.hostname={hostname}")
    return config.replace(append=" ".join(part for part in (append, *hooks) if part))


def _port_name(ref: PortRef) -> str:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, Machine):
        return ref.name
    if isinstance(ref, MachineConfig):
        if ref.name is None:
            raise ValueError("a MachineConfig without a name names no port")
        return ref.name
    raise TypeError(f"expected a port name, a Machine or a MachineConfig, not {ref!r}")


def _netdev_ids(args: Sequence[str]) -> set[str]:
    """The ids of the ``-netdev`` options in ``args``."""
    ids: set[str] = set()
    for option, value in itertools.pairwise(args):
        if option in ("-netdev", "--netdev"):
            for item in value.split(","):
                if item.startswith("id="):
                    ids.add(item[3:])
    return ids


def _nic_count(args: Sequence[str]) -> int:
    """How many ``-device ...,netdev=...`` NICs ``args`` already has (the next is eth<N>)."""
    return sum(
        1
        for option, value in itertools.pairwise(args)
        if option in ("-device", "--device") and ",netdev=" in value
    )


@dataclass
class _Attachment:
    """A machine attached to a network: what its NIC looks like and our copy of its fd."""

    name: str
    mac: str
    netdev_id: str
    device_id: str
    iface: str
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    #: our copy of the end QEMU inherits; None once released
    qemu_end: socket.socket | None


class _Network:
    """What :class:`Link` and :class:`Switch` share: attaching machines and fd ownership."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _QEMU_ID.match(name):
            raise ValueError(
                f"a network's name is also a QEMU id: a letter, then letters, digits, '-', "
                f"'.', '_'; not {name!r}"
            )
        self.name = name
        self._attachments: dict[str, _Attachment] = {}
        self._macs: set[str] = set()
        self._closed = False

    # -- attaching -----------------------------------------------------------------------
    def attach(
        self,
        config: MachineConfig,
        *,
        ip: str | None = None,
        mac: str | None = None,
        nic: str = DEFAULT_NIC,
        iface: str | None = None,
        gateway: str | None = None,
    ) -> MachineConfig:
        """A copy of ``config`` with a NIC on this network (and its address, with ``ip``).

        The machine is known by ``config.name`` (required: it names the port and seeds the
        MAC). Adds ``-netdev dgram,id=NAME,local.type=fd,local.str=FD`` (``NAME`` is this
        network's name) and ``-device NIC,netdev=NAME,id=NAME-nic,mac=MAC`` to ``args`` and
        the fd to ``inherit_fds``. ``nic`` is the device model, optionally with properties
        (``"e1000"``, ``"virtio-net-pci,mq=on"``). ``mac`` defaults to :func:`mac_address` of
        the network's and the machine's names. ``ip`` (``ADDR/PREFIX``) and ``gateway`` go through
        :func:`with_ip` for interface ``iface``, by default ``eth<N>`` where N counts the NICs
        ``config`` already has.

        Creates the socketpair now: launch the config before the network is closed, and let
        :meth:`release` or :meth:`open_machines` close our copy of QEMU's end once it runs.
        Raises ValueError for a config without a name, a name already attached, a config
        already on a network of this name, a bad MAC or address.
        """
        self._check_open()
        name = config.name
        if not name:
            raise ValueError(
                "attach needs a named config (e.g. image.config(name='a')): the name "
                "identifies the machine's port and seeds its MAC"
            )
        if name in self._attachments:
            raise ValueError(f"{self.name}: a machine named {name!r} is already attached")
        if self.name in _netdev_ids(config.args):
            raise ValueError(
                f"{name}: the config already has a netdev {self.name!r}; give each network a "
                "machine joins its own name"
            )
        if mac is None:
            mac = self._unique_mac(name)
        else:
            mac = mac.lower().replace("-", ":")
            if not _MAC.match(mac) or int(mac[:2], 16) & 1:
                raise ValueError(f"mac must be a unicast MAC like 02:00:00:00:00:01, not {mac!r}")
            if mac in self._macs:
                raise ValueError(f"{self.name}: MAC {mac} is already in use")
        if not isinstance(nic, str) or not re.match(r"[A-Za-z][A-Za-z0-9_-]*(,|\Z)", nic):
            raise ValueError(f"nic must be a NIC model like 'virtio-net-pci', not {nic!r}")
        chosen_iface = iface if iface is not None else f"eth{_nic_count(config.args)}"
        interface = None
        if ip is not None:
            # Validate before any socket exists, so a refusal leaves nothing behind.
            with_ip(config, ip, iface=chosen_iface, gateway=gateway)
            interface = ipaddress.ip_interface(ip)
        elif gateway is not None:
            raise ValueError("gateway= needs ip=")
        self._check_before_end(name)

        qemu_end = self._new_end(name)
        try:
            fd = qemu_end.fileno()
            netdev_id = self.name
            device_id = f"{self.name}-nic"
            new = config.replace(
                args=[
                    *config.args,
                    "-netdev",
                    f"dgram,id={netdev_id},local.type=fd,local.str={fd}",
                    "-device",
                    f"{nic},netdev={netdev_id},id={device_id},mac={mac}",
                ],
                inherit_fds=[*config.inherit_fds, fd],
            )
            if ip is not None:
                new = with_ip(new, ip, iface=chosen_iface, gateway=gateway)
        except BaseException:
            self._drop_end(name)
            qemu_end.close()
            raise
        self._macs.add(mac)
        self._attachments[name] = _Attachment(
            name, mac, netdev_id, device_id, chosen_iface, interface, qemu_end
        )
        log.debug("%s: attached %s (mac %s, fd %d)", self.name, name, mac, fd)
        return new

    def _unique_mac(self, name: str) -> str:
        for salt in itertools.count():
            parts = (self.name, name) if salt == 0 else (self.name, name, str(salt))
            mac = mac_address(*parts)
            if mac not in self._macs:
                return mac
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_before_end(self, name: str) -> None:
        """Refuse an attach before any socket is made (a full link)."""

    def _new_end(self, name: str) -> socket.socket:
        """Make the socket QEMU inherits for machine ``name`` (and our side of it)."""
        raise NotImplementedError

    def _drop_end(self, name: str) -> None:
        """Undo :meth:`_new_end` for an attach that failed afterwards."""

    # -- what was attached -----------------------------------------------------------------
    @property
    def machines(self) -> list[str]:
        """The names of the attached machines, in attach order."""
        return list(self._attachments)

    def _attachment(self, ref: PortRef) -> _Attachment:
        name = _port_name(ref)
        try:
            return self._attachments[name]
        except KeyError:
            raise KeyError(
                f"{self.name}: no machine {name!r} is attached (attached: "
                f"{', '.join(self._attachments) or 'none'})"
            ) from None

    def mac(self, machine: PortRef) -> str:
        """The MAC address of ``machine``'s NIC on this network."""
        return self._attachment(machine).mac

    def address(self, machine: PortRef) -> str:
        """The IP address (without prefix) given to ``machine`` with ``attach(ip=...)``.

        Raises KeyError when it was attached without ``ip``.
        """
        interface = self._attachment(machine).ip
        if interface is None:
            raise KeyError(f"{self.name}: {_port_name(machine)} was attached without ip=")
        return str(interface.ip)

    def nic_id(self, machine: PortRef) -> str:
        """The QEMU device id of ``machine``'s NIC on this network (for ``set_link``)."""
        return self._attachment(machine).device_id

    def iface(self, machine: PortRef) -> str:
        """The guest interface name this network's NIC is expected to get (``eth<N>``)."""
        return self._attachment(machine).iface

    async def set_nic_link(
        self, machine: Machine, up: bool, *, timeout: float | None = None
    ) -> None:
        """QEMU's own ``set_link`` on ``machine``'s NIC on this network (see
        :func:`set_nic_link`): the guest sees its carrier go down or up."""
        await set_nic_link(machine, self.nic_id(machine), up, timeout=timeout)

    # -- file descriptors -------------------------------------------------------------------
    def release(self, *machines: PortRef) -> None:
        """Close our copies of the fds the named machines' QEMUs inherited (all when none
        are named); idempotent.

        Call it once those machines have started: QEMU then holds its own copy, and ours
        only keeps the socket alive after QEMU exits. :meth:`open_machines` calls it for
        you; closing the network does it in any case.
        """
        targets = (
            [self._attachment(ref) for ref in machines]
            if machines
            else list(self._attachments.values())
        )
        for attachment in targets:
            if attachment.qemu_end is not None:
                attachment.qemu_end.close()
                attachment.qemu_end = None

    @asynccontextmanager
    async def open_machines(self, *configs: MachineConfig) -> AsyncIterator[list[Machine]]:
        """:func:`trio_qemu.open_machines` that releases these configs' fds once all the
        machines have started (see :meth:`release`). Launch errors, timeouts and teardown
        are exactly those of :func:`trio_qemu.open_machines`."""
        self._check_open()
        async with open_machines(*configs) as machines:
            self.release(*(config for config in configs if config.name in self._attachments))
            yield machines

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (the network cannot be used any more)."""
        return self._closed

    def close(self) -> None:
        """Close every fd this network holds; idempotent. Machines already running keep
        their NICs (a switch stops forwarding, so their frames go nowhere)."""
        self._closed = True
        self.release()

    def _check_open(self) -> None:
        if self._closed:
            raise NetworkError(f"{self.name}: the network is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- a point-to-point link ---------------------------------------------------------------------


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

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """The link for the block; closed on leaving (a link has no task to run, this is
        for symmetry with :meth:`Switch.running`)."""
        with self:
            yield self

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Link {self.name!r} {state} {' <-> '.join(self._attachments) or '(empty)'}>"


# --- the switch ------------------------------------------------------------------------------


@dataclass
class PortStats:
    """Counters of one switch port. ``rx`` is from the machine, ``tx`` to it.

    Each dropped frame is counted once, on the port where it was stopped: a frame lost or
    refused on its way in counts on the port it came from, one refused on its way out on
    the port it was going to.
    """

    rx_frames: int = 0
    """Frames received from the port's peer (before any drop)."""
    rx_bytes: int = 0
    """Their bytes."""
    tx_frames: int = 0
    """Frames delivered to the peer's socket."""
    tx_bytes: int = 0
    """Their bytes."""
    dropped_down: int = 0
    """Frames from or to this port while it was down (:meth:`Switch.set_link`)."""
    dropped_loss: int = 0
    """Frames this link lost on purpose (:meth:`Switch.set_loss`), either way."""
    dropped_partition: int = 0
    """Unicast frames for this port that a partition stopped (floods simply skip it)."""
    dropped_full: int = 0
    """Frames for this port dropped because its peer's socket buffer was full: the switch
    never waits to send."""
    dropped_delay: int = 0
    """Frames for this port dropped because the delay line was full."""
    dropped_error: int = 0
    """Frames too short to be Ethernet, and frames the peer could not take (it is gone)."""

    @property
    def dropped(self) -> int:
        """All the frames dropped at this port."""
        return (
            self.dropped_down
            + self.dropped_loss
            + self.dropped_partition
            + self.dropped_full
            + self.dropped_delay
            + self.dropped_error
        )


class _Port:
    """One switch port: our end of the socketpair, its state and its counters."""

    __slots__ = (
        "closed",
        "group",
        "in_delay",
        "in_loss",
        "name",
        "out_delay",
        "out_loss",
        "sock",
        "stats",
        "up",
    )

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.stats = PortStats()
        self.up = True
        #: ports forward to each other only within the same group (0: everyone, healed)
        self.group = 0
        self.in_loss = 0.0
        self.out_loss = 0.0
        self.in_delay = 0.0
        self.out_delay = 0.0
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # Outside trio.run (RuntimeError) nobody can be waiting on the socket.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class Switch(_Network):
    """A learning Ethernet switch running as Trio tasks in this process.

    Every attached machine (:meth:`attach`) or Python peer (:meth:`add_port`) gets a port: a
    datagram socketpair whose other end the peer holds. While :meth:`run` runs (use
    :meth:`running`), one task per port reads frames and forwards each at once: it learns
    the source MAC (a table of at most ``mac_table_size`` entries, oldest evicted), sends a
    unicast frame to the port its destination was learned on and floods broadcast,
    multicast and unknown destinations to every other port, all within the sender's
    partition group, skipping ports that are down. Sends never block: a frame for a full
    peer is dropped and counted (:class:`PortStats`). Frames from the port they would go
    back out of are filtered.

    Controls take effect at once, also for frames already in the delay line:
    :meth:`partition`/:meth:`heal`, :meth:`set_loss` (a probability per link and direction,
    drawn from ``random.Random(seed)`` so a seeded test is repeatable), :meth:`set_delay`
    (a delay line bounded by ``max_delayed`` frames and ``max_delayed_bytes`` bytes; past
    that, frames are dropped and counted), :meth:`set_link` (a pulled cable, seen only by
    the switch: the guest keeps its carrier; for that use :meth:`set_nic_link`) and
    :meth:`start_capture` (every frame the switch receives, into a classic pcap file;
    ``pcap=`` starts one when the switch starts).

    Measured here (2 cores, TCG guests): ping between two guests has a median round trip of
    2.1 ms through the switch and 1.6 ms over a :class:`Link` (the guests dominate); between
    Python peers the switch adds ~11 us per frame, and one flooding it moves ~125,000
    frames/s (~95,000 while capturing to pcap).

    ``name`` is the netdev id in every attached QEMU and seeds the MACs. Ports may be added
    before or while the switch runs. A switch runs once: leaving :meth:`running` (or
    :meth:`close`) closes every port; machines still running then lose their network.
    """

    def __init__(
        self,
        name: str = "switch",
        *,
        seed: int | None = None,
        max_delayed: int = 1024,
        max_delayed_bytes: int = 16 << 20,
        mac_table_size: int = 1024,
        pcap: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(name)
        for field, value in (
            ("max_delayed", max_delayed),
            ("max_delayed_bytes", max_delayed_bytes),
            ("mac_table_size", mac_table_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, not {value!r}")
        self.max_delayed = max_delayed
        self.max_delayed_bytes = max_delayed_bytes
        self.mac_table_size = mac_table_size
        self._random = random.Random(seed)
        self._ports: dict[str, _Port] = {}
        self._port_list: list[_Port] = []
        self._table: OrderedDict[bytes, _Port] = OrderedDict()
        self._groups = itertools.count(1)
        #: the delay line: (due time, sequence, source port, target port, frame)
        self._delayed: list[tuple[float, int, _Port, _Port, bytes]] = []
        self._delayed_bytes = 0
        self._sequence = itertools.count()
        self._delay_changed = trio.Event()
        self._capture: PcapWriter | None = None
        self._pcap_path = pcap
        self._nursery: trio.Nursery | None = None
        self._run_scope: trio.CancelScope | None = None
        self._started = False

    # -- ports -------------------------------------------------------------------------------
    def _new_end(self, name: str) -> socket.socket:
        return self._add_port(name)

    def _drop_end(self, name: str) -> None:
        port = self._ports.pop(name, None)
        if port is not None:
            self._port_list.remove(port)
            port.close()

    def add_port(self, name: str) -> socket.socket:
        """A port for a Python peer: returns the peer's end (a blocking ``SOCK_DGRAM``
        socket; one datagram sent or received is one Ethernet frame). The caller owns and
        closes it. For tests and tools: inject frames, flood, or listen to a broadcast."""
        self._check_open()
        if name in self._ports:
            raise ValueError(f"{self.name}: a port named {name!r} exists already")
        return self._add_port(name)

    def _add_port(self, name: str) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        port = _Port(name, ours)
        self._ports[name] = port
        self._port_list.append(port)
        if self._nursery is not None:
            self._nursery.start_soon(self._serve, port, name=f"{self.name}.{name}")
        return theirs

    @property
    def ports(self) -> list[str]:
        """The port names (machines and Python peers), in the order they were added."""
        return [port.name for port in self._port_list]

    def _port(self, ref: PortRef) -> _Port:
        name = _port_name(ref)
        try:
            return self._ports[name]
        except KeyError:
            raise KeyError(
                f"{self.name}: no port {name!r} (ports: {', '.join(self._ports) or 'none'})"
            ) from None

    # -- controls ------------------------------------------------------------------------------
    def partition(self, *groups: Collection[PortRef]) -> None:
        """Split the switch: frames flow only between ports of the same group.

        ``switch.partition({"a", "b"}, {"c"})``: a and b reach each other, c reaches no one.
        A port named in no group is cut off from every other port. Replaces any earlier
        partition; frames already in the delay line are checked again when due. Raises
        ValueError for a port named twice, KeyError for an unknown one.
        """
        assignment: dict[str, int] = {}
        for group in groups:
            if isinstance(group, str | Machine | MachineConfig):
                raise TypeError(f"each group must be a collection of ports, not {group!r}")
            group_id = next(self._groups)
            for ref in group:
                port = self._port(ref)
                if port.name in assignment:
                    raise ValueError(f"{self.name}: port {port.name!r} is in two groups")
                assignment[port.name] = group_id
        for port in self._port_list:
            port.group = assignment.get(port.name) or next(self._groups)
        log.info("%s: partition %s", self.name, [sorted(map(_port_name, g)) for g in groups])

    def heal(self) -> None:
        """End any partition: every port reaches every other again, at once."""
        for port in self._port_list:
            port.group = 0
        log.info("%s: healed", self.name)

    def set_loss(self, port: PortRef, loss: float, *, direction: Direction = "both") -> None:
        """Lose each frame crossing ``port``'s link in ``direction`` with probability
        ``loss`` (0 to 1). With ``"both"`` a round trip through one lossy link survives with
        probability ``(1 - loss) ** 2``. Draws come from the switch's seeded RNG."""
        if not (isinstance(loss, int | float) and 0.0 <= loss <= 1.0):
            raise ValueError(f"loss must be a probability between 0 and 1, not {loss!r}")
        target = self._port(port)
        _check_direction(direction)
        if direction in ("both", "in"):
            target.in_loss = float(loss)
        if direction in ("both", "out"):
            target.out_loss = float(loss)

    def set_delay(self, port: PortRef, delay: float, *, direction: Direction = "both") -> None:
        """Delay each frame crossing ``port``'s link in ``direction`` by ``delay`` seconds
        (0 for none). A frame's delay is its source link's ``"in"`` plus its target link's
        ``"out"`` delay, so ``delay=0.1`` on one port adds 0.2 s to a ping's round trip
        through it. Delayed frames wait in the bounded delay line (see the class)."""
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        target = self._port(port)
        _check_direction(direction)
        if direction in ("both", "in"):
            target.in_delay = float(delay)
        if direction in ("both", "out"):
            target.out_delay = float(delay)

    def set_link(self, port: PortRef, up: bool) -> None:
        """Pull (``up=False``) or plug back in ``port``'s cable at the switch: frames from
        and to it are dropped (and counted) while it is down, and the MACs learned on it are
        forgotten. The guest still sees its carrier; :meth:`set_nic_link` is QEMU's own
        link state, which the guest does see."""
        target = self._port(port)
        target.up = bool(up)
        if not up:
            for mac in [mac for mac, where in self._table.items() if where is target]:
                del self._table[mac]
        log.info("%s: port %s %s", self.name, target.name, "up" if up else "down")

    def stats(self, port: PortRef) -> PortStats:
        """A snapshot of ``port``'s counters."""
        return dataclasses.replace(self._port(port).stats)

    def all_stats(self) -> dict[str, PortStats]:
        """Snapshots of every port's counters, by port name."""
        return {port.name: dataclasses.replace(port.stats) for port in self._port_list}

    @property
    def delayed(self) -> int:
        """Frames waiting in the delay line now (at most ``max_delayed``)."""
        return len(self._delayed)

    @property
    def delayed_bytes(self) -> int:
        """Bytes waiting in the delay line now (at most ``max_delayed_bytes``)."""
        return self._delayed_bytes

    @property
    def mac_table(self) -> dict[str, str]:
        """The learned MACs (``aa:bb:...``) and the ports they were learned on."""
        return {mac.hex(":"): port.name for mac, port in self._table.items()}

    # -- capture --------------------------------------------------------------------------------
    def start_capture(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> PcapWriter:
        """Write every frame the switch receives from now on into a classic pcap file at
        ``path`` (replacing a running capture). A frame is recorded once, when it arrives
        at the switch, whether or not it is then forwarded; frames a down port or an
        incoming loss setting stopped never arrived and are not recorded.

        The file is written synchronously and unbuffered (complete at every moment) and
        bounded by ``max_bytes``; see :class:`~trio_qemu.network.PcapWriter`, which this
        returns (its ``frames`` and ``not_captured`` count what happened). It is closed by
        :meth:`stop_capture` or when the switch closes.
        """
        self._check_open()
        writer = PcapWriter(path, snaplen=snaplen, max_bytes=max_bytes)
        self.stop_capture()
        self._capture = writer
        return writer

    def stop_capture(self) -> PcapWriter | None:
        """Stop and close the capture, if any; return its writer (with its counters)."""
        writer, self._capture = self._capture, None
        if writer is not None:
            writer.close()
        return writer

    @property
    def capture(self) -> PcapWriter | None:
        """The running capture, if any."""
        return self._capture

    # -- running --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward frames until cancelled (``await nursery.start(switch.run)``); then close
        the switch (every port, the capture). Returns early if :meth:`close` is called.

        Starts the ``pcap=`` capture, if one was given, before reporting started. Raises
        NetworkError if the switch ran or was closed before.
        """
        self._check_open()
        if self._started:
            raise NetworkError(f"{self.name}: a switch runs only once")
        self._started = True
        try:
            if self._pcap_path is not None:
                self.start_capture(self._pcap_path)
            with trio.CancelScope() as self._run_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._delay_line, name=f"{self.name}.delay")
                    for port in self._port_list:
                        nursery.start_soon(self._serve, port, name=f"{self.name}.{port.name}")
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Run the switch for the block; on leaving (any way), stop it and close every fd.

        ``async with Switch().running() as switch:`` then attach and launch inside.
        """
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                # Errors are re-raised below, outside the nursery, so that the caller sees
                # them as they are, not wrapped in an ExceptionGroup.
                try:
                    await nursery.start(self.run)
                except BaseException as exc:  # e.g. the pcap file cannot be created
                    error = exc
                else:
                    try:
                        yield self
                    except BaseException as exc:
                        error = exc
                nursery.cancel_scope.cancel()
        finally:
            self.close()
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop forwarding and close every port, Python peers' included (their ends then
        see their sends refused), and the capture; idempotent."""
        super().close()
        if self._run_scope is not None:
            self._run_scope.cancel()
        for port in self._port_list:
            port.close()
        self.stop_capture()
        self._delayed.clear()
        self._delayed_bytes = 0
        self._table.clear()

    # -- forwarding -------------------------------------------------------------------------------
    async def _serve(self, port: _Port) -> None:
        """Read ``port``'s frames (a batch at a time, then let others run) and forward each."""
        buffer = bytearray(_MAX_FRAME)
        view = memoryview(buffer)
        sock = port.sock
        try:
            while not port.closed:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(_RECEIVE_BATCH):
                    try:
                        size = sock.recv_into(buffer)
                    except BlockingIOError:
                        break
                    self._ingress(port, bytes(view[:size]))
        except (trio.ClosedResourceError, OSError) as exc:
            if not port.closed:
                log.warning("%s: port %s stopped: %r", self.name, port.name, exc)

    def _ingress(self, port: _Port, frame: bytes) -> None:
        """Decide a received frame's fate; send it or queue it. Never waits."""
        stats = port.stats
        stats.rx_frames += 1
        stats.rx_bytes += len(frame)
        if not port.up:
            stats.dropped_down += 1
            return
        if len(frame) < _ETH_HEADER:
            stats.dropped_error += 1
            return
        if port.in_loss and self._random.random() < port.in_loss:
            stats.dropped_loss += 1
            return
        if self._capture is not None:
            self._capture.write(frame)
        source = frame[6:12]
        if not source[0] & 1 and self._table.get(source) is not port:
            self._table[source] = port
            self._table.move_to_end(source)
            if len(self._table) > self.mac_table_size:
                self._table.popitem(last=False)
        destination = frame[0:6]
        if destination[0] & 1:
            targets: Iterable[_Port] = self._port_list
        else:
            learned = self._table.get(destination)
            if learned is port:
                return  # the destination is behind the port it came from: filtered
            targets = self._port_list if learned is None else (learned,)
            if learned is not None and learned.group != port.group:
                learned.stats.dropped_partition += 1
                return
        for target in targets:
            if target is port or target.group != port.group:
                continue
            if not target.up:
                target.stats.dropped_down += 1
                continue
            if target.out_loss and self._random.random() < target.out_loss:
                target.stats.dropped_loss += 1
                continue
            delay = port.in_delay + target.out_delay
            if delay > 0:
                self._delay(port, target, frame, delay)
            else:
                self._send(target, frame)

    @staticmethod
    def _send(target: _Port, frame: bytes) -> None:
        try:
            target.sock.send(frame)
        except BlockingIOError:
            target.stats.dropped_full += 1
        except OSError:  # the peer is gone (ECONNREFUSED) or the port was closed
            target.stats.dropped_error += 1
        else:
            target.stats.tx_frames += 1
            target.stats.tx_bytes += len(frame)

    def _delay(self, source: _Port, target: _Port, frame: bytes, delay: float) -> None:
        if (
            len(self._delayed) >= self.max_delayed
            or self._delayed_bytes + len(frame) > self.max_delayed_bytes
        ):
            target.stats.dropped_delay += 1
            return
        due = trio.current_time() + delay
        entry = (due, next(self._sequence), source, target, frame)
        heapq.heappush(self._delayed, entry)
        self._delayed_bytes += len(frame)
        if self._delayed[0] is entry:
            self._delay_changed.set()  # an earlier deadline than the delay line waits for

    async def _delay_line(self) -> None:
        """Deliver delayed frames when due, checking the partition and the target's link
        again at that moment. Waits for the earliest due time or a new earlier frame."""
        while True:
            self._delay_changed = trio.Event()
            if not self._delayed:
                await self._delay_changed.wait()
                continue
            with trio.move_on_at(self._delayed[0][0]):
                await self._delay_changed.wait()
                continue
            now = trio.current_time()
            while self._delayed and self._delayed[0][0] <= now:
                _, _, source, target, frame = heapq.heappop(self._delayed)
                self._delayed_bytes -= len(frame)
                if target.group != source.group:
                    target.stats.dropped_partition += 1
                elif not target.up:
                    target.stats.dropped_down += 1
                elif not target.closed:
                    self._send(target, frame)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._nursery else "stopped")
        return f"<Switch {self.name!r} {state} ports={self.ports}>"


def _check_direction(direction: str) -> None:
    if direction not in ("both", "in", "out"):
        raise ValueError(f"direction must be 'both', 'in' or 'out', not {direction!r}")


# --- helpers that act on machines ------------------------------------------------------------


async def set_nic_link(
    machine: Machine, device: str, up: bool, *, timeout: float | None = None
) -> None:
    """QEMU's ``set_link``: take NIC (or netdev) ``device`` of ``machine`` down or up.

    The guest sees its carrier go away or come back (``/sys/class/net/IFACE/carrier``) and
    QEMU drops what the NIC sends while it is down. ``timeout`` bounds the QMP call
    (default: the machine's ``qmp_timeout``); raises :class:`~trio_qemu.QMPTimeout` then,
    and ``qemu.qmp.ExecuteError`` for an unknown device.
    """
    await machine.cmd("set_link", name=device, up=bool(up), timeout=timeout)


async def wait_carrier(
    machine: Machine, iface: str = "eth0", *, up: bool = True, timeout: float = 10.0
) -> None:
    """Wait until ``iface`` in the guest has (``up=True``) or has lost its carrier.

    The wait runs in the guest as one shell command that reads
    ``/sys/class/net/IFACE/carrier`` every 50 ms at most ``timeout / 0.05`` times (nothing
    sleeps on the host). An e1000 NIC takes 1-3 s to get carrier after boot or
    ``set_link``; virtio-net has it at once. Raises :class:`~trio_qemu.NetworkTimeout` when
    the bound is reached (or the shell call outlives ``timeout`` plus 10 s), and the shell's
    errors (:class:`~trio_qemu.ShellError`) if the guest cannot run it.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,15}", iface):
        raise ValueError(f"iface must be an interface name like 'eth0', not {iface!r}")
    want = "1" if up else "0"
    tries = max(1, math.ceil(timeout / _CARRIER_POLL))
    command = (
        f"i=0; while [ \"$(cat /sys/class/net/{iface}/carrier 2>/dev/null)\" != {want} ]; do "
        f"i=$((i+1)); [ $i -ge {tries} ] && exit 1; sleep {_CARRIER_POLL}; done"
    )
    result = await machine.shell.run(command, timeout=timeout + _SHELL_MARGIN)
    if result.returncode != 0:
        state = "get" if up else "lose"
        raise NetworkTimeout(f"{machine.name}: {iface} did not {state} its carrier in {timeout} s")


@dataclass(frozen=True)
class PingResult:
    """What one guest ``ping`` run reported."""

    transmitted: int
    """Echo requests sent."""
    received: int
    """Echo replies received."""
    rtts: tuple[float, ...]
    """The round-trip time of each reply, in milliseconds, in order."""
    returncode: int
    """ping's exit status: 0 when at least one reply came back (busybox)."""
    output: str
    """ping's full output."""

    @property
    def ok(self) -> bool:
        """Whether every request got its reply."""
        return self.returncode == 0 and self.received == self.transmitted > 0

    @property
    def lost(self) -> int:
        """Requests without a reply."""
        return self.transmitted - self.received


_SUMMARY: Final = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT: Final = re.compile(r"time=([0-9.]+) ms")


def parse_ping(output: str, returncode: int = 0) -> PingResult:
    """Read busybox's (or iputils') ``ping`` output; raise NetworkError without a summary."""
    summary = _SUMMARY.search(output)
    if summary is None:
        raise NetworkError(f"ping printed no summary:\n{output[-2000:]}")
    rtts = tuple(float(value) for value in _RTT.findall(output))
    return PingResult(int(summary[1]), int(summary[2]), rtts, returncode, output)


async def ping(
    machine: Machine,
    address: str,
    *,
    count: int = 3,
    interval: float = 1.0,
    wait: int = 2,
    size: int | None = None,
    timeout: float | None = None,
) -> PingResult:
    """Run ``ping -c COUNT -i INTERVAL -W WAIT [-s SIZE] ADDRESS`` in the guest (busybox).

    ping itself ends ``wait`` seconds after its last request at the latest, so the call is
    bounded by about ``count * interval + wait``; ``timeout`` (default that plus 10 s)
    bounds the shell call, which raises :class:`~trio_qemu.ShellTimeout` after it (the
    ping is killed). Failing pings are a result, not an error: look at :attr:`PingResult.ok`,
    ``received`` and ``returncode``. Raises NetworkError if ping printed no summary (e.g. a
    malformed address).
    """
    ipaddress.ip_address(address)  # only addresses: no shell metacharacters, no DNS
    if count <= 0 or interval <= 0 or wait <= 0:
        raise ValueError("count, interval and wait must be positive")
    command = f"ping -c {int(count)} -i {float(interval):g} -W {int(wait)}"
    if size is not None:
        command += f" -s {int(size)}"
    command += f" {shlex.quote(address)} 2>&1"
    bound = count * interval + wait + _SHELL_MARGIN if timeout is None else timeout
    result = await machine.shell.run(command, timeout=bound)
    return parse_ping(result.stdout.decode("utf-8", "replace"), result.returncode)
