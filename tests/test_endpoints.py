"""
SiteEndpoint (a tunnelled stream as an IStreamClientEndpoint) through a real
registry and two MuxProtocols in memory, and its string description
C{rtunnel:...} found through the plugin system, bound to the registry a
running TunnelServerService publishes.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxStream, StreamOpenFailed, StreamReset
from rtunnel.endpoints import SiteEndpoint, publish_registry, published_registry, withdraw_registry
from rtunnel.mux import ErrorCode
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from rtunnel.roles.server import ServerPolicy
from rtunnel.roles.target import Target, TargetConnector
from rtunnel.services import ServerConfig, build_server_service
from tests.roles_helpers import Echo, EndpointMap, Holder, Recorder, ServerFixture, mux_pair, pump_all


class Tunnel:
    """A registry whose site 'alpha' serves 'echo:7' in-process; other targets are refused."""

    def __init__(self, clock: Clock | None = None, handler=None) -> None:  # type: ignore[no-untyped-def]
        self.clock = clock or Clock()
        self.echoes: list[Echo] = []

        def build() -> Echo:
            self.echoes.append(Echo())
            return self.echoes[-1]

        connector = handler or TargetConnector(
            [], EndpointMap(), self.clock, local_factories={Target("echo", 7): Factory.forProtocol(build)}
        )
        self.registry = SiteRegistry(self.clock)
        self.server, self.site, self.pump = mux_pair(self.clock, connector)
        self.registry.register("alpha", self.server, "192.0.2.7:40123")


class SiteEndpointTests(SynchronousTestCase):
    def test_connect_delivers_connected_protocol_after_open_ok(self) -> None:
        """
        connect() fires only once the site accepted the stream, with the
        factory's protocol connected to it; bytes then flow both ways.
        """
        holder = Holder()
        tunnel = Tunnel(handler=holder)
        d = SiteEndpoint(tunnel.registry, "alpha", "echo", 7).connect(Factory.forProtocol(Recorder))
        pump_all(tunnel.pump)
        self.assertNoResult(d)
        site_end = Recorder()
        holder.streams[0].accept(site_end)
        pump_all(tunnel.pump)
        protocol = self.successResultOf(d)
        self.assertIsInstance(protocol, Recorder)
        self.assertTrue(protocol.made)
        self.assertIsInstance(protocol.transport, MuxStream)
        self.assertEqual((protocol.transport.getPeer().host, protocol.transport.getPeer().port), ("echo", 7))
        protocol.transport.write(b"hello site")
        site_end.transport.write(b"hello cloud")  # type: ignore[union-attr]
        pump_all(tunnel.pump)
        self.assertEqual(bytes(site_end.data), b"hello site")
        self.assertEqual(bytes(protocol.data), b"hello cloud")

    def test_connect_to_in_process_target(self) -> None:
        """A target served by a local factory at the site echoes through the endpoint."""
        tunnel = Tunnel()
        d = SiteEndpoint(tunnel.registry, "alpha", "echo", 7).connect(Factory.forProtocol(Recorder))
        pump_all(tunnel.pump)
        protocol = self.successResultOf(d)
        protocol.transport.write(b"ping")
        pump_all(tunnel.pump)
        self.assertEqual(bytes(protocol.data), b"ping")

    def test_refused_stream_fails_connect(self) -> None:
        """A target the site refuses fails connect() with StreamOpenFailed and its code."""
        tunnel = Tunnel()
        d = SiteEndpoint(tunnel.registry, "alpha", "10.0.0.1", 22).connect(Factory.forProtocol(Recorder))
        pump_all(tunnel.pump)
        failure = self.failureResultOf(d, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.TARGET_NOT_ALLOWED)

    def test_site_unavailable_fails_after_open_timeout(self) -> None:
        """A site that does not connect within open_timeout fails connect() with SiteUnavailable."""
        clock = Clock()
        d = SiteEndpoint(SiteRegistry(clock), "beta", "echo", 7, open_timeout=2.0).connect(
            Factory.forProtocol(Recorder)
        )
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        failure = self.failureResultOf(d, SiteUnavailable)
        self.assertIn("within 2s", str(failure.value))

    def test_factory_declining_resets_stream(self) -> None:
        """
        A factory whose buildProtocol returns None fails connect() and the
        stream is reset at the site, not left open.
        """

        class Declining(Factory):
            def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
                return None

        tunnel = Tunnel()
        d = SiteEndpoint(tunnel.registry, "alpha", "echo", 7).connect(Declining())
        pump_all(tunnel.pump)
        failure = self.failureResultOf(d, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.CANCEL)
        self.assertIsInstance(tunnel.echoes[0].lost.value, StreamReset)  # type: ignore[union-attr]
        self.assertEqual((tunnel.server.streams, tunnel.site.streams), ({}, {}))

    def test_factory_raising_resets_stream(self) -> None:
        """
        A factory whose buildProtocol raises fails connect() with that
        error, and the stream is reset at the site, not left open.
        """

        class Broken(Factory):
            def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
                raise RuntimeError("no more protocols")

        tunnel = Tunnel()
        d = SiteEndpoint(tunnel.registry, "alpha", "echo", 7).connect(Broken())
        pump_all(tunnel.pump)
        self.failureResultOf(d, RuntimeError)
        self.assertIsInstance(tunnel.echoes[0].lost.value, StreamReset)  # type: ignore[union-attr]
        self.assertEqual((tunnel.server.streams, tunnel.site.streams), ({}, {}))

    def test_cancel_before_open_ok_abandons_stream(self) -> None:
        """
        Cancelling connect() while the site is still connecting fails it
        with CancelledError and resets the stream at both ends.
        """
        holder = Holder()
        tunnel = Tunnel(handler=holder)
        d = SiteEndpoint(tunnel.registry, "alpha", "echo", 7).connect(Factory.forProtocol(Recorder))
        pump_all(tunnel.pump)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        pump_all(tunnel.pump)
        self.assertTrue(holder.streams[0].disconnected)
        self.assertEqual((tunnel.server.streams, tunnel.site.streams), ({}, {}))

    def test_cancel_while_waiting_for_site(self) -> None:
        """Cancelling connect() while the site is away leaves no waiter or timer."""
        clock = Clock()
        d = SiteEndpoint(SiteRegistry(clock), "beta", "echo", 7).connect(Factory.forProtocol(Recorder))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class DescriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_parsed_through_the_plugin(self) -> None:
        """
        clientFromString finds the rtunnel parser plugin: site, host, port,
        timeout and server name come from the description (IPv6 host with
        escaped colons), with defaults for the last two; the host in its
        canonical spelling (rtunnel.address).
        """
        endpoint = clientFromString(self.reactor, "rtunnel:site=store-17:host=10.0.0.5:port=554")
        self.assertIsInstance(endpoint, SiteEndpoint)
        self.assertEqual((endpoint.site, endpoint.host, endpoint.port), ("store-17", "10.0.0.5", 554))
        self.assertEqual((endpoint.open_timeout, endpoint.registry.name), (5.0, "default"))  # type: ignore[union-attr]
        endpoint = clientFromString(self.reactor, r"rtunnel:site=alpha:host=\:\:1:port=22:timeout=2.5:server=edge")
        self.assertEqual((endpoint.host, endpoint.port, endpoint.open_timeout), ("::1", 22, 2.5))
        self.assertEqual(endpoint.registry.name, "edge")  # type: ignore[union-attr]
        for host, canonical in (("CAMERA.Local.", "camera.local"), (r"[0\:0\:\:1]", "::1")):
            endpoint = clientFromString(self.reactor, f"rtunnel:site=alpha:host={host}:port=22")
            self.assertEqual(endpoint.host, canonical)  # type: ignore[attr-defined]

    def test_errors(self) -> None:
        """Missing or invalid parameters are refused with a message naming them."""
        cases = {
            "rtunnel:host=h:port=1": "missing site=",
            "rtunnel:site=a:port=1": "missing host=",
            "rtunnel:site=a:host=h": "missing port=",
            "rtunnel:site=:host=h:port=1": "missing site=",
            "rtunnel:a:b": "takes only key=value parameters",
            "rtunnel:site=a:host=h:port=1:colour=red": "unknown parameter(s) colour",
            "rtunnel:site=a:host=h:port=0": "rtunnel endpoint: port must be a number from 1 to 65535, not '0'",
            "rtunnel:site=a:host=h:port=http": "rtunnel endpoint: port must be a number from 1 to 65535, not 'http'",
            "rtunnel:site=a:host=h:port=1:timeout=soon": "timeout='soon' is not a positive number of seconds",
            "rtunnel:site=a:host=h:port=1:timeout=0": "timeout='0' is not a positive number of seconds",
            "rtunnel:site=a:host=h:port=1:timeout=nan": "timeout='nan' is not a positive number of seconds",
            "rtunnel:site=Alpha:host=h:port=1": "site name 'Alpha' has upper-case letters",
            "rtunnel:site=a:host=my host:port=1": "rtunnel endpoint: 'my host' is not a valid host name or IP address",
            "rtunnel:site=a:host=a..b:port=1": "rtunnel endpoint: 'a..b' is not a valid host name: it has an empty",
            "rtunnel:site=a:host=[camera]:port=1": "rtunnel endpoint: '[camera]': brackets are only for IPv6 addresses",
            "rtunnel:site=a:host=h:port=1:server=": "server= is empty",
        }
        for description, message in cases.items():
            with self.assertRaises(ValueError, msg=description) as raised:
                clientFromString(self.reactor, description)
            self.assertIn("rtunnel endpoint", str(raised.exception), description)
            self.assertIn(message, str(raised.exception), description)

    def test_no_server_running(self) -> None:
        """
        A description may be parsed before any tunnel server runs; connecting
        then fails with SiteUnavailable saying no such server runs here.
        """
        endpoint = clientFromString(self.reactor, "rtunnel:site=a:host=h:port=1:server=nowhere")
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Recorder)), SiteUnavailable)
        self.assertIn("no tunnel server named 'nowhere' runs in this process", str(failure.value))

    def test_uses_registry_published_by_running_server(self) -> None:
        """
        While a TunnelServerService named NAME runs, rtunnel:...:server=NAME
        connects through its registry; once it stopped, the name is gone.
        """
        fixture = ServerFixture(self)
        fixture.enroll("alpha")
        config = ServerConfig(
            state_dir=fixture.directory, listen="tcp:0", policy=ServerPolicy(keepalive=None), name="edge"
        )
        service = build_server_service(config, self.reactor)
        self.addCleanup(service.state.close)
        endpoint = clientFromString(self.reactor, "rtunnel:site=alpha:host=echo:port=7:server=edge")
        service.startService()
        self.assertIs(published_registry("edge"), service.registry)
        tunnel = Tunnel(clock=self.reactor)
        service.registry.register("alpha", tunnel.server, "192.0.2.7:40123")
        d = endpoint.connect(Factory.forProtocol(Recorder))
        pump_all(tunnel.pump)
        protocol = self.successResultOf(d)
        protocol.transport.write(b"through the service")
        pump_all(tunnel.pump)
        self.assertEqual(bytes(protocol.data), b"through the service")
        service.stopService()
        pump_all(tunnel.pump)
        self.failureResultOf(endpoint.connect(Factory.forProtocol(Recorder)), SiteUnavailable)

    def test_withdraw_only_own_registry(self) -> None:
        """Withdrawing a name removes it only if it still names that registry."""
        first, second = SiteRegistry(Clock()), SiteRegistry(Clock())
        publish_registry("w", first)
        publish_registry("w", second)  # a restarted server replaced it
        withdraw_registry("w", first)
        self.assertIs(published_registry("w"), second)
        withdraw_registry("w", second)
        self.assertRaises(SiteUnavailable, published_registry, "w")
