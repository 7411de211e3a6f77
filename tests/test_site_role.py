"""
The site role: which failures are fatal (authentication) and which are
retried (network), SiteMuxFactory against a real server over TLS in memory,
and TunnelClientService's reconnect schedule on a MemoryReactorClock with a
real enrolled site state.
"""

from __future__ import annotations

from datetime import UTC, datetime

from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import defer, error
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter.protocol import MuxProtocol
from rtunnel.identity import certs
from rtunnel.identity.errors import EnrollmentIncomplete, EnrollmentRefused, PeerVerificationFailed
from rtunnel.identity.state import SiteState
from rtunnel.identity.tlsconfig import site_tls_options
from rtunnel.mux import ErrorCode
from rtunnel.roles.registry import SiteRegistry
from rtunnel.roles.server import ServerPolicy, TunnelServerFactory
from rtunnel.roles.site import (
    AuthenticationFailed,
    Outcome,
    RotatingEndpoint,
    SiteMuxFactory,
    SitePolicy,
    TunnelClientService,
    Verdict,
    authentication_problem,
    judge,
)
from rtunnel.roles.target import Target, TargetConnector
from tests.roles_helpers import EndpointMap, Holder, ServerFixture, mux_pair, pump_all, temp_dir, tls_connect


def _failure(exception: BaseException) -> Failure:
    try:
        raise exception
    except BaseException:
        return Failure()


class JudgeTests(SynchronousTestCase):
    def test_refusals_from_the_authenticated_server_are_final(self) -> None:
        """
        An enrollment refusal, our own AuthenticationFailed, and a TLS alert
        rejecting our certificate that arrived after the handshake completed
        (encrypted, so from the server) mean giving up, each with a
        readable reason.
        """
        cases = [
            (EnrollmentRefused("token-spent", "already used"), False, "enrollment refused: token-spent: already used"),
            (AuthenticationFailed("revoked"), False, "revoked"),
            (SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]), True, "rejected this site's certificate"),
            (
                SSL.Error([("SSL routines", "", "sslv3 alert bad certificate")]),
                True,
                "rejected this site's certificate",
            ),
            (SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]), True, "rejected this site's"),
        ]
        for exception, established, reason in cases:
            outcome = judge(_failure(exception), established)
            self.assertIs(outcome.verdict, Verdict.REFUSED, repr(exception))
            self.assertIn(reason, outcome.reason, repr(exception))
            self.assertIsNotNone(authentication_problem(_failure(exception), established))

    def test_a_server_that_fails_verification_is_retried(self) -> None:
        """
        A server that cannot prove the pinned identity (OpenSSL or
        service_identity) may be an impostor on the path: retried, slowly.
        """
        cases = {
            PeerVerificationFailed("server certificate refused", 20, 1): "could not prove the identity pinned",
            VerificationError(errors=["DNS mismatch"]): "does not match the pinned name",
            SSL.Error([("SSL routines", "", "certificate verify failed")]): "certificate verify failed",
        }
        for exception, reason in cases.items():
            outcome = judge(_failure(exception))
            self.assertIs(outcome.verdict, Verdict.VERIFICATION, repr(exception))
            self.assertIn(reason, outcome.reason)
            self.assertIsNone(authentication_problem(_failure(exception)))

    def test_alerts_before_the_server_is_authenticated_are_retried(self) -> None:
        """
        Seven plaintext bytes (a bad_certificate alert in answer to the
        ClientHello) can come from anyone on the path: a TLS failure to
        retry, never a reason to stop. Other TLS errors likewise.
        """
        for exception in (
            SSL.Error([("SSL routines", "", "sslv3 alert bad certificate")]),
            SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]),
            SSL.Error([("SSL routines", "", "wrong version number")]),
        ):
            outcome = judge(_failure(exception), tls_established=False)
            self.assertIs(outcome.verdict, Verdict.TLS, repr(exception))
        self.assertIn(
            "anyone on the path", judge(_failure(SSL.Error([("", "", "sslv3 alert bad certificate")]))).reason
        )

    def test_network_faults_are_retried(self) -> None:
        """
        Network faults are not authentication problems: they are retried
        with backoff.
        """
        for exception in (
            error.ConnectionRefusedError(),
            error.ConnectionLost(),
            error.ConnectionDone(),
            error.TimeoutError(),
            error.DNSLookupError("no such host"),
            EnrollmentIncomplete("closed before the answer"),
            SSL.Error([("SSL routines", "", "unexpected eof while reading")]),
            defer.CancelledError(),
        ):
            self.assertIs(judge(_failure(exception)).verdict, Verdict.NETWORK, repr(exception))
            self.assertIsNone(authentication_problem(_failure(exception)), repr(exception))


class AlertOnHello(Protocol):
    """An on-path attacker: answers the first bytes (the ClientHello) with a plaintext fatal alert."""

    answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(b"\x15\x03\x03\x00\x02\x02\x2a")  # type: ignore[union-attr]  # alert, fatal, bad_certificate
            self.transport.loseConnection()  # type: ignore[union-attr]


class LogCapture:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str) -> list[str]:
        return [t for t in map(formatEvent, self.events) if containing in t]

    def levels(self, containing: str) -> list[str]:
        return [e["log_level"].name for e in self.events if containing in formatEvent(e)]


class SiteOverTLS:
    """A real server state and registry; SiteMuxFactory dialing it in memory."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.clock = Clock()
        self.fixture = ServerFixture(case)
        self.registry = SiteRegistry(self.clock)
        self.server = TunnelServerFactory(self.fixture.state, self.registry, self.clock, ServerPolicy(keepalive=None))
        self.fatal: list[str] = []
        self.holder = Holder()
        self.factory = SiteMuxFactory("alpha", self.clock, self.holder, SitePolicy(keepalive=None), self.fatal.append)  # type: ignore[arg-type]

    def dial(self, options: object):  # type: ignore[no-untyped-def]
        _, _, pump = tls_connect(self.server, self.fixture.server_options(), self.factory, options, self.clock)
        return pump


class SiteMuxFactoryTests(SynchronousTestCase):
    def test_connected_site_serves_streams(self) -> None:
        """
        An enrolled site's tunnel becomes its current session and hands
        the cloud's streams to its stream handler.
        """
        world = SiteOverTLS(self)
        key, cert = world.fixture.enroll("alpha")
        pump = world.dial(world.fixture.site_options(key, cert))
        self.assertIsNotNone(world.factory.current)
        self.assertTrue(world.factory.current.ready)  # type: ignore[union-attr]
        world.registry.session_for("alpha").open_stream("10.0.0.5", 554)  # type: ignore[union-attr]
        pump_all(pump)
        self.assertEqual([(s.host, s.port) for s in world.holder.streams], [("10.0.0.5", 554)])
        self.assertEqual(world.fatal, [])

    def test_not_authorized_goaway_is_fatal(self) -> None:
        """
        A server that ends the session with GOAWAY NOT_AUTHORIZED (here: the
        site is revoked) makes the site give up, with the server's reason.
        """
        world = SiteOverTLS(self)
        key, cert = world.fixture.enroll("alpha")
        world.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
        world.dial(world.fixture.site_options(key, cert))
        self.assertEqual(len(world.fatal), 1)
        self.assertIn("tunnel server refused site alpha: site-revoked", world.fatal[0])
        self.assertIsNone(world.factory.current)

    def test_revocation_of_live_session_is_fatal(self) -> None:
        """A live session cut by revocation is fatal too, not a reason to reconnect."""
        world = SiteOverTLS(self)
        key, cert = world.fixture.enroll("alpha")
        pump = world.dial(world.fixture.site_options(key, cert))
        world.registry.cut("alpha", ErrorCode.NOT_AUTHORIZED, "site-revoked: by the operator")
        pump_all(pump)
        self.assertEqual(world.fatal, ["tunnel server refused site alpha: site-revoked: by the operator"])

    def test_wrong_server_is_retried_with_an_error(self) -> None:
        """
        A server whose certificate does not chain to the pinned CA is not
        fatal (it may be an impostor on the path): an error names the cause
        and the attempt counts as a verification failure, which the retry
        policy backs off from slowly.
        """
        world = SiteOverTLS(self)
        log = LogCapture(self)
        other = ServerFixture(self)
        key, cert = world.fixture.enroll("alpha")
        world.dial(site_tls_options(other.ca_pem, "localhost", client_key=key, client_cert=cert))
        self.assertEqual(world.fatal, [])
        self.assertIs(world.factory.last_outcome.verdict, Verdict.VERIFICATION)  # type: ignore[union-attr]
        [line] = log.lines("failed verification")
        self.assertIn("CA other than the pinned rtunnel CA", line)
        self.assertEqual(log.levels("failed verification"), ["error"])

    def test_wrong_server_name_is_retried_with_an_error(self) -> None:
        """A server certificate not valid for the pinned name is retried the same way."""
        world = SiteOverTLS(self)
        log = LogCapture(self)
        key, cert = world.fixture.enroll("alpha")
        world.dial(world.fixture.site_options(key, cert, server_name="tunnel.example"))
        self.assertEqual(world.fatal, [])
        [line] = log.lines("failed verification")
        self.assertIn("not valid for 'tunnel.example'", line)

    def test_certificate_rejected_by_the_verified_server_is_fatal(self) -> None:
        """
        When the server, already verified, rejects our certificate (here:
        issued by another CA), its alert arrives after the handshake
        completed, encrypted: that is a refusal, and final.
        """
        world = SiteOverTLS(self)
        ca_key, ca_cert = certs.create_ca("someone else's CA")
        key = certs.generate_private_key()
        foreign = certs.issue_site_certificate(ca_key, ca_cert, certs.create_csr(key, "alpha"), "alpha")
        world.dial(world.fixture.site_options(key, foreign))
        self.assertEqual(len(world.fatal), 1)
        self.assertIn("rejected this site's certificate", world.fatal[0])

    def test_plaintext_alert_in_answer_to_the_hello_is_retried(self) -> None:
        """
        An on-path attacker answering the ClientHello with a plaintext
        bad_certificate alert (seven bytes) cannot stop the site: the
        attempt is logged as a TLS error and retried.
        """
        world = SiteOverTLS(self)
        log = LogCapture(self)
        key, cert = world.fixture.enroll("alpha")
        client_tls = TLSMemoryBIOFactory(world.fixture.site_options(key, cert), True, world.factory, clock=world.clock)
        _, attacker, pump = connectedServerAndClient(
            lambda: AlertOnHello(), lambda: client_tls.buildProtocol(None), greet=False, clock=world.clock
        )
        pump_all(pump)
        self.assertTrue(attacker.answered)  # type: ignore[attr-defined]
        self.assertEqual(world.fatal, [])
        self.assertIs(world.factory.last_outcome.verdict, Verdict.TLS)  # type: ignore[union-attr]
        [line] = log.lines("TLS with tunnel server")
        self.assertIn("alert bad certificate", line)
        self.assertIn("retrying", line)

    def test_drain_and_loss_are_not_fatal(self) -> None:
        """
        A server draining (GOAWAY GOING_AWAY) or a takeover are reasons to
        reconnect, not to give up.
        """
        world = SiteOverTLS(self)
        key, cert = world.fixture.enroll("alpha")
        pump = world.dial(world.fixture.site_options(key, cert))
        world.registry.session_for("alpha").drain(5.0, "server restarting")  # type: ignore[union-attr]
        pump_all(pump)
        self.assertIsNone(world.factory.current)
        pump = world.dial(world.fixture.site_options(key, cert))
        world.dial(world.fixture.site_options(key, cert))  # takes over the previous one
        pump_all(pump)
        self.assertEqual(world.fatal, [])


@implementer(IStreamClientEndpoint)
class Named:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
        self.log.append(self.name)
        return defer.Deferred()


class RotatingEndpointTests(SynchronousTestCase):
    def test_rotates(self) -> None:
        """Each connection attempt goes to the next endpoint in turn, round and round."""
        log: list[str] = []
        endpoint = RotatingEndpoint([Named("a", log), Named("b", log), Named("c", log)])
        for _ in range(7):
            endpoint.connect(Factory())
        self.assertEqual(log, ["a", "b", "c", "a", "b", "c", "a"])

    def test_needs_an_endpoint(self) -> None:
        """An empty address list is refused at once."""
        self.assertRaises(ValueError, RotatingEndpoint, [])


class ServiceTests(SynchronousTestCase):
    """TunnelClientService over a real enrolled site state and MemoryReactorClock."""

    ATTEMPT = 0.3  # HostnameEndpoint's attempt delay: a failure is reported after it

    def build(self, addresses=("127.0.0.1:5500",), jitter=lambda: 0.5, retry_cap: float = 30.0):  # type: ignore[no-untyped-def]
        self.reactor = MemoryReactorClock()
        fixture = ServerFixture(self)
        state = fixture.enrolled_site_state(self, "alpha", addresses)
        self.fatal: list[str] = []
        connector = TargetConnector([Target("10.0.0.5", 554)], EndpointMap(), self.reactor)
        policy = SitePolicy(keepalive=None, retry_cap=retry_cap)
        self.service = TunnelClientService(
            self.reactor, state, None, connector, policy, self.fatal.append, jitter=jitter
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def attempts(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def refuse(self) -> None:
        """The current connection attempt is refused (after the endpoint's attempt delay)."""
        self.reactor.advance(self.ATTEMPT)
        _, _, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual(timeout, 10.0)
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(error.ConnectionRefusedError()))

    def next_attempt_after(self, delay: float) -> None:
        """No attempt before C{delay} seconds, one right at it."""
        count = len(self.reactor.tcpClients)
        self.reactor.advance(delay - 0.001)
        self.assertEqual(len(self.reactor.tcpClients), count, f"attempt before {delay}s")
        self.reactor.advance(0.002)
        self.assertEqual(len(self.reactor.tcpClients), count + 1, f"no attempt at {delay}s")

    def test_hello_with_goaway_is_a_failed_attempt(self) -> None:
        """
        A server that refuses the session (HELLO and a fatal GOAWAY in one
        write, as TunnelConnection does when its database fails) does not
        count as a made connection: prepare_connection fails, so
        ClientService backs off instead of reconnecting at once; a plain
        HELLO does count.
        """
        from twisted.test.iosim import connectedServerAndClient

        self.build()
        refusing = MuxProtocol(initiator=False, clock=self.reactor)
        refusing.refuse_session(ErrorCode.INTERNAL_ERROR, "could not check this site")
        refused_site = MuxProtocol(initiator=True, clock=self.reactor)
        d = self.service.prepare_connection(refused_site)
        _, _, pump = connectedServerAndClient(lambda: refusing, lambda: refused_site, clock=self.reactor, greet=False)
        pump_all(pump)
        self.reactor.advance(0)
        failure = self.failureResultOf(d, ConnectionError)
        self.assertIn("INTERNAL_ERROR", str(failure.value))
        _, good_site, _ = mux_pair(self.reactor)
        accepted = self.service.prepare_connection(good_site)
        self.reactor.advance(0)
        self.successResultOf(accepted)

    def test_first_retry_within_one_to_two_seconds(self) -> None:
        """
        With the real random jitter, the first reconnect after a refused
        connection comes between 1 and 2 seconds later.
        """
        import random

        self.build(jitter=random.random)
        self.assertEqual(self.attempts(), [("127.0.0.1", 5500)])
        self.refuse()
        self.reactor.advance(0.999)
        self.assertEqual(len(self.attempts()), 1)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.attempts()), 2)
        self.assertEqual(self.fatal, [])

    def test_backoff_doubles_up_to_the_cap(self) -> None:
        """
        Retry k waits between D and 2D, D doubling from 1 s up to half of
        retry_cap: with the largest jitter 2, 4, 8, 16 s, then the cap (20 s)
        for good; with none, half of that.
        """
        for jitter, delays in ((1.0, (2, 4, 8, 16, 20, 20, 20)), (0.0, (1, 2, 4, 8, 10, 10, 10))):
            self.build(jitter=lambda j=jitter: j, retry_cap=20.0)
            for expected in delays:
                self.refuse()
                self.next_attempt_after(expected)
            self.assertEqual(self.fatal, [])
            self.service.stopService()

    def test_retries_of_many_sites_spread_over_each_doubling(self) -> None:
        """
        Sites refused together do not come back together: the third retry
        falls anywhere between 4 and 8 s, not within one second of 4 s.
        """
        delays = []
        for jitter in (0.0, 0.5, 0.999):
            self.build(jitter=lambda j=jitter: j)
            delays.append(self.service._retry_delay(2))
        self.assertEqual(delays, [4.0, 6.0, 7.996])

    def test_backoff_after_a_verification_failure_reaches_the_longer_cap(self) -> None:
        """
        After the server failed verification, delays keep doubling past
        retry_cap, up to half of verify_retry_cap (5 minutes by default)
        before the jitter.
        """
        self.build(jitter=lambda: 0.0, retry_cap=20.0)
        assert self.service.factory is not None
        self.service.factory.last_outcome = Outcome(Verdict.VERIFICATION, "impostor")
        for expected in (1, 2, 4, 8, 16, 32, 64, 128, 150, 150):
            self.refuse()
            self.next_attempt_after(expected)
        self.assertEqual(self.fatal, [])

    def test_site_down_for_days_keeps_retrying(self) -> None:
        """
        However many attempts failed in a row (here 1,100: about nine hours
        at the cap), the next one is still scheduled at the capped delay.
        """
        self.build(jitter=lambda: 0.0, retry_cap=30.0)
        for _ in range(1100):
            self.refuse()
            self.reactor.advance(30.0)
        self.assertEqual(len(self.attempts()), 1101)
        self.refuse()
        self.next_attempt_after(15.0)

    def test_addresses_rotate(self) -> None:
        """Successive attempts go to the keyfile's addresses in turn."""
        self.build(addresses=("127.0.0.1:5500", "127.0.0.1:5501"))
        for _ in range(3):
            self.refuse()
            self.reactor.advance(31)
        self.assertEqual([port for _, port in self.attempts()], [5500, 5501, 5500, 5501])

    def test_stop_cancels_retries(self) -> None:
        """A stopped service makes no further attempts."""
        self.build()
        self.refuse()
        self.successResultOf(defer.maybeDeferred(self.service.stopService))
        self.reactor.advance(100)
        self.assertEqual(len(self.attempts()), 1)

    def test_ip_literal_server_is_dialled_without_resolving(self) -> None:
        """
        A server address that is an IP literal (v4 or v6) is connected to
        directly; only a name goes through the reactor's resolver.
        """
        reactor = MemoryReactorClock()
        asked: list[str] = []
        resolver = reactor.nameResolver

        @implementer(IHostnameResolver)
        class Recording:
            def resolveHostName(self, receiver, hostName, *args, **kwargs):  # type: ignore[no-untyped-def]
                asked.append(hostName)
                return resolver.resolveHostName(receiver, hostName, *args, **kwargs)

        reactor.installNameResolver(Recording())
        state = ServerFixture(self).enrolled_site_state(
            self, "alpha", ("127.0.0.1:5500", "[::1]:5501", "localhost:5502")
        )
        connector = TargetConnector([], EndpointMap(), reactor)
        policy = SitePolicy(keepalive=None, retry_cap=1.0)
        service = TunnelClientService(reactor, state, None, connector, policy, lambda _: None, jitter=lambda: 0.0)
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(2):
            _, _, factory, _, _ = reactor.tcpClients[-1]
            factory.clientConnectionFailed(reactor.connectors[-1], Failure(error.ConnectionRefusedError()))
            reactor.advance(1.5)
        self.assertEqual([host for host, *_ in reactor.tcpClients[:2]], ["127.0.0.1", "::1"])
        self.assertEqual(asked, ["localhost"])

    def test_unenrolled_without_keyfile_is_fatal(self) -> None:
        """
        A site state that never enrolled, started without a keyfile, stops
        at once with a message saying what to do, and dials nothing.
        """
        reactor = MemoryReactorClock()
        fatal: list[str] = []
        state = SiteState.load(temp_dir(self))
        service = TunnelClientService(
            reactor, state, None, TargetConnector([], EndpointMap(), reactor), SitePolicy(), fatal.append
        )
        service.startService()
        self.assertEqual(len(fatal), 1)
        self.assertIn("is not enrolled: start once with --keyfile FILE", fatal[0])
        self.assertEqual(reactor.tcpClients, [])


class EnrollmentAttemptTests(SynchronousTestCase):
    """A fresh site with a keyfile: enrollment attempts on a MemoryReactorClock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        fixture = ServerFixture(self)
        keyfile = fixture.keyfile("alpha", addresses=("127.0.0.1:5500", "127.0.0.1:5501"))
        self.fatal: list[str] = []
        connector = TargetConnector([], EndpointMap(), self.reactor)
        self.service = TunnelClientService(
            self.reactor,
            SiteState.load(temp_dir(self)),
            keyfile,
            connector,
            SitePolicy(keepalive=None),
            self.fatal.append,
            jitter=lambda: 0.5,
        )
        self.service.startService()

    def ports(self) -> list[int]:
        return [port for _, port, *_ in self.reactor.tcpClients]

    def refuse(self) -> None:
        self.reactor.advance(ServiceTests.ATTEMPT)
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(error.ConnectionRefusedError()))

    def test_unreachable_server_is_retried_at_next_address(self) -> None:
        """
        A network failure while enrolling is retried with backoff, at the
        keyfile's next address, and is not fatal.
        """
        self.assertEqual(self.ports(), [5500])
        self.refuse()
        self.reactor.advance(1.499)
        self.assertEqual(self.ports(), [5500])
        self.reactor.advance(0.002)
        self.assertEqual(self.ports(), [5500, 5501])
        self.refuse()
        self.reactor.advance(3.001)  # 2 s doubled, spread by the jitter (0.5): 3 s
        self.assertEqual(self.ports(), [5500, 5501, 5500])
        self.assertEqual(self.fatal, [])
        self.assertIsNone(self.service.client)  # no tunnel before enrollment

    def test_stop_cancels_enrollment(self) -> None:
        """Stopping while enrollment waits to retry ends it quietly: no attempt, no fatal error."""
        self.refuse()
        self.successResultOf(defer.maybeDeferred(self.service.stopService))
        self.reactor.advance(60)
        self.assertEqual(self.ports(), [5500])
        self.assertEqual(self.fatal, [])
