"""How the qtest channel times requests out and takes replies, against a scripted peer.

The reader task enforces the deadlines of requests on the fast path (its cancel scope's
deadline is the earliest pending one), and a request takes a reply that is already there
itself. These tests pin down what that must keep: a short timeout behind a long one still
fires on time, timed-out requests give their in-flight slots back when their late replies
come, and a bad line read by a request fails the channel just as one read by the reader.
"""

from __future__ import annotations

import os

import pytest
import trio
from test_qtest import scripted_peer

from trio_qemu.qtest import MAX_IN_FLIGHT, QtestProtocolError, QtestTimeout


async def test_a_short_timeout_behind_a_long_one_fires_on_time() -> None:
    async with scripted_peer() as (qt, peer), trio.open_nursery() as nursery:
        results: list[int] = []

        async def patient() -> None:
            results.append(await qt.inb(0x71, timeout=30))

        nursery.start_soon(patient)
        assert await peer.line() == b"inb 0x71\n"
        with trio.fail_after(5):  # the reader's deadline was 30 s away: it must move
            with pytest.raises(QtestTimeout, match="discarded"):
                await qt.inb(0x70, timeout=0.1)
        assert await peer.line() == b"inb 0x70\n"
        await peer.send(b"OK 0x0001\nOK 0x0002\n")
    assert results == [1] and qt.discarded_replies == 1


async def test_timed_out_requests_give_their_slots_back() -> None:
    async with scripted_peer() as (qt, peer):
        outcomes: list[str] = []

        async def call(port: int) -> None:
            try:
                await qt.inb(port, timeout=1)
            except QtestTimeout as exc:
                outcomes.append("not sent" if "not sent" in str(exc) else "discarded")

        async with trio.open_nursery() as nursery:
            for port in range(MAX_IN_FLIGHT + 6):
                nursery.start_soon(call, port)
            # The first MAX_IN_FLIGHT go out and time out there; the rest never get a slot.
            sent = [await peer.line() for _ in range(MAX_IN_FLIGHT)]
        assert sorted(outcomes) == ["discarded"] * MAX_IN_FLIGHT + ["not sent"] * 6
        assert await peer.silent(0.05)
        await peer.send(b"".join(b"OK 0x%04x\n" % int(line.split()[1], 16) for line in sent))
        async with trio.open_nursery() as nursery:  # every slot is free again
            results: dict[int, int] = {}

            async def fresh(port: int) -> None:
                results[port] = await qt.inb(port, timeout=5)

            for port in range(MAX_IN_FLIGHT):
                nursery.start_soon(fresh, port)
            for _ in range(MAX_IN_FLIGHT):
                port = int((await peer.line()).split()[1], 16)
                await peer.send(b"OK 0x%04x\n" % (port + 1000))
        assert qt.discarded_replies == MAX_IN_FLIGHT
        assert results == {port: port + 1000 for port in range(MAX_IN_FLIGHT)}


async def test_a_bad_line_taken_by_a_request_fails_the_channel() -> None:
    async with scripted_peer() as (qt, peer):
        with qt.irq_events() as irqs:
            # Already there when the request is sent: the request reads it, not the reader.
            os.write(peer.stream.socket.fileno(), b"HELLO\n")
            with pytest.raises(QtestProtocolError, match="not a qtest reply"):
                await qt.inb(0x71)  # no QMP check first: nothing else runs before it reads
            with pytest.raises(QtestProtocolError):
                await irqs.receive(timeout=5)
        with pytest.raises(QtestProtocolError, match="not a qtest reply"):
            await qt.readb(0x10)
        await qt.machine.cmd("query-status")  # QMP is unaffected
