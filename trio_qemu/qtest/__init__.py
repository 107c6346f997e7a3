"""Drive a QEMU machine through its qtest protocol: memory, port I/O and IRQs, no guest code.

qtest is QEMU's test-server protocol: one ASCII line per request (``readl 0x100000``), one
reply line each (``OK 0x0000000012345678``, ``FAIL reason``, ``ERR reason``), answered
strictly in order, plus ``IRQ raise N`` / ``IRQ lower N`` lines that QEMU sends whenever an
intercepted interrupt line changes, at any time, also just before a reply. With ``-S`` the
guest CPUs never run, so a test reads and writes guest memory and device registers itself.

:func:`open_qtest_machine` launches a normal :class:`~trio_qemu.Machine` (QMP still works
through :attr:`QtestMachine.machine`) with one more socketpair channel, whose far end QEMU
inherits as the ``qtest`` chardev::

    async with open_qtest_machine() as qt:             # q35, -S, -nodefaults
        await qt.writel(0x100000, 0x12345678)
        assert await qt.readl(0x100000) == 0x12345678
        await qt.irq_intercept_in("ioapic")
        async with qt.irq_events() as irqs:
            ...                                        # program a device
            print(await irqs.receive(timeout=5))       # IrqEvent(irq=8, raised=True)

How the channel works:

- A reader task reads whatever QEMU sends, whenever it sends it; a request that finds data
  already there right after sending its line (QEMU often answers that fast) reads it
  itself rather than wait for the reader to wake up. Every read is handled in full before
  anything else runs, so lines are handled in wire order whoever read them. Reply lines
  are matched to requests in order; IRQ lines update :meth:`QtestMachine.get_irq` and go
  to every IRQ subscription (each a bounded channel: a full one drops the event and counts
  it, it never stalls the reader). An IRQ line QEMU sent before a reply is handled before
  that reply's caller resumes.
- Sending is serialised by a lock, and the reply slot is queued under the same lock, so
  requests go out whole and in the order their replies come back. Concurrent callers
  pipeline (at most :data:`MAX_IN_FLIGHT` requests are outstanding).
- Timeouts: the reader task's cancel scope has the earliest deadline of the requests
  waiting for replies; when it passes, the reader times those requests out
  (:class:`QtestTimeout`) and goes on. So a request needs no cancel scope of its own; one
  that must wait for a slot or for another sender uses one.
- A caller cancelled or timed out after its line went out leaves its slot behind, marked
  abandoned: the late reply is recognised and dropped, and the channel stays in step.
- QEMU's qtest server *aborts the whole VM* on a malformed line (a missing argument, a bad
  number, an empty line, a ``\\r``, a port above 0xffff, a memory access on a machine
  without CPUs, an IRQ intercept on a QOM object that is not a device...). Every line is
  checked against :data:`COMMANDS` before it is sent, and the checks QEMU's own parser
  cannot express (is this path a device? does this GPIO exist?) are made through QMP. A
  refused line raises :class:`~trio_qemu.QtestInvalidRequest` and nothing is sent.

Facts checked against Debian 12's QEMU 7.2: the chardev must be named exactly ``qtest``;
that build has no qtest accelerator, so ``clock_step``/``clock_set`` answer
``FAIL Unknown command`` (see :meth:`QtestMachine.clock_supported`); the RTC's periodic
interrupt still fires under ``-S`` (the RTC runs on the host clock).

The package's modules: ``protocol`` (the request language and its
checks, no I/O), ``channel`` (the engine: sending, the reader, IRQ
bookkeeping) and ``client`` (:class:`QtestMachine`'s typed requests and
:func:`open_qtest_machine`). Import from ``trio_qemu.qtest`` itself.
"""

from .._errors import QtestError, QtestInvalidRequest, QtestProtocolError, QtestTimeout
from .._util import publish as _publish
from .channel import MAX_IN_FLIGHT, IrqEvent, IrqSubscription
from .client import CHARDEV_ID, DEFAULT_MACHINE, QtestMachine, open_qtest_machine, qtest_args
from .protocol import COMMANDS, MAX_TRANSFER, check_line

__all__ = [
    "CHARDEV_ID",
    "COMMANDS",
    "DEFAULT_MACHINE",
    "MAX_IN_FLIGHT",
    "MAX_TRANSFER",
    "IrqEvent",
    "IrqSubscription",
    "QtestError",
    "QtestInvalidRequest",
    "QtestMachine",
    "QtestProtocolError",
    "QtestTimeout",
    "check_line",
    "open_qtest_machine",
    "qtest_args",
]

_publish(__name__, globals(), __all__)
