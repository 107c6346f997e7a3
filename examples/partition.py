"""Three guests on a trio_qemu switch: ping, partition, heal, and read the packet capture.

Run: .venv/bin/python examples/partition.py [--pcap PATH]

The switch is a Trio task in this process. ``partition({a, b}, {c})`` stops every frame
between the groups at once, ``heal()`` lets them through again at once; the switch records
every frame it receives into a classic pcap file (open it with ``tshark -r PATH`` or
Wireshark), summarised at the end.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import tempfile
from pathlib import Path

import trio

import trio_qemu
from trio_qemu import Machine
from trio_qemu.network import PingResult, Switch, ping, read_pcap

ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6"}


async def ping_all(switch: Switch, vms: list[Machine]) -> dict[tuple[str, str], PingResult]:
    """Every guest pings every other one; guests in parallel, each one's targets in turn."""
    results: dict[tuple[str, str], PingResult] = {}

    async def from_one(vm: Machine) -> None:
        for other in vms:
            if other is not vm:
                target = switch.address(other)
                results[vm.name, other.name] = await ping(
                    vm, target, count=2, interval=0.2, wait=1
                )

    async with trio.open_nursery() as nursery:
        for vm in vms:
            nursery.start_soon(from_one, vm)
    return results


def show(title: str, results: dict[tuple[str, str], PingResult]) -> None:
    print(title)
    for (source, target), result in sorted(results.items()):
        rtts = ", ".join(f"{rtt:.1f}" for rtt in result.rtts) or "-"
        state = "ok  " if result.ok else "FAIL"
        print(f"  {source} -> {target}: {state} {result.received}/{result.transmitted} ({rtts} ms)")


def summarise(path: Path) -> None:
    """Count the captured frames by protocol and list the ICMP echo conversations."""
    kinds: collections.Counter[str] = collections.Counter()
    echoes: collections.Counter[str] = collections.Counter()
    records = list(read_pcap(path))
    for record in records:
        frame = record.data
        ethertype = int.from_bytes(frame[12:14], "big")
        kind = ETHERTYPES.get(ethertype, f"0x{ethertype:04x}")
        if ethertype == 0x0800 and frame[23] == 1:
            header = (frame[14] & 0x0F) * 4
            icmp_type = {8: "request", 0: "reply"}.get(frame[14 + header], "other")
            source = ipaddress.IPv4Address(frame[26:30])
            target = ipaddress.IPv4Address(frame[30:34])
            echoes[f"{source} -> {target} echo {icmp_type}"] += 1
            kind = "ICMP"
        kinds[kind] += 1
    span = records[-1].timestamp - records[0].timestamp if records else 0.0
    print(f"capture {path}: {len(records)} frames over {span:.1f} s, {path.stat().st_size} bytes")
    print("  by protocol: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    for line, count in sorted(echoes.items()):
        print(f"  {line}: {count}")


async def main(pcap: Path) -> None:
    image = await trio_qemu.ensure_guest()
    async with Switch("lan", pcap=pcap).running() as switch:
        configs = [
            switch.attach(image.config(name=name, memory=128), ip=f"10.0.0.{i}/24")
            for i, name in enumerate("abc", start=1)
        ]
        async with switch.open_machines(*configs) as vms:
            async with trio.open_nursery() as nursery:
                for vm in vms:
                    nursery.start_soon(vm.shell.wait_ready, 90.0)
            va, vb, vc = vms
            show("all connected:", await ping_all(switch, vms))

            switch.partition({va, vb}, {vc})
            show("partitioned {a, b} | {c}:", await ping_all(switch, vms))

            switch.heal()
            show("healed:", await ping_all(switch, vms))

            for name, stats in switch.all_stats().items():
                print(
                    f"port {name}: in {stats.rx_frames}, out {stats.tx_frames}, dropped by "
                    f"the partition {stats.dropped_partition}, other drops "
                    f"{stats.dropped - stats.dropped_partition}"
                )
    summarise(pcap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pcap", type=Path, help="where to write the capture")
    options = parser.parse_args()
    if options.pcap is not None:
        trio.run(main, options.pcap)
    else:
        with tempfile.TemporaryDirectory() as directory:
            trio.run(main, Path(directory) / "partition.pcap")
