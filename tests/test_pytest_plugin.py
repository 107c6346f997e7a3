"""The pytest plugin, exercised through pytester in a subprocess (a real pytest run)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

INI = "[pytest]\ntrio_mode = true\n"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_passing_and_failing_tests_with_reports(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_vms="""
        import trio

        async def test_passes(machine):
            vm = await machine(machine="none", args=["-nodefaults"])
            assert (await vm.cmd("query-status"))["running"]
            open("pids", "a").write(f"{vm.pid}\\n")

        async def test_fails(machine):
            vm = await machine(machine="q35,graphics=off", console=True,
                               args=["-nodefaults", "-boot", "reboot-timeout=0"])
            open("pids", "a").write(f"{vm.pid}\\n")
            await vm.console.wait_for(b"No bootable device", timeout=30)
            await vm.cmd("query-kvm")
            assert False, "on purpose"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "trio_qemu machine" in out
    assert "command line:" in out and "-machine q35,graphics=off" in out
    assert "--- console (tail) ---" in out and "No bootable device" in out
    assert "--- QEMU output ---" in out
    assert "--- last QMP messages ---" in out and '"execute":"query-kvm"' in out
    # Only the failing test's VM is reported.
    assert out.count("trio_qemu machine") == 1
    pids = [int(p) for p in (pytester.path / "pids").read_text().split()]
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


def test_timed_out_test_leaks_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_timeout="""
        import trio

        async def test_times_out(machine):
            vm = await machine(machine="none", args=["-nodefaults"], base_temp_dir=".")
            open("pid", "w").write(str(vm.pid))
            with trio.fail_after(0.5):
                await vm.event_wait("NEVER", timeout=None)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "TooSlowError" in result.stdout.str()
    pid = int((pytester.path / "pid").read_text())
    assert _gone(pid)
    assert not list(pytester.path.glob("trio-qemu-*")), "the machine's temp dir was left"


def test_guest_fixture_runs_commands(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_guest="""
        async def test_uname(machine, tiny_guest):
            vm = await machine(guest=True)
            result = await vm.shell.run("uname -r")
            assert result.returncode == 0
            assert result.stdout.decode().strip() == tiny_guest.kernel_release
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_machine_dying_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_dies="""
        import os, signal, trio

        async def test_dies(machine):
            vm = await machine(machine="none", args=["-nodefaults"])
            os.kill(vm.pid, signal.SIGKILL)
            await trio.sleep(30)
        """
    )
    start = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "MachineExited" in result.stdout.str()
    assert f"killed by signal {int(signal.SIGKILL)}" in result.stdout.str()
    assert time.monotonic() - start < 20
