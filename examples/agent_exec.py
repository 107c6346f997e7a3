"""Boot the tiny guest with the QEMU guest agent, run commands and move files through it.

The first run builds the guest (about 77 MB of Debian packages); later runs reuse it.
Run: .venv/bin/python examples/agent_exec.py
"""

from __future__ import annotations

import trio

import trio_qemu
from trio_qemu.agent import open_agent
from trio_qemu.guest import ensure_guest


async def main() -> None:
    image = await ensure_guest(agent=True, progress=print)
    async with trio_qemu.open_machine(image.config(name="agent-demo")) as vm:
        started = trio.current_time()
        async with open_agent(vm, ready_timeout=60) as agent:
            info = await agent.info()
            print(f"qemu-ga {info['version']} answered {trio.current_time() - started:.2f} s "
                  f"after QMP, {len(info['supported_commands'])} commands")  # fmt: skip

            result = await agent.exec(["uname", "-sr"])
            print(f"{result.command}: {result.stdout.decode().strip()} (exit {result.returncode})")
            result = await agent.exec(["sh", "-c", "echo to stderr >&2; exit 3"])
            print(f"{result.command}: exit {result.returncode}, stderr {result.stderr!r}")
            result = await agent.exec(["tr", "a-z", "A-Z"], input=b"shouting\n")
            print(f"{result.command} <<< shouting: {result.stdout!r}")

            payload = bytes(range(256)) * 400  # 100 KiB of every byte value
            before = trio.current_time()
            await agent.write_file("/tmp/payload.bin", payload)
            back = await agent.read_file("/tmp/payload.bin")
            print(f"100 KiB there and back in {trio.current_time() - before:.3f} s, "
                  f"identical: {back == payload}")  # fmt: skip

            # guest-shutdown gets no reply when it works; QEMU exits (-no-reboot). Waiting
            # for the exit first tells the machine that it is expected.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vm.wait, 30)
                await trio.lowlevel.checkpoint()  # let vm.wait begin
                await agent.shutdown()
    print(f"QEMU exited with status {vm.returncode}")


if __name__ == "__main__":
    trio.run(main)
