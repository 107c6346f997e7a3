"""Launch failures against real processes: each is one LaunchError (never a group) that says
what went wrong, and nothing is left behind: no process, no temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from census import pid_gone, qemu_children

import trio_qemu
from trio_qemu import LaunchError


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


# --- bad input refused before QEMU starts -----------------------------------------------


def _spy_wrapper(marker: Path) -> list[str]:
    """A wrapper that leaves ``marker`` behind if QEMU was ever started, then runs it."""
    return ["sh", "-c", 'touch "$0"; exec "$@"', str(marker)]


def _qemu_with(text: str) -> list[int]:
    """Pids of any process (ours or not) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


async def test_empty_binary_is_refused() -> None:
    with pytest.raises(ValueError, match=r"MachineConfig\.binary must name a QEMU executable"):
        async with trio_qemu.open_machine(binary="", machine="none"):
            pytest.fail("an empty binary must not run the default QEMU")
    assert qemu_children() == set()


async def test_daemonize_is_refused_before_launch(tmp_path: Path) -> None:
    marker = f"trio-qemu-daemonize-probe-{os.getpid()}"
    spy = tmp_path / "started"
    with pytest.raises(ValueError, match=r"'-daemonize'.*detach"):
        async with trio_qemu.open_machine(
            machine="none",
            wrapper=_spy_wrapper(spy),
            args=["-nodefaults", "-name", marker, "-daemonize"],
        ):
            pytest.fail("-daemonize must be refused")
    assert not spy.exists(), "QEMU was started"
    assert _qemu_with(marker) == [], "a daemonised QEMU is running"


async def test_missing_log_dir_is_named_before_launch(base: Path, tmp_path: Path) -> None:
    spy = tmp_path / "started"
    missing = tmp_path / "no-such-dir"
    err = await _launch_error(
        name="logvm", machine="none", log_dir=missing, wrapper=_spy_wrapper(spy),
        base_temp_dir=base,
    )
    text = str(err)
    assert text.startswith(f"logvm: log_dir {str(missing)!r} does not exist")
    assert "cannot start QEMU" not in text
    assert isinstance(err.__cause__, FileNotFoundError)
    assert not spy.exists(), "QEMU was started"
    assert os.listdir(base) == []


async def test_unopenable_console_log_is_a_launch_error(base: Path, tmp_path: Path) -> None:
    spy = tmp_path / "started"
    path = tmp_path / "missing-dir" / "console.log"
    err = await _launch_error(
        name="convm", machine="none", console=True, console_log=path,
        wrapper=_spy_wrapper(spy), base_temp_dir=base,
    )
    text = str(err)
    assert text.startswith(f"convm: cannot open console_log {str(path)!r}: ")
    assert "No such file or directory" in text
    assert isinstance(err.__cause__, FileNotFoundError)
    assert not spy.exists(), "QEMU was started"
    assert qemu_children() == set()
    assert os.listdir(base) == []


_OUT_OF_FDS = r"""
import os, resource, sys, trio, trio_qemu
base = sys.argv[1]
async def main():
    configs = [trio_qemu.MachineConfig(machine="none", name=f"m{i}", base_temp_dir=base)
               for i in range(30)]
    try:
        async with trio_qemu.open_machines(*configs):
            print("LAUNCHED")
    except trio_qemu.LaunchError as exc:
        print("LAUNCHERROR", str(exc).splitlines()[0])
    except BaseException as exc:
        print("OTHER", type(exc).__name__, exc)
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 40, open_now + 40))
trio.run(main)
print("LEFT", len(os.listdir(base)))
"""


def test_running_out_of_fds_is_a_launch_error_and_leaves_nothing(tmp_path: Path) -> None:
    """30 machines with room for ~40 more fds: the launch fails as a LaunchError naming the
    cause (a bare OSError before), and no temp dir or QEMU is left behind."""
    base = tmp_path / "base"
    base.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FDS, str(base)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout
    assert "LAUNCHERROR" in out, (out, result.stderr[-2000:])
    assert "Too many open files" in out, out
    assert "LEFT 0" in out, out
    assert os.listdir(base) == []
