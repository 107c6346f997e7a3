"""Take a screenshot of a VM's display and ask HMP about it.

Run: .venv/bin/python examples/screenshot_hmp.py [out.png]
"""

from __future__ import annotations

import struct
import sys

import trio

import trio_qemu


async def main(path: str) -> None:
    # display=True gives the machine a VGA device (QEMU still runs with -display none).
    async with trio_qemu.open_machine(machine="q35", display=True, args=["-nodefaults"]) as vm:
        saved = await vm.screenshot(path)
        width, height = struct.unpack(">II", saved.read_bytes()[16:24])
        print(f"screenshot: {saved} ({width}x{height} PNG)")
        print("HMP info version:", (await vm.hmp("info version")).strip())
        print("HMP info status: ", (await vm.hmp("info status")).strip())


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "screen.png")
