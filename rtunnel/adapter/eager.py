"""
TCP transports that send at once when nothing is queued.

Twisted's C{FileDescriptor.write} only queues: the bytes leave on the next
reactor iteration, after C{epoll} has reported the socket writable, at the
cost of two C{epoll_ctl} calls and one more pass through the reactor. A byte
crossing rtunnel passes four such writes (cloud leg, tunnel, site leg and
back), so for small request/reply traffic and new connections that deferral is
a large share of the tunnel's latency and CPU (docs/performance.md).

L{send_eagerly} switches an established C{tcp.Server} or C{tcp.Client} to a
subclass whose C{write} first tries C{send} when its queue is empty, and
queues only what the kernel did not take. This is what C and Go servers do;
everything else (flow control, producers, half-close, loseConnection, errors)
stays Twisted's own code:

 - a partial send queues the rest through the normal C{write}, which pauses a
   streaming producer when the queue is full, as before;
 - a full socket buffer queues the bytes for the reactor's C{doWrite};
 - a reset or broken pipe ends the connection with C{ConnectionLost}, as
   C{doWrite} would, on the next reactor turn (a protocol never sees
   C{connectionLost} from inside its own C{write});
 - once anything is queued, writes queue behind it, so order is kept.

Swapping the class of a live transport is how Twisted itself once started TLS
on a TCP connection; the subclasses add no state (the eager write is a plain
mixin, and Twisted's transports already have an instance dict), so the
instance layout is the same and the swap is safe at any point of the
connection's life.

All of this reads Twisted's private write-queue state: L{rtunnel.adapter.fence}
checks every name used here once per process, and when one is missing, or
C{RTUNNEL_STOCK_IO} is set, L{send_eagerly} leaves every transport stock.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, cast

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from . import fence

if TYPE_CHECKING:
    _Connection = tcp.Connection
else:
    # At run time a plain mixin: creating the eager classes cannot fail
    # whatever the MRO of Twisted's transports, and fence.py checks that the
    # switch to a plain mixin's subclass works on them, along with every
    # private name the code below reads.
    _Connection = object


class _EagerWrite(_Connection):
    """The eager C{write} for C{tcp.Server} and C{tcp.Client} (see the module doc)."""

    def write(self, data: bytes) -> None:
        if (
            self._tempDataLen == 0
            and self.offset == len(self.dataBuffer)
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._aborting
            and not self.TLS
            and type(data) is bytes
            and data
        ):
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    self._lost_in_write(e)
                    return
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        super().write(data)  # type: ignore[no-untyped-call]  # Twisted's queued write

    def _lost_in_write(self, e: OSError) -> None:
        """
        The kernel refused the bytes for good (reset, broken pipe). The
        kernel reports a socket error only once, so this is the only place
        that knows the connection was reset: end it now, as
        C{abortConnection} does, with the reason Twisted's C{doWrite} would
        have given, on the next reactor turn and never from inside the
        caller's C{write}.
        """
        self._aborting = True
        self.stopReading()  # type: ignore[no-untyped-call]  # FileDescriptor's, unannotated
        self.stopWriting()  # type: ignore[no-untyped-call]  # FileDescriptor's, unannotated
        self.doRead = self.doWrite = _ignore  # type: ignore[method-assign]
        reason = Failure(ConnectionLost(f"{os.strerror(e.errno or 0)} while sending"))
        cast(IReactorTime, self.reactor).callLater(0, self.connectionLost, reason)


def _ignore(*args: object, **kwargs: object) -> None:
    return None


class EagerServer(_EagerWrite, tcp.Server):
    """An accepted TCP connection that sends at once (see the module doc)."""


class EagerClient(_EagerWrite, tcp.Client):
    """An outgoing TCP connection that sends at once (see the module doc)."""


_EAGER: dict[type, type] = {tcp.Server: EagerServer, tcp.Client: EagerClient}

#: Attributes Twisted's TCP connections take from their class until first
#: set, and then set in an order that depends on what the connection did
#: (a queued write, a registered producer, an abort). CPython 3.11 keeps
#: the attribute dictionaries of a class's instances compact (one shared
#: table of names, values only per instance) only while every instance
#: adds its names in the same order; one that does not gets a table of its
#: own, 768 instead of 280 bytes, which most of a tunnel server's ten
#: thousand connections had. Setting them all at once, in this order, to
#: the values they read anyway keeps the order the same for every
#: connection we own. A name Twisted no longer has is skipped.
_SET_LATER = (
    "bufferSize",
    "producer",
    "streamingProducer",
    "producerPaused",
    "dataBuffer",
    "offset",
    "disconnecting",
    "disconnected",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_aborting",
)


def send_eagerly(transport: object) -> bool:
    """
    Make an established TCP transport send writes at once when it can.

    Other transports (a TLS wrapper, a MuxStream, a test's
    C{StringTransport}, a UNIX socket) are left as they are, and so is every
    transport when this process runs on stock Twisted I/O
    (L{rtunnel.adapter.fence}).

    @return: whether C{transport} now writes eagerly.
    """
    if isinstance(transport, _EagerWrite):
        return True
    if fence.current().stock:
        return False
    eager = _EAGER.get(type(transport))
    if eager is None:
        return False
    transport.__class__ = eager
    own = vars(transport)
    for name in _SET_LATER:
        if name not in own and hasattr(eager, name):
            setattr(transport, name, getattr(eager, name))
    return True
