"""Launch failures against real processes: each is one LaunchError (never a group) that says
what went wrong, and nothing is left behind: no process, no temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from census import pid_gone, qemu_children

import trio_qemu
from trio_qemu import LaunchError


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base_temp_dir of its own, to check that no machine directory is left in it."""
    path = tmp_path / "base"
    path.mkdir()
    return path


async def _launch_error(**fields: object) -> LaunchError:
    """Launch with ``fields``; return the LaunchError, checking it is exactly that."""
    with trio.fail_after(30), pytest.raises(LaunchError) as info:
        async with trio_qemu.open_machine(**fields):
            pytest.fail("the launch should have failed")
    assert type(info.value) is LaunchError
    return info.value


async def test_missing_binary(base: Path) -> None:
    binary = "/nonexistent/qemu-system-x86_64"
    err = await _launch_error(binary=binary, machine="none", base_temp_dir=base)
    text = str(err)
    assert binary in text
    assert "No such file" in text
    assert err.argv[0] == binary
    assert err.returncode is None  # nothing ran
    assert isinstance(err.__cause__, FileNotFoundError)
    assert os.listdir(base) == []


async def test_bogus_machine_type(base: Path) -> None:
    err = await _launch_error(name="bogusvm", machine="bogus", base_temp_dir=base)
    assert err.name == "bogusvm"
    assert err.returncode == 1
    assert "unsupported machine type" in err.output  # QEMU's own words
    text = str(err)
    assert text.startswith("bogusvm: ")
    assert "exit status: 1" in text
    assert " ".join(err.argv) in text  # the full command line
    assert "-machine bogus" in text
    assert "unsupported machine type" in text
    assert qemu_children() == set()
    assert os.listdir(base) == []


async def test_qemu_exits_before_greeting(base: Path) -> None:
    err = await _launch_error(
        machine="none", args=["-nodefaults", "-device", "nonexistent-device"], base_temp_dir=base
    )
    assert err.returncode == 1
    assert "nonexistent-device" in err.output
    text = str(err)
    assert "exited before its monitor was ready" in text
    assert "exit status: 1" in text
    assert "-device nonexistent-device" in text
    assert qemu_children() == set()
    assert os.listdir(base) == []


async def test_launch_timeout_kills_and_reaps(base: Path, tmp_path: Path) -> None:
    # A "wrapper" that never runs QEMU: it holds the monitor socket and never greets.
    pid_file = tmp_path / "sleeper.pid"
    sleeper = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    )
    start = trio.current_time()
    err = await _launch_error(
        machine="none",
        wrapper=[sys.executable, "-c", sleeper],
        launch_timeout=0.5,
        base_temp_dir=base,
    )
    elapsed = trio.current_time() - start
    assert "launch_timeout" in str(err)
    assert "0.5" in str(err)
    assert err.returncode is None  # it still ran when we gave up on it
    assert 0.5 <= elapsed < 5.0
    pid = int(pid_file.read_text())
    assert pid_gone(pid), "the sleeping process was not killed and reaped"
    assert os.listdir(base) == []


async def test_launch_error_leaves_fds_closed(base: Path) -> None:
    # Warm up once, then a failing launch must not leave any of its sockets open.
    await _launch_error(machine="bogus", base_temp_dir=base)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        await _launch_error(machine="bogus", base_temp_dir=base)
        await _launch_error(
            binary="/nonexistent/qemu-system-x86_64", console=True, base_temp_dir=base
        )
    assert len(os.listdir("/proc/self/fd")) == before


async def test_unusable_base_temp_dir_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(trio_qemu.LaunchError, match="temporary directory") as info:
        async with trio_qemu.open_machine(
            machine="none", base_temp_dir=str(tmp_path / "missing" / "dir")
        ):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, FileNotFoundError)


async def test_monitor_address_in_use_is_a_launch_error(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    path.write_text("not a socket")
    with pytest.raises(trio_qemu.LaunchError, match="cannot listen at monitor_address"):
        async with trio_qemu.open_machine(machine="none", monitor_address=str(path)):
            pass  # pragma: no cover
