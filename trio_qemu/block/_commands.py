"""Block devices and jobs on a running machine.

:class:`BlockCommands` is mixed into :class:`~trio_qemu.Machine`.
"""

from __future__ import annotations

__all__ = ["BlockCommands"]


class BlockCommands:
    """``blockdev_add``, ``device_add``/``device_del``, ``run_job`` and media of a machine."""
