"""Block jobs (mirror, commit, stream, backup, create...) followed through their events.

QEMU reports a job's life in ``JOB_STATUS_CHANGE`` events (``created -> running -> ready ->
waiting -> pending -> concluded -> null``; ``paused``/``standby`` when paused, ``aborting``
when it fails or is cancelled) and, for block jobs, ``BLOCK_JOB_READY``,
``BLOCK_JOB_COMPLETED`` (with the error, if any), ``BLOCK_JOB_ERROR`` and
``BLOCK_JOB_CANCELLED``. A :class:`Job` subscribes to those events *before* it learns where
the job stands, so nothing that happens in between is lost:

- ``vm.start_job(command, **args)`` subscribes, then sends the command (``async with``);
- ``vm.attach_job(job_id)`` (and ``vm.run_job(job_id)``) is for a job already started with
  ``vm.cmd(...)``, as iotests do: it subscribes, then asks ``query-jobs``; a job that has
  already finished and gone is found in the machine's unclaimed events (the
  ``BLOCK_JOB_COMPLETED`` or ``BLOCK_JOB_CANCELLED`` nobody has taken yet).

Events that arrived before the ``query-jobs`` reply are older than its answer: a status is
therefore only ever moved forward (``created < running/paused < ready/standby < waiting <
pending < aborting < concluded < null``), so a late event never takes a job back.

:meth:`Job.run` drives a job to its end: ``job-complete`` once it is ready (unless
``complete_on_ready=False``: then it returns at ready), ``job-finalize`` when it is pending
and was started with ``auto-finalize=false``, ``job-dismiss`` when it has concluded and was
started with ``auto-dismiss=false`` (after reading its error). It returns the final
:class:`JobInfo`, or raises :class:`~trio_qemu.JobError` with QEMU's text when the job
failed, was cancelled by someone else, or stopped on an I/O error. Whenever :meth:`Job.run`
or a block of ``start_job``/``attach_job`` ends with an exception (a timeout, a
cancellation, Ctrl-C, a failure), the job is cancelled (``job-cancel``, which forces it,
then ``job-dismiss`` if it waits for one) and waited for, within
:data:`JOB_CLEANUP_TIMEOUT` and shielded from the cancellation, so the machine is left
usable and without the job. A block that ends normally leaves a still running job alone.

Progress: :attr:`Job.state` is what the events said last; :meth:`Job.query` asks
``query-jobs`` (``current``/``total``). QEMU sends no event for progress, so ``run``'s
``on_progress`` callback is fed by polling ``query-jobs`` every ``progress_interval``
seconds while the job runs (only when asked for).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio
from qemu.qmp import ExecuteError

from .._errors import EventsDropped, MachineError, QMPConnectionClosed
from .._events import QMPEvent, Subscription
from .._util import protected_asynccontextmanager
from ._errors import JobError, JobTimeout
from ._monitor import Monitor, deadline_after, error_text

__all__ = [
    "JOB_CLEANUP_TIMEOUT",
    "JOB_EVENTS",
    "JOB_STATUSES",
    "JOB_TIMEOUT",
    "Job",
    "JobInfo",
    "attach_job",
    "query_jobs",
    "run_job",
    "start_job",
]

log = logging.getLogger("trio_qemu.block")

JOB_EVENTS: Final = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_CANCELLED",
)
"""The events a :class:`Job` follows."""

JOB_TIMEOUT: Final = 60.0
"""The default ``timeout`` (seconds) of :meth:`Job.run`, :meth:`Job.wait` and ``run_job``."""

JOB_CLEANUP_TIMEOUT: Final = 30.0
"""How long (seconds) cancelling a job and waiting for it to go may take after a failure,
a timeout or a cancellation; shielded from the cancellation."""

_RANK: Final = {
    "undefined": -1,
    "created": 0,
    "running": 1,
    "paused": 1,
    "ready": 2,
    "standby": 2,
    "waiting": 3,
    "pending": 4,
    "aborting": 5,
    "concluded": 6,
    "null": 7,
}
JOB_STATUSES: Final = tuple(status for status in _RANK if status != "undefined")
"""QEMU's job statuses, in the order a job goes through them (``null``: gone)."""

#: The statuses in which QEMU accepts job-cancel.
_CANCELLABLE: Final = frozenset({"created", "running", "paused", "ready", "standby", "pending"})
_ids = itertools.count(1)


@dataclass(frozen=True)
class JobInfo:
    """Where a job stands (or how it ended)."""

    id: str
    """The job's id."""
    type: str
    """What it does: ``mirror``, ``commit``, ``stream``, ``backup``, ``create``..."""
    status: str
    """QEMU's status (one of :data:`JOB_STATUSES`); ``null`` once the job is gone."""
    current: int = 0
    """Progress so far (``current-progress``; bytes for block jobs)."""
    total: int = 0
    """The work it expects in all (``total-progress``); it may grow while the job runs."""
    error: str | None = None
    """QEMU's error text, when the job failed."""
    statuses: tuple[str, ...] = ()
    """Every status change the events reported, in order."""

    @property
    def progress(self) -> float | None:
        """``current / total`` (None while ``total`` is 0)."""
        return self.current / self.total if self.total else None


def _dashed(fields: Mapping[str, object]) -> dict[str, object]:
    return {key.replace("_", "-"): value for key, value in fields.items()}


class Job:
    """One job on a machine, followed through its events. Get one from
    ``vm.start_job(...)`` or ``vm.attach_job(job_id)`` (both ``async with``).

    Its verbs (:meth:`pause`, :meth:`resume`, :meth:`complete`, :meth:`finalize`,
    :meth:`dismiss`, :meth:`set_speed`) raise :class:`~trio_qemu.JobError` with QEMU's text
    when QEMU refuses them (``Job 'job0' in state 'running' cannot accept command verb
    'complete'``).
    """

    def __init__(
        self,
        vm: Monitor,
        job_id: str,
        events: Subscription,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> None:
        self._vm = vm
        self._events = events
        #: the job's id
        self.id = job_id
        #: whether the job finalizes itself (else :meth:`run` sends ``job-finalize``)
        self.auto_finalize = auto_finalize
        #: whether QEMU dismisses it once concluded (else :meth:`run` sends ``job-dismiss``)
        self.auto_dismiss = auto_dismiss
        self._status = "undefined"
        self._statuses: list[str] = []
        self._type = ""
        self._current = 0
        self._total = 0
        self._error: str | None = None
        self._completed = False
        self._cancelled = False
        self._aborted = False
        self._stopped: dict[str, Any] | None = None
        self._sent: set[str] = set()
        self._cancel_requested = False

    def __repr__(self) -> str:
        return f"<Job {self.id!r} {self._type or '?'} {self._status}>"

    # -- state -----------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """The status last reported (``undefined`` before anything was heard)."""
        return self._status

    @property
    def state(self) -> JobInfo:
        """What the job's events (and the last :meth:`query`) said, without asking QEMU."""
        return JobInfo(
            id=self.id,
            type=self._type,
            status=self._status,
            current=self._current,
            total=self._total,
            error=self._error,
            statuses=tuple(self._statuses),
        )

    def _set_status(self, status: str) -> None:
        if _RANK.get(status, 1) < _RANK.get(self._status, -1):
            return  # older than what we know (see the module docstring)
        self._status = status
        if status in ("running", "ready"):
            self._stopped = None  # resumed after stopping on an error

    def _handle(self, event: QMPEvent) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "JOB_STATUS_CHANGE":
            if data.get("id") == self.id:
                status = str(data.get("status"))
                self._statuses.append(status)
                self._aborted = self._aborted or status == "aborting"
                self._set_status(status)
            return
        if name not in JOB_EVENTS or data.get("device") != self.id:
            return
        if "type" in data:
            self._type = str(data["type"])
        if "len" in data and "offset" in data:
            self._total, self._current = int(data["len"]), int(data["offset"])
        if name == "BLOCK_JOB_COMPLETED":
            self._completed = True
            if data.get("error"):
                self._error = str(data["error"])
        elif name == "BLOCK_JOB_CANCELLED":
            self._cancelled = True
        elif name == "BLOCK_JOB_ERROR" and data.get("action") == "stop":
            self._stopped = dict(data)

    def _apply(self, entry: Mapping[str, Any] | None) -> None:
        """Take in the job's ``query-jobs`` entry (None: QEMU has no such job)."""
        if entry is None:
            self._set_status("null")
            return
        self._type = str(entry.get("type", self._type))
        self._current = int(entry.get("current-progress", self._current))
        self._total = int(entry.get("total-progress", self._total))
        if entry.get("error"):
            self._error = str(entry["error"])
        self._set_status(str(entry.get("status")))

    def _pump(self) -> bool:
        """Handle the events already buffered; return whether some were dropped."""
        dropped = False
        while True:
            try:
                event = self._events.receive_nowait()
            except EventsDropped:
                dropped = True
                continue
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return dropped  # ClosedResourceError: after the block (query() still works)
            self._handle(event)

    async def query(self) -> JobInfo:
        """Ask QEMU (``query-jobs``) where the job stands; return it (``null``: gone)."""
        jobs = await self._vm.cmd("query-jobs")
        self._apply(next((job for job in jobs if job.get("id") == self.id), None))
        if self._pump():
            return await self.query()
        return self.state

    async def _next(self, deadline: float) -> bool:
        """Handle the next event (and any buffered after it); False once ``deadline`` passed."""
        with trio.move_on_at(deadline):
            try:
                event = await self._events.receive()
            except EventsDropped:
                await self.query()  # events were lost: learn the state again
                return True
            except trio.EndOfChannel:
                raise QMPConnectionClosed(
                    f"{self._vm.name}: the QMP connection closed while job {self.id!r} ran"
                ) from None
            except trio.ClosedResourceError:
                raise JobError(
                    f"{self._vm.name}: job {self.id!r} is followed only inside the async with "
                    "block that started or attached it",
                    job_id=self.id,
                    status=self._status,
                ) from None
            self._handle(event)
            if self._pump():
                await self.query()
            return True
        return False

    # -- verbs -----------------------------------------------------------------------------
    async def _verb(self, command: str, verb: str, arguments: Mapping[str, object]) -> None:
        try:
            await self._vm.cmd(command, arguments)
            self._sent.add(verb)
        except ExecuteError as exc:
            desc = error_text(exc)
            raise JobError(
                f"{self._vm.name}: job {self.id!r}: {command} refused: {desc}",
                job_id=self.id,
                status=self._status,
                desc=desc,
                verb=verb,
                command=command,
            ) from exc

    async def pause(self) -> None:
        """Pause the job (``job-pause``); its status becomes ``paused`` (``standby`` when
        ready) soon after (:meth:`wait` for it)."""
        await self._verb("job-pause", "pause", {"id": self.id})

    async def resume(self) -> None:
        """Resume a paused job (``job-resume``)."""
        await self._verb("job-resume", "resume", {"id": self.id})

    async def complete(self) -> None:
        """Tell a ready job to finish (``job-complete``: a mirror pivots to its target)."""
        await self._verb("job-complete", "complete", {"id": self.id})

    async def finalize(self) -> None:
        """Finalize a pending job started with ``auto-finalize=false`` (``job-finalize``)."""
        await self._verb("job-finalize", "finalize", {"id": self.id})

    async def dismiss(self) -> None:
        """Remove a concluded job started with ``auto-dismiss=false`` (``job-dismiss``)."""
        await self._verb("job-dismiss", "dismiss", {"id": self.id})

    async def set_speed(self, speed: int) -> None:
        """Limit a block job to ``speed`` bytes per second (0: no limit)."""
        await self._verb("block-job-set-speed", "set-speed", {"device": self.id, "speed": speed})

    async def cancel(self, *, timeout: float | None = JOB_TIMEOUT) -> JobInfo:
        """Cancel the job (``job-cancel``, which forces it: a ready mirror does not pivot),
        dismiss it when it waits for that, and wait until it is gone; return its last state.

        Raises:
            JobTimeout: it was not gone within ``timeout`` seconds.
        """
        if not await self._end(deadline_after(timeout)):
            raise self._timeout(timeout, "to be cancelled")
        return self.state

    # -- waiting -----------------------------------------------------------------------------
    async def wait(self, *statuses: str, timeout: float | None = JOB_TIMEOUT) -> JobInfo:
        """Wait until the job's status is one of ``statuses`` (e.g. ``"ready"``); return it.

        A status the job only passes through (``pending`` of a job that finalizes itself)
        counts when an event reports it after the call; the :class:`JobInfo` returned then
        has that status (the job may be further on by then).

        Raises:
            JobError: the job ended first (with its error when it failed).
            JobTimeout: not within ``timeout`` seconds; the job was cancelled.
        """
        for status in statuses:
            if status not in JOB_STATUSES:
                raise ValueError(f"{status!r} is not a job status ({', '.join(JOB_STATUSES)})")
        if not statuses:
            raise ValueError("give the status(es) to wait for, e.g. wait('ready')")
        deadline = deadline_after(timeout)
        seen = len(self._statuses)
        while self._status not in statuses:
            passed = next((s for s in self._statuses[seen:] if s in statuses), None)
            if passed is not None:
                return dataclasses.replace(self.state, status=passed)
            seen = len(self._statuses)
            self._raise_if_stopped()
            if self._status == "null":
                self._finished()
                raise JobError(
                    f"{self._vm.name}: job {self.id!r} ended before it was {' or '.join(statuses)}",
                    job_id=self.id,
                    status="null",
                )
            if not await self._next(deadline):
                await self._clean_up()
                raise self._timeout(timeout, f"to be {' or '.join(statuses)}")
        return self.state

    async def run(
        self,
        *,
        complete_on_ready: bool = True,
        timeout: float | None = JOB_TIMEOUT,
        on_progress: Callable[[JobInfo], object] | None = None,
        progress_interval: float = 1.0,
    ) -> JobInfo:
        """Drive the job to its end (see the module docstring); return its final state.

        Args:
            complete_on_ready: send ``job-complete`` once the job is ready; False: return
                as soon as it is ready (its status ``ready``), leaving it running.
            timeout: seconds for the whole run (None: no limit).
            on_progress: called with a fresh :class:`JobInfo` every ``progress_interval``
                seconds while the job runs (polling ``query-jobs``: QEMU sends no progress
                events).
            progress_interval: see ``on_progress``.

        Raises:
            JobError: the job failed (QEMU's error text), was cancelled by someone else,
                stopped on an I/O error, or refused a verb; it is gone when this is raised.
            JobTimeout: it did not end within ``timeout``; it was cancelled and waited for.
        """
        if progress_interval <= 0:
            raise ValueError(f"progress_interval must be > 0, not {progress_interval!r}")
        deadline = deadline_after(timeout)
        next_progress = trio.current_time() + progress_interval if on_progress else math.inf
        try:
            while True:
                self._raise_if_stopped()
                if self._status == "null":
                    return self._finished()
                if not complete_on_ready and self._status in ("ready", "standby"):
                    return self.state
                await self._advance(complete_on_ready)
                if self._status == "null":
                    continue
                if await self._next(min(deadline, next_progress)):
                    continue
                now = trio.current_time()
                if now >= deadline:
                    raise self._timeout(timeout, "to end")
                if on_progress is not None:
                    on_progress(await self.query())
                    next_progress = now + progress_interval
        except BaseException:
            await self._clean_up()
            raise

    async def _advance(self, complete_on_ready: bool) -> None:
        """Send what the job waits for in its current status, once."""
        status = self._status
        if status == "ready" and complete_on_ready and "complete" not in self._sent:
            await self._auto("job-complete", "complete")
        elif status == "pending" and not self.auto_finalize and "finalize" not in self._sent:
            await self._auto("job-finalize", "finalize")
        elif status == "concluded" and not self.auto_dismiss and "dismiss" not in self._sent:
            if self._error is None:
                await self.query()  # its error, before it is gone
            await self._auto("job-dismiss", "dismiss")

    async def _auto(self, command: str, verb: str) -> None:
        """A verb :meth:`run` sends itself: refused because the job moved on meanwhile is
        fine (the next event says where it went); refused in the same status is an error."""
        try:
            await self._verb(command, verb, {"id": self.id})
        except JobError:
            before = self._status
            await self.query()
            if self._status == before:
                raise

    def _raise_if_stopped(self) -> None:
        if self._stopped is None:
            return
        operation = self._stopped.get("operation", "I/O")
        raise JobError(
            f"{self._vm.name}: job {self.id!r} ({self._type or 'block job'}) stopped on a "
            f"{operation} error (BLOCK_JOB_ERROR, action 'stop', as its error policy says)",
            job_id=self.id,
            status=self._status,
            desc=f"{operation} error",
        )

    def _finished(self) -> JobInfo:
        """The job is gone: its final state, or the JobError saying how it failed."""
        what = f"{self._vm.name}: job {self.id!r} ({self._type or 'job'})"
        if self._error is not None and not self._cancel_requested:
            raise JobError(
                f"{what} failed: {self._error}", job_id=self.id, status="null", desc=self._error
            )
        if (self._cancelled or self._aborted) and not self._cancel_requested:
            if self._cancelled:
                reason, desc = "was cancelled (not by this job's owner)", "Operation canceled"
            else:
                reason, desc = (
                    "failed, and QEMU dismissed it before its error could be read (start it "
                    "with auto_dismiss=False to get QEMU's text)",
                    "",
                )
            raise JobError(f"{what} {reason}", job_id=self.id, status="null", desc=desc)
        return self.state

    def _timeout(self, timeout: float | None, what: str) -> JobTimeout:
        return JobTimeout(
            f"{self._vm.name}: job {self.id!r} ({self._type or 'job'}) waited {timeout} s "
            f"{what} (it was {self._status}, {self._current} of {self._total}); "
            "it was cancelled",
            job_id=self.id,
            status=self._status,
        )

    # -- clean-up --------------------------------------------------------------------------
    async def _end(self, deadline: float) -> bool:
        """Cancel the job, dismiss it when it waits for that, and wait until it is gone;
        return whether it is (False: ``deadline`` passed first)."""
        self._cancel_requested = True
        await self.query()
        while self._status != "null":
            status = self._status
            try:
                if status in _CANCELLABLE and "cancel" not in self._sent:
                    await self._verb("job-cancel", "cancel", {"id": self.id})
                elif status == "concluded" and "dismiss" not in self._sent:
                    if self._error is None:
                        await self.query()
                    await self._verb("job-dismiss", "dismiss", {"id": self.id})
            except JobError as exc:
                log.debug("%s: while ending job %r: %s", self._vm.name, self.id, exc)
                self._sent.add(exc.verb or "")  # tried once: do not ask again
                await self.query()
                continue
            if self._status == status and not await self._next(deadline):
                return False
        return True

    async def _clean_up(self) -> None:
        """After a failure: cancel the job and wait for it to go, shielded and bounded by
        :data:`JOB_CLEANUP_TIMEOUT`. Never raises (a machine that is gone has no jobs)."""
        if self._status == "null":
            return
        with trio.CancelScope(shield=True):
            try:
                if not await self._end(deadline_after(JOB_CLEANUP_TIMEOUT)):
                    log.warning(
                        "%s: job %r still exists %s s after it was cancelled",
                        self._vm.name, self.id, JOB_CLEANUP_TIMEOUT,
                    )  # fmt: skip
            except MachineError as exc:
                log.debug("%s: cleaning up job %r: %r", self._vm.name, self.id, exc)

    async def _claim_cached(self) -> list[QMPEvent]:
        """Take this job's events out of the machine's unclaimed events; return those of
        its last run (after the previous job of the same id ended), oldest first."""
        pairs = [
            ("JOB_STATUS_CHANGE", {"data": {"id": self.id}}),
            *((name, {"data": {"device": self.id}}) for name in JOB_EVENTS[1:]),
        ]
        claimed: list[QMPEvent] = []
        with trio.CancelScope(shield=True):
            while True:
                try:
                    claimed.append(await self._vm.events_wait(pairs, timeout=0))
                except MachineError:  # none left (QMPTimeout), or the monitor is gone
                    break
        # Split into runs, each ending at its "null" (a later job may reuse the id).
        runs: list[list[QMPEvent]] = [[]]
        for event in claimed:
            runs[-1].append(event)
            if (event.get("data") or {}).get("status") == "null":
                runs.append([])
        return next((run for run in reversed(runs) if run), [])

    async def _attach(self) -> None:
        """Learn where a job started by someone else stands (subscribed already)."""
        await self.query()
        if self._status != "null":
            # For a block job QEMU says how it was started: that wins over the caller's word.
            for entry in await self._vm.cmd("query-block-jobs"):
                if entry.get("device") == self.id:
                    self.auto_finalize = bool(entry.get("auto-finalize", self.auto_finalize))
                    self.auto_dismiss = bool(entry.get("auto-dismiss", self.auto_dismiss))
            return
        cached = await self._claim_cached()  # the whole record of its last run
        if cached:
            self._statuses = []
            for event in cached:
                self._handle(event)
        if not (self._statuses or self._completed or self._cancelled):
            raise JobError(
                f"{self._vm.name}: no job {self.id!r}: query-jobs does not list it and no "
                "event about it was received",
                job_id=self.id,
            )


@protected_asynccontextmanager
async def _owned(job: Job) -> AsyncIterator[Job]:
    """The job for the caller's block: cancelled and waited for if the block raises."""
    try:
        yield job
    except BaseException:
        await job._clean_up()
        raise
    finally:
        if job.status == "null":
            await job._claim_cached()  # consumed: a later job of the same id starts clean


@protected_asynccontextmanager
async def start_job(
    vm: Monitor, command: str, /, *, timeout: float | None = None, **args: Any
) -> AsyncIterator[Job]:
    """Subscribe to the job's events, then start it with ``command`` (``blockdev-mirror``,
    ``block-commit``, ``block-stream``, ``blockdev-backup``, ``blockdev-create``...).

    ``args`` are the command's arguments, ``_`` turned into ``-`` (``job_id="m0"``,
    ``sync="full"``, ``auto_finalize=False``); without ``job_id`` one is made up. The job
    knows from them whether it must finalize and dismiss itself. ``timeout`` is the start
    command's (default: the machine's QMP timeout).

    Raises:
        JobError: QEMU refused to start it ("Cannot find device='nope' nor
            node-name='nope'", "Node 'src' is busy: block device is in use by block job:
            mirror").
    """
    arguments = _dashed(args)
    job_id = arguments.setdefault("job-id", f"trio-job{next(_ids)}")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id must be a non-empty str, not {job_id!r}")
    with vm.subscribe(*JOB_EVENTS) as events:
        job = Job(
            vm,
            job_id,
            events,
            auto_finalize=bool(arguments.get("auto-finalize", True)),
            auto_dismiss=bool(arguments.get("auto-dismiss", True)),
        )
        try:
            await vm.cmd(command, arguments, timeout=timeout)
        except ExecuteError as exc:
            desc = error_text(exc)
            raise JobError(
                f"{vm.name}: {command} refused to start job {job_id!r}: {desc}",
                job_id=job_id,
                desc=desc,
                verb=command,
                command=command,
            ) from exc
        except BaseException:  # no reply (a timeout, a cancel): QEMU may have started it
            await job._clean_up()
            raise
        await job.query()  # its type and progress (events that came meanwhile are kept)
        async with _owned(job):
            yield job


@protected_asynccontextmanager
async def attach_job(
    vm: Monitor, job_id: str, *, auto_finalize: bool = True, auto_dismiss: bool = True
) -> AsyncIterator[Job]:
    """Follow a job someone else started (``vm.cmd("blockdev-mirror", job_id=...)``).

    ``auto_finalize`` and ``auto_dismiss`` say how it was started (``auto-finalize``,
    ``auto-dismiss``; QEMU's default is True); for a block job QEMU's own flags
    (``query-block-jobs``) win. The job may already be ready, or done and gone: nothing it
    did since it started is missed (see the module docstring).

    Raises:
        JobError: QEMU has no such job and no event of its end was received.
    """
    with vm.subscribe(*JOB_EVENTS) as events:
        job = Job(vm, job_id, events, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        await job._attach()
        async with _owned(job):
            yield job


async def run_job(
    vm: Monitor,
    job_id: str,
    *,
    complete_on_ready: bool = True,
    auto_finalize: bool = True,
    auto_dismiss: bool = True,
    timeout: float | None = JOB_TIMEOUT,
    on_progress: Callable[[JobInfo], object] | None = None,
    progress_interval: float = 1.0,
) -> JobInfo:
    """:func:`attach_job` then :meth:`Job.run`: drive a job started with ``vm.cmd(...)`` to
    its end and return its final state (see those two for the arguments and errors)."""
    async with attach_job(
        vm, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss
    ) as job:
        return await job.run(
            complete_on_ready=complete_on_ready,
            timeout=timeout,
            on_progress=on_progress,
            progress_interval=progress_interval,
        )


async def query_jobs(vm: Monitor, *, timeout: float | None = None) -> list[JobInfo]:
    """Every job QEMU has now (``query-jobs``)."""
    return [
        JobInfo(
            id=str(job.get("id")),
            type=str(job.get("type", "")),
            status=str(job.get("status")),
            current=int(job.get("current-progress", 0)),
            total=int(job.get("total-progress", 0)),
            error=job.get("error"),
        )
        for job in await vm.cmd("query-jobs", timeout=timeout)
    ]
