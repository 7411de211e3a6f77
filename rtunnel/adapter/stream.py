"""
One multiplexed stream, presented to Twisted code as a transport.

Any existing L{IProtocol} can run on a L{MuxStream} unchanged: it gets
C{makeConnection}, C{dataReceived}, C{readConnectionLost} (if it is an
L{IHalfCloseableProtocol}) and C{connectionLost} exactly as on TCP.

Backpressure, both ways:
 - Outbound, the stream is an L{IConsumer}: bytes beyond the send window wait
   in the stream and its producer is paused until the peer returns credit (or
   while the whole tunnel connection is paused by its own transport).
 - Inbound, the stream is an L{IPushProducer}: while its consumer has paused
   it, received bytes wait here and no credit goes back, so the peer stops
   after one window. Credit returns only after C{dataReceived} returned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

from attrs import frozen
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.logs import Logger

from ..mux.errors import ErrorCode, code_name

if TYPE_CHECKING:
    from .protocol import MuxProtocol


@implementer(IAddress)
@frozen
class StreamAddress:
    """
    The address of one end of a tunnelled stream: the target it was opened
    to, on which tunnel connection (C{via}: the TLS peer), as stream C{stream_id}.
    """

    host: str
    port: int
    stream_id: int
    via: str = ""


class StreamOpenFailed(Exception):
    """
    The peer refused to open the stream, or the tunnel went away first.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{code_name(self.code)}: {self.reason}"


class StreamReset(ConnectionLost):
    """
    The stream ended abruptly with a RESET (or its tunnel was lost).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code_name(code)}: {reason}")
        self.code = code
        self.reason = reason


@implementer(ITransport, IConsumer, IPushProducer)
class MuxStream:
    """
    A stream of a L{MuxProtocol}; created by the protocol, never directly.

    @ivar opened: fires with this stream when the peer accepted it (OPEN_OK),
        fails with L{StreamOpenFailed}. Only for streams we opened.
    """

    _log = Logger()

    def __init__(self, mux: MuxProtocol, stream_id: int, host: str, port: int, local: bool) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self.host = host
        self.port = port
        self.local = local
        self.opened: defer.Deferred[MuxStream] = defer.Deferred()
        self.protocol: IProtocol | None = None
        self.connected = False
        self.disconnected = False
        #: the target end answered OPEN_OK (or we did, for a peer's stream)
        self.accepted = False
        # outbound
        self._outbuf: deque[bytes | memoryview] = deque()
        self._outlen = 0
        self._fin_wanted = False
        self._fin_sent = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        # inbound
        self._inbuf: deque[bytes] = deque()
        self._read_paused = False
        self._eof_received = False
        self._eof_delivered = False
        self._end_reason: Failure | None = None
        #: why the stream ended, once it has
        self._lost_reason: Failure | None = None

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.host}:{self.port}>"

    # -- attaching an application ------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """
        Connect C{protocol} to this stream, then hand it any bytes that
        arrived before (early data).
        """
        if self.protocol is not None:
            raise RuntimeError(f"{self!r} already has a protocol")
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)
        self._drain_inbound()

    def accept(self, protocol: IProtocol | None = None) -> None:
        """
        Answer the peer's OPEN with OPEN_OK and connect C{protocol} (or
        leave attaching to the caller).

        If the stream already ended (the opener gave up while we were
        connecting to the target) nothing is sent: C{protocol} is connected
        and at once gets C{connectionLost} with that reason, so it can close
        its own leg.
        """
        if self.disconnected:
            if protocol is not None and self.protocol is None:
                self.protocol = protocol
                protocol.makeConnection(self)
                protocol.connectionLost(self._lost_reason or CLEAN_CLOSE)
            return
        self._mux._accept(self)
        if protocol is not None:
            self.attach(protocol)

    def refuse(self, code: int, reason: str) -> None:
        """
        Answer the peer's OPEN with OPEN_FAIL.
        """
        self._mux._refuse(self, code, reason)

    # -- ITransport ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._fin_wanted or self.disconnected or not data:
            return
        if type(data) is not bytes:
            # Buffered parts are kept as views; a view of the caller's
            # bytearray would stop them resizing it.
            data = bytes(data)
        if self._outbuf:
            self._outbuf.append(data)
            self._outlen += len(data)
        else:
            self._mux._send(self, data)
        self._update_producer()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        Send FIN once buffered bytes are out (TCP's shutdown(SHUT_WR)); the
        peer's direction keeps flowing.
        """
        if self._fin_wanted or self.disconnected:
            return
        self._fin_wanted = True
        self._mux._flush_stream(self)

    def loseConnection(self) -> None:
        """
        End our direction gracefully. The stream closes when the peer's FIN
        arrives too (a stream's peer sees a TCP FIN, not a reset).
        """
        self.loseWriteConnection()

    def abortConnection(self) -> None:
        """
        End both directions now with RESET CANCEL; buffered bytes are dropped.
        """
        self.reset(ErrorCode.CANCEL, "aborted by the local application")

    def reset(self, code: int, reason: str) -> None:
        """
        End both directions now with RESET C{code}.
        """
        if self.disconnected:
            return
        self._mux._reset(self, code, reason)
        self._terminate(Failure(StreamReset(code, reason)))

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.host, self.port, self.stream_id, self._mux.peer_label)

    def getHost(self) -> StreamAddress:
        return StreamAddress(self.host, self.port, self.stream_id, self._mux.host_label)

    # -- IConsumer -----------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if not streaming:
            raise ValueError("MuxStream takes streaming (push) producers only")
        producer = cast(IPushProducer, producer)
        self._producer = producer
        self._producer_paused = False
        if self.disconnected:
            producer.stopProducing()
            return
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    # -- IPushProducer: our consumer pauses delivery to it -------------------

    def pauseProducing(self) -> None:
        self._read_paused = True

    def resumeProducing(self) -> None:
        self._read_paused = False
        self._drain_inbound()
        self._mux._flush()

    def stopProducing(self) -> None:
        """
        Our consumer is gone: if the peer may still send, nobody can take
        it any more, so reset; otherwise just finish our direction.
        """
        if self.disconnected:
            return
        if self._eof_received:
            self.loseConnection()
        else:
            self.reset(ErrorCode.CANCEL, "local consumer closed")

    # -- called by MuxProtocol -----------------------------------------------

    @property
    def send_blocked(self) -> bool:
        """Bytes wait for credit."""
        return bool(self._outbuf)

    def _take_outbound(self, window: int) -> bytes:
        """Remove up to C{window} buffered bytes for sending."""
        if not self._outbuf or window <= 0:
            return b""
        if self._outlen <= window and len(self._outbuf) == 1:
            data = bytes(self._outbuf.popleft())
        else:
            parts: list[bytes | memoryview] = []
            taken = 0
            while self._outbuf and taken < window:
                chunk = self._outbuf.popleft()
                room = window - taken
                if len(chunk) > room:
                    # A view, not a slice: copying the rest of one big write at
                    # every window update made a single large write quadratic.
                    view = memoryview(chunk)
                    self._outbuf.appendleft(view[room:])
                    chunk = view[:room]
                parts.append(chunk)
                taken += len(chunk)
            data = b"".join(parts)
        self._outlen -= len(data)
        return data

    def _buffer_outbound(self, data: bytes | memoryview) -> None:
        self._outbuf.append(data)
        self._outlen += len(data)

    def _update_producer(self) -> None:
        """Pause our producer while bytes wait for credit or the tunnel is
        paused; resume it otherwise."""
        producer = self._producer
        if producer is None:
            return
        should_pause = bool(self._outbuf) or self._mux.paused
        if self._mux.paused and not self._outbuf:
            self._mux._hold(self)
        if should_pause and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not should_pause and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    def _data_received(self, data: bytes) -> None:
        if self.protocol is None or self._read_paused or self._inbuf:
            self._inbuf.append(data)
            return
        if self._deliver(self.protocol.dataReceived, data):
            self._mux._consumed(self, len(data))

    def _deliver(self, method: Callable[..., object], *args: bytes) -> bool:
        """
        Call one of our protocol's methods. If it raises, reset this stream
        only (as TCP drops just that connection) instead of letting the
        exception end the tunnel's C{dataReceived} and so every stream.
        """
        try:
            method(*args)
        except Exception:
            failure = Failure()
            self._log.failure(
                "protocol of stream {streamID} raised; resetting the stream", failure, streamID=self.stream_id
            )
            if not self.disconnected:
                self._mux._reset(self, ErrorCode.INTERNAL_ERROR, "application error")
                self._terminate(failure)
            return False
        return True

    def _write_closed(self) -> None:
        """Our FIN went out: tell a half-closeable protocol, as TCP does."""
        half = IHalfCloseableProtocol(self.protocol, None) if self.protocol is not None else None
        if half is not None and not self.disconnected:
            try:
                half.writeConnectionLost()
            except Exception:
                self._log.failure("writeConnectionLost of stream {streamID} raised", streamID=self.stream_id)

    def _eof(self) -> None:
        self._eof_received = True
        self._drain_inbound()

    def _closed(self, reason: Failure) -> None:
        """The stream ended in the session; deliver what is buffered first
        unless it was a reset."""
        if isinstance(reason.value, StreamReset):
            self._terminate(reason)
            return
        self._end_reason = reason
        self._drain_inbound()

    def _drain_inbound(self) -> None:
        protocol = self.protocol
        if protocol is None:
            if self._end_reason is not None:
                self._terminate(self._end_reason)
            return
        while self._inbuf and not self._read_paused and not self.disconnected:
            chunk = self._inbuf.popleft()
            if not self._deliver(protocol.dataReceived, chunk):
                return
            self._mux._consumed(self, len(chunk))
        if self._inbuf or self._read_paused or self.disconnected:
            return
        if self._eof_received and not self._eof_delivered:
            self._eof_delivered = True
            half = IHalfCloseableProtocol(protocol, None)
            if half is not None:
                if not self._deliver(half.readConnectionLost):
                    return
            else:
                self.loseConnection()
        if self._end_reason is not None:
            self._terminate(self._end_reason)

    def _terminate(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = False
        self._lost_reason = reason
        self._inbuf.clear()
        self._outbuf.clear()
        self._outlen = 0
        self._mux._forget(self)
        if not self.opened.called:
            if isinstance(reason.value, StreamReset):
                self.opened.errback(StreamOpenFailed(reason.value.code, reason.value.reason))
            else:
                self.opened.errback(StreamOpenFailed(ErrorCode.CANCEL, "stream ended before it opened"))
            if not self.local:
                # Only the opener watches `opened`; on a stream the peer opened
                # nobody does. The opener's failure stays for its errbacks
                # (swallowing it here made later callbacks fire with None).
                self.opened.addErrback(lambda f: None)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        protocol = self.protocol
        if protocol is not None:
            try:
                protocol.connectionLost(reason)
            except Exception:
                self._log.failure(
                    "connectionLost of {protocol!r} on stream {streamID} raised",
                    protocol=protocol,
                    streamID=self.stream_id,
                )


CLEAN_CLOSE = Failure(ConnectionDone("stream closed cleanly"))
