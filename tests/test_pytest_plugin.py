"""The pytest plugin, exercised through pytester in a subprocess (a real pytest run, in a
project of its own under the temporary directory, outside this repository)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trio_qemu.pytest_plugin import _strip_escapes

INI = "[pytest]\ntrio_mode = true\n"
#: A user's project that says nothing about Trio: the plugin must work there as it is.
PLAIN_INI = "[pytest]\n"
NO_CACHE = ("-p", "no:cacheprovider")


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
    pytester.makeini(PLAIN_INI)
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
    pytester.makeini(PLAIN_INI)
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
    out = result.stdout.str()
    assert "MachineExited" in out
    assert f"killed by signal {int(signal.SIGKILL)}" in out
    assert "ExceptionGroup" not in out  # the fixture's nursery does not wrap it
    assert re.search(r"^FAILED test_dies.py::test_dies - \S*MachineExited: ", out, re.MULTILINE)
    assert time.monotonic() - start < 20


def test_without_trio_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini(PLAIN_INI)
    pytester.makepyfile(
        test_plain="""
        import pytest

        @pytest.fixture
        async def booted(machine):          # a user's async fixture on top of ours
            return await machine(machine="none", args=["-nodefaults"])

        async def test_first(machine):
            vm = await machine(machine="none", args=["-nodefaults"])
            assert (await vm.cmd("query-status"))["running"]

        async def test_second(booted):
            assert (await booted.cmd("query-status"))["running"]

        def test_sync_without_machine():
            pass

        def test_sync_with_machine(machine):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    out = result.stdout.str()
    assert "no plugin" not in out and "AssertionError" not in out
    assert "test_sync_with_machine uses trio_qemu's `machine` fixture, which is async" in out


def test_plugin_named_on_the_command_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(PLAIN_INI)
    pytester.makepyfile(
        test_p="""
        async def test_vm(machine):
            vm = await machine(machine="none", args=["-nodefaults"])
            assert (await vm.cmd("query-status"))["running"]
        """
    )
    # Also registered by its entry point: pytest must see one plugin, not two.
    result = pytester.runpytest_subprocess(*NO_CACHE, "-p", "trio_qemu.pytest_plugin")
    result.assert_outcomes(passed=1)
    assert "already registered" not in result.stdout.str() + result.stderr.str()

    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        *NO_CACHE, "-p", "pytest_trio.plugin", "-p", "trio_qemu.pytest_plugin"
    )
    result.assert_outcomes(passed=1)
    # Without pytest-trio the test errors with a message that says what to do.
    result = pytester.runpytest_subprocess(*NO_CACHE, "-p", "trio_qemu.pytest_plugin")
    result.assert_outcomes(errors=1)
    assert "needs the pytest-trio plugin" in result.stdout.str()
    assert "-p pytest_trio.plugin" in result.stdout.str()


def test_machine_dying_mid_command_is_reported_once(pytester: pytest.Pytester) -> None:
    """QEMU killed while the test waits on the guest: one failure, MachineExited, with the
    VM's sections, none of the library's internal exception chain, no terminal escapes."""
    pytester.makeini(PLAIN_INI)
    pytester.makepyfile(
        test_dies="""
        import os, signal, trio

        async def test_dies(machine):
            vm = await machine(guest=True, console_log="console.log")
            open("pid", "w").write(str(vm.pid))
            # colours and a window title on the console, as real guests print them
            await vm.shell.run(
                r"printf '\\033[1;31mRED-TEXT\\033[0m \\033]0;a title\\007\\n' >/dev/console"
            )
            await vm.console.wait_for(b"RED-TEXT", timeout=30)

            async def kill_soon():
                await trio.sleep(0.3)
                os.kill(vm.pid, signal.SIGKILL)

            async with trio.open_nursery() as nursery:   # the user's own nursery, too
                nursery.start_soon(kill_soon)
                await vm.shell.run("sleep 60", timeout=60)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    for internal in ("ExceptionGroup", "_ChannelEnded", "BrokenResourceError",
                     "ConnectionResetError", "During handling", "direct cause"):
        assert internal not in out, internal
    raised = [line for line in out.splitlines() if line.startswith("E ") and "Exited" in line]
    assert len(raised) == 1, raised
    assert re.search(r"^FAILED test_dies.py::test_dies - \S*MachineExited: ", out, re.MULTILINE)
    assert out.count("trio_qemu machine ") == 1
    assert "--- QEMU output ---" in out
    console = out.split("--- console (tail) ---", 1)[1].split("--- QEMU output ---", 1)[0]
    assert "RED-TEXT" in console
    assert "\x1b" not in out and "[1;31m" not in console and "]0;a title" not in console
    # The guest really wrote escapes: the report removed them.
    assert b"\x1b[1;31mRED-TEXT" in (pytester.path / "console.log").read_bytes()
    assert _gone(int((pytester.path / "pid").read_text()))


CLONE_TESTS = """
import json, os, time
import pytest
from trio_qemu.snapshot import TemplateError

def record(name, vm, template):
    (mem,) = [arg for arg in vm.argv if "mem-path=" in arg]
    ram = mem.split("mem-path=", 1)[1].split(",", 1)[0]
    entry = {"test": name, "ram": ram, "template": str(template.path),
             "created": template.manifest["created"], "started": STARTED[name],
             "worker": os.environ.get("PYTEST_XDIST_WORKER", "-")}
    with open(os.environ["RECORD"], "a") as file:
        file.write(json.dumps(entry) + "\\n")

STARTED = {}

@pytest.fixture(autouse=True)
def started(request):
    STARTED[request.node.name] = time.time()

async def test_a_writes(fresh_guest, guest_template):
    assert "-incoming" in fresh_guest.argv
    await fresh_guest.shell.run("echo one > /root/mark", check=True)
    assert (await fresh_guest.shell.run("cat /root/mark")).stdout == b"one\\n"
    record("test_a_writes", fresh_guest, guest_template)

async def test_b_is_fresh(fresh_guest, guest_template, machine):
    assert (await fresh_guest.shell.run("test -e /root/mark")).returncode == 1
    record("test_b_is_fresh", fresh_guest, guest_template)
    # a second clone of the same template in the same test, named
    other = await machine(clone=guest_template, name="second")
    assert other.name == "second"
    assert (await other.shell.run("echo $((6*7))")).stdout == b"42\\n"
    # what the guest would see differently cannot come from this template
    with pytest.raises(TemplateError, match="memory"):
        await machine(clone=guest_template, memory=128)
"""

FAILING_CLONE_TEST = """
async def test_fails_on_purpose(fresh_guest):
    assert (await fresh_guest.shell.run("true")).returncode == 1
"""


def _template_cache(root: Path) -> Path:
    """An empty template cache whose ``guest`` is the usual cache's (no guest build)."""
    from trio_qemu.guest import default_cache_dir

    guests = default_cache_dir() / "guest"
    guests.mkdir(parents=True, exist_ok=True)
    root.mkdir()
    (root / "guest").symlink_to(guests)
    return root


@pytest.mark.slow
def test_fresh_guest_clones_one_template_per_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each test gets its own clone; the template is made once (one boot) for the two
    xdist workers, then reused by a later session, its tests and failure reports."""
    cache = _template_cache(tmp_path / "cache")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("TRIO_QEMU_CACHE", str(cache))
    monkeypatch.setenv("RECORD", str(record))
    pytester.makeini(PLAIN_INI)
    pytester.makepyfile(test_clones=CLONE_TESTS)
    try:
        # Two workers, each a test, an empty cache: both want the template at once.
        result = pytester.runpytest_subprocess(*NO_CACHE, "-n", "2")
        result.assert_outcomes(passed=2)
        first = [json.loads(line) for line in record.read_text().splitlines()]
        assert {entry["worker"] for entry in first} == {"gw0", "gw1"}
        templates = [p for p in (cache / "templates").iterdir() if not p.name.endswith(".lock")]
        assert [p.name for p in templates] == [templates[0].name]  # one, no left-overs
        made = json.loads((templates[0] / "manifest.json").read_text())["created"]
        for entry in first:
            assert entry["template"] == str(templates[0])
            assert entry["ram"] == str(templates[0] / "ram")
            assert entry["created"] == made

        # A new session, one process: both tests clone that template; nobody boots.
        record.unlink()
        pytester.makepyfile(test_failing=FAILING_CLONE_TEST)
        result = pytester.runpytest_subprocess(*NO_CACHE, "-p", "no:xdist")
        result.assert_outcomes(passed=2, failed=1)
        second = [json.loads(line) for line in record.read_text().splitlines()]
        assert [entry["test"] for entry in second] == ["test_a_writes", "test_b_is_fresh"]
        for entry in second:
            assert entry["template"] == str(templates[0]) and entry["created"] == made
            assert entry["started"] > made
        assert json.loads((templates[0] / "manifest.json").read_text())["created"] == made
        out = result.stdout.str()
        # The failing test's clone is reported, as which template's clone.
        assert out.count("trio_qemu machine ") == 1
        assert f"clone of template {templates[0].name} ({templates[0]})" in out
        assert "-incoming defer" in out

        # `python -m trio_qemu template build` names the same template: it can make it
        # ahead of a test run.
        built = subprocess.run(
            [sys.executable, "-m", "trio_qemu", "template", "build"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        assert built.stdout.startswith(f"template {templates[0].name} ready")
        assert json.loads((templates[0] / "manifest.json").read_text())["created"] == made
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # its RAM file is large


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("trio-guest:/# \x1b[6n", "trio-guest:/# "),
        ("\x1b[1;31mred\x1b[0m\r\n", "red\n"),
        ("a\x1b]0;title\x07b \x1b]8;;http://x\x1b\\link", "ab link"),
        ("\x1bP1$r0m\x1b\\ok \x1b(B\x1b=done", "ok done"),
        ("tab\tnul\x00bs\x08del\x7f\u009b2J", "tab\tnulbsdel"),
        ("\x1b]unterminated\nnext line", "\nnext line"),
        ("plain text, 100% [ok]", "plain text, 100% [ok]"),
    ],
)
def test_strip_escapes(raw: str, clean: str) -> None:
    assert _strip_escapes(raw) == clean
