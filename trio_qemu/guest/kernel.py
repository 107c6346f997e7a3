"""The guest's kernel: extracting it from the Debian package, its modules, and ``vmlinux``.

Only what the guest needs comes out of the kernel package (about 11 MB of its 390): the
``vmlinuz``, the modules of :data:`GUEST_MODULES` with everything they depend on (found from
each module's ``depends=``, extracting more in further passes when needed), and the files
``depmod`` reads. The bzImage's XZ payload is then decompressed with :mod:`lzma` into an ELF
``vmlinux``, which QEMU boots through its PVH entry point, skipping the real-mode setup and
the in-guest decompressor (about 2 s to the ready marker under TCG instead of 5.5).
"""

from __future__ import annotations

import logging
import lzma
import re
from pathlib import Path
from typing import BinaryIO, Final

import trio

from .._errors import GuestBuildError
from .apt import _extract, _glob_escape
from .image import _OWN_KERNEL_HINT

__all__ = ["BOOT_MODULES", "GUEST_MODULES"]

log = logging.getLogger("trio_qemu.guest")

GUEST_MODULES: Final = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "e1000",
    "e1000e",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
    "ext4",
    "crc32c_generic",
)
"""Modules put into the initramfs, with everything they depend on (found at build time
from each module's ``depends=``). A name the kernel has built in is simply not needed."""

BOOT_MODULES: Final = (
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "virtio_blk",
    "e1000",
    "e1000e",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
)
"""The drivers ``/init`` may load at boot: ``virtio_pci``, then each other one only when its
device is present (failures ignored), since a module costs tens of milliseconds under TCG;
add more with ``trio.modules=a,b`` on the kernel command line or ``modprobe`` in the guest."""

#: Modules the guest modules above are known to need on Debian 12's kernel, extracted in the
#: first pass so the dependency closure is normally complete without a second one.
_LIKELY_DEPENDENCIES: Final = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "failover",
    "net_failover",
    "9pnet",
    "netfs",
    "fscache",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "jbd2",
    "mbcache",
    "crc16",
)

#: How many extraction passes may chase missing dependencies before the build gives up.
_MAX_EXTRACT_PASSES = 3
#: Compressed bytes fed to the XZ decompressor between two checkpoints.
_XZ_CHUNK = 1 << 20
#: Where a bzImage's XZ payload starts, and what the decompressed kernel starts with.
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"
_ELF_MAGIC: Final = b"\x7fELF"


def _module_pattern(name: str) -> str:
    """A tar wildcard for module ``name``'s file: ``-`` and ``_`` are interchangeable in
    module names, and the file may be compressed (``.ko.xz``)."""
    return "*/modules/*/kernel/*/" + re.sub(r"[-_]", "[-_]", name) + ".ko*"


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)")


def _module_depends(data: bytes) -> list[str]:
    """The modules a ``.ko`` needs, from its ``.modinfo`` section's ``depends=``."""
    found = _DEPENDS.search(data)
    if not found or not found.group(1):
        return []
    return [n.replace("-", "_") for n in found.group(1).decode("ascii", "replace").split(",") if n]


def _read_module(path: Path) -> bytes:
    """A module's bytes, decompressed if it is a ``.ko.xz``."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if not path.name.endswith(".ko"):
        raise GuestBuildError(f"unsupported compressed kernel module {path.name}")
    return data


async def _extract_kernel(deb: Path, tree: Path) -> tuple[Path, str, Path, dict[str, Path]]:
    """Extract the kernel and the guest's modules from the kernel package ``deb`` into
    ``tree``.

    Returns:
        The ``vmlinuz``, the kernel release (``uname -r``), the directory of its modules,
        and the modules the guest gets (name -> extracted file).
    """
    wanted = [*GUEST_MODULES, *_LIKELY_DEPENDENCIES]
    patterns = [
        "*/boot/vmlinuz-*",
        "*/modules/*/modules.order",
        "*/modules/*/modules.builtin",
        *(_module_pattern(name) for name in wanted),
    ]
    unmatched = await _extract(deb, tree, patterns)
    if any(p.startswith("*/boot/") or p.endswith("modules.order") for p in unmatched):
        raise GuestBuildError(f"{deb.name} holds no vmlinuz or modules. " + _OWN_KERNEL_HINT)
    vmlinuz, release, module_root = _find_kernel(tree)
    builtin = _builtin_modules(module_root)
    modules = await _module_closure(deb, tree, module_root, builtin)
    return vmlinuz, release, module_root, modules


def _find_kernel(tree: Path) -> tuple[Path, str, Path]:
    """The extracted ``vmlinuz``, its release, and its modules' directory."""
    vmlinuz = sorted(tree.glob("**/boot/vmlinuz-*"))[0]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    module_root = next(tree.glob(f"**/modules/{_glob_escape(release)}"))
    return vmlinuz, release, module_root


def _builtin_modules(module_root: Path) -> set[str]:
    try:
        lines = (module_root / "modules.builtin").read_text().split()
    except OSError:
        return set()
    return {_module_name(Path(line)) for line in lines}


async def _module_closure(
    deb: Path, tree: Path, module_root: Path, builtin: set[str]
) -> dict[str, Path]:
    """Every module :data:`GUEST_MODULES` needs, extracting missing ones in more passes.

    Returns module name -> extracted file. A guest module the kernel has neither built in
    nor as a file is left out (with a log message); a missing dependency is an error.
    """
    for _ in range(_MAX_EXTRACT_PASSES):
        needed, missing = _closure_on_disk(module_root, builtin)
        if not missing:
            return needed
        unmatched = await _extract(deb, tree, [_module_pattern(name) for name in missing])
        absent = {name for name in missing if _module_pattern(name) in unmatched}
        roots_absent = absent & set(GUEST_MODULES)
        if roots_absent:
            log.warning("the kernel has no module %s; left out", ", ".join(sorted(roots_absent)))
            builtin = builtin | roots_absent  # treat as "nothing to include"
        if absent - roots_absent:
            raise GuestBuildError(
                f"{deb.name}: modules needed by the guest are missing: "
                f"{', '.join(sorted(absent - roots_absent))}"
            )
    raise GuestBuildError(f"{deb.name}: the module dependencies did not resolve")


def _closure_on_disk(module_root: Path, builtin: set[str]) -> tuple[dict[str, Path], set[str]]:
    """The extracted modules :data:`GUEST_MODULES` need (name -> file), and the names
    needed but not extracted (yet)."""
    files = {_module_name(p): p for p in module_root.glob("kernel/**/*.ko*")}
    needed: dict[str, Path] = {}
    missing: set[str] = set()
    todo = [name for name in GUEST_MODULES if name not in builtin]
    while todo:
        name = todo.pop()
        if name in needed or name in builtin:
            continue
        path = files.get(name)
        if path is None:
            missing.add(name)
            continue
        needed[name] = path
        todo.extend(_module_depends(_read_module(path)))
    return needed, missing


async def _decompress_vmlinuz(vmlinuz: Path, target: Path) -> int:
    """Write the ELF kernel inside a bzImage's XZ payload to ``target``; return its size.

    Decompresses a chunk at a time, with a checkpoint between chunks, so the event loop is
    never blocked for long (about 0.8 s of work in all) and memory stays bounded.
    """
    data = _read_bytes(vmlinuz)
    start = data.find(_XZ_MAGIC)
    if start < 0:
        raise GuestBuildError(
            f"{vmlinuz.name} has no XZ payload (a kernel compressed otherwise is not "
            "supported). " + _OWN_KERNEL_HINT
        )
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    size = 0
    with _open_for_writing(target) as file:
        view = memoryview(data)[start:]
        position = 0
        while not decompressor.eof:
            if decompressor.needs_input:
                if position >= len(view):
                    raise GuestBuildError(f"{vmlinuz.name}: the XZ payload is truncated")
                chunk = view[position : position + _XZ_CHUNK]
                position += len(chunk)
            else:
                chunk = memoryview(b"")
            try:
                output = decompressor.decompress(chunk, max_length=_XZ_CHUNK * 8)
            except lzma.LZMAError as exc:
                raise GuestBuildError(f"{vmlinuz.name}: bad XZ payload: {exc}") from exc
            if size == 0 and output and not output.startswith(_ELF_MAGIC):
                raise GuestBuildError(f"{vmlinuz.name}: the payload is not an ELF kernel")
            file.write(output)
            size += len(output)
            await trio.lowlevel.checkpoint()
    if size == 0:
        raise GuestBuildError(f"{vmlinuz.name}: the XZ payload is empty")
    return size


# Local file work is deliberately synchronous: small, quick, and no worker threads.


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (``with``)
