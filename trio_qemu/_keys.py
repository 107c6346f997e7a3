"""Keyboard input into the guest through QMP (``send-key``, ``input-send-event``).

:class:`KeyboardInput` is mixed into :class:`~trio_qemu.Machine`.
"""

from __future__ import annotations

__all__ = ["KeyboardInput"]


class KeyboardInput:
    """Key presses and typed text for a :class:`~trio_qemu.Machine`."""
