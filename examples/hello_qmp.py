"""Launch a QEMU, ask its version, stop and continue it while watching the events.

Run: .venv/bin/python examples/hello_qmp.py
"""

from __future__ import annotations

import trio

import trio_qemu


async def main() -> None:
    config = trio_qemu.MachineConfig(machine="none", args=["-nodefaults"])
    started = trio.current_time()
    async with trio_qemu.open_machine(config) as vm:
        print(f"{vm.name}: pid {vm.pid}, QMP ready in {trio.current_time() - started:.3f} s")
        version = await vm.cmd("query-version")
        qemu = version["qemu"]
        print(f"QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']} ({version['package']})")

        async with vm.subscribe("STOP", "RESUME") as events:  # subscribe, then act
            for command in ("stop", "cont"):
                await vm.cmd(command)
                event = await events.receive()
                print(f"{command:>4} -> {event['event']} at {event['timestamp']['seconds']}")
        print("status:", (await vm.cmd("query-status"))["status"])
    print(f"QEMU exited with status {vm.returncode}; temp dir removed: {not vm.temp_dir.exists()}")


if __name__ == "__main__":
    trio.run(main)
