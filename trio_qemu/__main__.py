"""The command line: ``python -m trio_qemu {demo,guest,run,clean}``.

- ``demo``: boot two tiny guests concurrently, run commands, show events and timings.
- ``guest build`` / ``guest path``: build (or reuse) the tiny guest; print its files.
- ``run [--console] [--timeout S] -- QEMU-ARGS...``: launch QEMU under supervision, stream
  its console to the terminal and its QMP events as JSON lines; Ctrl-C tears it all down.
- ``clean [--dry-run] [--base DIR]``: remove machine directories left behind by
  controllers that were killed; print them.

Ctrl-C (or SIGTERM) tears everything down and exits with status 130 (143) and one line; a
trio_qemu error prints one ``error: ...`` and exits with 1; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from ._config import MachineConfig
from ._demo import run_demo
from ._errors import MachineError
from ._machine import Machine
from ._openers import open_machine
from ._tempdirs import remove_stale_dirs
from ._util import keyboard_interrupt_in
from .guest import ensure_guest

T = TypeVar("T")

#: Exit statuses for a run ended by SIGINT / SIGTERM, as a shell reports them.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(Exception):
    """SIGTERM arrived: everything was torn down as for Ctrl-C."""


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
        print(f"# pid {vm.pid}: {' '.join(vm.argv)}", file=sys.stderr, flush=True)
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


async def _terminate_on_sigterm(*, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            raise Terminated


async def _main_task(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run ``fn(*args)``; a SIGTERM cancels it and raises :class:`Terminated`."""
    async with trio.open_nursery() as nursery:
        await nursery.start(_terminate_on_sigterm)
        result = await fn(*args)
        nursery.cancel_scope.cancel()
    return result


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _sole(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The one ``kind`` error ``exc`` is or holds (Cancelled aside), or None."""
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    if len(leaves) == 1 and isinstance(leaves[0], kind):
        return leaves[0]
    return None


def _clean(base: str | None, dry_run: bool) -> int:
    where = base if base is not None else tempfile.gettempdir()
    if not os.path.isdir(where):
        print(f"error: {where} is not a directory", file=sys.stderr)
        return 1
    found = remove_stale_dirs(where, dry_run=dry_run)
    for path in found:
        print(f"{'would remove' if dry_run else 'removed'} {path}")
    if not found:
        print(f"no stale machine directories in {where}")
    return 0


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
    clean = sub.add_parser("clean", help="remove machine directories of dead controllers")
    clean.add_argument("--dry-run", action="store_true", help="only print what would go")
    clean.add_argument(
        "--base", default=None, help="the base temporary directory (default: the system one)"
    )
    options = parser.parse_args(argv)
    try:
        if options.command == "demo":
            trio.run(_main_task, run_demo, _print)
        elif options.command == "guest":
            trio.run(_main_task, _guest, options.action)
        elif options.command == "clean":
            return _clean(options.base, options.dry_run)
        else:
            args = [a for a in options.qemu_args if a != "--"] if options.qemu_args else []
            return trio.run(_main_task, _run, args, options.console, options.timeout)
    except BaseException as exc:
        # Ctrl-C may come bare or inside groups of the tasks it passed through.
        if keyboard_interrupt_in(exc) is not None:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if _sole(exc, Terminated) is not None:
            print("terminated", file=sys.stderr)
            return EXIT_TERMINATED
        error = _sole(exc, MachineError)
        if error is None:
            raise  # a bug: show its traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
