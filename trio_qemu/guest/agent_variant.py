"""The tiny guest with the QEMU guest agent: the plain guest plus an appended cpio archive.

The kernel unpacks concatenated archives in turn, later files replacing earlier ones, so the
variant reuses the plain guest's kernel and initramfs and adds, in a second archive,
``qemu-ga`` and the libraries ``ldd`` lists for it (taken from their Debian packages, or
from the host if the packages lack one), ``/sbin/shutdown``, the port-linking and qemu-ga
scripts and an inittab that runs them (:mod:`.scripts`). It is cached beside the plain
guest, under a key made of the plain guest's, qemu-ga's version and a hash of the library
package versions and those scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Final

from .._errors import GuestBuildError
from .apt import _download, _extract, _glob_escape, _mkdir, _Package, _run
from .cpio import CpioWriter
from .image import (
    _IMAGE_FILE,
    _OWN_KERNEL_HINT,
    GuestImage,
    _build_atomically,
    _load_image,
    _Reporter,
)
from .scripts import (
    _AGENT_INITTAB,
    _AGENT_WRAPPER_SCRIPT,
    _LINK_PORTS_PATH,
    _LINK_PORTS_SCRIPT,
    _QGA_PATH,
    _SHUTDOWN_SCRIPT,
    AGENT_WRAPPER_PATH,
    _digest,
)

log = logging.getLogger("trio_qemu.guest")

#: The agent variant's layout version (part of its cache key, like FORMAT_VERSION).
_AGENT_FORMAT_VERSION: Final = 1
#: Where the libraries go in the guest, and the loader's file name.
_GUEST_LIBDIR: Final = "lib/x86_64-linux-gnu"
_LOADER: Final = "ld-linux-x86-64.so.2"


def _agent_digest(packages: Sequence[_Package]) -> str:
    """A short hash of what the agent variant adds: its scripts and library packages."""
    return _digest(
        _LINK_PORTS_SCRIPT, _AGENT_WRAPPER_SCRIPT, _SHUTDOWN_SCRIPT, _AGENT_INITTAB,
        repr([(p.name, p.version) for p in packages]), str(_AGENT_FORMAT_VERSION),
    )  # fmt: skip


def _agent_key(base: GuestImage, packages: Sequence[_Package]) -> str:
    """The agent variant's cache key: the plain guest's, qemu-ga's version, and a hash of
    the library package versions and the agent scripts."""
    raw = f"{base.version}-qga_{packages[0].version}.{_agent_digest(packages)}"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)


async def _ensure_agent_variant(
    base: GuestImage,
    guests: Path,
    packages: Sequence[_Package],
    report: _Reporter,
    reuse: Path | None,
) -> GuestImage:
    """The agent variant of ``base``: cached, or built now."""
    key = _agent_key(base, packages)
    target = guests / key
    image = _load_image(target)
    if image is not None and image.agent:
        return image
    start = time.monotonic()
    report(f"building the tiny guest with the guest agent, {key}, in {guests}")
    try:
        await _build_atomically(
            target,
            key,
            report,
            partial(_build_agent, base=base, packages=packages, key=key, report=report,
                    reuse=reuse),
        )  # fmt: skip
    except OSError as exc:
        raise GuestBuildError(
            f"cannot build the tiny guest with the agent in {guests}: {exc}\n  {_OWN_KERNEL_HINT}"
        ) from exc
    image = _load_image(target)
    if image is None or not image.agent:
        raise GuestBuildError(f"the guest in {target} is incomplete (no {_IMAGE_FILE})")
    report(f"tiny guest with the agent ready in {report.since(start)}: {target}")
    return image


async def _build_agent(
    out: Path,
    build_dir: Path,
    *,
    base: GuestImage,
    packages: Sequence[_Package],
    key: str,
    report: _Reporter,
    reuse: Path | None,
) -> None:
    """Download qemu-ga and its libraries; write the variant (kernel linked from ``base``,
    initramfs = ``base``'s + an appended archive) into ``out``."""
    debs = await _download(packages, build_dir / "debs", reuse, report)

    start = time.monotonic()
    report(f"extracting qemu-ga and its libraries from {len(debs)} packages")
    tree = build_dir / "agent"
    if await _extract(debs[0], tree, ["*/sbin/qemu-ga"]):
        raise GuestBuildError(f"{debs[0].name} holds no qemu-ga")
    for deb in debs[1:]:
        await _extract(deb, tree, ["*/x86_64-linux-gnu/lib*.so*", f"*/{_LOADER}"])
    qga = next(tree.glob("**/sbin/qemu-ga"))
    libraries, interpreter = await _agent_libraries(qga, tree, packages)
    await _verify_closure(qga, libraries, build_dir / "closure")
    report(
        f"qemu-ga needs {len(libraries)} libraries ({', '.join(sorted(libraries))}); "
        f"{report.since(start)}"
    )

    start = time.monotonic()
    report("appending qemu-ga to the initramfs")
    try:
        os.link(base.kernel, out / "vmlinux")
    except OSError:
        shutil.copyfile(base.kernel, out / "vmlinux")
    size = _write_agent_initrd(out / "initrd.cpio", base.initrd, qga, libraries, interpreter)
    report(f"initramfs is {size / 1e6:.1f} MB ({report.since(start)})")

    try:
        meta = json.loads((base.initrd.parent / _IMAGE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise GuestBuildError(f"cannot read the plain guest's {_IMAGE_FILE}: {exc}") from exc
    meta.update(
        {
            "kernel": "vmlinux",
            "initrd": "initrd.cpio",
            "version": key,
            "agent": True,
            "base": base.version,
            "agent_packages": [dataclasses.asdict(p) for p in packages],
            "agent_libraries": {
                name: ("package" if path.is_relative_to(tree) else str(path))
                for name, path in sorted(libraries.items())
            },
            "agent_format": _AGENT_FORMAT_VERSION,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    (out / _IMAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


_LDD_RESOLVED = re.compile(r"(\S+) => (.+?)(?: \(0x[0-9a-fA-F]+\))?")
_LDD_INTERPRETER = re.compile(r"(/\S+) \(0x[0-9a-fA-F]+\)")


def _parse_ldd(text: str) -> tuple[dict[str, str], list[str], str | None]:
    """``ldd`` output as (soname -> path, sonames not found, the program interpreter)."""
    found: dict[str, str] = {}
    missing: list[str] = []
    interpreter: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if match := _LDD_RESOLVED.fullmatch(line):
            name, where = match.groups()
            if where == "not found":
                missing.append(name)
            else:
                found[name] = where
        elif match := _LDD_INTERPRETER.fullmatch(line):
            interpreter = match.group(1)
    return found, missing, interpreter


async def _agent_libraries(
    qga: Path, tree: Path, packages: Sequence[_Package]
) -> tuple[dict[str, Path], str]:
    """Every library ``qemu-ga`` loads (file name in the guest -> file to copy), and its
    program interpreter's path.

    ``ldd`` resolves them with ``LD_LIBRARY_PATH`` on the libraries extracted from the
    packages, so those win; one the packages lack comes from the host (logged), and one
    found nowhere fails the build. The interpreter (the loader) comes from ``libc6``.
    """
    dirs = _library_dirs(tree)
    text = (await _run(["ldd", str(qga)], env={"LD_LIBRARY_PATH": ":".join(dirs)})).decode(
        "utf-8", "replace"
    )
    found, missing, interpreter = _parse_ldd(text)
    if missing:
        raise GuestBuildError(
            f"qemu-ga needs {', '.join(missing)}, which neither "
            f"{', '.join(p.name for p in packages)} nor this host provide"
        )
    if interpreter is None or not found:
        raise GuestBuildError(f"ldd did not list qemu-ga's libraries:\n{text}")
    libraries: dict[str, Path] = {}
    for name, where in found.items():
        path = Path(where)
        if not path.is_relative_to(tree):
            log.warning("%s is not in the packages; taking the host's %s", name, path)
        libraries[name] = path
    loader_name = Path(interpreter).name
    packaged_loader = _packaged_file(tree, loader_name)
    if packaged_loader is not None:
        libraries[loader_name] = packaged_loader
    else:
        log.warning("the loader is not in the packages; taking the host's %s", interpreter)
        libraries[loader_name] = Path(interpreter)
    return libraries, interpreter


def _library_dirs(tree: Path) -> list[str]:
    """The multiarch library directories extracted under ``tree``."""
    return sorted(str(d) for d in tree.glob("**/x86_64-linux-gnu") if d.is_dir())


def _packaged_file(tree: Path, name: str) -> Path | None:
    """The regular file called ``name`` under ``tree`` (a symlink only if there is no file:
    Debian's ``/lib64`` loader link is absolute and would point at the host's)."""
    matches = sorted(tree.glob(f"**/{_glob_escape(name)}"))
    files = [path for path in matches if not path.is_symlink()]
    chosen = files or matches
    return chosen[0] if chosen else None


async def _verify_closure(qga: Path, libraries: dict[str, Path], staging: Path) -> None:
    """Check with ``ldd`` that ``libraries`` alone satisfy ``qemu-ga``: copy them into one
    directory, as the guest will have them, and require every library to resolve there."""
    _mkdir(staging)
    for name, path in libraries.items():
        shutil.copyfile(path, staging / name)
    program = staging / "qemu-ga"
    shutil.copyfile(qga, program)
    program.chmod(0o755)
    text = (await _run(["ldd", str(program)], env={"LD_LIBRARY_PATH": str(staging)})).decode(
        "utf-8", "replace"
    )
    found, missing, _ = _parse_ldd(text)
    outside = sorted(name for name, where in found.items() if Path(where).parent != staging)
    if missing or outside or set(found) - set(libraries):
        raise GuestBuildError(
            f"qemu-ga's libraries are incomplete (missing {missing}, resolved outside the "
            f"initramfs {outside}):\n{text}"
        )


def _write_agent_initrd(
    target: Path,
    base_initrd: Path,
    qga: Path,
    libraries: dict[str, Path],
    interpreter: str,
) -> int:
    """The plain guest's initramfs with a second archive appended: qemu-ga, its libraries,
    ``/sbin/shutdown``, the port and agent scripts and the extended inittab. Returns the
    size in bytes.

    The plain archive already has ``bin``, ``sbin``, ``usr/sbin``, ``lib``, ``etc`` and
    ``var``; the appended one adds only the directories that are new.
    """
    shutil.copyfile(base_initrd, target)
    with open(target, "ab") as file, CpioWriter(file) as cpio:
        cpio.directory(_GUEST_LIBDIR)
        loader_in_libdir = f"/{_GUEST_LIBDIR}/{Path(interpreter).name}"
        if interpreter != loader_in_libdir:
            parent = str(Path(interpreter).parent).lstrip("/")
            if parent not in ("lib", _GUEST_LIBDIR):
                cpio.directory(parent)
            cpio.symlink(interpreter, loader_in_libdir)
        cpio.file(_QGA_PATH, qga.read_bytes(), mode=0o755)
        for name, path in sorted(libraries.items()):
            cpio.file(f"{_GUEST_LIBDIR}/{name}", path.read_bytes(), mode=0o755)
        cpio.file("sbin/shutdown", _SHUTDOWN_SCRIPT.encode(), mode=0o755)
        cpio.file(_LINK_PORTS_PATH.lstrip("/"), _LINK_PORTS_SCRIPT.encode(), mode=0o755)
        cpio.file(AGENT_WRAPPER_PATH.lstrip("/"), _AGENT_WRAPPER_SCRIPT.encode(), mode=0o755)
        cpio.file("etc/inittab", _AGENT_INITTAB.encode())
        cpio.symlink("var/run", "/run")
        cpio.close()
    return target.stat().st_size
