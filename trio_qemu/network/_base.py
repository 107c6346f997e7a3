"""What :class:`~trio_qemu.network.Link` and :class:`~trio_qemu.network.Switch` share.

:class:`_Network` attaches machines (adds the ``-netdev dgram`` and NIC options to their
configs, over a socket QEMU inherits), remembers what it attached (MAC, NIC id, interface,
address) and owns our copies of the inherited sockets until they are released or the
network is closed. Subclasses say how a socket is made (:meth:`_Network._new_end`).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

from .._config import MachineConfig
from .._errors import NetworkError
from .._machine import Machine
from .._openers import open_machines
from .._util import ClosesOnExit
from .addressing import (
    _MAC,
    _QEMU_ID,
    PortRef,
    _lookup,
    _netdev_ids,
    _nic_count,
    _port_name,
    mac_address,
    with_ip,
)
from .guest import set_nic_link

__all__ = ["DEFAULT_NIC"]

log = logging.getLogger("trio_qemu.network")

DEFAULT_NIC: Final = "virtio-net-pci"
"""The NIC model :meth:`Switch.attach` and :meth:`Link.attach` give a machine by default
(virtio-net has carrier at once; ``e1000`` also works, and takes 1-3 s to get carrier)."""


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


class _Network(ClosesOnExit):
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
        return _lookup(self._attachments, ref, self.name, "attached machine")

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
