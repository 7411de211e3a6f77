"""
Eager TCP writes (rtunnel.adapter.eager) on real loopback sockets.

The property that matters: a write on an idle connection leaves in the call
itself (nothing queued, no writer registered with the reactor), while
everything Twisted's queued path guarantees still holds: order, every byte,
producer pausing, half-close, and errors reported through connectionLost
rather than raised from write(). On stock Twisted I/O (rtunnel.adapter.fence)
transports are left as Twisted made them.
"""

from __future__ import annotations

import hashlib
import socket

from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel.adapter import fence
from rtunnel.adapter.eager import EagerClient, EagerServer, send_eagerly


class Sink(Protocol):
    """Counts and hashes what arrives; fires C{done} when the peer closes."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.done: defer.Deferred[int] = defer.Deferred()
        self.arrived: defer.Deferred[None] | None = None
        self.want = 0
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.arrived is not None and self.received >= self.want:
            arrived, self.arrived = self.arrived, None
            arrived.callback(None)

    def wait_for(self, count: int) -> defer.Deferred[None]:
        self.want = count
        self.arrived = defer.Deferred()
        if self.received >= count:
            self.arrived, arrived = None, self.arrived
            arrived.callback(None)
        return self.arrived

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(self.received)


class Held(Protocol):
    """The end under test: keeps its transport; reports how it ended."""

    def __init__(self) -> None:
        self.made: defer.Deferred[Held] = defer.Deferred()
        # The exception, not the Failure: a Failure passed to callback() would
        # turn into an errback.
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(reason.value)


class Producer:
    """A streaming producer that records pause/resume."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.resumes += 1

    def stopProducing(self) -> None:
        pass


class EagerWriteTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def connect(self, server_side_under_test: bool = True, switch: bool = True):  # type: ignore[no-untyped-def]
        """
        A real loopback connection: returns (held, sink) where C{held} is the
        end under test (its transport switched to eager writes unless
        C{switch} is false) and C{sink} the other end.
        """
        from twisted.internet import reactor

        held = Held()
        sink = Sink()
        server_protocol = held if server_side_under_test else sink
        client_protocol = sink if server_side_under_test else held
        factory = Factory.forProtocol(lambda: server_protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client_factory = ClientFactory.forProtocol(lambda: client_protocol)
        reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        yield defer.gatherResults([held.made, sink.made])
        self.addCleanup(lambda: held.transport.abortConnection() if held.transport.connected else None)
        if switch:
            self.assertTrue(send_eagerly(held.transport))
        return held, sink

    @defer.inlineCallbacks
    def test_stock_io_leaves_transports_alone(self):  # type: ignore[no-untyped-def]
        """
        On stock Twisted I/O (RTUNNEL_STOCK_IO, or an internal missing) a
        transport keeps Twisted's class and its queued write: the bytes wait
        for the reactor, and still arrive.
        """
        from twisted.internet import reactor

        self.addCleanup(fence.restore, fence.current())
        fence.restore(fence.IOMode(stock=True, forced=True))
        for server_side in (True, False):
            held, sink = yield self.connect(server_side_under_test=server_side, switch=False)
            self.assertFalse(send_eagerly(held.transport))
            self.assertIs(type(held.transport), tcp.Server if server_side else tcp.Client)
            held.transport.write(b"ping")
            self.assertEqual(held.transport._tempDataLen, 4)
            self.assertIn(held.transport, reactor.getWriters())
            yield sink.wait_for(4)

    @defer.inlineCallbacks
    def test_idle_write_leaves_at_once(self):  # type: ignore[no-untyped-def]
        """
        On an idle connection a small write is sent inside write(): nothing
        is queued and the reactor is not asked to watch for writability.
        """
        from twisted.internet import reactor

        held, sink = yield self.connect()
        self.assertIsInstance(held.transport, EagerServer)
        held.transport.write(b"ping")
        self.assertEqual(held.transport._tempDataLen, 0)
        self.assertEqual(held.transport.dataBuffer, b"")
        self.assertNotIn(held.transport, reactor.getWriters())
        yield sink.wait_for(4)
        self.assertEqual(sink.received, 4)

    @defer.inlineCallbacks
    def test_later_attributes_are_set_at_once_in_one_order(self):  # type: ignore[no-untyped-def]
        """
        The attributes Twisted sets on a connection only later (producer,
        write buffer, closing flags) are set when it is switched, in one
        order for every connection, to the values they read anyway: what
        the connection does first no longer decides the order of its
        attribute dictionary (CPython shares the names only while it is
        the same), and nothing it reads changes.
        """
        from rtunnel.adapter.eager import _SET_LATER

        held, _ = yield self.connect()
        transport = held.transport
        names = [name for name in vars(transport) if name in _SET_LATER]
        self.assertEqual(names, [name for name in _SET_LATER if hasattr(type(transport), name)])
        for name in names:
            if name != "bufferSize":
                self.assertEqual(getattr(transport, name), getattr(type(transport), name), name)
        self.assertIsNone(transport.producer)
        self.assertEqual((transport.dataBuffer, transport.offset, transport.disconnecting), (b"", 0, 0))

    @defer.inlineCallbacks
    def test_client_transport(self):  # type: ignore[no-untyped-def]
        """Outgoing connections switch too, and behave the same."""
        from twisted.internet import reactor

        held, sink = yield self.connect(server_side_under_test=False)
        self.assertIsInstance(held.transport, EagerClient)
        held.transport.write(b"hello")
        self.assertNotIn(held.transport, reactor.getWriters())
        yield sink.wait_for(5)

    @defer.inlineCallbacks
    def test_large_write_queues_the_rest_in_order(self):  # type: ignore[no-untyped-def]
        """
        A write larger than the socket can take is split: the kernel takes
        what it can, the rest is queued with the writes after it, and the
        peer receives every byte in order.
        """
        from twisted.internet import reactor

        held, sink = yield self.connect()
        transport = held.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB, far above any socket buffer
        tail = b"the end"
        transport.write(big)
        self.assertGreater(transport._tempDataLen, 0)
        self.assertLess(transport._tempDataLen, len(big))  # some left at once
        self.assertIn(transport, reactor.getWriters())
        transport.write(tail)  # queued behind, never sent ahead of the rest
        transport.loseConnection()
        received = yield sink.done
        self.assertEqual(received, len(big) + len(tail))
        self.assertEqual(sink.digest.hexdigest(), hashlib.sha256(big + tail).hexdigest())
        reason = yield held.lost
        self.assertIsInstance(reason, ConnectionDone)

    @defer.inlineCallbacks
    def test_streaming_producer_paused_when_queue_fills(self):  # type: ignore[no-untyped-def]
        """
        A partial send queues through Twisted's write, which pauses the
        registered streaming producer once the queue is over bufferSize, and
        resumes it when the queue has drained.
        """
        held, sink = yield self.connect()
        transport = held.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        producer = Producer()
        transport.registerProducer(producer, True)
        size = 8 * 1024 * 1024
        transport.write(b"x" * size)
        self.assertEqual(producer.pauses, 1)
        yield sink.wait_for(size)
        self.assertEqual(producer.resumes, 1)

    @defer.inlineCallbacks
    def test_write_after_peer_reset_reports_through_connection_lost(self):  # type: ignore[no-untyped-def]
        """
        A write that the kernel refuses (the peer reset the connection) does
        not raise from write(); the protocol gets connectionLost with
        ConnectionLost on the next reactor turn, as Twisted's doWrite reports
        it (not ConnectionDone: the kernel reports the reset only to that
        send, and the read that follows sees a plain end of file).
        """
        held, sink = yield self.connect()
        sink.transport.abortConnection()  # RST to the end under test
        yield sink.done
        # Loopback has delivered the RST; the reactor has not yet told the
        # end under test. Its send fails inside write(), which must not raise.
        held.transport.write(b"x" * 1024)
        self.assertFalse(held.lost.called)
        reason = yield held.lost
        self.assertIsInstance(reason, ConnectionLost)
        self.assertIn("while sending", str(reason))

    @defer.inlineCallbacks
    def test_write_after_lose_connection_is_not_eager(self):  # type: ignore[no-untyped-def]
        """
        Once loseConnection is called the transport is disconnecting: writes
        follow Twisted's rules (queued, flushed before the close), never sent
        around the close.
        """
        held, sink = yield self.connect()
        held.transport.loseConnection()
        held.transport.write(b"late")
        self.assertEqual(held.transport._tempDataLen, 4)  # queued, not sent
        received = yield sink.done
        self.assertEqual(received, 4)  # flushed before the close, as Twisted does

    @defer.inlineCallbacks
    def test_write_while_half_closing_is_queued(self):  # type: ignore[no-untyped-def]
        """
        Between loseWriteConnection and the FIN, Twisted still queues writes
        and sends them before the FIN; the eager path stays out of the way.
        """
        held, sink = yield self.connect()
        held.transport.write(b"before")
        held.transport.loseWriteConnection()
        held.transport.write(b"after")
        self.assertEqual(held.transport._tempDataLen, 5)
        received = yield sink.done
        self.assertEqual(received, 11)


class SendEagerlyTests(unittest.SynchronousTestCase):
    def test_other_transports_are_left_alone(self) -> None:
        """
        Only plain TCP connections switch: in-memory transports, TLS
        wrappers and stream transports keep their own write.
        """
        transport = StringTransport()
        self.assertFalse(send_eagerly(transport))
        self.assertIs(type(transport), StringTransport)

    def test_switching_twice_is_harmless(self) -> None:
        """A transport already eager stays as it is."""
        server = EagerServer.__new__(EagerServer)
        self.assertTrue(send_eagerly(server))
        self.assertIs(type(server), EagerServer)

    def test_subclasses_cover_both_directions(self) -> None:
        self.assertTrue(issubclass(EagerServer, tcp.Server))
        self.assertTrue(issubclass(EagerClient, tcp.Client))
