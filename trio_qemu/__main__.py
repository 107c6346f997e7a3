"""The command line: ``python -m trio_qemu {demo,guest,run,clean,template}``.

- ``demo``: boot two tiny guests concurrently, run commands, show events and timings.
- ``guest build`` / ``guest path``: build (or reuse) the tiny guest; print its files.
- ``run [--console] [--timeout S] -- QEMU-ARGS...``: launch QEMU under supervision, stream
  its console to the terminal and its QMP events as JSON lines; Ctrl-C tears it all down.
- ``clean [--dry-run] [--base DIR]``: remove machine directories left behind by
  controllers that were killed; print them.
- ``template build`` / ``template list`` / ``template clear [--key K]``: make (or reuse)
  the tiny guest's template (:mod:`trio_qemu.snapshot`) and print its key and directory;
  list the cached templates; remove them (all, or the one named), skipping one that a
  maker holds locked.

Ctrl-C (or SIGTERM) tears everything down and exits with status 130 (143) and one line; a
trio_qemu error prints one ``error: ...`` and exits with 1; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from ._config import MachineConfig
from ._demo import run_demo
from ._errors import MachineError
from ._machine import Machine
from ._openers import open_machine
from ._tempdirs import remove_stale_dirs
from ._util import keyboard_interrupt_in
from .guest import default_cache_dir, ensure_guest
from .snapshot import TEMPLATES_DIR, ensure_template

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


# -- templates ---------------------------------------------------------------------------------

#: A maker's build directory or a removed template on its way out: ``.build-<key>-<random>``.
_LEFT_OVER = re.compile(r"^\.(?:build|trash)-(?P<key>[^.-]+)-[^-]+$")


def _templates_root() -> Path:
    return default_cache_dir() / TEMPLATES_DIR


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _template_build() -> None:
    image = await ensure_guest(progress=_stderr)
    template = await ensure_template(image.config(), progress=_stderr)
    made_in = f" (made in {template.made_in:.1f} s)" if template.made_in is not None else ""
    print(f"template {template.key} ready{made_in}: {template.path}")


def _disk_usage(path: Path) -> int:
    """Bytes ``path`` (a file or a directory tree) takes on disk: the RAM file is sparse."""
    total = 0
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        with contextlib.suppress(OSError):
            total += entry.lstat().st_blocks * 512
    return total


def _mib(size: int | float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _template_line(path: Path) -> str:
    """One line about the template in ``path``, from its ``manifest.json``."""
    disk = f"{_mib(_disk_usage(path))} on disk"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return f"{path.name}  unusable: no readable manifest ({exc})  {disk}"
    parts = [path.name]
    created = manifest.get("created")
    if isinstance(created, int | float):
        parts.append(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)))
    made_in = manifest.get("made_in")
    if isinstance(made_in, int | float):
        parts.append(f"made in {made_in:.1f} s")
    ram: Any = manifest.get("ram")
    if isinstance(ram, dict) and isinstance(ram.get("size"), int):
        parts.append(f"memory {ram['size'] >> 20} MiB")
    parts.append(disk)
    signature: Any = manifest.get("signature")
    if isinstance(signature, dict) and signature.get("key") is not None:
        parts.append(f"key={signature['key']}")
    return "  ".join(parts)


def _template_list() -> int:
    root = _templates_root()
    entries = root.iterdir() if root.is_dir() else iter(())
    found = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    for path in found:
        print(_template_line(path))
    if not found:
        print(f"no templates in {root}")
    return 0


def _template_keys(root: Path) -> set[str]:
    """The keys of the templates in ``root``, their lock files and their left-overs."""
    keys = set()
    for entry in root.iterdir():
        if entry.name.endswith(".lock") and entry.is_file():
            keys.add(entry.name.removesuffix(".lock"))
        elif (match := _LEFT_OVER.match(entry.name)) is not None:
            keys.add(match.group("key"))
        elif not entry.name.startswith("."):
            keys.add(entry.name)
    return keys


def _remove_tree(path: Path) -> None:
    """Delete ``path``; a template is first moved out of the way in one step, so that
    nobody sees half of one (running clones keep their private mapping of its RAM file)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    if not path.name.startswith("."):
        trash = path.with_name(f".trash-{path.name}-{os.urandom(4).hex()}")
        os.rename(path, trash)
        path = trash
    shutil.rmtree(path)


def _clear_one(root: Path, key: str) -> int | None:
    """Remove template ``key`` and its left-overs under its lock; the bytes it took on disk,
    or None when a maker holds the lock."""
    lock = root / f"{key}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        freed = 0
        for entry in root.iterdir():
            match = _LEFT_OVER.match(entry.name)
            if entry.name == key or (match is not None and match.group("key") == key):
                freed += _disk_usage(entry)
                _remove_tree(entry)
        # Still holding the lock: a maker waiting on this lock file notices that it was
        # removed and locks a new one.
        lock.unlink()
        return freed
    finally:
        os.close(fd)


def _template_clear(key: str | None) -> int:
    root = _templates_root()
    keys = _template_keys(root) if root.is_dir() else set()
    if key is not None:
        if key not in keys:
            print(f"error: no template {key} in {root}", file=sys.stderr)
            return 1
        keys = {key}
    if not keys:
        print(f"no templates in {root}")
        return 0
    status = 0
    for each in sorted(keys):
        existed = (root / each).exists()
        freed = _clear_one(root, each)
        if freed is None:
            print(f"skipped {each}: a maker holds its lock (it is being made now)", file=sys.stderr)
            status = 1
        elif existed:
            print(f"removed {each} ({_mib(freed)})")
    return status


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
    template = sub.add_parser("template", help="templates of the tiny guest, to clone")
    actions = template.add_subparsers(dest="action", required=True)
    actions.add_parser("build", help="make (or reuse) the tiny guest's template")
    actions.add_parser("list", help="list the cached templates")
    clear = actions.add_parser("clear", help="remove cached templates")
    clear.add_argument("--key", default=None, help="only this template (its key)")
    options = parser.parse_args(argv)
    try:
        if options.command == "demo":
            trio.run(_main_task, run_demo, _print)
        elif options.command == "guest":
            trio.run(_main_task, _guest, options.action)
        elif options.command == "clean":
            return _clean(options.base, options.dry_run)
        elif options.command == "template":
            if options.action == "build":
                trio.run(_main_task, _template_build)
            elif options.action == "list":
                return _template_list()
            else:
                return _template_clear(options.key)
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
