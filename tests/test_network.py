"""Networks between VMs (trio_qemu.network): links and the Trio switch.

Most tests boot the tiny guest under TCG (2-3 guests each, 128 MiB) and ping through a
:class:`Link` or a :class:`Switch`; the switch's logic and bounds are also tested with Python
peers alone, and fd hygiene with ``-machine q35`` VMs that boot nothing. Every scenario
compares the process's open fds before and after.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from census import fd_changes, open_fds, qemu_children

from trio_qemu import LaunchError, Machine, MachineConfig
from trio_qemu.guest import GuestImage
from trio_qemu.network import (
    Link,
    NetworkError,
    PcapWriter,
    Switch,
    mac_address,
    parse_ping,
    ping,
    read_pcap,
    set_nic_link,
    wait_carrier,
    with_ip,
)

#: Upper bound for one guest scenario: boots under TCG on 2 shared cores plus the pings.
SCENARIO_TIMEOUT = 180.0
#: Boot-to-shell bound for each guest.
BOOT_TIMEOUT = 90.0


@pytest.fixture
def fd_guard() -> Iterator[None]:
    """Fail the test if it leaves a QEMU child behind, or the process's fds differ after it
    (an fd left open, or one closed that was not the test's, or reused for another file)."""
    gc.collect()  # earlier tests' garbage must not close fds in the middle of this one
    before = open_fds()
    yield
    assert qemu_children() == set(), "QEMU children left"
    now = open_fds()
    assert now == before, "fds differ: " + fd_changes(before, now)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def rss_kib() -> int:
    """This process's resident set size now (not its peak), in KiB."""
    with open("/proc/self/status") as f:
        return int(re.findall(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)[0])


def guest(image: GuestImage, name: str) -> MachineConfig:
    """A small tiny-guest config for these tests."""
    return image.config(name=name, memory=128)


# --- a small, independent pcap and packet reader --------------------------------------------


@dataclass
class Icmp:
    """An ICMP echo packet found in a capture."""

    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    type: int  # 8 echo request, 0 echo reply


def parse_capture(path: Path) -> tuple[int, list[Icmp]]:
    """Check the classic pcap framing by hand; return the record count and ICMP echoes."""
    data = path.read_bytes()
    magic, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    assert snaplen >= 1514
    offset, count, echoes, last_ts = 24, 0, [], 0.0
    while offset < len(data):
        seconds, micros, captured, original = struct.unpack_from("<IIII", data, offset)
        offset += 16
        frame = data[offset : offset + captured]
        assert len(frame) == captured <= original
        offset += captured
        timestamp = seconds + micros / 1e6
        assert micros < 1_000_000 and timestamp >= last_ts - 1.0  # plausible, in order
        last_ts = timestamp
        count += 1
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
            ihl = (frame[14] & 0x0F) * 4
            if frame[23] == 1:  # ICMP
                echoes.append(
                    Icmp(
                        frame[6:12].hex(":"),
                        frame[0:6].hex(":"),
                        str(ipaddress.IPv4Address(frame[26:30])),
                        str(ipaddress.IPv4Address(frame[30:34])),
                        frame[14 + ihl],
                    )
                )
    assert offset == len(data)
    return count, echoes


# --- no VM: configs, helpers, the switch with Python peers -------------------------------------


def test_attach_adds_a_dgram_netdev_a_nic_and_the_address(tiny_guest: GuestImage) -> None:
    with Switch("lab") as switch:
        config = switch.attach(guest(tiny_guest, "a"), ip="10.0.0.1/24", gateway="10.0.0.254")
        fd = config.inherit_fds[-1]
        mac = switch.mac("a")
        assert mac == mac_address("lab", "a") and mac.startswith("02:")
        assert ["-netdev", f"dgram,id=lab,local.type=fd,local.str={fd}"] == list(config.args[-4:-2])
        assert config.args[-1] == f"virtio-net-pci,netdev=lab,id=lab-nic,mac={mac}"
        assert config.append is not None
        assert config.append.endswith(" trio.ip=10.0.0.1/24 trio.gw=10.0.0.254")
        assert config.append.startswith(tiny_guest.append)
        assert switch.address("a") == "10.0.0.1" and switch.iface("a") == "eth0"
        assert os.get_inheritable(fd) is False  # pass_fds hands it over, nothing else
        assert is_open(fd)
        # the argv builder accepts it and shows it
        assert f"dgram,id=lab,local.type=fd,local.str={fd}" in config.argv()
        switch.release("a")
        assert not is_open(fd)

        with pytest.raises(ValueError, match="already attached"):
            switch.attach(guest(tiny_guest, "a"))
        with pytest.raises(ValueError, match="named config"):
            switch.attach(tiny_guest.config())
        with pytest.raises(ValueError, match="ADDR/PREFIX"):
            switch.attach(guest(tiny_guest, "b"), ip="10.0.0.2")
        with pytest.raises(ValueError, match=r"already sets trio\.ip="):
            with_ip(config, "10.0.0.3/24")
        with pytest.raises(ValueError, match="netdev 'lab'"):
            Switch("lab").attach(config.replace(name="c"))
        assert switch.ports == ["a"]  # refused attaches left no port behind

    # a second NIC is eth1, and MACs are stable across runs and networks
    with Link("l1") as l1, Link("l2") as l2:
        twice = l2.attach(l1.attach(guest(tiny_guest, "x")), ip="192.168.7.1/24")
        assert l2.iface("x") == "eth1" and "trio.iface=eth1" in (twice.append or "")
        assert l1.mac("x") == mac_address("l1", "x") != l2.mac("x")
        assert len(twice.inherit_fds) == 2


def test_link_joins_two_and_refuses_a_third(tiny_guest: GuestImage, fd_guard: None) -> None:
    link = Link()
    a = link.attach(guest(tiny_guest, "a"))
    b = link.attach(guest(tiny_guest, "b"))
    (fa,), (fb,) = a.inherit_fds, b.inherit_fds
    with socket.socket(fileno=os.dup(fa)) as end_a, socket.socket(fileno=os.dup(fb)) as end_b:
        end_a.send(b"frame")  # the two ends are one socketpair
        assert end_b.recv(100) == b"frame"
    with pytest.raises(ValueError, match="joins two machines"):
        link.attach(guest(tiny_guest, "c"))
    link.close()
    with pytest.raises(NetworkError, match="closed"):
        link.attach(guest(tiny_guest, "d"))
    with pytest.raises(ValueError, match="QEMU id"):
        Link("0bad name")


def test_with_ip_needs_a_kernel() -> None:
    with pytest.raises(ValueError, match="boots a kernel"):
        with_ip(MachineConfig(name="x"), "10.0.0.1/24")
    config = with_ip(MachineConfig(kernel="/k"), "fd00::1/64", iface="eth1", hostname="h1")
    assert config.append == "trio.ip=fd00::1/64 trio.iface=eth1 trio.hostname=h1"


def test_parse_ping() -> None:
    output = (
        "PING 10.0.0.2 (10.0.0.2): 56 data bytes\n"
        "64 bytes from 10.0.0.2: seq=0 ttl=64 time=20.867 ms\n"
        "64 bytes from 10.0.0.2: seq=2 ttl=64 time=1.655 ms\n\n"
        "--- 10.0.0.2 ping statistics ---\n"
        "3 packets transmitted, 2 packets received, 33% packet loss\n"
        "round-trip min/avg/max = 1.655/11.261/20.867 ms\n"
    )
    result = parse_ping(output, 0)
    assert (result.transmitted, result.received, result.lost) == (3, 2, 1)
    assert result.rtts == (20.867, 1.655) and not result.ok
    with pytest.raises(NetworkError, match="no summary"):
        parse_ping("ping: bad address 'x'\n", 1)


def test_pcap_writer_is_bounded_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    frame = bytes(range(60))
    with PcapWriter(path, snaplen=40, max_bytes=24 + 2 * (16 + 40)) as writer:
        assert writer.write(frame, 1_700_000_000_123_456_789)
        assert writer.write(frame)
        assert not writer.write(frame)  # the file is full: counted, not written
        assert path.stat().st_size == writer.size == 24 + 2 * 56  # written through, no buffer
    assert (writer.frames, writer.not_captured) == (2, 1)
    records = list(read_pcap(path))
    assert [len(r.data) for r in records] == [40, 40]
    assert records[0].original_length == 60 and records[0].data == frame[:40]
    assert abs(records[0].timestamp - 1_700_000_000.123456) < 1e-6


def eth(dst: str, src: str, payload: bytes = b"x" * 46, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (local experimental EtherType by default)."""
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(src.replace(":", ""))
        + (ethertype.to_bytes(2, "big") + payload)
    )


BCAST = "ff:ff:ff:ff:ff:ff"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"


async def receive(sock: trio.socket.SocketType, timeout: float = 2.0) -> bytes | None:
    """The next frame at a Python peer, or None if none arrives within ``timeout``."""
    with trio.move_on_after(timeout):
        return await sock.recv(70000)
    return None


async def test_switch_forwarding_with_python_peers(fd_guard: None) -> None:
    """Learning, flooding, filtering, partition, loss, delay and link state, frame by frame."""
    with trio.fail_after(30):
        async with Switch("py", seed=1).running() as switch:
            a, b, c = (trio.socket.from_stdlib_socket(switch.add_port(name)) for name in "abc")
            with a, b, c:
                # broadcast floods to all others; the switch learns A
                await a.send(eth(BCAST, MAC_A))
                assert await receive(b) == await receive(c) == eth(BCAST, MAC_A)
                # unknown unicast floods; known unicast goes to one port only
                await b.send(eth(MAC_A, MAC_B))
                assert await receive(a) == eth(MAC_A, MAC_B)
                assert await receive(c, 0.2) is None
                assert switch.mac_table == {MAC_A: "a", MAC_B: "b"}
                await a.send(eth("02:00:00:00:00:99", MAC_A))  # unknown: flooded
                assert await receive(b) is not None and await receive(c) is not None

                switch.partition({"a", "b"}, {"c"})
                await c.send(eth(BCAST, MAC_C))
                await c.send(eth(MAC_A, MAC_C))
                assert await receive(a, 0.2) is None and await receive(b, 0.1) is None
                assert switch.stats("a").dropped_partition == 1
                await a.send(eth(MAC_B, MAC_A))
                assert await receive(b) == eth(MAC_B, MAC_A)
                switch.heal()
                await c.send(eth(MAC_A, MAC_C))
                assert await receive(a) == eth(MAC_A, MAC_C)

                switch.set_link("b", False)
                await a.send(eth(MAC_B, MAC_A))
                await b.send(eth(MAC_A, MAC_B))
                assert await receive(b, 0.2) is None and await receive(a, 0.1) is None
                assert switch.stats("b").dropped_down == 2  # one each way
                assert await receive(c) == eth(MAC_B, MAC_A)  # B forgotten: flooded
                assert MAC_B not in switch.mac_table
                switch.set_link("b", True)
                await b.send(eth(MAC_A, MAC_B))  # the switch learns B again
                assert await receive(a) == eth(MAC_A, MAC_B)
                await a.send(eth(MAC_B, MAC_A))
                assert await receive(b) == eth(MAC_B, MAC_A)

                switch.set_loss("b", 1.0, direction="out")
                await a.send(eth(MAC_B, MAC_A))
                assert await receive(b, 0.2) is None
                assert switch.stats("b").dropped_loss == 1
                switch.set_loss("b", 0.0)

                switch.set_delay("b", 0.3, direction="out")
                sent = trio.current_time()
                await a.send(eth(MAC_B, MAC_A))
                await a.send(eth(MAC_B, MAC_A, b"y" * 46))
                await a.send(eth(MAC_C, MAC_A))  # not delayed: once C has it, so has the line
                assert await receive(c) == eth(MAC_C, MAC_A)
                assert switch.delayed == 2
                assert await receive(b) == eth(MAC_B, MAC_A)  # in order, after the delay
                assert await receive(b) == eth(MAC_B, MAC_A, b"y" * 46)
                assert 0.3 <= trio.current_time() - sent < 1.5
                # a partition made while frames wait also stops them
                await a.send(eth(MAC_B, MAC_A))
                await a.send(eth(MAC_C, MAC_A))
                assert await receive(c) == eth(MAC_C, MAC_A)
                assert switch.delayed == 1
                switch.partition({"a"}, {"b", "c"})
                assert await receive(b, 0.6) is None
                assert switch.delayed == 0 and switch.stats("b").dropped_partition == 1

                switch.heal()
                await a.send(b"short")  # not Ethernet: counted, not forwarded
                await a.send(eth(MAC_C, MAC_A))  # handled after it, in order
                assert await receive(c) == eth(MAC_C, MAC_A)
                assert switch.stats("a").dropped_error == 1
        assert switch.closed


async def test_switch_never_buffers_without_bound(fd_guard: None) -> None:
    """Flood the switch from a Python peer towards a peer that never reads, once straight
    and once through a delay: its own queue stays within its bound, drops are counted and
    memory does not grow with the traffic."""
    frames = 20_000
    frame = eth(MAC_B, MAC_A, bytes(1000))
    with trio.fail_after(60):
        async with Switch("flood", max_delayed=100, max_delayed_bytes=64 << 10).running() as sw:
            source = trio.socket.from_stdlib_socket(sw.add_port("a"))
            sink = trio.socket.from_stdlib_socket(sw.add_port("b"))  # never read
            marker = trio.socket.from_stdlib_socket(sw.add_port("c"))
            with source, sink, marker:
                await source.send(eth(BCAST, MAC_A))  # let the switch learn A, B and C
                assert await receive(marker) == eth(BCAST, MAC_A)
                await sink.send(eth(MAC_A, MAC_B))
                await marker.send(eth(MAC_A, MAC_C))
                assert await receive(source) and await receive(source)
                rss_before = rss_kib()
                high_water = 0
                for round_ in range(2):
                    if round_ == 1:
                        sw.set_delay("b", 30.0)  # everything waits in the delay line
                    for _ in range(frames // 2):
                        await source.send(frame)
                        high_water = max(high_water, sw.delayed)
                        assert sw.delayed_bytes <= 64 << 10
                    # the switch handles a port's frames in order: once a marker sent
                    # after the flood arrives, it has handled the whole flood
                    await source.send(eth(MAC_C, MAC_A))
                    assert await receive(marker, 10) == eth(MAC_C, MAC_A)
                stats = sw.stats("b")
                assert sw.stats("a").rx_frames == 1 + frames + 2
                assert stats.tx_frames + stats.dropped + sw.delayed == 1 + frames
                assert stats.dropped_full > 0  # the unread peer's buffer filled up
                assert stats.dropped_delay > 0  # the delay line filled up
                assert high_water <= 100 and sw.delayed <= 100
                rss_after = rss_kib()
                print(
                    f"\nflood: delivered {stats.tx_frames}, dropped full "
                    f"{stats.dropped_full}, delay line full {stats.dropped_delay}; "
                    f"RSS {rss_before} -> {rss_after} KiB"
                )
                # 20 MB of frames went through, nearly all dropped: keeping even the frames
                # of one round would add 10 MB
                assert rss_after - rss_before < 4096, (rss_before, rss_after)  # KiB


def q35(name: str, **fields: object) -> MachineConfig:
    """A PCI machine that boots nothing (SeaBIOS idles): cheap, and takes a NIC."""
    return MachineConfig(name=name, machine="q35", memory=64, args=["-nodefaults"]).replace(
        **fields
    )


async def test_launch_failure_leaves_no_fd(fd_guard: None) -> None:
    """One machine cannot take the NIC (no PCI bus): the launch fails, the other machine is
    stopped, and every socketpair end is closed."""
    with trio.fail_after(60):
        with pytest.raises(LaunchError, match="bad") as caught:
            async with Switch().running() as switch:
                good = switch.attach(q35("good"))
                bad = switch.attach(MachineConfig(name="bad", machine="none"))
                async with switch.open_machines(good, bad):
                    raise AssertionError("the launch should have failed")
        assert "PCI" in str(caught.value)
        assert qemu_children() == set()


async def test_cancel_during_launch_leaves_no_fd(fd_guard: None) -> None:
    """Cancelled at once, during the launch, and once both machines run: no QEMU is left,
    and the fds are exactly those from before, every time."""
    fds_before = open_fds()
    with trio.fail_after(60):
        for delay in (0.0, 0.05, None):  # None: cancelled inside the block
            with trio.CancelScope() as scope:
                if delay is not None:
                    scope.deadline = trio.current_time() + delay
                async with Switch().running() as switch:
                    link = Link()
                    with link:
                        a = link.attach(switch.attach(q35("a")))
                        b = link.attach(switch.attach(q35("b")))
                        async with switch.open_machines(a, b) as machines:
                            assert len(qemu_children()) == 2
                            assert all(vm.is_running() for vm in machines)
                            scope.cancel()
                            await trio.sleep_forever()
            assert scope.cancelled_caught
            where = "cancelled in the block" if delay is None else f"cancelled after {delay} s"
            assert qemu_children() == set(), where
            now = open_fds()
            assert now == fds_before, f"{where}: " + fd_changes(fds_before, now)


# --- real guests ---------------------------------------------------------------------------------


async def test_ping_over_a_link_and_qemu_set_link(tiny_guest: GuestImage, fd_guard: None) -> None:
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with Link().running() as link:
            a = link.attach(guest(tiny_guest, "a"), ip="10.0.0.1/24")
            b = link.attach(guest(tiny_guest, "b"), ip="10.0.0.2/24")
            async with link.open_machines(a, b) as (va, vb):
                for fd in (*a.inherit_fds, *b.inherit_fds):
                    assert not is_open(fd)  # released: only the QEMUs hold the link now
                async with trio.open_nursery() as nursery:
                    for vm in (va, vb):
                        nursery.start_soon(vm.shell.wait_ready, BOOT_TIMEOUT)
                result = await va.shell.run("ping -c 3 -W 2 10.0.0.2", timeout=30)
                assert result.returncode == 0, result.stdout
                assert b"3 packets transmitted, 3 packets received" in result.stdout

                await link.set_nic_link(va, False)
                await wait_carrier(va, up=False, timeout=10)
                down = await ping(va, "10.0.0.2", count=2, interval=0.2, wait=1)
                assert down.received == 0 and down.returncode != 0
                await set_nic_link(va, link.nic_id(va), True)
                await wait_carrier(va, timeout=10)
                up = await ping(va, "10.0.0.2", count=3, interval=0.2)
                assert up.ok, up.output


async def test_three_guests_on_a_switch_partition_heal_and_capture(
    tiny_guest: GuestImage, tmp_path: Path, fd_guard: None
) -> None:
    pcap = tmp_path / "switch.pcap"
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with Switch(pcap=pcap).running() as switch:
            configs = [
                switch.attach(guest(tiny_guest, name), ip=f"10.0.0.{i}/24")
                for i, name in enumerate("abc", start=1)
            ]
            async with switch.open_machines(*configs) as vms:
                va, vb, vc = vms
                async with trio.open_nursery() as nursery:
                    for vm in vms:
                        nursery.start_soon(vm.shell.wait_ready, BOOT_TIMEOUT)
                addr = {vm.name: switch.address(vm) for vm in vms}

                # every guest pings both others (guests in parallel, targets in turn)
                failures: list[str] = []

                async def ping_others(vm: Machine) -> None:
                    for other in vms:
                        if other is not vm:
                            result = await ping(vm, addr[other.name], count=3, interval=0.2)
                            if not result.ok:
                                failures.append(f"{vm.name}->{other.name}: {result.output}")

                async with trio.open_nursery() as nursery:
                    for vm in vms:
                        nursery.start_soon(ping_others, vm)
                assert not failures

                switch.partition({va, vb}, {vc})
                results = {}

                async def run(key: str, vm: Machine, target: str) -> None:
                    results[key] = await ping(vm, target, count=2, interval=0.2, wait=1)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run, "a->c", va, addr["c"])
                    nursery.start_soon(run, "b->a", vb, addr["a"])
                    nursery.start_soon(run, "c->b", vc, addr["b"])
                assert results["a->c"].received == 0 and results["a->c"].returncode != 0
                assert results["c->b"].received == 0
                assert results["b->a"].ok
                assert switch.stats("c").dropped_partition > 0

                switch.heal()
                healed = await ping(va, addr["c"], count=3, interval=0.2)
                assert healed.ok, healed.output  # at once: every reply, no retry loop

        count, echoes = parse_capture(pcap)
        assert count > 0
        mac = {name: switch.mac(name) for name in "abc"}
        # a pinged b (3 requests, 3 replies) and b pinged a twice (3 + 2, all answered)
        a_to_b = [e for e in echoes if (e.src_ip, e.dst_ip) == ("10.0.0.1", "10.0.0.2")]
        b_to_a = [e for e in echoes if (e.src_ip, e.dst_ip) == ("10.0.0.2", "10.0.0.1")]
        assert {(e.src_mac, e.dst_mac) for e in a_to_b} == {(mac["a"], mac["b"])}
        assert {(e.src_mac, e.dst_mac) for e in b_to_a} == {(mac["b"], mac["a"])}
        requests = [e.type for e in a_to_b].count(8)
        replies = [e.type for e in b_to_a].count(0)
        assert requests == replies == 3, echoes
        assert [e.type for e in b_to_a].count(8) == [e.type for e in a_to_b].count(0) == 5
        # during the partition, a's requests to c reached the switch but never c's replies
        a_to_c = [e.type for e in echoes if (e.src_ip, e.dst_ip) == ("10.0.0.1", "10.0.0.3")]
        c_to_a = [e.type for e in echoes if (e.src_ip, e.dst_ip) == ("10.0.0.3", "10.0.0.1")]
        assert a_to_c.count(8) == 3 + 2 + 3 and c_to_a.count(0) == 3 + 3
        assert [r.data for r in read_pcap(pcap)][: len(echoes)]  # the library reads it too

        tshark = shutil.which("tshark")
        if tshark is not None:  # not installed here: this sub-check runs where it is
            shown = await trio.run_process(
                [tshark, "-r", str(pcap), "-Y", "icmp"], capture_stdout=True, check=True
            )
            assert b"10.0.0.1" in shown.stdout and b"Echo (ping) request" in shown.stdout


async def test_loss_delay_and_link_down_at_the_switch(
    tiny_guest: GuestImage, fd_guard: None
) -> None:
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with Switch(seed=5).running() as switch:
            a = switch.attach(guest(tiny_guest, "a"), ip="10.0.0.1/24")
            b = switch.attach(guest(tiny_guest, "b"), ip="10.0.0.2/24")
            async with switch.open_machines(a, b) as (va, vb):
                async with trio.open_nursery() as nursery:
                    for vm in (va, vb):
                        nursery.start_soon(vm.shell.wait_ready, BOOT_TIMEOUT)
                first = await ping(va, "10.0.0.2", count=2, interval=0.2)  # ARP resolved
                assert first.ok, first.output

                switch.set_loss("b", 1.0)
                lost = await ping(va, "10.0.0.2", count=2, interval=0.2, wait=1)
                assert lost.received == 0 and lost.returncode != 0
                assert switch.stats("b").dropped_loss >= 2

                switch.set_loss("b", 0.3)  # both ways: a round trip survives ~49% of the time
                some = await ping(va, "10.0.0.2", count=20, interval=0.1, wait=1)
                assert some.transmitted == 20
                assert 3 <= some.received <= 17, some.output
                print(f"\nloss 0.3 both ways: {some.received}/20 replies")
                switch.set_loss("b", 0.0)

                switch.set_delay("b", 0.1)  # 0.1 s each way
                slow = await ping(va, "10.0.0.2", count=2, interval=0.3)
                assert slow.ok and all(200 <= rtt < 1000 for rtt in slow.rtts), slow.rtts
                switch.set_delay("b", 0)

                switch.set_link("b", False)
                down = await ping(va, "10.0.0.2", count=2, interval=0.2, wait=1)
                assert down.received == 0
                assert switch.stats("b").dropped_down > 0
                switch.set_link("b", True)
                back = await ping(va, "10.0.0.2", count=3, interval=0.2)
                assert back.ok, back.output
