"""Launch and control QEMU virtual machines with Trio structured concurrency.

The public surface is re-exported here explicitly, grouped by role; everything in the
underscore modules is private and may change. Subpackages with their own public surface:
:mod:`trio_qemu.guest`, :mod:`trio_qemu.network`, :mod:`trio_qemu.migration`,
:mod:`trio_qemu.agent`, :mod:`trio_qemu.qtest`, :mod:`trio_qemu.snapshot`,
:mod:`trio_qemu.block`, :mod:`trio_qemu.relay` and :mod:`trio_qemu.pytest_plugin`.
"""

import logging as _logging

from ._util import publish as _publish

# -- Machines ------------------------------------------------------------------------
from ._openers import open_machine as open_machine
from ._openers import open_machines as open_machines
from ._openers import start_machine as start_machine
from ._machine import Machine as Machine
from ._machine import MachineState as MachineState
from ._config import MachineConfig as MachineConfig
from ._config import ChannelFds as ChannelFds
from ._config import FdSpec as FdSpec
from ._config import kvm_usable as kvm_usable
from ._config import resolve_accel as resolve_accel
from ._capabilities import QemuCapabilities as QemuCapabilities
from ._capabilities import qemu_capabilities as qemu_capabilities
from ._keys import KEY_NAMES as KEY_NAMES

# -- QMP and events ------------------------------------------------------------------
from ._qmp import QMPClient as QMPClient
from ._qmp import open_qmp as open_qmp
from qemu.qmp import ExecuteError as ExecuteError
from ._events import QMPEvent as QMPEvent
from ._events import Subscription as Subscription
from ._events import event_match as event_match

# -- Console and guest shell ---------------------------------------------------------
from ._console import Console as Console
from ._shell import Shell as Shell
from ._shell import GuestResult as GuestResult

# -- The tiny guest, the guest agent, migration, qtest -------------------------------
from .guest import GuestImage as GuestImage
from .guest import build_guest as build_guest
from .guest import ensure_guest as ensure_guest
from .agent import GuestAgent as GuestAgent
from .agent import open_agent as open_agent
from .migration import incoming_config as incoming_config
from .migration import migrate as migrate
from .qtest import QtestMachine as QtestMachine
from .qtest import open_qtest_machine as open_qtest_machine

# -- Snapshots: boot once, fork many -------------------------------------------------
from .snapshot import Template as Template
from .snapshot import ensure_template as ensure_template
from .snapshot import open_clone as open_clone
from .snapshot import open_clones as open_clones
from .snapshot import open_template as open_template

# -- Disks and block jobs -------------------------------------------------------------
from .block import Drive as Drive
from .block import Job as Job
from .block import JobInfo as JobInfo
from .block._errors import BlockError as BlockError
from .block._errors import BlockTimeout as BlockTimeout
from .block._errors import JobError as JobError
from .block._errors import JobTimeout as JobTimeout
from .block._errors import ImageError as ImageError
from .block._errors import ImageTimeout as ImageTimeout

# -- Errors (the tree is drawn in trio_qemu._errors) ---------------------------------
from ._errors import MachineError as MachineError
from ._errors import LaunchError as LaunchError
from ._errors import MachineExited as MachineExited
from ._errors import MachineTimeout as MachineTimeout
from ._errors import AbnormalShutdown as AbnormalShutdown
from ._errors import ConsoleError as ConsoleError
from ._errors import ConsoleTimeout as ConsoleTimeout
from ._errors import ConsoleClosed as ConsoleClosed
from ._errors import ConsoleFailure as ConsoleFailure
from ._errors import EventsDropped as EventsDropped
from ._errors import QMPTimeout as QMPTimeout
from ._errors import QMPConnectionClosed as QMPConnectionClosed
from ._errors import QMPProtocolError as QMPProtocolError
from ._errors import QMPGreetingError as QMPGreetingError
from ._errors import QMPNegotiationError as QMPNegotiationError
from ._errors import QMPBadMessage as QMPBadMessage
from ._errors import QMPUnexpectedReply as QMPUnexpectedReply
from ._errors import GuestBuildError as GuestBuildError
from ._errors import GuestCommandError as GuestCommandError
from ._errors import GuestWaitTimeout as GuestWaitTimeout
from ._errors import InvariantViolated as InvariantViolated
from ._errors import UnknownKeyError as UnknownKeyError
from ._errors import ShellError as ShellError
from ._errors import ShellTimeout as ShellTimeout
from ._errors import CopyError as CopyError
from ._errors import RelayError as RelayError
from ._errors import RelayTimeout as RelayTimeout
from ._errors import GuestStreamBroken as GuestStreamBroken
from ._errors import GuestConnectionError as GuestConnectionError
from ._errors import GuestConnectionRefused as GuestConnectionRefused
from ._errors import TemplateError as TemplateError
from ._errors import MigrationError as MigrationError
from ._errors import QtestError as QtestError
from ._errors import QtestTimeout as QtestTimeout
from ._errors import QtestInvalidRequest as QtestInvalidRequest
from ._errors import QtestProtocolError as QtestProtocolError
from ._errors import NetworkError as NetworkError
from ._errors import NetworkTimeout as NetworkTimeout
from ._errors import AgentError as AgentError
from ._errors import AgentTimeout as AgentTimeout

# A library logs; the application decides where it goes.
_logging.getLogger("trio_qemu").addHandler(_logging.NullHandler())

__all__ = [
    # Machines
    "open_machine",
    "open_machines",
    "start_machine",
    "Machine",
    "MachineState",
    "MachineConfig",
    "ChannelFds",
    "FdSpec",
    "kvm_usable",
    "resolve_accel",
    "QemuCapabilities",
    "qemu_capabilities",
    "KEY_NAMES",
    # QMP and events
    "QMPClient",
    "open_qmp",
    "ExecuteError",
    "QMPEvent",
    "Subscription",
    "event_match",
    # Console and guest shell
    "Console",
    "Shell",
    "GuestResult",
    # The tiny guest, the guest agent, migration, qtest
    "GuestImage",
    "build_guest",
    "ensure_guest",
    "GuestAgent",
    "open_agent",
    "incoming_config",
    "migrate",
    "QtestMachine",
    "open_qtest_machine",
    # Snapshots: boot once, fork many
    "Template",
    "ensure_template",
    "open_clone",
    "open_clones",
    "open_template",
    # Disks and block jobs
    "Drive",
    "Job",
    "JobInfo",
    "BlockError",
    "BlockTimeout",
    "JobError",
    "JobTimeout",
    "ImageError",
    "ImageTimeout",
    # Errors (the tree is drawn in trio_qemu._errors)
    "MachineError",
    "LaunchError",
    "MachineExited",
    "MachineTimeout",
    "AbnormalShutdown",
    "ConsoleError",
    "ConsoleTimeout",
    "ConsoleClosed",
    "ConsoleFailure",
    "EventsDropped",
    "QMPTimeout",
    "QMPConnectionClosed",
    "QMPProtocolError",
    "QMPGreetingError",
    "QMPNegotiationError",
    "QMPBadMessage",
    "QMPUnexpectedReply",
    "GuestBuildError",
    "GuestCommandError",
    "GuestWaitTimeout",
    "InvariantViolated",
    "UnknownKeyError",
    "ShellError",
    "ShellTimeout",
    "CopyError",
    "RelayError",
    "RelayTimeout",
    "GuestStreamBroken",
    "GuestConnectionError",
    "GuestConnectionRefused",
    "TemplateError",
    "MigrationError",
    "QtestError",
    "QtestTimeout",
    "QtestInvalidRequest",
    "QtestProtocolError",
    "NetworkError",
    "NetworkTimeout",
    "AgentError",
    "AgentTimeout",
]

_publish(__name__, globals(), __all__)
