"""Live-migrate a running guest that counts in a loop; it keeps counting on the destination.

The tiny guest (built or taken from the cache) boots on a source machine and starts a
counter in the background. A destination with the same config plus ``-incoming defer`` is
launched, the guest is migrated over a socketpair (no port, no path), and the counter is read
on the destination before and after a second of guest time: it went on from where it was.

Run: .venv/bin/python examples/migrate.py
"""

from __future__ import annotations

import trio

import trio_qemu
from trio_qemu.migration import incoming_config, migrate

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


async def read_counter(vm: trio_qemu.Machine, pause: float = 0) -> int:
    """The guest's counter, read after ``pause`` seconds of waiting inside the guest."""
    wait = f"sleep {pause}; " if pause else ""
    result = await vm.shell.run(f"{wait}cat /tmp/count", check=True, timeout=30)
    return int(result.stdout)


async def main() -> None:
    image = await trio_qemu.ensure_guest()
    config = image.config(name="source", memory=128)
    async with trio_qemu.open_machines(config, incoming_config(config)) as (src, dst):
        await src.shell.wait_ready(timeout=120)
        await src.shell.run(f"sh -c '{COUNTER}' >/dev/null 2>&1 &", check=True)
        before = await read_counter(src, pause=0.5)
        print(f"{src.name}: the guest counts; at {before} before the migration")

        stats = await migrate(src, dst, timeout=60)
        ram = stats["ram"]
        print(
            f"migrated {src.name} -> {dst.name} in {stats['total-time']} ms, "
            f"downtime {stats['downtime']} ms, {ram['transferred'] / 1e6:.1f} MB sent "
            f"of {ram['total'] / 2**20:.0f} MiB RAM"
        )
        status = {vm.name: (await vm.cmd("query-status"))["status"] for vm in (src, dst)}
        print(f"status: {status}")

        first = await read_counter(dst)
        second = await read_counter(dst, pause=1)
        print(f"{dst.name}: the counter went on: {first} -> {second}")
        assert before <= first < second, (before, first, second)


if __name__ == "__main__":
    trio.run(main)
