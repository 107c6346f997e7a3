"""pytest fixtures for trio_qemu, registered through the ``pytest11`` entry point.

Fixtures (they need pytest-trio for the async one):

- ``qemu_binary`` (session): the QEMU executable the machines run (``$QEMU`` or
  ``qemu-system-x86_64`` on PATH); fails the test with a clear message when there is none.
- ``tiny_guest`` (session, sync): the cached tiny Linux guest (:mod:`trio_qemu.guest`), built
  on first use.
- ``machine`` (function): an async factory. ``vm = await machine(machine="none")`` launches a
  VM in the test's nursery; ``await machine(guest=True)`` boots the tiny guest and waits
  until its shell answers. Every VM is shut down when the test ends, passed or failed.

When a test fails, its report gets one section per VM with QEMU's command line and exit
status, the console tail, QEMU's own output and the last QMP messages exchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Generator
from typing import Any, Protocol

import pytest
import trio

from ._config import MachineConfig
from ._machine import Machine, start_machine
from .guest import GuestImage, build_guest, ensure_guest

__all__ = ["MachineFactory"]

_MACHINES_KEY = pytest.StashKey[list[Machine]]()
_NOTES_KEY = pytest.StashKey[dict[str, str]]()
#: How much console output a failure report shows.
_CONSOLE_TAIL = 4096


class MachineFactory(Protocol):
    """The ``machine`` fixture: ``await machine(config=None, *, guest=False, **fields)``."""

    async def __call__(
        self,
        config: MachineConfig | None = None,
        /,
        *,
        guest: bool = False,
        boot_timeout: float = 120.0,
        **fields: Any,
    ) -> Machine: ...


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The QEMU executable the machines run: ``$QEMU``, else ``qemu-system-x86_64``."""
    name = MachineConfig().resolved_binary()
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"QEMU not found: {name!r} is not on PATH (set $QEMU)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_guest() -> GuestImage:
    """The tiny Linux guest, from the cache or built now (about 5-60 s the first time)."""
    return build_guest()


@pytest.fixture
async def machine(
    request: pytest.FixtureRequest, qemu_binary: str
) -> AsyncIterator[MachineFactory]:
    """Launch VMs that live until the end of the test; see :class:`MachineFactory`.

    ``guest=True`` boots the tiny guest (``GuestImage.config(**fields)``) and waits for its
    shell; ``config``/``fields`` otherwise go to ``open_machine``'s rules. The binary from
    ``qemu_binary`` is used unless the config names one.
    """
    machines: list[Machine] = []
    notes: dict[str, str] = {}
    request.node.stash[_MACHINES_KEY] = machines
    request.node.stash[_NOTES_KEY] = notes
    async with trio.open_nursery() as nursery:

        async def factory(
            config: MachineConfig | None = None,
            /,
            *,
            guest: bool = False,
            boot_timeout: float = 120.0,
            **fields: Any,
        ) -> Machine:
            if guest:
                image = await ensure_guest()
                config = (config or image.config()).replace(**fields)
                if config.kernel is None:
                    config = config.replace(kernel=str(image.kernel), initrd=str(image.initrd))
            else:
                config = (config or MachineConfig()).replace(**fields)
            if config.binary is None and "QEMU" not in os.environ:
                config = config.replace(binary=qemu_binary)
            vm = await start_machine(nursery, config)
            machines.append(vm)
            if guest:
                await vm.shell.wait_ready(timeout=boot_timeout)
            return vm

        try:
            yield factory
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stoppers:
                    for vm in machines:
                        stoppers.start_soon(_stop, vm, notes)


async def _stop(vm: Machine, notes: dict[str, str]) -> None:
    try:
        await vm.shutdown()
    except Exception as exc:  # the test's own outcome matters more; say what happened
        notes[vm.name] = f"shutdown: {exc}"


def _describe(vm: Machine, note: str | None) -> str:
    parts = [
        f"command line: {' '.join(vm.argv)}",
        f"pid {vm.pid}, "
        + ("running" if vm.is_running() else f"exit status {vm.returncode}"),
    ]
    if note:
        parts.append(note)
    if vm.failure is not None:
        parts.append(f"failure: {vm.failure}")
    if vm.config.console:
        tail = vm.console.tail(_CONSOLE_TAIL).decode("utf-8", "replace")
        parts.append("--- console (tail) ---\n" + tail)
    parts.append("--- QEMU output ---\n" + (vm.log or "(none)"))
    if vm.config.qmp and vm._qmp is not None:
        parts.append("--- last QMP messages ---\n" + "\n".join(vm.qmp_client.transcript()))
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach each VM's diagnostics to the report of a failed test."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    notes = item.stash.get(_NOTES_KEY, {})
    for vm in item.stash.get(_MACHINES_KEY, []):
        report.sections.append((f"trio_qemu machine {vm.name}", _describe(vm, notes.get(vm.name))))
