"""
Cloud-side forwards: ForwardSpec (the --forward syntax) and the path of one
forwarded connection, ForwardProtocol -> registry -> tunnel -> TargetConnector
-> target, with both TCP legs in memory and the tunnel joined by iosim.
"""

from __future__ import annotations

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.roles.forward import DEFAULT_BIND, ForwardFactory, ForwardProtocol, ForwardSpec
from rtunnel.roles.registry import SiteRegistry
from rtunnel.roles.splice import TCPSide
from rtunnel.roles.target import Target, TargetConnector
from tests.roles_helpers import CLIENT_PEER, EndpointMap, TCPTransport, mux_pair, pump_all

KIB = 1024


class ForwardSpecTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        [BIND:]PORT:SITE:HOST:HOSTPORT, with IPv6 in brackets for the bind
        address and the host, and 127.0.0.1 as the default bind address;
        both hosts in their canonical spelling (rtunnel.address).
        """
        cases = {
            "8080:alpha:10.0.0.5:554": ("127.0.0.1", 8080, "alpha", Target("10.0.0.5", 554)),
            "0.0.0.0:8080:store-17:db.local:5432": ("0.0.0.0", 8080, "store-17", Target("db.local", 5432)),
            "[::1]:8080:alpha:[fe80::1]:80": ("::1", 8080, "alpha", Target("fe80::1", 80)),
            "[::]:0:alpha:[::1]:22": ("::", 0, "alpha", Target("::1", 22)),
            "9000:alpha:[::1]:554": ("127.0.0.1", 9000, "alpha", Target("::1", 554)),
            "9000:alpha:CAM.local.:554": ("127.0.0.1", 9000, "alpha", Target("cam.local", 554)),
            "localhost:9000:a.b_c-d:h:1": ("localhost", 9000, "a.b_c-d", Target("h", 1)),
            "LocalHost.:9000:alpha:h:1": ("localhost", 9000, "alpha", Target("h", 1)),
            "[0:0::1]:9000:alpha:[0:0::5]:1": ("::1", 9000, "alpha", Target("::5", 1)),
        }
        self.assertEqual(DEFAULT_BIND, "127.0.0.1")
        for text, (bind, port, site, target) in cases.items():
            spec = ForwardSpec.parse(text)
            self.assertEqual((spec.bind, spec.port, spec.site, spec.target), (bind, port, site, target), text)

    def test_str(self) -> None:
        """str() shows the listening address and the target, IPv6 in brackets."""
        self.assertEqual(str(ForwardSpec.parse("[::1]:8080:alpha:[fe80::1]:80")), "[::1]:8080 -> alpha:[fe80::1]:80")
        self.assertEqual(str(ForwardSpec.parse("8080:alpha:h:1")), "127.0.0.1:8080 -> alpha:h:1")

    def test_errors(self) -> None:
        """Every malformed spec is refused with a message naming the spec and the wrong part."""
        cases = {
            "8080:alpha:h": "expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT",
            "1:2:3:4:5:6": "expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT",
            "8080:alpha:::1:80": "expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT",
            "[::1:8080:alpha:h:1": "expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT",
            "x:alpha:h:1": "listening port must be a number from 0 to 65535, not 'x'",
            "70000:alpha:h:1": "listening port must be a number from 0 to 65535, not '70000'",
            "-1:alpha:h:1": "listening port must be a number from 0 to 65535, not '-1'",
            "8080::h:1": "site name is empty",
            "8080:Alpha:h:1": "site name 'Alpha' has upper-case letters",
            "8080:al pha:h:1": "site name 'al pha' contains ' '",
            ":8080:alpha:h:1": "bind address is empty",
            "[]:8080:alpha:h:1": "bind address is empty",
            "my host:8080:alpha:h:1": "bind address 'my host' is not a valid host name or IP address",
            "[camera]:8080:alpha:h:1": "bind address '[camera]': brackets are only for IPv6 addresses",
            "8080:alpha:h:0": "target 'h:0': port must be a number from 1 to 65535, not '0'",
            "8080:alpha:h:x": "target 'h:x': port must be a number from 1 to 65535, not 'x'",
            "8080:alpha::80": "target ':80': host is empty",
            "8080:alpha:my host:80": "target 'my host:80': 'my host' is not a valid host name or IP address",
            "8080:alpha:[camera]:80": "target '[camera]:80': '[camera]': brackets are only for IPv6 addresses",
            "8080:alpha:[::1]x:80": "target '[::1]x:80': expected ':PORT' after ']', found 'x:80'",
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError, msg=text) as raised:
                ForwardSpec.parse(text)
            self.assertIn(f"--forward {text!r}: ", str(raised.exception), text)
            self.assertIn(message, str(raised.exception), text)

    def test_endpoint_description_listens_with_large_backlog(self) -> None:
        """
        The listening endpoint binds the bind address (IPv6 escaped for the
        endpoint syntax) with a backlog of 1024, not Twisted's 50.
        """
        reactor = MemoryReactorClock()
        for text, interface in (("8080:alpha:h:1", "127.0.0.1"), ("[::1]:8081:alpha:h:1", "::1")):
            spec = ForwardSpec.parse(text)
            self.assertIn("backlog=1024", spec.endpoint_description())
            self.successResultOf(serverFromString(reactor, spec.endpoint_description()).listen(Factory()))
            port, _, backlog, bound = reactor.tcpServers[-1]
            self.assertEqual((port, backlog, bound), (spec.port, 1024, interface))


class Forwarding:
    """One forward 8080 -> alpha:10.0.0.5:554 with the site connected in memory."""

    def __init__(self, *, connected: bool = True, spec: str = "8080:alpha:10.0.0.5:554") -> None:
        self.clock = Clock()
        self.registry = SiteRegistry(self.clock)
        self.endpoints = EndpointMap()
        self.connector = TargetConnector([Target("10.0.0.5", 554)], self.endpoints, self.clock)
        self.factory = ForwardFactory(ForwardSpec.parse(spec), self.registry, open_timeout=5.0)
        self.server, self.site, self.pump = mux_pair(self.clock, self.connector)
        if connected:
            self.connect_site()

    def connect_site(self) -> None:
        self.registry.register("alpha", self.server, "192.0.2.7:40123")

    def client(self) -> tuple[ForwardProtocol, TCPTransport]:
        protocol = self.factory.buildProtocol(CLIENT_PEER)
        transport = TCPTransport(CLIENT_PEER)
        protocol.makeConnection(transport)
        return protocol, transport

    def pump_all(self) -> None:
        pump_all(self.pump)

    def target(self) -> tuple[TCPSide, TCPTransport]:
        """Let the site's pending connection to the target succeed."""
        self.pump_all()
        protocol, transport = self.endpoints.last.complete()
        assert isinstance(protocol, TCPSide)
        self.pump_all()
        return protocol, transport


class ForwardProtocolTests(SynchronousTestCase):
    def test_bytes_flow_both_ways(self) -> None:
        """
        A client's bytes reach the target and the target's reach the client;
        the client connection reads normally once its stream exists.
        """
        fw = Forwarding()
        client, client_tcp = fw.client()
        target, target_tcp = fw.target()
        self.assertEqual(fw.endpoints.requested, [("10.0.0.5", 554)])
        self.assertEqual(client_tcp.producerState, "producing")
        self.assertTrue(client_tcp.nodelay)
        client.dataReceived(b"OPTIONS * RTSP/1.0\r\n\r\n")
        fw.pump_all()
        self.assertEqual(target_tcp.take(), b"OPTIONS * RTSP/1.0\r\n\r\n")
        target.dataReceived(b"RTSP/1.0 200 OK\r\n\r\n")
        fw.pump_all()
        self.assertEqual(client_tcp.take(), b"RTSP/1.0 200 OK\r\n\r\n")
        self.assertFalse(client_tcp.closed or target_tcp.closed)

    def test_client_eof_half_closes_target_and_reverse_keeps_flowing(self) -> None:
        """
        The client's EOF travels as a stream FIN and shuts down only the
        target's write side; the target's replies still reach the client,
        and the target's own EOF then closes both legs gracefully.
        """
        fw = Forwarding()
        client, client_tcp = fw.client()
        target, target_tcp = fw.target()
        client.dataReceived(b"request")
        client.readConnectionLost()
        fw.pump_all()
        self.assertEqual(target_tcp.take(), b"request")
        self.assertTrue(target_tcp.write_closed)
        self.assertFalse(target_tcp.closed)
        target.dataReceived(b"reply after EOF")
        fw.pump_all()
        self.assertEqual(client_tcp.take(), b"reply after EOF")
        self.assertFalse(client_tcp.write_closed)
        target.readConnectionLost()
        fw.pump_all()
        self.assertTrue(client_tcp.write_closed)
        self.assertTrue(client_tcp.closed and target_tcp.closed)
        self.assertFalse(client_tcp.aborted or target_tcp.aborted)
        self.assertEqual((fw.server.streams, fw.site.streams), ({}, {}))

    def test_refused_stream_closes_client(self) -> None:
        """
        When the site refuses the stream (target not allowed) the client's
        connection is closed gracefully, without a connection attempt.
        """
        fw = Forwarding(spec="8080:alpha:10.0.0.6:554")
        client, client_tcp = fw.client()
        client.dataReceived(b"early bytes")
        fw.pump_all()
        self.assertTrue(client_tcp.closed)
        self.assertFalse(client_tcp.aborted)
        self.assertEqual(fw.endpoints.requested, [])
        self.assertEqual(fw.server.streams, {})

    def test_target_connection_failure_closes_client(self) -> None:
        """A target that cannot be reached gets the client's connection closed."""
        from twisted.internet.error import ConnectionRefusedError

        fw = Forwarding()
        client, client_tcp = fw.client()
        fw.pump_all()
        fw.endpoints.last.fail(ConnectionRefusedError())
        fw.pump_all()
        self.assertTrue(client_tcp.closed)
        self.assertFalse(client_tcp.aborted)

    def test_target_reset_aborts_client(self) -> None:
        """
        A target connection that fails after the stream was accepted resets
        the stream, and the reset aborts the client's connection as a TCP
        RST would.
        """
        fw = Forwarding()
        client, client_tcp = fw.client()
        target, target_tcp = fw.target()
        target.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        fw.pump_all()
        self.assertTrue(client_tcp.aborted)
        self.assertEqual(fw.server.streams, {})

    def test_client_reset_aborts_target(self) -> None:
        """A client connection that fails aborts the target connection."""
        fw = Forwarding()
        client, client_tcp = fw.client()
        target, target_tcp = fw.target()
        client.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        fw.pump_all()
        self.assertTrue(target_tcp.aborted)
        self.assertEqual(fw.site.streams, {})

    def test_client_close_finishes_stream(self) -> None:
        """A client that closes cleanly sends FIN: the target sees EOF, not an abort."""
        fw = Forwarding()
        client, _ = fw.client()
        target, target_tcp = fw.target()
        client.connectionLost(Failure(ConnectionDone()))
        fw.pump_all()
        self.assertTrue(target_tcp.write_closed)
        self.assertFalse(target_tcp.aborted)

    def test_early_data_reaches_target(self) -> None:
        """
        Bytes and EOF the client sends before the site answered travel as
        early data and reach the target once it is connected.
        """
        fw = Forwarding()
        client, client_tcp = fw.client()
        client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        client.readConnectionLost()
        fw.pump_all()
        self.assertEqual(len(fw.endpoints.endpoints), 1)
        self.assertEqual(fw.endpoints.last.transports, [])  # not connected yet
        target, target_tcp = fw.target()
        self.assertEqual(target_tcp.take(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(target_tcp.write_closed)
        target.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
        target.readConnectionLost()
        fw.pump_all()
        self.assertEqual(client_tcp.take(), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertTrue(client_tcp.closed)

    def test_site_unavailable_closes_client_after_open_timeout(self) -> None:
        """
        A client of a forward whose site is not connected is not read from
        while it waits, and is closed when the open timeout runs out.
        """
        fw = Forwarding(connected=False)
        _, client_tcp = fw.client()
        self.assertEqual(client_tcp.producerState, "paused")
        fw.clock.advance(4.9)
        self.assertFalse(client_tcp.closed)
        fw.clock.advance(0.1)
        self.assertTrue(client_tcp.closed)
        self.assertFalse(client_tcp.aborted)

    def test_site_reconnecting_within_open_timeout_serves_client(self) -> None:
        """
        A client that arrives while the site is away is served once the
        site connects within the open timeout.
        """
        fw = Forwarding(connected=False)
        client, client_tcp = fw.client()
        fw.clock.advance(3)
        fw.connect_site()
        self.assertEqual(client_tcp.producerState, "producing")
        client.dataReceived(b"hello")
        target, target_tcp = fw.target()
        self.assertEqual(target_tcp.take(), b"hello")
        fw.clock.advance(10)
        self.assertFalse(client_tcp.closed)

    def test_slow_client_holds_back_only_its_target(self) -> None:
        """
        While the client's socket is full (its transport pauses the stream)
        the target is paused after one window of unread bytes, and resumed
        once the client drained them.
        """
        fw = Forwarding()
        client, client_tcp = fw.client()
        target, target_tcp = fw.target()
        assert client_tcp.producer is not None
        client_tcp.producer.pauseProducing()  # the client's send buffer is full
        for _ in range(300):
            target.dataReceived(b"x" * KIB)
        fw.pump_all()
        self.assertEqual(target_tcp.producerState, "paused")
        self.assertEqual(client_tcp.value(), b"")
        client_tcp.producer.resumeProducing()
        fw.pump_all()
        self.assertEqual(len(client_tcp.take()), 300 * KIB)
        self.assertEqual(target_tcp.producerState, "producing")

    def test_client_gone_before_site_connects(self) -> None:
        """
        A client whose connection ended while it waited for the site gets
        no stream: the one opened when the site connects is abandoned at
        once, and nothing is left open at either end.
        """
        fw = Forwarding(connected=False)
        client, client_tcp = fw.client()
        client.connectionLost(Failure(ConnectionLost("gone")))
        fw.connect_site()
        fw.pump_all()
        self.assertEqual(fw.endpoints.requested, [])
        self.assertEqual((fw.server.streams, fw.site.streams), ({}, {}))

    def test_client_joining_a_congested_tunnel_stays_paused(self) -> None:
        """
        A client whose stream is opened while the tunnel connection is
        paused (its TLS buffer is full) is not read from until the tunnel
        resumes, as every other stream.
        """
        fw = Forwarding()
        fw.server.pauseProducing()  # what the tunnel's transport does when its buffer fills
        _, client_tcp = fw.client()
        self.assertEqual(client_tcp.producerState, "paused")
        fw.server.resumeProducing()
        self.assertEqual(client_tcp.producerState, "producing")
