"""Machine lifecycle against a real QEMU: open_machine, start_machine, open_machines,
the console drain, cancellation at random moments, and Ctrl-C.

Most machines are ``-machine none -nodefaults`` (QMP answers ~25 ms after start); the
console tests boot SeaBIOS on ``q35,graphics=off`` with no boot device, which prints
"No bootable device." and, with ``-boot reboot-timeout=0``, reboots in a loop.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from census import assert_gone, open_fds, pid_gone, qemu_children

import trio_qemu
from trio_qemu import LaunchError, MachineConfig, MachineTimeout

ROOT = Path(__file__).resolve().parent.parent
SIGINT_CHILD = Path(__file__).resolve().parent / "scripts" / "sigint_child.py"

SEABIOS_LOOP = ["-nodefaults", "-boot", "reboot-timeout=0"]


# -- helpers -----------------------------------------------------------------------------


# -- lifecycle ---------------------------------------------------------------------------
async def test_open_machine_round_trip() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        assert isinstance(vm.pid, int) and vm.pid > 0
        assert vm.is_running()
        assert vm.returncode is None
        assert not pid_gone(vm.pid)
        assert vm.pid in qemu_children()
        assert vm.argv[0].endswith("qemu-system-x86_64")
        assert vm.argv[-1] == "-nodefaults"
        assert vm.argv[vm.argv.index("-machine") :][:2] == ["-machine", "none"]
        assert isinstance(vm.name, str) and vm.name
        assert vm.temp_dir is not None and vm.temp_dir.is_dir()
        assert vm.temp_dir.name.startswith("trio-qemu-")

        status = await vm.cmd("query-status")
        assert status["status"] == "running"
        assert status["running"] is True

        async with vm.subscribe("STOP", "RESUME") as events:
            await vm.cmd("stop")
            assert (await events.receive())["event"] == "STOP"
            assert (await vm.cmd("query-status"))["status"] == "paused"
            await vm.cmd("cont")
            assert (await events.receive())["event"] == "RESUME"
        assert (await vm.cmd("query-status"))["running"] is True

    assert vm.returncode == 0  # a graceful quit
    assert_gone(vm)
    assert qemu_children() == set()


async def test_shutdown_inside_block_then_exit_is_noop() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        await vm.shutdown()
        assert vm.returncode == 0
        assert_gone(vm)
        await vm.shutdown()  # idempotent
    assert vm.returncode == 0
    assert_gone(vm)


async def test_kill_gives_sigkill_status() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        await vm.kill()
        assert vm.returncode == -signal.SIGKILL
        assert_gone(vm)
    # Leaving the block after kill() raises nothing: the exit was asked for.
    assert vm.returncode == -signal.SIGKILL


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["wait-at-once", "wait-after-exit"])
async def test_wait_after_quit_returns_zero(gap: float) -> None:
    # With a gap QEMU has surely exited and been reaped before wait() is called: a quit
    # sent through vm.qmp() is an exit we asked for, never MachineExited.
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        reply = await vm.qmp("quit")
        assert reply.get("return") == {}
        await trio.sleep(gap)
        assert await vm.wait(timeout=10) == 0  # not MachineExited: we sent quit ourselves
        assert vm.returncode == 0
        assert_gone(vm)
    assert vm.returncode == 0


async def test_quit_via_cmd_ends_block_quietly() -> None:
    # QEMU exits inside the block (the monitor's end of file ends the subscription, once
    # QEMU's exit is known); leaving the block then raises nothing.
    names = []
    async with (
        trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm,
        vm.subscribe() as events,
    ):
        assert await vm.cmd("quit") == {}
        with trio.fail_after(10):
            names = [event["event"] async for event in events]
    assert "SHUTDOWN" in names
    assert vm.returncode == 0
    assert_gone(vm)


async def test_wait_timeout_leaves_machine_running() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"]) as vm:
        start = trio.current_time()
        with pytest.raises(MachineTimeout):
            await vm.wait(timeout=0.2)
        assert trio.current_time() - start >= 0.2
        assert vm.is_running()
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0
    assert_gone(vm)


async def test_start_machine_shut_down_by_nursery_cancel() -> None:
    async with trio.open_nursery() as nursery:
        vm = await trio_qemu.start_machine(
            nursery, MachineConfig(machine="none", args=["-nodefaults"])
        )
        assert vm.is_running()
        assert (await vm.cmd("query-status"))["running"] is True
        nursery.cancel_scope.cancel()
    assert vm.returncode == 0  # graceful, although its nursery was cancelled
    assert_gone(vm)


async def test_open_machines_three() -> None:
    configs = [
        MachineConfig(name=f"vm{i}", machine="none", args=["-nodefaults"]) for i in (1, 2, 3)
    ]
    async with trio_qemu.open_machines(*configs) as vms:
        assert [vm.name for vm in vms] == ["vm1", "vm2", "vm3"]
        assert len({vm.pid for vm in vms}) == 3
        assert qemu_children() == {vm.pid for vm in vms}
        for vm in vms:
            assert (await vm.cmd("query-status"))["running"] is True
    for vm in vms:
        assert vm.returncode == 0
        assert_gone(vm)
    assert qemu_children() == set()


async def _watch_children(seen: set[int]) -> None:
    """Record every QEMU child of ours that shows up, until cancelled."""
    while True:
        seen |= qemu_children()
        await trio.sleep(0.01)


@pytest.mark.parametrize("delay_bad", [False, True], ids=["bad-at-once", "bad-after-others-ready"])
async def test_open_machines_one_bad_config(tmp_path: Path, delay_bad: bool) -> None:
    # With delay_bad, the bad machine's QEMU starts 0.5 s late (under a shell that sleeps
    # first), so the two good ones are surely running when it fails: they must be torn down.
    base = tmp_path / "base"
    base.mkdir()
    wrapper = ["sh", "-c", 'sleep 0.5; exec "$@"', "sh"] if delay_bad else []
    good = MachineConfig(machine="none", args=["-nodefaults"], base_temp_dir=str(base))
    bad = good.replace(name="bad", machine="bogus", wrapper=wrapper)
    seen: set[int] = set()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_children, seen)
            with pytest.raises(LaunchError) as info:
                async with trio_qemu.open_machines(
                    good.replace(name="good1"), bad, good.replace(name="good2")
                ):
                    pytest.fail("open_machines must not enter its block")
            nursery.cancel_scope.cancel()
    err = info.value
    assert type(err) is LaunchError
    assert err.name == "bad"
    assert "bad" in str(err)
    assert "unsupported machine type" in err.output
    if delay_bad:
        assert len(seen) >= 2, f"the good machines never ran: {seen}"
    assert qemu_children() == set()
    for pid in seen:
        assert pid_gone(pid), f"QEMU pid {pid} was left behind"
    assert os.listdir(base) == []


# -- console -----------------------------------------------------------------------------
async def test_console_seabios(tmp_path: Path) -> None:
    console_log = tmp_path / "console.log"
    async with trio_qemu.open_machine(
        machine="q35,graphics=off", console=True, console_log=str(console_log), args=SEABIOS_LOOP
    ) as vm:
        match = await vm.console.wait_for(b"No bootable device", timeout=20)
        assert match.group() == b"No bootable device"
        assert b"SeaBIOS" in vm.console.output()
    assert vm.returncode == 0
    assert_gone(vm)
    logged = console_log.read_bytes()
    assert b"SeaBIOS" in logged
    assert b"No bootable device" in logged


def console_bytes_held(console: trio_qemu.Console) -> int:
    """How many bytes of output the console holds in memory now. Not ``output()`` or
    ``tail()``: they slice what is held down to ``buffer_size``, so they would show the
    bound even if nothing were ever trimmed."""
    return console.held_bytes


async def test_console_drain_never_stalls_the_guest() -> None:
    # Nobody reads the console: SeaBIOS reboots in a loop and every boot prints ~250 bytes.
    # Undrained, a socketpair console holds only ~278 bytes before the guest's serial
    # output (and the guest) stalls; so each RESET event (two per boot) is progress only a
    # working drain allows. Meanwhile the memory the console holds must stay bounded: the
    # ring buffer is trimmed back to console_buffer bytes whenever it passes twice that.
    size = 4096
    target = 4 * size  # far beyond 278, and well past the buffer's trimming point (2 * size)
    async with trio_qemu.open_machine(
        machine="q35,graphics=off", console=True, console_buffer=size, args=SEABIOS_LOOP
    ) as vm:
        resets = 0
        most_held = 0
        with trio.fail_after(90):
            async with vm.subscribe("RESET", buffer=1024) as events:
                while vm.console.total_bytes < target:
                    await events.receive()
                    resets += 1
                    held = console_bytes_held(vm.console)
                    most_held = max(most_held, held)
                    assert held <= 2 * size, (held, vm.console.total_bytes)
                    # and no hidden capacity behind it: the buffer's allocation shrinks too
                    assert sys.getsizeof(vm.console._buf) <= 3 * size
        total = vm.console.total_bytes
        output = vm.console.output()
        print(f"console: {total} bytes received, at most {most_held} held, {resets} resets")
        assert total >= target
        assert console_bytes_held(vm.console) <= 2 * size
        assert len(output) == size  # the most recent buffer_size bytes, no fewer
        assert b"No bootable device" in output
        assert resets >= 10
        # The buffer holds the most recent output: its end is the end of the stream.
        assert vm.console.tail(100) == output[-100:]
    assert vm.returncode == 0


async def test_long_base_temp_dir(tmp_path: Path) -> None:
    deep = tmp_path
    while len(str(deep)) <= 120:
        deep = deep / "a-rather-long-directory-name"
    deep.mkdir(parents=True)
    assert len(str(deep)) > 108  # longer than an AF_UNIX path may be
    async with trio_qemu.open_machine(
        machine="none", console=True, args=["-nodefaults"], base_temp_dir=str(deep)
    ) as vm:
        assert vm.temp_dir is not None and vm.temp_dir.parent == deep
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0
    assert_gone(vm)
    assert os.listdir(deep) == []


# -- cancellation at random moments --------------------------------------------------------
async def _fuzz_trial(delay: float, base: Path, record: list[trio_qemu.Machine]) -> str:
    """One machine's life, cut short after ``delay`` s; returns the phase the cut hit."""
    body_done = False
    with trio.move_on_after(delay) as scope:
        async with trio_qemu.open_machine(
            machine="none", args=["-nodefaults"], base_temp_dir=base
        ) as vm:
            record.append(vm)
            await vm.cmd("query-status")
            async with vm.subscribe("STOP", "RESUME") as events:
                for _ in range(3):
                    await vm.cmd("stop")
                    assert (await events.receive())["event"] == "STOP"
                    await vm.cmd("cont")
                    assert (await events.receive())["event"] == "RESUME"
            await vm.cmd("stop")
            await vm.event_wait("STOP", timeout=10)
            await trio.sleep(0.02)
            await vm.cmd("cont")
            await vm.cmd("query-status")
            body_done = True
    if not scope.cancelled_caught:
        return "completed"
    if not record:
        return "launch"
    return "teardown" if body_done else "body"


async def test_cancellation_fuzz(tmp_path: Path) -> None:
    rng = random.Random(1234)
    base = tmp_path / "base"
    base.mkdir()
    # One warm-up run so that lazily opened fds (Trio's, logging's) exist before counting.
    await _fuzz_trial(1.0, base, [])
    fds_at_start = open_fds()
    phases: dict[str, int] = {}
    for trial in range(60):
        delay = rng.uniform(0.0, 0.15)
        record: list[trio_qemu.Machine] = []
        with trio.fail_after(30):
            phase = await _fuzz_trial(delay, base, record)
        phases[phase] = phases.get(phase, 0) + 1
        where = f"trial {trial} (delay {delay:.3f} s, cancelled in {phase})"
        assert qemu_children() == set(), where
        assert os.listdir(base) == [], where
        for vm in record:
            assert vm.returncode is not None, where
            assert_gone(vm)
        assert open_fds() == fds_at_start, where
    print(f"fuzz phases: {phases}")
    # The cuts must have landed in more than one phase for the test to mean anything.
    assert phases.get("launch", 0) >= 1, phases
    assert phases.get("body", 0) >= 1, phases


# -- Ctrl-C ------------------------------------------------------------------------------
async def test_ctrl_c_tears_down() -> None:
    # The child runs in its own session, so killpg is what a terminal's Ctrl-C does to the
    # foreground process group; QEMU sits in yet another session and must not get it.
    process = await trio.lowlevel.open_process(
        [sys.executable, str(SIGINT_CHILD)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    qemu_pid: int | None = None
    try:
        out = b""
        with trio.fail_after(30):
            while b"READY\n" not in out:
                chunk = await process.stdout.receive_some()
                assert chunk, f"child ended early: {out!r}"
                out += chunk
        qemu_pid = int(out.split(b"PID ")[1].split()[0])
        assert not pid_gone(qemu_pid)

        os.killpg(process.pid, signal.SIGINT)
        err = b""
        with trio.fail_after(30):
            while chunk := await process.stderr.receive_some():
                err += chunk
            await process.wait()
        # An uncaught KeyboardInterrupt makes Python 3.8+ exit by SIGINT itself.
        assert process.returncode == -signal.SIGINT, err.decode(errors="replace")
        assert b"KeyboardInterrupt" in err
        assert b"RETURNCODE 0" in err  # QEMU was shut down gracefully on the way out
        assert b"ExceptionGroup" not in err
        assert pid_gone(qemu_pid)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if qemu_pid is not None and not pid_gone(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()
            await process.stderr.aclose()


# -- monitor addresses -----------------------------------------------------------------------
async def test_monitor_on_a_unix_path_we_listen_on(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], monitor_address=str(path)
    ) as vm:
        assert f"socket,id=mon,path={path}" in vm.argv
        assert not path.exists()  # the first connection was taken, the listener closed
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0
    assert_gone(vm)


async def test_monitor_on_tcp_loopback() -> None:
    async with trio_qemu.open_machine(
        machine="none", args=["-nodefaults"], monitor_address=("127.0.0.1", 0)
    ) as vm:
        chardev = next(a for a in vm.argv if a.startswith("socket,id=mon,host="))
        assert chardev.startswith("socket,id=mon,host=127.0.0.1,port=")
        assert not chardev.endswith("port=0")  # the real port QEMU connected to
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0


async def test_a_name_with_a_path_separator_is_only_a_label() -> None:
    async with trio_qemu.open_machine(machine="none", args=["-nodefaults"], name="rack/a") as vm:
        assert vm.name == "rack/a"
        assert "/" not in vm.temp_dir.name
        assert (await vm.cmd("query-status"))["running"] is True
    assert vm.returncode == 0
