"""The demo behind ``python -m trio_qemu demo``: two real guests, side by side.

It builds (or reuses) the tiny guest, boots two VMs concurrently with
:func:`~trio_qemu.open_machines`, runs a few commands in each over the shell channel while a
task per VM prints QMP events as they arrive, pauses and resumes one VM, and prints the
timings: launch, boot to shell, each command.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ._machine import Machine
from ._openers import open_machines
from .guest import ensure_guest

__all__ = ["run_demo"]

COMMANDS = (
    "uname -sr",
    "cat /proc/cpuinfo | grep -m1 'model name'",
    "free -m | head -2",
    "ls /sys/class/net",
    "sh -c 'echo computing; exit 42'",
)


async def _watch_events(vm: Machine, say: Callable[[str], None]) -> None:
    async with vm.subscribe() as events:
        async for event in events:
            data = event.get("data")
            say(f"[{vm.name}] QMP event {event['event']}" + (f" {data}" if data else ""))


async def _exercise(vm: Machine, booted_at: float, say: Callable[[str], None]) -> None:
    await vm.shell.wait_ready(timeout=120)
    say(f"[{vm.name}] shell ready {time.perf_counter() - booted_at:.2f} s after launch")
    for command in COMMANDS:
        start = time.perf_counter()
        result = await vm.shell.run(command, timeout=60)
        took = (time.perf_counter() - start) * 1000
        output = result.stdout.decode(errors="replace").strip().replace("\n", " | ")
        say(f"[{vm.name}] $ {command}  -> exit {result.returncode} in {took:.0f} ms: {output}")


async def run_demo(say: Callable[[str], None] = print) -> None:
    """Run the demo, printing through ``say``."""
    start = time.perf_counter()
    image = await ensure_guest(progress=lambda line: say(f"guest: {line}"))
    say(f"guest ready ({image.kernel_release}) in {time.perf_counter() - start:.1f} s")
    configs = [image.config(name=name, memory=128) for name in ("alpha", "beta")]
    launched = time.perf_counter()
    async with open_machines(*configs) as vms, trio.open_nursery() as watchers:
        say(
            f"launched {len(vms)} VMs concurrently in {time.perf_counter() - launched:.2f} s "
            f"(QMP up; accel {vms[0].argv[vms[0].argv.index('-accel') + 1]})"
        )
        for vm in vms:
            watchers.start_soon(_watch_events, vm, say)
        async with trio.open_nursery() as workers:
            for vm in vms:
                workers.start_soon(_exercise, vm, launched, say)
        alpha = vms[0]
        say(f"[{alpha.name}] pausing and resuming through QMP")
        await alpha.cmd("stop")
        await alpha.event_wait("STOP", timeout=10)
        await alpha.cmd("cont")
        await alpha.event_wait("RESUME", timeout=10)
        status = await alpha.cmd("query-status")
        say(f"[{alpha.name}] status: {status['status']}")
        watchers.cancel_scope.cancel()
        stopping = time.perf_counter()
    say(
        f"both VMs shut down and cleaned up in {time.perf_counter() - stopping:.2f} s; "
        f"exit statuses {[vm.returncode for vm in vms]}; total {time.perf_counter() - start:.1f} s"
    )
