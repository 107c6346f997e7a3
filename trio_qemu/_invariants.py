"""Conditions that must hold for the length of a block (``vm.invariant``).

:class:`Invariants` is mixed into :class:`~trio_qemu.Machine`.
"""

from __future__ import annotations

__all__ = ["Invariants"]


class Invariants:
    """``async with vm.invariant(check)`` for a :class:`~trio_qemu.Machine`."""
