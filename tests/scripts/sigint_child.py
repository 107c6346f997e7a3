"""Helper for test_machine.py's Ctrl-C test: run a machine, then sleep until interrupted.

Prints ``PID <qemu pid>`` and ``READY`` (flushed) once the machine answers QMP, then
sleeps forever. On SIGINT, Trio raises KeyboardInterrupt, ``open_machine`` tears the
machine down, and ``RETURNCODE <qemu's exit status>`` is printed to stderr before the
KeyboardInterrupt leaves the interpreter uncaught (Python then exits by SIGINT itself).
"""

from __future__ import annotations

import sys

import trio

import trio_qemu


async def main() -> None:
    machine: trio_qemu.Machine | None = None
    try:
        async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
            machine = vm
            await vm.cmd("query-status")
            print(f"PID {vm.pid}", flush=True)
            print("READY", flush=True)
            await trio.sleep_forever()
    finally:
        if machine is not None:
            print(f"RETURNCODE {machine.returncode}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    trio.run(main)
