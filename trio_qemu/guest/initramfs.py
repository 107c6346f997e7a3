"""The plain guest's initramfs: staging its tree and writing it as one uncompressed cpio.

The archive holds busybox and a link for each of its applets, the modules the guest needs
(decompressed, with ``modules.dep`` made by ``busybox depmod``), ``/init``, the shell agent,
the udhcpc script and the files of ``/etc`` (:mod:`.scripts`). It is written by
:class:`.cpio.CpioWriter` rather than a host tool; uncompressed, because an uncompressed
initramfs boots measurably faster under TCG.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .._shell import SHELL_AGENT_PATH, SHELL_AGENT_SCRIPT
from .apt import _run
from .cpio import CpioWriter
from .kernel import _read_module
from .relay_binary import RELAY_PATH, RELAY_STUB
from .scripts import _ETC_FILES, _UDHCPC_SCRIPT, render_init


async def _write_initramfs(
    target: Path,
    staging: Path,
    busybox: Path,
    module_root: Path,
    release: str,
    modules: dict[str, Path],
    relay: bytes | None = None,
) -> int:
    """Assemble the initramfs tree in ``staging``, run depmod on it, archive it. ``relay`` is
    the compiled relay (None: the guest gets the stub that only sleeps)."""
    _stage_modules(staging / "lib" / "modules" / release, module_root, modules)
    await _run([str(busybox), "depmod", "-b", str(staging), release])
    applets = (await _run([str(busybox), "--list-full"])).decode().split()
    return _write_cpio(target, staging, busybox, applets, relay)


def _stage_modules(moddir: Path, module_root: Path, modules: dict[str, Path]) -> None:
    """Copy ``modules`` (decompressed) and the files depmod reads into ``moddir``."""
    relative: set[str] = set()
    for path in modules.values():
        rel = path.relative_to(module_root).as_posix().removesuffix(".xz")
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(_read_module(path))
        relative.add(rel)
    order = (module_root / "modules.order").read_text().split()
    kept = [line.removesuffix(".xz") for line in order if line.removesuffix(".xz") in relative]
    (moddir / "modules.order").write_text("".join(f"{line}\n" for line in kept))
    shutil.copyfile(module_root / "modules.builtin", moddir / "modules.builtin")


def _write_cpio(
    target: Path, staging: Path, busybox: Path, applets: list[str], relay: bytes | None = None
) -> int:
    """Write the initramfs archive; return its size in bytes."""
    with open(target, "wb") as file, CpioWriter(file) as cpio:
        made: set[str] = set()

        def directory(name: str, mode: int = 0o755) -> None:
            parts = name.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub not in made:
                    made.add(sub)
                    cpio.directory(sub, mode=mode if i == len(parts) else 0o755)

        for name in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/udhcpc", "lib/modules", "mnt"):
            directory(name)
        for name in ("proc", "sys", "dev", "run", "var"):
            directory(name)
        directory("root", 0o700)
        directory("tmp", 0o1777)
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, mode=0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in applets:
            if applet != "bin/busybox" and applet.count("/") <= 2:
                directory(applet.rsplit("/", 1)[0])
                if applet not in made:
                    made.add(applet)
                    cpio.symlink(applet, "/bin/busybox")
        cpio.file("init", render_init().encode(), mode=0o755)
        cpio.file(SHELL_AGENT_PATH.lstrip("/"), SHELL_AGENT_SCRIPT.encode(), mode=0o755)
        cpio.file(RELAY_PATH.lstrip("/"), RELAY_STUB if relay is None else relay, mode=0o755)
        cpio.file("etc/udhcpc/default.script", _UDHCPC_SCRIPT.encode(), mode=0o755)
        for name, text in _ETC_FILES.items():
            cpio.file(name, text.encode())
        for path in _walk(staging / "lib"):
            rel = path.relative_to(staging).as_posix()
            if path.is_dir():
                directory(rel)
            else:
                cpio.file(rel, path.read_bytes())
        cpio.close()
        return cpio.size


def _walk(top: Path) -> Iterable[Path]:
    """Everything under ``top``, parents before children, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        base = Path(dirpath)
        yield base
        for name in sorted(filenames):
            yield base / name
