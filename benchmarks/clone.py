"""Clones of a template against full boots of the same config (trio_qemu.snapshot).

    .venv/bin/python benchmarks/clone.py [--quick] [--n 5] [--concurrent 4] [--rounds 2]

Everything boots ``trio_qemu.guest``'s tiny guest with ``image.config()`` (q35, 256 MiB, the
accelerator ``accel="auto"`` picks, console and guest shell on socketpairs). The template
is made once in a temporary cache directory (removed at the end). Times are from just
before ``async with`` opens the machine; figures are medians.

- boot: ``open_machine(config)``, ``vm.shell.wait_ready()``, ``vm.shell.run("true")``:
  launch to the first command answered.
- clone: ``open_clone(template, sync_guest=False)``: "running" is when it returns (restored
  and resumed: ``query-status`` says ``running``), then the first ``shell.run("true")``.
- clone+sync: ``open_clone(template)`` (the default: the guest's clock set and its RNG
  re-seeded through the shell before it returns), then the first ``shell.run("true")``.

The three alternate (boot, clone, clone+sync, boot, ...) ``--n`` times after one uncounted
round of each. Then ``--concurrent`` boots at once (``open_machines``, each waits for its
shell and runs ``true``) against as many clones at once (``open_clones``, each runs
``true``), alternating, ``--rounds`` times: the time until all have answered, and each
QEMU's PSS (``/proc/<pid>/smaps_rollup``) at that moment: clones share the template's RAM
pages. Last, making a template (boot, save, quit; ``ensure_template`` into an empty cache)
against a boot to the shell alone. Results go to ``benchmarks/results/clone.json``.
Nothing here asserts a speed; the issue's targets are printed beside the figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_ratios, quiet_logging, ratio, write_results

import trio_qemu
from trio_qemu import GuestImage, Machine, MachineConfig
from trio_qemu.snapshot import Template, ensure_template, open_clone, open_clones

NAME = "clone"
BOOT_TIMEOUT = 180.0
TARGETS = {
    "clone running ms": 60.0,
    "clone first command ms": 250.0,
    "8 clones at once s": 1.2,  # all answering; shown when --concurrent is 8
}


def pss_bytes(pid: int | None) -> int:
    """Proportional set size of a process (its shared pages split among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


async def boot_once(config: MachineConfig) -> dict[str, float]:
    start = time.perf_counter()
    async with trio_qemu.open_machine(config) as vm:
        await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        await vm.shell.run("true", timeout=BOOT_TIMEOUT, check=True)
        first = time.perf_counter() - start
    return {"first_command": first}


async def clone_once(template: Template, sync: bool) -> dict[str, float]:
    start = time.perf_counter()
    async with open_clone(template, sync_guest=sync) as vm:
        running = time.perf_counter() - start
        await vm.shell.run("true", timeout=BOOT_TIMEOUT, check=True)
        first = time.perf_counter() - start
    return {"running": running, "first_command": first}


async def all_answer(vms: list[Machine], wait: bool) -> None:
    async def one(vm: Machine) -> None:
        if wait:
            await vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        await vm.shell.run("true", timeout=BOOT_TIMEOUT, check=True)

    async with trio.open_nursery() as nursery:
        for vm in vms:
            nursery.start_soon(one, vm)


async def boots_at_once(config: MachineConfig, count: int) -> dict[str, float]:
    configs = [config.replace(name=f"boot{i}") for i in range(count)]
    start = time.perf_counter()
    async with trio_qemu.open_machines(*configs) as vms:
        await all_answer(vms, wait=True)
        elapsed = time.perf_counter() - start
        pss = [pss_bytes(vm.pid) for vm in vms]
    return {"all_answered": elapsed, "pss_mean": sum(pss) / len(pss)}


async def clones_at_once(template: Template, count: int) -> dict[str, float]:
    start = time.perf_counter()
    async with open_clones(template, count, name="clone") as vms:
        await all_answer(vms, wait=False)
        elapsed = time.perf_counter() - start
        pss = [pss_bytes(vm.pid) for vm in vms]
    return {"all_answered": elapsed, "pss_mean": sum(pss) / len(pss)}


async def make_once(config: MachineConfig, cache: Path, index: int) -> dict[str, float]:
    start = time.perf_counter()
    template = await ensure_template(config, key=f"bench-make-{index}", cache_dir=cache)
    return {"make": time.perf_counter() - start, "made_in": template.made_in or 0.0}


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: median([s[key] for s in samples]) for key in samples[0]}


async def run(options: argparse.Namespace, cache: Path) -> dict[str, Any]:
    image: GuestImage = await trio_qemu.ensure_guest()
    config = image.config()
    accel = trio_qemu.resolve_accel(config.accel)
    print(f"clones against boots: tiny guest, 256 MiB, accelerator {accel}", flush=True)
    template = await ensure_template(config, key="bench", cache_dir=cache)
    print(f"  template made in {template.made_in:.2f} s "
          f"(state {template.state_path.stat().st_size / 1e3:.0f} KB)", flush=True)  # fmt: skip

    single: dict[str, list[dict[str, float]]] = {"boot": [], "clone": [], "clone+sync": []}

    async def variant(name: str) -> dict[str, float]:
        if name == "boot":
            return await boot_once(config)
        return await clone_once(template, sync=name == "clone+sync")

    print("  warm-up round (not counted) ...", flush=True)
    for name in single:
        await variant(name)
    for i in range(options.n):
        order = list(single) if i % 2 == 0 else list(reversed(single))
        print(f"  round {i + 1}/{options.n}: {', '.join(order)}", flush=True)
        for name in order:
            single[name].append(await variant(name))

    together: dict[str, list[dict[str, float]]] = {"boots": [], "clones": []}
    for i in range(options.rounds):
        order = ["boots", "clones"] if i % 2 == 0 else ["clones", "boots"]
        print(f"  {options.concurrent} at once, round {i + 1}/{options.rounds}", flush=True)
        for name in order:
            if name == "boots":
                together[name].append(await boots_at_once(config, options.concurrent))
            else:
                together[name].append(await clones_at_once(template, options.concurrent))

    making: list[dict[str, float]] = []
    boots_alone: list[dict[str, float]] = []
    for i in range(options.makes):
        print(f"  making a template {i + 1}/{options.makes} (and a boot to compare)", flush=True)
        making.append(await make_once(config, cache, i))
        boots_alone.append(await boot_once(config))
    return {
        "accel": accel,
        "state_bytes": template.state_path.stat().st_size,
        "single": {name: medians(s) for name, s in single.items()},
        "together": {name: medians(s) for name, s in together.items()},
        "making": medians(making),
        "boot_for_making": medians(boots_alone),
        "samples": {"single": single, "together": together, "making": making},
    }


def report(data: dict[str, Any], options: argparse.Namespace) -> dict[str, float]:
    single, together = data["single"], data["together"]
    boot, clone, synced = single["boot"], single["clone"], single["clone+sync"]
    print(f"\n  {'':28} {'running ms':>11} {'first command ms':>17}")
    print(f"  {'boot':28} {'':>11} {boot['first_command'] * 1e3:17.0f}")
    print(f"  {'clone (sync_guest=False)':28} {clone['running'] * 1e3:11.0f} "
          f"{clone['first_command'] * 1e3:17.0f}")  # fmt: skip
    print(f"  {'clone (sync_guest=True)':28} {synced['running'] * 1e3:11.0f} "
          f"{synced['first_command'] * 1e3:17.0f}")  # fmt: skip
    n = options.concurrent
    print(f"\n  {n} at once: boots all answered in {together['boots']['all_answered']:.2f} s, "
          f"clones in {together['clones']['all_answered']:.2f} s")  # fmt: skip
    print(f"  PSS per QEMU: booted {together['boots']['pss_mean'] / 2**20:.0f} MiB, "
          f"clone {together['clones']['pss_mean'] / 2**20:.0f} MiB")  # fmt: skip
    print(f"  making a template: {data['making']['make']:.2f} s "
          f"(a boot to the shell: {data['boot_for_making']['first_command']:.2f} s)")  # fmt: skip
    ratios = {
        "first command: boot / clone": ratio(boot["first_command"], clone["first_command"]),
        "first command: boot / clone+sync": ratio(boot["first_command"], synced["first_command"]),
        f"{n} at once: boots / clones": ratio(
            together["boots"]["all_answered"], together["clones"]["all_answered"]
        ),
        "PSS: clone / booted": ratio(together["clones"]["pss_mean"], together["boots"]["pss_mean"]),
        "template making / boot": ratio(
            data["making"]["make"], data["boot_for_making"]["first_command"]
        ),
    }
    print("\nratios of medians (boot/clone: higher means clones are faster):")
    print_ratios(ratios)
    first, first_synced = clone["first_command"] * 1e3, synced["first_command"] * 1e3
    print(f"\ntargets: clone running <= {TARGETS['clone running ms']:.0f} ms "
          f"(measured {clone['running'] * 1e3:.0f}); first command <= "
          f"{TARGETS['clone first command ms']:.0f} ms (measured "
          f"{first:.0f}, {first_synced:.0f} with sync)")  # fmt: skip
    if options.concurrent == 8:
        print(f"         8 clones at once all answering <= {TARGETS['8 clones at once s']} s "
              f"(measured {together['clones']['all_answered']:.2f})")  # fmt: skip
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: prove it runs")
    parser.add_argument("--n", type=int, help="rounds of single boots/clones (default 5)")
    parser.add_argument("--concurrent", type=int, default=4, help="machines at once (4)")
    parser.add_argument("--rounds", type=int, help="rounds of machines at once (default 2)")
    parser.add_argument("--makes", type=int, help="templates made (default 2)")
    options = parser.parse_args(argv)
    options.n = options.n or (1 if options.quick else 5)
    options.rounds = options.rounds or (1 if options.quick else 2)
    options.makes = options.makes or (1 if options.quick else 2)
    quiet_logging()
    cache = Path(tempfile.mkdtemp(prefix="trio-qemu-bench-clone-"))
    try:
        data = trio.run(run, options, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ratios = report(data, options)
    params = {key: getattr(options, key) for key in ("n", "concurrent", "rounds", "makes", "quick")}
    path = write_results(NAME, {"params": params, "targets": TARGETS, "ratios": ratios, **data})
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
