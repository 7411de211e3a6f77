"""
The adapter over TLS: in memory (iosim + TLSMemoryBIOFactory) for the
session lifecycle, once over real loopback sockets for bulk data, and the
tuned TLS factories (rtunnel.adapter.tls) over loopback on the fast path and
on stock Twisted I/O.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from twisted.internet import defer, tcp
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial import unittest
from zope.interface import implementer

from rtunnel.adapter import MuxProtocol, MuxStream, fence
from rtunnel.adapter.eager import EagerClient, EagerServer
from rtunnel.adapter.tls import BulkTLSClientEndpoint, BulkTLSFactory, BulkTLSProtocol
from tests.adapter_helpers import (
    MIB,
    Acceptor,
    HalfCloseEcho,
    HalfCloseRecorder,
    PatternSource,
    StreamingWriter,
    make_tls_material,
    pump_all,
)

_MATERIAL: tuple[bytes, bytes] | None = None


def tls_material() -> tuple[bytes, bytes]:
    """One CA and server certificate for the whole module (generation costs)."""
    global _MATERIAL
    if _MATERIAL is None:
        _MATERIAL = make_tls_material("localhost")
    return _MATERIAL


def tls_options() -> tuple[object, object]:
    ca_pem, server_pem = tls_material()
    server = PrivateCertificate.loadPEM(server_pem).options()
    client = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca_pem))
    return server, client


class MuxFactory(Factory):
    """Builds MuxProtocols and remembers them."""

    def __init__(self, build: Callable[[], MuxProtocol]) -> None:
        self.build = build
        self.built: list[MuxProtocol] = []

    def buildProtocol(self, addr: object) -> MuxProtocol:  # type: ignore[override]
        mux = self.build()
        mux.factory = self
        self.built.append(mux)
        return mux


class InMemoryTLSTests(unittest.SynchronousTestCase):
    def _pair(
        self, handler: Callable[[MuxStream], None] | None = None
    ) -> tuple[MuxProtocol, MuxProtocol, object, Clock]:
        clock = Clock()
        server_options, client_options = tls_options()
        server_muxes = MuxFactory(lambda: MuxProtocol(initiator=False, clock=clock, stream_handler=handler))
        client_muxes = MuxFactory(lambda: MuxProtocol(initiator=True, clock=clock))
        server_tls = TLSMemoryBIOFactory(server_options, False, server_muxes, clock=clock)
        client_tls = TLSMemoryBIOFactory(client_options, True, client_muxes, clock=clock)
        _, _, pump = connectedServerAndClient(
            lambda: server_tls.buildProtocol(None), lambda: client_tls.buildProtocol(None), clock=clock
        )
        pump_all(pump)
        return client_muxes.built[0], server_muxes.built[0], pump, clock

    def test_session_over_tls(self) -> None:
        """
        Two MuxProtocols run over in-memory TLS: HELLOs cross after the
        handshake and a stream echoes data, half-closes and ends cleanly.
        """
        acceptor = Acceptor(HalfCloseEcho)
        client, server, pump, _ = self._pair(acceptor)
        self.assertTrue(client.ready and server.ready)
        stream = client.open_stream("localhost", 7)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        stream.write(b"ping over tls")
        stream.loseConnection()
        pump_all(pump)  # type: ignore[arg-type]
        self.assertEqual(bytes(mine.data), b"ping over tls")
        self.assertTrue(mine.read_closed)
        self.assertIsInstance(mine.lost.value, ConnectionDone)  # type: ignore[union-attr]

    def test_drain_closes_tls_connection(self) -> None:
        """
        A drain over TLS really closes the connection once the streams are
        done: the TLS layer does not shut down while a producer is
        registered, so the mux must let go of it first.
        """
        acceptor = Acceptor(HalfCloseEcho)
        client, server, pump, _ = self._pair(acceptor)
        stream = client.open_stream("localhost", 7)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump_all(pump)  # type: ignore[arg-type]
        done = server.drain(30.0)
        stream.loseConnection()
        pump_all(pump)  # type: ignore[arg-type]
        self.assertIsInstance(mine.lost.value, ConnectionDone)  # type: ignore[union-attr]
        self.assertIsInstance(self.successResultOf(done), ConnectionDone)
        self.successResultOf(client.when_closed())

    def test_terminate_closes_tls_connection(self) -> None:
        """C{terminate} over TLS closes the connection at both ends."""
        client, server, pump, _ = self._pair()
        client.terminate(2, "internal error")
        pump_all(pump)  # type: ignore[arg-type]
        self.successResultOf(client.when_closed())
        self.successResultOf(server.when_closed())


@implementer(IHalfCloseableProtocol)
class DigestReply(Protocol):
    """Hashes everything received; on FIN answers with the count and the SHA-256, then FIN."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.write(b"%d %s" % (self.count, self.hash.hexdigest().encode()))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class UploadClient(Protocol):
    """Sends a L{PatternSource} with a producer, then collects the reply."""

    def __init__(self, source: PatternSource) -> None:
        self.source = source
        self.reply = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.writer: StreamingWriter | None = None

    def connectionMade(self) -> None:
        assert isinstance(self.transport, MuxStream)
        self.writer = StreamingWriter(self.transport, self.source)
        self.writer.start()

    def dataReceived(self, data: bytes) -> None:
        self.reply += data

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if reason.check(ConnectionDone):
            self.done.callback(self.reply)
        else:
            self.done.errback(reason)


class RealTLSTests(unittest.TestCase):
    timeout = 60

    SIZE = 100 * MIB
    CHUNK = 64 * 1024

    @defer.inlineCallbacks
    def test_100mb_over_loopback_tls(self):  # type: ignore[no-untyped-def]
        """
        Two MuxProtocols over real TLS on loopback carry 100 MB through one
        stream from a producer-driven sender; the far end's SHA-256 of what
        it received matches the sender's, and the session then drains and
        closes at both ends.
        """
        from twisted.internet import reactor

        server_options, client_options = tls_options()
        server_muxes = MuxFactory(
            lambda: MuxProtocol(initiator=False, clock=reactor, stream_handler=Acceptor(DigestReply))
        )
        port = yield SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(server_muxes)
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        client = yield endpoint.connect(MuxFactory(lambda: MuxProtocol(initiator=True, clock=reactor)))
        self.addCleanup(lambda: client.transport.abortConnection() if not client.when_closed().called else None)
        yield client.when_ready()

        source = PatternSource(self.SIZE, self.CHUNK)
        uploader = UploadClient(source)
        stream = client.open_stream("localhost", 9)
        stream.attach(uploader)
        reply = yield uploader.done

        count, digest = reply.split()
        self.assertEqual(int(count), self.SIZE)
        self.assertEqual(digest.decode(), source.digest().hex())
        self.assertGreater(uploader.writer.pauses, 0)  # type: ignore[union-attr]

        [server] = server_muxes.built
        closed = server.when_closed()
        reason = yield client.drain(10.0)
        self.assertIsInstance(reason, ConnectionDone)
        yield closed


class Echo(Protocol):
    """Sends back what it receives; reports when its connection is gone."""

    def __init__(self) -> None:
        self.made: defer.Deferred[Echo] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class Collector(Protocol):
    """Counts and hashes what comes back; fires C{done} at C{want} bytes."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.count = 0
        self.hash = hashlib.sha256()
        self.done: defer.Deferred[str] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)
        if self.count >= self.want and not self.done.called:
            self.done.callback(self.hash.hexdigest())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


#: What the loopback tests echo: several MiB, so that writes exceed one TLS
#: record, the bulk protocol's write chunk and the socket buffers.
PAYLOAD = random.Random(20261210).randbytes(3 * MIB)


class BulkTLSLoopbackTests(unittest.TestCase):
    """
    L{BulkTLSFactory} and L{BulkTLSClientEndpoint} over real loopback
    sockets, in both I/O modes: the bytes arrive whole and in order, and the
    protocol and transport classes are the tuned ones on the fast path and
    Twisted's own on stock I/O (L{rtunnel.adapter.fence}).
    """

    timeout = 30

    def setUp(self) -> None:
        self.addCleanup(fence.restore, fence.current())

    @defer.inlineCallbacks
    def echo_through(self, payload: bytes):  # type: ignore[no-untyped-def]
        """
        Connect a client to an echo server, both through the adapter's
        factories, send C{payload} in pieces of several sizes, check that it
        all comes back, close; return (server side, client side) protocols.
        """
        from twisted.internet import reactor

        server_options, client_options = tls_options()
        echoes: list[Echo] = []

        def build_echo() -> Echo:
            echoes.append(Echo())
            return echoes[-1]

        server_factory = BulkTLSFactory(server_options, False, Factory.forProtocol(build_echo), clock=reactor)
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = BulkTLSClientEndpoint(
            client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reactor
        )
        client = yield endpoint.connect(Factory.forProtocol(lambda: Collector(len(payload))))
        [echo] = echoes
        yield echo.made
        for start, end in ((0, 1), (1, 100), (100, 70_000), (70_000, len(payload))):
            client.transport.write(payload[start:end])
        digest = yield client.done
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        tls_client, tls_server = client.transport, echo.transport
        tcp_client, tcp_server = tls_client.transport, tls_server.transport
        client.transport.loseConnection()
        yield defer.gatherResults([client.lost, echo.lost])
        return (tls_server, tcp_server), (tls_client, tcp_client)

    @defer.inlineCallbacks
    def test_fast_path(self):  # type: ignore[no-untyped-def]
        """
        With every internal in place: L{BulkTLSProtocol} at both ends, over
        TCP transports that write eagerly, and 3 MiB echoed intact.
        """
        fence.restore(fence.IOMode(stock=False))
        (tls_server, tcp_server), (tls_client, tcp_client) = yield self.echo_through(PAYLOAD)
        self.assertIs(type(tls_server), BulkTLSProtocol)
        self.assertIs(type(tls_client), BulkTLSProtocol)
        self.assertIs(type(tcp_server), EagerServer)
        self.assertIs(type(tcp_client), EagerClient)

    @defer.inlineCallbacks
    def test_stock_io(self):  # type: ignore[no-untyped-def]
        """
        With C{RTUNNEL_STOCK_IO=1} the same factories build Twisted's own
        TLS protocol and leave Twisted's TCP transports as they are; the
        bytes still arrive intact.
        """
        fence.settle({fence.STOCK_IO_ENV: "1"}, log=Logger(observer=lambda event: None))
        (tls_server, tcp_server), (tls_client, tcp_client) = yield self.echo_through(PAYLOAD)
        self.assertIs(type(tls_server), TLSMemoryBIOFactory.protocol)
        self.assertIs(type(tls_client), TLSMemoryBIOFactory.protocol)
        self.assertIs(type(tcp_server), tcp.Server)
        self.assertIs(type(tcp_client), tcp.Client)
