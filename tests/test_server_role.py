"""
The tunnel-server role: TunnelConnection over real TLS in memory (the
server's TLS options from a real ServerState, a site's TLS options with a
real certificate), authentication outcomes, the handshake timeout, the
pre-authentication byte limit, revocation of live sessions, and the
TunnelServerService lifecycle on a MemoryReactorClock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import Keepalive, MuxProtocol, StreamOpenFailed
from rtunnel.endpoints import published_registry
from rtunnel.identity import certs
from rtunnel.identity.enrollment import EnrollRequest, decode_reply
from rtunnel.identity.errors import EnrollmentRefused
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import StateStore
from rtunnel.mux import ErrorCode
from rtunnel.roles.enrollment import EnrollmentRequester, EnrollmentResponder
from rtunnel.roles.forward import ForwardSpec
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from rtunnel.roles.server import (
    AdmissionGate,
    GatedConnection,
    RevocationWatch,
    ServerPolicy,
    TunnelConnection,
    TunnelServerFactory,
)
from rtunnel.services import ServerConfig, build_server_service
from tests.roles_helpers import SITE_PEER, Built, Recorder, ServerFixture, Watching, pump_all, tls_connect

POLICY = ServerPolicy(keepalive=None, handshake_timeout=30.0)


class Server:
    """A TunnelServerFactory over a real server state, and sites dialing it in memory."""

    def __init__(self, case: SynchronousTestCase, policy: ServerPolicy = POLICY) -> None:
        self.case = case
        self.clock = Clock()
        self.fixture = ServerFixture(case)
        self.connected: list[tuple[str, str]] = []
        self.disconnected: list[str] = []
        self.registry = SiteRegistry(
            self.clock,
            on_connected=lambda s, p: self.connected.append((s, p)),
            on_disconnected=self.disconnected.append,
        )
        self.factory = TunnelServerFactory(self.fixture.state, self.registry, self.clock, policy)
        self.accepting = Watching(self.factory)

    def dial(self, key=None, cert=None, protocol=None, tls: bool = True):  # type: ignore[no-untyped-def]
        """
        Connect a site: by default a site MuxProtocol presenting C{cert}.
        @return: (client protocol, server TunnelConnection, pump)
        """
        build = protocol or (lambda: MuxProtocol(initiator=True, clock=self.clock, label="site"))
        clients = Built(build)
        _, _, pump = tls_connect(
            self.accepting,
            self.fixture.server_options(),
            clients,
            self.fixture.site_options(key, cert),
            self.clock,
            client_tls=tls,
        )
        connection = self.accepting.built[-1]
        assert isinstance(connection, TunnelConnection)
        return clients.built[0], connection, pump


class AuthenticationTests(SynchronousTestCase):
    def test_enrolled_site_is_registered(self) -> None:
        """
        A site with its current certificate becomes a mux session in the
        registry under its name, with its certificate's fingerprint, and
        is reported connected from its address.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        site, connection, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        session = server.registry.session_for("alpha")
        self.assertIsNotNone(session)
        self.assertIs(session, connection.inner)
        self.assertEqual(server.registry.live(), [("alpha", certs.fingerprint(cert), session)])
        self.assertEqual(server.connected, [("alpha", "192.0.2.7:40123")])
        self.assertEqual((connection.site, connection.fingerprint), ("alpha", certs.fingerprint(cert)))

    def test_admission_reads_no_database(self) -> None:
        """
        Admission (at the handshake and at HELLO) decides from the snapshot
        in memory: with the database connection closed, an enrolled site is
        still admitted and an unknown one still refused.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        ghost_key, ghost_cert = server.fixture.certify_without_enrolling("ghost")
        server.fixture.state.store.close()
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.registry.session_for("alpha"))
        ghost, _, _ = server.dial(ghost_key, ghost_cert)
        self.assertIn("site-unknown", ghost.peer_goaway[1])  # type: ignore[index]

    def test_authenticated_session_is_wired_to_tls_directly(self) -> None:
        """
        Once a site is authenticated the TLS protocol delivers to its
        session directly (TunnelConnection is no longer in the way, and no
        observer of the session keeps it alive); the session's end is still
        counted and logged.
        """
        server = Server(self)
        log = LogCapture(self)
        key, cert = server.fixture.enroll("alpha")
        site, connection, pump = server.dial(key, cert)
        tls = connection.transport
        session = server.registry.session_for("alpha")
        assert session is not None
        self.assertIs(tls.wrappedProtocol, session)  # type: ignore[union-attr]
        for callback, *args in session._closed_waiters:
            self.assertIsNot(getattr(callback, "__self__", None), connection)
            self.assertNotIn(connection, args)
        self.assertEqual(server.factory.connections, 1)
        site.ping()
        pump_all(pump)
        self.assertIsNotNone(site.last_rtt)  # answered by the session, reached directly
        site.abort()
        pump_all(pump)
        self.assertEqual(server.factory.connections, 0)
        [line] = log.lines("site alpha from 192.0.2.7:40123 disconnected")

    def test_registered_only_after_hello(self) -> None:
        """
        A site that completed TLS but has not sent its HELLO is not in the
        registry; it is dropped when the handshake timeout runs out.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        mute, connection, pump = server.dial(key, cert, protocol=Recorder)
        self.assertIsInstance(connection.inner, MuxProtocol)
        self.assertIsNone(server.registry.session_for("alpha"))
        server.clock.advance(29.9)
        pump_all(pump)
        self.assertIsNone(mute.lost)
        server.clock.advance(0.1)
        pump_all(pump)
        self.assertIsNotNone(mute.lost)
        self.assertEqual(server.connected, [])

    def _rejected(self, server: Server, key, cert, code: str) -> None:  # type: ignore[no-untyped-def]
        site, connection, _ = server.dial(key, cert)
        self.assertIsNotNone(site.peer_goaway)
        goaway_code, reason = site.peer_goaway  # type: ignore[misc]
        self.assertEqual(goaway_code, ErrorCode.NOT_AUTHORIZED)
        self.assertTrue(reason.startswith(code + ": "), reason)
        self.successResultOf(site.when_closed())
        self.successResultOf(connection.inner.when_closed())  # type: ignore[union-attr]
        self.assertEqual(server.registry.connected_sites(), {})
        self.assertEqual(server.connected, [])

    def test_unknown_site_is_refused(self) -> None:
        """
        A certificate from our CA for a site the database does not know gets
        GOAWAY NOT_AUTHORIZED site-unknown and the connection is closed.
        """
        server = Server(self)
        key, cert = server.fixture.certify_without_enrolling("ghost")
        self._rejected(server, key, cert, "site-unknown")

    def test_revoked_site_is_refused(self) -> None:
        """A revoked site's certificate gets GOAWAY NOT_AUTHORIZED site-revoked."""
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        server.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
        self._rejected(server, key, cert, "site-revoked")

    def test_superseded_certificate_is_refused(self) -> None:
        """
        After a site enrolled again, its previous certificate gets GOAWAY
        NOT_AUTHORIZED certificate-superseded; the new one is accepted.
        """
        server = Server(self)
        old_key, old_cert = server.fixture.enroll("alpha")
        new_key, new_cert = server.fixture.enroll("alpha")
        self._rejected(server, old_key, old_cert, "certificate-superseded")
        site, _, _ = server.dial(new_key, new_cert)
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.registry.session_for("alpha"))

    def test_client_without_certificate_may_only_enroll(self) -> None:
        """
        A client presenting no certificate is handed to the enrollment
        responder: it can redeem a token for a certificate, and the
        connection ends after the reply without any mux session.
        """
        server = Server(self)
        key = certs.generate_private_key()
        request = EnrollRequest("beta", server.fixture.token("beta"), certs.dump_csr(certs.create_csr(key, "beta")))
        requester, connection, _ = server.dial(protocol=lambda: EnrollmentRequester(request, server.clock))
        self.assertIsInstance(connection.inner, EnrollmentResponder)
        pem = self.successResultOf(requester.result)
        self.assertEqual(certs.site_name_of(certs.load_certificate(pem)), "beta")
        self.assertEqual(server.registry.connected_sites(), {})

    def test_enrollment_refusal_reaches_the_site(self) -> None:
        """An unknown token is refused with its code over the same path."""
        server = Server(self)
        key = certs.generate_private_key()
        request = EnrollRequest("beta", "A" * 43, certs.dump_csr(certs.create_csr(key, "beta")))
        requester, _, _ = server.dial(protocol=lambda: EnrollmentRequester(request, server.clock))
        failure = self.failureResultOf(requester.result, EnrollmentRefused)
        self.assertEqual(failure.value.code, "token-unknown")

    def test_sites_cannot_open_streams_into_the_cloud(self) -> None:
        """A stream a site opens towards the server is refused, the session stays up."""
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        site, _, pump = server.dial(key, cert)
        stream = site.open_stream("10.0.0.1", 80)
        pump_all(pump)
        failure = self.failureResultOf(stream.opened, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.TARGET_NOT_ALLOWED)
        self.assertTrue(site.ready)


class KeepaliveWheelTests(SynchronousTestCase):
    def test_sessions_share_one_keepalive_timer(self) -> None:
        """
        The server's sessions run their keepalive checks through the
        factory's one wheel: three connected sites leave one timer, and a
        site that goes silent is still dropped after the timeout (plus at
        most the wheel's second).
        """
        server = Server(self, ServerPolicy(keepalive=Keepalive(25.0, 30.0), handshake_timeout=30.0))
        dialled = []
        for name in ("alpha", "beta", "gamma"):
            key, cert = server.fixture.enroll(name)
            dialled.append(server.dial(key, cert))
        for site, _, _ in dialled:
            self.assertTrue(site.ready)
        self.assertEqual(len(server.factory.keepalive_wheel), 3)
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)
        server.clock.advance(31)
        for _, _, pump in dialled:
            pump_all(pump)
        self.assertEqual(server.disconnected, ["alpha", "beta", "gamma"])


class HandshakeLimitTests(SynchronousTestCase):
    def test_handshake_timeout_drops_silent_connection(self) -> None:
        """
        A connection that never even starts TLS is dropped when the
        handshake timeout runs out, not before.
        """
        server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=10.0))
        silent, connection, pump = server.dial(protocol=Recorder, tls=False)
        server.clock.advance(9.9)
        pump_all(pump)
        self.assertIsNone(silent.lost)
        server.clock.advance(0.1)
        pump_all(pump)
        self.assertIsNotNone(silent.lost)
        self.assertIsNone(connection.inner)
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_authenticated_session_outlives_handshake_timeout(self) -> None:
        """The handshake timer stops once a site is authenticated."""
        server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=10.0))
        key, cert = server.fixture.enroll("alpha")
        site, _, pump = server.dial(key, cert)
        server.clock.advance(100)
        pump_all(pump)
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.registry.session_for("alpha"))

    def _bare(self, limit: int) -> tuple[TunnelConnection, StringTransport]:
        server = Server(self, ServerPolicy(keepalive=None, max_preauth_bytes=limit))
        connection = server.factory.buildProtocol(SITE_PEER)
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def test_too_much_data_before_authentication_drops_connection(self) -> None:
        """
        Bytes received before the peer is known are held up to
        max_preauth_bytes; one byte more aborts the connection.
        """
        connection, transport = self._bare(1000)
        connection.dataReceived(b"x" * 600)
        connection.dataReceived(b"x" * 400)
        self.assertFalse(transport.disconnecting)
        connection.dataReceived(b"x")
        self.assertTrue(transport.disconnected)  # aborted, not closed gracefully

    def test_held_bytes_reach_the_protocol_chosen_after_handshake(self) -> None:
        """
        Bytes that arrived before the handshake completed are handed, in
        order, to the protocol chosen for the peer (here the enrollment
        responder, which answers a garbage request with bad-request).
        """
        connection, transport = self._bare(1000)
        connection.dataReceived(b"RTEN\x00\x00\x00\x02")
        connection.dataReceived(b"{]")
        connection.handshakeCompleted()
        reply = transport.value()
        self.assertEqual(reply[:4], b"RTEN")
        self.assertEqual(decode_reply(reply[8:]).code, "bad-request")  # type: ignore[union-attr]


class CertificateTransport(StringTransport):
    """A transport whose TLS peer presented C{certificate} (already verified)."""

    def __init__(self, certificate) -> None:  # type: ignore[no-untyped-def]
        super().__init__(peerAddress=SITE_PEER)
        self.certificate = certificate

    def getPeerCertificate(self):  # type: ignore[no-untyped-def]
        return self.certificate


class LogCapture:
    """Collects the log events emitted while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str = "") -> list[str]:
        texts = [formatEvent(e) for e in self.events]
        return [t for t in texts if containing in t]


class PreauthTests(SynchronousTestCase):
    """
    A connection that is not an authenticated session is aborted once the
    handshake timeout has passed since accept, whatever state it is in,
    and at most max_preauth exist at once.
    """

    def _connection(self, server: Server, transport: StringTransport) -> TunnelConnection:
        connection = server.factory.buildProtocol(SITE_PEER)
        connection.makeConnection(transport)
        return connection

    def test_silent_enrollment_client_is_aborted_at_the_deadline(self) -> None:
        """
        A client without a certificate that sends one byte to the
        enrollment responder, gets its refusal and then never closes (no
        close_notify) loses its socket when the handshake timeout has
        passed since accept: aborted, not waited on.
        """
        server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=30.0))
        transport = StringTransport(peerAddress=SITE_PEER)
        connection = self._connection(server, transport)
        server.clock.advance(5)
        connection.handshakeCompleted()
        connection.dataReceived(b"\x00")
        connection.dataReceived(b"RTEN\x00\x00\x00\x02{]")
        self.assertEqual(transport.value()[:4], b"RTEN")  # the refusal went out
        self.assertTrue(transport.disconnecting)  # a polite close, which a silent peer never completes
        self.assertFalse(transport.disconnected)
        server.clock.advance(24.9)
        self.assertFalse(transport.disconnected)
        server.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(server.factory.preauth, 0)
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_refused_site_that_never_closes_is_aborted(self) -> None:
        """
        A revoked site is refused (HELLO and GOAWAY) and the connection
        closed politely; if the peer never completes that close, the
        socket is aborted at the handshake deadline.
        """
        server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=30.0))
        key, cert = server.fixture.enroll("alpha")
        server.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
        transport = CertificateTransport(cert)
        connection = self._connection(server, transport)
        connection.handshakeCompleted()
        self.assertIn(b"site-revoked", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.assertEqual(server.factory.preauth, 1)
        server.clock.advance(30)
        self.assertTrue(transport.disconnected)

    def test_preauth_count_follows_connections(self) -> None:
        """
        Every accepted connection counts as pre-auth until it becomes an
        authenticated session or is gone.
        """
        server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=10.0))
        key, cert = server.fixture.enroll("alpha")
        silent, _, pump = server.dial(protocol=Recorder, tls=False)
        self.assertEqual(server.factory.preauth, 1)
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        self.assertEqual(server.factory.preauth, 1)  # the site no longer counts
        server.clock.advance(10)
        pump_all(pump)
        self.assertIsNotNone(silent.lost)
        self.assertEqual(server.factory.preauth, 0)

    def test_gate_refuses_at_accept_beyond_the_limit(self) -> None:
        """
        Once max_preauth connections are pre-auth, the admission gate
        closes new ones at accept (no protocol, so no TLS object), with one
        warning per ten seconds that counts the refusals; below the limit
        again, connections are accepted.
        """
        server = Server(self)
        log = LogCapture(self)
        inner = Built(Recorder)
        gate = AdmissionGate(inner, server.factory, limit=2)
        server.factory.preauth = 2
        for _ in range(100):
            self.assertIsNone(gate.buildProtocol(SITE_PEER))
        self.assertEqual(inner.built, [])
        [line] = log.lines("refusing connections on the tunnel port")
        self.assertIn("limit (--max-preauth) is 2", line)
        server.clock.advance(10)
        self.assertIsNone(gate.buildProtocol(SITE_PEER))
        [_, second] = log.lines("refusing connections on the tunnel port")
        self.assertIn("101 refused so far", second)
        server.factory.preauth = 1
        self.assertIsNotNone(gate.buildProtocol(SITE_PEER))

    def test_refused_client_certificate_is_logged_and_rate_limited(self) -> None:
        """
        A client certificate rejected in the handshake (here: issued by
        another CA) gets a warning naming the peer and the reason; repeated
        attempts from the same host are rate-limited, with a count.
        """
        server = Server(self)
        log = LogCapture(self)
        ca_key, ca_cert = certs.create_ca("someone else's CA")
        key = certs.generate_private_key()
        foreign = certs.issue_site_certificate(ca_key, ca_cert, certs.create_csr(key, "alpha"), "alpha")
        for _ in range(20):
            site, _, _ = server.dial(key, foreign)
            self.assertFalse(site.ready)
        lines = log.lines("refused TLS connection from 192.0.2.7:40123")
        self.assertEqual(len(lines), 5, lines)  # the burst, then silence
        self.assertIn("client certificate refused", lines[0])
        self.assertIn("not issued by", lines[0])
        server.clock.advance(5)
        site, _, _ = server.dial(key, foreign)
        [*_, last] = log.lines("refused TLS connection from 192.0.2.7:40123")
        self.assertIn("(15 similar from this host not logged)", last)
        self.assertEqual(server.factory.preauth, 0)


class WaitingRoomTests(SynchronousTestCase):
    """
    The tunnel port's waiting room: every connection is accepted at once,
    at most max_handshakes are handshaking, the others wait unread (no TLS
    object yet) in order of arrival, and the handshake timeout counts from
    accept for all of them.
    """

    def setUp(self) -> None:
        self.server = Server(self, ServerPolicy(keepalive=None, handshake_timeout=30.0))
        self.tls = TLSMemoryBIOFactory(
            self.server.fixture.server_options(), False, self.server.factory, clock=self.server.clock
        )
        self.gate = AdmissionGate(self.tls, self.server.factory, limit=100, handshakes=2)

    def arrive(self) -> tuple[GatedConnection, StringTransport]:
        connection = self.gate.buildProtocol(SITE_PEER)
        assert isinstance(connection, GatedConnection)
        transport = StringTransport(peerAddress=SITE_PEER)
        connection.makeConnection(transport)
        return connection, transport

    def test_beyond_the_slots_connections_wait_unread_in_order(self) -> None:
        """
        Two handshake slots: the first two connections get a TLS protocol
        at once; the next wait with reading paused and nothing built. A
        slot comes free when its holder's first bytes (the ClientHello)
        were handled or it is gone, and goes to the one that waited
        longest.
        """
        arrived = [self.arrive() for _ in range(4)]
        (a, ta), (b, tb), (c, tc), (d, td) = arrived
        self.assertIsNotNone(a.inner)
        self.assertIsNotNone(b.inner)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        self.assertEqual((c.inner, d.inner), (None, None))
        self.assertEqual((tc.producerState, td.producerState), ("paused", "paused"))
        self.assertEqual((self.gate.in_handshake, self.gate.waiting, self.server.factory.preauth), (2, 2, 2))
        self.assertEqual(self.gate.preauth, 4)
        a.dataReceived(b"\x16\x03\x01\x00")  # the start of a ClientHello
        self.assertIsNotNone(c.inner)
        self.assertEqual(tc.producerState, "producing")
        self.assertIsNone(d.inner)
        b.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(d.inner)
        self.assertEqual(td.producerState, "producing")
        self.assertEqual((self.gate.in_handshake, self.gate.waiting), (2, 0))
        a.dataReceived(b"\x01")  # later bytes of an admitted connection change nothing
        self.assertEqual(self.gate.in_handshake, 2)

    def test_waiting_connection_gone_gives_up_its_place(self) -> None:
        """A connection that goes while it waits is skipped; the next in line is admitted."""
        (a, _), _, (c, _), (d, _) = [self.arrive() for _ in range(4)]
        c.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.waiting, 1)
        a.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(c.inner)
        self.assertIsNotNone(d.inner)
        self.assertEqual(self.gate.waiting, 0)

    def test_deadline_counts_from_accept(self) -> None:
        """
        A connection admitted after waiting 10 s has the 20 s that are left
        of the handshake timeout, not 30; one that waited the whole timeout
        is aborted without ever being read (one line says how many).
        """
        log = LogCapture(self)
        self.gate = AdmissionGate(self.tls, self.server.factory, limit=100, handshakes=1, grace=10.0)
        self.arrive()
        late, late_transport = self.arrive()
        self.server.clock.advance(10)  # the first one's slot is given back: the second is admitted
        self.assertIsNotNone(late.inner)
        self.server.clock.advance(19.9)
        self.assertFalse(late_transport.disconnected)
        self.server.clock.advance(0.1)
        self.assertTrue(late_transport.disconnected)  # aborted 30 s after its accept

        self.gate = AdmissionGate(self.tls, self.server.factory, limit=100, handshakes=1, grace=100.0)
        self.arrive()
        never, never_transport = self.arrive()
        self.server.clock.advance(29.9)
        self.assertFalse(never_transport.disconnected)
        self.server.clock.advance(0.1)
        self.assertTrue(never_transport.disconnected)
        self.assertIsNone(never.inner)  # never read, no TLS object
        never.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.gate.waiting, 0)
        [line] = log.lines("for their turn to handshake")
        self.assertIn("dropping 1 connections on the tunnel port that waited 30.0s", line)

    def test_silent_client_gives_its_slot_back_after_the_grace(self) -> None:
        """
        An admitted client that sends nothing holds its slot for a quarter
        of a second only (it costs no CPU); it stays pre-auth and is aborted
        at its deadline like any other.
        """
        self.assertEqual(self.gate.grace, 0.25)
        (silent, silent_transport), _, (c, _) = [self.arrive() for _ in range(3)]
        self.server.clock.advance(0.24)
        self.assertIsNone(c.inner)
        self.server.clock.advance(0.01)  # both silent ones give their slots back
        self.assertIsNotNone(c.inner)
        self.assertEqual(self.gate.in_handshake, 1)
        self.assertEqual(self.server.factory.preauth, 3)
        self.server.clock.advance(29.75)
        self.assertTrue(silent_transport.disconnected)

    def test_steps_aside_for_transports_that_deliver_to_their_protocol(self) -> None:
        """
        Once a connection's slot is given back, a transport that delivers to
        its C{protocol} attribute (as Twisted's TCP connections do) is
        pointed at the TLS protocol, so the gate's object is no longer in
        the way; other transports keep reading through it.
        """

        class Delivering(StringTransport):
            protocol = None

        connection = self.gate.buildProtocol(SITE_PEER)
        assert isinstance(connection, GatedConnection)
        transport = Delivering(peerAddress=SITE_PEER)
        transport.protocol = connection
        connection.makeConnection(transport)
        self.assertIs(transport.protocol, connection)
        connection.dataReceived(b"\x16\x03\x01\x00")
        self.assertIs(transport.protocol, connection.inner)
        other, other_transport = self.arrive()
        other.dataReceived(b"\x16\x03\x01\x00")
        self.assertFalse(hasattr(other_transport, "protocol"))
        self.assertEqual(self.gate.in_handshake, 0)

    def test_limit_counts_waiting_connections(self) -> None:
        """max_preauth counts those waiting: beyond it, connections are closed at accept."""
        self.gate = AdmissionGate(self.tls, self.server.factory, limit=3, handshakes=1)
        for _ in range(3):
            self.arrive()
        self.assertEqual((self.gate.in_handshake, self.gate.waiting), (1, 2))
        self.assertIsNone(self.gate.buildProtocol(SITE_PEER))
        self.assertEqual(self.gate.refused, 1)

    def test_bytes_read_while_waiting_are_handed_over_on_admission(self) -> None:
        """
        A transport that reads although paused (iosim does) loses nothing:
        the bytes go, in order, to the protocol built on admission.
        """
        recorders = Built(Recorder)
        gate = AdmissionGate(recorders, self.server.factory, limit=10, handshakes=1)
        first = gate.buildProtocol(SITE_PEER)
        second = gate.buildProtocol(SITE_PEER)
        assert isinstance(first, GatedConnection) and isinstance(second, GatedConnection)
        first.makeConnection(StringTransport())
        second.makeConnection(StringTransport())
        second.dataReceived(b"one ")
        second.dataReceived(b"two")
        self.assertEqual(len(recorders.built), 1)
        first.dataReceived(b"hello")
        [_, admitted] = recorders.built
        self.assertEqual(bytes(admitted.data), b"one two")  # type: ignore[attr-defined]


class RevocationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(self)
        self.key, self.cert = self.server.fixture.enroll("alpha")
        self.watch = RevocationWatch(self.server.fixture.state, self.server.registry, self.server.factory.admission)
        self.site, _, self.pump = self.server.dial(self.key, self.cert)
        self.other = StateStore(self.server.fixture.state.store.path, create=False)
        self.addCleanup(self.other.close)

    def test_revocation_by_another_process_cuts_live_session(self) -> None:
        """
        When another connection to the database (the admin CLI) revokes a
        connected site, the next check ends its session with
        NOT_AUTHORIZED site-revoked.
        """
        self.watch.check()
        self.assertIsNotNone(self.server.registry.session_for("alpha"))
        self.other.revoke_site("alpha", datetime.now(UTC))
        self.watch.check()
        pump_all(self.pump)
        self.assertEqual(self.site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("site-revoked", self.site.peer_goaway[1])  # type: ignore[index]
        self.successResultOf(self.site.when_closed())
        self.assertEqual(self.server.disconnected, ["alpha"])

    def test_unrelated_change_keeps_session(self) -> None:
        """A database change that does not concern the site leaves its session alone."""
        self.other.create_token("beta", timedelta(hours=1), datetime.now(UTC))
        self.watch.check()
        pump_all(self.pump)
        self.assertIsNone(self.site.peer_goaway)
        self.assertIsNotNone(self.server.registry.session_for("alpha"))

    def test_reenrollment_elsewhere_cuts_superseded_session(self) -> None:
        """
        A new enrollment of the site, done by another process, ends the
        session that uses the old certificate (certificate-superseded).
        """
        other_state = ServerState.open_existing(self.server.fixture.directory)
        self.addCleanup(other_state.close)
        token = other_state.store.create_token("alpha", timedelta(hours=1), datetime.now(UTC))
        key = certs.generate_private_key()
        other_state.enroll("alpha", token, certs.dump_csr(certs.create_csr(key, "alpha")), datetime.now(UTC))
        self.watch.check()
        pump_all(self.pump)
        self.assertEqual(self.site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("certificate-superseded", self.site.peer_goaway[1])  # type: ignore[index]


class OwnEnrollmentTests(SynchronousTestCase):
    def test_reenrollment_through_this_server_cuts_superseded_session(self) -> None:
        """
        A re-enrollment redeemed by this very server process (through its
        own database connection, whose commits SQLite's data_version does
        not count) ends the session of the superseded certificate within
        one poll, as a revocation would.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        watch = RevocationWatch(server.fixture.state, server.registry, server.factory.admission)
        site, _, pump = server.dial(key, cert)
        watch.check()
        server.fixture.enroll("alpha")  # the same ServerState: the server's own connection
        watch.check()
        pump_all(pump)
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("certificate-superseded", site.peer_goaway[1])  # type: ignore[index]
        self.assertIsNone(server.registry.session_for("alpha"))


class OwnChangesTests(SynchronousTestCase):
    def test_own_enrollments_recheck_only_their_sites(self) -> None:
        """
        While the only database changes are the server's own enrollments,
        a poll re-checks just the enrolled sites (here none is live), not
        every live session; a change by another process re-checks them all.
        """
        server = Server(self)
        live = {}
        for name in ("alpha", "gamma"):
            key, cert = server.fixture.enroll(name)
            live[name] = server.dial(key, cert)
        watch = RevocationWatch(server.fixture.state, server.registry, server.factory.admission)
        store = server.fixture.state.store
        admission = server.factory.admission
        checked: list[str] = []
        check = admission.check

        def recording(site: str, fingerprint: str) -> None:
            checked.append(site)
            check(site, fingerprint)

        admission.check = recording  # type: ignore[method-assign]
        for name in ("beta", "delta"):
            server.fixture.enroll(name)
        watch.check()
        self.assertEqual(checked, [])
        server.fixture.enroll("gamma")  # supersedes a live session: only it is checked, and cut
        watch.check()
        self.assertEqual(checked, ["gamma"])
        site, _, pump = live["gamma"]
        pump_all(pump)
        self.assertIn("certificate-superseded", site.peer_goaway[1])  # type: ignore[index]
        other = StateStore(store.path, create=False)
        self.addCleanup(other.close)
        other.revoke_site("delta", datetime.now(UTC))
        checked.clear()
        watch.check()
        self.assertEqual(checked, ["alpha"])  # every live session
        self.assertIsNotNone(server.registry.session_for("alpha"))


class LateHello(MuxProtocol):
    """A site that completes TLS but sends its HELLO only when told."""

    held = b""
    started = False

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self.started:
            MuxProtocol.dataReceived(self, data)
        else:
            self.held += data

    def hello(self) -> None:
        self.started = True
        MuxProtocol.connectionMade(self)
        MuxProtocol.dataReceived(self, self.held)


class RevocationRaceTests(SynchronousTestCase):
    def test_revocation_before_hello_is_not_missed(self) -> None:
        """
        A site revoked after its TLS handshake but before its HELLO arrived
        (the revocation watch had nothing registered to cut yet) is refused
        with NOT_AUTHORIZED instead of being registered.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        watch = RevocationWatch(server.fixture.state, server.registry, server.factory.admission)
        site, _, pump = server.dial(key, cert, protocol=lambda: LateHello(initiator=True, clock=server.clock))
        other = StateStore(server.fixture.state.store.path, create=False)
        self.addCleanup(other.close)
        other.revoke_site("alpha", datetime.now(UTC))
        watch.check()
        site.hello()  # type: ignore[attr-defined]
        pump_all(pump)
        self.assertIsNone(server.registry.session_for("alpha"))
        self.assertEqual(server.connected, [])
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("site-revoked", site.peer_goaway[1])  # type: ignore[index]


class ServiceTests(SynchronousTestCase):
    """TunnelServerService started on a MemoryReactorClock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.fixture = ServerFixture(self)
        self.config = ServerConfig(
            state_dir=self.fixture.directory,
            listen="tcp:5500:interface=127.0.0.1",
            forwards=(ForwardSpec.parse("8080:alpha:10.0.0.5:554"), ForwardSpec.parse("[::1]:8081:beta:h:1")),
            policy=ServerPolicy(keepalive=None),
            name="svc-test",
        )
        self.service = build_server_service(self.config, self.reactor)
        self.addCleanup(self.service.state.close)

    def start(self) -> None:
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def dial_site(self):  # type: ignore[no-untyped-def]
        """
        Connect an enrolled site through the listening TLS factory the
        service made. The fixture enrolls it through its own connection to
        the database, as another process would: the service admits it once
        its poll has seen that.
        """
        key, cert = self.fixture.enroll("alpha")
        self.reactor.advance(self.config.revocation_poll)
        tls_factory = self.reactor.tcpServers[0][1]
        clients = Built(lambda: MuxProtocol(initiator=True, clock=self.reactor))
        client_tls = TLSMemoryBIOFactory(self.fixture.site_options(key, cert), True, clients, clock=self.reactor)
        _, _, pump = connectedServerAndClient(
            lambda: tls_factory.buildProtocol(SITE_PEER),
            lambda: client_tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500)),
            greet=False,
            clock=self.reactor,
        )
        pump_all(pump)
        return clients.built[0], pump

    def test_start_listens_and_publishes(self) -> None:
        """
        Starting listens for sites (with TLS added, behind the pre-auth
        admission gate) with a backlog of 4096 and on every forward with one
        of 1024, then on the admin endpoint (loopback port 5501 by default),
        and publishes the registry by name.
        """
        self.start()
        ports = [(port, backlog, interface) for port, _, backlog, interface in self.reactor.tcpServers]
        self.assertEqual(ports[0][:2], (5500, 4096))
        self.assertEqual(ports[1:], [(8080, 1024, "127.0.0.1"), (8081, 1024, "::1"), (5501, 50, "127.0.0.1")])
        gate = self.reactor.tcpServers[0][1]
        self.assertIsInstance(gate, AdmissionGate)
        self.assertIsInstance(gate.wrapped, TLSMemoryBIOFactory)
        self.assertIs(published_registry("svc-test"), self.service.registry)
        self.assertEqual(len(self.service.forward_ports), 2)

    def test_forward_on_a_public_address_is_warned_about(self) -> None:
        """
        A forward bound to a non-loopback address gets a warning at start
        saying that anyone who reaches it reaches the site's target without
        authentication; loopback forwards get none.
        """
        log = LogCapture(self)
        config = ServerConfig(
            state_dir=self.fixture.directory,
            listen="tcp:5501:interface=127.0.0.1",
            forwards=(ForwardSpec.parse("0.0.0.0:8090:alpha:10.0.0.5:554"), ForwardSpec.parse("8091:alpha:h:1")),
            policy=ServerPolicy(keepalive=None),
            name="svc-public",
        )
        service = build_server_service(config, self.reactor)
        self.addCleanup(service.state.close)
        service.startService()
        self.addCleanup(service.stopService)
        [line] = log.lines("not loopback")
        self.assertIn("forward 0.0.0.0:8090 -> alpha:10.0.0.5:554 is bound to 0.0.0.0", line)
        self.assertIn("without authentication", line)

    def test_site_connects_through_the_service(self) -> None:
        """
        A site dialing the service's TLS listener is registered and recorded
        as connected in the state database.
        """
        self.start()
        site, _ = self.dial_site()
        self.assertTrue(site.ready)
        self.assertIsNotNone(self.service.registry.session_for("alpha"))
        record = self.fixture.state.store.site("alpha")
        assert record is not None
        self.assertEqual(record.peer, "192.0.2.7:40123")
        self.assertTrue(record.connected)

    def test_descriptor_estimate_counts_held_connections(self) -> None:
        """
        The descriptor watch estimates from the connections the service
        holds (sites, would-be sites and forward clients), so it need not
        list /proc while they are few.
        """
        self.start()
        self.assertIsNotNone(self.service.descriptors.estimate)
        self.assertEqual(self.service._connections(), 0)
        site, pump = self.dial_site()
        client = self.service.forward_factories[0].buildProtocol(SITE_PEER)
        self.assertEqual(self.service._connections(), 2)
        client.makeConnection(StringTransport())
        client.connectionLost(Failure(ConnectionDone()))
        site.abort()
        pump_all(pump)
        self.assertEqual(self.service._connections(), 0)

    def test_revocation_poll_cuts_site(self) -> None:
        """
        The service polls for revocations every revocation_poll seconds: a
        revocation by another process ends the site's session at the next
        poll.
        """
        self.start()
        site, pump = self.dial_site()
        other = StateStore(self.fixture.state.store.path, create=False)
        self.addCleanup(other.close)
        other.revoke_site("alpha", datetime.now(UTC))
        self.reactor.advance(0.5)
        pump_all(pump)
        self.assertIsNone(site.peer_goaway)
        self.reactor.advance(0.5)
        pump_all(pump)
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIsNone(self.service.registry.session_for("alpha"))

    def test_stop_logs_and_records_once_for_all_sessions(self) -> None:
        """
        While stopping, sessions end without a "disconnected" line and a
        database write each: one line gives the count, and the server's
        replica's stop record removes its sessions, so every site is marked
        disconnected. Before the stop, a session's end is logged and
        recorded as always.
        """
        log = LogCapture(self)
        writes: list[str] = []
        store = self.service.state.store
        mark = store.session_closed

        def recording(site: str, *args: object) -> None:
            writes.append(site)
            mark(site, *args)  # type: ignore[arg-type]

        store.session_closed = recording  # type: ignore[method-assign]
        self.start()
        site, pump = self.dial_site()
        site.abort()
        pump_all(pump)
        self.assertEqual(writes, ["alpha"])
        self.assertEqual(len(log.lines("site alpha from 192.0.2.7:40123 disconnected")), 1)
        site, pump = self.dial_site()
        stopped = self.service.stopService()
        pump_all(pump)
        self.successResultOf(stopped)
        self.assertEqual(site.peer_goaway[0], ErrorCode.GOING_AWAY)  # type: ignore[index]
        self.assertEqual(writes, ["alpha"])
        self.assertEqual(len(log.lines("site alpha from 192.0.2.7:40123 disconnected")), 1)
        [line] = log.lines("drained 1 site sessions in")
        record = store.site("alpha")
        assert record is not None
        self.assertFalse(record.connected)

    def test_stop_drains_sessions_and_withdraws(self) -> None:
        """
        Stopping withdraws the registry, drains every session (the site
        sees GOAWAY GOING_AWAY) and completes once they are closed.
        """
        self.start()
        site, pump = self.dial_site()
        stopped = self.service.stopService()
        self.assertRaises(SiteUnavailable, published_registry, "svc-test")
        pump_all(pump)
        self.assertEqual(site.peer_goaway[0], ErrorCode.GOING_AWAY)  # type: ignore[index]
        self.successResultOf(stopped)
        self.assertFalse(self.service.running)
        record = self.fixture.state.store.site("alpha")
        assert record is not None
        self.assertFalse(record.connected)
