"""
The figures the roles keep (rtunnel.observe.stats) and the hooks that keep
them: payload bytes counted by MuxProtocol, stream opens by result, the
registry's sessions and refusals, the server's handshakes and enrollments,
the site role's sessions and reconnects, the refusal ring and the
throughput ring. In memory, on a Clock; every count is checked exactly.
"""

from __future__ import annotations

import gc
import tracemalloc
from array import array

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxProtocol, MuxStream
from rtunnel.mux import ErrorCode
from rtunnel.observe.api import throughput_json
from rtunnel.observe.stats import (
    REFUSALS_KEPT,
    SAMPLES,
    ClientFigures,
    ServerFigures,
    result_label,
)
from rtunnel.observe.view import Rates, Refusal, Throughput
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from tests.common import Recorder, joined_muxes, mux_of, pump_all


class FakeSession:
    """What the figures read of a session, with its numbers set by hand."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_rtt: float | None = None
        self.streams: dict[int, object] = {}


class Acceptor:
    """Accepts streams to port 1 with a recorder, leaves those to port 3 unanswered, refuses the others."""

    def __init__(self) -> None:
        self.protocols: list[Recorder] = []

    def __call__(self, stream: MuxStream) -> None:
        if stream.port == 3:
            return
        if stream.port != 1:
            stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, f"{stream.host}:{stream.port} is not allowed at this site")
            return
        protocol = Recorder()
        self.protocols.append(protocol)
        stream.accept(protocol)


class ResultLabelTests(SynchronousTestCase):
    def test_labels(self) -> None:
        """OK is "ok"; known codes are their names in lower case with dashes; unknown codes are one label."""
        self.assertEqual(result_label(0), "ok")
        self.assertEqual(result_label(ErrorCode.TARGET_NOT_ALLOWED), "target-not-allowed")
        self.assertEqual(result_label(ErrorCode.CONNECTION_RESET), "connection-reset")
        self.assertEqual(result_label(9999), "unknown-code")
        self.assertEqual(result_label(250), "unknown-code")


class MuxCountingTests(SynchronousTestCase):
    """Payload bytes and open outcomes, counted by a real MuxProtocol pair in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.acceptor = Acceptor()
        self.site_figures = ClientFigures()
        self.site, self.server, self.pump = joined_muxes(
            self.clock,
            lambda: mux_of(True, self.clock, self.acceptor, label="site"),
            lambda: mux_of(False, self.clock, label="server"),
        )
        self.fleet = ServerFigures(self.clock.seconds)
        self.server.figures = self.fleet.session_opened("alpha", self.server)
        self.site.figures = self.site_figures
        self.site_figures.attach(self.site)

    def test_bytes_each_way_exactly(self) -> None:
        """
        Every payload byte is counted once on each end, in the direction it
        went; framing and control frames are not payload.
        """
        stream = self.server.open_stream("h", 1)
        stream.write(b"x" * 100_000)
        pump_all(self.pump)
        [remote] = self.acceptor.protocols
        assert remote.transport is not None
        remote.transport.write(b"y" * 777)
        self.server.ping()
        pump_all(self.pump)
        self.assertEqual(remote.data, b"x" * 100_000)
        self.assertEqual((self.server.bytes_sent, self.server.bytes_received), (100_000, 777))
        self.assertEqual((self.site.bytes_sent, self.site.bytes_received), (777, 100_000))
        self.assertEqual(self.fleet.sites["alpha"].live.totals(), (100_000, 777))
        self.assertEqual(self.site_figures.live.totals(), (777, 100_000))

    def test_open_outcomes_on_both_ends(self) -> None:
        """
        The opener counts the peer's answers (ok, the OPEN_FAIL code) and
        keeps each refusal with its reason; the answering end counts its
        own answers.
        """
        for port in (1, 1, 2):
            self.server.open_stream("h", port).opened.addErrback(lambda _: None)
        pump_all(self.pump)
        alpha = self.fleet.sites["alpha"]
        self.assertEqual(alpha.opens, {"ok": 2, "target-not-allowed": 1})
        self.assertEqual(self.site_figures.opens, {"ok": 2, "target-not-allowed": 1})
        [refusal] = self.fleet.refusals
        self.assertEqual(refusal.site, "alpha")
        self.assertEqual(refusal.kind, "stream")
        self.assertEqual(refusal.reason, "TARGET_NOT_ALLOWED: h:2 is not allowed at this site")
        self.assertIs(alpha.last_refusal, refusal)
        self.assertEqual(alpha.live.streams(), 2)

    def test_opens_lost_with_the_tunnel(self) -> None:
        """An open the site never answered ends with the tunnel: counted as connection-reset."""
        stream = self.server.open_stream("h", 3)
        stream.opened.addErrback(lambda _: None)
        pump_all(self.pump)
        self.server.transport.abortConnection()  # type: ignore[union-attr]
        pump_all(self.pump)
        self.assertEqual(self.fleet.sites["alpha"].opens, {"connection-reset": 1})
        self.assertIn("tunnel lost", self.fleet.refusals[-1].reason)

    def test_ping_map_released(self) -> None:
        """Once every PING is answered the map of PINGs sent is let go (one fewer dict per session)."""
        self.server.ping()
        pump_all(self.pump)
        self.assertIsNotNone(self.server.last_rtt)
        self.assertIsNone(self.server._ping_sent)


class SessionTotalsTests(SynchronousTestCase):
    def test_totals_across_sessions_and_a_takeover(self) -> None:
        """
        Bytes of ended sessions stay in the totals; a session replaced by a
        newer one counts until it is gone, then is folded in; the totals
        never go backwards at any step.
        """
        fleet = ServerFigures(lambda: 1000.0)
        first, second = FakeSession(), FakeSession()
        seen: list[tuple[int, int]] = []
        site = fleet.session_opened("alpha", first)
        first.bytes_sent, first.bytes_received = 10, 20
        seen.append(site.live.totals())
        fleet.session_opened("alpha", second)  # takeover: first retires
        second.bytes_sent = 5
        first.bytes_sent = 11
        seen.append(site.live.totals())
        fleet.session_closed("alpha", first)
        seen.append(site.live.totals())
        self.assertIsNone(site.last_seen)  # the live session goes on
        second.bytes_received = 7
        fleet.session_closed("alpha", second)
        seen.append(site.live.totals())
        self.assertEqual(seen, [(10, 20), (16, 20), (16, 20), (16, 27)])
        self.assertEqual((site.sessions, fleet.sessions), (2, 2))
        self.assertIsNone(site.session)
        self.assertEqual(site.last_seen, 1000.0)
        fleet.session_closed("alpha", second)  # twice: nothing more
        self.assertEqual(site.live.totals(), (16, 27))


class RefusalRingTests(SynchronousTestCase):
    def test_bounded_newest_kept(self) -> None:
        """The ring keeps the last REFUSALS_KEPT refusals; counts by kind count them all."""
        clock = Clock()
        fleet = ServerFigures(clock.seconds)
        for i in range(REFUSALS_KEPT + 50):
            clock.advance(1)
            fleet.refuse(f"s{i % 3}", "stream", f"reason {i}")
        self.assertEqual(len(fleet.refusals), REFUSALS_KEPT)
        self.assertEqual(fleet.refusals[0].reason, "reason 50")
        self.assertEqual(fleet.refusals[-1], Refusal(150.0, "s2", "stream", "reason 149"))
        self.assertEqual(fleet.refusal_counts, {"stream": REFUSALS_KEPT + 50})
        self.assertEqual(fleet.sites["s2"].last_refusal, fleet.refusals[-1])

    def test_not_kept_when_not_logged(self) -> None:
        """A refusal whose log line was left out is counted, not kept: a flood cannot push out the rest."""
        fleet = ServerFigures(lambda: 0.0)
        fleet.refuse("", "handshake", "kept")
        fleet.refuse("", "handshake", "flood", keep=False)
        self.assertEqual([r.reason for r in fleet.refusals], ["kept"])
        self.assertEqual(fleet.refusal_counts, {"handshake": 2})


class ThroughputTests(SynchronousTestCase):
    def test_rates_oldest_first_bounded(self) -> None:
        """
        One rate per sample each way, oldest first, at most SAMPLES; zeros
        for the samples before bytes first flowed.
        """
        fleet = ServerFigures(lambda: 0.0, interval=5.0)
        self.assertEqual(fleet.throughput("alpha").to_site, ())
        session = FakeSession()
        fleet.session_opened("alpha", session)
        fleet.sample()
        fleet.sample()
        self.assertIsNone(fleet.sites["alpha"]._ring)  # no bytes yet: no ring
        self.assertEqual(fleet.throughput("alpha").to_site, (0.0, 0.0))
        session.bytes_sent = 500
        session.bytes_received = 50
        fleet.sample()
        session.bytes_sent = 1500
        fleet.sample()
        rates = fleet.throughput("alpha")
        self.assertEqual(rates.interval, 5.0)
        self.assertEqual(rates.to_site, (0.0, 0.0, 100.0, 200.0))
        self.assertEqual(rates.from_site, (0.0, 0.0, 10.0, 0.0))
        for i in range(SAMPLES + 7):
            session.bytes_sent += 5 * i
            fleet.sample()
        rates = fleet.throughput("alpha")
        self.assertEqual(len(rates.to_site), SAMPLES)
        self.assertEqual(rates.to_site[-1], float(SAMPLES + 6))
        self.assertEqual(rates.to_site[0], 7.0)

    def test_every_window_of_the_ring(self) -> None:
        """
        The window read from the ring is the last samples in order, oldest
        first, wherever it starts and however far it wraps (the samples of
        a ring of 4 checked after each of 11 samples).
        """
        fleet = ServerFigures(lambda: 0.0, interval=1.0, samples=4)
        session = FakeSession()
        fleet.session_opened("alpha", session)
        sent = []
        for i in range(1, 12):
            session.bytes_sent += i
            session.bytes_received += 100 * i
            sent.append(i)
            fleet.sample()
            rates = fleet.throughput("alpha")
            self.assertEqual(rates.to_site, tuple(float(n) for n in sent[-4:]), i)
            self.assertEqual(rates.from_site, tuple(100.0 * n for n in sent[-4:]), i)

    def test_rates_continue_over_a_reconnect(self) -> None:
        """A session's end folds its bytes into the totals: no negative rate, no spike."""
        fleet = ServerFigures(lambda: 0.0, interval=1.0)
        first = FakeSession()
        fleet.session_opened("alpha", first)
        first.bytes_sent = 100
        fleet.sample()
        fleet.session_closed("alpha", first)
        fleet.sample()
        second = FakeSession()
        fleet.session_opened("alpha", second)
        second.bytes_sent = 30
        fleet.sample()
        self.assertEqual(fleet.throughput("alpha").to_site, (100.0, 0.0, 30.0))

    def test_idle_site_memory(self) -> None:
        """
        A site with a session and no traffic costs the figures (and the
        registry's dictionary entry) well under 1 KiB: no ring is made.
        """
        fleet = ServerFigures(lambda: 0.0)
        sessions = [FakeSession() for _ in range(2000)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, session in enumerate(sessions):
                fleet.session_opened(f"site-{i:05d}", session)
            for _ in range(3):
                fleet.sample()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_site = (after - before) / len(sessions)
        print(f"\nfigures of an idle site with a session: {per_site:.0f} bytes")
        self.assertLess(per_site, 1024)

    def test_busy_site_memory(self) -> None:
        """With the throughput ring made (bytes flowed), a site still costs under 1 KiB."""
        fleet = ServerFigures(lambda: 0.0)
        sessions = [FakeSession() for _ in range(1000)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, session in enumerate(sessions):
                fleet.session_opened(f"site-{i:05d}", session)
                session.bytes_sent = 100_000 + i
            fleet.sample()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_site = (after - before) / len(sessions)
        print(f"\nfigures of a site with traffic: {per_site:.0f} bytes")
        self.assertLess(per_site, 1024)


class RegistryCountingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SiteRegistry(self.clock, max_pending_opens=1, max_streams_per_site=1)
        self.figures = self.registry.figures

    def connect(self, site: str = "alpha") -> tuple[MuxProtocol, MuxProtocol]:
        acceptor = Acceptor()
        client, server, pump = joined_muxes(
            self.clock,
            lambda: mux_of(True, self.clock, acceptor, label="site"),
            lambda: mux_of(False, self.clock, label=site),
        )
        self.registry.register(site, server, "192.0.2.7:40123")
        self.pump = pump
        return client, server

    def failure_of(self, d: defer.Deferred[MuxStream]) -> SiteUnavailable:
        error = self.failureResultOf(d, SiteUnavailable).value
        assert isinstance(error, SiteUnavailable)
        return error

    def test_registry_refusals_counted_and_kept(self) -> None:
        """
        Opens the registry refuses before any OPEN are counted under their
        own results and kept as stream refusals with the error's reason;
        a plain wait_for (not an open) counts nothing.
        """
        self.failure_of(self.registry.open("alpha", "h", 1, timeout=0))
        waiting = self.registry.open("alpha", "h", 1, timeout=5)
        self.failure_of(self.registry.open("alpha", "h", 1, timeout=5))
        self.clock.advance(5)
        self.failure_of(waiting)
        self.failureResultOf(self.registry.wait_for("beta", 0), SiteUnavailable)
        alpha = self.figures.sites["alpha"]
        self.assertEqual(alpha.opens, {"not-connected": 2, "too-many-waiting": 1})
        self.assertEqual(
            [(r.site, r.kind, r.reason) for r in self.figures.refusals],
            [
                ("alpha", "stream", "not connected"),
                ("alpha", "stream", "too many clients already waiting for it (1)"),
                ("alpha", "stream", "not connected within 5s"),
            ],
        )
        self.assertNotIn("beta", self.figures.sites)

    def test_sessions_and_stream_limit(self) -> None:
        """
        A registered session is counted and its figures attached; the
        registry's own stream limit is counted as stream-limit; the
        session's end folds its bytes and records when it was last seen.
        """
        self.clock.advance(50)
        _, server = self.connect()
        alpha = self.figures.sites["alpha"]
        self.assertIs(server.figures, alpha)
        self.assertEqual((alpha.sessions, self.figures.sessions), (1, 1))
        stream = self.successResultOf(self.registry.open("alpha", "h", 1, timeout=0))
        stream.write(b"z" * 1000)
        pump_all(self.pump)
        self.failure_of(self.registry.open("alpha", "h", 1, timeout=0))
        self.assertEqual(alpha.opens, {"ok": 1, "stream-limit": 1})
        self.clock.advance(10)
        server.transport.abortConnection()  # type: ignore[union-attr]
        pump_all(self.pump)
        self.assertIsNone(alpha.session)
        self.assertEqual(alpha.live.totals(), (1000, 0))
        self.assertEqual(alpha.last_seen, 60.0)


class ServerHookTests(SynchronousTestCase):
    """The tunnel server's handshakes and enrollments, over real TLS in memory."""

    def setUp(self) -> None:
        from tests.test_server_role import Server  # the helper only (its test classes stay there)

        self.server = Server(self)
        self.figures = self.server.factory.figures

    def test_figures_are_the_registrys(self) -> None:
        self.assertIs(self.figures, self.server.registry.figures)

    def test_handshake_outcomes(self) -> None:
        """
        A session is ok; a site the database refuses is counted by its code
        and kept with the log line's reason; a client that speaks no TLS is
        a tls-error; one that says nothing is a timeout (once, not also
        closed).
        """
        server = self.server
        key, cert = server.fixture.enroll("alpha")
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        ghost_key, ghost_cert = server.fixture.certify_without_enrolling("ghost")
        server.dial(ghost_key, ghost_cert)
        plain, _, pump = server.dial(protocol=Recorder, tls=False)
        plain.transport.write(b"GET / HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]
        pump_all(pump)
        silent, _, pump = server.dial(protocol=Recorder, tls=False)
        server.clock.advance(30)
        pump_all(pump)
        self.assertIsNotNone(silent.lost)
        self.assertEqual(self.figures.handshakes, {"ok": 1, "site-unknown": 1, "tls-error": 1, "timeout": 1})
        self.assertEqual(self.figures.sessions, 1)
        ghost = self.figures.sites["ghost"].last_refusal
        assert ghost is not None
        self.assertEqual(ghost.kind, "handshake")
        self.assertTrue(ghost.reason.startswith("rejected from 192.0.2.7:40123: site-unknown: "), ghost.reason)
        kinds = [(r.site, r.kind) for r in self.figures.refusals]
        self.assertEqual(kinds, [("ghost", "handshake"), ("", "handshake"), ("", "handshake")])
        self.assertIn("TLS handshake not finished within 30.0s", self.figures.refusals[-1].reason)

    def test_enrollment_outcomes(self) -> None:
        """An enrollment is ok; a refused one is counted by its code and kept with the site's name."""
        from rtunnel.identity import certs
        from rtunnel.identity.enrollment import EnrollRequest
        from rtunnel.roles.enrollment import EnrollmentRequester

        server = self.server
        key = certs.generate_private_key()
        csr = certs.dump_csr(certs.create_csr(key, "beta"))
        good = EnrollRequest("beta", server.fixture.token("beta"), csr)
        requester, _, _ = server.dial(protocol=lambda: EnrollmentRequester(good, server.clock))
        self.successResultOf(requester.result)
        bad = EnrollRequest("beta", "A" * 43, csr)
        requester, _, _ = server.dial(protocol=lambda: EnrollmentRequester(bad, server.clock))
        self.failureResultOf(requester.result)
        self.assertEqual(self.figures.enrollments, {"ok": 1, "token-unknown": 1})
        [refusal] = self.figures.refusals
        self.assertEqual((refusal.site, refusal.kind), ("beta", "enrollment"))
        self.assertIn("token-unknown: ", refusal.reason)
        self.assertEqual(self.figures.handshakes, {})  # enrollments are not tunnel sessions


class SiteRoleHookTests(SynchronousTestCase):
    """TunnelClientService.figures over a real enrolled site state and MemoryReactorClock."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from rtunnel.roles.site import SitePolicy, TunnelClientService
        from rtunnel.roles.target import Target, TargetConnector
        from tests.roles_helpers import EndpointMap, ServerFixture

        self.reactor = MemoryReactorClock()
        state = ServerFixture(self).enrolled_site_state(self, "alpha")
        connector = TargetConnector([Target("10.0.0.5", 554)], EndpointMap(), self.reactor)
        policy = SitePolicy(keepalive=None, handshake_timeout=30.0)
        self.service = TunnelClientService(
            self.reactor, state, None, connector, policy, lambda _: None, jitter=lambda: 0
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.figures = self.service.figures

    def connection(self) -> MuxProtocol:
        """The server accepts the current attempt's TCP connection (the TLS protocol's inner one)."""
        from twisted.internet.address import IPv4Address

        from tests.roles_helpers import TCPTransport

        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(TCPTransport(IPv4Address("TCP", host, port)))
        return protocol  # type: ignore[no-any-return]

    def test_reconnect_reasons(self) -> None:
        """
        Each reconnect is counted by why the attempt before ended: a failed
        TCP connect, a connection lost before the HELLO, the handshake
        deadline; nothing is up meanwhile.
        """
        from twisted.internet import error
        from twisted.python.failure import Failure

        self.reactor.advance(0.3)
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.figures.reconnects, {"connect": 1})
        self.reactor.advance(1.0)
        self.connection().connectionLost(Failure(error.ConnectionLost("gone")))
        self.assertEqual(self.figures.reconnects, {"connect": 1, "network": 1})
        self.reactor.advance(2.0)
        connection = self.connection()
        self.reactor.advance(30.0)
        self.assertTrue(connection.transport.aborted)  # type: ignore[union-attr]
        connection.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.figures.reconnects, {"connect": 1, "network": 1, "handshake-timeout": 1})
        self.assertFalse(self.figures.up)
        self.assertEqual(self.figures.sessions, 0)
        self.assertIsNone(self.figures.session)


class RatesTests(SynchronousTestCase):
    def test_a_read_only_sequence_of_floats(self) -> None:
        """Every other value of the array from an offset: length, items, slices, iteration; equal to a tuple."""
        window = array("f", [1.0, 10.0, 2.0, 20.0, 3.0, 30.0])
        to, back = Rates(window, 0, 2), Rates(window, 1, 2)
        self.assertEqual((len(to), len(back)), (3, 3))
        self.assertEqual((to[0], to[-1], back[1]), (1.0, 3.0, 20.0))
        self.assertIsInstance(to[0], float)
        self.assertEqual(to[1:], (2.0, 3.0))
        self.assertEqual(list(back), [10.0, 20.0, 30.0])
        self.assertEqual(to, (1.0, 2.0, 3.0))
        self.assertEqual((1.0, 2.0, 3.0), to)
        self.assertEqual(to, [1.0, 2.0, 3.0])
        self.assertNotEqual(to, back)
        self.assertNotEqual(to, "abc")
        self.assertEqual(hash(to), hash((1.0, 2.0, 3.0)))
        self.assertEqual(repr(back), "Rates([10.0, 20.0, 30.0])")
        self.assertEqual(len(Rates(array("f"), 1, 2)), 0)
        self.assertEqual(throughput_json(Throughput(5.0, to, back))["from_site"], [10.0, 20.0, 30.0])
