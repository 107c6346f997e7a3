"""Clones: launch with the template's command line, restore its state, resume."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import trio
from qemu.qmp import ExecuteError

from .._config import MachineConfig
from .._errors import MachineError, MachineExited
from .._machine import Machine
from .._openers import open_machine, open_machines
from .._util import protected_asynccontextmanager
from ._steps import command, drop_fd, fdname, follow, give_fd, set_capabilities
from ._template import Template, TemplateError, unbound_fds

__all__ = ["RESTORE_TIMEOUT", "RNG_SEED_BYTES", "open_clone", "open_clones", "restore"]

RESTORE_TIMEOUT: Final = 60.0
"""Default seconds :func:`restore` allows (it takes tens of milliseconds, plus the guest
sync's first shell command, a few hundred under TCG)."""

RNG_SEED_BYTES: Final = 512
"""Random bytes from the host written into the guest's ``/dev/urandom`` after a restore (as
hex text through the guest shell, as bytes through the guest agent): mixed into the guest's
entropy pool."""

#: Seconds a clone whose restore failed gets to exit and print why.
_EXIT_GRACE: Final = 10.0
#: Lines of QEMU's output quoted in a failed restore's error.
_LOG_LINES: Final = 15


async def restore(
    vm: Machine,
    template: Template,
    *,
    timeout: float = RESTORE_TIMEOUT,
    sync_guest: bool = True,
    setup: str | None = None,
) -> None:
    """Restore ``template`` into ``vm``, launched from ``template.config()``, and resume it.

    The steps: turn on the ``x-ignore-shared`` and ``events`` migration capabilities and
    turn off QEMU's self-announcement after an incoming migration (``announce-rounds`` 0: a
    clone is a new machine, not a moved one, and must not announce the template's MAC and
    addresses), hand QEMU a read-only fd of the state file (``getfd``),
    ``migrate-incoming uri=fd:NAME``, wait for the ``MIGRATION`` event ``completed`` (the
    guest is then paused, as the template was when saved), turn the capabilities off again
    (so the clone can migrate like any machine), ``cont``. With ``sync_guest`` the guest is
    then told the host's time (its clock stood still since the template was saved) and
    given :data:`RNG_SEED_BYTES` fresh random bytes: through the guest shell (``date -s``
    and the seed, as hex, echoed into ``/dev/urandom``: one command, one process) when the
    config has ``shell``, else through the guest agent (``guest-set-time`` and a write of
    the bytes) when it has ``agent``, else not at all. The clock is then right to about a
    second. A guest with a VM generation ID (``-device vmgenid``, in the tiny guest's
    :data:`~trio_qemu.guest.GUEST_ARGS`) needs no help for its RNG: QEMU announces a new ID
    as the restore lands and the guest kernel reseeds at once.

    A restore that QEMU cannot do makes the clone's QEMU print why and exit; that exit is
    expected here (not a :class:`~trio_qemu.MachineExited`) and is reported as a
    :class:`TemplateError` quoting QEMU's output. After any failure the machine is unusable:
    shut it down (:func:`open_clone` does).

    Args:
        vm: a running machine launched from ``template.config(...)``, not restored yet.
        template: the template it was launched from.
        timeout: seconds for all of it, the guest sync and ``setup`` included.
        sync_guest: set the guest's clock and re-seed its RNG after the restore.
        setup: a shell command line to run in the guest after the sync, in the same guest
            command (one round trip: the first command after a restore is the slow one
            under TCG, its code being translated afresh): through the guest shell, or
            ``sh -c`` through the agent. :mod:`trio_qemu.network` gives a clone its own
            MAC, address and host name this way.

    Raises:
        TemplateError: QEMU refused a step, the restore failed (QEMU's message), the
            guest sync or ``setup`` failed (its output), or it took longer than ``timeout``.
        ValueError: ``setup`` for a machine with neither the guest shell nor the agent.
    """
    if setup is not None and not (vm.config.shell or vm.config.agent):
        raise ValueError(f"{vm.name}: setup= needs the guest shell or agent (shell=True)")
    with trio.move_on_after(timeout) as scope:
        await _restore(vm, template)
        if sync_guest or setup is not None:
            remaining = max(scope.deadline - trio.current_time(), 0.001)
            await _sync_guest(vm, remaining, sync=sync_guest, setup=setup)
    if scope.cancelled_caught:
        raise TemplateError(
            f"{vm.name}: template {template.key} was not restored within {timeout} s"
        )


async def _restore(vm: Machine, template: Template) -> None:
    was_expected = vm.exit_expected()
    # QEMU 7.2 exits when an incoming migration fails: expected while we restore.
    vm.expect_exit("restore")
    failed = False
    try:
        await set_capabilities(vm)
        # No RARP from the template's MAC, no gratuitous ARP from its addresses.
        await command(vm, "migrate-set-parameters", {"announce-rounds": 0})
        name = fdname()
        with vm.subscribe("MIGRATION") as events:
            await give_fd(vm, template.state_path, os.O_RDONLY, name)
            try:
                await vm.cmd("migrate-incoming", {"uri": f"fd:{name}"})
            except ExecuteError as exc:
                await drop_fd(vm, name)
                raise TemplateError(
                    f"{vm.name}: QEMU refused to restore template {template.key}: {exc} "
                    "(was the machine launched from template.config()?)"
                ) from exc
            status = await follow(vm, events)
        if status != "completed":
            failed = True
            with trio.move_on_after(_EXIT_GRACE):
                await vm.wait_exited(timeout=None)
            output = "\n".join("    " + line for line in vm.log.strip().splitlines()[-_LOG_LINES:])
            raise TemplateError(
                f"{vm.name}: restoring template {template.key} failed ({status}); "
                f"QEMU's output:\n{output or '    (none)'}"
            )
        # Back to QEMU's defaults, so that the clone migrates like any machine.
        await set_capabilities(vm, False)
        await command(vm, "cont")
    finally:
        if not failed and not was_expected:
            vm.expect_exit(None)


async def _sync_guest(vm: Machine, timeout: float, *, sync: bool, setup: str | None) -> None:
    """The host's time and fresh randomness into the guest, then ``setup`` (see
    :func:`restore`)."""
    seed = secrets.token_bytes(RNG_SEED_BYTES)
    what = " and ".join(w for w, on in (("sync", sync), ("setup", setup is not None)) if on)
    try:
        if vm.config.shell:
            # busybox date takes whole seconds: rounded, the clock is right to about 0.5 s
            # plus the time the command takes to start.
            # The seed travels in the command line, as hex, written by the shell's built-in
            # echo: no stdin to pass and no process but date's (each process costs tens of
            # milliseconds in a fresh clone, whose code TCG translates afresh).
            lines = []
            if sync:
                now = round(time.time())
                lines.append(f"date -u -s @{now} >/dev/null && echo {seed.hex()} >/dev/urandom")
            if setup is not None:
                lines.append(setup if not sync else f"{{ {setup}\n}}")
            line = " && ".join(lines)
            await vm.shell.run(line, timeout=timeout, check=True)
        elif vm.config.agent:
            deadline = trio.current_time() + timeout
            if sync:
                await vm.agent.cmd("guest-set-time", {"time": time.time_ns()}, timeout=timeout)
                remaining = max(deadline - trio.current_time(), 0.001)
                await vm.agent.write_file("/dev/urandom", seed, timeout=remaining)
            if setup is not None:
                remaining = max(deadline - trio.current_time(), 0.001)
                await vm.agent.exec(["/bin/sh", "-c", setup], timeout=remaining, check=True)
    except MachineExited:
        raise
    except (MachineError, ExecuteError) as exc:
        raise TemplateError(f"{vm.name}: the guest {what} after the restore failed: {exc}") from exc


@protected_asynccontextmanager
async def open_clone(
    template: Template,
    *,
    restore_timeout: float = RESTORE_TIMEOUT,
    sync_guest: bool = True,
    **fields: Any,
) -> AsyncIterator[Machine]:
    """Launch a clone of ``template`` for the block: an ordinary, running
    :class:`~trio_qemu.Machine` (QMP, console, ``vm.shell``, ``vm.agent``, migration...).

    ``open_machine(template.config(**fields))``, then :func:`restore`. Leaving the block
    shuts the clone down like any machine.

    Args:
        template: from :func:`ensure_template` or :func:`open_template`.
        restore_timeout: seconds for :func:`restore`.
        sync_guest: set the guest's clock and re-seed its RNG (see :func:`restore`).
        **fields: per-machine :class:`~trio_qemu.MachineConfig` fields (see
            :meth:`Template.config`).

    Yields:
        The running clone.

    Raises:
        TemplateError: the config does not match the template, or the template's files
            changed (both before QEMU starts), or the restore failed.
        LaunchError, MachineExited, AbnormalShutdown: as :func:`~trio_qemu.open_machine`.
    """
    config = template.config(**fields)
    check_bound(config)
    template.verify()
    async with open_machine(config) as vm:
        await restore(vm, template, timeout=restore_timeout, sync_guest=sync_guest)
        yield vm


@protected_asynccontextmanager
async def open_clones(
    template: Template,
    n: int,
    *,
    restore_timeout: float = RESTORE_TIMEOUT,
    sync_guest: bool = True,
    **fields: Any,
) -> AsyncIterator[list[Machine]]:
    """Launch ``n`` clones of ``template`` at once for the block (``open_machines``, then
    :func:`restore` on all of them concurrently).

    Args:
        template: from :func:`ensure_template` or :func:`open_template`.
        n: how many (at least 1).
        restore_timeout: seconds for each :func:`restore`.
        sync_guest: set each guest's clock and re-seed its RNG.
        **fields: per-machine fields for every clone; a ``name`` becomes ``<name>-<i>``.

    Yields:
        The running clones, in order.

    Raises:
        TemplateError: as :func:`open_clone`; the first clone that fails to restore
            ends the block for all (they are all shut down).
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive number of clones, not {n!r}")
    name = fields.pop("name", None)
    configs = [
        template.config(**fields, name=None if name is None else f"{name}-{i}") for i in range(n)
    ]
    check_bound(configs[0])
    template.verify()
    async with open_machines(*configs) as vms:
        await restore_all(vms, template, timeout=restore_timeout, sync_guest=sync_guest)
        yield vms


def check_bound(config: MachineConfig) -> None:
    """Refuse, before QEMU starts, a clone config whose command line still names the
    template maker's fds (a NIC on a network: attach the clone's config to it)."""
    unbound = unbound_fds(config)
    if unbound:
        raise TemplateError(
            f"{config.name or 'the clone'}: its command line names fds it does not inherit "
            f"(the template's machine had them): {'; '.join(unbound)}. A NIC on a network: "
            "attach the clone's config to a network of the same name (network.attach("
            "template.config(name=...))) and open it with network.open_clones(template, ...)"
        )


async def restore_all(
    vms: list[Machine],
    template: Template,
    *,
    timeout: float,
    sync_guest: bool,
    setups: Mapping[str, str] | None = None,
) -> None:
    """Restore every machine concurrently (``setups``: the ``setup`` of :func:`restore`
    per machine name); the first failure cancels the rest and is raised bare (never in
    an exception group)."""
    failures: list[Exception] = []
    setups = setups or {}

    async def one(vm: Machine) -> None:
        try:
            await restore(
                vm, template, timeout=timeout, sync_guest=sync_guest, setup=setups.get(vm.name)
            )
        except Exception as exc:
            if not failures:
                failures.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for vm in vms:
            nursery.start_soon(one, vm)
    if failures:
        raise failures[0]
