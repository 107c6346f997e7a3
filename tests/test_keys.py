"""Keyboard input: QEMU's key names, text typed into the real guest's virtual terminal,
ctrl-alt-delete rebooting it, and unknown keys refused before anything is sent.

The guest's console shell is on the serial port, which no keyboard reaches; the keys go to
the Linux console's foreground virtual terminal, ``/dev/tty1``, through q35's PS/2 keyboard.
"""

from __future__ import annotations

import string
from typing import Any

import pytest

from trio_qemu import KEY_NAMES, Machine, UnknownKeyError
from trio_qemu._keys import TEXT_KEYS, parse_keys, text_keys
from trio_qemu.pytest_plugin import MachineFactory


def _qkeycode_values(schema: list[dict[str, Any]]) -> list[str]:
    """The QKeyCode enum's values, found from ``send-key`` (the schema's type names are
    masked numbers): its ``keys`` are KeyValue unions whose ``qcode`` variant holds one."""
    types = {entry["name"]: entry for entry in schema}
    command = types["send-key"]
    members = {m["name"]: m["type"] for m in types[command["arg-type"]]["members"]}
    key_value = types[types[members["keys"]]["element-type"]]
    (qcode,) = [v["type"] for v in key_value["variants"] if v["case"] == "qcode"]
    (data,) = [m["type"] for m in types[qcode]["members"] if m["name"] == "data"]
    values: list[str] = types[data]["values"]
    return values


async def test_key_names_are_qemus(machine: MachineFactory) -> None:
    vm = await machine(machine="none", args=["-nodefaults"])
    assert list(KEY_NAMES) == _qkeycode_values(await vm.cmd("query-qmp-schema"))
    # Every character send_text types maps to keys QEMU knows.
    assert {key for combo in TEXT_KEYS.values() for key in combo} <= set(KEY_NAMES)
    assert set(string.printable) - set(TEXT_KEYS) == {"\r", "\x0b", "\x0c"}


async def test_unknown_keys_are_refused_before_sending(machine: MachineFactory) -> None:
    assert parse_keys("ctrl-alt-delete") == ("ctrl", "alt", "delete")
    assert text_keys("aA!\n") == [("a",), ("shift", "a"), ("shift", "1"), ("ret",)]
    vm = await machine(machine="none", args=["-nodefaults"])
    with pytest.raises(UnknownKeyError, match=r"'dlete' in 'ctrl-alt-dlete'.*'delete'") as caught:
        await vm.send_key("ctrl-alt-dlete")
    assert isinstance(caught.value, ValueError)
    assert (caught.value.key, caught.value.given) == ("dlete", "ctrl-alt-dlete")
    for bad in ("", "ctrl-", "Ctrl-c", "ctrl-ctrl"):
        with pytest.raises(UnknownKeyError):
            await vm.send_key(bad)
    with pytest.raises(UnknownKeyError, match=r"cannot type 'é' \(at index 1") as caught:
        await vm.send_text("hé")
    assert caught.value.key == "é"
    with pytest.raises(ValueError, match="hold_time must be a positive"):
        await vm.send_key("a", hold_time=0)
    with pytest.raises(ValueError, match="hold_time must be a positive"):
        await vm.send_text("a", hold_time=-1)
    assert not any("send-key" in line for line in vm.qmp_client.transcript() or [])


async def test_typed_text_reaches_the_guest(fresh_guest: Machine) -> None:
    """Every character send_text can type, on one line (more than one batch of 64), read
    back by a reader of the virtual terminal."""
    shell = fresh_guest.shell
    await shell.run("head -n1 /dev/tty1 > /tmp/typed 2>&1 &", check=True)
    await shell.wait_until_succeeds(
        "ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -q ' /dev/tty1$'", timeout=20, interval=0.1
    )
    line = "".join(sorted(set(string.printable) & set(TEXT_KEYS) - set("\n\t\b\x1b")))
    assert len(line) == 95
    await fresh_guest.send_text(line + "\n", hold_time=0.005)
    typed = await shell.wait_until_succeeds("test -s /tmp/typed && cat /tmp/typed", timeout=30)
    assert typed.stdout.decode() == line + "\n"


async def test_ctrl_alt_delete_reboots_the_guest(fresh_guest: Machine) -> None:
    """busybox init runs ``reboot`` on ctrl-alt-delete; with ``-no-reboot`` the guest's
    reset ends QEMU."""
    async with fresh_guest.subscribe("SHUTDOWN") as events:
        fresh_guest.expect_exit("ctrl-alt-delete")
        await fresh_guest.send_key("ctrl-alt-delete")
        event = await events.receive()
    assert event["data"]["reason"] == "guest-reset"
    assert await fresh_guest.wait(timeout=30) == 0
