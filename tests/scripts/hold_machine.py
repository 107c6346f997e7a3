"""Helper for test_reliability.py: hold a machine until this process is killed.

Usage: ``python hold_machine.py BASE_TEMP_DIR``. Launches a ``-machine none`` machine with a
console whose temporary directory goes under BASE_TEMP_DIR, prints ``PID <qemu pid>``,
``TEMP <its temp dir>`` and ``READY`` (flushed) once QMP answers, then sleeps. The test
SIGKILLs this process to see what is left behind when nothing of ours can run any more.
"""

from __future__ import annotations

import sys

import trio

import trio_qemu


async def main(base: str) -> None:
    async with trio_qemu.open_machine(
        machine="none", console=True, args=["-nodefaults"], base_temp_dir=base
    ) as vm:
        await vm.cmd("query-status")
        print(f"PID {vm.pid}", flush=True)
        print(f"TEMP {vm.temp_dir}", flush=True)
        print("READY", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
