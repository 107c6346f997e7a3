"""Templates and copy-on-write clones (trio_qemu.snapshot), against real QEMUs under TCG.

One tiny-guest template serves the whole module: the first test that asks for it makes it
(one boot) in a module-wide cache directory, the others find it there. The cache, lock,
damage and cancellation tests use a guest-less q35 (SeaBIOS only), whose template takes
a few tens of milliseconds to make.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from census import Census, qemu_children

import trio_qemu
from trio_qemu import Machine, MachineConfig
from trio_qemu.guest import GuestImage
from trio_qemu.migration import incoming_config, migrate
from trio_qemu.snapshot import (
    TEMPLATES_DIR,
    Template,
    TemplateError,
    ensure_template,
    open_clone,
    open_clones,
    open_template,
    restore,
)
from trio_qemu.snapshot._template import memory_bytes, normalize_arg

BARE = MachineConfig(machine="q35", memory=64, args=["-nodefaults"])
PREPARED = b"made in prepare\n"
KEY = "snapshot-tests-v1"


async def prepare(vm: Machine) -> None:
    await vm.shell.run(f"printf '{PREPARED.decode()}' > /root/prepared", check=True)




async def guest_template(image: GuestImage, cache_dir: Path) -> Template:
    return await ensure_template(
        image.config(memory=256), prepare=prepare, key=KEY, cache_dir=cache_dir
    )


class Recorder:
    """A ``prepare`` that counts its calls (each one is a boot)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    async def __call__(self, vm: Machine) -> None:
        self.calls += 1
        await trio.sleep(self.delay)


def builds(cache_dir: Path) -> list[str]:
    """Build and trash directories left in the templates directory."""
    templates = cache_dir / TEMPLATES_DIR
    return [p.name for p in templates.iterdir() if p.name.startswith(".")]


# -- without QEMU --------------------------------------------------------------------------------


def test_sizes_and_fd_numbers_are_normalized() -> None:
    assert memory_bytes(256) == 256 << 20
    assert memory_bytes("1G") == memory_bytes("1024M") == memory_bytes("1024") == 1 << 30
    with pytest.raises(ValueError, match="memory"):
        memory_bytes(None)
    with pytest.raises(ValueError, match="plain memory size"):
        memory_bytes("size=1G,slots=2")
    assert normalize_arg("dgram,id=n0,local.type=fd,local.str=17") == (
        "dgram,id=n0,local.type=fd,local.str=N"
    )
    assert normalize_arg("socket,id=c,fd=9") == "socket,id=c,fd=N"
    assert normalize_arg("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56") == (
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"
    )


async def test_configs_a_template_cannot_be_made_of(cache_dir: Path) -> None:
    for config, match in (
        (BARE.replace(memory=None), "memory"),
        (BARE.replace(machine=None), "machine type"),
        (BARE.replace(machine="q35,memory-backend=m"), "memory backend"),
        (BARE.replace(qmp=False), "QMP"),
        (BARE.replace(args=["-incoming", "defer"]), "-incoming"),
    ):
        with pytest.raises(ValueError, match=match):
            await ensure_template(config, cache_dir=cache_dir)
    assert qemu_children() == set()


# -- the tiny guest ------------------------------------------------------------------------------


async def test_clones_have_what_prepare_made_and_then_diverge(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    census = Census(base)
    template = await guest_template(tiny_guest, cache_dir)
    assert template.cached and template.path.parent == cache_dir / TEMPLATES_DIR
    assert template.ram_path.stat().st_mode & 0o777 == 0o444  # never written again
    assert template.ram_path.stat().st_size == 256 << 20
    assert 0 < template.state_path.stat().st_size < 4 << 20  # device state only
    async with open_clones(template, 2, name="clone", base_temp_dir=base) as (a, b):
        assert [a.name, b.name] == ["clone-0", "clone-1"]
        for vm in (a, b):
            assert (await vm.cmd("query-status"))["status"] == "running"
            result = await vm.shell.run("cat /root/prepared", check=True)
            assert result.stdout == PREPARED
        await a.shell.run("echo a > /root/only-in-a", check=True)
        assert (await a.shell.run("test -e /root/only-in-a")).returncode == 0
        assert (await b.shell.run("test -e /root/only-in-a")).returncode == 1
        # Each clone has its own randomness and boot id; the clock is the host's.
        probe = "head -c 16 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/boot_id"
        outputs = {(await vm.shell.run(probe, check=True)).stdout for vm in (a, b)}
        assert len(outputs) == 2
        for vm in (a, b):
            guest_time = int((await vm.shell.run("date +%s", check=True)).stdout)
            assert abs(guest_time - time.time()) < 3
        # The console and QMP are the clone's own.
        await a.console.write(b"echo console-$((6*7))\n")
        await a.console.wait_for(b"console-42", timeout=30)
    census.check("after two clones")


async def test_the_template_was_saved_with_the_guest_rng_seeded(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    """With RDRAND (GUEST_ARGS) the kernel seeds its RNG before init runs; without it, it
    gathers timer jitter for about a CPU-second after the shell is up, and every clone of a
    template saved meanwhile would spend that second again."""
    template = await guest_template(tiny_guest, cache_dir)
    async with open_clone(template, base_temp_dir=base, sync_guest=False) as vm:
        result = await vm.shell.run(
            "grep -c rdrand /proc/cpuinfo; dmesg | grep -e 'crng init done' -e 'Run /init'",
            check=True,
        )
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "1", result
    assert "crng init done" in lines[1] and "Run /init" in lines[2], result


async def test_each_clone_reseeds_its_rng_as_it_resumes(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    """The VM generation ID (GUEST_ARGS) changes in every restore: the guest kernel reseeds
    at once, before and without the host's sync, so two clones never share the template's
    random state (here: their boot ids, made from the first random bytes each one draws)."""
    template = await guest_template(tiny_guest, cache_dir)
    probe = (
        "dmesg | grep -c 'crng reseeded due to virtual machine fork'; "
        "cat /proc/sys/kernel/random/boot_id"
    )
    async with open_clones(template, 2, base_temp_dir=base, sync_guest=False) as vms:
        outputs = [(await vm.shell.run(probe, check=True)).stdout.split() for vm in vms]
    assert [reseeds for reseeds, _ in outputs] == [b"1", b"1"], outputs
    assert outputs[0][1] != outputs[1][1], outputs


async def test_a_clone_migrates_like_any_machine(
    tiny_guest: GuestImage, cache_dir: Path, base: Path
) -> None:
    template = await guest_template(tiny_guest, cache_dir)
    async with open_clone(template, base_temp_dir=base) as src:
        await src.shell.run("echo moved > /root/moved", check=True)
        async with trio_qemu.open_machine(incoming_config(src.config)) as dst:
            await migrate(src, dst, timeout=60)
            result = await dst.shell.run("cat /root/prepared /root/moved", check=True)
            assert result.stdout == PREPARED + b"moved\n"


async def test_the_cache_is_reused_without_a_boot(tiny_guest: GuestImage, cache_dir: Path) -> None:
    first = await guest_template(tiny_guest, cache_dir)
    manifest = first.path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    recorder = Recorder()
    again = await ensure_template(
        tiny_guest.config(memory=256), prepare=recorder, key=KEY, cache_dir=cache_dir
    )
    assert recorder.calls == 0
    assert again == first and manifest.stat().st_mtime_ns == stamp
    # Another process finds it too (its prepare would fail the run if called).
    script = textwrap.dedent(
        f"""
        import trio, trio_qemu
        from trio_qemu.snapshot import ensure_template
        async def prepare(vm):
            raise SystemExit("prepare ran: the cache was not used")
        async def main():
            image = trio_qemu.guest.GuestImage(kernel={str(tiny_guest.kernel)!r},
                                               initrd={str(tiny_guest.initrd)!r},
                                               append={tiny_guest.append!r},
                                               relay={tiny_guest.relay!r})
            t = await ensure_template(image.config(memory=256), prepare=prepare,
                                      key={KEY!r}, cache_dir={str(cache_dir)!r})
            print(t.path)
        trio.run(main)
        """
    )
    done = await trio.run_process(
        [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == str(first.path)
    assert manifest.stat().st_mtime_ns == stamp
    # A different key is a different template.
    other = await ensure_template(BARE, key="other", cache_dir=cache_dir)
    assert other.key != first.key


# -- the cache: locking, damage, cancellation (guest-less q35) -----------------------------------


async def test_concurrent_makers_boot_once(cache_dir: Path) -> None:
    recorder = Recorder(delay=0.5)
    results: list[Template] = []

    async def make() -> None:
        results.append(
            await ensure_template(BARE, prepare=recorder, key="concurrent", cache_dir=cache_dir)
        )

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(make)
    assert recorder.calls == 1
    assert len({t.path for t in results}) == 1
    assert builds(cache_dir) == []
    async with open_clone(results[0]) as vm:
        assert (await vm.cmd("query-status"))["status"] == "running"


async def test_a_damaged_cached_template_is_rebuilt(cache_dir: Path) -> None:
    recorder = Recorder()

    async def ensure() -> Template:
        return await ensure_template(BARE, prepare=recorder, key="damage", cache_dir=cache_dir)

    template = await ensure()
    assert recorder.calls == 1

    def garble_state(t: Template) -> None:  # same size, same mtime: only the hash tells
        info = t.state_path.stat()
        t.state_path.write_bytes(b"\0" * info.st_size)
        os.utime(t.state_path, ns=(info.st_atime_ns, info.st_mtime_ns))

    def remove_ram(t: Template) -> None:
        t.ram_path.unlink()

    def truncate_state(t: Template) -> None:
        with open(t.state_path, "r+b") as f:
            f.truncate(100)

    def break_manifest(t: Template) -> None:
        (t.path / "manifest.json").write_text("{")

    def other_qemu(t: Template) -> None:  # as if QEMU had been upgraded since
        path = t.path / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["qemu"][2] -= 1
        path.write_text(json.dumps(manifest))

    # (damage, whether the cheap stamp check of a clone launch sees it too)
    damages = ((garble_state, False), (remove_ram, True), (truncate_state, True),
               (break_manifest, False), (other_qemu, False))  # fmt: skip
    for calls, (damage, stamped) in enumerate(damages, 2):
        damage(template)
        if stamped:
            with pytest.raises(TemplateError, match="damaged"):
                template.verify()
        template = await ensure()
        assert recorder.calls == calls, damage.__name__
        template.verify()
        async with open_clone(template) as vm:
            assert (await vm.cmd("query-status"))["status"] == "running"
    assert builds(cache_dir) == []


async def test_a_failed_restore_raises_qemus_reason_and_leaves_nothing(base: Path) -> None:
    census = Census(base)
    async with open_template(BARE.replace(base_temp_dir=str(base))) as template:
        assert not template.cached and template.path.parent == base
        info = template.state_path.stat()
        template.state_path.chmod(0o644)
        template.state_path.write_bytes(b"\xff" * info.st_size)
        os.utime(template.state_path, ns=(info.st_atime_ns, info.st_mtime_ns))
        with pytest.raises(TemplateError, match="QEMU's output") as caught:
            async with open_clone(template):
                raise AssertionError("the clone was restored from garbage")
        assert "qemu-system" in str(caught.value)  # QEMU's own lines are quoted
        assert qemu_children() == set()
        # A state file that lost its stamp is refused before QEMU starts.
        template.state_path.write_bytes(b"short")
        with pytest.raises(TemplateError, match="state changed"):
            async with open_clone(template):
                pass
    census.check("after the failed restores and open_template")


async def test_a_mismatched_clone_config_is_refused_before_launch(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_template(BARE.replace(base_temp_dir=str(base))) as template:
        for fields, named in (
            ({"memory": 128}, "memory=128"),
            ({"machine": "pc"}, "machine='pc'"),
            ({"kernel": "/boot/vmlinuz"}, "kernel="),
            ({"args": ["-nodefaults", "-device", "virtio-rng-pci"]}, "args="),
            ({"smp": 2}, "smp=2"),
            ({"console": True}, "console=True"),
        ):
            with pytest.raises(TemplateError, match="does not match") as caught:
                template.config(**fields)
            assert named in str(caught.value)

        def no_launch(*args: object, **kwargs: object) -> None:
            raise AssertionError("QEMU was started for a mismatched clone")

        with monkeypatch.context() as patch:
            patch.setattr("trio_qemu.snapshot._clone.open_machine", no_launch)
            with pytest.raises(TemplateError, match="memory=32"):
                async with open_clone(template, memory=32):
                    pass
        with pytest.raises(TypeError, match="no field"):
            template.config(colour="blue")
        # Per-machine fields are free, and so are the same values spelled differently.
        same = template.config(
            name="free", log_dir=str(base), launch_timeout=5, memory="64M", console_log=None
        )
        assert same.name == "free" and same.args[-2:] == ("-incoming", "defer")
        assert "share=off" in same.args[-3]
        async with open_clone(template, name="free", qmp_timeout=10) as vm:
            assert vm.name == "free"


async def test_cancelled_making_leaves_the_cache_consistent(cache_dir: Path) -> None:
    async def forever(vm: Machine) -> None:
        await trio.sleep_forever()

    with trio.move_on_after(1.0) as scope:
        await ensure_template(BARE, prepare=forever, key="cancel", cache_dir=cache_dir)
    assert scope.cancelled_caught
    assert qemu_children() == set()
    assert builds(cache_dir) == []
    # Nothing half-made was left in place, and the lock is free: it is made at once now.
    recorder = Recorder()
    with trio.fail_after(30):
        template = await ensure_template(BARE, prepare=recorder, key="cancel", cache_dir=cache_dir)
    assert recorder.calls == 1
    manifest = json.loads((template.path / "manifest.json").read_text())
    assert manifest["key"] == template.key
    with pytest.raises(TemplateError, match=r"within timeout=0\.5"):
        await ensure_template(
            BARE, prepare=forever, key="timeout", cache_dir=cache_dir, timeout=0.5
        )
    assert qemu_children() == set() and builds(cache_dir) == []


async def test_a_cancelled_clone_leaves_nothing_behind(base: Path) -> None:
    async with open_template(BARE.replace(base_temp_dir=str(base))) as template:
        census = Census(base)
        dirs = set(os.listdir(base))
        for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12):
            with trio.move_on_after(delay):
                async with open_clone(template, base_temp_dir=base) as vm:
                    await vm.cmd("query-status")
                    await trio.sleep_forever()
            census.check(f"after a clone cancelled at {delay} s", dirs=dirs)


async def test_an_incoming_refusal_is_a_template_error(base: Path) -> None:
    async with open_template(BARE.replace(base_temp_dir=str(base))) as template:
        # A machine launched without -incoming cannot receive the state.
        config = template.config()
        config = config.replace(args=[a for a in config.args if a not in ("-incoming", "defer")])
        async with trio_qemu.open_machine(config) as vm:
            with pytest.raises(TemplateError, match="refused to restore"):
                await restore(vm, template, timeout=30)
            assert (await vm.cmd("query-status"))["status"] == "running"  # still usable
