"""Machine temp dirs: created with an owner record, removed loudly, and the stale ones (a
dead owner's) cleaned without ever touching a live controller's or anything not ours."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_qemu._tempdirs import (
    OWNER_FILE,
    create_machine_dir,
    owner_record,
    remove_machine_dir,
    remove_stale_dirs,
)


def _record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / OWNER_FILE).read_text())
    return data


def _set_record(path: Path, **changes: Any) -> None:
    (path / OWNER_FILE).write_text(json.dumps({**_record(path), **changes}))


@pytest.fixture
def dead_owner() -> Iterator[dict[str, Any]]:
    """The owner record of a process that has exited (and been reaped) since."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        record = owner_record(child.pid)
    finally:
        child.kill()
        child.wait()
    yield record


def test_create_records_the_owner(tmp_path: Path) -> None:
    path = create_machine_dir("vm1", tmp_path)
    assert path.parent == tmp_path and path.name.startswith("trio-qemu-vm1-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    record = _record(path)
    assert record == owner_record()
    assert record["pid"] == os.getpid()
    assert os.listdir(path) == [OWNER_FILE]  # no partial file left


def test_create_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_machine_dir("vm", tmp_path / "missing")


def test_live_owner_kept_dead_owner_removed(tmp_path: Path, dead_owner: dict[str, Any]) -> None:
    live = create_machine_dir("live", tmp_path)
    dead = create_machine_dir("dead", tmp_path)
    _set_record(dead, **dead_owner)
    (dead / "qemu.log").write_text("output")
    (dead / "sub").mkdir()
    (dead / "sub" / "sock").write_text("")
    assert remove_stale_dirs(tmp_path, dry_run=True) == [dead]
    assert dead.exists()
    assert remove_stale_dirs(tmp_path) == [dead]
    assert not dead.exists()
    assert live.exists()
    assert remove_stale_dirs(tmp_path) == []


def test_reused_pid_or_reboot_means_dead(tmp_path: Path) -> None:
    # Our own pid, but another start time: the pid was reused by us, the owner is gone.
    reused = create_machine_dir("reused", tmp_path)
    _set_record(reused, start=_record(reused)["start"] - 1)
    rebooted = create_machine_dir("rebooted", tmp_path)
    _set_record(rebooted, boot="another-boot")
    assert sorted(remove_stale_dirs(tmp_path)) == sorted([reused, rebooted])


def test_zombie_owner_is_dead(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        path = create_machine_dir("zombie", tmp_path)
        _set_record(path, **owner_record(child.pid))
        assert remove_stale_dirs(tmp_path) == []
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert remove_stale_dirs(tmp_path) == [path]
    finally:
        child.kill()
        child.wait()


def test_foreign_entries_untouched(tmp_path: Path, dead_owner: dict[str, Any]) -> None:
    stale = create_machine_dir("template", tmp_path)
    _set_record(stale, **dead_owner)
    record = (stale / OWNER_FILE).read_text()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(stale, elsewhere)  # a stale-looking dir, but not named like ours

    no_record = tmp_path / "trio-qemu-norecord-x"
    no_record.mkdir()
    (no_record / "data").write_text("keep")
    a_file = tmp_path / "trio-qemu-file"
    a_file.write_text(record)
    link = tmp_path / "trio-qemu-link"
    link.symlink_to(elsewhere)
    linked_record = tmp_path / "trio-qemu-linkedrecord-x"
    linked_record.mkdir()
    (linked_record / OWNER_FILE).symlink_to(elsewhere / OWNER_FILE)
    garbage = tmp_path / "trio-qemu-garbage-x"
    garbage.mkdir()
    (garbage / OWNER_FILE).write_text("12 34")
    other_pidns = tmp_path / "trio-qemu-otherns-x"
    shutil.copytree(stale, other_pidns)
    _set_record(other_pidns, pidns="pid:[1]")
    half_written = tmp_path / "trio-qemu-half-x"
    half_written.mkdir()
    (half_written / f"{OWNER_FILE}.partial").write_text(record)
    foreign = [no_record, a_file, link, linked_record, garbage, other_pidns, half_written]
    if os.getuid() == 0:  # only root can give a directory away
        theirs = tmp_path / "trio-qemu-theirs-x"
        shutil.copytree(stale, theirs)
        os.chown(theirs, 12345, 12345)
        foreign.append(theirs)

    assert remove_stale_dirs(tmp_path) == [stale]
    for path in foreign:
        assert path.exists() or path.is_symlink(), path
    assert (elsewhere / OWNER_FILE).read_text() == record
    assert (no_record / "data").read_text() == "keep"


def test_missing_base_is_nothing_to_clean(tmp_path: Path) -> None:
    assert remove_stale_dirs(tmp_path / "missing") == []


def test_default_base_is_the_system_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_owner: dict[str, Any]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = create_machine_dir("default", None)
    assert path.parent == tmp_path
    _set_record(path, **dead_owner)
    assert remove_stale_dirs() == [path]


def test_two_cleaners_at_once(
    tmp_path: Path, dead_owner: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    stale = []
    for i in range(30):
        path = create_machine_dir(f"vm{i}", tmp_path)
        _set_record(path, **dead_owner)
        for j in range(40):
            (path / f"file{j}").write_bytes(b"x")
        stale.append(path)
    live = create_machine_dir("live", tmp_path)
    barrier = threading.Barrier(4)
    results: list[list[Path]] = []
    errors: list[BaseException] = []

    def clean() -> None:
        barrier.wait()
        try:
            results.append(remove_stale_dirs(tmp_path))
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=clean) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(results) == 4
    assert set().union(*results) == set(stale)
    assert os.listdir(tmp_path) == [live.name]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_remove_machine_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = create_machine_dir("vm", tmp_path)
    (path / "qemu.log").write_text("output")
    assert remove_machine_dir(path)
    assert not path.exists()
    assert remove_machine_dir(path)  # already gone: nothing to say
    assert not caplog.records


def test_failed_removal_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = create_machine_dir("vm", tmp_path)

    def failing_rmtree(target: Path, **kwargs: Any) -> None:
        error = PermissionError(13, "Permission denied", str(target / "qemu.log"))
        if "onexc" in kwargs:  # pragma: no cover - Python 3.12+
            kwargs["onexc"](os.unlink, str(target / "qemu.log"), error)
        else:
            kwargs["onerror"](os.unlink, str(target / "qemu.log"), (PermissionError, error, None))

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    assert not remove_machine_dir(path)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage() and "Permission denied" in record.getMessage()
