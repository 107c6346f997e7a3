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
from dataclasses import dataclass
from typing import Final

from .._config import MachineConfig
from .._errors import NetworkError
from .._machine import Machine
from .._openers import open_machines
from .._util import ClosesOnExit, protected_asynccontextmanager
from ..snapshot._clone import RESTORE_TIMEOUT, check_bound, restore_all
from ..snapshot._template import Template, TemplateError, clone_ram_path
from .addressing import (
    _MAC,
    _QEMU_ID,
    PortRef,
    _check_hostname,
    _hostname_for,
    _lookup,
    _netdev_ids,
    _nic_count,
    _nic_index,
    _port_name,
    _unplugged_netdev,
    mac_address,
    with_ip,
)
from .guest import _identity_command, set_nic_link

__all__ = ["DEFAULT_NIC", "IDENTITY_TIMEOUT"]

log = logging.getLogger("trio_qemu.network")

DEFAULT_NIC: Final = "virtio-net-pci"
"""The NIC model :meth:`Switch.attach` and :meth:`Link.attach` give a machine by default
(virtio-net has carrier at once; ``e1000`` also works, and takes 1-3 s to get carrier)."""

IDENTITY_TIMEOUT: Final = 30.0
"""Default seconds :meth:`Switch.apply_identity` and :meth:`Link.apply_identity` allow for
the guest command that sets a clone's MAC, address and host name (a few hundred ms under
TCG)."""

#: The seed of a template NIC's MAC, after the network's name (a machine's name is one
#: part, so no machine's MAC can be this one).
_TEMPLATE_MAC_SEED: Final = ("template", "nic")


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
    gateway: str | None = None
    hostname: str | None = None
    #: plugged into a template's NIC: the identity is set in the guest after the restore
    deferred: bool = False


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
        #: our copies of the ends given to template makers (attach_template)
        self._template_ends: list[socket.socket] = []
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
        hostname: str | None = None,
    ) -> MachineConfig:
        """A copy of ``config`` with a NIC on this network (and its address, with ``ip``).

        The machine is known by ``config.name`` (required: it names the port and seeds the
        MAC). Adds ``-netdev dgram,id=NAME,local.type=fd,local.str=FD`` (``NAME`` is this
        network's name) and ``-device NIC,netdev=NAME,id=NAME-nic,mac=MAC`` to ``args`` and
        the fd to ``inherit_fds``. ``nic`` is the device model, optionally with properties
        (``"e1000"``, ``"virtio-net-pci,mq=on"``). ``mac`` defaults to :func:`mac_address` of
        the network's and the machine's names. ``ip`` (``ADDR/PREFIX``), ``gateway`` and
        ``hostname`` go through :func:`with_ip` for interface ``iface``, by default
        ``eth<N>`` where N counts the NICs ``config`` already has.

        **A clone** (a config from :meth:`Template.config <trio_qemu.snapshot.Template.config>`
        of a template made from :meth:`attach_template` on a network of this name) already
        has this network's NIC, and must keep the template's command line: the NIC is
        plugged into this network instead (its netdev gets the new socket; nothing else
        changes), and the identity (``mac``, ``ip``, ``gateway``, ``hostname``, which
        defaults to the machine's name) is remembered, to be set in the guest after the
        restore: :meth:`open_clones` does it, or :meth:`apply_identity`. ``nic`` is then
        the template's.

        Creates the socketpair now: launch the config before the network is closed, and let
        :meth:`release` or :meth:`open_machines` close our copy of QEMU's end once it runs.
        Raises ValueError for a config without a name, a name already attached, a config
        already on a network of this name, a clone whose template has no NIC on this
        network, a bad MAC, address or host name.
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
        plug = _unplugged_netdev(config, self.name)
        if plug is None:
            self._check_new_nic(config, name)
        if mac is None:
            mac = self._unique_mac(name)
        else:
            mac = mac.lower().replace("-", ":")
            if not _MAC.match(mac) or int(mac[:2], 16) & 1:
                raise ValueError(f"mac must be a unicast MAC like 02:00:00:00:00:01, not {mac!r}")
            if mac in self._macs:
                raise ValueError(f"{self.name}: MAC {mac} is already in use")
        _check_nic(nic)
        if hostname is not None:
            _check_hostname(hostname)
        interface = None
        if plug is not None:
            index = _nic_index(config.args, self.name)
            chosen_iface = iface if iface is not None else f"eth{index}"
            if ip is not None:
                if "/" not in ip:
                    raise ValueError(f"ip must be ADDR/PREFIX (e.g. '10.0.0.1/24'), not {ip!r}")
                interface = ipaddress.ip_interface(ip)
            if gateway is not None:
                if ip is None:
                    raise ValueError("gateway= needs ip=")
                gateway = str(ipaddress.ip_address(gateway))
            if hostname is None:
                hostname = _hostname_for(name)
            _identity_command(chosen_iface, mac, interface, gateway=gateway, hostname=hostname)
        else:
            chosen_iface = iface if iface is not None else f"eth{_nic_count(config.args)}"
            if ip is not None:
                # Validate before any socket exists, so a refusal leaves nothing behind.
                with_ip(config, ip, iface=chosen_iface, gateway=gateway, hostname=hostname)
                interface = ipaddress.ip_interface(ip)
            elif gateway is not None or hostname is not None:
                raise ValueError(f"{'gateway' if gateway else 'hostname'}= needs ip=")
        self._check_before_end(name)

        qemu_end = self._new_end(name)
        try:
            fd = qemu_end.fileno()
            netdev_id = self.name
            device_id = f"{self.name}-nic"
            if plug is not None:
                args = list(config.args)
                args[plug] = re.sub(r"(?<=local\.str=)[^,]+", str(fd), args[plug])
                new = config.replace(args=args, inherit_fds=[*config.inherit_fds, fd])
            else:
                new = self._with_nic(config, nic, mac, fd)
                if ip is not None:
                    new = with_ip(new, ip, iface=chosen_iface, gateway=gateway, hostname=hostname)
        except BaseException:
            self._drop_end(name)
            qemu_end.close()
            raise
        self._macs.add(mac)
        self._attachments[name] = _Attachment(
            name, mac, netdev_id, device_id, chosen_iface, interface, qemu_end,
            gateway=gateway, hostname=hostname, deferred=plug is not None,
        )  # fmt: skip
        log.debug(
            "%s: %s %s (mac %s, fd %d)",
            self.name, "plugged clone" if plug is not None else "attached", name, mac, fd,
        )  # fmt: skip
        return new

    def _check_new_nic(self, config: MachineConfig, name: str) -> None:
        """Refuse a config that cannot get a new NIC on this network."""
        if self.name in _netdev_ids(config.args):
            raise ValueError(
                f"{name}: the config already has a netdev {self.name!r}; give each network a "
                "machine joins its own name"
            )
        if clone_ram_path(config) is not None:
            raise ValueError(
                f"{name}: a clone's config must keep its template's devices, so it cannot get "
                f"a new NIC: make the template from network.attach_template(config) on a "
                f"network named {self.name!r}, then attach its clones' configs"
            )

    def _with_nic(self, config: MachineConfig, nic: str, mac: str, fd: int) -> MachineConfig:
        """``config`` plus this network's NIC (netdev ``NAME``, device ``NAME-nic``) on the
        datagram socket ``fd``, which QEMU inherits."""
        return config.replace(
            args=[
                *config.args,
                "-netdev",
                f"dgram,id={self.name},local.type=fd,local.str={fd}",
                "-device",
                f"{nic},netdev={self.name},id={self.name}-nic,mac={mac}",
            ],
            inherit_fds=[*config.inherit_fds, fd],
        )

    def attach_template(self, config: MachineConfig, *, nic: str = DEFAULT_NIC) -> MachineConfig:
        """A copy of ``config`` with this network's NIC, to make a template
        (:func:`~trio_qemu.snapshot.ensure_template`) whose clones join a network of this
        name (this one, or one of the same name in another run).

        The NIC is ``-netdev dgram,id=NAME,...`` and ``-device NIC,netdev=NAME,id=NAME-nic,
        mac=MAC`` as :meth:`attach` adds it, with a fixed MAC (from the network's name) and
        no address: the guest sees a NIC that is down. It is plugged into nothing (the
        other end of its socketpair is closed at once, so what the template's guest might
        send goes nowhere). The template's command line, and so its cache key, does not
        depend on the run, nor on the config's name.

        Each clone's config (``template.config(name=...)``) then goes through
        :meth:`attach`, which plugs that NIC into this network and remembers the clone's
        own MAC and address, set after the restore (:meth:`open_clones`).

        The fd QEMU inherits is held until :meth:`release` (without names) or until the
        network is closed. Raises ValueError for a config already on a network of this name
        or a clone's config.
        """
        self._check_open()
        self._check_new_nic(config, config.name or "the template")
        _check_nic(nic)
        mac = mac_address(self.name, *_TEMPLATE_MAC_SEED)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.close()
        self._template_ends.append(theirs)
        fd = theirs.fileno()
        return self._with_nic(config, nic, mac, fd)

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
        you; closing the network does it in any case. Without names it also closes the
        fds of :meth:`attach_template`.
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
        if not machines:
            for end in self._template_ends:
                end.close()
            self._template_ends = []

    @protected_asynccontextmanager
    async def open_machines(self, *configs: MachineConfig) -> AsyncIterator[list[Machine]]:
        """:func:`trio_qemu.open_machines` that releases these configs' fds once all the
        machines have started (see :meth:`release`). Launch errors, timeouts and teardown
        are exactly those of :func:`trio_qemu.open_machines`."""
        self._check_open()
        async with open_machines(*configs) as machines:
            self.release(*(config for config in configs if config.name in self._attachments))
            yield machines

    def identity_command(self, machine: PortRef) -> str:
        """The guest shell command line that gives ``machine`` the identity it was attached
        with on this network: its MAC, its address, a default route via its gateway, its
        host name, then one unsolicited ARP (for an IPv4 address, if the guest has
        ``arping``). :meth:`apply_identity` runs it; pass it as ``setup=`` to
        :func:`~trio_qemu.snapshot.restore` to run it in the same guest command as the
        restore's sync. Needs the guest's ``ip`` and ``hostname`` (busybox has them)."""
        attachment = self._attachment(machine)
        return _identity_command(
            attachment.iface,
            attachment.mac,
            attachment.ip,
            gateway=attachment.gateway,
            hostname=attachment.hostname,
        )

    async def apply_identity(self, machine: Machine, *, timeout: float = IDENTITY_TIMEOUT) -> None:
        """Set, in ``machine``'s guest, the identity it was attached with on this network
        (:meth:`identity_command`): through the guest shell, or ``sh -c`` through the guest
        agent. A clone needs it after its restore (it still has the template's MAC and no
        address); :meth:`open_clones` does it for you, in the restore's guest command.

        Raises:
            NetworkError: the guest command failed (its output), or the machine has
                neither the guest shell nor the agent.
            KeyError: the machine is not attached to this network.
            ShellTimeout, AgentTimeout: it took longer than ``timeout``.
        """
        line = self.identity_command(machine)
        if machine.config.shell:
            result = await machine.shell.run(line, timeout=timeout)
        elif machine.config.agent:
            result = await machine.agent.exec(["/bin/sh", "-c", line], timeout=timeout)
        else:
            raise NetworkError(
                f"{machine.name}: its identity is set through the guest shell or agent, and "
                "its config has neither (shell=True)"
            )
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
            raise NetworkError(
                f"{machine.name}: setting its identity on {self.name} failed (status "
                f"{result.returncode}): {output[-2000:]}"
            )

    @protected_asynccontextmanager
    async def open_clones(
        self,
        template: Template,
        *configs: MachineConfig,
        restore_timeout: float = RESTORE_TIMEOUT,
        sync_guest: bool = True,
    ) -> AsyncIterator[list[Machine]]:
        """Launch clones of ``template`` on this network for the block, each with its own
        MAC and address: ``open_machines``, :meth:`release`, then on every clone at once
        :func:`~trio_qemu.snapshot.restore` with its identity (:meth:`identity_command`)
        as the ``setup``, so that the clock, the RNG seed and the identity take one guest
        command. When the block is entered every clone answers on this network with its
        own address. Leaving it shuts them all down.

        ``configs`` come from ``self.attach(template.config(name=...), ip=...)`` (a config
        not attached here is restored too, without an identity from this network; for a
        clone on two networks, call the other's :meth:`apply_identity`).

        Raises:
            TemplateError: a config is not a clone of ``template``, names fds it does not
                inherit, the template's files changed (all before QEMU starts), or a
                restore or identity failed (the first failure ends the block for all).
            ValueError: no config; a clone attached here whose config has neither the
                guest shell nor the agent.
            LaunchError, MachineExited: as :func:`trio_qemu.open_machines`.
        """
        self._check_open()
        if not configs:
            raise ValueError("open_clones needs at least one clone config")
        setups: dict[str, str] = {}
        for config in configs:
            label = config.name or "a config"
            if clone_ram_path(config) != str(template.ram_path):
                raise TemplateError(
                    f"{label}: not a clone config of template {template.key} (make it with "
                    "template.config(name=...), then attach it)"
                )
            check_bound(config)
            if config.name in self._attachments and self._attachments[config.name].deferred:
                if not (config.shell or config.agent):
                    raise ValueError(
                        f"{label}: a clone gets its identity on {self.name} through the "
                        "guest shell or agent, and its config has neither (shell=True)"
                    )
                setups[config.name] = self.identity_command(config.name)
        template.verify()
        async with open_machines(*configs) as machines:
            self.release(*(config for config in configs if config.name in self._attachments))
            await restore_all(
                machines, template, timeout=restore_timeout, sync_guest=sync_guest, setups=setups
            )
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


def _check_nic(nic: str) -> None:
    if not isinstance(nic, str) or not re.match(r"[A-Za-z][A-Za-z0-9_-]*(,|\Z)", nic):
        raise ValueError(f"nic must be a NIC model like 'virtio-net-pci', not {nic!r}")
