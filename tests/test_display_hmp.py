"""Screenshots through QMP ``screendump`` and HMP passthrough, against a real QEMU."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import trio_qemu


async def test_screenshot_is_a_png_of_the_vga_display(tmp_path: Path) -> None:
    async with trio_qemu.open_machine(machine="q35", display=True, args=["-nodefaults"]) as vm:
        path = await vm.screenshot(tmp_path / "screen.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) in {(640, 480), (720, 400)}  # before / in SeaBIOS's text mode


async def test_screenshot_without_a_display_names_the_fix(tmp_path: Path) -> None:
    async with trio_qemu.open_machine(machine="q35", args=["-nodefaults"]) as vm:
        with pytest.raises(trio_qemu.MachineError, match="display=True"):
            await vm.screenshot(tmp_path / "screen.png")
        assert (await vm.cmd("query-status"))["status"] == "running"  # still usable


async def test_hmp_returns_text_and_errors_as_text() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        assert (await vm.hmp("info version")).startswith("7.")
        assert "unknown command" in (await vm.hmp("no-such-hmp-command")).lower()
