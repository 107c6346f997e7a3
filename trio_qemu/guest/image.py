"""A built tiny guest (:class:`GuestImage`) and the cache that keeps it.

The lowest layer of the guest package: what a built guest is, where guests are cached, how
one is found there, and how a build is put in place in one step so that concurrent builders
never see half a guest. The builds themselves are in :mod:`.build` (the plain guest) and
:mod:`.agent_variant`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .._config import MachineConfig
from ..block.drives import Drive

__all__ = [
    "CACHE_ENV",
    "DEFAULT_APPEND",
    "GUEST_ARGS",
    "GuestImage",
    "default_cache_dir",
]

log = logging.getLogger("trio_qemu.guest")

FORMAT_VERSION: Final = 1
"""Bumped whenever the layout of a built guest changes in a way the script hash does not
capture (it is part of every cache key)."""

CACHE_ENV: Final = "TRIO_QEMU_CACHE"
"""Environment variable naming the cache root (else ``$XDG_CACHE_HOME/trio-qemu``, else
``~/.cache/trio-qemu``)."""

DEFAULT_APPEND: Final = (
    "console=ttyS0 quiet panic=-1 cryptomgr.notests=1"
    " initcall_blacklist=crypto_kdf108_init,init_kprobe_trace rodata=off"
)
"""The kernel command line: console on the first serial port, kernel messages only when
they are errors (serial output is slow under TCG; ``/init`` prints the ready marker itself),
reboot at once on a panic, which ``-no-reboot`` turns into QEMU exiting, and none of the
boot work a test guest does not need, each measured under TCG (``initcall_debug``): the
self-tests of the kernel's crypto algorithms (``cryptomgr.notests=1``; they were the largest
single cost, ~0.4-0.8 s), the SP800-108 KDF's self-test that runs regardless (~0.24 s) and
the kprobe trace events' set-up (~0.14 s), both as blacklisted initcalls, and the
write-protection of the kernel's read-only data with its W+X page check (``rodata=off``,
~0.23 s). Together these last three took the guest's uptime at its first shell command from
3.25 to 3.04 s (medians of 10 alternating boots each)."""

GUEST_ARGS: Final = (
    "-nodefaults", "-no-reboot", "-cpu", "qemu64,+rdrand", "-device", "vmgenid",
)  # fmt: skip
"""The extra QEMU arguments :meth:`GuestImage.config` gives:

- ``-nodefaults``: no default devices (they only slow the boot);
- ``-no-reboot``: QEMU exits when the guest reboots, powers off or panics;
- ``-cpu qemu64,+rdrand``: QEMU's default CPU model with ``RDRAND``, which TCG answers from
  the host's ``getrandom``. Without a hardware random source the guest kernel seeds its
  random number generator from timer jitter, which under TCG costs about a second of CPU
  after the shell is up (and in every clone of a template saved before it ended); with
  ``RDRAND`` it is seeded at once;
- ``-device vmgenid``: a VM generation ID (a GUID of QEMU's own, new in every QEMU process),
  which QEMU writes anew and announces to the guest when a migration or a clone's restore
  lands. The guest kernel then reseeds its random number generator at once (``random: crng
  reseeded due to virtual machine fork``), so clones of one template never share its state.
  It needs a machine with ACPI (q35, the default, or pc).

Keep them when passing ``args=`` of your own: ``image.config(args=[*GUEST_ARGS, "-nic",
"user"])``."""

#: Temporary build directories older than this are left-overs of a killed build.
_STALE_BUILD_SECONDS = 3600.0
#: The file describing a built guest, in its cache entry.
_IMAGE_FILE: Final = "image.json"

_OWN_KERNEL_HINT: Final = (
    "To use a kernel and initramfs of your own instead, give them to the machine directly: "
    "MachineConfig(kernel=..., initrd=..., append='console=ttyS0', console=True)."
)


@dataclass(frozen=True)
class GuestImage:
    """A built tiny guest: the files to boot and how to boot them.

    Get one from :func:`ensure_guest` (or :func:`build_guest`), then launch it with
    ``open_machine(image.config())``.
    """

    kernel: Path
    """The uncompressed ELF ``vmlinux`` (QEMU boots it through PVH)."""
    initrd: Path
    """The uncompressed newc cpio initramfs."""
    append: str = DEFAULT_APPEND
    """The kernel command line to boot with."""
    version: str = ""
    """The cache key: kernel package, busybox version and the guest's layout version."""
    kernel_release: str = ""
    """The guest's ``uname -r`` (e.g. ``6.1.0-56-amd64``)."""
    agent: bool = False
    """Whether the guest runs the QEMU guest agent (built with ``agent=True``)."""
    relay: bool = False
    """Whether the guest has the relay (:mod:`trio_qemu.relay`): it is compiled when the
    guest is built, if a C compiler is at hand."""

    def config(
        self, *, disks: Sequence[Drive | str | os.PathLike[str]] = (), **fields: Any
    ) -> MachineConfig:
        """A :class:`~trio_qemu.MachineConfig` that boots this guest; ``fields`` override.

        Defaults: ``machine="q35"``, ``memory=256`` (MiB), the console and the guest-shell
        channel on (and the guest-agent channel, ``agent=True``, when this image has the
        agent; the relay channel, ``relay=True``, when it has the relay), this image's
        kernel, initrd and command line, and ``args=GUEST_ARGS`` (``-nodefaults
        -no-reboot``), so that no default devices slow the boot and a guest panic,
        ``poweroff`` or ``reboot`` ends QEMU instead of booting again.
        ``args=`` replaces those; start yours with :data:`GUEST_ARGS` to keep them.

        ``disks`` are images the guest sees as ``/dev/vda``, ``/dev/vdb``... (virtio-blk, ids
        ``disk0``, ``disk1``...): paths (format from the suffix, see
        :meth:`~trio_qemu.block.Drive.from_path`) or :class:`~trio_qemu.block.Drive` s, added
        after ``drives=``. With disks, ``trio.modules=`` on the kernel command line loads the
        ext2/ext4 driver (and ``crc32c_generic``, which it needs), so busybox ``mke2fs`` and
        ``mount`` work; a boot without disks loads none of it.

        Raises:
            ValueError: ``agent=True`` on an image without the agent (nothing in that guest
                would answer on the channel).
        """
        if fields.get("agent") and not self.agent:
            raise ValueError(
                f"the tiny guest {self.version or self.initrd} has no guest agent (qemu-ga); "
                "get one that has with ensure_guest(agent=True) or build_guest(agent=True)"
            )
        if disks:
            fields["drives"] = (
                *fields.get("drives", ()),
                *(d if isinstance(d, Drive) else Drive.from_path(d, id=f"disk{i}")
                  for i, d in enumerate(disks)),
            )  # fmt: skip
            fields["append"] = _with_modules(fields.get("append", self.append) or "", _DISK_MODULES)
        base = MachineConfig(
            machine="q35",
            memory=256,
            console=True,
            shell=True,
            kernel=str(self.kernel),
            initrd=str(self.initrd),
            append=self.append,
            args=GUEST_ARGS,
            agent=self.agent,
            relay=self.relay,
        )
        return base.replace(**fields) if fields else base


#: What the guest loads when it has disks (ext4 also mounts ext2, and needs crc32c).
_DISK_MODULES: Final = ("virtio_blk", "crc32c_generic", "ext4")


def _with_modules(append: str, modules: Sequence[str]) -> str:
    """``append`` with ``modules`` added to its ``trio.modules=`` hook (made if missing)."""
    words = append.split()
    for index, word in enumerate(words):
        if word.startswith("trio.modules="):
            have = [m for m in word.split("=", 1)[1].split(",") if m]
            have += [m for m in modules if m not in have]
            words[index] = "trio.modules=" + ",".join(have)
            return " ".join(words)
    return " ".join([*words, "trio.modules=" + ",".join(modules)])


def default_cache_dir() -> Path:
    """The cache root: ``$TRIO_QEMU_CACHE``, else ``$XDG_CACHE_HOME/trio-qemu``, else
    ``~/.cache/trio-qemu``. Guests live in its ``guest/`` subdirectory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "trio-qemu"
    return Path.home() / ".cache" / "trio-qemu"


class _Reporter:
    """Sends human-readable progress lines to the caller's callback (or the log)."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self._progress = progress
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)
        else:
            log.info("%s", message)

    def since(self, start: float) -> str:
        return f"{time.monotonic() - start:.1f} s"


# --- the cache --------------------------------------------------------------------------


def _load_image(directory: Path) -> GuestImage | None:
    """The guest in ``directory`` if it is complete, else None."""
    try:
        meta = json.loads((directory / _IMAGE_FILE).read_text())
        image = GuestImage(
            kernel=directory / meta["kernel"],
            initrd=directory / meta["initrd"],
            append=meta["append"],
            version=meta["version"],
            kernel_release=meta["kernel_release"],
            agent=meta.get("agent", False) is True,
            relay=meta.get("relay", False) is True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def _newest_cached(guests: Path, *, agent: bool = False) -> GuestImage | None:
    """The most recently built complete guest under ``guests`` with (``agent=True``) or
    without the guest agent, if any."""
    try:
        entries = sorted(
            (p for p in guests.iterdir() if not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return None
    for entry in entries:
        image = _load_image(entry)
        if image is not None and image.agent == agent:
            return image
    return None


async def _build_atomically(
    target: Path,
    key: str,
    report: _Reporter,
    build: Callable[[Path, Path], Awaitable[None]],
) -> None:
    """Run ``build(out, build_dir)`` in a temporary directory beside ``target``, then rename
    ``out`` into place in one step (the loser of a race between builders uses the winner's)."""
    guests = target.parent
    guests.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(guests)
    build_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=guests))
    try:
        out = build_dir / "guest"
        out.mkdir()
        await build(out, build_dir)
        try:
            os.rename(out, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            report("another process finished the same guest first; using its copy")
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _remove_stale_builds(guests: Path) -> None:
    """Delete build directories left behind by builds that were killed long ago."""
    now = time.time()
    for entry in guests.glob(".build-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
