"""
Joining a TCP connection and a tunnel stream into one pipe.

Used on both ends: the cloud's forward listener joins an accepted client
connection to a stream it opened; the site's target connector joins a stream
the cloud opened to the TCP connection it made to the target. Each side is the
other's producer (as in twisted.protocols.portforward), so a slow reader on
either side holds back only this pipe. EOF is carried as EOF (half-close) and
errors as errors: a TCP reset becomes a stream RESET and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.logs import Logger

from ..adapter.eager import send_eagerly
from ..adapter.net import set_nodelay
from ..adapter.stream import MuxStream, StreamReset
from ..mux.errors import ErrorCode


@implementer(IPushProducer)
class _Throttle:
    """
    Lets one side pause and resume the other, but not end it: the end of a
    pipe is decided by the connectionLost handlers below, which know whether
    it was clean (FIN) or not (reset), where a bare stopProducing does not.
    """

    def __init__(self, target: IPushProducer) -> None:
        self._target = target

    def pauseProducing(self) -> None:
        self._target.pauseProducing()

    def resumeProducing(self) -> None:
        self._target.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class StreamSide(Protocol):
    """
    Runs on the L{MuxStream}; writes what arrives to the TCP leg.
    """

    def __init__(self, tcp: TCPSide) -> None:
        self.tcp = tcp

    def connectionMade(self) -> None:
        stream = self.transport
        tcp_transport = self.tcp.transport
        assert isinstance(stream, MuxStream) and tcp_transport is not None
        # Each side throttles the other.
        stream.registerProducer(_Throttle(tcp_transport), True)
        tcp_transport.registerProducer(_Throttle(stream), True)

    def dataReceived(self, data: bytes) -> None:
        transport = self.tcp.transport
        if transport is not None and not self.tcp.closed:
            transport.write(data)

    def readConnectionLost(self) -> None:
        # The peer's FIN: shut down our write side of TCP, keep reading.
        transport = self.tcp.transport
        if transport is not None and not self.tcp.closed:
            if ITCPTransport.providedBy(transport):
                transport.loseWriteConnection()
            else:
                transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tcp.stream_lost(reason)


@implementer(IHalfCloseableProtocol)
class TCPSide(Protocol):
    """
    Runs on the TCP connection; writes what arrives into the stream.

    Until the stream exists (the forward listener is still opening it, the
    target connector is still connecting) bytes are kept here; the listener
    pauses reading in the meantime so that only one read can be waiting.

    @param on_closed: called once with the reason when the pipe is over.
    """

    _log = Logger()

    def __init__(self, on_closed: Callable[[Failure], None] | None = None) -> None:
        self.stream: MuxStream | None = None
        self.closed = False
        self._pending: list[bytes] = []
        self._eof_pending = False
        self._on_closed = on_closed

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        send_eagerly(self.transport)

    def join(self, stream: MuxStream) -> None:
        """
        Attach the stream: flush what we held, then pipe both ways.
        """
        self.stream = stream
        if stream.protocol is None:
            stream.attach(StreamSide(self))
        else:  # pragma: no cover - callers attach through us
            raise RuntimeError("stream already has a protocol")
        if self._pending:
            stream.write(b"".join(self._pending))
            self._pending.clear()
        if self._eof_pending:
            stream.loseWriteConnection()
        if self.closed:
            stream.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.stream is None:
            self._pending.append(data)
        else:
            self.stream.write(data)

    def readConnectionLost(self) -> None:
        if self.stream is None:
            self._eof_pending = True
        else:
            self.stream.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        stream = self.stream
        if stream is not None and not stream.disconnected:
            if isinstance(reason.value, ConnectionDone):
                stream.loseConnection()
            else:
                stream.reset(ErrorCode.CONNECTION_RESET, f"TCP connection failed: {reason.getErrorMessage()}")
        self._finished(reason)

    def stream_lost(self, reason: Failure) -> None:
        """
        The stream ended: a clean end or a refused open closes TCP
        gracefully (after what is buffered); a reset of an accepted stream
        aborts it, as a TCP RST would.
        """
        transport = self.transport
        if not self.closed and transport is not None:
            if isinstance(reason.value, StreamReset) and self.stream is not None and self.stream.accepted:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()
            else:
                transport.loseConnection()
        self._finished(reason)

    def _finished(self, reason: Failure) -> None:
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            callback(reason)
