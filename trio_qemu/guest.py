"""The tiny Linux test guest: a Debian kernel and a busybox initramfs, built once and cached.

Tests, examples and the demo need a real Linux guest that boots in seconds under TCG. This
module builds one offline from two Debian packages, installing nothing on the host:

1. ``apt-cache`` names the versioned kernel package behind ``linux-image-amd64`` and the
   candidate versions of it and ``busybox-static``; those versions (and the layout version
   of this module) name the cache entry, so a kernel update makes a new guest.
2. ``apt-get download`` fetches both ``.deb`` files into a temporary directory.
3. ``dpkg-deb --fsys-tarfile X.deb | tar -x --wildcards ...`` (two processes joined by a
   pipe, no shell) extracts only the ``vmlinuz``, the few modules the guest needs and the
   files ``depmod`` reads: about 11 MB of the kernel package's 390.
4. The bzImage's payload (an XZ stream) is decompressed with :mod:`lzma` into an ELF
   ``vmlinux``: QEMU boots that through its PVH entry point, skipping the real-mode setup
   and the in-guest decompressor (about 2 s to the ready marker under TCG instead of 5.5).
5. An *uncompressed* newc cpio initramfs (:mod:`._cpio`) is written around busybox, with
   ``modules.dep`` made by ``busybox depmod``, the guest shell agent of :mod:`._shell` and
   the ``/init`` below.
6. Everything is built in a temporary directory beside the cache entry and renamed into
   place in one step, so concurrent builders never see a half-built guest: the loser of the
   race discards its copy and uses the winner's.

The guest's ``/init`` (:data:`INIT_SCRIPT`) mounts proc, sys, devtmpfs, devpts and tmpfs,
loads the virtio and network modules, brings ``lo`` up, applies the ``trio.*`` kernel
command-line hooks (hostname, a static or DHCP address, extra modules), prints
:data:`READY_MARKER` on the console and hands PID 1 to busybox ``init``, which starts the
guest shell agent (when the ``org.trio-qemu.shell`` port exists) and an interactive shell on
the console with job control (respawned when it exits), reaps orphans, and turns
``poweroff``/``reboot`` into QEMU exiting (``-no-reboot``). Under TCG on q35 the marker
appears about 1.6-2.2 s after QEMU starts, and the shell agent answers right after. Type on
the console only once its prompt has appeared: input sent before the shell starts may be
discarded when the terminal is set up.

With ``agent=True`` (:func:`ensure_guest`, :func:`build_guest`) a variant of that guest also
runs the QEMU guest agent, ``qemu-ga``, for :mod:`trio_qemu.agent`. It is the plain guest plus
a second cpio archive appended to its initramfs (the kernel unpacks concatenated archives in
turn, later files replacing earlier ones), so it reuses the plain guest's kernel and cache
entry and costs one small download (about 5 MB) on top:

1. ``apt-get download`` fetches ``qemu-guest-agent`` and the packages of the libraries its
   ``qemu-ga`` needs (:data:`AGENT_LIBRARY_PACKAGES`); their versions go into the variant's
   cache key, next to the plain guest's.
2. ``qemu-ga`` and those libraries are extracted, and ``ldd`` (with ``LD_LIBRARY_PATH`` on the
   extracted libraries) lists what ``qemu-ga`` loads: libglib, libgmodule, libudev, libnuma,
   liburing, libpcre2, libm, libc and the loader. Each comes from the packages, or from the
   host's own copy if the packages lack it (logged); anything not found fails the build.
3. The appended archive holds them under ``/lib/x86_64-linux-gnu`` (the loader also as
   ``/lib64/ld-linux-x86-64.so.2``), a ``/sbin/shutdown`` for ``guest-shutdown`` (busybox
   ``poweroff -f``, ``halt -f`` or ``reboot -f`` for qemu-ga's ``-P``, ``-H`` or ``-r``),
   and an ``/etc/inittab`` that adds two entries to the plain one: at ``sysinit`` (before
   anything else starts) a link ``/dev/virtio-ports/<name>`` for every named virtio-serial
   port (there is no udev), then, once, :data:`AGENT_WRAPPER_PATH`, which waits for the
   ``org.qemu.guest_agent.0`` port and runs ``qemu-ga -m virtio-serial -p
   /dev/virtio-ports/org.qemu.guest_agent.0``, restarting it if it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final

import trio

from ._config import AGENT_PORT_NAME, SHELL_PORT_NAME, MachineConfig
from ._cpio import CpioWriter
from ._errors import GuestBuildError
from ._shell import GUEST_AGENT_PATH, GUEST_AGENT_SCRIPT

__all__ = [
    "AGENT_LIBRARY_PACKAGES",
    "AGENT_PACKAGE",
    "AGENT_WRAPPER_PATH",
    "BOOT_MODULES",
    "CACHE_ENV",
    "DEFAULT_APPEND",
    "GUEST_ARGS",
    "GUEST_MODULES",
    "READY_MARKER",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "ensure_guest",
]

log = logging.getLogger("trio_qemu.guest")

FORMAT_VERSION: Final = 1
"""Bumped whenever the layout of a built guest changes in a way the script hash below does
not capture (it is part of every cache key)."""

CACHE_ENV: Final = "TRIO_QEMU_CACHE"
"""Environment variable naming the cache root (else ``$XDG_CACHE_HOME/trio-qemu``, else
``~/.cache/trio-qemu``)."""

READY_MARKER: Final = "TRIO-QEMU-GUEST-READY"
"""What ``/init`` prints on the console once the guest is up (wait for it with
``vm.console.wait_for(READY_MARKER)``)."""

DEFAULT_APPEND: Final = "console=ttyS0 quiet panic=-1"
"""The kernel command line: console on the first serial port, kernel messages only when
they are errors (serial output is slow under TCG; ``/init`` prints the ready marker itself),
and reboot at once on a panic, which ``-no-reboot`` turns into QEMU exiting."""

GUEST_ARGS: Final = ("-nodefaults", "-no-reboot")
"""The extra QEMU arguments :meth:`GuestImage.config` gives: no default devices (they only
slow the boot), and QEMU exits when the guest reboots, powers off or panics. Keep them when
passing ``args=`` of your own: ``image.config(args=[*GUEST_ARGS, "-nic", "user"])``."""

KERNEL_META_PACKAGE: Final = "linux-image-amd64"
"""The Debian meta package whose dependency names the versioned kernel package."""

BUSYBOX_PACKAGE: Final = "busybox-static"
"""The Debian package the guest's userland comes from (one static binary)."""

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
"""Modules ``/init`` loads at boot (failures ignored); add more with ``trio.modules=a,b``
on the kernel command line or ``modprobe`` in the guest."""

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
)

#: How many extraction passes may chase missing dependencies before the build gives up.
_MAX_EXTRACT_PASSES = 3
#: Compressed bytes fed to the XZ decompressor between two checkpoints.
_XZ_CHUNK = 1 << 20
#: Bytes of a failing tool's stderr kept for the error message.
_STDERR_TAIL = 4000
#: Temporary build directories older than this are left-overs of a killed build.
_STALE_BUILD_SECONDS = 3600.0
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"
_ELF_MAGIC: Final = b"\x7fELF"
_IMAGE_FILE: Final = "image.json"
_ENV: Final = {"LC_ALL": "C"}

AGENT_PACKAGE: Final = "qemu-guest-agent"
"""The Debian package ``qemu-ga`` comes from (for ``agent=True``)."""

AGENT_LIBRARY_PACKAGES: Final = (
    "libc6",
    "libglib2.0-0",
    "libnuma1",
    "libudev1",
    "liburing2",
    "libpcre2-8-0",
)
"""The Debian packages holding the libraries ``qemu-ga`` loads; the agent variant takes them
from here rather than from the host, so its contents follow the versions in its cache key."""

AGENT_WRAPPER_PATH: Final = "/bin/trio-qemu-ga"
"""The agent variant's script that waits for the agent port and runs ``qemu-ga`` on it."""

#: The agent variant's layout version (part of its cache key, like FORMAT_VERSION).
_AGENT_FORMAT_VERSION: Final = 1
#: Where qemu-ga and its libraries go in the guest.
_QGA_PATH: Final = "usr/sbin/qemu-ga"
_GUEST_LIBDIR: Final = "lib/x86_64-linux-gnu"
_LOADER: Final = "ld-linux-x86-64.so.2"
_LINK_PORTS_PATH: Final = "/bin/trio-link-ports"

_OWN_KERNEL_HINT: Final = (
    "To use a kernel and initramfs of your own instead, give them to the machine directly: "
    "MachineConfig(kernel=..., initrd=..., append='console=ttyS0', console=True)."
)

INIT_SCRIPT: Final = r"""#!/bin/busybox sh
# /init of the trio-qemu tiny guest (written by trio_qemu.guest).
# Kernel command-line hooks: trio.hostname=NAME  trio.ip=ADDR/PREFIX|dhcp  trio.gw=ADDR
#                            trio.iface=eth0  trio.modules=mod1,mod2
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

name=trio-guest ip_addr= gw= iface=eth0 extra=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        trio.hostname=*) name=${arg#*=} ;;
        trio.ip=*) ip_addr=${arg#*=} ;;
        trio.gw=*) gw=${arg#*=} ;;
        trio.iface=*) iface=${arg#*=} ;;
        trio.modules=*) extra=$(echo "${arg#*=}" | tr , ' ') ;;
    esac
done
hostname "$name"
modprobe -a -q @BOOT_MODULES@ $extra 2>/dev/null
ip link set lo up

if [ -n "$ip_addr" ]; then
    ip link set "$iface" up
    if [ "$ip_addr" = dhcp ]; then
        udhcpc -i "$iface" -n -q -t 10 -T 1 -s /etc/udhcpc/default.script >/dev/null 2>&1 ||
            echo "trio-qemu: DHCP on $iface failed"
    else
        ip addr add "$ip_addr" dev "$iface"
        [ -z "$gw" ] || ip route add default via "$gw" dev "$iface"
    fi
fi

# busybox init takes over as PID 1 (see /etc/inittab): it starts the shell agent and the
# console shell with default signal handling (so Ctrl-C works), respawns the console shell,
# reaps orphans, and handles poweroff/reboot.
echo @READY@
exec /bin/busybox init
"""
"""The guest's ``/init`` (``@...@`` placeholders are filled in at build time)."""

_UDHCPC_SCRIPT: Final = r"""#!/bin/sh
# udhcpc event handler of the trio-qemu tiny guest.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route del default 2>/dev/null
            for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        fi
        if [ -n "$dns" ]; then
            : >/etc/resolv.conf
            for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        fi
        ;;
esac
exit 0
"""

_INITTAB: Final = f"""\
# busybox init, started by /init once the guest is set up.
::once:{GUEST_AGENT_PATH} /dev/virtio-ports/{SHELL_PORT_NAME}
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

_PROFILE: Final = r"""export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${TERM:-linux}
PS1='\h:\w\$ '
"""

_ETC_FILES: Final = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/profile": _PROFILE,
    "etc/resolv.conf": "",
    "etc/inittab": _INITTAB,
}


_LINK_PORTS_SCRIPT: Final = r"""#!/bin/sh
# Link /dev/virtio-ports/<name> to every virtio-serial port whose name is known (what udev
# does elsewhere). Run by busybox init at sysinit, before the agents start.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    n=
    read -r n <"$p/name" 2>/dev/null
    [ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
done
exit 0
"""

_AGENT_WRAPPER_SCRIPT: Final = rf"""#!/bin/sh
# Run the QEMU guest agent on its virtio-serial port; restart it if it exits.
name={AGENT_PORT_NAME}
port=/dev/virtio-ports/$name

# No virtio-serial device at all: nothing to serve.
for d in /sys/bus/virtio/drivers/virtio_console/virtio* ''; do [ -e "$d" ] && break; done
[ -n "$d" ] || exit 0

# The port's name may reach the guest after sysinit linked the others: look every 20 ms,
# for at most 20 s.
i=0
until [ -e "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        n=
        read -r n <"$p/name" 2>/dev/null
        [ "$n" = "$name" ] && ln -s "../${{p##*/}}" "$port" 2>/dev/null
    done
    [ -e "$port" ] && break
    i=$((i + 1))
    [ "$i" -le 1000 ] || exit 0
    usleep 20000
done

while :; do
    /{_QGA_PATH} -m virtio-serial -p "$port"
    echo "trio-qemu: qemu-ga exited with status $?; restarting it" >&2
    sleep 1
done
"""

_SHUTDOWN_SCRIPT: Final = r"""#!/bin/sh
# /sbin/shutdown for qemu-ga's guest-shutdown, which runs
#   shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"
# There are no run levels to go through: power off, halt or reboot at once.
action=poweroff
for arg in "$@"; do
    case "$arg" in
        -r) action=reboot ;;
        -H) action=halt ;;
        -P) action=poweroff ;;
    esac
done
sync
exec "$action" -f
"""

_AGENT_INITTAB: Final = (
    f"::sysinit:{_LINK_PORTS_PATH}\n" + _INITTAB + f"::once:{AGENT_WRAPPER_PATH}\n"
)


def _agent_digest(packages: Sequence[_Package]) -> str:
    """A short hash of what the agent variant adds: its scripts and library packages."""
    digest = hashlib.sha256()
    for part in (
        _LINK_PORTS_SCRIPT, _AGENT_WRAPPER_SCRIPT, _SHUTDOWN_SCRIPT, _AGENT_INITTAB,
        repr([(p.name, p.version) for p in packages]), str(_AGENT_FORMAT_VERSION),
    ):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def _script_digest() -> str:
    """A short hash of everything this module puts into the guest besides the packages."""
    digest = hashlib.sha256()
    for part in (
        INIT_SCRIPT, GUEST_AGENT_SCRIPT, _UDHCPC_SCRIPT, repr(sorted(_ETC_FILES.items())),
        repr(GUEST_MODULES), repr(BOOT_MODULES), READY_MARKER,
    ):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def render_init() -> str:
    """The ``/init`` script with its placeholders filled in."""
    return INIT_SCRIPT.replace("@BOOT_MODULES@", " ".join(BOOT_MODULES)).replace(
        "@READY@", READY_MARKER
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
    """The cache key: kernel package, busybox version and this module's layout version."""
    kernel_release: str = ""
    """The guest's ``uname -r`` (e.g. ``6.1.0-56-amd64``)."""
    agent: bool = False
    """Whether the guest runs the QEMU guest agent (built with ``agent=True``)."""

    def config(self, **fields: Any) -> MachineConfig:
        """A :class:`~trio_qemu.MachineConfig` that boots this guest; ``fields`` override.

        Defaults: ``machine="q35"``, ``memory=256`` (MiB), the console and the guest-shell
        channel on (and the guest-agent channel, ``agent=True``, when this image has the
        agent), this image's kernel, initrd and command line, and
        ``args=GUEST_ARGS`` (``-nodefaults -no-reboot``), so that no default devices slow the
        boot and a guest panic, ``poweroff`` or ``reboot`` ends QEMU instead of booting again.
        ``args=`` replaces those; start yours with :data:`GUEST_ARGS` to keep them.

        Raises ValueError for ``agent=True`` on an image without the agent: nothing in that
        guest would answer on the channel.
        """
        if fields.get("agent") and not self.agent:
            raise ValueError(
                f"the tiny guest {self.version or self.initrd} has no guest agent (qemu-ga); "
                "get one that has with ensure_guest(agent=True) or build_guest(agent=True)"
            )
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
        )
        return base.replace(**fields) if fields else base


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


@dataclass(frozen=True)
class _Package:
    name: str
    version: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.size / 1e6:.1f} MB)"


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


async def ensure_guest(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = 900.0,
    agent: bool = False,
    _download_dir: str | os.PathLike[str] | None = None,
) -> GuestImage:
    """The tiny guest for the current Debian kernel: the cached one, or built now.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`); the guest goes
    into ``<cache_dir>/guest/<kernel ABI>_<version>-busybox_<version>-f<layout>.<hash>``, the
    hash covering the scripts and settings this module puts into the guest.
    ``progress`` receives a line per step (downloading with the size, extracting, building,
    timings); without it they go to the ``trio_qemu.guest`` logger at INFO level.

    Asking ``apt-cache`` for the package versions takes a fraction of a second; if that
    fails but a guest was built before, the newest cached one is used. A build downloads
    about 72 MB and takes some seconds. ``timeout`` bounds the whole call.

    With ``agent=True`` the guest also runs the QEMU guest agent (see the module docstring):
    the plain guest is ensured first, then its agent variant, cached beside it as
    ``<plain guest's key>-qga_<version>.<hash>`` (the hash covering the library package
    versions and the agent's scripts); building that adds about 5 MB of downloads and a
    second or two.

    Raises :class:`~trio_qemu.GuestBuildError` when the tools (``apt-cache``, ``apt-get``,
    ``dpkg-deb``, ``tar``) are missing or fail, when the cache cannot be written, or after
    ``timeout`` seconds; its message says how to boot a kernel and initramfs of one's own
    instead.
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


# --- the cache --------------------------------------------------------------------------


def _cache_key(kernel: _Package, busybox: _Package) -> str:
    raw = (
        f"{kernel.name.removeprefix('linux-image-')}_{kernel.version}"
        f"-busybox_{busybox.version}-f{FORMAT_VERSION}.{_script_digest()}"
    )
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)


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


def _remove_stale_builds(guests: Path) -> None:
    """Delete build directories left behind by builds that were killed long ago."""
    now = time.time()
    for entry in guests.glob(".build-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


# --- running the Debian tools -------------------------------------------------------------


def _tool_error(
    what: str, exc: BaseException | None = None, stderr: bytes = b""
) -> GuestBuildError:
    """A GuestBuildError for a failed tool, with its output and the way out."""
    detail = f": {exc}" if exc is not None else ""
    if stderr:
        detail += "\n  its output:\n    " + "\n    ".join(
            stderr.decode("utf-8", "replace")[-_STDERR_TAIL:].rstrip().splitlines()
        )
    return GuestBuildError(f"{what}{detail}\n  {_OWN_KERNEL_HINT}")


async def _run(
    argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> bytes:
    """Run a tool to completion; return its stdout; raise GuestBuildError on failure.

    ``env`` adds to (and overrides) the environment."""
    try:
        result = await trio.run_process(
            list(argv),
            cwd=cwd,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_ENV, **(env or {})},
        )
    except FileNotFoundError as exc:
        raise _tool_error(
            f"{argv[0]} is not installed (the tiny guest is built from Debian packages)", exc
        ) from exc
    except OSError as exc:
        raise _tool_error(f"cannot run {argv[0]}", exc) from exc
    if result.returncode != 0:
        raise _tool_error(
            f"{' '.join(argv)} failed with exit status {result.returncode}",
            stderr=result.stderr,
        )
    return result.stdout


def _stanzas(text: str) -> list[dict[str, str]]:
    """Parse ``apt-cache show`` output (RFC 822 stanzas) into dicts (continuations dropped)."""
    stanzas: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


async def _resolve_packages() -> tuple[_Package, _Package]:
    """The versioned kernel package behind the meta package, and busybox-static.

    One ``apt-cache show`` call (about 0.4 s) in the usual case: Debian's meta package
    depends on exactly one version (``=``) of the kernel package. Sizes are filled in by
    :func:`_with_sizes` only when a build needs them.
    """
    text = await _run(
        ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE, BUSYBOX_PACKAGE]
    )
    stanzas = {s.get("Package", ""): s for s in _stanzas(text.decode("utf-8", "replace"))}
    kernel: _Package | None = None
    for dependency in re.split(r"[,|]", stanzas.get(KERNEL_META_PACKAGE, {}).get("Depends", "")):
        match = re.fullmatch(r"\s*(linux-image-\S+)\s*(?:\(\s*=\s*(\S+)\s*\))?\s*", dependency)
        if match:
            kernel = _Package(match.group(1), match.group(2) or "", 0)
            break
    if kernel is None:
        raise GuestBuildError(
            f"apt-cache knows no {KERNEL_META_PACKAGE} with a linux-image-* dependency "
            "(run apt-get update?). " + _OWN_KERNEL_HINT
        )
    busybox = _package_from(stanzas.get(BUSYBOX_PACKAGE))
    if busybox is None:
        raise GuestBuildError(
            f"apt-cache knows no candidate for {BUSYBOX_PACKAGE} (run apt-get update?). "
            + _OWN_KERNEL_HINT
        )
    if not kernel.version:
        (kernel,) = await _with_sizes([kernel])
    return kernel, busybox


def _package_from(stanza: dict[str, str] | None) -> _Package | None:
    """The package an ``apt-cache show`` stanza describes, or None if it is incomplete."""
    if stanza is None:
        return None
    try:
        return _Package(stanza["Package"], stanza["Version"], int(stanza.get("Size", 0)))
    except (KeyError, ValueError):
        return None


async def _with_sizes(packages: Sequence[_Package]) -> list[_Package]:
    """``packages`` with their candidate version and download size from ``apt-cache``."""
    text = await _run(["apt-cache", "show", "--no-all-versions", *(p.name for p in packages)])
    found: dict[str, _Package] = {}
    for stanza in _stanzas(text.decode("utf-8", "replace")):
        package = _package_from(stanza)
        if package is not None:
            found.setdefault(package.name, package)
    result = []
    for package in packages:
        known = found.get(package.name)
        if known is None:
            raise GuestBuildError(
                f"apt-cache knows no candidate for {package.name} (run apt-get update?). "
                + _OWN_KERNEL_HINT
            )
        if package.version and known.version != package.version:
            raise GuestBuildError(
                f"{KERNEL_META_PACKAGE} wants {package.name} {package.version} but apt's "
                f"candidate is {known.version}. " + _OWN_KERNEL_HINT
            )
        result.append(known)
    return result


async def _download(
    packages: Sequence[_Package], directory: Path, reuse: Path | None, report: _Reporter
) -> list[Path]:
    """The ``.deb`` of each package: from ``reuse`` if present there, else downloaded."""
    source = reuse if reuse is not None else directory
    _mkdir(source)
    wanted = {p: _deb_in(source, p) for p in packages}
    missing = [p for p, path in wanted.items() if path is None]
    if missing:
        if not all(p.size for p in missing):
            missing = await _with_sizes(missing)  # for the sizes in the progress line
        start = time.monotonic()
        report("downloading " + " and ".join(p.label for p in missing))
        await _run(["apt-get", "download", *(f"{p.name}={p.version}" for p in missing)], cwd=source)
        report(f"downloaded in {report.since(start)}")
        wanted = {p: _deb_in(source, p) for p in packages}
    result = []
    for package, path in wanted.items():
        if path is None:
            raise GuestBuildError(f"apt-get download left no .deb for {package.label}")
        result.append(path)
    return result


def _deb_in(directory: Path, package: _Package) -> Path | None:
    """The ``.deb`` of ``package`` in ``directory`` (apt quotes ``:`` as ``%3a``)."""
    prefix = f"{package.name}_{package.version.replace(':', '%3a')}_"
    matches = sorted(directory.glob(f"{_glob_escape(prefix)}*.deb"))
    return matches[0] if matches else None


def _glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal (for :meth:`Path.glob`)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


async def _extract(deb: Path, into: Path, patterns: Sequence[str]) -> list[str]:
    """Extract the members of ``deb`` matching ``patterns`` into ``into``.

    ``dpkg-deb --fsys-tarfile`` feeds ``tar -x --wildcards`` through a pipe (two processes,
    no shell). Returns the patterns that matched nothing (tar's "Not found in archive");
    any other failure raises GuestBuildError.
    """
    _mkdir(into)
    read_end, write_end = os.pipe()
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    unpack = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    untar = ["tar", "-x", "--wildcards", "--no-same-owner", "-C", str(into), "-f", "-", *patterns]
    spawn_error: tuple[str, OSError] | None = None
    async with trio.open_nursery() as nursery:
        try:
            for name, argv, stdin, stdout in (
                ("dpkg-deb", unpack, subprocess.DEVNULL, write_end),
                ("tar", untar, read_end, subprocess.DEVNULL),
            ):
                try:
                    await nursery.start(
                        partial(_run_into, results, name, argv, stdin=stdin, stdout=stdout)
                    )
                except OSError as exc:  # raised outside the nursery: no exception group
                    spawn_error = (name, exc)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            # Only the children may hold the pipe now, so tar sees EOF when dpkg-deb ends
            # (and dpkg-deb a broken pipe if tar could not start).
            os.close(write_end)
            os.close(read_end)
    if spawn_error is not None:
        tool, error = spawn_error
        what = "is not installed" if isinstance(error, FileNotFoundError) else "cannot be run"
        raise _tool_error(f"{tool} {what}", error) from error
    tar, dpkg = results["tar"], results["dpkg-deb"]
    tar_errors = tar.stderr.decode("utf-8", "replace").splitlines()
    unmatched = [
        line.split(": ", 2)[1]
        for line in tar_errors
        if line.endswith("Not found in archive") and line.count(": ") >= 2
    ]
    real_errors = [
        line
        for line in tar_errors
        if not line.endswith("Not found in archive")
        and "Exiting with failure status due to previous errors" not in line
    ]
    if dpkg.returncode != 0 or real_errors or (tar.returncode != 0 and not unmatched):
        raise _tool_error(
            f"extracting {deb.name} failed (dpkg-deb exit status {dpkg.returncode}, "
            f"tar exit status {tar.returncode})",
            stderr=dpkg.stderr + tar.stderr,
        )
    return unmatched


async def _run_into(
    results: dict[str, subprocess.CompletedProcess[bytes]],
    name: str,
    argv: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``trio.run_process`` for ``nursery.start``, keeping the result under ``name``."""
    results[name] = await trio.run_process(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        capture_stderr=True,
        check=False,
        env={**os.environ, **_ENV},
        task_status=task_status,
    )


# --- the build -----------------------------------------------------------------------------


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
    tree = build_dir / "kernel"
    wanted = [*GUEST_MODULES, *_LIKELY_DEPENDENCIES]
    patterns = [
        "*/boot/vmlinuz-*",
        "*/modules/*/modules.order",
        "*/modules/*/modules.builtin",
        *(_module_pattern(name) for name in wanted),
    ]
    unmatched = await _extract(kernel_deb, tree, patterns)
    if any(p.startswith("*/boot/") or p.endswith("modules.order") for p in unmatched):
        raise GuestBuildError(f"{kernel_deb.name} holds no vmlinuz or modules. " + _OWN_KERNEL_HINT)
    vmlinuz = sorted(tree.glob("**/boot/vmlinuz-*"))[0]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    module_root = next(tree.glob(f"**/modules/{_glob_escape(release)}"))
    builtin = _builtin_modules(module_root)
    modules = await _module_closure(kernel_deb, tree, module_root, builtin)
    report(f"extracted {len(modules)} modules in {report.since(start)}")

    start = time.monotonic()
    report(f"decompressing {vmlinuz.name} into an ELF vmlinux")
    kernel_size = await _decompress_vmlinuz(vmlinuz, out / "vmlinux")
    report(f"vmlinux is {kernel_size / 1e6:.1f} MB ({report.since(start)})")

    start = time.monotonic()
    report("building the initramfs")
    await _extract(busybox_deb, build_dir / "busybox", ["*/bin/busybox"])
    busybox = next((build_dir / "busybox").glob("**/bin/busybox"))
    initrd_size = await _write_initramfs(
        out / "initrd.cpio", build_dir / "initramfs", busybox, module_root, release, modules
    )
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
        "format": FORMAT_VERSION,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / _IMAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


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


# Local file work below is deliberately synchronous: small, quick, and no worker threads.


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (``with``)


async def _write_initramfs(
    target: Path,
    staging: Path,
    busybox: Path,
    module_root: Path,
    release: str,
    modules: dict[str, Path],
) -> int:
    """Assemble the initramfs tree in ``staging``, run depmod on it, archive it."""
    _stage_modules(staging / "lib" / "modules" / release, module_root, modules)
    await _run([str(busybox), "depmod", "-b", str(staging), release])
    applets = (await _run([str(busybox), "--list-full"])).decode().split()
    return _write_cpio(target, staging, busybox, applets)


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


def _write_cpio(target: Path, staging: Path, busybox: Path, applets: list[str]) -> int:
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
        cpio.file(GUEST_AGENT_PATH.lstrip("/"), GUEST_AGENT_SCRIPT.encode(), mode=0o755)
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


# --- the agent variant --------------------------------------------------------------------


async def _resolve_agent_packages() -> list[_Package]:
    """``qemu-guest-agent`` and :data:`AGENT_LIBRARY_PACKAGES` with their candidate versions
    and sizes (one ``apt-cache show``)."""
    names = (AGENT_PACKAGE, *AGENT_LIBRARY_PACKAGES)
    return await _with_sizes([_Package(name, "", 0) for name in names])


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
