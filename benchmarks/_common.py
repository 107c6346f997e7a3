"""Shared helpers for the benchmarks (not part of the package).

- :func:`running_qemu` starts ``qemu-system-x86_64 -machine none`` with one or more QMP
  monitors, each on a socketpair (no paths, no ports), and kills it by pid on the way out.
- :func:`interleave` runs the variants of a comparison in rounds (every variant once per
  round, the order reversed every other round) after uncounted warm-up rounds, so a machine
  whose load drifts during a run disturbs every variant alike; :func:`paired_ratio` is the
  median over rounds of the ratio of two variants measured in the same round.
- :func:`median`, :func:`ratio`, :func:`print_table` and :func:`print_ratios` print results.
- :func:`write_results` saves them as ``benchmarks/results/<name>.json`` (or in
  ``$TRIO_QEMU_BENCH_RESULTS`` when that is set: ``run_all.py --keep-results`` uses it).
- :func:`quiet_logging` puts every logger at WARNING, so no client pays for debug output.
- :func:`peer_process` runs one of :mod:`_peers`' fast peers in a process of its own on a
  socketpair, and ends it by pid on the way out.
- :func:`rss_bytes`, :func:`cpu_model`, :func:`loadavg`, :func:`accelerator` and
  :func:`git_state` describe the machine, the code and the run; :func:`environment` records
  them with every result.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BASE_ARGS",
    "RESULTS_DIR",
    "QemuProcess",
    "accelerator",
    "cpu_model",
    "environment",
    "git_state",
    "interleave",
    "interleave_note",
    "loadavg",
    "median",
    "paired_ratio",
    "peer_process",
    "print_ratios",
    "print_table",
    "qemu_binary",
    "quiet_logging",
    "ratio",
    "rss_bytes",
    "running_qemu",
    "write_results",
]

RESULTS_DIR = Path(
    os.environ.get("TRIO_QEMU_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "_peers.py"

#: ``-machine none``: no guest, no devices; QMP answers ~25 ms after start.
BASE_ARGS = ("-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg")


def qemu_binary() -> str:
    """``$TRIO_QEMU_BENCH_QEMU`` or ``qemu-system-x86_64`` from ``PATH``."""
    name = os.environ.get("TRIO_QEMU_BENCH_QEMU", "qemu-system-x86_64")
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"benchmark needs {name} on PATH")
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL the child if we die without reaching our ``finally``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class QemuProcess:
    """A running QEMU and our ends of its monitor socketpairs (one per monitor)."""

    proc: subprocess.Popen[bytes]
    monitors: list[socket.socket]
    argv: list[str]
    _stderr: Any = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def take_monitor(self) -> socket.socket:
        """Hand over the next unused monitor socket (the caller owns and closes it)."""
        if not self.monitors:
            raise RuntimeError("no unused monitor left; start QEMU with more monitors")
        return self.monitors.pop(0)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        data: bytes = self._stderr.read()
        return data.decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL by pid, reap, close our unused sockets. Safe to call twice."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for sock in self.monitors:
            sock.close()
        self.monitors.clear()
        self._stderr.close()


def start_qemu(monitors: int = 1, extra_args: Sequence[str] = ()) -> QemuProcess:
    """Start a ``-machine none`` QEMU with ``monitors`` QMP monitors on socketpairs.

    QEMU keeps running when a monitor peer hangs up: always :meth:`QemuProcess.kill` it
    (or use :func:`running_qemu`).
    """
    if monitors < 1:
        raise ValueError("need at least one monitor")
    argv = [qemu_binary(), *BASE_ARGS]
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    try:
        for i in range(monitors):
            mine, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.append(mine)
            theirs.append(child)
            argv += [
                "-chardev", f"socket,id=mon{i},fd={child.fileno()}",
                "-mon", f"chardev=mon{i},mode=control",
            ]  # fmt: skip
        argv += list(extra_args)
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as QEMU
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=[s.fileno() for s in theirs],
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            stderr.close()
            raise
    except BaseException:
        for sock in ours:
            sock.close()
        raise
    finally:
        for sock in theirs:
            sock.close()
    return QemuProcess(proc, ours, argv, stderr)


@contextmanager
def running_qemu(monitors: int = 1, extra_args: Sequence[str] = ()) -> Iterator[QemuProcess]:
    """:func:`start_qemu`, killed by pid in ``finally``; an early exit is reported."""
    qemu = start_qemu(monitors, extra_args)
    try:
        yield qemu
    except BaseException:
        if qemu.proc.poll() is not None:
            print(
                f"QEMU (pid {qemu.pid}) exited with {qemu.proc.returncode}:\n{qemu.stderr_text()}",
                file=sys.stderr,
            )
        raise
    finally:
        qemu.kill()


def quiet_logging() -> None:
    """WARNING for the root logger and for every client's logger alike."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("", "qemu", "qemu.qmp", "trio_qemu", "asyncio", "trio"):
        logging.getLogger(name).setLevel(logging.WARNING)


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def interleave(
    keys: Sequence[K],
    rounds: int,
    run: Callable[[K], T],
    *,
    warmup: int = 1,
    warmup_run: Callable[[K], object] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[K, list[T]]:
    """Run every variant once per round, ``rounds`` times, after ``warmup`` uncounted rounds.

    The order is ``keys`` in even rounds and reversed in odd ones (A B C, C B A, A B C, ...),
    so over any two rounds every variant has the same mean position: a load that drifts
    during the run (other work on the machine) falls on every variant alike, and variants
    measured in the same round saw about the same machine (see :func:`paired_ratio`).
    Warm-up rounds (page cache, imports, first connections) use ``warmup_run`` when given
    (e.g. a smaller size), else ``run``. Returns the counted results per key, in round
    order: index ``i`` of every list comes from round ``i``.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError("need rounds >= 1 and warmup >= 0")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate variant keys: {keys!r}")
    out: dict[K, list[T]] = {key: [] for key in keys}
    for index in range(warmup + rounds):
        counted = index >= warmup
        order = list(keys) if (index - warmup) % 2 == 0 else list(reversed(keys))
        if say is not None:
            what = f"round {index - warmup + 1}/{rounds}" if counted else (
                f"warm-up round {index + 1}/{warmup} (not counted)")  # fmt: skip
            say(f"  {what}: {', '.join(map(str, order))}")
        for key in order:
            if counted:
                out[key].append(run(key))
            else:
                (warmup_run or run)(key)
    return out


def interleave_note(rounds: int, warmup: int = 1, paired: bool = True) -> str:
    """How :func:`interleave` ran the variants, for a benchmark's output and results."""
    text = (
        f"interleaved: {rounds} round(s) running every variant once, order reversed every "
        f"other round, after {warmup} uncounted warm-up round(s)"
    )
    if paired:
        text += "; a ratio is the median over rounds of the ratio within a round"
    return text


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` (both measured in round ``i``, back to back).

    Pairs with a missing or zero value are skipped; NaN when none is left.
    """
    if len(a) != len(b):
        raise ValueError(f"unpaired samples: {len(a)} against {len(b)}")
    values = [x / y for x, y in zip(a, b, strict=True) if y and math.isfinite(x / y)]
    return median(values) if values else float("nan")


def print_table(rows: Sequence[tuple[str, float, Sequence[float]]], unit: str = "ops/s") -> None:
    """One line per ``(label, median, runs)``."""
    width = max(len(label) for label, _, _ in rows)
    for label, med, runs in rows:
        spread = f"min {min(runs):,.0f}  max {max(runs):,.0f}" if runs else ""
        print(f"  {label:<{width}}  {med:>12,.0f} {unit}   ({spread})")


def print_ratios(pairs: Mapping[str, float]) -> None:
    width = max(len(label) for label in pairs)
    for label, value in pairs.items():
        print(f"  {label:<{width}}  {value:6.2f}x")


@contextmanager
def peer_process(
    kind: str, *args: object
) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """Start ``_peers.py KIND FD ARGS...`` on a socketpair; yield it and our end.

    On the way out our end is closed (the peer sees EOF and exits), the peer gets 5 s to
    exit, and is SIGKILLed by pid otherwise. Its stdout is a pipe (read it before leaving).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(PEERS), kind, str(theirs.fileno()), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=[theirs.fileno()],
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        yield proc, ours
    finally:
        ours.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of ``pid`` (default: this process) from ``/proc``, or 0."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (else the platform's processor)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how disturbed the machine was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def accelerator() -> str | None:
    """What ``accel="auto"`` picks here (``kvm`` only where KVM really works, else ``tcg``)."""
    from trio_qemu import resolve_accel

    return resolve_accel("auto")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """The commit measured (``git rev-parse --short HEAD``) and whether the tree was dirty.

    ``dirty_paths`` lists what ``git status --porcelain`` shows (tracked changes and
    untracked files); ``library_dirty`` says whether any of them is under ``trio_qemu/``.
    """
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "library_dirty": None, "dirty_paths": []}
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {
        "commit": head or None,
        "dirty": bool(paths),
        "library_dirty": any(p.startswith("trio_qemu/") for p in paths),
        "dirty_paths": paths,
    }  # fmt: skip


def environment() -> dict[str, Any]:
    """Where the numbers come from."""
    try:
        out = subprocess.run(
            [qemu_binary(), "--version"], capture_output=True, text=True, check=True
        ).stdout
        qemu_version = out.splitlines()[0] if out else None
    except (OSError, subprocess.CalledProcessError):
        qemu_version = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
        "accel_auto": accelerator(),
        "qemu": qemu_version,
        "trio": _version("trio"),
        "qemu.qmp": _version("qemu.qmp"),
        "trio-qemu": _version("trio-qemu"),
        "git": {k: v for k, v in git_state().items() if k != "dirty_paths"},
    }


def write_results(name: str, data: Mapping[str, Any]) -> Path:
    """Write ``data`` (plus :func:`environment`) to ``benchmarks/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
