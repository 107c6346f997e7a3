"""What a QEMU binary offers (``qemu_capabilities``), asked once and cached, and the pytest
plugin's ``require_*`` skips built on it (helpers and markers, through pytester)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from trio_qemu import LaunchError, QemuCapabilities, qemu_capabilities
from trio_qemu import _capabilities as capabilities_module
from trio_qemu._capabilities import (
    _Cache,
    capabilities_blocking,
    parse_accelerators,
    parse_devices,
    parse_machines,
    parse_netdevs,
    parse_version,
)
from trio_qemu.pytest_plugin import MachineFactory

# Excerpts of what Debian's qemu-system-x86_64 7.2 prints (stdout), lines kept as they are.
VERSION_OUT = """\
QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
"""
MACHINE_HELP = """\
Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-1.4        Standard PC (i440FX + PIIX, 1996) (deprecated)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-4.0.1         Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
x-remote             Experimental remote machine
"""
DEVICE_HELP = """\
Controller/Bridge/Hub devices:
name "pcie-root-port", bus PCI, desc "PCI Express Root Port"
name "usb-hub", bus usb-bus

Storage devices:
name "ich9-ahci", bus PCI, alias "ahci"
name "lsi53c895a", bus PCI, alias "lsi"

Network devices:
name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
name "virtio-net-pci", bus PCI, alias "virtio-net"

Uncategorized devices:
name "ipmi-bmc-sim"
name "pc-dimm", desc "DIMM memory module"
"""
ACCEL_HELP = "Accelerators supported in QEMU binary:\ntcg\nkvm\n"
NETDEV_HELP = """\
Available netdev backend types:
socket
stream
dgram
hubport
tap
user
l2tpv3
vde
bridge
vhost-user
vhost-vdpa
"""


def test_parsers_read_captured_outputs() -> None:
    assert parse_version(VERSION_OUT) == "7.2.22"
    assert parse_machines(MACHINE_HELP) == {
        "microvm", "pc", "pc-i440fx-7.2", "pc-i440fx-1.4", "q35", "pc-q35-7.2",
        "pc-q35-4.0.1", "isapc", "none", "x-remote",
    }  # fmt: skip
    assert parse_devices(DEVICE_HELP) == {
        "pcie-root-port", "usb-hub", "ich9-ahci", "ahci", "lsi53c895a", "lsi", "e1000",
        "e1000-82540em", "virtio-net-pci", "virtio-net", "ipmi-bmc-sim", "pc-dimm",
    }  # fmt: skip
    assert parse_accelerators(ACCEL_HELP) == {"tcg", "kvm"}
    assert parse_netdevs(NETDEV_HELP) == {
        "socket", "stream", "dgram", "hubport", "tap", "user", "l2tpv3", "vde", "bridge",
        "vhost-user", "vhost-vdpa",
    }  # fmt: skip


def test_parsers_refuse_other_text() -> None:
    # What `/bin/echo -version` and friends print: not QEMU's lists.
    cases = [
        (parse_version, "-version\n", "no 'QEMU emulator version X.Y.Z' line"),
        (parse_machines, "-machine help\n", "no 'Supported machines are:' line"),
        (parse_devices, "Storage devices:\n", "no 'name \"...\"' device line"),
        (parse_accelerators, "", "no 'Accelerators supported in QEMU binary:' line"),
        (parse_netdevs, "socket\n", "no 'Available netdev backend types:' line"),
    ]
    for parse, text, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            parse(text)


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> _Cache:
    """An empty cache for this test (the module's is shared by the whole session)."""
    cache = _Cache()
    monkeypatch.setattr(capabilities_module, "_CACHE", cache)
    return cache


async def test_asks_qemu_once(fresh_cache: _Cache, machine: MachineFactory) -> None:
    first, second = await qemu_capabilities(), await qemu_capabilities()
    assert first is second and len(fresh_cache.answers) == 1
    assert {"q35", "pc", "none", "microvm"} <= first.machines
    assert {"virtio-net-pci", "virtio-serial-pci", "e1000"} <= first.devices
    assert "virtio-net" in first.devices  # an alias -device accepts
    assert "virtio-device" not in first.devices  # abstract
    assert "hpet" not in first.devices  # exists, but -device refuses it
    assert "tcg" in first.accelerators and first.accel_usable("tcg")
    assert {"user", "socket", "stream", "dgram", "tap"} <= first.netdevs
    assert "nic" not in first.netdevs and "none" not in first.netdevs
    # The same answers as QMP's, but for the devices -device cannot create.
    vm = await machine(machine="none", args=["-nodefaults"])
    version = (await vm.cmd("query-version"))["qemu"]
    assert first.version == "{major}.{minor}.{micro}".format(**version)
    machines = await vm.cmd("query-machines")
    assert first.machines == {m["name"] for m in machines} | {
        m["alias"] for m in machines if "alias" in m
    }
    types = await vm.cmd("qom-list-types", implements="device", abstract=False)
    devices = {d["name"] for d in types}
    assert {"virtio-net", "ahci", "e1000-82540em"} <= first.devices - devices  # aliases
    assert {"hpet", "PIIX3", "apic"} <= devices - first.devices  # not user-creatable
    assert len(first.devices & devices) > 300
    accels = await vm.cmd("qom-list-types", implements="accel", abstract=False)
    names = [a["name"] for a in accels]
    assert first.accelerators == {n.removesuffix("-accel") for n in names if n.endswith("-accel")}
    # The blocking form finds the same answer (no second probe).
    assert capabilities_blocking() is first


def test_missing_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = QemuCapabilities(
        binary="/usr/bin/qemu-x",
        version="7.2.0",
        machines=frozenset({"q35"}),
        devices=frozenset({"e1000"}),
        accelerators=frozenset({"tcg", "kvm"}),
        netdevs=frozenset({"user"}),
    )
    assert caps.missing("machine", "q35") is None
    assert caps.missing("device", "e1000") is None
    assert caps.missing("netdev", "user") is None
    assert (
        caps.missing("machine", "virt") == "QEMU /usr/bin/qemu-x (7.2.0) has no machine type 'virt'"
    )
    assert caps.missing("device", "virtio-gpu-pci") == (
        "QEMU /usr/bin/qemu-x (7.2.0) has no device type 'virtio-gpu-pci'"
    )
    assert (
        caps.missing("netdev", "vde") == "QEMU /usr/bin/qemu-x (7.2.0) has no netdev backend 'vde'"
    )
    assert caps.missing("accel", "hvf") == (
        "QEMU /usr/bin/qemu-x (7.2.0) has no 'hvf' accelerator (it has: kvm, tcg)"
    )
    monkeypatch.setattr(capabilities_module, "kvm_usable", lambda: False)
    assert "KVM is not usable on this host" in (caps.missing("accel", "kvm") or "")
    assert caps.missing("accel", "tcg") is None
    monkeypatch.setattr(capabilities_module, "kvm_usable", lambda: True)
    assert caps.missing("accel", "kvm") is None
    with pytest.raises(ValueError, match="kind must be one of accel, device, machine, netdev"):
        caps.missing("cpu", "max")


def test_blocking_outside_trio(fresh_cache: _Cache) -> None:
    caps = capabilities_blocking()
    assert "q35" in caps.machines and list(fresh_cache.answers.values()) == [caps]


async def test_blocking_inside_trio_and_a_missing_binary(fresh_cache: _Cache) -> None:
    # A synchronous helper in an async test: it blocks the loop, briefly, and needs no other.
    caps = capabilities_blocking()
    assert "q35" in caps.machines
    assert await qemu_capabilities() is caps
    missing = "cannot run /nonexistent/qemu-system-x86_64: No such file or directory"
    with pytest.raises(LaunchError, match=missing):
        await qemu_capabilities("/nonexistent/qemu-system-x86_64")
    with pytest.raises(LaunchError, match=missing):
        capabilities_blocking("/nonexistent/qemu-system-x86_64")
    assert len(fresh_cache.answers) == 1  # failures are not kept


async def test_not_a_qemu_a_stalled_one_and_a_bad_timeout(
    fresh_cache: _Cache, tmp_path: Path
) -> None:
    with pytest.raises(LaunchError) as failed:
        await qemu_capabilities("/bin/false")
    assert "`/bin/false -version` failed" in str(failed.value)
    assert failed.value.returncode == 1
    with pytest.raises(LaunchError) as printed:
        capabilities_blocking("/bin/echo")
    assert "`/bin/echo -version` printed no 'QEMU emulator version X.Y.Z' line" in str(
        printed.value
    )
    assert printed.value.output == "-version\n"  # what it printed, in the error
    # A binary that never answers is killed at the timeout, by either runner.
    stalls = tmp_path / "stalls"
    pids = tmp_path / "pids"
    stalls.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 60\n")
    stalls.chmod(0o755)
    start = time.monotonic()
    timed_out = re.escape("did not finish within 0.5 s; it was killed")
    with pytest.raises(LaunchError, match=timed_out):
        await qemu_capabilities(str(stalls), timeout=0.5)
    with pytest.raises(LaunchError, match=timed_out):
        capabilities_blocking(str(stalls), timeout=0.5)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, not 0"):
        await qemu_capabilities(str(stalls), timeout=0)
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, not -1"):
        capabilities_blocking(str(stalls), timeout=-1)
    for pid in pids.read_text().split():  # nothing left behind
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    assert not fresh_cache.answers


PLUGIN_TESTS = """
import pytest
from trio_qemu.pytest_plugin import require_accel, require_device, require_machine, require_netdev

@pytest.mark.require_device("virtio-net-pci")
@pytest.mark.require_machine("q35", "microvm")
@pytest.mark.require_netdev("user")
@pytest.mark.require_accel("tcg")
def test_runs():
    pass

@pytest.mark.require_device("no-such-device")
def test_marker_skips(machine):   # skipped before the async fixture is even set up
    raise AssertionError("ran")

def test_helper_skips_sync():
    require_device("virtio-net-pci")
    require_machine("no-such-machine")
    raise AssertionError("ran")

async def test_helper_skips_async(machine):
    vm = await machine(machine="none", args=["-nodefaults"])
    require_netdev("user")
    require_netdev("no-such-netdev")
    raise AssertionError("ran")

def test_kvm():
    require_accel("kvm")

@pytest.mark.require_device("e1000", bogus=1)
def test_bad_marker():
    pass

@pytest.mark.require_machine(binary="/nonexistent/qemu")
def test_marker_without_names():
    pass

@pytest.mark.require_machine("q35", binary="/nonexistent/qemu")
def test_missing_qemu():
    pass
"""

COUNTING_CONFTEST = """
import trio_qemu._capabilities as capabilities

probes = []
real_probe = capabilities._probe_blocking

def counting_probe(binary, timeout):
    probes.append(binary)
    return real_probe(binary, timeout)

capabilities._probe_blocking = counting_probe

def pytest_sessionfinish(session):
    with open("probes", "w") as file:
        file.write("\\n".join(probes))
"""


def test_plugin_skips(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    pytester.makeconftest(COUNTING_CONFTEST)
    pytester.makepyfile(test_skips=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rsf")
    out = result.stdout.str()
    kvm = capabilities_blocking().missing("accel", "kvm")
    # The markers are honoured before the test's fixtures are set up: their failures
    # (a bad marker, no QEMU) are setup errors.
    result.assert_outcomes(passed=1 if kvm else 2, skipped=4 if kvm else 3, errors=3)
    assert "has no device type 'no-such-device'" in out
    assert "has no machine type 'no-such-machine'" in out
    # in an async test too (pytest-trio alone would drop the reason)
    assert re.search(r"test_skips.py:\d+: QEMU .* has no netdev backend 'no-such-netdev'", out)
    if kvm:
        assert "KVM is not usable on this host" in out
    assert "@pytest.mark.require_device takes names and binary=, not bogus" in out
    assert "@pytest.mark.require_machine takes one or more names (str), not ()" in out
    assert "During handling" not in out and "must be called from async" not in out
    assert "cannot ask QEMU what it supports" in out and "/nonexistent/qemu" in out
    assert "AssertionError" not in out  # no skipped test's body ran
    # The default QEMU was asked once for the whole session; the missing one each time.
    probes = (pytester.path / "probes").read_text().split("\n")
    assert probes.count("/nonexistent/qemu") == 1 and len(probes) == 2
