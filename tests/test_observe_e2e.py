"""
Counters correct under load (issue 12, section 2): a real tunnel server
service and a real site service in this process, on the real reactor,
joined by real TLS over loopback; clients send known byte counts through
a forward to an echo target at the site, one asks for a target the site
refuses, one for a site that never connects. The scrape of both roles,
parsed back, must show exactly those bytes, streams and outcomes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel.identity.state import ServerState
from rtunnel.observe.metrics import ServerCollector, SiteCollector, metrics_registry
from rtunnel.observe.server_view import ServerView
from rtunnel.roles.forward import ForwardSpec
from rtunnel.roles.live_forwards import spec_text
from rtunnel.roles.server import ServerPolicy, TunnelServerService
from rtunnel.roles.site import SitePolicy, TunnelClientService
from rtunnel.roles.target import Target, TargetConnector, tcp_endpoints
from rtunnel.services import ServerConfig
from tests.common import Echo
from tests.roles_helpers import SERVER_NAME, ServerFixture

#: Payload sizes of the clients: one byte, one frame, around the window, several windows.
SIZES = (1, 1000, 65_536, 300_000, 1_000_003)


class Sender(Protocol):
    """Sends C{size} bytes, reads until they all came back, then closes; C{done} fires with what came back."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self.done: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"m" * self.size)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.size and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.received)


def scrape(collector: ServerCollector | SiteCollector) -> dict[str, list[Sample]]:
    text = generate_latest(metrics_registry(collector)).decode()
    return {family.name: list(family.samples) for family in text_string_to_metric_families(text)}


def value(samples: dict[str, list[Sample]], family: str, **labels: str) -> float:
    found = [s for s in samples[family] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, found)
    return found[0].value


class CountersUnderLoadTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def wait_until(self, condition: Callable[[], bool], what: str, limit: float = 20.0) -> Generator[Any, Any, None]:
        """Poll C{condition} on the reactor every 20 ms, failing after C{limit} seconds."""
        from twisted.internet import reactor

        deadline = reactor.seconds() + limit  # type: ignore[attr-defined]
        while not condition():
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.fail(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_exact_counts_through_forwards(self) -> Generator[Any, Any, None]:
        from twisted.internet import reactor

        fatal: list[str] = []
        echo = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(echo.stopListening)
        echo_port = echo.getHost().port

        fixture = ServerFixture(self)
        forwards = (
            ForwardSpec.parse(f"127.0.0.1:0:alpha:127.0.0.1:{echo_port}"),
            ForwardSpec.parse("127.0.0.1:0:alpha:127.0.0.1:1"),  # not allowed at the site
            ForwardSpec.parse("127.0.0.1:0:ghost:127.0.0.1:1"),  # a site that never connects
        )
        config = ServerConfig(
            state_dir=fixture.directory,
            listen="tcp:0:interface=127.0.0.1",
            forwards=forwards,
            open_timeout=0.5,
            revocation_poll=0.1,
            policy=ServerPolicy(),
            admin=None,
            name="observe-e2e",
        )
        # Its own connection to the database: the fixture enrolls through another, as the CLI would.
        server_state = ServerState.load_or_create(fixture.directory, [SERVER_NAME])
        self.addCleanup(server_state.close)
        server = TunnelServerService(config, server_state, reactor, fatal.append)
        server.startService()
        yield server._listening
        assert server.tunnel_port is not None
        tunnel_port = server.tunnel_port.getHost().port

        site_state = fixture.enrolled_site_state(self, "alpha", (f"127.0.0.1:{tunnel_port}",))
        yield self.wait_until(lambda: server.admission.get("alpha") is not None, "the enrollment to be seen")
        connector = TargetConnector([Target("127.0.0.1", echo_port)], tcp_endpoints(reactor, 5.0), reactor)
        site = TunnelClientService(reactor, site_state, None, connector, SitePolicy(), fatal.append)
        site.startService()
        try:
            yield self.wait_until(lambda: server.registry.session_for("alpha") is not None, "the site's session")
            yield self.wait_until(lambda: site.figures.up, "the site to see its session open")

            def port_of(spec: ForwardSpec) -> int:
                return int(server.forward_ports[spec].getHost().port)

            senders = [Sender(size) for size in SIZES]
            for sender in senders:
                yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(forwards[0])), sender)
            echoed = yield defer.gatherResults([s.done for s in senders])
            self.assertEqual(echoed, list(SIZES))
            for spec in forwards[1:]:
                refused = Sender(10)
                yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(spec)), refused)
                self.assertEqual((yield refused.done), 0)
            alpha = server.figures.sites["alpha"]
            yield self.wait_until(
                lambda: alpha.live.streams() == 0 and site.figures.live.streams() == 0, "the streams to end"
            )

            total = sum(SIZES)
            served = scrape(ServerCollector(server))
            self.assertEqual(value(served, "rtunnel_site_bytes", site="alpha", direction="to_site"), total)
            self.assertEqual(value(served, "rtunnel_site_bytes", site="alpha", direction="from_site"), total)
            self.assertEqual(
                {(s.labels["site"], s.labels["result"]): s.value for s in served["rtunnel_site_stream_opens"]},
                {("alpha", "ok"): len(SIZES), ("alpha", "target-not-allowed"): 1, ("ghost", "not-connected"): 1},
            )
            self.assertEqual(value(served, "rtunnel_site_streams", site="alpha"), 0)
            self.assertEqual(value(served, "rtunnel_site_up", site="alpha"), 1)
            # ghost is no enrolled site: its refused opens are counted, but it has no up series to alert on
            self.assertEqual([s.labels["site"] for s in served["rtunnel_site_up"]], ["alpha"])
            self.assertEqual(value(served, "rtunnel_site_sessions", site="alpha"), 1)
            self.assertEqual(value(served, "rtunnel_sessions"), 1)
            self.assertEqual(value(served, "rtunnel_handshakes", result="ok"), 1)
            self.assertEqual(value(served, "rtunnel_sites_connected"), 1)
            for spec, accepted, refused in zip(forwards, (len(SIZES), 1, 1), (0, 1, 1), strict=True):
                self.assertEqual(value(served, "rtunnel_forward_connections", forward=spec_text(spec)), accepted)
                self.assertEqual(value(served, "rtunnel_forward_refusals", forward=spec_text(spec)), refused)
                self.assertEqual(value(served, "rtunnel_forward_open_connections", forward=spec_text(spec)), 0)
            self.assertEqual(value(served, "rtunnel_refusals", kind="stream"), 2)

            at_site = scrape(SiteCollector(site))
            self.assertEqual(value(at_site, "rtunnel_tunnel_bytes", direction="to_server"), total)
            self.assertEqual(value(at_site, "rtunnel_tunnel_bytes", direction="from_server"), total)
            self.assertEqual(
                {s.labels["result"]: s.value for s in at_site["rtunnel_tunnel_stream_opens"]},
                {"ok": len(SIZES), "target-not-allowed": 1},
            )
            self.assertEqual(value(at_site, "rtunnel_tunnel_up"), 1)
            self.assertEqual(value(at_site, "rtunnel_tunnel_sessions"), 1)
            self.assertEqual(value(at_site, "rtunnel_tunnel_info", site="alpha"), 1)

            view = ServerView(server)
            snapshot = view.site("alpha")
            assert snapshot is not None
            self.assertEqual((snapshot.bytes_to_site, snapshot.bytes_from_site, snapshot.streams), (total, total, 0))
            self.assertTrue(snapshot.connected)
            self.assertEqual([f.connections_total for f in view.forwards()], [len(SIZES), 1, 1])
            self.assertIsNone(view.not_ready())
            # The server measures the site's round trip itself (RTT_PROBE_INTERVAL), sites never
            # being silent long enough for its keepalive to ping.
            yield self.wait_until(lambda: "rtunnel_site_rtt_seconds" in _with_samples(server), "an RTT")
            self.assertGreater(value(scrape(ServerCollector(server)), "rtunnel_site_rtt_seconds", site="alpha"), 0)
        finally:
            yield site.stopService()
            yield server.stopService()
        self.assertEqual(fatal, [])


def _with_samples(server: TunnelServerService) -> set[str]:
    return {name for name, samples in scrape(ServerCollector(server)).items() if samples}
