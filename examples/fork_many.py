"""Boot once, fork many: a prepared template of the tiny guest, then four clones at once, on
a switch, each with its own MAC, address and host name.

The template is the tiny guest booted once with a NIC on the switch's network but no
address (``switch.attach_template``), prepared (a file written in it) and saved; it is
cached, so the second run of this script skips the boot. Four clones are then attached to
the switch, each with its own address, and restored concurrently (``switch.open_clones``
sets each one's MAC, address and host name right after its restore). Each finds the
prepared file, writes a file of its own that the others do not see, reports its own boot
id and identity, and pings the next clone by its address. The timings printed are from
this run.

Run: .venv/bin/python examples/fork_many.py
"""

from __future__ import annotations

import time

import trio

import trio_qemu
from trio_qemu.network import Switch, ping
from trio_qemu.snapshot import ensure_template

CLONES = 4


async def prepare(vm: trio_qemu.Machine) -> None:
    """Runs once, in the template; every clone starts from what it did."""
    await vm.shell.run("echo 'prepared once, in the template' > /root/prepared", check=True)


async def main() -> None:
    image = await trio_qemu.ensure_guest()
    async with Switch("lab").running() as switch:
        start = time.perf_counter()
        template = await ensure_template(
            switch.attach_template(image.config(memory=256)),
            prepare=prepare,
            key="fork_many-v2",
            progress=print,
        )
        print(f"template {template.key} ready in {time.perf_counter() - start:.2f} s "
              f"(made in {template.made_in:.2f} s, {template.path})")  # fmt: skip

        configs = [
            switch.attach(template.config(name=f"clone{i}"), ip=f"10.0.0.{i + 1}/24")
            for i in range(CLONES)
        ]
        start = time.perf_counter()
        async with switch.open_clones(template, *configs) as vms:
            opened = time.perf_counter() - start
            print(f"{CLONES} clones restored, running, with their own identity after "
                  f"{opened * 1e3:.0f} ms")  # fmt: skip
            answered: dict[str, float] = {}

            async def work(i: int, vm: trio_qemu.Machine) -> None:
                command = (
                    f"cat /root/prepared; echo {vm.name} > /root/me; cat /root/me; "
                    "cat /proc/sys/kernel/random/boot_id; hostname; "
                    "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0"
                )
                result = await vm.shell.run(command, check=True, timeout=60)
                peer = vms[(i + 1) % CLONES]
                reply = await ping(vm, switch.address(peer), count=1)
                answered[vm.name] = time.perf_counter() - start
                lines = result.stdout.decode().strip().splitlines()
                lines[-1] = lines[-1].split()[3]  # the address, from ip's one-line output
                print(f"  {vm.name}: {' | '.join(lines)} | ping {peer.name}: "
                      f"{'ok' if reply.ok else 'LOST'}")  # fmt: skip

            async with trio.open_nursery() as nursery:
                for i, vm in enumerate(vms):
                    nursery.start_soon(work, i, vm)
            print(f"all {CLONES} answered and pinged a neighbour within "
                  f"{max(answered.values()) * 1e3:.0f} ms")  # fmt: skip
        print(f"all {CLONES} clones shut down after {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    trio.run(main)
