"""The tiny Linux test guest: a Debian kernel and a busybox initramfs, built once and cached.

Tests, examples and the demo need a real Linux guest that boots in seconds under TCG. This
package builds one offline from two Debian packages, installing nothing on the host:

1. ``apt-cache`` names the versioned kernel package behind ``linux-image-amd64`` and the
   candidate versions of it and ``busybox-static``; those versions (and the layout version
   and a hash of the guest-side files) name the cache entry, so a kernel update makes a new
   guest (``guest/build.py``, ``guest/apt.py``).
2. ``apt-get download`` fetches both ``.deb`` files into a temporary directory.
3. ``dpkg-deb --fsys-tarfile X.deb | tar -x --wildcards ...`` (two processes joined by a
   pipe, no shell) extracts only the ``vmlinuz``, the few modules the guest needs and the
   files ``depmod`` reads: about 11 MB of the kernel package's 390 (``guest/kernel.py``).
4. The bzImage's payload (an XZ stream) is decompressed with :mod:`lzma` into an ELF
   ``vmlinux``: QEMU boots that through its PVH entry point, skipping the real-mode setup
   and the in-guest decompressor (about 2 s to the ready marker under TCG instead of 5.5).
5. An *uncompressed* newc cpio initramfs (``guest/initramfs.py``, ``guest/cpio.py``) is
   written around busybox, with ``modules.dep`` made by ``busybox depmod``, the shell agent
   of ``trio_qemu/_shell.py`` and ``/init``. The files the guest gets besides packages are real
   files in ``trio_qemu/guest/files/`` (``guest/scripts.py``).
6. Everything is built in a temporary directory beside the cache entry and renamed into
   place in one step, so concurrent builders never see a half-built guest: the loser of the
   race discards its copy and uses the winner's (``guest/image.py``).

The guest's ``/init`` (``files/init.sh``) mounts proc, sys, devtmpfs, devpts and tmpfs,
loads the virtio and network modules, brings ``lo`` up, applies the ``trio.*`` kernel
command-line hooks (hostname, a static or DHCP address, extra modules), prints
:data:`READY_MARKER` on the console and hands PID 1 to busybox ``init``, which starts the
shell agent (when the ``org.trio-qemu.shell`` port exists) and an interactive shell on
the console with job control (respawned when it exits), reaps orphans, and turns
``poweroff``/``reboot`` into QEMU exiting (``-no-reboot``). Under TCG on q35 the marker
appears about 1.6-2.2 s after QEMU starts, and the shell agent answers right after. Type on
the console only once its prompt has appeared: input sent before the shell starts may be
discarded when the terminal is set up.

With ``agent=True`` (:func:`ensure_guest`, :func:`build_guest`) a variant of that guest also
runs the QEMU guest agent, ``qemu-ga``, for :mod:`trio_qemu.agent` (``guest/agent_variant.py``).
It is the plain guest plus a second cpio archive appended to its initramfs (the kernel
unpacks concatenated archives in turn, later files replacing earlier ones), so it reuses the
plain guest's kernel and cache entry and costs one small download (about 5 MB) on top:

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

# The underscored names are private; they are here because tests/test_agent.py imports
# them from trio_qemu.guest (new code: take them from .scripts and .agent_variant).
from .._util import publish as _publish
from .agent_variant import _parse_ldd as _parse_ldd
from .apt import AGENT_LIBRARY_PACKAGES as AGENT_LIBRARY_PACKAGES
from .apt import AGENT_PACKAGE as AGENT_PACKAGE
from .apt import BUSYBOX_PACKAGE as BUSYBOX_PACKAGE
from .apt import KERNEL_META_PACKAGE as KERNEL_META_PACKAGE
from .build import build_guest as build_guest
from .build import ensure_guest as ensure_guest
from .image import CACHE_ENV as CACHE_ENV
from .image import DEFAULT_APPEND as DEFAULT_APPEND
from .image import FORMAT_VERSION as FORMAT_VERSION
from .image import GUEST_ARGS as GUEST_ARGS
from .image import GuestImage as GuestImage
from .image import default_cache_dir as default_cache_dir
from .kernel import BOOT_MODULES as BOOT_MODULES
from .kernel import GUEST_MODULES as GUEST_MODULES
from .scripts import _AGENT_INITTAB as _AGENT_INITTAB
from .scripts import _AGENT_WRAPPER_SCRIPT as _AGENT_WRAPPER_SCRIPT
from .scripts import _LINK_PORTS_SCRIPT as _LINK_PORTS_SCRIPT
from .scripts import _SHUTDOWN_SCRIPT as _SHUTDOWN_SCRIPT
from .scripts import AGENT_WRAPPER_PATH as AGENT_WRAPPER_PATH
from .scripts import INIT_SCRIPT as INIT_SCRIPT
from .scripts import READY_MARKER as READY_MARKER
from .scripts import render_init as render_init

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

_publish(__name__, globals(), __all__)
