"""The ways into a machine: :func:`open_machine`, :func:`open_machines`, :func:`start_machine`.

Each opener runs the machines' service tasks in a nursery around the caller's block and
turns what happened into one exception for the caller, never an ``ExceptionGroup`` of our
internal tasks:

- the launch failed: its :class:`~trio_qemu.LaunchError` (naming the machine);
- the block raised: that exception (it wins over any teardown trouble);
- QEMU died during the block (which is then cancelled): :class:`~trio_qemu.MachineExited`;
- the final graceful stop failed: :class:`~trio_qemu.AbnormalShutdown`;
- Ctrl-C anywhere: a bare ``KeyboardInterrupt``, after everything is torn down.

They use only :class:`~trio_qemu.Machine`'s public methods (``launch``, ``shutdown``,
``failure`` and the ``on_failure`` hook).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio

from ._config import MachineConfig
from ._errors import AbnormalShutdown
from ._machine import Machine
from ._util import BlockOutcome, keyboard_interrupt_in, protected_asynccontextmanager

__all__ = ["open_machine", "open_machines", "start_machine"]


def _merge(config: MachineConfig | None, fields: Mapping[str, Any]) -> MachineConfig:
    base = config if config is not None else MachineConfig()
    return base.replace(**fields) if fields else base


async def start_machine(
    nursery: trio.Nursery, config: MachineConfig | None = None, /, **fields: Any
) -> Machine:
    """Launch a machine whose tasks live in ``nursery``; return once QMP is negotiated.

    The machine runs until :meth:`Machine.shutdown` or until the nursery is cancelled (then
    it is shut down gracefully, shielded and bounded). If QEMU dies unexpectedly,
    :class:`~trio_qemu.MachineExited` is raised into the nursery.

    Raises:
        LaunchError: QEMU cannot be started.
    """
    machine = Machine(_merge(config, fields))
    await machine.launch(nursery)
    return machine


async def _shutdown(machine: Machine) -> AbnormalShutdown | None:
    """Shut ``machine`` down; return (not raise) a failed graceful stop."""
    try:
        await machine.shutdown()
    except AbnormalShutdown as exc:
        return exc
    return None


def _raise_bare_interrupt(group: BaseExceptionGroup[BaseException]) -> None:
    interrupt = keyboard_interrupt_in(group)
    if interrupt is not None:
        raise interrupt


@protected_asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_machine(
    config: MachineConfig | None = None, /, **fields: Any
) -> AsyncIterator[Machine]:
    """Launch a machine for the block; leaving the block for any reason shuts it down.

    ``fields`` override ``config`` (``open_machine(machine="none")`` needs no config).
    On return QEMU has exited and been reaped, and its temporary files are gone. An
    exception from the block itself always wins over a teardown problem; a Ctrl-C comes out
    as a bare ``KeyboardInterrupt`` once everything is torn down.

    Raises:
        LaunchError: the launch failed.
        MachineExited: QEMU died while the block ran (the block is cancelled at once).
        AbnormalShutdown: the final graceful stop failed and QEMU was killed.
    """
    body_scope = trio.CancelScope()
    machine = Machine(_merge(config, fields), on_failure=body_scope.cancel)
    launch = BlockOutcome()
    body = BlockOutcome()
    abnormal: AbnormalShutdown | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await machine.launch(nursery)
            except BaseException as exc:  # raised below, outside the nursery: no group
                launch.error = exc
            else:
                with body_scope:
                    try:
                        yield machine
                    except BaseException as exc:
                        body.error = exc
                abnormal = await _shutdown(machine)
    except BaseExceptionGroup as group:
        _raise_bare_interrupt(group)
        raise
    launch.reraise()
    body.reraise(machine.failure)
    if machine.failure is not None:
        raise machine.failure
    if abnormal is not None:
        raise abnormal


@protected_asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_machines(*configs: MachineConfig) -> AsyncIterator[list[Machine]]:
    """Launch several machines concurrently; tear them all down concurrently on exit.

    Raises like :func:`open_machine`. If one launch fails, the others are cancelled (and
    cleaned up) and its :class:`~trio_qemu.LaunchError`, which names the machine, is raised.
    """
    body_scope = trio.CancelScope()
    machines = [Machine(config, on_failure=body_scope.cancel) for config in configs]
    launched: list[Machine] = []
    launch = BlockOutcome()
    body = BlockOutcome()
    try:
        async with trio.open_nursery() as nursery:

            async def launch_one(machine: Machine) -> None:
                try:
                    await machine.launch(nursery)
                except trio.Cancelled:
                    raise
                except BaseException as exc:
                    if launch.error is None:
                        launch.error = exc
                    launch_scope.cancel()
                    return
                launched.append(machine)

            with trio.CancelScope() as launch_scope:
                async with trio.open_nursery() as launchers:
                    for machine in machines:
                        launchers.start_soon(launch_one, machine)
            if launch.error is None:
                with body_scope:
                    try:
                        yield [m for m in machines if m in launched]
                    except BaseException as exc:
                        body.error = exc
            async with trio.open_nursery() as stoppers:
                for machine in launched:
                    stoppers.start_soon(_shutdown, machine)
    except BaseExceptionGroup as group:
        _raise_bare_interrupt(group)
        raise
    launch.reraise()
    failures = [m.failure for m in launched if m.failure is not None]
    body.reraise(failures[0] if failures else None)
    if failures:
        raise failures[0]
