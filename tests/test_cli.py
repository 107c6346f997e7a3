"""The command line (``python -m trio_qemu``), run as a user would, in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trio_qemu
from trio_qemu import __main__ as cli_main
from trio_qemu._tempdirs import OWNER_FILE, create_machine_dir
from trio_qemu.guest import default_cache_dir

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


# -- templates ---------------------------------------------------------------------------


@pytest.fixture
def template_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``$TRIO_QEMU_CACHE``, empty but for the usual cache's guests (no guest build); its
    templates are removed afterwards (their RAM files are large)."""
    guests = default_cache_dir() / "guest"
    guests.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "guest").symlink_to(guests)
    monkeypatch.setenv("TRIO_QEMU_CACHE", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _fake_template(templates: Path, key: str, **manifest: object) -> Path:
    path = templates / key
    path.mkdir(parents=True)
    (path / "state").write_bytes(b"s" * 8192)
    (path / "manifest.json").write_text(json.dumps({"key": key, **manifest}))
    return path


def test_template_build_list_clear(template_cache: Path) -> None:
    """Build boots the tiny guest once; a second build, list and clear use what it made."""
    result = run_cli("template", "build", timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"template (\w+) ready \(made in [\d.]+ s\): (\S+)\n", result.stdout)
    assert match, result.stdout
    key, path = match.groups()
    assert Path(path) == template_cache / "templates" / key
    assert {"manifest.json", "ram", "state"} <= set(os.listdir(path))
    assert f"template {key}: " in result.stderr  # the steps, as they happened
    created = json.loads((Path(path) / "manifest.json").read_text())["created"]

    again = run_cli("template", "build")
    assert again.returncode == 0 and again.stdout == result.stdout, again.stderr
    assert json.loads((Path(path) / "manifest.json").read_text())["created"] == created

    listed = run_cli("template", "list")
    assert listed.returncode == 0, listed.stderr
    assert re.fullmatch(
        rf"{key}  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  made in [\d.]+ s  memory 256 MiB  "
        r"[\d.]+ MiB on disk\n",
        listed.stdout,
    ), listed.stdout

    # A maker holds the lock: clear leaves the template alone and says so.
    lock = template_cache / "templates" / f"{key}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        blocked = run_cli("template", "clear", "--key", key)
    assert blocked.returncode == 1 and blocked.stdout == ""
    assert f"skipped {key}: a maker holds its lock" in blocked.stderr
    assert Path(path, "ram").exists()

    cleared = run_cli("template", "clear")
    assert cleared.returncode == 0, cleared.stderr
    assert re.fullmatch(rf"removed {key} \([\d.]+ MiB\)\n", cleared.stdout), cleared.stdout
    assert os.listdir(template_cache / "templates") == []  # lock file included
    listed = run_cli("template", "list")
    assert listed.stdout == f"no templates in {template_cache / 'templates'}\n"


def test_template_list_and_clear_without_qemu(
    template_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    templates = template_cache / "templates"
    assert cli_main.main(["template", "list"]) == 0
    assert capsys.readouterr().out == f"no templates in {templates}\n"
    assert cli_main.main(["template", "clear"]) == 0
    assert capsys.readouterr().out == f"no templates in {templates}\n"

    _fake_template(
        templates, "aaa", created=0, made_in=4.25, ram={"size": 64 << 20},
        signature={"key": "my-prepare-v2"},
    )  # fmt: skip
    _fake_template(templates, "bbb")  # an older layout: no figures
    (templates / "ccc").mkdir()  # no manifest
    (templates / "aaa.lock").touch()
    (templates / ".build-aaa-x1y2z3w4").mkdir()  # a killed maker's left-overs
    (templates / ".trash-bbb-0123abcd").mkdir()
    assert cli_main.main(["template", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))
    assert re.fullmatch(
        rf"aaa  {stamp}  made in 4\.2 s  memory 64 MiB  \d+\.\d MiB on disk  key=my-prepare-v2",
        lines[0],
    ), lines
    assert re.fullmatch(r"bbb  \d+\.\d MiB on disk", lines[1]), lines
    assert lines[2].startswith("ccc  unusable: no readable manifest (")
    assert len(lines) == 3

    assert cli_main.main(["template", "clear", "--key", "zzz"]) == 1
    assert "error: no template zzz in" in capsys.readouterr().err
    assert cli_main.main(["template", "clear", "--key", "aaa"]) == 0
    assert capsys.readouterr().out.startswith("removed aaa (")
    assert sorted(os.listdir(templates)) == [".trash-bbb-0123abcd", "bbb", "ccc"]
    assert cli_main.main(["template", "clear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["removed bbb", "removed ccc"]
    assert os.listdir(templates) == []
