"""Keyboard input into the guest through QMP ``send-key``.

:class:`KeyboardInput` is mixed into :class:`~trio_qemu.Machine`; it needs only the
machine's ``name`` and ``cmd``.

Keys are QEMU's own names, the values of its ``QKeyCode`` enum (``qapi/ui.json``):
:data:`KEY_NAMES` (public as ``trio_qemu.KEY_NAMES``) lists QEMU 7.2's (a test checks it
against the running QEMU's ``query-qmp-schema``). A combination joins names with ``-``
(``"ctrl-alt-delete"``), as the HMP ``sendkey`` command does. Text is typed on a US
keyboard layout (the Linux console's default keymap): :data:`TEXT_KEYS` maps each character
to the keys that type it.

Everything is checked before anything is sent: an unknown name or character raises
:class:`~trio_qemu.UnknownKeyError` and the guest gets no key at all.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Final

import trio

from ._errors import UnknownKeyError

__all__ = ["KEY_NAMES", "TEXT_KEYS", "KeyboardInput", "parse_keys", "text_keys"]

KEY_NAMES: Final[tuple[str, ...]] = (
    "unmapped", "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "menu", "esc",
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal", "backspace", "tab",
    "q", "w", "e", "r", "t", "y", "u", "i", "o", "p", "bracket_left", "bracket_right", "ret",
    "a", "s", "d", "f", "g", "h", "j", "k", "l", "semicolon", "apostrophe", "grave_accent",
    "backslash", "z", "x", "c", "v", "b", "n", "m", "comma", "dot", "slash", "asterisk",
    "spc", "caps_lock", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10",
    "num_lock", "scroll_lock", "kp_divide", "kp_multiply", "kp_subtract", "kp_add",
    "kp_enter", "kp_decimal", "sysrq", "kp_0", "kp_1", "kp_2", "kp_3", "kp_4", "kp_5",
    "kp_6", "kp_7", "kp_8", "kp_9", "less", "f11", "f12", "print", "home", "pgup", "pgdn",
    "end", "left", "up", "down", "right", "insert", "delete", "stop", "again", "props",
    "undo", "front", "copy", "open", "paste", "find", "cut", "lf", "help", "meta_l",
    "meta_r", "compose", "pause", "ro", "hiragana", "henkan", "yen", "muhenkan",
    "katakanahiragana", "kp_comma", "kp_equals", "power", "sleep", "wake", "audionext",
    "audioprev", "audiostop", "audioplay", "audiomute", "volumeup", "volumedown",
    "mediaselect", "mail", "calculator", "computer", "ac_home", "ac_back", "ac_forward",
    "ac_refresh", "ac_bookmarks", "lang1", "lang2",
)  # fmt: skip
"""The key names :meth:`Machine.send_key` takes: QEMU 7.2's ``QKeyCode`` values
(``qapi/ui.json``), in QEMU's order."""

_KNOWN: Final = frozenset(KEY_NAMES)


def _text_keys() -> dict[str, tuple[str, ...]]:
    keys: dict[str, tuple[str, ...]] = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        keys[letter] = (letter,)
        keys[letter.upper()] = ("shift", letter)
    plain = "1234567890-=[]\\;',./`"
    shifted = '!@#$%^&*()_+{}|:"<>?~'
    names = (
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal", "bracket_left",
        "bracket_right", "backslash", "semicolon", "apostrophe", "comma", "dot", "slash",
        "grave_accent",
    )  # fmt: skip
    for char, upper, name in zip(plain, shifted, names, strict=True):
        keys[char] = (name,)
        keys[upper] = ("shift", name)
    keys.update({" ": ("spc",), "\n": ("ret",), "\t": ("tab",), "\b": ("backspace",)})
    keys["\x1b"] = ("esc",)
    return keys


TEXT_KEYS: Final[Mapping[str, tuple[str, ...]]] = _text_keys()
"""What :meth:`KeyboardInput.send_text` presses for each character it can type: printable
ASCII on a US layout (``"A"`` is ``shift`` + ``a``), ``"\\n"`` (``ret``), ``"\\t"``
(``tab``), ``"\\b"`` (``backspace``) and ``"\\x1b"`` (``esc``)."""

#: Characters send_text hands QEMU at once. QEMU queues at most 1024 entries of key input
#: (``queue_limit`` in its ui/input.c) and drops the rest silently; a press or a release
#: is an event, a sync and a delay (3 entries), so a shifted character costs 12 and a
#: batch of 64 at most 768.
_TEXT_BATCH: Final = 64


def _unknown(key: str, given: str, what: str) -> UnknownKeyError:
    close = difflib.get_close_matches(key, KEY_NAMES, n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return UnknownKeyError(
        f"{what} {key!r} in {given!r} is not a QEMU key name{hint}; the names are QEMU's "
        "QKeyCode values (trio_qemu.KEY_NAMES), joined with '-' for a combination",
        key=key,
        given=given,
    )


def parse_keys(keys: str) -> tuple[str, ...]:
    """The key names of a combination like ``"ctrl-alt-delete"``, each checked.

    Raises :class:`~trio_qemu.UnknownKeyError` naming the first unknown (or empty) name.
    """
    if not isinstance(keys, str):
        raise TypeError(f"keys must be a str like 'ctrl-alt-delete', not {keys!r}")
    names = tuple(keys.split("-"))
    for name in names:
        if name not in _KNOWN:
            raise _unknown(name, keys, "key" if name else "an empty key name")
    if len(set(names)) != len(names):
        raise UnknownKeyError(
            f"a key is named twice in {keys!r}: a combination presses each key once",
            key=next(name for name in names if names.count(name) > 1),
            given=keys,
        )
    return names


def text_keys(text: str) -> list[tuple[str, ...]]:
    """The key combination typing each character of ``text`` (see :data:`TEXT_KEYS`).

    Raises :class:`~trio_qemu.UnknownKeyError` naming the first character it cannot type.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {text!r}")
    combos = []
    for index, char in enumerate(text):
        combo = TEXT_KEYS.get(char)
        if combo is None:
            raise UnknownKeyError(
                f"send_text cannot type {char!r} (at index {index} of {text!r}): it types "
                "printable ASCII, newline, tab, backspace and escape on a US layout; use "
                "send_key for other keys",
                key=char,
                given=text,
            )
        combos.append(combo)
    return combos


def _hold_ms(hold_time: float) -> int:
    if isinstance(hold_time, bool) or not isinstance(hold_time, int | float):
        raise TypeError(f"hold_time must be a number of seconds, not {hold_time!r}")
    if not (hold_time > 0 and math.isfinite(hold_time)):
        raise ValueError(f"hold_time must be a positive number of seconds, not {hold_time!r}")
    return max(1, round(hold_time * 1000))


def _request(combo: tuple[str, ...], hold_ms: int) -> dict[str, object]:
    return {"keys": [{"type": "qcode", "data": name} for name in combo], "hold-time": hold_ms}


class KeyboardInput:
    """Key presses and typed text for a :class:`~trio_qemu.Machine`.

    The keys go to the guest's keyboard: q35 and pc machines have a PS/2 one (launch with
    ``display=True`` or not), others need one added (``-device virtio-keyboard-pci``,
    ``usb-kbd``). QEMU delivers them only while the guest runs; keys sent to a paused
    guest are lost. What the guest does with them is its business: the Linux console
    sends them to the foreground virtual terminal (``/dev/tty1`` in the tiny guest), not
    to a serial console.
    """

    name: str

    async def cmd(  # pragma: no cover - provided by Machine
        self, cmd: str, args: Mapping[str, object] | None = None, **kwargs: Any
    ) -> Any:
        raise NotImplementedError

    async def send_key(
        self, keys: str, *, hold_time: float = 0.1, timeout: float | None = None
    ) -> None:
        """Press a key or a combination, then release it (QMP ``send-key``).

        ``keys`` is a QEMU key name (``"ret"``, ``"f1"``, ``"a"``) or names joined with
        ``-``, pressed in that order: ``"ctrl-alt-delete"``, ``"shift-a"``. The names are
        QEMU's ``QKeyCode`` values, listed in :data:`~trio_qemu.KEY_NAMES`.

        Returns once QEMU has accepted the keys: QEMU presses each, waits ``hold_time``
        seconds of guest time, and releases them, on its own clock after this returns.

        Raises:
            UnknownKeyError: a name is not a QEMU key (nothing is sent).
            ValueError: ``hold_time`` is not a positive number.
            QMPTimeout: QEMU did not answer within ``timeout`` (None: the machine's
                ``qmp_timeout``).
        """
        combo = parse_keys(keys)
        hold_ms = _hold_ms(hold_time)
        await self.cmd("send-key", _request(combo, hold_ms), timeout=timeout)

    async def send_text(
        self, text: str, *, hold_time: float = 0.01, timeout: float | None = None
    ) -> None:
        """Type ``text`` on the guest's keyboard, one ``send-key`` per character, with
        ``shift`` where a US layout needs it: ``await vm.send_text("root\\n")``. It types
        printable ASCII (``"A"`` is ``shift`` + ``a``, ``"!"`` is ``shift`` + ``1``), and
        ``"\\n"`` (``ret``), ``"\\t"`` (``tab``), ``"\\b"`` (``backspace``) and
        ``"\\x1b"`` (``esc``); use :meth:`send_key` for any other key.

        Each key is held ``hold_time`` seconds and the next follows its release, paced by
        QEMU's own key queue. QEMU queues at most 1024 key events and drops the rest
        without a word, so the text goes in batches of 64 characters, and the next batch
        waits until QEMU has had the time to type the last one (the sum of its keys' hold
        times: nothing tells the host when QEMU has delivered its queued keys, so this pace
        is computed, not observed). A character takes 2 x ``hold_time`` to type, 4 x with
        ``shift``; the call returns once the last batch is handed to QEMU.

        Raises:
            UnknownKeyError: a character cannot be typed (nothing is sent).
            ValueError: ``hold_time`` is not a positive number.
            QMPTimeout: QEMU did not answer one ``send-key`` within ``timeout`` (None: the
                machine's ``qmp_timeout``).
        """
        combos = text_keys(text)
        hold_ms = _hold_ms(hold_time)
        typed_by = trio.current_time()
        for start in range(0, len(combos), _TEXT_BATCH):
            # QEMU has typed what it was given by now (each key is pressed, then released,
            # with a delay of hold_ms after each): its queue is empty again.
            await trio.sleep_until(typed_by)
            batch = combos[start : start + _TEXT_BATCH]
            typed_by = trio.current_time() + sum(2 * len(c) for c in batch) * hold_ms / 1000
            for combo in batch:
                await self.cmd("send-key", _request(combo, hold_ms), timeout=timeout)
