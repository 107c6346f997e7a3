"""Two tiny guests joined by a point-to-point link; one pings the other.

Run: .venv/bin/python examples/two_guests_ping.py [--switch] [--count N]

The link is one datagram socketpair, an end inherited by each QEMU: no root, no TAP device,
no port, no path. ``--switch`` puts the two guests on a trio_qemu switch (a Trio task in
this process) instead, to compare the round trips. Each guest gets its address from the
kernel command line (``trio.ip=``), so the ping can start as soon as the shells answer.
"""

from __future__ import annotations

import argparse
import statistics

import trio

import trio_qemu
from trio_qemu.network import Link, Switch, ping


async def main(use_switch: bool, count: int) -> None:
    image = await trio_qemu.ensure_guest()
    network: Link | Switch = Switch("sw") if use_switch else Link("wire")
    started = trio.current_time()
    async with network.running():
        a = network.attach(image.config(name="a", memory=128), ip="10.0.0.1/24")
        b = network.attach(image.config(name="b", memory=128), ip="10.0.0.2/24")
        async with network.open_machines(a, b) as (va, vb):  # booted concurrently
            async with trio.open_nursery() as nursery:
                for vm in (va, vb):
                    nursery.start_soon(vm.shell.wait_ready, 90.0)
            print(f"both guests ready in {trio.current_time() - started:.1f} s")
            print(f"a: {network.mac('a')} {network.address('a')}")
            print(f"b: {network.mac('b')} {network.address('b')}")

            result = await ping(va, network.address("b"), count=count, interval=0.2)
            kind = "switch" if use_switch else "link"
            print(f"ping a -> b over the {kind}: {result.received}/{result.transmitted} replies")
            print("round trips (ms):", " ".join(f"{rtt:.2f}" for rtt in result.rtts))
            if len(result.rtts) > 1:
                steady = result.rtts[1:]  # the first includes ARP
                print(
                    f"after the first: median {statistics.median(steady):.2f} ms, "
                    f"min {min(steady):.2f}, max {max(steady):.2f}"
                )
            if isinstance(network, Switch):
                stats = network.stats("a")
                print(f"switch port a: {stats.rx_frames} frames in, {stats.tx_frames} out")
    print(f"done in {trio.current_time() - started:.1f} s; QEMUs exited, fds closed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", action="store_true", help="use a switch, not a link")
    parser.add_argument("--count", type=int, default=10, help="pings to send (default 10)")
    options = parser.parse_args()
    trio.run(main, options.switch, options.count)
