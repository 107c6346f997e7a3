"""Running the Debian tools: which packages to use, their versions, downloading and unpacking.

The guest is built from Debian packages without installing anything on the host:
``apt-cache show`` names the packages and their candidate versions (which go into the cache
keys), ``apt-get download`` fetches the ``.deb`` files, and ``dpkg-deb --fsys-tarfile`` piped
into ``tar -x`` extracts only the members a build needs. Every failure becomes a
:class:`~trio_qemu.GuestBuildError` that says how to boot a kernel of one's own instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import trio

from .._errors import GuestBuildError
from .image import _OWN_KERNEL_HINT, _Reporter

__all__ = [
    "AGENT_LIBRARY_PACKAGES",
    "AGENT_PACKAGE",
    "BUSYBOX_PACKAGE",
    "KERNEL_META_PACKAGE",
]

KERNEL_META_PACKAGE: Final = "linux-image-amd64"
"""The Debian meta package whose dependency names the versioned kernel package."""

BUSYBOX_PACKAGE: Final = "busybox-static"
"""The Debian package the guest's userland comes from (one static binary)."""

AGENT_PACKAGE: Final = "qemu-guest-agent"
"""The Debian package ``qemu-ga`` comes from (for ``agent=True``)."""

AGENT_LIBRARY_PACKAGES: Final = (
    "libc6",
    "libglib2.0-0",
    "libnuma1",
    "libudev1",
    "liburing2",
    "libpcre2-8-0",
)
"""The Debian packages holding the libraries ``qemu-ga`` loads; the agent variant takes them
from here rather than from the host, so its contents follow the versions in its cache key."""

#: Bytes of a failing tool's stderr kept for the error message.
_STDERR_TAIL = 4000
#: The environment the tools run with (added to ours): messages we can parse.
_ENV: Final = {"LC_ALL": "C"}


@dataclass(frozen=True)
class _Package:
    """A Debian package: name, version (empty until resolved) and download size in bytes."""

    name: str
    version: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.size / 1e6:.1f} MB)"


def _tool_error(
    what: str, exc: BaseException | None = None, stderr: bytes = b""
) -> GuestBuildError:
    """A GuestBuildError for a failed tool, with its output and the way out."""
    detail = f": {exc}" if exc is not None else ""
    if stderr:
        detail += "\n  its output:\n    " + "\n    ".join(
            stderr.decode("utf-8", "replace")[-_STDERR_TAIL:].rstrip().splitlines()
        )
    return GuestBuildError(f"{what}{detail}\n  {_OWN_KERNEL_HINT}")


async def _run(
    argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> bytes:
    """Run a tool to completion; return its stdout; raise GuestBuildError on failure.

    ``env`` adds to (and overrides) the environment."""
    try:
        result = await trio.run_process(
            list(argv),
            cwd=cwd,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_ENV, **(env or {})},
        )
    except FileNotFoundError as exc:
        raise _tool_error(
            f"{argv[0]} is not installed (the tiny guest is built from Debian packages)", exc
        ) from exc
    except OSError as exc:
        raise _tool_error(f"cannot run {argv[0]}", exc) from exc
    if result.returncode != 0:
        raise _tool_error(
            f"{' '.join(argv)} failed with exit status {result.returncode}",
            stderr=result.stderr,
        )
    return result.stdout


def _stanzas(text: str) -> list[dict[str, str]]:
    """Parse ``apt-cache show`` output (RFC 822 stanzas) into dicts (continuations dropped)."""
    stanzas: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


async def _resolve_packages() -> tuple[_Package, _Package]:
    """The versioned kernel package behind the meta package, and busybox-static.

    One ``apt-cache show`` call (about 0.4 s) in the usual case: Debian's meta package
    depends on exactly one version (``=``) of the kernel package. Sizes are filled in by
    :func:`_with_sizes` only when a build needs them.
    """
    text = await _run(
        ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE, BUSYBOX_PACKAGE]
    )
    stanzas = {s.get("Package", ""): s for s in _stanzas(text.decode("utf-8", "replace"))}
    kernel: _Package | None = None
    for dependency in re.split(r"[,|]", stanzas.get(KERNEL_META_PACKAGE, {}).get("Depends", "")):
        match = re.fullmatch(r"\s*(linux-image-\S+)\s*(?:\(\s*=\s*(\S+)\s*\))?\s*", dependency)
        if match:
            kernel = _Package(match.group(1), match.group(2) or "", 0)
            break
    if kernel is None:
        raise GuestBuildError(
            f"apt-cache knows no {KERNEL_META_PACKAGE} with a linux-image-* dependency "
            "(run apt-get update?). " + _OWN_KERNEL_HINT
        )
    busybox = _package_from(stanzas.get(BUSYBOX_PACKAGE))
    if busybox is None:
        raise GuestBuildError(
            f"apt-cache knows no candidate for {BUSYBOX_PACKAGE} (run apt-get update?). "
            + _OWN_KERNEL_HINT
        )
    if not kernel.version:
        (kernel,) = await _with_sizes([kernel])
    return kernel, busybox


def _package_from(stanza: dict[str, str] | None) -> _Package | None:
    """The package an ``apt-cache show`` stanza describes, or None if it is incomplete."""
    if stanza is None:
        return None
    try:
        return _Package(stanza["Package"], stanza["Version"], int(stanza.get("Size", 0)))
    except (KeyError, ValueError):
        return None


async def _with_sizes(packages: Sequence[_Package]) -> list[_Package]:
    """``packages`` with their candidate version and download size from ``apt-cache``."""
    text = await _run(["apt-cache", "show", "--no-all-versions", *(p.name for p in packages)])
    found: dict[str, _Package] = {}
    for stanza in _stanzas(text.decode("utf-8", "replace")):
        package = _package_from(stanza)
        if package is not None:
            found.setdefault(package.name, package)
    result = []
    for package in packages:
        known = found.get(package.name)
        if known is None:
            raise GuestBuildError(
                f"apt-cache knows no candidate for {package.name} (run apt-get update?). "
                + _OWN_KERNEL_HINT
            )
        if package.version and known.version != package.version:
            raise GuestBuildError(
                f"{KERNEL_META_PACKAGE} wants {package.name} {package.version} but apt's "
                f"candidate is {known.version}. " + _OWN_KERNEL_HINT
            )
        result.append(known)
    return result


async def _download(
    packages: Sequence[_Package], directory: Path, reuse: Path | None, report: _Reporter
) -> list[Path]:
    """The ``.deb`` of each package: from ``reuse`` if present there, else downloaded."""
    source = reuse if reuse is not None else directory
    _mkdir(source)
    wanted = {p: _deb_in(source, p) for p in packages}
    missing = [p for p, path in wanted.items() if path is None]
    if missing:
        if not all(p.size for p in missing):
            missing = await _with_sizes(missing)  # for the sizes in the progress line
        start = time.monotonic()
        report("downloading " + " and ".join(p.label for p in missing))
        await _run(["apt-get", "download", *(f"{p.name}={p.version}" for p in missing)], cwd=source)
        report(f"downloaded in {report.since(start)}")
        wanted = {p: _deb_in(source, p) for p in packages}
    result = []
    for package, path in wanted.items():
        if path is None:
            raise GuestBuildError(f"apt-get download left no .deb for {package.label}")
        result.append(path)
    return result


def _deb_in(directory: Path, package: _Package) -> Path | None:
    """The ``.deb`` of ``package`` in ``directory`` (apt quotes ``:`` as ``%3a``)."""
    prefix = f"{package.name}_{package.version.replace(':', '%3a')}_"
    matches = sorted(directory.glob(f"{_glob_escape(prefix)}*.deb"))
    return matches[0] if matches else None


def _glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal (for :meth:`Path.glob`)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


async def _extract(deb: Path, into: Path, patterns: Sequence[str]) -> list[str]:
    """Extract the members of ``deb`` matching ``patterns`` into ``into``.

    ``dpkg-deb --fsys-tarfile`` feeds ``tar -x --wildcards`` through a pipe (two processes,
    no shell). Returns the patterns that matched nothing (tar's "Not found in archive");
    any other failure raises GuestBuildError.
    """
    _mkdir(into)
    read_end, write_end = os.pipe()
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    unpack = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    untar = ["tar", "-x", "--wildcards", "--no-same-owner", "-C", str(into), "-f", "-", *patterns]
    spawn_error: tuple[str, OSError] | None = None
    async with trio.open_nursery() as nursery:
        try:
            for name, argv, stdin, stdout in (
                ("dpkg-deb", unpack, subprocess.DEVNULL, write_end),
                ("tar", untar, read_end, subprocess.DEVNULL),
            ):
                try:
                    await nursery.start(
                        partial(_run_into, results, name, argv, stdin=stdin, stdout=stdout)
                    )
                except OSError as exc:  # raised outside the nursery: no exception group
                    spawn_error = (name, exc)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            # Only the children may hold the pipe now, so tar sees EOF when dpkg-deb ends
            # (and dpkg-deb a broken pipe if tar could not start).
            os.close(write_end)
            os.close(read_end)
    if spawn_error is not None:
        tool, error = spawn_error
        what = "is not installed" if isinstance(error, FileNotFoundError) else "cannot be run"
        raise _tool_error(f"{tool} {what}", error) from error
    tar, dpkg = results["tar"], results["dpkg-deb"]
    tar_errors = tar.stderr.decode("utf-8", "replace").splitlines()
    unmatched = [
        line.split(": ", 2)[1]
        for line in tar_errors
        if line.endswith("Not found in archive") and line.count(": ") >= 2
    ]
    real_errors = [
        line
        for line in tar_errors
        if not line.endswith("Not found in archive")
        and "Exiting with failure status due to previous errors" not in line
    ]
    if dpkg.returncode != 0 or real_errors or (tar.returncode != 0 and not unmatched):
        raise _tool_error(
            f"extracting {deb.name} failed (dpkg-deb exit status {dpkg.returncode}, "
            f"tar exit status {tar.returncode})",
            stderr=dpkg.stderr + tar.stderr,
        )
    return unmatched


async def _run_into(
    results: dict[str, subprocess.CompletedProcess[bytes]],
    name: str,
    argv: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``trio.run_process`` for ``nursery.start``, keeping the result under ``name``."""
    results[name] = await trio.run_process(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        capture_stderr=True,
        check=False,
        env={**os.environ, **_ENV},
        task_status=task_status,
    )


async def _resolve_agent_packages() -> list[_Package]:
    """``qemu-guest-agent`` and :data:`AGENT_LIBRARY_PACKAGES` with their candidate versions
    and sizes (one ``apt-cache show``)."""
    names = (AGENT_PACKAGE, *AGENT_LIBRARY_PACKAGES)
    return await _with_sizes([_Package(name, "", 0) for name in names])


# Local file work is deliberately synchronous: small, quick, and no worker threads.


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
