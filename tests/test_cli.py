"""The command line (``python -m trio_qemu``), run as a user would, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_qemu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_guest_path_prints_existing_files() -> None:
    result = run_cli("guest", "path")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert Path(lines["kernel"]).read_bytes()[:4] == b"\x7fELF"
    assert Path(lines["initrd"]).stat().st_size > 1_000_000
    assert "console=ttyS0" in lines["append"]


def test_run_streams_the_console_and_stops_at_the_timeout() -> None:
    result = run_cli(
        "run", "--console", "--timeout", "3", "--",
        "-machine", "q35,graphics=off", "-nodefaults", "-boot", "reboot-timeout=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "No bootable device" in result.stdout
    assert "-machine q35,graphics=off" in result.stderr  # the command line is shown
    assert "stopping after 3.0 s" in result.stderr


def test_run_reports_a_launch_error() -> None:
    result = run_cli("run", "--", "-machine", "bogus")
    assert result.returncode == 1
    assert "unsupported machine type" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_boots_two_guests_and_runs_commands() -> None:
    result = run_cli("demo", timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    for name in ("alpha", "beta"):
        assert f"[{name}] shell ready" in out
        assert f"[{name}] $ uname -sr  -> exit 0" in out
        assert f"[{name}] $ sh -c 'echo computing; exit 42'  -> exit 42" in out
    assert "[alpha] QMP event STOP" in out and "[alpha] QMP event RESUME" in out
    assert "exit statuses [0, 0]" in out
