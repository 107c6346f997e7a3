"""The machine's guest-side channels: the shell, the guest agent and the relay.

:class:`GuestChannels` is mixed into :class:`~trio_qemu.Machine`: each channel's client is
made on first use (the relay's at launch) over our end of its socketpair, and fails at once
when the machine is already stopped or failed. The lifecycle stays in :mod:`._machine`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ._channels import Channels
from ._config import RELAY_PORT_ID, MachineConfig
from ._errors import MachineError, RelayError
from ._events import Subscription
from ._shell import Shell
from .agent import GuestAgent
from .relay._relay import Relay

__all__ = ["GuestChannels"]


class GuestChannels:
    """``shell``, ``agent``, ``relay`` and ``channel()`` of a :class:`~trio_qemu.Machine`."""

    name: str
    config: MachineConfig
    _channels: Channels
    _shell: Shell | None
    _agent: GuestAgent | None
    _relay: Relay | None
    _nursery: trio.Nursery | None

    argv: list[str]

    # provided by Machine (and MonitorCommands)
    @property
    def failure(self) -> BaseException | None:  # pragma: no cover
        raise NotImplementedError

    def _unusable(self) -> bool:  # pragma: no cover
        raise NotImplementedError

    def expect_exit(self, reason: str | None = "expected") -> None:  # pragma: no cover
        raise NotImplementedError

    async def _on_qmp_eof(self) -> None:  # pragma: no cover
        raise NotImplementedError

    async def _service(  # pragma: no cover
        self,
        fn: Callable[..., Awaitable[None]],
        *args: Any,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # MonitorCommands.subscribe; a stub here would shadow it

        def subscribe(
            self,
            *names: str,
            match: Mapping[str, object] | None = None,
            buffer: int | None = None,
        ) -> Subscription: ...

    @property
    def shell(self) -> Shell:
        """Commands in the guest over the dedicated shell channel (needs ``shell=True`` and a
        guest that runs the trio_qemu guest agent, like :mod:`trio_qemu.guest`'s)."""
        if self._shell is None:
            stream = self.channel("shell")
            self._shell = Shell(stream, name=f"{self.name}.shell", on_eof=self._on_qmp_eof)
            self._shell.use_relay(lambda: self.relay)  # copies go through the relay
            if self._unusable():
                self._shell.close(self.failure)
        return self._shell

    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent over the agent channel (needs ``agent=True`` and a guest that
        runs qemu-ga, like ``ensure_guest(agent=True)``'s). Its reader starts on first use;
        calls wait for the agent to answer within their own timeouts."""
        if self._agent is None:
            agent = GuestAgent(
                self.channel("agent"),
                name=f"{self.name}.agent",
                timeout=self.config.qmp_timeout,
                on_eof=self._on_qmp_eof,
                on_shutdown=self._agent_shutdown,
            )
            self._agent = agent
            if self._unusable() or self._nursery is None:
                agent.fail(self.failure)
            else:
                self._nursery.start_soon(self._service, agent.run)
        return self._agent

    @property
    def relay(self) -> Relay:
        """The relay channel (needs ``relay=True`` and a guest that runs the relay, like the
        tiny guest's when it was built with a C compiler at hand): TCP streams into the
        guest, forwarded ports, file copies."""
        if self._relay is None:
            if self.config.relay:
                raise RelayError(f"{self.name}: not launched yet")
            raise RelayError(
                f"{self.name}: no relay channel: launch it with relay=True (the tiny guest's "
                "config() does when the guest has the relay, built when a C compiler was found)"
            )
        return self._relay

    def _agent_shutdown(self, mode: str) -> None:
        """``guest-shutdown`` is being sent: when it will end QEMU, that exit is expected
        (as after ``quit``), not reported as MachineExited."""
        if mode == "powerdown" or (mode == "reboot" and "-no-reboot" in self.argv):
            self.expect_exit("guest-shutdown")

    def channel(self, name: str) -> trio.SocketStream:
        """Our end of the ``shell``, ``agent`` or ``relay`` socketpair channel."""
        if name not in ("shell", "agent", "relay"):
            raise ValueError(
                f"no such channel: {name!r} (the channels are shell, agent and relay)"
            )
        try:
            return self._channels.ours[name]
        except KeyError:
            raise MachineError(
                f"{self.name}: no {name} channel: launch it with {name}=True"
            ) from None


    async def _start_relay(self, nursery: trio.Nursery) -> None:
        """The relay's reader and writer, and (with QMP) the watch on its port."""
        relay = Relay(self.channel("relay"), name=f"{self.name}.relay", on_eof=self._on_qmp_eof)
        self._relay = relay
        await nursery.start(self._service, relay.run)
        if self.config.qmp:  # QEMU says when the guest closes the relay port
            events = self.subscribe("VSERPORT_CHANGE", match={"data": {"id": RELAY_PORT_ID}})
            await nursery.start(self._service, relay.watch_port, events)
