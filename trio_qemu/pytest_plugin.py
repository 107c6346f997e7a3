"""pytest fixtures for trio_qemu, registered through the ``pytest11`` entry point.

Fixtures (the async ones need pytest-trio, but not its ``trio_mode``):

- ``qemu_binary`` (session): the QEMU executable the machines run (``$QEMU`` or
  ``qemu-system-x86_64`` on PATH); fails the test with a clear message when there is none.
- ``tiny_guest`` (session, sync): the cached tiny Linux guest (:mod:`trio_qemu.guest`), built
  on first use.
- ``machine`` (function): an async factory. ``vm = await machine(machine="none")`` launches a
  VM in the test's nursery; ``await machine(guest=True)`` boots the tiny guest and waits
  until its shell answers; ``await machine(clone=True)`` restores a copy-on-write clone of
  the tiny guest's template instead (see below). Every VM is shut down when the test ends,
  passed or failed.
- ``fresh_guest`` (function, async): ``await machine(clone=True)``: a running clone of the
  tiny guest, its shell answering, for this test alone (what it writes no other test sees).
- ``guest_template`` (function, async): the :class:`~trio_qemu.snapshot.Template` of
  ``tiny_guest.config()`` that ``fresh_guest`` clones (for ``open_clones`` and the like).

Templates: the first test of a session that asks for a clone of a config gets its template
from the cache (``$TRIO_QEMU_CACHE``, else ``~/.cache/trio-qemu``: ``templates/<key>``), or
makes it there (one boot); the rest of the session reuses it, one template per distinct
config per cache. pytest-xdist workers share the cache: the template's lock makes the first
worker boot and the others wait for its template.

An ``async def`` test that uses ``machine``, ``fresh_guest`` or ``guest_template`` (directly or
through another fixture) is marked ``@pytest.mark.trio`` by this plugin, so pytest-trio runs
it, and its async fixtures, whether or not the project sets ``trio_mode = true``.

When a machine fails (QEMU dies mid-test), the test is cancelled if it is not already
failing for that reason, and the failure is reported once, as that error (not as an
``ExceptionGroup`` of the test's and the fixture's copies, and without the library's
internal exception chain). When a test fails, its report gets one section per VM with
QEMU's command line and exit status, the console tail (terminal escape sequences removed),
QEMU's own output and the last QMP messages exchanged.

Skips: ``require_accel("kvm")``, ``require_device(name)``, ``require_machine(type)`` and
``require_netdev(type)``, called in a test or fixture, skip it (``pytest.skip``, with the
reason) when QEMU lacks what it names; the markers of the same names
(``@pytest.mark.require_device("virtio-gpu-pci")``, several names or markers allowed, and
``binary=`` for another QEMU) skip it before its fixtures are set up. QEMU is asked once per
binary and session (:func:`~trio_qemu.qemu_capabilities`, about 0.1 s), and the answer kept.

The module is registered under its own name (``trio_qemu.pytest_plugin``) by the entry
point too, so ``-p trio_qemu.pytest_plugin`` (needed with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``)
and ``-p no:trio_qemu.pytest_plugin`` both work.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Any, Protocol

import pytest
import trio

from ._capabilities import capabilities_blocking
from ._config import MachineConfig
from ._errors import MachineError, MachineExited
from ._machine import Machine
from ._openers import start_machine
from .guest import GuestImage, build_guest, default_cache_dir, ensure_guest
from .snapshot import PER_MACHINE_FIELDS, Template, TemplateError, ensure_template, restore

__all__ = [
    "MachineFactory",
    "require_accel",
    "require_device",
    "require_machine",
    "require_netdev",
]

_MACHINES_KEY = pytest.StashKey[list[Machine]]()
_NOTES_KEY = pytest.StashKey[dict[str, str]]()
#: How much console output a failure report shows.
_CONSOLE_TAIL = 4096
#: The async fixtures this plugin provides.
_FIXTURES = ("machine", "fresh_guest", "guest_template")
#: The fields of a clone's config that are not part of its template: the rest must match.
_CLONE_FIELDS = PER_MACHINE_FIELDS | {"fds"}

_NEEDS_PYTEST_TRIO = (
    "trio_qemu's `{}` fixture needs the pytest-trio plugin, which is not active: "
    "install it (pip install pytest-trio); with PYTEST_DISABLE_PLUGIN_AUTOLOAD set, also "
    "pass -p pytest_trio.plugin"
)


class MachineFactory(Protocol):
    """The ``machine`` fixture:
    ``await machine(config=None, *, guest=False, clone=False, **fields)``."""

    async def __call__(
        self,
        config: MachineConfig | None = None,
        /,
        *,
        guest: bool = False,
        clone: bool | Template = False,
        boot_timeout: float = 120.0,
        **fields: Any,
    ) -> Machine:
        """Launch a machine for this test; it is shut down when the test ends.

        Args:
            config: the configuration (``fields`` override it).
            guest: boot the tiny guest (``tiny_guest.config(...)``) and wait until its
                shell answers.
            clone: instead of booting, restore a copy-on-write clone. ``True``: of the
                template of ``config`` (default: the tiny guest's config) with ``fields``,
                per-machine fields (name, console_log, timeouts...: see
                :data:`~trio_qemu.snapshot.PER_MACHINE_FIELDS`) aside; the template is found
                in the cache or made there (one boot) the first time in the session.
                A :class:`~trio_qemu.snapshot.Template`: a clone of that one (``fields``
                may then change per-machine fields only; no ``config``).
            boot_timeout: how long the guest may take to answer, in seconds (for a clone:
                to be restored and synced).
            **fields: ``MachineConfig`` fields.

        Returns:
            The running machine.

        Raises:
            TemplateError: the clone's config does not match its template, the template
                could not be made, or the restore failed.
        """
        ...


class _Session:
    """What this process looks up once per session: the tiny guest (asking apt for its
    version takes seconds on a loaded machine) and the templates it found or made, per
    config and cache root. Async fixtures are function-scoped in pytest-trio, so the
    session's share lives here, at module level."""

    def __init__(self) -> None:
        self._guest: GuestImage | None = None
        self._templates: dict[tuple[MachineConfig, str], Template] = {}
        self._lock: trio.Lock | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def _lock_of_this_run(self) -> trio.Lock:
        # A trio.Lock belongs to one trio.run, and each test has its own.
        token = trio.lowlevel.current_trio_token()
        if self._lock is None or self._token is not token:
            self._lock, self._token = trio.Lock(), token
        return self._lock

    async def guest(self) -> GuestImage:
        """The tiny guest, from the cache or built now, the first time in the session."""
        if self._guest is None:
            self._guest = await ensure_guest()
        return self._guest

    async def template(self, config: MachineConfig) -> Template:
        """The template of ``config`` in the cache; made there if it is not yet."""
        root = str(default_cache_dir())
        key = (config, root)
        async with self._lock_of_this_run():
            template = self._templates.get(key)
            if template is not None:
                try:
                    template.verify()
                    return template
                except TemplateError:  # removed (template clear) or damaged since
                    del self._templates[key]
            template = await ensure_template(config, cache_dir=root)
            self._templates[key] = template
            return template


_SESSION = _Session()


def _split_clone(config: MachineConfig) -> tuple[MachineConfig, dict[str, Any]]:
    """The template's config (the per-machine fields at their defaults) and the clone's
    per-machine fields."""
    defaults = MachineConfig()
    names = sorted(_CLONE_FIELDS)
    template_config = config.replace(**{name: getattr(defaults, name) for name in names})
    return template_config, {name: getattr(config, name) for name in names}


async def _guest_config(
    config: MachineConfig | None, fields: dict[str, Any], qemu_binary: str
) -> MachineConfig:
    """``config`` (default: the tiny guest's) with ``fields``, booting the tiny guest's
    kernel when it names none, on the ``qemu_binary`` unless it names one."""
    image = await _SESSION.guest()
    config = (config or image.config()).replace(**fields)
    if config.kernel is None:
        config = config.replace(kernel=str(image.kernel), initrd=str(image.initrd))
    return _with_binary(config, qemu_binary)


def _with_binary(config: MachineConfig, qemu_binary: str) -> MachineConfig:
    if config.binary is None and "QEMU" not in os.environ:
        return config.replace(binary=qemu_binary)
    return config


def _pytest_trio_active(config: pytest.Config) -> bool:
    """Whether pytest-trio is registered (by its entry point or by ``-p pytest_trio.plugin``)."""
    return any(
        getattr(plugin, "__name__", None) == "pytest_trio.plugin"
        for plugin in config.pluginmanager.get_plugins()
    )


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
    shell; ``clone=True`` restores a clone of its template instead (``clone=template``: of
    that template); ``config``/``fields`` otherwise go to ``open_machine``'s rules. The
    binary from ``qemu_binary`` is used unless the config names one.
    """
    machines: list[Machine] = []
    notes: dict[str, str] = {}
    request.node.stash[_MACHINES_KEY] = machines
    request.node.stash[_NOTES_KEY] = notes
    # A machine that fails raises into this nursery: that cancels the test (through
    # pytest-trio) and the failure comes out of this fixture; pytest_runtest_call below
    # folds it together with the test's own copy of the same failure.
    async with trio.open_nursery() as nursery:

        async def factory(
            config: MachineConfig | None = None,
            /,
            *,
            guest: bool = False,
            clone: bool | Template = False,
            boot_timeout: float = 120.0,
            **fields: Any,
        ) -> Machine:
            if clone is not False:
                return await _clone(config, clone, boot_timeout, fields)
            if guest:
                config = await _guest_config(config, fields, qemu_binary)
            else:
                config = _with_binary((config or MachineConfig()).replace(**fields), qemu_binary)
            vm = await start_machine(nursery, config)
            machines.append(vm)
            if guest:
                await vm.shell.wait_ready(timeout=boot_timeout)
            return vm

        async def _clone(
            config: MachineConfig | None,
            clone: bool | Template,
            boot_timeout: float,
            fields: dict[str, Any],
        ) -> Machine:
            if isinstance(clone, Template):
                if config is not None:
                    raise TypeError("machine(clone=template) takes no config: the template's")
                template, clone_fields = clone, fields
            elif clone is True:
                full = await _guest_config(config, fields, qemu_binary)
                template_config, clone_fields = _split_clone(full)
                template = await _SESSION.template(template_config)
            else:
                raise TypeError(f"clone must be True, False or a Template, not {clone!r}")
            clone_config = template.config(**clone_fields)  # a mismatch raises here
            template.verify()
            vm = await start_machine(nursery, clone_config)
            machines.append(vm)
            notes[vm.name] = f"clone of template {template.key} ({template.path})"
            await restore(vm, template, timeout=boot_timeout)
            return vm

        try:
            yield factory
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stoppers:
                    for vm in machines:
                        stoppers.start_soon(_stop, vm, notes)


@pytest.fixture
async def guest_template(qemu_binary: str) -> Template:
    """The template of the tiny guest (``tiny_guest.config()``) that ``fresh_guest`` clones:
    from the cache, or made there (one boot) the first time in the session."""
    config = await _guest_config(None, {}, qemu_binary)
    return await _SESSION.template(config)


@pytest.fixture
async def fresh_guest(machine: MachineFactory) -> Machine:
    """A running copy-on-write clone of the tiny guest for this test, its shell answering
    (``await machine(clone=True)``); shut down when the test ends."""
    return await machine(clone=True)


async def _stop(vm: Machine, notes: dict[str, str]) -> None:
    try:
        await vm.shutdown()
    except Exception as exc:  # the test's own outcome matters more; say what happened
        earlier = notes.get(vm.name)
        notes[vm.name] = f"{earlier}\nshutdown: {exc}" if earlier else f"shutdown: {exc}"


# --- skips for what QEMU lacks ---------------------------------------------------------------

#: The skip markers, and the kind of capability each names.
_REQUIRE_MARKERS = {
    "require_accel": "accel",
    "require_device": "device",
    "require_machine": "machine",
    "require_netdev": "netdev",
}


def _require(kind: str, names: tuple[str, ...], binary: str | None) -> None:
    __tracebackhide__ = True
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"require_{kind} takes one or more names (str), not {names!r}")
    problem = None
    try:
        capabilities = capabilities_blocking(binary)
    except MachineError as exc:
        problem = str(exc)  # failed below, outside the except: no chain in the report
    if problem is not None:
        pytest.fail(f"cannot ask QEMU what it supports: {problem}", pytrace=False)
    for name in names:
        reason = capabilities.missing(kind, name)
        if reason is not None:
            pytest.skip(reason)


def require_accel(*names: str, binary: str | None = None) -> None:
    """Skip the calling test unless each accelerator of ``names`` is built into QEMU and
    usable here (``"kvm"`` also needs :func:`~trio_qemu.kvm_usable`).

    ``binary`` is the QEMU to ask (None: ``$QEMU``, else ``qemu-system-x86_64``); it is
    asked once per session (:func:`~trio_qemu.qemu_capabilities`). A QEMU that cannot be
    started fails the test instead.
    """
    __tracebackhide__ = True
    _require("accel", names, binary)


def require_device(*names: str, binary: str | None = None) -> None:
    """Skip the calling test unless QEMU has each device type of ``names``
    (``-device`` names, e.g. ``"virtio-gpu-pci"``); ``binary`` as for
    :func:`require_accel`."""
    __tracebackhide__ = True
    _require("device", names, binary)


def require_machine(*names: str, binary: str | None = None) -> None:
    """Skip the calling test unless QEMU has each machine type of ``names`` (or an alias:
    ``"q35"``, ``"microvm"``); ``binary`` as for :func:`require_accel`."""
    __tracebackhide__ = True
    _require("machine", names, binary)


def require_netdev(*names: str, binary: str | None = None) -> None:
    """Skip the calling test unless QEMU has each ``-netdev`` backend of ``names``
    (``"user"``, ``"tap"``, ``"stream"``...); ``binary`` as for :func:`require_accel`."""
    __tracebackhide__ = True
    _require("netdev", names, binary)


def pytest_configure(config: pytest.Config) -> None:
    """Register the skip markers (``--strict-markers`` knows them)."""
    for marker, kind in _REQUIRE_MARKERS.items():
        config.addinivalue_line(
            "markers",
            f"{marker}(*names, binary=None): skip the test unless QEMU has each {kind} "
            f"of names (trio_qemu.pytest_plugin.{marker})",
        )


def _skip_unless_capable(item: pytest.Item) -> None:
    """Honour the ``require_*`` markers of ``item``."""
    __tracebackhide__ = True
    for marker_name, kind in _REQUIRE_MARKERS.items():
        for marker in item.iter_markers(marker_name):
            unknown = set(marker.kwargs) - {"binary"}
            if unknown:
                pytest.fail(
                    f"@pytest.mark.{marker_name} takes names and binary=, not "
                    f"{', '.join(sorted(unknown))}",
                    pytrace=False,
                )
            names = marker.args
            if not names or not all(isinstance(name, str) and name for name in names):
                pytest.fail(
                    f"@pytest.mark.{marker_name} takes one or more names (str), not {names!r}",
                    pytrace=False,
                )
            _require(kind, tuple(names), marker.kwargs.get("binary"))


# --- running the tests ----------------------------------------------------------------------


def _async_fixture(item: pytest.Item) -> str | None:
    """The first of this plugin's async fixtures ``item`` uses, if any."""
    names = getattr(item, "fixturenames", ())
    return next((name for name in _FIXTURES if name in names), None)


def _uses_machine(item: pytest.Item) -> bool:
    return _async_fixture(item) is not None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every ``async def`` test using one of this plugin's async fixtures as a Trio
    test (as ``trio_mode`` would)."""
    if not _pytest_trio_active(config):
        return  # pytest_runtest_setup says why such a test cannot run
    for item in items:
        if not _uses_machine(item) or item.get_closest_marker("trio") is not None:
            continue
        func = getattr(item, "obj", None)
        inner = getattr(getattr(func, "hypothesis", None), "inner_test", None)
        if inspect.iscoroutinefunction(inner or func):
            item.add_marker(pytest.mark.trio)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test whose ``require_*`` markers QEMU does not meet. Fail a test that uses an
    async fixture of this plugin with a clear message when it cannot run: pytest-trio is
    missing, or the test is not ``async def``."""
    _skip_unless_capable(item)
    fixture = _async_fixture(item)
    if fixture is None:
        return
    if not _pytest_trio_active(item.config):
        pytest.fail(_NEEDS_PYTEST_TRIO.format(fixture), pytrace=False)
    if item.get_closest_marker("trio") is None:
        pytest.fail(
            f"{item.name} uses trio_qemu's `{fixture}` fixture, which is async: "
            "make it an `async def` test",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Report a machine's failure once, as itself.

    pytest-trio raises an ExceptionGroup when the test and a fixture both fail: a VM that
    dies mid-test ends the test with a copy of its error (e.g. ``MachineExited`` from a
    ``shell.run``) and the ``machine`` fixture with the original. Copies of one failure are
    folded into one; a lone error is raised bare. A skip keeps its reason (see
    :func:`_with_reason`).
    """
    __tracebackhide__ = True
    try:
        return (yield)
    except pytest.skip.Exception as skip:
        raise _with_reason(skip) from None
    except MachineExited as exc:
        if not _uses_machine(item):
            raise
        _drop_chain(exc)
        raise
    except BaseExceptionGroup as group:
        if not _uses_machine(item):
            raise
        simpler = _fold(group, test_file=str(getattr(item, "path", "")))
    raise simpler


def _with_reason(skip: BaseException) -> BaseException:
    """The skip to report: pytest-trio (0.8) turns a ``pytest.skip(reason)`` inside an async
    test into a ``pytest.skip()`` with no reason, raised while it handles the group that
    holds the original; that original, when it is the group's only leaf."""
    group = skip.__context__
    if getattr(skip, "msg", None) or not isinstance(group, BaseExceptionGroup):
        return skip
    leaves = _leaves(group)
    if len(leaves) == 1 and isinstance(leaves[0], pytest.skip.Exception):
        return leaves[0]
    return skip


def _drop_chain(error: MachineExited) -> None:
    """QEMU died: that is the whole story. The internal chain behind the error (a reader's
    ConnectionResetError, BrokenResourceError, end-of-channel marker...) only hides it."""
    error.__cause__ = None
    error.__suppress_context__ = True


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


def _raised_in(error: BaseException, path: str) -> bool:
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            return True
        tb = tb.tb_next
    return False


def _fold(group: BaseExceptionGroup[BaseException], test_file: str) -> BaseException:
    """``group`` with the copies of each machine failure folded into one; its only leaf
    when one remains. Of several copies, the one raised through the test file is kept (its
    traceback shows where the test was). A group with no machine failure is left alone."""
    kept: dict[tuple[type[BaseException], str], BaseException] = {}
    others: list[BaseException] = []
    for leaf in _leaves(group):
        if not isinstance(leaf, MachineError):
            others.append(leaf)
            continue
        key = (type(leaf), str(leaf))
        if key not in kept or (
            _raised_in(leaf, test_file) and not _raised_in(kept[key], test_file)
        ):
            kept[key] = leaf
    if not kept:
        return group  # not a machine's failure: leave the test's own errors as they are
    for error in kept.values():
        if isinstance(error, MachineExited):
            _drop_chain(error)
    remaining = [*others, *kept.values()]
    if len(remaining) == 1:
        return remaining[0]
    if len(remaining) == len(_leaves(group)):
        return group
    return BaseExceptionGroup(group.message, remaining)


# --- failure reports --------------------------------------------------------------------------

# ECMA-48 / xterm control sequences: CSI (ESC [ or the 8-bit 0x9B), OSC, DCS, SOS, PM and APC
# strings (ended by BEL or ST), other ESC sequences (ESC, intermediates, final), then any
# C0/C1 control character left except tab and newline.
_ESCAPES = re.compile(
    r"""
    (?: \x1b\[ | \x9b ) [0-?]* [ -/]* [@-~]            # CSI ... final byte
    | (?: \x1b[\]PX^_] | [\x90\x98\x9d\x9e\x9f] )     # OSC, DCS, SOS, PM, APC strings
      [^\x07\x1b\x9c\n]* (?: \x07 | \x1b\\ | \x9c )?   # ... to BEL or ST (or the line's end)
    | \x1b [ -/]* [0-~]?                                # other ESC sequences
    | [\x00-\x08\x0b-\x1f\x7f-\x9f]                     # stray controls (\r included)
    """,
    re.VERBOSE,
)


def _strip_escapes(text: str) -> str:
    """``text`` without terminal control sequences and control characters (tab and newline
    stay; ``\\r\\n`` becomes ``\\n``), for showing a guest console in a plain-text report."""
    return _ESCAPES.sub("", text.replace("\r\n", "\n"))


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
        parts.append("--- console (tail) ---\n" + _strip_escapes(tail))
    parts.append("--- QEMU output ---\n" + (_strip_escapes(vm.log) or "(none)"))
    if vm.config.qmp:
        try:
            transcript = vm.qmp_client.transcript()
        except MachineError:  # no QMP connection was made
            transcript = None
        if transcript is not None:
            parts.append("--- last QMP messages ---\n" + "\n".join(transcript))
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
