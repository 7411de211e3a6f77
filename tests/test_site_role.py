"""
The site role: which failures are fatal (authentication) and which are
retried (network), SiteMuxFactory against a real server over TLS in memory,
the reconnecting service's states on a Clock, and TunnelClientService's
reconnect schedule on a MemoryReactorClock with a real enrolled site state.
"""

from __future__ import annotations

import gc
from datetime import UTC, datetime

from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
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
from rtunnel.roles.reconnect import Phase, ReconnectingService
from rtunnel.roles.registry import SiteRegistry
from rtunnel.roles.server import ServerPolicy, TunnelServerFactory
from rtunnel.roles.site import (
    AuthenticationFailed,
    Outcome,
    RotatingEndpoint,
    SiteMuxFactory,
    SitePolicy,
    SiteTunnelProtocol,
    TunnelClientService,
    Verdict,
    authentication_problem,
    judge,
)
from rtunnel.roles.target import Target, TargetConnector
from tests.roles_helpers import (
    Built,
    ControlledEndpoint,
    EndpointMap,
    Holder,
    ServerFixture,
    TCPTransport,
    Watching,
    pump_all,
    temp_dir,
    tls_connect,
)


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

    def errors(self) -> list[str]:
        """Events at level error or critical (an unhandled error is critical), as text."""
        bad = (LogLevel.error, LogLevel.critical)
        return [formatEvent(e) or repr(e) for e in self.events if e.get("log_level") in bad]

    def unexpected(self) -> list[str]:
        """
        Critical events, and errors not logged by rtunnel itself (which
        logs a server failing verification as an error, by design).
        """
        return [
            formatEvent(e) or repr(e)
            for e in self.events
            if e.get("log_level") is LogLevel.critical
            or (e.get("log_level") is LogLevel.error and not str(e.get("log_namespace", "")).startswith("rtunnel."))
        ]


LOST = Failure(error.ConnectionLost("gone"))


def server_hello(refusal: tuple[int, str] | None = None) -> bytes:
    """What a tunnel server sends first: its HELLO (and, refusing, the GOAWAY with it)."""
    server = MuxProtocol(initiator=False, clock=Clock())
    if refusal is not None:
        server.refuse_session(*refusal)
    transport = TCPTransport()
    server.makeConnection(transport)
    return transport.value()


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
class InMemoryTLS:
    """Dials the world's real server over TLS in memory; the whole exchange happens within connect()."""

    def __init__(self, world: SiteOverTLS, options: object) -> None:
        self.world = world
        self.options = options
        self.connects = 0

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        self.connects += 1
        world = self.world
        watching = Watching(factory)
        tls_connect(world.server, world.fixture.server_options(), watching, self.options, world.clock)
        # the TLS protocol lets go of the protocol it wrapped once the connection is gone
        return defer.succeed(watching.built[-1])

    def connect_unwrapped(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol | None]:
        """As BulkTLSClientEndpoint would unwrap a connection that is gone already: nothing."""
        self.connects += 1
        world = self.world
        client, _, _ = tls_connect(world.server, world.fixture.server_options(), factory, self.options, world.clock)
        return defer.succeed(client.wrappedProtocol)  # type: ignore[attr-defined]


class VerdictsThroughTheServiceTests(SynchronousTestCase):
    """The factory's verdicts drive the reconnecting service as TunnelClientService wires them."""

    def run_service(
        self, world: SiteOverTLS, options: object, unwrapped: bool = False
    ) -> tuple[ReconnectingService, InMemoryTLS]:
        endpoint = InMemoryTLS(world, options)
        if unwrapped:
            endpoint.connect = endpoint.connect_unwrapped  # type: ignore[method-assign,assignment]
        service = ReconnectingService(
            endpoint,
            world.factory,
            clock=world.clock,
            retry_policy=lambda failures: 1.0,
            prepare=lambda mux: mux.when_ready(),
        )

        def fatal(message: str) -> None:
            world.fatal.append(message)
            service.stopService()

        world.factory.on_fatal = fatal
        service.startService()
        return service, endpoint

    def test_refusal_stops_the_service(self) -> None:
        """A revoked site is told so by its server: fatal once, stopped, nothing dialled again."""
        world = SiteOverTLS(self)
        log = LogCapture(self)
        key, cert = world.fixture.enroll("alpha")
        world.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
        service, endpoint = self.run_service(world, world.fixture.site_options(key, cert))
        self.assertEqual(len(world.fatal), 1)
        self.assertIn("tunnel server refused site alpha: site-revoked", world.fatal[0])
        self.assertIs(service.phase, Phase.STOPPED)
        world.clock.advance(100)
        self.assertEqual(endpoint.connects, 1)
        self.assertEqual(log.lines("connected to tunnel server"), [])
        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
        self.assertEqual(log.unexpected(), [])

    def test_wrong_server_is_retried(self) -> None:
        """A server failing verification is not fatal: the service waits and tries again."""
        world = SiteOverTLS(self)
        other = ServerFixture(self)
        key, cert = world.fixture.enroll("alpha")
        service, endpoint = self.run_service(
            world, site_tls_options(other.ca_pem, "localhost", client_key=key, client_cert=cert)
        )
        self.assertEqual(world.fatal, [])
        self.assertIs(service.phase, Phase.WAITING)
        self.assertIs(world.factory.last_outcome.verdict, Verdict.VERIFICATION)  # type: ignore[union-attr]
        world.clock.advance(1.0)
        self.assertEqual(endpoint.connects, 2)
        self.successResultOf(service.stopService())

    def test_connection_let_go_of_within_connect(self) -> None:
        """
        An endpoint that hands back no protocol (its TLS wrapper let go of
        it: the connection ended within connect()) is a failed attempt; a
        refusal within it still stops the service.
        """
        for revoked, phase in ((False, Phase.WAITING), (True, Phase.STOPPED)):
            world = SiteOverTLS(self)
            log = LogCapture(self)
            key, cert = world.fixture.enroll("alpha")
            if revoked:
                world.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
                options = world.fixture.site_options(key, cert)
            else:
                options = site_tls_options(ServerFixture(self).ca_pem, "localhost", client_key=key, client_cert=cert)
            service, _ = self.run_service(world, options, unwrapped=True)
            self.assertIs(service.phase, phase)
            self.assertEqual(len(world.fatal), int(revoked))
            gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
            self.assertEqual(log.unexpected(), [])
            service.stopService()

    def test_connected_site_counts_as_connected(self) -> None:
        """An enrolled site's session opens: the service is connected, the factory said so once."""
        world = SiteOverTLS(self)
        log = LogCapture(self)
        key, cert = world.fixture.enroll("alpha")
        service, _ = self.run_service(world, world.fixture.site_options(key, cert))
        self.assertIs(service.phase, Phase.CONNECTED)
        self.assertIs(service.session, world.factory.current)
        self.assertEqual(len(log.lines("site alpha connected to tunnel server")), 1)


@implementer(IStreamClientEndpoint)
class Named:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
        self.log.append(self.name)
        return defer.Deferred()


@implementer(IStreamClientEndpoint)
class LosingEndpoint:
    """Connects and loses the connection within connect(): the Deferred comes back fired, the protocol gone."""

    def __init__(self) -> None:
        self.protocols: list[IProtocol] = []

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500))
        assert protocol is not None
        protocol.makeConnection(TCPTransport())
        protocol.connectionLost(LOST)
        self.protocols.append(protocol)
        return defer.succeed(protocol)


class ReconnectingServiceTests(SynchronousTestCase):
    """
    The reconnecting service's states on a Clock, with connections the test
    makes, opens and loses: every input in every state it can arrive in,
    and never an error logged.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = LogCapture(self)
        self.endpoint = ControlledEndpoint()
        self.built = Built(lambda: SiteTunnelProtocol(initiator=True, clock=self.clock))
        self.policy_calls: list[int] = []
        self.closed: list[SiteTunnelProtocol] = []
        self.service = self.make(self.endpoint)
        self.addCleanup(lambda: self.assertEqual(self.log.errors(), []))

    def make(self, endpoint: IStreamClientEndpoint) -> ReconnectingService:
        return ReconnectingService(
            endpoint,
            self.built,
            clock=self.clock,
            retry_policy=self.policy,
            prepare=lambda mux: mux.when_ready(),
            close=self.close,
        )

    def policy(self, failures: int) -> float:
        self.policy_calls.append(failures)
        return 2.0 ** (failures - 1)

    def close(self, mux: SiteTunnelProtocol) -> None:
        self.closed.append(mux)
        mux.abort()

    def connect(self) -> tuple[SiteTunnelProtocol, TCPTransport]:
        """The pending attempt connects."""
        protocol, transport = self.endpoint.complete()
        self.assertIsInstance(protocol, SiteTunnelProtocol)
        self.assertIs(self.service.phase, Phase.HANDSHAKING)
        return protocol, transport  # type: ignore[return-value]

    def open(self) -> SiteTunnelProtocol:
        """The pending attempt connects and the session opens."""
        mux, _ = self.connect()
        mux.dataReceived(server_hello())
        self.assertIs(self.service.phase, Phase.CONNECTED)
        return mux

    def next_attempt_after(self, delay: float) -> None:
        count = len(self.endpoint.attempts)
        self.assertIs(self.service.phase, Phase.WAITING)
        self.clock.advance(delay - 0.001)
        self.assertEqual(len(self.endpoint.attempts), count, f"attempt before {delay}s")
        self.clock.advance(0.001)
        self.assertEqual(len(self.endpoint.attempts), count + 1, f"no attempt at {delay}s")
        self.assertIs(self.service.phase, Phase.CONNECTING)

    def test_connect_failures_back_off(self) -> None:
        """A failed connect is a failed attempt: the next one after the policy's delay, one at a time."""
        self.service.startService()
        self.assertIs(self.service.phase, Phase.CONNECTING)
        for failures in (1, 2, 3, 4):
            self.endpoint.fail(error.ConnectionRefusedError())
            self.assertEqual(self.policy_calls[-1], failures)
            self.next_attempt_after(2.0 ** (failures - 1))

    def test_retry_soon(self) -> None:
        """
        retry_soon shortens only a longer wait: the next attempt comes at
        the new time, once; in any phase but waiting it does nothing.
        """
        self.service.startService()
        self.assertFalse(self.service.retry_soon(0.5))  # connecting
        for _ in range(4):
            self.endpoint.fail(error.ConnectionRefusedError())
            if len(self.policy_calls) < 4:
                self.clock.advance(2.0 ** (len(self.policy_calls) - 1))
        self.assertIs(self.service.phase, Phase.WAITING)  # 8 s to wait
        self.clock.advance(1.0)
        self.assertFalse(self.service.retry_soon(7.5))  # no sooner than planned
        self.assertTrue(self.service.retry_soon(0.5))
        self.next_attempt_after(0.5)
        self.clock.advance(10.0)
        self.assertEqual(len(self.endpoint.attempts), 5)  # the old time brought no extra attempt
        self.open()
        self.assertFalse(self.service.retry_soon(0.5))  # connected

    def test_lost_before_hello(self) -> None:
        """A connection lost while the session is opening is a failed attempt, each one counted."""
        self.service.startService()
        for failures in (1, 2, 3):
            mux, _ = self.connect()
            mux.connectionLost(LOST)
            self.assertEqual(self.service.failures, failures)
            self.next_attempt_after(2.0 ** (failures - 1))

    def test_lost_within_connect(self) -> None:
        """
        A connection made and lost before connect() returned (its Deferred
        comes back fired, with a protocol already gone) is a failed attempt
        like any other; the session check is not even made.
        """
        endpoint = LosingEndpoint()
        service = self.make(endpoint)
        service.startService()
        self.assertIs(service.phase, Phase.WAITING)
        self.assertEqual(service.failures, 1)
        self.clock.advance(1.0)
        self.assertEqual(len(endpoint.protocols), 2)
        self.assertEqual(service.failures, 2)
        self.assertEqual(self.successResultOf(service.stopService()), None)
        self.clock.advance(100)
        self.assertEqual(len(endpoint.protocols), 2)

    def test_hello_with_a_refusal_is_a_failed_attempt(self) -> None:
        """
        HELLO and GOAWAY in one read: the session never opened, so the
        connection is dropped and the attempt counts as failed once it is
        gone (not before: one connection at a time).
        """
        self.service.startService()
        self.endpoint.fail(error.ConnectionRefusedError())
        self.clock.advance(1.0)
        mux, transport = self.connect()
        mux.dataReceived(server_hello(refusal=(ErrorCode.INTERNAL_ERROR, "could not check this site")))
        self.assertIs(self.service.phase, Phase.HANDSHAKING)
        self.assertTrue(transport.aborted)
        self.clock.advance(60)
        self.assertEqual(len(self.endpoint.attempts), 2)
        mux.connectionLost(LOST)
        self.assertEqual(self.service.failures, 2)
        self.next_attempt_after(2.0)

    def test_open_session_resets_the_backoff(self) -> None:
        """Only a session that opened resets the count: its end is followed by the first delay."""
        self.service.startService()
        for _ in range(3):
            self.endpoint.fail(error.ConnectionRefusedError())
            self.clock.advance(10)
        mux = self.open()
        self.assertEqual(self.service.failures, 0)
        self.assertIs(self.service.session, mux)
        mux.connectionLost(LOST)
        self.assertEqual(self.service.failures, 1)
        self.next_attempt_after(1.0)

    def test_stop_while_waiting(self) -> None:
        """Stopping during the backoff wait is done at once; the retry is cancelled."""
        self.service.startService()
        self.endpoint.fail(error.ConnectionRefusedError())
        self.assertIsNone(self.successResultOf(self.service.stopService()))
        self.assertIs(self.service.phase, Phase.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_connecting(self) -> None:
        """Stopping while the endpoint connects cancels the connect; the stop is done then."""
        self.service.startService()
        pending = self.endpoint.attempts[0][1]
        self.assertIsNone(self.successResultOf(self.service.stopService()))
        self.assertTrue(pending.called)  # cancelled
        self.assertIs(self.service.phase, Phase.STOPPED)
        self.clock.advance(100)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_stop_while_handshaking(self) -> None:
        """
        Stopping while the session opens aborts the connection; the stop is
        done once it is gone. A HELLO arriving meanwhile changes nothing.
        """
        self.service.startService()
        mux, transport = self.connect()
        stopped = self.service.stopService()
        self.assertTrue(transport.aborted)
        self.assertIs(self.service.phase, Phase.STOPPING)
        mux.dataReceived(server_hello())
        self.assertNoResult(stopped)
        mux.connectionLost(LOST)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIs(self.service.phase, Phase.STOPPED)
        self.clock.advance(100)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_stop_while_connected(self) -> None:
        """Stopping with the session open closes it the given way; the stop is done once it is gone."""
        self.service.startService()
        mux = self.open()
        stopped = self.service.stopService()
        self.assertEqual(self.closed, [mux])
        again = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertNoResult(again)
        mux.connectionLost(LOST)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.successResultOf(again))
        self.clock.advance(100)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_stop_from_the_end_of_the_connection(self) -> None:
        """
        Stopped by an observer of the connection's end that comes before
        the service's own (the site factory's, calling its fatal error on a
        refusal), in either phase: no retry is scheduled.
        """
        stops: list[defer.Deferred[None]] = []

        def build() -> SiteTunnelProtocol:
            mux = SiteTunnelProtocol(initiator=True, clock=self.clock)
            mux.on_closed(lambda _: stops.append(self.service.stopService()))
            return mux

        self.built.build = build
        self.service.startService()
        for make in (self.connect, lambda: (self.open(), None)):
            mux, _ = make()
            mux.connectionLost(LOST)
            self.assertIsNone(self.successResultOf(stops[-1]))
            self.assertIs(self.service.phase, Phase.STOPPED)
            self.assertEqual(self.clock.getDelayedCalls(), [])
            self.service.startService()
        self.assertEqual(len(stops), 2)

    def test_stop_from_within_connect(self) -> None:
        """
        A connection made, refused and ended within connect() whose end
        stops the service: the stop is done when connect() returns, and
        nothing is retried.
        """
        stops: list[defer.Deferred[None]] = []

        @implementer(IStreamClientEndpoint)
        class Refusing:
            def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
                protocol = factory.buildProtocol(None)
                assert isinstance(protocol, SiteTunnelProtocol)
                protocol.makeConnection(TCPTransport())
                protocol.on_closed(lambda _: stops.append(service.stopService()))
                protocol.connectionLost(LOST)
                return defer.succeed(protocol)

        service = self.make(Refusing())
        service.startService()
        self.assertIsNone(self.successResultOf(stops[0]))
        self.assertIs(service.phase, Phase.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_started_again_while_stopping(self) -> None:
        """Started again before the stop is done: the next attempt begins once the connection is gone."""
        self.service.startService()
        mux, _ = self.connect()
        stopped = self.service.stopService()
        self.service.startService()
        self.assertEqual(len(self.endpoint.attempts), 1)
        mux.connectionLost(LOST)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIs(self.service.phase, Phase.CONNECTING)
        self.assertEqual(len(self.endpoint.attempts), 2)


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

    def drop(self) -> None:
        """The server accepts the current attempt's TCP connection, then drops it before its HELLO."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(TCPTransport(IPv4Address("TCP", host, port)))
        self.assertIs(self.service.client.phase, Phase.HANDSHAKING)  # type: ignore[union-attr]
        protocol.connectionLost(LOST)

    def test_hello_with_goaway_is_a_failed_attempt(self) -> None:
        """
        A server that refuses the session (HELLO and a fatal GOAWAY in one
        write, as TunnelConnection does when its database fails) does not
        count as a made connection: prepare_connection fails, so the
        service backs off instead of reconnecting at once; a plain HELLO
        does count.
        """
        self.build()
        refusing = MuxProtocol(initiator=False, clock=self.reactor)
        refusing.refuse_session(ErrorCode.INTERNAL_ERROR, "could not check this site")
        refused_site = SiteTunnelProtocol(initiator=True, clock=self.reactor)
        d = self.service.prepare_connection(refused_site)
        _, _, pump = connectedServerAndClient(lambda: refusing, lambda: refused_site, clock=self.reactor, greet=False)
        pump_all(pump)
        failure = self.failureResultOf(d, ConnectionError)
        self.assertIn("INTERNAL_ERROR", str(failure.value))
        good_site = SiteTunnelProtocol(initiator=True, clock=self.reactor)
        accepted = self.service.prepare_connection(good_site)
        _, _, pump = connectedServerAndClient(
            lambda: MuxProtocol(initiator=False, clock=self.reactor), lambda: good_site, clock=self.reactor
        )
        pump_all(pump)
        self.successResultOf(accepted)

    def test_server_that_drops_before_hello_is_backed_off_quietly(self) -> None:
        """
        A server that accepts TCP and drops it before its HELLO (full, out
        of descriptors, a health-checking load balancer) is backed off from
        like one that refuses: 1, 2, 4, 8 s without jitter. Each drop is one
        warning naming the server; nothing at level error or critical (no
        unhandled error from the reconnect machinery).
        """
        log = LogCapture(self)
        self.build(jitter=lambda: 0.0)
        for expected in (1, 2, 4, 8):
            self.drop()
            self.assertIs(self.service.client.phase, Phase.WAITING)  # type: ignore[union-attr]
            self.next_attempt_after(expected)
        self.assertEqual(log.levels("site alpha: tunnel to 127.0.0.1:5500 lost: "), ["warn"] * 4)
        self.assertEqual(log.errors(), [])
        self.assertEqual(self.fatal, [])

    def test_drops_and_refusals_count_together(self) -> None:
        """A dropped attempt and a refused one are both failed attempts: the delays keep doubling."""
        self.build(jitter=lambda: 0.0)
        for expected, fail in ((1, self.drop), (2, self.refuse), (4, self.drop), (8, self.refuse)):
            fail()
            self.next_attempt_after(expected)

    def test_stop_while_handshaking_drops_the_connection(self) -> None:
        """
        Stopping while TLS and the HELLO are still under way aborts the
        connection; the stop is done once it is gone, and nothing is dialled
        again.
        """
        self.build()
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(None)
        transport = TCPTransport()
        protocol.makeConnection(transport)
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(LOST)
        self.assertIsNone(self.successResultOf(stopped))
        self.reactor.advance(100)
        self.assertEqual(len(self.attempts()), 1)

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
