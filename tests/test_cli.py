"""The command line (``python -m trio_qemu``), run as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import trio_qemu
from trio_qemu import __main__ as cli_main
from trio_qemu._tempdirs import OWNER_FILE, create_machine_dir

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


# -- Ctrl-C, SIGTERM and errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_run_stops_cleanly_on_a_signal(
    tmp_path: Path, sig: signal.Signals, status: int, word: str
) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "trio_qemu", "run", "--", "-machine", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the machine's temp dir goes there
        start_new_session=True,
    )
    qemu_pidfd = None
    try:
        assert cli.stderr is not None
        ready, _, _ = select.select([cli.stderr], [], [], 60)
        assert ready, "the CLI printed nothing within 60 s"
        first = cli.stderr.readline()
        assert first.startswith("# pid "), first
        qemu_pid = int(first.split()[2].rstrip(":"))
        qemu_pidfd = os.pidfd_open(qemu_pid)  # QEMU is up: this pidfd is QEMU's
        os.kill(cli.pid, sig)
        _, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    try:
        assert cli.returncode == status, err
        assert err.splitlines() == [word]
        # QEMU exited and its parent, the CLI, reaped it; its temp dir is gone.
        assert select.select([qemu_pidfd], [], [], 0)[0]
        assert not Path(f"/proc/{qemu_pid}").exists()
        assert os.listdir(tmp_path) == []
    finally:
        os.close(qemu_pidfd)


def _fail_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make ``run`` raise ``error`` from a task inside a nursery (so, in a group)."""

    async def fail() -> None:
        raise error

    async def fake_run(*args: object) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            await trio.sleep_forever()
        return 0  # pragma: no cover

    monkeypatch.setattr(cli_main, "_run", fake_run)


def test_machine_error_in_a_group_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, trio_qemu.MachineExited("vm", -9, "bye"))
    assert cli_main.main(["run", "--", "-machine", "none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: vm: ") and "Traceback" not in err


def test_keyboard_interrupt_in_a_group_is_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli_main.main(["run"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.RaisesGroup(ZeroDivisionError, flatten_subgroups=True):
        cli_main.main(["run"])


def test_clean_removes_dead_controllers_dirs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = create_machine_dir("live", tmp_path)
    dead = create_machine_dir("dead", tmp_path)
    record = json.loads((dead / OWNER_FILE).read_text())
    (dead / OWNER_FILE).write_text(json.dumps({**record, "start": record["start"] - 1}))
    assert cli_main.main(["clean", "--dry-run", "--base", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"would remove {dead}\n"
    assert dead.exists()
    assert cli_main.main(["clean", "--base", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"removed {dead}\n"
    assert not dead.exists() and live.exists()
    assert cli_main.main(["clean", "--base", str(tmp_path)]) == 0
    assert "no stale machine directories" in capsys.readouterr().out
    assert cli_main.main(["clean", "--base", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
