"""
The site's side of a stream: Target.parse (the --allow syntax) and
TargetConnector (allowlist, connect, failure codes, in-process targets).

Connection attempts go through the production endpoint factory
(L{tcp_endpoints}: TCP endpoints for IP literals, HostnameEndpoint for
names) on a L{MemoryReactorClock}, and fail with the exceptions Twisted
itself raises.
"""

from __future__ import annotations

import errno

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import MuxStream, StreamOpenFailed, StreamReset
from rtunnel.mux import ErrorCode
from rtunnel.roles.target import Target, TargetConnector, tcp_endpoints
from tests.roles_helpers import Echo, EndpointMap, Recorder, TCPTransport, mux_pair, pump_all


class TargetParseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        HOST:PORT, IPv4, [IPv6]:PORT; host names are lower-cased without a
        trailing dot, IPv6 addresses compressed, names in Unicode converted
        to their ASCII (IDNA) form.
        """
        cases = {
            "localhost:80": Target("localhost", 80),
            "10.0.0.5:554": Target("10.0.0.5", 554),
            "DB.Example.:5432": Target("db.example", 5432),
            "[::1]:22": Target("::1", 22),
            "[0:0:0::1]:22": Target("::1", 22),
            "[fe80::1%eth0]:80": Target("fe80::1%eth0", 80),
            "  camera_1.local:554 ": Target("camera_1.local", 554),
            "bücher.example:80": Target("xn--bcher-kva.example", 80),
            "h:65535": Target("h", 65535),
        }
        for text, expected in cases.items():
            self.assertEqual(Target.parse(text), expected, text)

    def test_str_round_trips(self) -> None:
        """str() writes IPv6 in brackets, and parses back to the same target."""
        for text in ("host:1", "[2001:db8::5]:554", "10.1.2.3:80"):
            target = Target.parse(text)
            self.assertEqual(str(target), text)
            self.assertEqual(Target.parse(str(target)), target)

    def test_errors(self) -> None:
        """
        Every malformed target is refused with a message quoting it and
        saying what is wrong, in the words of rtunnel.address.
        """
        cases = {
            "host": "expected HOST:PORT",
            ":80": "host is empty",
            "a:b:80": "write IPv6 addresses in brackets, [ADDR]:PORT",
            "::1:80": "write IPv6 addresses in brackets, [ADDR]:PORT",
            "[::1]": "expected [IPV6]:PORT",
            "[::1]x80": "expected ':PORT' after ']', found 'x80'",
            "[::1:80": "has '[' without ']'",
            "host:": "port must be a number from 1 to 65535, not ''",
            "host:0": "port must be a number from 1 to 65535, not '0'",
            "host:65536": "port must be a number from 1 to 65535, not '65536'",
            "host:http": "port must be a number from 1 to 65535, not 'http'",
            "host:-1": "port must be a number from 1 to 65535, not '-1'",
            "host:\u0663": "port must be a number from 1 to 65535, not '\u0663'",
            "[]:80": "host is empty",
            ".:80": "'.' is not a valid host name: it has an empty label",
            "[camera]:80": "'[camera]': brackets are only for IPv6 addresses",
            "my camera:80": "'my camera' is not a valid host name or IP address: ' ' is not allowed",
            "a..b:80": "'a..b' is not a valid host name: it has an empty label",
            "x/y:80": "'x/y' is not a valid host name or IP address: '/' is not allowed",
            "a" * 256 + ":80": "is not a valid host name: longer than 253 characters",
            "999.0.0.1:80": "'999.0.0.1' is not a valid IPv4 address",
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError, msg=text) as raised:
                Target.parse(text)
            self.assertIn(message, str(raised.exception), text)
            self.assertIn(repr(text.strip()), str(raised.exception), text)


@implementer(IHostnameResolver)
class NoAddresses:
    """A resolver for which no name resolves (NXDOMAIN)."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # type: ignore[no-untyped-def]
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


ALLOW = [Target("10.0.0.5", 554), Target("camera.local", 80), Target("::1", 22)]


class ConnectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reactor = MemoryReactorClock()
        self.endpoints = EndpointMap(lambda: None)  # type: ignore[arg-type,return-value]
        real = tcp_endpoints(self.reactor, 10.0)

        def endpoint_for(host: str, port: int):  # type: ignore[no-untyped-def]
            self.endpoints.requested.append((host, port))
            return real(host, port)

        self.connector = TargetConnector(ALLOW, endpoint_for, self.clock)
        self.server, self.site, self.pump = mux_pair(self.clock, self.connector)

    def open(self, host: str, port: int) -> MuxStream:
        stream = self.server.open_stream(host, port)
        pump_all(self.pump)
        return stream

    def connect_attempt(self) -> tuple[object, object]:
        """The pending TCP attempt HostnameEndpoint made: (factory, connector)."""
        self.reactor.advance(0)
        _, _, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual(timeout, 10.0)
        return factory, self.reactor.connectors[-1]

    def fail_connect(self, exception: Exception) -> StreamOpenFailed:
        stream = self.open("10.0.0.5", 554)
        factory, connector = self.connect_attempt()
        factory.clientConnectionFailed(connector, Failure(exception))  # type: ignore[attr-defined]
        self.reactor.advance(1)  # a HostnameEndpoint reports once its attempts are over
        pump_all(self.pump)
        return self.failureResultOf(stream.opened, StreamOpenFailed).value

    def test_target_not_in_allowlist_is_refused(self) -> None:
        """
        A target missing from the allowlist is refused with
        TARGET_NOT_ALLOWED naming it, without any connection attempt.
        """
        stream = self.open("10.0.0.6", 554)
        failure = self.failureResultOf(stream.opened, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.TARGET_NOT_ALLOWED)
        self.assertIn("10.0.0.6:554", failure.value.reason)
        self.assertEqual(self.endpoints.requested, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_refusals_are_logged_rate_limited(self) -> None:
        """
        A cloud client hammering a target that is not allowed costs at most
        a few log lines a second (per target), every one refused all the
        same; the next line allowed says how many were left out.
        """
        events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        streams = [self.open("10.0.0.6", 554) for _ in range(200)]
        for stream in streams:
            self.assertEqual(
                self.failureResultOf(stream.opened, StreamOpenFailed).value.code, ErrorCode.TARGET_NOT_ALLOWED
            )
        lines = [formatEvent(e) for e in events if "not in the allowlist" in formatEvent(e)]
        self.assertEqual(len(lines), 5)
        self.clock.advance(1)
        self.failureResultOf(self.open("10.0.0.6", 554).opened, StreamOpenFailed)
        last = [formatEvent(e) for e in events if "not in the allowlist" in formatEvent(e)][-1]
        self.assertIn("(195 similar not logged)", last)

    def test_allowlist_matches_canonical_spelling(self) -> None:
        """
        The cloud's spelling of an allowed target (case, trailing dot,
        uncompressed IPv6) still matches; another port of an allowed host
        does not.
        """
        for host, port in (("CAMERA.local.", 80), ("0:0::1", 22)):
            self.open(host, port)
        self.assertEqual(self.endpoints.requested, [("camera.local", 80), ("::1", 22)])
        stream = self.open("camera.local", 81)
        self.assertEqual(self.failureResultOf(stream.opened, StreamOpenFailed).value.code, ErrorCode.TARGET_NOT_ALLOWED)

    def test_connected_target_is_accepted_and_spliced(self) -> None:
        """
        Once TCP to the target is up the stream is accepted, and bytes flow
        both ways between the stream and the target connection.
        """
        stream = self.open("10.0.0.5", 554)
        self.assertNoResult(stream.opened)
        factory, _ = self.connect_attempt()
        leg = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 554))  # type: ignore[attr-defined]
        tcp = TCPTransport()
        leg.makeConnection(tcp)
        pump_all(self.pump)
        self.successResultOf(stream.opened)
        mine = Recorder()
        stream.attach(mine)
        stream.write(b"DESCRIBE rtsp://cam")
        pump_all(self.pump)
        self.assertEqual(tcp.take(), b"DESCRIBE rtsp://cam")
        self.assertTrue(tcp.nodelay)
        leg.dataReceived(b"RTSP/1.0 200 OK")
        pump_all(self.pump)
        self.assertEqual(bytes(mine.data), b"RTSP/1.0 200 OK")

    def test_connection_refused(self) -> None:
        """A refused TCP connection answers TARGET_REFUSED with the reason."""
        failed = self.fail_connect(error.ConnectionRefusedError("Connection refused"))
        self.assertEqual(failed.code, ErrorCode.TARGET_REFUSED)
        self.assertIn("connecting to 10.0.0.5:554 failed", failed.reason)
        self.assertIn("Connection refused", failed.reason)

    def test_connect_timeout(self) -> None:
        """HostnameEndpoint's connect timeout answers TARGET_TIMEOUT."""
        self.assertEqual(self.fail_connect(error.TimeoutError()).code, ErrorCode.TARGET_TIMEOUT)

    def test_os_connect_timeout(self) -> None:
        """The kernel's ETIMEDOUT (TCPTimedOutError) also answers TARGET_TIMEOUT."""
        exception = error.getConnectError((errno.ETIMEDOUT, "Connection timed out"))
        self.assertIsInstance(exception, error.TCPTimedOutError)
        self.assertEqual(self.fail_connect(exception).code, ErrorCode.TARGET_TIMEOUT)

    def test_network_unreachable(self) -> None:
        """ENETUNREACH (NoRouteError) answers TARGET_UNREACHABLE."""
        exception = error.getConnectError((errno.ENETUNREACH, "Network is unreachable"))
        self.assertIsInstance(exception, error.NoRouteError)
        self.assertEqual(self.fail_connect(exception).code, ErrorCode.TARGET_UNREACHABLE)

    def test_host_unreachable(self) -> None:
        """
        EHOSTUNREACH, which Twisted reports as a plain ConnectError with the
        errno, answers TARGET_UNREACHABLE too.
        """
        exception = error.getConnectError((errno.EHOSTUNREACH, "No route to host"))
        self.assertIs(type(exception), error.ConnectError)
        failed = self.fail_connect(exception)
        self.assertEqual(failed.code, ErrorCode.TARGET_UNREACHABLE)
        self.assertIn("No route to host", failed.reason)

    def test_other_failure(self) -> None:
        """Any other connection failure answers TARGET_ERROR."""
        exception = error.getConnectError((errno.EADDRNOTAVAIL, "Cannot assign requested address"))
        self.assertEqual(self.fail_connect(exception).code, ErrorCode.TARGET_ERROR)

    def test_dns_failure(self) -> None:
        """A name that does not resolve answers TARGET_DNS_FAILURE naming it."""
        self.reactor.installNameResolver(NoAddresses())
        stream = self.open("camera.local", 80)
        self.reactor.advance(0)
        pump_all(self.pump)
        failed = self.failureResultOf(stream.opened, StreamOpenFailed).value
        self.assertEqual(failed.code, ErrorCode.TARGET_DNS_FAILURE)
        self.assertIn("camera.local", failed.reason)

    def test_opener_gives_up_while_connecting(self) -> None:
        """
        If the cloud resets the stream while the site is still connecting,
        the connection attempt is abandoned at once and nothing is answered.
        """
        stream = self.open("10.0.0.5", 554)
        _, connector = self.connect_attempt()
        stream.reset(ErrorCode.CANCEL, "client went away")
        self.failureResultOf(stream.opened, StreamOpenFailed)
        pump_all(self.pump)
        self.assertTrue(connector.stoppedConnecting)  # type: ignore[attr-defined]
        self.assertEqual((self.site.streams, self.server.streams), ({}, {}))

    def test_opener_gives_up_with_uncancellable_endpoint(self) -> None:
        """
        Through an endpoint that cannot stop connecting, a target
        connection made after the cloud gave up is refused at once.
        """
        holder_endpoints = EndpointMap()  # ControlledEndpoint: no canceller
        connector = TargetConnector(ALLOW, holder_endpoints, self.clock)
        server, site, pump = mux_pair(self.clock, connector)
        stream = server.open_stream("10.0.0.5", 554)
        pump_all(pump)
        stream.reset(ErrorCode.CANCEL, "client went away")
        self.failureResultOf(stream.opened, StreamOpenFailed)
        pump_all(pump)
        factory, attempt = holder_endpoints.last.attempts[0]
        self.assertTrue(attempt.called)  # cancelled, and nothing answered for it
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 554)))
        self.assertEqual(site.streams, {})


class LocalFactoryTests(SynchronousTestCase):
    def test_local_factory_serves_stream_in_process(self) -> None:
        """
        A target with a local factory is served by it in this process, with
        no allowlist entry and no TCP connection.
        """
        clock = Clock()
        endpoints = EndpointMap()
        echoes: list[Echo] = []

        def build() -> Echo:
            echoes.append(Echo())
            return echoes[-1]

        connector = TargetConnector(
            [], endpoints, clock, local_factories={Target("status", 1): Factory.forProtocol(build)}
        )
        server, _, pump = mux_pair(clock, connector)
        stream = server.open_stream("STATUS", 1)
        mine = Recorder()
        stream.opened.addCallback(lambda s: s.attach(mine))
        stream.write(b"ping")
        pump_all(pump)
        self.assertEqual(bytes(mine.data), b"ping")
        self.assertEqual(bytes(echoes[0].data), b"ping")
        self.assertEqual(endpoints.requested, [])

    def test_local_factory_declining(self) -> None:
        """A local factory whose buildProtocol returns None refuses with TARGET_REFUSED."""
        clock = Clock()

        class Declining(Factory):
            def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
                return None

        connector = TargetConnector([], EndpointMap(), clock, local_factories={Target("status", 1): Declining()})
        server, _, pump = mux_pair(clock, connector)
        stream = server.open_stream("status", 1)
        pump_all(pump)
        failure = self.failureResultOf(stream.opened, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.TARGET_REFUSED)

    def test_local_protocol_sees_peer_reset(self) -> None:
        """A local protocol learns of the cloud's reset through connectionLost."""
        clock = Clock()
        echoes: list[Echo] = []
        connector = TargetConnector(
            [],
            EndpointMap(),
            clock,
            local_factories={Target("status", 1): Factory.forProtocol(lambda: echoes.append(Echo()) or echoes[-1])},
        )
        server, _, pump = mux_pair(clock, connector)
        stream = server.open_stream("status", 1)
        pump_all(pump)
        stream.reset(ErrorCode.CANCEL, "bye")
        pump_all(pump)
        self.assertIsInstance(echoes[0].lost.value, StreamReset)  # type: ignore[union-attr]
