"""Clones on networks, each with its own identity (trio_qemu.network with trio_qemu.snapshot).

A template of the tiny guest is made once for the module (one boot) with a NIC on a network
named ``net`` and no address (``attach_template``); its clones are attached to a
:class:`Switch` or a :class:`Link` of that name, get their own MAC, address and host name
after the restore, and ping each other by those addresses. ``TRIO_QEMU_SOAK=1`` runs the
switch scenario with 8 clones instead of 4 (8 TCG guests on this 2-core machine take
several seconds more). Every scenario checks that no QEMU, fd or temporary directory is
left.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from census import Census, qemu_children

from trio_qemu import LaunchError, Machine, MachineConfig, open_machine
from trio_qemu.guest import GuestImage
from trio_qemu.network import Link, Switch, mac_address, ping
from trio_qemu.snapshot import Template, TemplateError, ensure_template, open_clone, restore

NET = "net"
KEY = "snapshot-network-tests-v1"
#: 4 clones by default; 8 with TRIO_QEMU_SOAK=1.
CLONES = 8 if os.environ.get("TRIO_QEMU_SOAK") == "1" else 4
SCENARIO_TIMEOUT = 240.0




async def net_template(image: GuestImage, cache_dir: Path) -> Template:
    """The tiny guest with a NIC on network ``net`` and no address, saved once."""
    with Switch(NET) as network:  # any network named "net" makes the same template
        config = network.attach_template(image.config(memory=128))
        return await ensure_template(config, key=KEY, cache_dir=cache_dir)


def fake_template(tmp_path: Path, config: MachineConfig) -> Template:
    """A Template object for config checks only (no files; QEMU never starts)."""
    return Template(path=tmp_path, key="fake", base=config, ram_size=128 << 20, qemu_version="")


async def identity(vm: Machine) -> tuple[str, str, str]:
    """The guest's MAC on eth0, its IPv4 addresses there, its host name."""
    result = await vm.shell.run(
        "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0; hostname", check=True
    )
    mac, *rest = result.stdout.decode().splitlines()
    addresses = " ".join(line.split()[3] for line in rest[:-1])
    return mac, addresses, rest[-1]


# -- without QEMU ------------------------------------------------------------------------------


def test_a_clone_config_is_plugged_into_the_templates_nic(
    tiny_guest: GuestImage, tmp_path: Path
) -> None:
    with Switch(NET) as maker, Switch(NET) as switch, Switch("other") as other:
        made = maker.attach_template(tiny_guest.config(name="whatever", memory=128))
        (template_fd,) = made.inherit_fds
        template_mac = mac_address(NET, "template", "nic")
        assert made.args[-4:] == (
            "-netdev",
            f"dgram,id={NET},local.type=fd,local.str={template_fd}",
            "-device",
            f"virtio-net-pci,netdev={NET},id={NET}-nic,mac={template_mac}",
        )
        assert made.append == tiny_guest.append  # no address: the guest's NIC stays down
        template = fake_template(tmp_path, made.replace(inherit_fds=(), name=None))
        clone = template.config(name="c_1")
        # The maker's fd number is not the clone's: QEMU would refuse it, never misuse it.
        assert f"dgram,id={NET},local.type=fd,local.str=unbound" in clone.args
        plugged = switch.attach(clone, ip="10.0.0.7/24", gateway="10.0.0.254")
        (fd,) = plugged.inherit_fds
        # Only the fd number changed: the template's MAC and kernel command line stay.
        assert [a for a in plugged.args if a not in clone.args] == [
            f"dgram,id={NET},local.type=fd,local.str={fd}"
        ]
        assert plugged.append == clone.append
        assert switch.mac("c_1") == mac_address(NET, "c_1") != template_mac
        assert switch.address("c_1") == "10.0.0.7" and switch.iface("c_1") == "eth0"
        line = switch.identity_command("c_1")
        assert f"ip link set dev eth0 address {switch.mac('c_1')} up" in line
        assert "ip addr add 10.0.0.7/24 dev eth0" in line
        assert "ip route add default via 10.0.0.254 dev eth0" in line
        assert "echo c-1 >/proc/sys/kernel/hostname" in line  # the machine's name, as a host name
        assert "arping -U -c 1 -I eth0 10.0.0.7" in line
        ipv6 = switch.attach(
            template.config(name="v6"), ip="fd00::5/64", mac="02:00:00:00:00:05", hostname="h"
        )
        line6 = switch.identity_command("v6")
        assert "ip addr add fd00::5/64 dev eth0" in line6 and "echo h >" in line6
        assert "arping" not in line6 and "02:00:00:00:00:05" in line6
        assert ipv6.append == clone.append

        # A clone cannot get a NIC its template lacks, nor be plugged twice.
        with pytest.raises(ValueError, match="cannot get a new NIC"):
            other.attach(template.config(name="x"))
        with pytest.raises(ValueError, match="already has a netdev"):
            Switch(NET).attach(plugged.replace(name="y"))
        with pytest.raises(ValueError, match="cannot get a new NIC"):
            other.attach_template(clone)
        with pytest.raises(ValueError, match="hostname must be"):
            switch.attach(template.config(name="z"), hostname="bad name")
        with pytest.raises(ValueError, match="needs ip="):
            switch.attach(template.config(name="z"), gateway="10.0.0.1")
        with pytest.raises(ValueError, match="needs ip="):
            switch.attach(tiny_guest.config(name="booted"), hostname="h")
        assert switch.ports == ["c_1", "v6"]  # the refusals left no port
        # A booted machine still gets a NIC and its address on the kernel command line.
        booted = switch.attach(tiny_guest.config(name="b"), ip="10.0.0.9/24", hostname="bee")
        assert (booted.append or "").endswith("trio.ip=10.0.0.9/24 trio.hostname=bee")


async def test_a_nic_template_is_cloned_only_through_a_network(
    tiny_guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Switch(NET) as maker:
        made = maker.attach_template(tiny_guest.config(memory=128))
    template = fake_template(tmp_path, made.replace(inherit_fds=()))

    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("QEMU was started")

    monkeypatch.setattr("trio_qemu.snapshot._clone.open_machine", no_launch)
    with pytest.raises(TemplateError, match="does not inherit") as caught:
        async with open_clone(template, name="alone"):
            pass
    assert "network.attach(template.config" in str(caught.value)
    shell_less = fake_template(tmp_path, made.replace(inherit_fds=(), shell=False))
    with Switch(NET) as switch:
        with pytest.raises(TemplateError, match="not a clone config"):
            async with switch.open_clones(template, switch.attach(tiny_guest.config(name="b"))):
                pass
        with pytest.raises(ValueError, match="guest shell or agent"):
            async with switch.open_clones(shell_less, switch.attach(shell_less.config(name="q"))):
                pass
    assert qemu_children() == set()


async def test_a_nic_clone_launched_without_its_network_is_refused_by_qemu(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    """Launched around the network, a clone's NIC names fd ``unbound``: QEMU refuses it at
    once (it could otherwise take one of the clone's own fds for the template's)."""
    template = await net_template(tiny_guest, cache_dir)
    census = Census(base)
    with pytest.raises(LaunchError, match="Invalid file descriptor number 'unbound'"):
        async with open_machine(template.config(name="raw", base_temp_dir=base)):
            pass
    census.check("after the refused launch")


# -- real clones -------------------------------------------------------------------------------


async def test_clones_on_a_switch_ping_each_other_by_their_own_addresses(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    template = await net_template(tiny_guest, cache_dir)
    census = Census(base)
    template_mac = mac_address(NET, "template", "nic")
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with Switch(NET).running() as switch:
            configs = [
                switch.attach(
                    template.config(name=f"clone{i}", base_temp_dir=base), ip=f"10.9.0.{i + 1}/24"
                )
                for i in range(CLONES)
            ]
            start = time.monotonic()
            async with switch.open_clones(template, *configs) as vms:
                restored = time.monotonic() - start
                for fd in (fd for config in configs for fd in config.inherit_fds):
                    with pytest.raises(OSError):
                        os.fstat(fd)  # released: only the QEMUs hold their ends now
                failures: list[str] = []

                async def ping_all(vm: Machine) -> None:
                    for other in vms:
                        if other is not vm:
                            result = await ping(vm, switch.address(other), count=1, wait=3)
                            if not result.ok:
                                failures.append(f"{vm.name}->{other.name}: {result.output}")

                async with trio.open_nursery() as nursery:
                    for vm in vms:
                        nursery.start_soon(ping_all, vm)
                pinged = time.monotonic() - start
                assert not failures, failures

                macs = set()
                for vm in vms:
                    mac, addresses, hostname = await identity(vm)
                    assert mac == switch.mac(vm) != template_mac
                    assert addresses == f"{switch.address(vm)}/24"
                    assert hostname == vm.name
                    shown = (await vm.shell.run("ip link show eth0", check=True)).stdout
                    assert f"link/ether {mac} ".encode() in shown
                    # QEMU's receive filter follows the guest's MAC (virtio-net control queue).
                    (rx,) = await vm.cmd("query-rx-filter", name=switch.nic_id(vm))
                    assert rx["main-mac"] == mac
                    macs.add(mac)
                assert len(macs) == CLONES
                # Each MAC was learned on its own port; the template's never went out.
                table = switch.mac_table
                assert {mac: table.get(mac) for mac in macs} == {
                    switch.mac(vm): vm.name for vm in vms
                }
                assert template_mac not in table
        print(
            f"\n{CLONES} clones on a switch: restored with their identity {restored:.2f} s "
            f"after launch; every pair pinged after {pinged:.2f} s"
        )
    census.check("after the clones on a switch")


async def test_two_clones_on_a_link_and_the_identity_by_hand(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    """``Link.open_machines``, then restore with ``setup=identity_command`` on one clone and
    restore then ``apply_identity`` on the other; with a gateway, an explicit MAC and host
    name."""
    template = await net_template(tiny_guest, cache_dir)
    census = Census(base)
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with Link(NET).running() as link:
            a = link.attach(
                template.config(name="a", base_temp_dir=base),
                ip="192.168.5.1/24",
                mac="02:aa:00:00:00:01",
                hostname="alpha",
            )
            b = link.attach(
                template.config(name="b", base_temp_dir=base),
                ip="192.168.5.2/24",
                gateway="192.168.5.1",
            )
            async with link.open_machines(a, b) as (va, vb):
                async with trio.open_nursery() as nursery:
                    setup = link.identity_command(va)
                    nursery.start_soon(partial(restore, va, template, setup=setup))
                    nursery.start_soon(restore, vb, template)
                assert (await identity(vb))[0] != link.mac(vb)  # still the template's
                await link.apply_identity(vb)
                await link.apply_identity(vb)  # again: the same identity, nothing breaks
                assert await identity(va) == ("02:aa:00:00:00:01", "192.168.5.1/24", "alpha")
                assert await identity(vb) == (link.mac(vb), "192.168.5.2/24", "b")
                route = (await vb.shell.run("ip route show default", check=True)).stdout
                assert b"default via 192.168.5.1 dev eth0" in route
                for vm, peer in ((va, "192.168.5.2"), (vb, "192.168.5.1")):
                    result = await ping(vm, peer, count=2, interval=0.2)
                    assert result.ok, result.output
                # Each side's neighbour entry has the other's own MAC.
                neigh = (await va.shell.run("ip neigh show 192.168.5.2", check=True)).stdout
                assert link.mac(vb).encode() in neigh
    census.check("after the clones on a link")
