"""
The Prometheus collectors (rtunnel.observe.metrics) and the server's
FleetView (rtunnel.observe.server_view), over a real TunnelServerService on
a MemoryReactorClock whose figures are set up by hand: the scrape parsed
back with prometheus_client's own parser, checked value by value; the
names and labels promised (bounded: per site, never per stream or client);
1,000 simulated sites scraped in well under a second; `promtool check
metrics` on the output when promtool is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import __version__
from rtunnel.address import HostPort
from rtunnel.identity.store import SiteAdmission
from rtunnel.observe.metrics import ServerCollector, SiteCollector, metrics_registry
from rtunnel.observe.server_view import ServerView
from rtunnel.observe.stats import SAMPLE_INTERVAL, ClientFigures
from rtunnel.observe.view import FleetView, ForwardSnapshot, Refusal
from rtunnel.roles.forward import ForwardSpec
from rtunnel.roles.server import ServerPolicy, TunnelServerService
from rtunnel.roles.site import ReplicaFigures
from rtunnel.services import ServerConfig
from tests.roles_helpers import ServerFixture
from tests.test_observe_stats import FakeSession

PROMTOOL = shutil.which("promtool")
PROMTOOL_MISSING = "promtool not installed (apt-get install prometheus, which provides /usr/bin/promtool)"


def parse(text: str) -> dict[str, list[Sample]]:
    """The samples of a scrape by family name, as Prometheus reads the text."""
    return {family.name: list(family.samples) for family in text_string_to_metric_families(text)}


def value(samples: dict[str, list[Sample]], family: str, name: str | None = None, **labels: str) -> float:
    """The one sample of C{family} (named C{name}) with exactly these labels besides any others."""
    found = [
        s
        for s in samples[family]
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family, name, labels, found)
    return found[0].value


def scrape(collector: ServerCollector | SiteCollector) -> str:
    return generate_latest(metrics_registry(collector)).decode()


def admitted(enrolled: bool = True, revoked: bool = False) -> SiteAdmission:
    return SiteAdmission(enrolled, "ab" * 16 if enrolled else None, datetime.now(UTC) if revoked else None)


class ServerSetup:
    """A server service (not started unless asked) with figures set by hand."""

    def __init__(self, case: SynchronousTestCase, forwards: tuple[str, ...] = ()) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.fixture = ServerFixture(case)
        self.config = ServerConfig(
            state_dir=self.fixture.directory,
            listen="tcp:5500:interface=127.0.0.1",
            forwards=tuple(ForwardSpec.parse(f) for f in forwards),
            policy=ServerPolicy(keepalive=None),
            admin=None,
            name=f"metrics-{id(self)}",
        )
        self.service = TunnelServerService(self.config, self.fixture.state, self.reactor, case.fail)
        self.figures = self.service.figures

    def start(self, case: SynchronousTestCase) -> None:
        self.service.startService()
        case.addCleanup(lambda: self.service.running and self.service.stopService())


class ServerCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.setup = ServerSetup(self, forwards=("8080:alpha:10.0.0.5:554",))
        self.service = self.setup.service
        self.figures = self.setup.figures
        self.service.admission.replace(
            {
                "alpha": admitted(),
                "beta": admitted(),
                "gamma": admitted(revoked=True),
                "invited": admitted(enrolled=False),
            }
        )

    def test_everything_the_issue_lists(self) -> None:
        """
        Build info; sites known/enrolled/revoked/connected and up per site;
        sessions, handshakes and enrollments by result; per site open
        streams, opens by result, bytes each way, RTT; forward connections
        and state; front doors; refusals by kind; the library's process
        metrics. Each value is the figure set up, exactly.
        """
        figures = self.figures
        self.setup.start(self)
        alpha = FakeSession()
        figures.session_opened("alpha", alpha)
        alpha.bytes_sent, alpha.bytes_received = 123_456, 789
        alpha.last_rtt = 0.0125
        alpha.streams = {1: object(), 3: object()}
        old = FakeSession()
        figures.session_opened("beta", old)
        old.bytes_sent = 1000
        figures.session_closed("beta", old)
        site = figures.sites["alpha"]
        site.local_open(0, "")
        site.local_open(0, "")
        site.local_open(32, "not allowed")
        site.refused_open("not-connected", "not connected within 5s")
        figures.handshake("ok", 2)
        figures.handshake("site-revoked")
        figures.enrollment("token-spent")
        figures.refuse("", "handshake", "x")
        door = figures.door("socks5")
        door.accepted = 4
        door.refused("unknown-site", "", "socks5 refused 127.0.0.1:1 asking for x: unknown site")
        [factory] = self.service.forward_factories
        factory.accepted, factory.connections, factory.refused = 9, 2, 1

        samples = parse(scrape(ServerCollector(self.service)))

        self.assertEqual(value(samples, "rtunnel_build_info", version=__version__, role="server"), 1)
        self.assertEqual(value(samples, "rtunnel_replica_info", replica=self.service.replica_id), 1)
        self.assertEqual(value(samples, "rtunnel_replicas"), 1)
        self.assertEqual(value(samples, "rtunnel_sites_known"), 4)
        self.assertEqual(value(samples, "rtunnel_sites_enrolled"), 3)
        self.assertEqual(value(samples, "rtunnel_sites_revoked"), 1)
        self.assertEqual(value(samples, "rtunnel_sites_connected"), 1)
        self.assertEqual(
            {s.labels["site"]: s.value for s in samples["rtunnel_site_up"]},
            {"alpha": 1, "beta": 0},  # none for a site revoked or only invited
        )
        self.assertEqual(value(samples, "rtunnel_site_sessions", site="alpha"), 1)
        self.assertEqual(value(samples, "rtunnel_site_sessions", site="beta"), 1)
        self.assertEqual(value(samples, "rtunnel_sessions"), 2)
        self.assertEqual(value(samples, "rtunnel_site_streams", site="alpha"), 2)
        self.assertEqual(value(samples, "rtunnel_site_bytes", site="alpha", direction="to_site"), 123_456)
        self.assertEqual(value(samples, "rtunnel_site_bytes", site="alpha", direction="from_site"), 789)
        self.assertEqual(value(samples, "rtunnel_site_bytes", site="beta", direction="to_site"), 1000)
        self.assertEqual(
            {(s.labels["site"], s.labels["result"]): s.value for s in samples["rtunnel_site_stream_opens"]},
            {("alpha", "ok"): 2, ("alpha", "target-not-allowed"): 1, ("alpha", "not-connected"): 1},
        )
        self.assertEqual(
            [(s.labels, s.value) for s in samples["rtunnel_site_rtt_seconds"]], [({"site": "alpha"}, 0.0125)]
        )
        self.assertEqual(
            {s.labels["result"]: s.value for s in samples["rtunnel_handshakes"]}, {"ok": 2, "site-revoked": 1}
        )
        self.assertEqual(value(samples, "rtunnel_enrollments", result="token-spent"), 1)
        self.assertEqual(
            {s.labels["kind"]: s.value for s in samples["rtunnel_refusals"]},
            {"stream": 2, "handshake": 1, "frontdoor": 1},
        )
        forward = "127.0.0.1:8080:alpha:10.0.0.5:554"
        self.assertEqual(value(samples, "rtunnel_forward_connections", forward=forward), 9)
        self.assertEqual(value(samples, "rtunnel_forward_open_connections", forward=forward), 2)
        self.assertEqual(value(samples, "rtunnel_forward_refusals", forward=forward), 1)
        self.assertEqual(value(samples, "rtunnel_forward_listening", forward=forward, source="command line"), 1)
        self.assertEqual(value(samples, "rtunnel_frontdoor_connections", door="socks5"), 4)
        self.assertEqual(value(samples, "rtunnel_frontdoor_refusals", door="socks5", reason="unknown-site"), 1)
        self.assertEqual(value(samples, "rtunnel_preauth_connections"), 0)
        self.assertIn("process_resident_memory_bytes", {s.name for f in samples.values() for s in f})
        self.assertIn("python_gc_objects_collected", samples)
        self.assertIn("python_info", samples)

    def test_names_types_and_labels(self) -> None:
        """
        Every family is rtunnel_-prefixed (the library's aside), counters
        end in _total, and the only labels are the bounded ones.
        """
        figures = self.figures
        session = FakeSession()
        figures.session_opened("alpha", session)
        figures.sites["alpha"].local_open(0, "")
        figures.handshake("ok")
        figures.enrollment("ok")
        figures.refuse("", "handshake", "x")
        figures.door("http-connect").refused("bad-credentials", "", "x")
        text = scrape(ServerCollector(self.service))
        allowed = {
            "site",
            "result",
            "reason",
            "direction",
            "kind",
            "door",
            "forward",
            "source",
            "version",
            "role",
            "replica",
        }
        ours = [f for f in text_string_to_metric_families(text) if f.name.startswith("rtunnel_")]
        self.assertGreater(len(ours), 20)
        for family in ours:
            for sample in family.samples:
                self.assertLessEqual(set(sample.labels), allowed, sample)
                if family.type == "counter":
                    self.assertTrue(sample.name.endswith("_total"), sample.name)
        others = {
            f.name.split("_")[0] for f in text_string_to_metric_families(text) if not f.name.startswith("rtunnel_")
        }
        self.assertEqual(others, {"process", "python"})

    def test_counters_do_not_go_back_over_a_session_end(self) -> None:
        """A session's bytes move from the live session to the totals in one step: the scrape sees no drop."""
        session = FakeSession()
        self.figures.session_opened("alpha", session)
        session.bytes_sent = 5000
        collector = ServerCollector(self.service)
        before = value(parse(scrape(collector)), "rtunnel_site_bytes", site="alpha", direction="to_site")
        self.figures.session_closed("alpha", session)
        after = parse(scrape(collector))
        self.assertEqual((before, value(after, "rtunnel_site_bytes", site="alpha", direction="to_site")), (5000, 5000))
        self.assertEqual(value(after, "rtunnel_site_up", site="alpha"), 0)
        self.assertEqual(after["rtunnel_site_rtt_seconds"], [])

    def test_thousand_sites(self) -> None:
        """
        1,000 known sites, each connected with traffic, opens and an RTT:
        the scrape takes well under a second; its size and time are
        printed.
        """
        figures = self.figures
        self.service.admission.replace({f"site-{i:04d}": admitted() for i in range(1000)})
        for i in range(1000):
            session = FakeSession()
            site = figures.session_opened(f"site-{i:04d}", session)
            session.bytes_sent, session.bytes_received = 10_000_000 + i, 20_000 + i
            session.last_rtt = 0.001 * (i % 50)
            site.local_open(0, "")
            site.local_open(33, "refused")
        registry = metrics_registry(ServerCollector(self.service))
        generate_latest(registry)  # warm
        started = time.perf_counter()
        text = generate_latest(registry)
        elapsed = time.perf_counter() - started
        samples = parse(text.decode())
        print(f"\nscrape of 1,000 sites: {len(text):,} bytes, {elapsed * 1000:.1f} ms")
        self.assertEqual(len(samples["rtunnel_site_up"]), 1000)
        self.assertEqual(value(samples, "rtunnel_site_bytes", site="site-0999", direction="to_site"), 10_000_999)
        self.assertLess(elapsed, 1.0)

    def test_promtool_accepts_the_scrape(self) -> None:
        """`promtool check metrics` finds nothing to say about the scrape (names, units, help, types)."""
        if PROMTOOL is None:
            self.skipTest(PROMTOOL_MISSING)
        figures = self.figures
        self.setup.start(self)
        session = FakeSession()
        figures.session_opened("alpha", session)
        session.last_rtt = 0.002
        figures.sites["alpha"].local_open(0, "")
        figures.sites["alpha"].refused_open("stream-limit", "x")
        figures.handshake("ok")
        figures.enrollment("token-unknown")
        figures.refuse("", "handshake", "x")
        figures.door("socks5").refused("limits", "", "x")
        text = scrape(ServerCollector(self.service))
        result = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))


class SiteCollectorTests(SynchronousTestCase):
    class Service:
        """What the site collector reads of a TunnelClientService."""

        def __init__(self, name: str | None) -> None:
            self.figures = ClientFigures()
            self.state = type("State", (), {"site_name": name})()
            self.replica_figures = ReplicaFigures()

    def test_values(self) -> None:
        """Session up, sessions, reconnects by reason, streams, opens by result, bytes each way, RTT."""
        service = self.Service("alpha")
        figures = service.figures
        first, second = FakeSession(), FakeSession()
        figures.attach(first)
        figures.opened()
        first.bytes_sent, first.bytes_received = 10, 20
        figures.detach(first)
        figures.up = False
        figures.ended = "network"
        figures.reconnect()
        figures.reconnect()  # a failed connect
        figures.attach(second)
        figures.opened()
        second.bytes_sent, second.bytes_received = 1, 2
        second.streams = {2: object()}
        second.last_rtt = 0.25
        figures.remote_open(0, "")
        figures.remote_open(32, "no")
        samples = parse(scrape(SiteCollector(service)))  # type: ignore[arg-type]
        self.assertEqual(value(samples, "rtunnel_build_info", role="site"), 1)
        self.assertEqual(value(samples, "rtunnel_tunnel_info", site="alpha"), 1)
        self.assertEqual(value(samples, "rtunnel_tunnel_up"), 1)
        self.assertEqual(value(samples, "rtunnel_tunnel_sessions"), 2)
        self.assertEqual(
            {s.labels["reason"]: s.value for s in samples["rtunnel_tunnel_reconnect_attempts"]},
            {"network": 1, "connect": 1},
        )
        self.assertEqual(value(samples, "rtunnel_tunnel_streams"), 1)
        self.assertEqual(
            {s.labels["result"]: s.value for s in samples["rtunnel_tunnel_stream_opens"]},
            {"ok": 1, "target-not-allowed": 1},
        )
        self.assertEqual(value(samples, "rtunnel_tunnel_bytes", direction="to_server"), 11)
        self.assertEqual(value(samples, "rtunnel_tunnel_bytes", direction="from_server"), 22)
        self.assertEqual(value(samples, "rtunnel_tunnel_rtt_seconds"), 0.25)

    def test_sessions_per_replica(self) -> None:
        """Open sessions, and each announced replica up or not; no replica series with a server without replicas."""
        service = self.Service("alpha")
        samples = parse(scrape(SiteCollector(service)))  # type: ignore[arg-type]
        self.assertEqual(value(samples, "rtunnel_site_sessions"), 0)
        self.assertEqual(samples.get("rtunnel_site_replica_up", []), [])
        service.replica_figures = ReplicaFigures(2, (("a", True), ("b", False), ("c", True)))
        samples = parse(scrape(SiteCollector(service)))  # type: ignore[arg-type]
        self.assertEqual(value(samples, "rtunnel_site_sessions"), 2)
        self.assertEqual(
            {s.labels["replica"]: s.value for s in samples["rtunnel_site_replica_up"]}, {"a": 1, "b": 0, "c": 1}
        )

    def test_before_enrollment_and_promtool(self) -> None:
        """A site not enrolled yet has no site name to show; promtool accepts the scrape."""
        text = scrape(SiteCollector(self.Service(None)))  # type: ignore[arg-type]
        samples = parse(text)
        self.assertNotIn("rtunnel_tunnel_info", samples)
        self.assertEqual(value(samples, "rtunnel_tunnel_up"), 0)
        self.assertEqual(samples["rtunnel_tunnel_rtt_seconds"], [])
        if PROMTOOL is None:
            self.skipTest(PROMTOOL_MISSING)
        result = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))


class ServerViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.setup = ServerSetup(self, forwards=("8080:alpha:10.0.0.5:554", "[::1]:8081:beta:h:1"))
        self.service = self.setup.service
        self.view: FleetView = ServerView(self.service)

    def test_sites_from_memory(self) -> None:
        """
        Known sites come from the admission snapshot and the registry,
        sorted; each with what the registry, the figures and the last
        announcement say. An unknown name is None.
        """
        from tests.common import joined_muxes, mux_of

        service, figures = self.service, self.setup.figures
        service.admission.replace({"beta": admitted(), "alpha": admitted(), "gamma": admitted(revoked=True)})
        clock = self.setup.reactor
        _, server, _ = joined_muxes(clock, lambda: mux_of(True, clock), lambda: mux_of(False, clock, label="alpha"))
        service.registry.register("alpha", server, "192.0.2.7:40123")
        server.bytes_sent, server.bytes_received, server.last_rtt = 300, 40, 0.004
        figures.refuse("alpha", "stream", "not connected within 5s")
        figures.site("gamma").last_seen = 1_700_000_000.0
        names = [s.name for s in self.view.sites()]
        self.assertEqual(names, ["alpha", "beta", "gamma"])
        alpha = self.view.site("alpha")
        assert alpha is not None
        self.assertEqual(
            (alpha.connected, alpha.enrolled, alpha.revoked, alpha.peer, alpha.since),
            (True, True, False, "192.0.2.7:40123", clock.seconds()),
        )
        self.assertEqual((alpha.bytes_to_site, alpha.bytes_from_site, alpha.streams, alpha.rtt), (300, 40, 0, 0.004))
        self.assertEqual(alpha.services, {})
        self.assertEqual(alpha.last_refusal, Refusal(clock.seconds(), "alpha", "stream", "not connected within 5s"))
        gamma = self.view.site("gamma")
        assert gamma is not None
        self.assertEqual(
            (gamma.connected, gamma.revoked, gamma.since, gamma.peer, gamma.rtt), (False, True, 1.7e9, "", None)
        )
        self.assertIsNone(self.view.site("nobody"))
        self.assertIsNone(self.view.throughput("nobody"))
        throughput = self.view.throughput("alpha")
        assert throughput is not None
        self.assertEqual((throughput.interval, throughput.to_site), (SAMPLE_INTERVAL, ()))
        figures.sample()
        self.assertEqual(self.view.throughput("alpha").to_site, (300 / SAMPLE_INTERVAL,))  # type: ignore[union-attr]
        self.assertEqual([r.reason for r in self.view.refusals()], ["not connected within 5s"])

    def test_names_and_services_made_once(self) -> None:
        """
        The sorted names and each site's services text are made again only
        when they changed (they are most of what a snapshot of a large
        fleet cost): the same objects while nothing changed, new ones once
        a site is added or announces, a removed site's text forgotten.
        A site connected but not in the admission snapshot is listed too.
        """
        from tests.common import joined_muxes, mux_of, pump_all

        service = self.service
        service.admission.replace({"beta": admitted(), "alpha": admitted()})
        view = ServerView(service)
        names = view.names()
        self.assertEqual(list(names), ["alpha", "beta"])
        self.assertIs(view.names(), names)
        clock = self.setup.reactor
        _, server, pump = joined_muxes(clock, lambda: mux_of(True, clock), lambda: mux_of(False, clock, label="zed"))
        service.registry.register("zed", server, "192.0.2.7:40123")
        self.assertEqual(list(view.names()), ["alpha", "beta", "zed"])
        service.registry.announce("zed", server, {"web": HostPort("127.0.0.1", 8080)})
        first = view.site("zed")
        second = view.site("zed")
        assert first is not None and second is not None
        self.assertEqual(first.services, {"web": "127.0.0.1:8080"})
        self.assertIs(second.services, first.services)
        with self.assertRaises(TypeError):
            first.services["web"] = "x"  # type: ignore[index]
        service.registry.announce("zed", server, {"web": HostPort("127.0.0.1", 8081)})
        third = view.site("zed")
        assert third is not None
        self.assertEqual(third.services, {"web": "127.0.0.1:8081"})
        self.assertEqual(first.services, {"web": "127.0.0.1:8080"})
        view.site("alpha")
        service.admission.replace({"beta": admitted()})
        server.transport.loseConnection()  # zed goes
        pump_all(pump)
        self.assertEqual(list(view.names()), ["beta"])
        self.assertEqual(set(view._services), set())  # neither alpha's nor zed's text kept

    def test_forwards_and_readiness(self) -> None:
        """
        Forwards of the command line sorted by bind address and port, with
        their state and counts; ready once the tunnel port listens, not
        while the state database fails, not while stopping.
        """
        self.assertEqual(self.view.not_ready(), "the tunnel port is not listening yet")
        self.setup.start(self)
        self.assertIsNone(self.view.not_ready())
        factories = self.service.command_line_forwards
        factories[self.setup.config.forwards[0]].accepted = 3
        self.assertEqual(
            list(self.view.forwards()),
            [
                ForwardSnapshot("127.0.0.1:8080:alpha:10.0.0.5:554", "command line", "listening", 0, 3),
                ForwardSnapshot("[::1]:8081:beta:h:1", "command line", "listening", 0, 0),
            ],
        )
        self.service.database.failing, self.service.database.failures = True, 3
        self.assertEqual(
            self.view.not_ready(), "the state database is failing (3 operations failed since it last worked)"
        )
        self.service.database.failing = False
        self.service.factory.stopping = True
        self.assertEqual(self.view.not_ready(), "the tunnel server is stopping")
