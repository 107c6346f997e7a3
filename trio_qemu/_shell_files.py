"""Files both ways between host and guest: ``shell.copy_to`` and ``shell.copy_from``.

:class:`ShellFiles` is mixed into :class:`~trio_qemu.Shell`.
"""

from __future__ import annotations

__all__ = ["ShellFiles"]


class ShellFiles:
    """``copy_to`` and ``copy_from`` of a shell."""
