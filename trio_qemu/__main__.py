"""The command line: ``python -m trio_qemu {demo,guest,run}``.

- ``demo``: boot two tiny guests concurrently, run commands, show events and timings.
- ``guest build`` / ``guest path``: build (or reuse) the tiny guest; print its files.
- ``run [--console] [--timeout S] -- QEMU-ARGS...``: launch QEMU under supervision, stream
  its console to the terminal and its QMP events as JSON lines; Ctrl-C tears it all down.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import trio

from ._config import MachineConfig
from ._demo import run_demo
from ._errors import MachineError
from ._machine import Machine, open_machine
from .guest import ensure_guest


def _print(line: str) -> None:
    print(line, flush=True)


async def _guest(action: str) -> None:
    image = await ensure_guest(progress=lambda line: print(line, file=sys.stderr, flush=True))
    if action == "path":
        print(f"kernel {image.kernel}\ninitrd {image.initrd}\nappend {image.append}")
    else:
        print(f"guest {image.version} ready: {image.kernel.parent}")


async def _stream_console(vm: Machine) -> None:
    out = sys.stdout.buffer
    async for line in vm.console:
        out.write(line + b"\n")
        out.flush()


async def _stream_events(vm: Machine) -> None:
    async with vm.subscribe() as events:
        async for event in events:
            print(json.dumps(event), flush=True)


async def _run(qemu_args: Sequence[str], console: bool, timeout: float | None) -> int:
    config = MachineConfig(args=tuple(qemu_args), console=console, accel=None)
    async with open_machine(config) as vm, trio.open_nursery() as nursery:
        print(f"# {' '.join(vm.argv)}", file=sys.stderr, flush=True)
        nursery.start_soon(_stream_events, vm)
        if console:
            nursery.start_soon(_stream_console, vm)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await vm.wait(timeout=None)
        if vm.is_running():  # --timeout passed: stop it the graceful way
            print(f"# stopping after {timeout} s", file=sys.stderr, flush=True)
            await vm.shutdown()
        nursery.cancel_scope.cancel()
    return vm.returncode or 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_qemu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="boot two tiny guests concurrently and drive them")
    guest = sub.add_parser("guest", help="the tiny test guest")
    guest.add_argument("action", choices=("build", "path"))
    run = sub.add_parser("run", help="launch QEMU under supervision")
    run.add_argument("--console", action="store_true", help="stream a serial console")
    run.add_argument("--timeout", type=float, default=None, help="stop QEMU after S seconds")
    run.add_argument("qemu_args", nargs=argparse.REMAINDER, help="arguments for QEMU")
    options = parser.parse_args(argv)
    try:
        if options.command == "demo":
            trio.run(run_demo, _print)
        elif options.command == "guest":
            trio.run(_guest, options.action)
        else:
            args = [a for a in options.qemu_args if a != "--"] if options.qemu_args else []
            return trio.run(_run, args, options.console, options.timeout)
    except MachineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
