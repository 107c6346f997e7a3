"""Making templates: boot, prepare, save; the cache and its lock."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio
from qemu.qmp import ExecuteError

from .._config import MachineConfig
from .._machine import Machine
from .._openers import open_machine
from .._tempdirs import create_machine_dir, remove_machine_dir
from .._util import protected_asynccontextmanager
from ..guest.image import default_cache_dir
from ._steps import command, drop_fd, error_desc, fdname, follow, give_fd, set_capabilities
from ._template import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    RAM_FILE,
    STATE_FILE,
    Template,
    TemplateError,
    backed_config,
    check_template_config,
    digest,
    file_stamp,
    load_template,
    memory_bytes,
    qemu_release,
    resolve_binary,
    signature,
    state_record,
)

__all__ = ["DEFAULT_TIMEOUT", "TEMPLATES_DIR", "ensure_template", "open_template"]

log = logging.getLogger("trio_qemu.snapshot")

DEFAULT_TIMEOUT: Final = 300.0
"""Seconds :func:`ensure_template` and :func:`open_template` allow by default for the whole
job: waiting for another maker, booting, ``prepare`` and saving."""

TEMPLATES_DIR: Final = "templates"
"""The cache root's subdirectory that holds the templates, one directory per key."""

#: First and longest pause between attempts to take a maker's lock (it is polled).
_LOCK_POLL_FIRST: Final = 0.02
_LOCK_POLL_MAX: Final = 0.25
#: Build directories older than this are left-overs of a maker that was killed.
_STALE_BUILD_SECONDS: Final = 3600.0
#: QEMU opens a private mapping's RAM file read-only only from this release on.
_READ_ONLY_PRIVATE_MAPPING: Final = (8, 2)

Prepare = Callable[[Machine], Awaitable[object]]
Progress = Callable[[str], None]

_versions: dict[tuple[str, int, int], str] = {}


async def qemu_version(binary: str) -> str:
    """The first line of ``binary --version`` (cached per executable file)."""
    info = os.stat(binary)
    cache_key = (binary, info.st_size, info.st_mtime_ns)
    if cache_key not in _versions:
        result = await trio.run_process(
            [binary, "--version"], capture_stdout=True, capture_stderr=True, check=False
        )
        lines = result.stdout.decode(errors="replace").splitlines()
        if result.returncode != 0 or not lines:
            raise TemplateError(
                f"{binary} --version failed (status {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        _versions[cache_key] = lines[0].strip()
    return _versions[cache_key]


def prepare_key(prepare: Prepare | None, key: str | None) -> str | None:
    """``key``; else, for a ``prepare``, its qualified name and a hash of its source."""
    if key is not None:
        return str(key)
    if prepare is None:
        return None
    name = getattr(prepare, "__qualname__", None)
    if not isinstance(name, str):
        raise ValueError(
            f"give key= to name the version of prepare={prepare!r}: it has no name to use"
        )
    name = f"{getattr(prepare, '__module__', '')}.{name}"
    try:
        source = inspect.getsource(prepare)
    except (OSError, TypeError):
        return name
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def _reporter(progress: Progress | None) -> Progress:
    if progress is not None:
        return progress
    return lambda message: log.info("%s", message)


def ram_mode(version: str) -> int:
    """The RAM file's mode once saved: read-only (0444), except where QEMU could then not
    map it for a clone (QEMU before 8.2 opens the file read-write even for a private
    mapping, which only root may do on a read-only file): owner-writable 0644 there."""
    if os.geteuid() == 0 or qemu_release(version) >= _READ_ONLY_PRIVATE_MAPPING:
        return 0o444
    return 0o644


# -- making ------------------------------------------------------------------------------------
async def _make(
    config: MachineConfig,
    directory: Path,
    *,
    sig: dict[str, Any],
    key: str,
    prepare: Prepare | None,
    report: Progress,
    deadline: float,
) -> None:
    """Boot ``config`` with its RAM in ``directory``, wait until it is ready, run
    ``prepare``, save the device state, quit; then write the manifest."""
    started = time.monotonic()
    size = memory_bytes(config.memory)
    name = config.name or f"template-{key[:8]}"
    maker = backed_config(config.replace(name=name), directory / RAM_FILE, size, share=True)
    report(f"template {key}: booting {name}")
    async with open_machine(maker) as vm:
        remaining = max(deadline - trio.current_time(), 0.001)
        if config.shell:
            await vm.shell.wait_ready(timeout=remaining)
        if config.agent:
            remaining = max(deadline - trio.current_time(), 0.001)
            await vm.agent.wait_ready(timeout=remaining)
        report(f"template {key}: ready after {time.monotonic() - started:.1f} s")
        if prepare is not None:
            await prepare(vm)
            report(f"template {key}: prepared after {time.monotonic() - started:.1f} s")
        await _save(vm, directory / STATE_FILE)
    made_in = time.monotonic() - started
    _finish(directory, config, sig, key, made_in)
    report(f"template {key}: saved, made in {made_in:.1f} s")


async def _save(vm: Machine, state: Path) -> None:
    """Stop the guest and save its device state into ``state`` (RAM stays in its file)."""
    await command(vm, "stop")
    await set_capabilities(vm)
    name = fdname()
    with vm.subscribe("MIGRATION") as events:
        await give_fd(vm, state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, name)
        try:
            await vm.cmd("migrate", {"uri": f"fd:{name}"})
        except ExecuteError as exc:
            await drop_fd(vm, name)
            raise TemplateError(f"{vm.name}: QEMU refused to save the state: {exc}") from exc
        status = await follow(vm, events)
    if status != "completed":
        reason = await error_desc(vm) if vm.is_running() else vm.log.strip()
        raise TemplateError(f"{vm.name}: saving the state failed ({status}): {reason}")


def _finish(
    directory: Path, config: MachineConfig, sig: dict[str, Any], key: str, made_in: float
) -> None:
    """Make the files read-only, record their stamps, write the manifest."""
    ram = directory / RAM_FILE
    os.chmod(ram, ram_mode(str(sig["version"])))
    os.chmod(directory / STATE_FILE, 0o444)
    info = os.stat(ram)
    if info.st_size != memory_bytes(config.memory):
        raise TemplateError(
            f"the RAM file {ram} has {info.st_size} bytes, not {memory_bytes(config.memory)}"
        )
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "signature": sig,
        "ram": {"size": info.st_size, "mtime_ns": info.st_mtime_ns},
        "state": state_record(directory / STATE_FILE),
        "qemu": file_stamp(str(sig["binary"])),
        "made_in": round(made_in, 3),
        "created": time.time(),
        "config": _describe(config),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _describe(config: MachineConfig) -> dict[str, Any]:
    """The config's fields as JSON values (for people and ``template list``)."""
    described: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = [v if isinstance(v, str | int) else repr(v) for v in value]
        elif value is not None and not isinstance(value, str | int | float | bool):
            value = repr(value)
        described[field.name] = value
    return described


# -- the cache ---------------------------------------------------------------------------------
async def ensure_template(
    config: MachineConfig,
    *,
    prepare: Prepare | None = None,
    key: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Template:
    """The template of ``config`` (prepared by ``prepare``): from the cache, else made now.

    Making one boots ``config`` once with its RAM in a file (``memory-backend-file``,
    ``share=on``), waits until the guest is ready (its shell answers when ``config.shell``,
    its agent when ``config.agent``; with neither, at once: ``prepare`` decides), runs
    ``await prepare(vm)``, stops the guest, saves its device state with the
    ``x-ignore-shared`` capability through an fd (``getfd`` and ``migrate fd:``), quits and
    makes the RAM file read-only. That takes a boot plus ~10 ms.

    The cache key is a hash of everything a clone must match: the QEMU executable and its
    ``--version``, the command line (without per-machine fds, paths and names), the kernel's
    and initrd's size and modification time, the memory size, and ``key``. Templates live in
    ``<cache_dir>/templates/<key>``. Makers of the same template, in this process or
    others, take turns on a lock file (``<key>.lock``, an ``fcntl.flock`` polled every
    20-250 ms, so waiting for it can be cancelled at once); the first boots, the others find
    its template. A template is built in a ``.build-*`` directory beside and renamed into
    place in one step, so nobody ever sees half of one. A cached template whose files are
    damaged (missing, resized, modified, a state file whose SHA-256 changed) is rebuilt.

    Args:
        config: the machine to boot; it needs ``machine`` and ``memory``, and QMP.
        prepare: ``async def prepare(vm)``: setup (files, services...) whose result every
            clone inherits. A cached template is used as it is: ``prepare`` is not run.
        key: names ``prepare``'s version in the cache key; default: its qualified name and
            a hash of its source code (when it can be read).
        cache_dir: the cache root (default ``$TRIO_QEMU_CACHE``, else
            ``$XDG_CACHE_HOME/trio-qemu``, else ``~/.cache/trio-qemu``).
        progress: called with a line of text at each step (default: the
            ``trio_qemu.snapshot`` logger at INFO).
        timeout: seconds for the whole call, waiting for another maker included.

    Returns:
        The template.

    Raises:
        TemplateError: it could not be made (QEMU refused a step, the save failed) or not
            within ``timeout``.
        ValueError: ``config`` cannot be templated (no ``memory`` or ``machine``, no QMP,
            ``-incoming`` in its args, ...), or ``prepare`` has no name and no ``key``.
        LaunchError: the template machine could not start.
        ShellTimeout: the guest shell did not answer in time.
    """
    check_template_config(config)
    _check_timeout(timeout)
    report = _reporter(progress)
    binary = resolve_binary(config)
    version = await qemu_version(binary)
    sig = signature(config, binary=binary, version=version, key=prepare_key(prepare, key))
    tkey = digest(sig)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / TEMPLATES_DIR / tkey
    template, _ = load_template(target, config, sig)
    if template is not None:
        return template
    with trio.move_on_after(timeout) as scope:
        return await _ensure_locked(
            config, target, sig, prepare=prepare, report=report, deadline=scope.deadline
        )
    raise TemplateError(f"template {tkey} was not made within timeout={timeout} s")


async def _ensure_locked(
    config: MachineConfig,
    target: Path,
    sig: dict[str, Any],
    *,
    prepare: Prepare | None,
    report: Progress,
    deadline: float,
) -> Template:
    templates, tkey = target.parent, target.name
    templates.mkdir(parents=True, exist_ok=True)
    async with _locked(templates / f"{tkey}.lock", report, tkey):
        template, why = load_template(target, config, sig)
        if template is not None:
            report(f"template {tkey}: made by another maker meanwhile")
            return template
        if why:
            report(f"template {tkey}: rebuilding it: {why}")
            _discard(target)
        _remove_stale_builds(templates, tkey)
        build = Path(tempfile.mkdtemp(prefix=f".build-{tkey}-", dir=templates))
        try:
            await _make(
                config, build, sig=sig, key=tkey, prepare=prepare, report=report,
                deadline=deadline,
            )  # fmt: skip
            os.rename(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)  # gone already once renamed
    template, why = load_template(target, config, sig)
    if template is None:
        raise TemplateError(f"template {tkey} is unusable right after it was made: {why}")
    return template


@protected_asynccontextmanager
async def _locked(path: Path, report: Progress, tkey: str) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block (polled: see ensure_template)."""
    fd = await _acquire(path, report, tkey)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


async def _acquire(path: Path, report: Progress, tkey: str) -> int:
    delay = _LOCK_POLL_FIRST
    waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while not _try_lock(fd):
                if not waiting:
                    report(f"template {tkey}: waiting for another maker")
                    waiting = True
                await trio.sleep(delay)
                delay = min(delay * 2, _LOCK_POLL_MAX)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the lock file was removed or replaced meanwhile: lock the new one


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (info.st_dev, info.st_ino) == (mine.st_dev, mine.st_ino)


def _discard(target: Path) -> None:
    """Move a damaged template out of the way (in one step), then delete it. Clones that
    still map its RAM file keep their mapping."""
    trash = target.with_name(f".trash-{target.name}-{secrets.token_hex(4)}")
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOTDIR:
            raise
        target.unlink()
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_builds(templates: Path, tkey: str) -> None:
    """Under ``tkey``'s lock its old build and trash directories are a killed maker's
    left-overs; other keys' are removed once they are an hour old."""
    now = time.time()
    for entry in templates.iterdir():
        if not entry.name.startswith((".build-", ".trash-")):
            continue
        with contextlib.suppress(OSError):
            if entry.name.startswith((f".build-{tkey}-", f".trash-{tkey}-")) or (
                now - entry.stat().st_mtime > _STALE_BUILD_SECONDS
            ):
                shutil.rmtree(entry, ignore_errors=True)


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


# -- a template for one block ------------------------------------------------------------------
@protected_asynccontextmanager
async def open_template(
    config: MachineConfig,
    *,
    prepare: Prepare | None = None,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[Template]:
    """A template made for the block and removed when it ends (never cached).

    Made as by :func:`ensure_template`, in a private temporary directory under
    ``config.base_temp_dir`` (or the system's), recorded with its owner like a machine's, so
    that if this process is killed the next launch (or ``python -m trio_qemu clean``)
    removes it. Clones still running when the block ends keep their private mapping of
    the RAM file; finish them inside the block.

    Args:
        config: the machine to boot (see :func:`ensure_template`).
        prepare: ``async def prepare(vm)``, run once the guest is ready.
        progress: called with a line of text at each step.
        timeout: seconds for making it.

    Yields:
        The template (``cached`` is False).

    Raises:
        TemplateError, ValueError, LaunchError, ShellTimeout: as :func:`ensure_template`.
    """
    check_template_config(config)
    _check_timeout(timeout)
    report = _reporter(progress)
    binary = resolve_binary(config)
    version = await qemu_version(binary)
    sig = signature(config, binary=binary, version=version, key=None)
    tkey = digest(sig)
    directory = create_machine_dir(f"template-{tkey[:8]}", config.base_temp_dir)
    try:
        with trio.move_on_after(timeout) as scope:
            await _make(
                config, directory, sig=sig, key=tkey, prepare=prepare, report=report,
                deadline=scope.deadline,
            )  # fmt: skip
        if scope.cancelled_caught:
            raise TemplateError(f"template {tkey} was not made within timeout={timeout} s")
        template, why = load_template(directory, config, sig, cached=False)
        if template is None:
            raise TemplateError(f"template {tkey} is unusable right after it was made: {why}")
        yield template
    finally:
        remove_machine_dir(directory)
