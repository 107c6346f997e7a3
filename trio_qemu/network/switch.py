"""A learning Ethernet :class:`Switch` run as Trio tasks in this process, and its ports.

Each port is our end of a datagram socketpair (:class:`_Port`, counted in
:class:`PortStats`); one task per port reads frames and forwards them at once, and one task
runs the bounded delay line. Because the switch is ours, a test can partition it, lose or
delay frames per link and direction, pull a cable and capture every frame into a pcap file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import os
import random
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass
from typing import Final, Literal, Self, TypeAlias

import trio

from .._config import MachineConfig
from .._errors import NetworkError
from .._machine import Machine
from .._util import open_service_nursery, protected_asynccontextmanager
from ._base import _Network
from .addressing import PortRef, _lookup, _port_name
from .pcap import DEFAULT_MAX_BYTES, DEFAULT_SNAPLEN, PcapWriter

__all__ = ["Direction", "PortStats", "Switch"]

log = logging.getLogger("trio_qemu.network")

Direction: TypeAlias = Literal["both", "in", "out"]
"""Which way across a switch port a loss or delay setting applies: ``"in"`` is from the
machine into the switch, ``"out"`` from the switch to the machine."""

#: The largest frame QEMU's dgram netdev sends (NET_BUFSIZE: 4096 + 65536).
_MAX_FRAME: Final = 69632
#: Frames read from one port before the port task lets the others run.
_RECEIVE_BATCH: Final = 64
#: An Ethernet header: destination, source, EtherType.
_ETH_HEADER: Final = 14


@dataclass
class PortStats:
    """Counters of one switch port. ``rx`` is from the machine, ``tx`` to it.

    Each dropped frame is counted once, on the port where it was stopped: a frame lost or
    refused on its way in counts on the port it came from, one refused on its way out on
    the port it was going to.
    """

    rx_frames: int = 0
    """Frames received from the port's peer (before any drop)."""
    rx_bytes: int = 0
    """Their bytes."""
    tx_frames: int = 0
    """Frames delivered to the peer's socket."""
    tx_bytes: int = 0
    """Their bytes."""
    dropped_down: int = 0
    """Frames from or to this port while it was down (:meth:`Switch.set_link`)."""
    dropped_loss: int = 0
    """Frames this link lost on purpose (:meth:`Switch.set_loss`), either way."""
    dropped_partition: int = 0
    """Unicast frames for this port that a partition stopped (floods simply skip it)."""
    dropped_full: int = 0
    """Frames for this port dropped because its peer's socket buffer was full: the switch
    never waits to send."""
    dropped_delay: int = 0
    """Frames for this port dropped because the delay line was full."""
    dropped_error: int = 0
    """Frames too short to be Ethernet, and frames the peer could not take (it is gone)."""

    @property
    def dropped(self) -> int:
        """All the frames dropped at this port."""
        return (
            self.dropped_down
            + self.dropped_loss
            + self.dropped_partition
            + self.dropped_full
            + self.dropped_delay
            + self.dropped_error
        )


class _Port:
    """One switch port: our end of the socketpair, its state and its counters."""

    __slots__ = (
        "closed",
        "group",
        "in_delay",
        "in_loss",
        "name",
        "out_delay",
        "out_loss",
        "sock",
        "stats",
        "up",
    )

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.stats = PortStats()
        self.up = True
        #: ports forward to each other only within the same group (0: everyone, healed)
        self.group = 0
        self.in_loss = 0.0
        self.out_loss = 0.0
        self.in_delay = 0.0
        self.out_delay = 0.0
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # Outside trio.run (RuntimeError) nobody can be waiting on the socket.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class Switch(_Network):
    """A learning Ethernet switch running as Trio tasks in this process.

    Every attached machine (:meth:`attach`) or Python peer (:meth:`add_port`) gets a port: a
    datagram socketpair whose other end the peer holds. While :meth:`run` runs (use
    :meth:`running`), one task per port reads frames and forwards each at once: it learns
    the source MAC (a table of at most ``mac_table_size`` entries, oldest evicted), sends a
    unicast frame to the port its destination was learned on and floods broadcast,
    multicast and unknown destinations to every other port, all within the sender's
    partition group, skipping ports that are down. Sends never block: a frame for a full
    peer is dropped and counted (:class:`PortStats`). Frames from the port they would go
    back out of are filtered.

    Controls take effect at once, also for frames already in the delay line:
    :meth:`partition`/:meth:`heal`, :meth:`set_loss` (a probability per link and direction,
    drawn from ``random.Random(seed)`` so a seeded test is repeatable), :meth:`set_delay`
    (a delay line bounded by ``max_delayed`` frames and ``max_delayed_bytes`` bytes; past
    that, frames are dropped and counted), :meth:`set_link` (a pulled cable, seen only by
    the switch: the guest keeps its carrier; for that use :meth:`set_nic_link`) and
    :meth:`start_capture` (every frame the switch receives, into a classic pcap file;
    ``pcap=`` starts one when the switch starts).

    Measured here (2 cores, TCG guests): ping between two guests has a median round trip of
    2.1 ms through the switch and 1.6 ms over a :class:`Link` (the guests dominate); between
    Python peers the switch adds ~11 us per frame, and one flooding it moves ~125,000
    frames/s (~95,000 while capturing to pcap).

    ``name`` is the netdev id in every attached QEMU and seeds the MACs. Ports may be added
    before or while the switch runs. A switch runs once: leaving :meth:`running` (or
    :meth:`close`) closes every port; machines still running then lose their network.
    """

    def __init__(
        self,
        name: str = "switch",
        *,
        seed: int | None = None,
        max_delayed: int = 1024,
        max_delayed_bytes: int = 16 << 20,
        mac_table_size: int = 1024,
        pcap: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(name)
        for field, value in (
            ("max_delayed", max_delayed),
            ("max_delayed_bytes", max_delayed_bytes),
            ("mac_table_size", mac_table_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, not {value!r}")
        self.max_delayed = max_delayed
        self.max_delayed_bytes = max_delayed_bytes
        self.mac_table_size = mac_table_size
        self._random = random.Random(seed)
        self._ports: dict[str, _Port] = {}
        self._port_list: list[_Port] = []
        self._table: OrderedDict[bytes, _Port] = OrderedDict()
        self._groups = itertools.count(1)
        #: the delay line: (due time, sequence, source port, target port, frame)
        self._delayed: list[tuple[float, int, _Port, _Port, bytes]] = []
        self._delayed_bytes = 0
        self._sequence = itertools.count()
        self._delay_changed = trio.Event()
        self._capture: PcapWriter | None = None
        self._pcap_path = pcap
        self._nursery: trio.Nursery | None = None
        self._run_scope: trio.CancelScope | None = None
        self._started = False

    # -- ports -------------------------------------------------------------------------------
    def _new_end(self, name: str) -> socket.socket:
        return self._add_port(name)

    def _drop_end(self, name: str) -> None:
        port = self._ports.pop(name, None)
        if port is not None:
            self._port_list.remove(port)
            port.close()

    def add_port(self, name: str) -> socket.socket:
        """A port for a Python peer: returns the peer's end (a blocking ``SOCK_DGRAM``
        socket; one datagram sent or received is one Ethernet frame). The caller owns and
        closes it. For tests and tools: inject frames, flood, or listen to a broadcast."""
        self._check_open()
        if name in self._ports:
            raise ValueError(f"{self.name}: a port named {name!r} exists already")
        return self._add_port(name)

    def _add_port(self, name: str) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        port = _Port(name, ours)
        self._ports[name] = port
        self._port_list.append(port)
        if self._nursery is not None:
            self._nursery.start_soon(self._serve, port, name=f"{self.name}.{name}")
        return theirs

    @property
    def ports(self) -> list[str]:
        """The port names (machines and Python peers), in the order they were added."""
        return [port.name for port in self._port_list]

    def _port(self, ref: PortRef) -> _Port:
        return _lookup(self._ports, ref, self.name, "port")

    # -- controls ------------------------------------------------------------------------------
    def partition(self, *groups: Collection[PortRef]) -> None:
        """Split the switch: frames flow only between ports of the same group.

        ``switch.partition({"a", "b"}, {"c"})``: a and b reach each other, c reaches no one.
        A port named in no group is cut off from every other port. Replaces any earlier
        partition; frames already in the delay line are checked again when due. Raises
        ValueError for a port named twice, KeyError for an unknown one.
        """
        assignment: dict[str, int] = {}
        for group in groups:
            if isinstance(group, str | Machine | MachineConfig):
                raise TypeError(f"each group must be a collection of ports, not {group!r}")
            group_id = next(self._groups)
            for ref in group:
                port = self._port(ref)
                if port.name in assignment:
                    raise ValueError(f"{self.name}: port {port.name!r} is in two groups")
                assignment[port.name] = group_id
        for port in self._port_list:
            port.group = assignment.get(port.name) or next(self._groups)
        log.info("%s: partition %s", self.name, [sorted(map(_port_name, g)) for g in groups])

    def heal(self) -> None:
        """End any partition: every port reaches every other again, at once."""
        for port in self._port_list:
            port.group = 0
        log.info("%s: healed", self.name)

    def set_loss(self, port: PortRef, loss: float, *, direction: Direction = "both") -> None:
        """Lose each frame crossing ``port``'s link in ``direction`` with probability
        ``loss`` (0 to 1). With ``"both"`` a round trip through one lossy link survives with
        probability ``(1 - loss) ** 2``. Draws come from the switch's seeded RNG."""
        if not (isinstance(loss, int | float) and 0.0 <= loss <= 1.0):
            raise ValueError(f"loss must be a probability between 0 and 1, not {loss!r}")
        self._set_per_direction(port, direction, "loss", float(loss))

    def set_delay(self, port: PortRef, delay: float, *, direction: Direction = "both") -> None:
        """Delay each frame crossing ``port``'s link in ``direction`` by ``delay`` seconds
        (0 for none). A frame's delay is its source link's ``"in"`` plus its target link's
        ``"out"`` delay, so ``delay=0.1`` on one port adds 0.2 s to a ping's round trip
        through it. Delayed frames wait in the bounded delay line (see the class)."""
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        self._set_per_direction(port, direction, "delay", float(delay))

    def _set_per_direction(self, port: PortRef, direction: str, what: str, value: float) -> None:
        """Set the port's ``in_<what>`` and/or ``out_<what>`` as ``direction`` says."""
        target = self._port(port)
        inbound, outbound = _directions(direction)
        if inbound:
            setattr(target, f"in_{what}", value)
        if outbound:
            setattr(target, f"out_{what}", value)

    def set_link(self, port: PortRef, up: bool) -> None:
        """Pull (``up=False``) or plug back in ``port``'s cable at the switch: frames from
        and to it are dropped (and counted) while it is down, and the MACs learned on it are
        forgotten. The guest still sees its carrier; :meth:`set_nic_link` is QEMU's own
        link state, which the guest does see."""
        target = self._port(port)
        target.up = bool(up)
        if not up:
            for mac in [mac for mac, where in self._table.items() if where is target]:
                del self._table[mac]
        log.info("%s: port %s %s", self.name, target.name, "up" if up else "down")

    def stats(self, port: PortRef) -> PortStats:
        """A snapshot of ``port``'s counters."""
        return dataclasses.replace(self._port(port).stats)

    def all_stats(self) -> dict[str, PortStats]:
        """Snapshots of every port's counters, by port name."""
        return {port.name: dataclasses.replace(port.stats) for port in self._port_list}

    @property
    def delayed(self) -> int:
        """Frames waiting in the delay line now (at most ``max_delayed``)."""
        return len(self._delayed)

    @property
    def delayed_bytes(self) -> int:
        """Bytes waiting in the delay line now (at most ``max_delayed_bytes``)."""
        return self._delayed_bytes

    @property
    def mac_table(self) -> dict[str, str]:
        """The learned MACs (``aa:bb:...``) and the ports they were learned on."""
        return {mac.hex(":"): port.name for mac, port in self._table.items()}

    # -- capture --------------------------------------------------------------------------------
    def start_capture(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> PcapWriter:
        """Write every frame the switch receives from now on into a classic pcap file at
        ``path`` (replacing a running capture). A frame is recorded once, when it arrives
        at the switch, whether or not it is then forwarded; frames a down port or an
        incoming loss setting stopped never arrived and are not recorded.

        The file is written synchronously and unbuffered (complete at every moment) and
        bounded by ``max_bytes``; see :class:`~trio_qemu.network.PcapWriter`, which this
        returns (its ``frames`` and ``not_captured`` count what happened). It is closed by
        :meth:`stop_capture` or when the switch closes.
        """
        self._check_open()
        writer = PcapWriter(path, snaplen=snaplen, max_bytes=max_bytes)
        self.stop_capture()
        self._capture = writer
        return writer

    def stop_capture(self) -> PcapWriter | None:
        """Stop and close the capture, if any; return its writer (with its counters)."""
        writer, self._capture = self._capture, None
        if writer is not None:
            writer.close()
        return writer

    @property
    def capture(self) -> PcapWriter | None:
        """The running capture, if any."""
        return self._capture

    # -- running --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward frames until cancelled (``await nursery.start(switch.run)``); then close
        the switch (every port, the capture). Returns early if :meth:`close` is called.

        Starts the ``pcap=`` capture, if one was given, before reporting started. Raises
        NetworkError if the switch ran or was closed before.
        """
        self._check_open()
        if self._started:
            raise NetworkError(f"{self.name}: a switch runs only once")
        self._started = True
        try:
            if self._pcap_path is not None:
                self.start_capture(self._pcap_path)
            with trio.CancelScope() as self._run_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._delay_line, name=f"{self.name}.delay")
                    for port in self._port_list:
                        nursery.start_soon(self._serve, port, name=f"{self.name}.{port.name}")
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    @protected_asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Run the switch for the block; on leaving (any way), stop it and close every fd.

        ``async with Switch().running() as switch:`` then attach and launch inside. An error
        starting it (e.g. the pcap file cannot be created) and the block's own error come
        out as they are, not wrapped in an ExceptionGroup.
        """
        try:
            async with open_service_nursery() as nursery:
                await nursery.start(self.run)
                yield self
        finally:
            self.close()

    def close(self) -> None:
        """Stop forwarding and close every port, Python peers' included (their ends then
        see their sends refused), and the capture; idempotent."""
        super().close()
        if self._run_scope is not None:
            self._run_scope.cancel()
        for port in self._port_list:
            port.close()
        self.stop_capture()
        self._delayed.clear()
        self._delayed_bytes = 0
        self._table.clear()

    # -- forwarding -------------------------------------------------------------------------------
    async def _serve(self, port: _Port) -> None:
        """Read ``port``'s frames (a batch at a time, then let others run) and forward each."""
        buffer = bytearray(_MAX_FRAME)
        view = memoryview(buffer)
        sock = port.sock
        try:
            while not port.closed:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(_RECEIVE_BATCH):
                    try:
                        size = sock.recv_into(buffer)
                    except BlockingIOError:
                        break
                    self._ingress(port, bytes(view[:size]))
        except (trio.ClosedResourceError, OSError) as exc:
            if not port.closed:
                log.warning("%s: port %s stopped: %r", self.name, port.name, exc)

    def _ingress(self, port: _Port, frame: bytes) -> None:
        """Decide a received frame's fate; send it or queue it. Never waits."""
        stats = port.stats
        stats.rx_frames += 1
        stats.rx_bytes += len(frame)
        if not port.up:
            stats.dropped_down += 1
            return
        if len(frame) < _ETH_HEADER:
            stats.dropped_error += 1
            return
        if port.in_loss and self._random.random() < port.in_loss:
            stats.dropped_loss += 1
            return
        if self._capture is not None:
            self._capture.write(frame)
        source = frame[6:12]
        if not source[0] & 1 and self._table.get(source) is not port:
            self._table[source] = port
            self._table.move_to_end(source)
            if len(self._table) > self.mac_table_size:
                self._table.popitem(last=False)
        destination = frame[0:6]
        if destination[0] & 1:
            targets: Iterable[_Port] = self._port_list
        else:
            learned = self._table.get(destination)
            if learned is port:
                return  # the destination is behind the port it came from: filtered
            targets = self._port_list if learned is None else (learned,)
            if learned is not None and learned.group != port.group:
                learned.stats.dropped_partition += 1
                return
        for target in targets:
            if target is port or target.group != port.group:
                continue
            if not target.up:
                target.stats.dropped_down += 1
                continue
            if target.out_loss and self._random.random() < target.out_loss:
                target.stats.dropped_loss += 1
                continue
            delay = port.in_delay + target.out_delay
            if delay > 0:
                self._delay(port, target, frame, delay)
            else:
                self._send(target, frame)

    @staticmethod
    def _send(target: _Port, frame: bytes) -> None:
        try:
            target.sock.send(frame)
        except BlockingIOError:
            target.stats.dropped_full += 1
        except OSError:  # the peer is gone (ECONNREFUSED) or the port was closed
            target.stats.dropped_error += 1
        else:
            target.stats.tx_frames += 1
            target.stats.tx_bytes += len(frame)

    def _delay(self, source: _Port, target: _Port, frame: bytes, delay: float) -> None:
        if (
            len(self._delayed) >= self.max_delayed
            or self._delayed_bytes + len(frame) > self.max_delayed_bytes
        ):
            target.stats.dropped_delay += 1
            return
        due = trio.current_time() + delay
        entry = (due, next(self._sequence), source, target, frame)
        heapq.heappush(self._delayed, entry)
        self._delayed_bytes += len(frame)
        if self._delayed[0] is entry:
            self._delay_changed.set()  # an earlier deadline than the delay line waits for

    async def _delay_line(self) -> None:
        """Deliver delayed frames when due, checking the partition and the target's link
        again at that moment. Waits for the earliest due time or a new earlier frame."""
        while True:
            self._delay_changed = trio.Event()
            if not self._delayed:
                await self._delay_changed.wait()
                continue
            with trio.move_on_at(self._delayed[0][0]):
                await self._delay_changed.wait()
                continue
            now = trio.current_time()
            while self._delayed and self._delayed[0][0] <= now:
                _, _, source, target, frame = heapq.heappop(self._delayed)
                self._delayed_bytes -= len(frame)
                if target.group != source.group:
                    target.stats.dropped_partition += 1
                elif not target.up:
                    target.stats.dropped_down += 1
                elif not target.closed:
                    self._send(target, frame)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._nursery else "stopped")
        return f"<Switch {self.name!r} {state} ports={self.ports}>"


def _directions(direction: str) -> tuple[bool, bool]:
    """Whether ``direction`` covers the way in and the way out; ValueError if unknown."""
    if direction not in ("both", "in", "out"):
        raise ValueError(f"direction must be 'both', 'in' or 'out', not {direction!r}")
    return direction != "out", direction != "in"
