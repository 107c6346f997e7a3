"""Launch and control QEMU virtual machines with Trio structured concurrency.

The public surface is re-exported here explicitly; everything in the underscore modules is
private and may change.
"""

from qemu.qmp import ExecuteError as ExecuteError

from ._errors import AbnormalShutdown as AbnormalShutdown
from ._errors import ConsoleFailure as ConsoleFailure
from ._errors import ConsoleTimeout as ConsoleTimeout
from ._errors import EventsDropped as EventsDropped
from ._errors import LaunchError as LaunchError
from ._errors import MachineError as MachineError
from ._errors import MachineExited as MachineExited
from ._errors import QMPBadMessage as QMPBadMessage
from ._errors import QMPConnectionClosed as QMPConnectionClosed
from ._errors import QMPGreetingError as QMPGreetingError
from ._errors import QMPNegotiationError as QMPNegotiationError
from ._errors import QMPProtocolError as QMPProtocolError
from ._errors import QMPTimeout as QMPTimeout
from ._errors import QMPUnexpectedReply as QMPUnexpectedReply
from ._events import QMPEvent as QMPEvent
from ._events import Subscription as Subscription
from ._events import event_match as event_match
from ._qmp import QMPClient as QMPClient
from ._qmp import open_qmp as open_qmp

__all__ = [
    "AbnormalShutdown",
    "ConsoleFailure",
    "ConsoleTimeout",
    "EventsDropped",
    "ExecuteError",
    "LaunchError",
    "MachineError",
    "MachineExited",
    "QMPBadMessage",
    "QMPClient",
    "QMPConnectionClosed",
    "QMPEvent",
    "QMPGreetingError",
    "QMPNegotiationError",
    "QMPProtocolError",
    "QMPTimeout",
    "QMPUnexpectedReply",
    "Subscription",
    "event_match",
    "open_qmp",
]
