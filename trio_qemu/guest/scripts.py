"""What the guest gets besides packages: ``/init``, the agents' scripts, inittab, profile.

They are real files in ``files/`` beside this module (shipped as package data, read with
:mod:`importlib.resources`, so they work from an installed wheel too). ``@NAME@`` in a file
is a placeholder :func:`_render` fills in here: a port name, a path in the guest, the list
of boot modules. The shell agent's script is :data:`trio_qemu._shell.SHELL_AGENT_SCRIPT`,
read from the same directory.

:func:`_script_digest` hashes everything here that goes into the plain guest, and
:func:`_digest` is the hash the agent variant uses for its own files; both go into cache
keys, so changing any of these files makes a new guest.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Mapping
from typing import Final

from .._config import AGENT_PORT_NAME, RELAY_PORT_NAME, SHELL_PORT_NAME
from .._shell import SHELL_AGENT_PATH, SHELL_AGENT_SCRIPT
from .image import DEFAULT_APPEND
from .kernel import BOOT_MODULES, GUEST_MODULES
from .relay_binary import RELAY_PATH, relay_digest

__all__ = ["AGENT_WRAPPER_PATH", "INIT_SCRIPT", "READY_MARKER", "render_init"]

READY_MARKER: Final = "TRIO-QEMU-GUEST-READY"
"""What ``/init`` prints on the console once the guest is up (wait for it with
``vm.console.wait_for(READY_MARKER)``)."""

AGENT_WRAPPER_PATH: Final = "/bin/trio-qemu-ga"
"""The agent variant's script that waits for the agent port and runs ``qemu-ga`` on it."""

#: Where the agent variant's port-linking script and qemu-ga go in the guest.
_LINK_PORTS_PATH: Final = "/bin/trio-link-ports"
_QGA_PATH: Final = "usr/sbin/qemu-ga"

_PLACEHOLDER: Final = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def _read(name: str) -> str:
    """The text of ``files/<name>``, byte for byte (no newline translation)."""
    return (importlib.resources.files("trio_qemu.guest") / "files" / name).read_bytes().decode()


def _render(name: str, values: Mapping[str, str]) -> str:
    """``files/<name>`` with each ``@KEY@`` replaced by ``values[KEY]``.

    Raises:
        ValueError: a key is not in the file, or the file has a placeholder left unfilled.
    """
    text = _read(name)
    for key, value in values.items():
        if f"@{key}@" not in text:
            raise ValueError(f"{name} has no placeholder @{key}@")
        text = text.replace(f"@{key}@", value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        raise ValueError(f"{name}: placeholders left unfilled: {', '.join(left)}")
    return text


# --- the plain guest ------------------------------------------------------------------------

INIT_SCRIPT: Final = _read("init.sh")
"""The guest's ``/init`` (``files/init.sh``; its ``@...@`` placeholders are filled in by
:func:`render_init`)."""

_UDHCPC_SCRIPT: Final = _read("udhcpc.sh")

_INITTAB: Final = _render(
    "inittab",
    {
        "SHELL_AGENT_PATH": SHELL_AGENT_PATH,
        "SHELL_PORT": SHELL_PORT_NAME,
        "RELAY_PATH": RELAY_PATH,
        "RELAY_PORT": RELAY_PORT_NAME,
    },
)

_ETC_FILES: Final = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/profile": _read("profile"),
    "etc/resolv.conf": "",
    "etc/inittab": _INITTAB,
}


def render_init() -> str:
    """The ``/init`` script with its placeholders filled in."""
    return _render("init.sh", {"BOOT_MODULES": " ".join(BOOT_MODULES), "READY": READY_MARKER})


def _script_digest() -> str:
    """A short hash of everything the plain guest gets besides the packages (the relay's
    source, and whether it can be compiled here, and the kernel command line included)."""
    return _digest(
        INIT_SCRIPT, SHELL_AGENT_SCRIPT, _UDHCPC_SCRIPT, repr(sorted(_ETC_FILES.items())),
        repr(GUEST_MODULES), repr(BOOT_MODULES), READY_MARKER, relay_digest(), DEFAULT_APPEND,
    )  # fmt: skip


def _digest(*parts: str) -> str:
    """A short hash of ``parts`` (each one's UTF-8 bytes, NUL-terminated)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


# --- the agent variant's additions ----------------------------------------------------------

_LINK_PORTS_SCRIPT: Final = _read("link-ports.sh")

_AGENT_WRAPPER_SCRIPT: Final = _render(
    "qga-wrapper.sh", {"AGENT_PORT": AGENT_PORT_NAME, "QGA_PATH": _QGA_PATH}
)

_SHUTDOWN_SCRIPT: Final = _read("shutdown.sh")

# The plain inittab between a sysinit entry that links the ports and qemu-ga's entry.
_AGENT_INITTAB: Final = _render(
    "inittab-agent",
    {
        "LINK_PORTS_PATH": _LINK_PORTS_PATH,
        "INITTAB": _INITTAB.removesuffix("\n"),
        "AGENT_WRAPPER_PATH": AGENT_WRAPPER_PATH,
    },
)
