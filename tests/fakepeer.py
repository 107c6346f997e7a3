"""A scripted fake QMP server for tests, on one end of a ``socket.socketpair()``.

The test drives it step by step: send a greeting, answer ``qmp_capabilities``, read the
client's requests and answer them, or misbehave (junk, drips, floods, silence, a close in the
middle of things). Our client's requests carry no newline (``qemu.qmp.Message`` encoding), so
requests are split with an incremental JSON decoder; what we send ends in ``\\r\\n`` like QEMU.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from typing import Any

import trio

__all__ = ["DEFAULT_GREETING", "FakePeer", "encode", "encode_all", "fake_pair", "make_event"]

#: What QEMU 7.2 says first.
DEFAULT_GREETING: dict[str, Any] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
        "capabilities": ["oob"],
    }
}


def encode(obj: object) -> bytes:
    """One message as QEMU writes it: compact JSON and ``\\r\\n``."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\r\n"


class FakePeer:
    """The server's end of the connection. Every method is one scripted step."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = b""
        self._decoder = json.JSONDecoder()
        #: every request read so far, in order
        self.requests: list[dict[str, Any]] = []

    # -- sending ---------------------------------------------------------------------
    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, *messages: object) -> None:
        """Send each message as one line (in a single write)."""
        await self.send_raw(b"".join(encode(m) for m in messages))

    async def drip(self, data: bytes, delay: float = 0.001) -> None:
        """Send ``data`` one byte per write, pausing ``delay`` between bytes."""
        for i in range(len(data)):
            await self.send_raw(data[i : i + 1])
            await trio.sleep(delay)

    async def send_greeting(self, greeting: object = DEFAULT_GREETING) -> None:
        await self.send(greeting)

    async def reply(self, request: dict[str, Any], value: object = None) -> None:
        """Answer ``request`` with ``{"return": value}`` (``{}`` by default)."""
        await self.send({"return": {} if value is None else value, "id": request["id"]})

    async def event(self, name: str, data: object = None) -> None:
        await self.send(make_event(name, data))

    # -- receiving -------------------------------------------------------------------
    async def read_request(self) -> dict[str, Any]:
        """The next JSON object the client sent. Raises ``EOFError`` at EOF."""
        while True:
            text = self._buf.lstrip().decode("latin-1")  # our client sends ASCII JSON
            if text:
                try:
                    obj, end = self._decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass  # incomplete: read more
                else:
                    self._buf = text[end:].encode("latin-1")
                    assert isinstance(obj, dict), obj
                    self.requests.append(obj)
                    return obj
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the client closed the connection")
            self._buf += data

    async def answer_capabilities(self, answer: object = None) -> dict[str, Any]:
        """Read ``qmp_capabilities`` and answer it (``{"return": {}}`` by default)."""
        request = await self.read_request()
        assert request.get("execute") == "qmp_capabilities", request
        await self.send({"return": {}} if answer is None else answer)
        return request

    async def handshake(self, greeting: object = DEFAULT_GREETING) -> None:
        """Greeting, then negotiation: what QEMU does before any command."""
        await self.send_greeting(greeting)
        await self.answer_capabilities()

    async def serve(self) -> None:
        """Answer every request with ``{"return": {}}`` until the client closes."""
        while True:
            try:
                request = await self.read_request()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await self.reply(request)

    async def discard_some(self, nbytes: int) -> int:
        """Read and throw away about ``nbytes`` bytes; returns how many were read."""
        got = 0
        while got < nbytes:
            data = await self.stream.receive_some(min(65536, nbytes - got))
            if not data:
                break
            got += len(data)
        return got

    async def aclose(self) -> None:
        await self.stream.aclose()


def make_event(name: str, data: object = None, seq: int = 0) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": 1700000000 + seq, "microseconds": 0},
    }
    if data is not None:
        event["data"] = data
    return event


def encode_all(messages: Iterable[object]) -> bytes:
    return b"".join(encode(m) for m in messages)


def fake_pair() -> tuple[trio.SocketStream, FakePeer]:
    """Our client's stream, and the fake server on the other end of a socketpair."""
    ours, theirs = socket.socketpair()
    client_stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return client_stream, FakePeer(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
