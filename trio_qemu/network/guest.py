"""Network helpers that act on a running machine: in its guest, or on its NIC through QMP.

The guest-side helpers run over the tiny guest's shell channel (``vm.shell``) and bound
every wait inside the guest: :func:`ping` (parses busybox's summary, see
:func:`parse_ping`) and :func:`wait_carrier` (polls ``/sys/class/net/IFACE/carrier``).
:func:`set_nic_link` is QEMU's own ``set_link``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from dataclasses import dataclass
from typing import Final

from .._errors import NetworkError, NetworkTimeout
from .._machine import Machine

__all__ = ["PingResult", "parse_ping", "ping", "set_nic_link", "wait_carrier"]

#: How often the guest checks the carrier while :func:`wait_carrier` waits (seconds).
_CARRIER_POLL: Final = 0.05
#: Extra time a guest command gets beyond its own bound before ``vm.shell.run`` gives up.
_SHELL_MARGIN: Final = 10.0


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


def _identity_command(
    iface: str,
    mac: str,
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None,
    *,
    gateway: str | None = None,
    hostname: str | None = None,
) -> str:
    """The guest shell command line that gives interface ``iface`` its identity: MAC ``mac``,
    address ``ip`` (none: no address), a default route via ``gateway``, host name
    ``hostname`` (busybox ``ip`` and ``arping``; all values checked here).

    An interface that is up goes down first (which drops its routes, its neighbour cache
    and its IPv6 addresses); its IPv4 addresses are flushed; it takes the MAC (virtio-net
    passes it to QEMU through its control queue, so QEMU's receive filter follows; see
    ``query-rx-filter``) and comes up, in one ``ip`` command; then the address, the route,
    the host name (written to ``/proc/sys/kernel/hostname``: no process) and, for an IPv4
    address, one unsolicited ARP (``arping -U``, when the guest has it) so that neighbours
    and switches learn the MAC at once. Four or five processes in all: each costs ~15 ms
    in a TCG guest, more the first time (its code is translated). One ``&&`` chain: the
    first failing step fails it.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,15}", iface):
        raise ValueError(f"iface must be an interface name like 'eth0', not {iface!r}")
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
        raise ValueError(f"mac must be like 02:00:00:00:00:01, not {mac!r}")
    steps = [
        f"read flags </sys/class/net/{iface}/flags",
        f"{{ [ $((flags & 1)) = 0 ] || ip link set dev {iface} down; }}",
        f"ip addr flush dev {iface}",
        f"ip link set dev {iface} address {mac} up",
    ]
    if ip is not None:
        steps.append(f"ip addr add {ipaddress.ip_interface(ip).with_prefixlen} dev {iface}")
    if gateway is not None:
        steps.append(f"ip route add default via {ipaddress.ip_address(gateway)} dev {iface}")
    if hostname is not None:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,63}", hostname):
            raise ValueError(f"hostname must be letters, digits, '.' and '-', not {hostname!r}")
        steps.append(f"echo {hostname} >/proc/sys/kernel/hostname")
    if ip is not None and ip.version == 4:
        steps.append(
            "{ ! command -v arping >/dev/null || "
            f"arping -U -c 1 -I {iface} {ip.ip} >/dev/null 2>&1 || true; }}"
        )
    return " && ".join(steps)
