"""The qtest request language, checked before anything is sent: pure code, no Trio, no I/O.

QEMU's qtest server *aborts the whole VM* on a malformed line (a missing argument, a bad
number, an empty line, a ``\\r``, a port above 0xffff...). :func:`check_line` refuses every
such line with :class:`~trio_qemu.QtestInvalidRequest` by checking it against
:data:`COMMANDS`, which spells out the arguments of every command of QEMU 7.2 this package
sends. The checks that need QEMU's state (does the machine have a CPU? is this QOM path a
device?) are made over QMP by :mod:`trio_qemu.qtest.channel`.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from .._errors import QtestInvalidRequest

__all__ = ["COMMANDS", "MAX_TRANSFER", "check_line"]

MAX_TRANSFER: Final = 1 << 24
"""The largest size (bytes) one request may name (``read``, ``b64read``, ``write``,
``b64write``, ``memset``): QEMU allocates that much at once, and a huge size would abort it.
:meth:`QtestMachine.read <trio_qemu.QtestMachine.read>` and
:meth:`QtestMachine.write <trio_qemu.QtestMachine.write>` split larger transfers."""

_U64_MAX: Final = (1 << 64) - 1
_ULONG_MAX: Final = (1 << (8 * struct.calcsize("L"))) - 1  # QEMU's `unsigned long`
_I64: Final = (-(1 << 63), (1 << 63) - 1)
_INT: Final = (-(1 << 31), (1 << 31) - 1)

# What strtoul(..., 0)/strtoll(..., 0) accept in full, and nothing more: hex with a digit,
# octal with a leading 0, decimal. No whitespace, no "+", no "0x" alone, no "08".
_NUMBER = re.compile(r"(-?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_HEX_DATA = re.compile(r"0[xX]((?:[0-9a-fA-F]{2})*)")
_B64_DATA = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _parse_number(token: str, *, signed: bool) -> int | None:
    """The value of ``token`` as QEMU's base-0 ``strto*`` parses it, or None when QEMU
    would refuse it (and abort)."""
    match = _NUMBER.fullmatch(token)
    if match is None or (match[1] and not signed):
        return None
    if match[2] is not None:
        value = int(match[2], 16)
    elif match[3] is not None:
        value = int(match[3], 8)
    else:
        value = int(match[4], 10)
    return -value if match[1] else value


@dataclass(frozen=True)
class _Arg:
    """One argument of a qtest command: its name and how to check it."""

    name: str
    kind: Literal["number", "token", "hexdata", "b64data"]
    low: int = 0
    high: int = 0

    def check(self, token: str) -> str | None:
        """Why ``token`` is not acceptable here, or None."""
        if self.kind == "number":
            value = _parse_number(token, signed=self.low < 0)
            if value is None:
                sign = "an optionally negative " if self.low < 0 else "a non-negative "
                return (
                    f"{self.name} must be {sign}integer in C syntax (0x1f, 017 or 31), "
                    f"not {token!r}"
                )
            if not self.low <= value <= self.high:
                return f"{self.name} {token} is out of range [{self.low:#x}, {self.high:#x}]"
        elif self.kind == "hexdata":
            if _HEX_DATA.fullmatch(token) is None:
                return f"{self.name} must be 0x followed by an even number of hex digits"
        elif self.kind == "b64data" and (_B64_DATA.fullmatch(token) is None or len(token) % 4):
            return f"{self.name} must be padded base64"
        return None


_ADDR: Final = _Arg("ADDR", "number", 0, _U64_MAX)
_PORT: Final = _Arg("PORT", "number", 0, 0xFFFF)  # QEMU asserts addr <= 0xffff
_ULONG: Final = _Arg("VALUE", "number", 0, _ULONG_MAX)
_U64: Final = _Arg("VALUE", "number", 0, _U64_MAX)
_SIZE: Final = _Arg("SIZE", "number", 0, MAX_TRANSFER)
_SIZE1: Final = _Arg("SIZE", "number", 1, MAX_TRANSFER)  # `read` asserts len != 0
_NS: Final = _Arg("NS", "number", *_I64)
_PATH: Final = _Arg("QOM-PATH", "token")


@dataclass(frozen=True)
class _Command:
    """A qtest command: its arguments, how many trailing ones are optional, and which
    checks need QEMU's state (``memory``: needs a CPU; ``device``: the first argument must
    be a QOM device)."""

    args: tuple[_Arg, ...] = ()
    optional: int = 0
    memory: bool = False
    device: bool = False

    @property
    def usage(self) -> str:
        names = [a.name for a in self.args]
        required = names[: len(names) - self.optional]
        optional = [f"[{n}]" for n in names[len(names) - self.optional :]]
        return " ".join([*required, *optional])


COMMANDS: Final[Mapping[str, _Command]] = {
    **{v: _Command((_PORT,)) for v in ("inb", "inw", "inl")},
    **{v: _Command((_PORT, _ULONG)) for v in ("outb", "outw", "outl")},
    **{v: _Command((_ADDR,), memory=True) for v in ("readb", "readw", "readl", "readq")},
    **{v: _Command((_ADDR, _U64), memory=True) for v in ("writeb", "writew", "writel", "writeq")},
    "read": _Command((_ADDR, _SIZE1), memory=True),
    "b64read": _Command((_ADDR, _SIZE1), memory=True),
    "write": _Command((_ADDR, _SIZE, _Arg("DATA", "hexdata")), memory=True),
    "b64write": _Command((_ADDR, _SIZE1, _Arg("B64_DATA", "b64data")), memory=True),
    "memset": _Command((_ADDR, _SIZE, _ULONG), memory=True),
    "irq_intercept_in": _Command((_PATH,), device=True),
    "irq_intercept_out": _Command((_PATH,), device=True),
    "set_irq_in": _Command(
        (
            _PATH,
            _Arg("NAME", "token"),
            _Arg("NUM", "number", 0, _INT[1]),
            _Arg("LEVEL", "number", *_INT),
        ),
        device=True,
    ),
    "endianness": _Command(),
    "clock_step": _Command((_NS,), optional=1),
    "clock_set": _Command((_NS,)),
    "module_load": _Command((_Arg("PREFIX", "token"), _Arg("NAME", "token"))),
}
"""Every qtest command of QEMU 7.2 this package will send, with its arguments. QEMU ignores
extra words; we refuse them, so a typo cannot silently change a request's meaning."""


def check_line(line: str) -> list[str]:
    """Split a qtest request into words, or raise :class:`~trio_qemu.QtestInvalidRequest`.

    Checks what QEMU's parser would abort on (and a little more, see :data:`COMMANDS`):
    printable ASCII words separated by single spaces, a known verb, the right number of
    arguments, numbers that parse in full and fit, ports up to 0xffff, non-zero ``read``
    sizes up to :data:`MAX_TRANSFER`, well-formed hex/base64 data that matches its size.
    It cannot see QEMU's state: :meth:`QtestMachine.qtest
    <trio_qemu.qtest.QtestMachine.qtest>` checks that through QMP.
    """
    if not isinstance(line, str):
        raise TypeError(f"a qtest request is a str, not {type(line).__name__}")
    if not line:
        raise QtestInvalidRequest(line, "empty line")
    if not (line.isascii() and line.isprintable()):
        char = next(c for c in line if not " " <= c <= "~")
        raise QtestInvalidRequest(
            line, f"character {char!r} is not printable ASCII (no newline, \\r or tab)"
        )
    words = line.split(" ")
    if "" in words:
        raise QtestInvalidRequest(line, "words must be separated by exactly one space")
    verb, args = words[0], words[1:]
    command = COMMANDS.get(verb)
    if command is None:
        raise QtestInvalidRequest(
            line, f"unknown command {verb!r}; known: {', '.join(sorted(COMMANDS))}"
        )
    most = len(command.args)
    if not most - command.optional <= len(args) <= most:
        raise QtestInvalidRequest(
            line, f"{verb} takes {command.usage or 'no arguments'} ({len(args)} given)"
        )
    for spec, token in zip(command.args, args, strict=False):
        reason = spec.check(token)
        if reason is not None:
            raise QtestInvalidRequest(line, reason)
    if verb in ("write", "b64write"):
        size = _parse_number(args[1], signed=False)
        assert size is not None
        if verb == "write" and len(args[2]) - 2 > 2 * size:
            raise QtestInvalidRequest(line, f"DATA holds more than SIZE={size} bytes")
        if verb == "b64write":
            # QEMU writes SIZE bytes from the decoded buffer even when it holds fewer.
            try:
                decoded = len(base64.b64decode(args[2], validate=True))
            except binascii.Error as exc:
                raise QtestInvalidRequest(line, f"B64_DATA is not base64: {exc}") from None
            if decoded != size:
                raise QtestInvalidRequest(line, f"B64_DATA holds {decoded} bytes, SIZE says {size}")
    return words
