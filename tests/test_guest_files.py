"""The guest-side files in ``trio_qemu/guest/files``: valid shell, and shipped in the wheel.

The wheel tests build a wheel from a copy of the project (so nothing is written into the
source tree), install it with ``pip --target`` and import it in a fresh interpreter whose
working directory is outside the repository, to show the files are read as package data
and not from the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import trio_qemu
from trio_qemu._shell import SHELL_AGENT_SCRIPT
from trio_qemu.guest import scripts

PROJECT = Path(trio_qemu.__file__).resolve().parent.parent
FILES = PROJECT / "trio_qemu" / "guest" / "files"
SHELL_FILES = sorted(p for p in FILES.iterdir() if p.suffix == ".sh" or p.name == "profile")
BUSYBOX = Path("/bin/busybox")


def test_the_files_are_the_expected_ones() -> None:
    """A new file here must also go into the cache key (``scripts._script_digest`` or the
    agent variant's digest) and into this list."""
    assert sorted(p.name for p in FILES.iterdir()) == [
        "init.sh",
        "inittab",
        "inittab-agent",
        "link-ports.sh",
        "profile",
        "qga-wrapper.sh",
        "shutdown.sh",
        "trio-relay.c",
        "trio-shell-agent.sh",
        "udhcpc.sh",
    ]


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_syntax(path: Path) -> None:
    """``sh -n`` (and busybox's, which runs them in the guest) accepts every script."""
    subprocess.run(["sh", "-n", str(path)], check=True)
    if BUSYBOX.exists():
        subprocess.run([str(BUSYBOX), "sh", "-n", str(path)], check=True)


def test_rendered_files_have_no_placeholders() -> None:
    for text in (
        scripts.render_init(), scripts._INITTAB, scripts._AGENT_INITTAB,
        scripts._AGENT_WRAPPER_SCRIPT,
    ):  # fmt: skip
        assert not scripts._PLACEHOLDER.search(text)
    assert scripts._AGENT_INITTAB.count("\n") == scripts._INITTAB.count("\n") + 2


def test_render_checks_placeholders() -> None:
    with pytest.raises(ValueError, match="left unfilled: READY"):
        scripts._render("init.sh", {"BOOT_MODULES": "virtio_pci"})
    with pytest.raises(ValueError, match="no placeholder @NOPE@"):
        scripts._render("init.sh", {"NOPE": ""})


def test_texts_are_the_files() -> None:
    assert SHELL_AGENT_SCRIPT.encode() == (FILES / "trio-shell-agent.sh").read_bytes()
    assert scripts.INIT_SCRIPT.encode() == (FILES / "init.sh").read_bytes()
    assert scripts._SHUTDOWN_SCRIPT.encode() == (FILES / "shutdown.sh").read_bytes()


# --- the wheel ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by pip from a copy of the project."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(PROJECT / name, source / name)
    shutil.copytree(
        PROJECT / "trio_qemu",
        source / "trio_qemu",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(out), str(source)],
        check=True,
        cwd=source,
    )  # fmt: skip
    (built,) = out.glob("trio_qemu-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_the_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in FILES.iterdir():
        assert f"trio_qemu/guest/files/{path.name}" in names
    assert "trio_qemu/guest/__init__.py" in names


_PROBE = """
import json, sys
import trio_qemu, trio_qemu._shell
from trio_qemu.guest import scripts
names = sys.argv[1:]
print(json.dumps({
    "file": trio_qemu.__file__,
    "shell_agent": trio_qemu._shell.SHELL_AGENT_SCRIPT,
    "files": {name: scripts._read(name) for name in names},
    "init": scripts.render_init(),
}))
"""


@pytest.mark.slow
def test_installed_wheel_reads_its_files(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
        check=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = sorted(p.name for p in FILES.iterdir())
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *names],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    found = json.loads(out)
    assert Path(found["file"]).resolve().is_relative_to(target.resolve())
    assert found["shell_agent"] == (FILES / "trio-shell-agent.sh").read_text()
    for name in names:
        assert found["files"][name].encode() == (FILES / name).read_bytes(), name
    assert found["init"] == scripts.render_init()
