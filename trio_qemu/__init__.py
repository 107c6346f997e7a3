"""Launch and control QEMU virtual machines with Trio structured concurrency.

The public surface is re-exported here explicitly; everything in the underscore modules is
private and may change.
"""

import logging as _logging

from qemu.qmp import ExecuteError as ExecuteError

from ._config import ChannelFds as ChannelFds
from ._config import FdSpec as FdSpec
from ._config import MachineConfig as MachineConfig
from ._config import kvm_usable as kvm_usable
from ._config import resolve_accel as resolve_accel
from ._console import Console as Console
from ._errors import AbnormalShutdown as AbnormalShutdown
from ._errors import AgentError as AgentError
from ._errors import AgentTimeout as AgentTimeout
from ._errors import ConsoleClosed as ConsoleClosed
from ._errors import ConsoleFailure as ConsoleFailure
from ._errors import ConsoleTimeout as ConsoleTimeout
from ._errors import EventsDropped as EventsDropped
from ._errors import GuestBuildError as GuestBuildError
from ._errors import GuestCommandError as GuestCommandError
from ._errors import LaunchError as LaunchError
from ._errors import MachineError as MachineError
from ._errors import MachineExited as MachineExited
from ._errors import MachineTimeout as MachineTimeout
from ._errors import MigrationError as MigrationError
from ._errors import NetworkError as NetworkError
from ._errors import NetworkTimeout as NetworkTimeout
from ._errors import QMPBadMessage as QMPBadMessage
from ._errors import QMPConnectionClosed as QMPConnectionClosed
from ._errors import QMPGreetingError as QMPGreetingError
from ._errors import QMPNegotiationError as QMPNegotiationError
from ._errors import QMPProtocolError as QMPProtocolError
from ._errors import QMPTimeout as QMPTimeout
from ._errors import QMPUnexpectedReply as QMPUnexpectedReply
from ._errors import QtestError as QtestError
from ._errors import QtestInvalidRequest as QtestInvalidRequest
from ._errors import QtestProtocolError as QtestProtocolError
from ._errors import QtestTimeout as QtestTimeout
from ._errors import ShellError as ShellError
from ._errors import ShellTimeout as ShellTimeout
from ._events import QMPEvent as QMPEvent
from ._events import Subscription as Subscription
from ._events import event_match as event_match
from ._machine import Machine as Machine
from ._machine import open_machine as open_machine
from ._machine import open_machines as open_machines
from ._machine import start_machine as start_machine
from ._qmp import QMPClient as QMPClient
from ._qmp import open_qmp as open_qmp
from ._shell import GuestResult as GuestResult
from ._shell import Shell as Shell
from .agent import GuestAgent as GuestAgent
from .agent import open_agent as open_agent
from .guest import GuestImage as GuestImage
from .guest import build_guest as build_guest
from .guest import ensure_guest as ensure_guest
from .migration import incoming_config as incoming_config
from .migration import migrate as migrate
from .qtest import QtestMachine as QtestMachine
from .qtest import open_qtest_machine as open_qtest_machine

# A library logs; the application decides where it goes.
_logging.getLogger("trio_qemu").addHandler(_logging.NullHandler())

__all__ = [
    "AbnormalShutdown",
    "AgentError",
    "AgentTimeout",
    "ChannelFds",
    "Console",
    "ConsoleClosed",
    "ConsoleFailure",
    "ConsoleTimeout",
    "EventsDropped",
    "ExecuteError",
    "FdSpec",
    "GuestAgent",
    "GuestBuildError",
    "GuestCommandError",
    "GuestImage",
    "GuestResult",
    "LaunchError",
    "Machine",
    "MachineConfig",
    "MachineError",
    "MachineExited",
    "MachineTimeout",
    "MigrationError",
    "NetworkError",
    "NetworkTimeout",
    "QMPBadMessage",
    "QMPClient",
    "QMPConnectionClosed",
    "QMPEvent",
    "QMPGreetingError",
    "QMPNegotiationError",
    "QMPProtocolError",
    "QMPTimeout",
    "QMPUnexpectedReply",
    "QtestError",
    "QtestInvalidRequest",
    "QtestMachine",
    "QtestProtocolError",
    "QtestTimeout",
    "Shell",
    "ShellError",
    "ShellTimeout",
    "Subscription",
    "build_guest",
    "ensure_guest",
    "event_match",
    "incoming_config",
    "kvm_usable",
    "migrate",
    "open_agent",
    "open_machine",
    "open_machines",
    "open_qmp",
    "open_qtest_machine",
    "resolve_accel",
    "start_machine",
]
