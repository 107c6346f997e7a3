"""Fast peers for the benchmarks, run as separate processes (stdlib only, no Trio).

    python benchmarks/_peers.py events FD COUNT
    python benchmarks/_peers.py console FD TOTAL_BYTES CHUNK_BYTES MARKER_HEX

A peer runs in its own process so that it has a core of its own and never competes with
the measured reader for the GIL. It talks over an inherited socketpair end ``FD``.

- ``events``: a fake QMP server. It sends a greeting, answers ``qmp_capabilities`` and then
  one more command (any: the client's "go"), then blasts ``COUNT`` pre-encoded
  ``GUEST_CRASHLOADED`` events, byte for byte what QEMU 7.2 sends, in 128 KiB ``sendall``
  calls, then one ``BENCH_END`` event, then shuts its side down (EOF for the reader) and
  waits for the client to close. Commands may come without a newline (qemu.qmp's and
  trio_qemu's encoding): they are split with ``json.JSONDecoder.raw_decode``.
- ``console``: waits for one byte ("go") and then writes ``TOTAL_BYTES`` of printable
  filler ending with ``MARKER`` (hex), ``CHUNK_BYTES`` per ``sendall``, then closes. On stdout
  it prints ``time.monotonic()`` (a system-wide clock on Linux) taken just before and just
  after the ``sendall`` that carried the marker, so a reader can compute its latency.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time

EVENT_NAME = "GUEST_CRASHLOADED"
END_EVENT = "BENCH_END"
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "bench-peer"}, "capabilities": ["oob"]}}\r\n'
)
#: Events pre-encoded per template block (distinct timestamps), repeated as needed.
_TEMPLATE = 1024
_SEND_SIZE = 128 * 1024


def event_line(i: int, name: str = EVENT_NAME) -> bytes:
    """One event as QEMU 7.2 encodes it (``json.dumps`` spacing, ``\\r\\n``)."""
    seconds, micro = divmod(1_700_000_000_000_000 + 7 * i, 1_000_000)
    return (
        b'{"timestamp": {"seconds": %d, "microseconds": %d}, "event": "%s", '
        b'"data": {"action": "run"}}\r\n' % (seconds, micro, name.encode())
    )


def _read_command(sock: socket.socket, buf: bytearray) -> dict[str, object]:
    decoder = json.JSONDecoder()
    while True:
        text = buf.decode("utf-8", "replace").lstrip()
        if text:
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                pass
            else:
                rest = text[end:].encode()
                buf[:] = rest
                if not isinstance(obj, dict):
                    raise SystemExit(f"peer: not a command: {obj!r}")
                return obj
        data = sock.recv(65536)
        if not data:
            raise SystemExit("peer: client closed before its commands")
        buf += data


def _reply(sock: socket.socket, command: dict[str, object]) -> None:
    reply: dict[str, object] = {"return": {}}
    if "id" in command:
        reply["id"] = command["id"]
    sock.sendall(json.dumps(reply).encode() + b"\r\n")


def serve_events(fd: int, count: int) -> None:
    sock = socket.socket(fileno=fd)
    block = b"".join(event_line(i) for i in range(_TEMPLATE))
    per_send = max(1, _SEND_SIZE // len(block)) if len(block) < _SEND_SIZE else 1
    big = block * per_send
    sock.sendall(GREETING)
    buf = bytearray()
    _reply(sock, _read_command(sock, buf))  # qmp_capabilities
    _reply(sock, _read_command(sock, buf))  # "go"
    full, rest = divmod(count, _TEMPLATE * per_send)
    send = sock.sendall
    for _ in range(full):
        send(big)
    if rest:
        send(b"".join(event_line(i) for i in range(rest)))
    send(event_line(count, END_EVENT))
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):  # until the client closes
        pass
    sock.close()


def serve_console(fd: int, total: int, chunk: int, marker: bytes) -> None:
    sock = socket.socket(fileno=fd)
    if not sock.recv(1):
        raise SystemExit("peer: client closed before go")
    line = b"".join(b"console filler line %06d ........................................\r\n" % i
                    for i in range(1024))  # fmt: skip
    block = (line * (chunk // len(line) + 1))[:chunk]
    body = max(0, total - len(marker))
    full, rest = divmod(body, chunk)
    send = sock.sendall
    for _ in range(full):
        send(block)
    tail = block[:rest] + marker
    before = time.monotonic()
    send(tail)
    after = time.monotonic()
    sock.shutdown(socket.SHUT_WR)
    print(f"{before!r} {after!r}", flush=True)
    while sock.recv(65536):
        pass
    sock.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["events"] and len(argv) == 3:
        serve_events(int(argv[1]), int(argv[2]))
    elif argv[:1] == ["console"] and len(argv) == 5:
        serve_console(int(argv[1]), int(argv[2]), int(argv[3]), bytes.fromhex(argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    # The client may go away early (a cancelled run): nothing to report then.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        main(sys.argv[1:])
