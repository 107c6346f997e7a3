"""Waiting on guest state through the shell: retry a command until it succeeds or fails.

:class:`ShellWaits` is mixed into :class:`~trio_qemu.Shell`.
"""

from __future__ import annotations

__all__ = ["ShellWaits"]


class ShellWaits:
    """``wait_until_succeeds``, ``wait_until_fails`` and ``wait_for_file`` of a shell."""
