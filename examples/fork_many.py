"""Boot once, fork many: a prepared template of the tiny guest, then four clones at once.

The template is the tiny guest booted once, prepared (a file written in it) and saved; it is
cached, so the second run of this script skips the boot. Four clones are then restored from
it concurrently; each finds the prepared file, writes a file of its own that the others do
not see, and reports its own boot id. The timings printed are from this run.

Run: .venv/bin/python examples/fork_many.py
"""

from __future__ import annotations

import time

import trio

import trio_qemu
from trio_qemu.snapshot import ensure_template, open_clones

CLONES = 4


async def prepare(vm: trio_qemu.Machine) -> None:
    """Runs once, in the template; every clone starts from what it did."""
    await vm.shell.run("echo 'prepared once, in the template' > /root/prepared", check=True)


async def main() -> None:
    image = await trio_qemu.ensure_guest()
    start = time.perf_counter()
    template = await ensure_template(
        image.config(memory=256), prepare=prepare, key="fork_many-v1", progress=print
    )
    print(f"template {template.key} ready in {time.perf_counter() - start:.2f} s "
          f"(made in {template.made_in:.2f} s, {template.path})")  # fmt: skip

    start = time.perf_counter()
    async with open_clones(template, CLONES, name="clone") as vms:
        opened = time.perf_counter() - start
        print(f"{CLONES} clones restored and running after {opened * 1e3:.0f} ms")
        answered: dict[str, float] = {}

        async def work(vm: trio_qemu.Machine) -> None:
            command = (
                f"cat /root/prepared; echo {vm.name} > /root/me; "
                "cat /root/me; cat /proc/sys/kernel/random/boot_id"
            )
            result = await vm.shell.run(command, check=True, timeout=60)
            answered[vm.name] = time.perf_counter() - start
            print(f"  {vm.name}: {result.stdout.decode().strip().replace(chr(10), ' | ')}")

        async with trio.open_nursery() as nursery:
            for vm in vms:
                nursery.start_soon(work, vm)
        print(f"all {CLONES} answered a command within {max(answered.values()) * 1e3:.0f} ms")
    print(f"all {CLONES} clones shut down after {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    trio.run(main)
