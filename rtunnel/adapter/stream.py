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

The seam with the tunnel connection is narrow and runs both ways through
public names only, as C{H2Stream} and C{H2Connection} do in Twisted's
C{twisted.web._http2}: the stream calls the few commands of
L{StreamConnection} (a L{typing.Protocol}, so it costs nothing at run time),
and the connection tells the stream what happened through its event methods
(L{MuxStream.data_received}, L{MuxStream.window_opened},
L{MuxStream.input_ended}, L{MuxStream.open_accepted},
L{MuxStream.tunnel_resumed}, L{MuxStream.closed}). Neither writes the
other's state: the stream owns its buffers, its pending FIN and its mark of
being held while the tunnel is paused; the connection owns the session and
the table of streams.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol, cast

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


class StreamConnection(Protocol):
    """
    What a L{MuxStream} needs of the tunnel connection it runs on, and all
    it uses of it: L{rtunnel.adapter.protocol.MuxProtocol} in production, a
    fake in the stream's own tests.

    Commands are addressed by stream id and only queue frames in the
    session (and write them out unless an input batch is being handled);
    none of them calls back into the stream, except that L{refuse_stream}
    may end the whole session (a peer whose OPENs are refused past its
    allowance), which ends this stream among the others.
    """

    @property
    def paused(self) -> bool:
        """The tunnel's own transport paused it: streams hold their producers."""
        ...

    @property
    def peer_label(self) -> str:
        """The tunnel peer's address, for L{MuxStream.getPeer}."""
        ...

    @property
    def host_label(self) -> str:
        """Our end's address, for L{MuxStream.getHost}."""
        ...

    def send_window(self, stream_id: int) -> int:
        """How many bytes the stream may send now (0 once it is gone)."""
        ...

    def send_data(self, stream_id: int, data: bytes) -> int:
        """
        Send as much of C{data} as the send window allows now and return
        how many bytes that was; the rest is the caller's to keep.
        """
        ...

    def end_stream(self, stream_id: int) -> bool:
        """
        Send FIN. C{True} if that closed the stream (the peer's FIN came
        first); C{False} also when the stream is already gone.
        """
        ...

    def consumed(self, stream_id: int, size: int) -> None:
        """C{size} received bytes were handed to the consumer: credit may go back."""
        ...

    def accept_stream(self, stream_id: int) -> None:
        """Answer the peer's OPEN with OPEN_OK."""
        ...

    def refuse_stream(self, stream_id: int, code: int, reason: str) -> None:
        """Answer the peer's OPEN with OPEN_FAIL (if the stream still exists) and log it."""
        ...

    def reset_stream(self, stream_id: int, code: int, reason: str) -> None:
        """Send RESET, if the stream still exists in the session."""
        ...

    def hold_stream(self, stream: MuxStream) -> None:
        """
        C{stream} paused its producer because the tunnel is paused: call its
        L{MuxStream.tunnel_resumed} when the tunnel resumes.
        """
        ...

    def forget_stream(self, stream_id: int) -> None:
        """The stream has ended: drop it (and finish a drain it held up)."""
        ...


@implementer(ITransport, IConsumer, IPushProducer)
class MuxStream:
    """
    A stream of a tunnel connection; created by the connection, never
    directly.

    @ivar opened: fires with this stream when the peer accepted it (OPEN_OK),
        fails with L{StreamOpenFailed}. Only for streams we opened.
    """

    _log = Logger()

    def __init__(self, conn: StreamConnection, stream_id: int, host: str, port: int, local: bool) -> None:
        self._mux = conn
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
        #: our producer is paused because the tunnel is, and the connection
        #: knows (L{StreamConnection.hold_stream}): told once per pause
        self._held = False
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
        self._mux.accept_stream(self.stream_id)
        self.accepted = True
        if not self.opened.called:
            self.opened.callback(self)
        if protocol is not None:
            self.attach(protocol)

    def refuse(self, code: int, reason: str) -> None:
        """
        Answer the peer's OPEN with OPEN_FAIL.
        """
        self._mux.refuse_stream(self.stream_id, code, reason)
        self._terminate(Failure(StreamReset(code, reason)))

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
            size = len(data)
            sent = self._mux.send_data(self.stream_id, data)
            if sent < size:
                # A view: the rest of a large write is kept without a copy.
                self._outbuf.append(memoryview(data)[sent:] if sent else data)
                self._outlen += size - sent
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
        self._flush_outbound()

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
        self._mux.reset_stream(self.stream_id, code, reason)
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

    @property
    def send_blocked(self) -> bool:
        """Bytes wait for credit."""
        return bool(self._outbuf)

    # -- events, told by the connection --------------------------------------

    def data_received(self, data: bytes) -> None:
        """The peer's DATA: deliver it now, or keep it while delivery waits."""
        if self.protocol is None or self._read_paused or self._inbuf:
            self._inbuf.append(data)
            return
        if self._deliver(self.protocol.dataReceived, data):
            self._mux.consumed(self.stream_id, len(data))

    def window_opened(self) -> None:
        """The peer returned credit: send what waits for it, then a wanted FIN."""
        self._flush_outbound()

    def input_ended(self) -> None:
        """The peer's FIN: it sends no more; tell our protocol once what came before is delivered."""
        self._eof_received = True
        self._drain_inbound()

    def open_accepted(self) -> None:
        """The peer answered our OPEN with OPEN_OK."""
        if not self.opened.called:
            self.accepted = True
            self.opened.callback(self)

    def tunnel_resumed(self) -> None:
        """The tunnel that held our producer (L{StreamConnection.hold_stream}) resumed."""
        self._held = False
        self._update_producer()

    def closed(self, reason: Failure) -> None:
        """
        The stream ended in the session. A reset (L{StreamReset}: the
        peer's RESET or OPEN_FAIL, a broken rule, the tunnel's end) ends it
        now, dropping what is buffered; a clean close delivers what arrived
        before it first.
        """
        if isinstance(reason.value, StreamReset):
            self._terminate(reason)
            return
        self._end_reason = reason
        self._drain_inbound()

    # -- internals -------------------------------------------------------------

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

    def _flush_outbound(self) -> None:
        """Send what credit allows of the buffer, then a wanted FIN; pause or resume our producer to match."""
        if self._outbuf:
            data = self._take_outbound(self._mux.send_window(self.stream_id))
            if data:
                self._mux.send_data(self.stream_id, data)
        self._send_fin()
        self._update_producer()

    def _send_fin(self) -> None:
        """Send the FIN asked for, once nothing waits before it."""
        if not self._fin_wanted or self._outbuf or self._fin_sent:
            return
        self._fin_sent = True
        closed = self._mux.end_stream(self.stream_id)
        self._write_closed()
        if closed:
            self.closed(CLEAN_CLOSE)

    def _update_producer(self) -> None:
        """Pause our producer while bytes wait for credit or the tunnel is
        paused; resume it otherwise."""
        producer = self._producer
        if producer is None:
            return
        if self._outbuf:
            should_pause = True
        elif self._mux.paused:
            should_pause = True
            if not self._held:
                self._held = True
                self._mux.hold_stream(self)
        else:
            should_pause = False
        if should_pause and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not should_pause and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

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
                self._mux.reset_stream(self.stream_id, ErrorCode.INTERNAL_ERROR, "application error")
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
            self._mux.consumed(self.stream_id, len(chunk))
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
        self._mux.forget_stream(self.stream_id)
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
