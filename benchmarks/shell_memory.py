"""Peak memory of ``Shell.run`` against the size of a command's output.

    .venv/bin/python benchmarks/shell_memory.py [--sizes 10,50] [--guest 10]

For each output size (MB, 10^6 bytes) a fresh Python process builds a :class:`trio_qemu.Shell`
on one end of a socketpair; a peer process on the other end plays the guest agent and
answers one ``run`` with a result of that many random bytes of stdout, framed exactly as the
guest's busybox agent frames it (base64 in 76-character lines). The figure is the growth of
the measuring process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just
before the call; else ``getrusage``'s ``ru_maxrss``) during the call, divided by the output
size, with the result still held. The result's own bytes are 1.0x of that: the rest is what
the shell needed on the way. The call's wall time is printed too (for context only).

The baseline, measured the same way in the same run: a raw Trio reader that receives the
same stream and throws it away (the floor: socket buffers, Trio, the allocator).
``--guest MB`` also runs one command in the tiny guest (``head -c`` of ``/dev/urandom``, under
TCG: slow) and measures the same ratio there.

Results go to ``benchmarks/results/shell_memory.json``. Nothing here asserts a bound; the
shell's docstring states it (about 1x the output on CPython, at most 2x).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_ratios, quiet_logging, ratio, write_results

NAME = "shell_memory"
MB = 1_000_000


# -- the peer: a fake guest agent (stdlib only, a process of its own) ---------------------
def peer(fd: int, size: int) -> None:
    """Answer pings; answer each run with ``size`` random bytes of stdout, then exit at EOF."""
    payload = os.urandom(size)
    body = base64.encodebytes(payload)  # 76-character lines, like busybox ``base64``
    del payload
    sock = socket.socket(fileno=fd)
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            fields = line.split()
            if fields[:1] == [b"P"]:
                sock.sendall(b"#P %s\n" % fields[1])
            elif fields[:1] == [b"R"]:
                rid = fields[1]
                sock.sendall(b"#B %s 0 %d 0\n" % (rid, size))
                sock.sendall(body)
                sock.sendall(b"#M %s\n#E %s 0\n" % (rid, rid))


# -- the measured process ------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
            file.write("5")
    except OSError:
        return False
    return True


def _peak(reset: bool) -> int:
    if reset:
        return _status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, size: int) -> dict[str, Any]:
    import trio

    from trio_qemu import Shell

    quiet_logging()
    if variant == "guest":
        return _child_guest(size)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--peer", str(theirs.fileno()), str(size)],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    try:

        async def measure() -> dict[str, Any]:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            shell = Shell(stream, max_output=2 * size)
            await shell.wait_ready(timeout=30)  # the peer is up and its payload made
            gc.collect()
            reset = _reset_peak()
            before = _status("VmRSS")
            start = time.perf_counter()
            if variant == "shell":
                result = await shell.run("x", timeout=120)
                assert len(result.stdout) == size
            else:  # the floor: the same stream, received and thrown away
                await stream.send_all(b"\nR f 0 0 eA== f\n")
                tail = b""
                while not tail.endswith(b"#E f 0\n"):
                    chunk = await stream.receive_some(65536)
                    tail = (tail + chunk)[-16:]
            return _figures(before, reset, start)

        return trio.run(measure)
    finally:
        ours.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)
            proc.wait()


def _figures(before: int, reset: bool, start: float) -> dict[str, Any]:
    """One measurement's result: peak RSS growth since ``before``, and the time taken."""
    seconds = time.perf_counter() - start
    peak = _peak(reset)
    return {"growth": max(0, peak - before), "before": before, "reset": reset, "seconds": seconds}


def _child_guest(size: int) -> dict[str, Any]:
    import trio

    from trio_qemu import open_machine
    from trio_qemu.guest import build_guest

    guest = build_guest()

    async def measure() -> dict[str, Any]:
        async with open_machine(guest.config(memory=512)) as vm:
            await vm.shell.wait_ready(timeout=120)
            await vm.shell.run(f"head -c {size} /dev/urandom >/run/bench", timeout=600)
            gc.collect()
            reset = _reset_peak()
            before = _status("VmRSS")
            start = time.perf_counter()
            result = await vm.shell.run("cat /run/bench", timeout=1200)
            figures = _figures(before, reset, start)
            assert len(result.stdout) == size
            return figures

    return trio.run(measure)


def _run_child(variant: str, size: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(size)],
        check=True,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ).stdout
    data: dict[str, Any] = json.loads(out.splitlines()[-1])
    data["ratio"] = ratio(data["growth"], size)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50", help="output sizes in MB (default 10,50)")
    parser.add_argument("--guest", type=float, default=0, help="also this many MB in the guest")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--peer", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer(*args.peer)
        return
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return

    sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    rows: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for size in sizes:
        label = f"{size / MB:g} MB"
        floor = _run_child("floor", size)
        shell = _run_child("shell", size)
        rows[label] = {"bytes": size, "shell": shell, "floor": floor}
        print(
            f"  {label:>6} of output: Shell.run peak RSS +{shell['growth'] / MB:7.1f} MB "
            f"({shell['seconds']:.2f} s), raw reader (floor) +{floor['growth'] / MB:6.1f} MB "
            f"({floor['seconds']:.2f} s)"
        )
        ratios[f"Shell.run, {label}: peak growth / output"] = shell["ratio"]
        ratios[f"raw reader, {label}: peak growth / output"] = floor["ratio"]
    if args.guest:
        size = int(args.guest * MB)
        label = f"{size / MB:g} MB (tiny guest)"
        got = _run_child("guest", size)
        rows[label] = {"bytes": size, "shell": got}
        print(
            f"  {label}: Shell.run peak RSS +{got['growth'] / MB:.1f} MB ({got['seconds']:.2f} s)"
        )
        ratios[f"Shell.run, {label}: peak growth / output"] = got["ratio"]
    print()
    print_ratios(ratios)
    path = write_results(NAME, {"sizes": rows, "ratios": ratios})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
