"""How machines are named and addressed on a network, as written into their configs.

Pure functions over :class:`~trio_qemu.MachineConfig`: deterministic MACs
(:func:`mac_address`), the tiny guest's kernel command-line hooks for its address
(:func:`with_ip`), how a port is referred to (:data:`PortRef`), and what a config's
arguments already hold (netdev ids, NIC count) so an attach can refuse a clash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias, TypeVar

from .._config import MachineConfig
from .._machine import Machine

__all__ = ["PortRef", "mac_address", "with_ip"]

PortRef: TypeAlias = str | Machine | MachineConfig
"""How a port or an attached machine is named in the methods of
:class:`~trio_qemu.network.Link` and :class:`~trio_qemu.network.Switch`: by its name, or by
the machine or config carrying that name."""

#: QEMU ids: a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_MAC: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


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
        _check_hostname(hostname)
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


_V = TypeVar("_V")


def _lookup(table: Mapping[str, _V], ref: PortRef, owner: str, what: str) -> _V:
    """``table[name of ref]``; a KeyError that lists the known names otherwise."""
    name = _port_name(ref)
    try:
        return table[name]
    except KeyError:
        known = ", ".join(table) or "none"
        raise KeyError(f"{owner}: no {what} {name!r} (known: {known})") from None


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


def _netdev_fd(value: str) -> str | None:
    """The fd (a number, or ``unbound`` in a clone's config) of a
    ``dgram,...,local.type=fd,local.str=FD`` netdev value, else None."""
    items = value.split(",")
    if items[0] != "dgram" or "local.type=fd" not in items:
        return None
    for item in items:
        if item.startswith("local.str="):
            return item[10:]
    return None


def _unplugged_netdev(config: MachineConfig, netdev_id: str) -> int | None:
    """The index in ``config.args`` of the ``-netdev dgram`` value with id ``netdev_id``
    whose fd QEMU would not inherit (``unbound``, or a number not in ``inherit_fds``): a
    template's NIC waiting for a socket (see ``_Network.attach``). None if there is none
    (or its fd is inherited)."""
    args = list(config.args)
    for index in range(1, len(args)):
        if args[index - 1] not in ("-netdev", "--netdev"):
            continue
        value = args[index]
        if f"id={netdev_id}" not in value.split(","):
            continue
        fd = _netdev_fd(value)
        if fd is not None and not (fd.isdigit() and int(fd) in config.inherit_fds):
            return index
    return None


def _nic_index(args: Sequence[str], netdev_id: str) -> int:
    """The position of the NIC on netdev ``netdev_id`` among the NICs in ``args`` (the
    guest calls it eth<N>)."""
    nics = [
        value
        for option, value in itertools.pairwise(args)
        if option in ("-device", "--device") and ",netdev=" in value
    ]
    for index, value in enumerate(nics):
        if f"netdev={netdev_id}" in value.split(","):
            return index
    return len(nics)


def _hostname_for(name: str) -> str | None:
    """A host name from a machine name: characters other than letters, digits, '.' and '-'
    become '-', at most 63 of them; None if nothing is left."""
    text = re.sub(r"[^A-Za-z0-9.-]", "-", name)[:63].strip("-.")
    return text or None


def _check_hostname(hostname: str) -> str:
    if not isinstance(hostname, str) or not re.fullmatch(r"[A-Za-z0-9.-]{1,63}", hostname):
        raise ValueError(f"hostname must be letters, digits, '.' and '-', not {hostname!r}")
    return hostname
