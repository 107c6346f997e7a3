"""Probe a stopped q35 machine through qtest: the CMOS clock, the BIOS reset vector, RAM.

No guest code runs (``-S``): every value is read by QEMU on our request. The CMOS/RTC sits
behind I/O ports 0x70 (index) and 0x71 (data); the CPU's first instruction is at
0xFFFFFFF0, in SeaBIOS's ROM (usually a far jump, ``EA ...``).

Run: .venv/bin/python examples/qtest_probe.py
"""

from __future__ import annotations

import time

import trio

from trio_qemu.qtest import QtestMachine, open_qtest_machine

CMOS_INDEX, CMOS_DATA = 0x70, 0x71


async def cmos(qt: QtestMachine, register: int) -> int:
    """One CMOS register: select it on the index port, read the data port."""
    await qt.outb(CMOS_INDEX, register)
    return await qt.inb(CMOS_DATA)


async def rtc_time(qt: QtestMachine) -> str:
    """The RTC's date and time (UTC here: QEMU starts it from the host clock)."""
    status_b = await cmos(qt, 0x0B)
    binary = bool(status_b & 0x04)  # DM bit: binary, else BCD

    async def field(register: int) -> int:
        value = await cmos(qt, register)
        return value if binary else (value >> 4) * 10 + (value & 0x0F)

    # Wait out an update in progress (register A bit 7, at most ~2 ms), as a guest driver
    # would: poll the hardware, bounded.
    for _ in range(100):
        if not await cmos(qt, 0x0A) & 0x80:
            break
        await trio.sleep(0.001)
    second, minute, hour = await field(0x00), await field(0x02), await field(0x04)
    day, month, year = await field(0x07), await field(0x08), await field(0x09)
    century = await field(0x32)  # the century byte QEMU keeps (the PC's de facto one)
    return f"{century}{year:02d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


def hexdump(addr: int, data: bytes) -> str:
    """Classic 16-bytes-per-line dump."""
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{addr + offset:08x}  {row.hex(' '):<47}  {text}")
    return "\n".join(lines)


async def main() -> None:
    async with open_qtest_machine(memory=128) as qt:
        print(f"{qt.name}: pid {qt.machine.pid}, {await qt.endianness()}-endian target")
        print("RTC:", await rtc_time(qt))

        print("reset vector:")
        print(hexdump(0xFFFFFFF0, await qt.read(0xFFFFFFF0, 16)))

        message = b"written by trio_qemu.qtest\x00"
        await qt.write(0x100000, message)
        await qt.writel(0x100000 + 32, 0xDEADBEEF)
        print("RAM at 1 MiB:")
        print(hexdump(0x100000, await qt.read(0x100000, 48)))

        count, started = 2000, time.perf_counter()
        for _ in range(count):
            await qt.readl(0x100000)
        rate = count / (time.perf_counter() - started)
        print(f"{rate:,.0f} qtest round trips/s")
    print(f"QEMU exited with status {qt.machine.returncode}")


if __name__ == "__main__":
    trio.run(main)
