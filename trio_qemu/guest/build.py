"""Getting the tiny guest: :func:`ensure_guest` (cached, or built now) and :func:`build_guest`.

This is the top of the guest package. It asks apt for the package versions, which name the
cache entry, and builds the plain guest when that entry is missing: download the kernel and
busybox packages (:mod:`.apt`), extract the kernel and its modules and decompress it
(:mod:`.kernel`), write the initramfs (:mod:`.initramfs`), all in a temporary directory that
is renamed into place (:mod:`.image`). With ``agent=True`` it then ensures the agent variant
(:mod:`.agent_variant`) on top.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from .._errors import GuestBuildError
from .agent_variant import _ensure_agent_variant
from .apt import _download, _extract, _Package, _resolve_agent_packages, _resolve_packages
from .image import (
    _IMAGE_FILE,
    _OWN_KERNEL_HINT,
    DEFAULT_APPEND,
    FORMAT_VERSION,
    GuestImage,
    _build_atomically,
    _load_image,
    _newest_cached,
    _Reporter,
    default_cache_dir,
)
from .initramfs import _write_initramfs
from .kernel import GUEST_MODULES, _decompress_vmlinuz, _extract_kernel
from .relay_binary import compile_relay
from .scripts import _script_digest

__all__ = ["build_guest", "ensure_guest"]


async def ensure_guest(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = 900.0,
    agent: bool = False,
    _download_dir: str | os.PathLike[str] | None = None,
) -> GuestImage:
    """The tiny guest for the current Debian kernel: the cached one, or built now.

    Asking ``apt-cache`` for the package versions takes a fraction of a second; if that
    fails but a guest was built before, the newest cached one is used. A build downloads
    about 72 MB and takes some seconds.

    Args:
        cache_dir: the cache root (default :func:`default_cache_dir`). The guest goes into
            ``<cache_dir>/guest/<kernel ABI>_<version>-busybox_<version>-f<layout>.<hash>``,
            the hash covering the files and settings this package puts into the guest.
        progress: receives a line per step (downloading with the size, extracting, building,
            timings); without it they go to the ``trio_qemu.guest`` logger at INFO level.
        timeout: bounds the whole call, in seconds.
        agent: a guest that also runs the QEMU guest agent (see :mod:`trio_qemu.guest`): the
            plain guest is ensured first, then its agent variant, cached beside it as
            ``<plain guest's key>-qga_<version>.<hash>`` (the hash covering the library
            package versions and the agent's scripts); building that adds about 5 MB of
            downloads and a second or two.

    Raises:
        GuestBuildError: the tools (``apt-cache``, ``apt-get``, ``dpkg-deb``, ``tar``) are
            missing or fail, the cache cannot be written, or ``timeout`` passed; the message
            says how to boot a kernel and initramfs of one's own instead.
    """
    report = _Reporter(progress)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    guests = root / "guest"
    with trio.move_on_after(timeout) as scope:
        try:
            kernel_pkg, busybox_pkg = await _resolve_packages()
            agent_pkgs = await _resolve_agent_packages() if agent else []
        except GuestBuildError as exc:
            cached = _newest_cached(guests, agent=agent)
            if cached is None:
                raise
            report(f"cannot ask apt for the package versions ({exc.reason}); using {cached}")
            return cached
        key = _cache_key(kernel_pkg, busybox_pkg)
        target = guests / key
        reuse = Path(_download_dir) if _download_dir is not None else None
        image = _load_image(target)
        if image is None:
            try:
                await _build_into(target, key, kernel_pkg, busybox_pkg, report, reuse)
            except OSError as exc:
                raise GuestBuildError(
                    f"cannot build the tiny guest in {guests}: {exc}\n  {_OWN_KERNEL_HINT}"
                ) from exc
            image = _load_image(target)
            if image is None:
                raise GuestBuildError(f"the guest in {target} is incomplete (no {_IMAGE_FILE})")
            report(f"tiny guest ready in {report.since(report.start)}: {target}")
        if not agent:
            return image
        return await _ensure_agent_variant(image, guests, agent_pkgs, report, reuse)
    assert scope.cancelled_caught
    raise GuestBuildError(f"building the tiny guest took longer than timeout={timeout} s")


async def _build_into(
    target: Path,
    key: str,
    kernel_pkg: _Package,
    busybox_pkg: _Package,
    report: _Reporter,
    reuse: Path | None,
) -> None:
    """Build in a temporary directory beside ``target``, then rename it into place."""
    report(f"building the tiny guest {key} in {target.parent}")
    await _build_atomically(
        target,
        key,
        report,
        partial(
            _build, kernel_pkg=kernel_pkg, busybox_pkg=busybox_pkg, key=key, report=report,
            reuse=reuse,
        ),
    )  # fmt: skip


def build_guest(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = 900.0,
    agent: bool = False,
) -> GuestImage:
    """:func:`ensure_guest` for synchronous callers (a session fixture, a command line).

    Runs its own Trio event loop, so it must not be called from inside one.
    """
    return trio.run(
        partial(ensure_guest, cache_dir=cache_dir, progress=progress, timeout=timeout, agent=agent)
    )


async def _build(
    out: Path,
    build_dir: Path,
    kernel_pkg: _Package,
    busybox_pkg: _Package,
    key: str,
    report: _Reporter,
    reuse: Path | None,
) -> None:
    """Download, extract and assemble the guest into ``out`` (the final files only)."""
    kernel_deb, busybox_deb = await _download(
        [kernel_pkg, busybox_pkg], build_dir / "debs", reuse, report
    )

    start = time.monotonic()
    report(f"extracting the kernel and {len(GUEST_MODULES)} modules from {kernel_deb.name}")
    vmlinuz, release, module_root, modules = await _extract_kernel(kernel_deb, build_dir / "kernel")
    report(f"extracted {len(modules)} modules in {report.since(start)}")

    start = time.monotonic()
    report(f"decompressing {vmlinuz.name} into an ELF vmlinux")
    kernel_size = await _decompress_vmlinuz(vmlinuz, out / "vmlinux")
    report(f"vmlinux is {kernel_size / 1e6:.1f} MB ({report.since(start)})")

    start = time.monotonic()
    report("building the initramfs")
    await _extract(busybox_deb, build_dir / "busybox", ["*/bin/busybox"])
    busybox = next((build_dir / "busybox").glob("**/bin/busybox"))
    relay = await compile_relay(build_dir / "relay", report)
    initrd_size = await _write_initramfs(
        out / "initrd.cpio", build_dir / "initramfs", busybox, module_root, release, modules,
        relay=relay,
    )  # fmt: skip
    report(f"initramfs is {initrd_size / 1e6:.1f} MB ({report.since(start)})")

    meta = {
        "kernel": "vmlinux",
        "initrd": "initrd.cpio",
        "append": DEFAULT_APPEND,
        "version": key,
        "kernel_release": release,
        "kernel_package": dataclasses.asdict(kernel_pkg),
        "busybox_package": dataclasses.asdict(busybox_pkg),
        "modules": sorted(modules),
        "relay": relay is not None,
        "format": FORMAT_VERSION,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / _IMAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _cache_key(kernel: _Package, busybox: _Package) -> str:
    """The plain guest's cache key: the package versions, the layout version, and a hash of
    everything else it gets (:func:`.scripts._script_digest`)."""
    raw = (
        f"{kernel.name.removeprefix('linux-image-')}_{kernel.version}"
        f"-busybox_{busybox.version}-f{FORMAT_VERSION}.{_script_digest()}"
    )
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)
