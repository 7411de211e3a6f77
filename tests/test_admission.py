"""
Admission from the snapshot and the server's database thread, against real
SQLite files: a second connection holding the write lock (as the admin CLI
can), another process revoking, writes queued in order, failures reported
once, the stop's flush and its bound.

The database thread is a real thread. Its results reach the test through a
memory reactor that queues calls from threads; the test delivers them with
L{ThreadedReactor.settle}, which waits (bounded) for a marker job the
thread runs after everything submitted before it. Nothing sleeps.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import MuxProtocol
from rtunnel.identity import certs
from rtunnel.identity.enrollment import EnrollRequest
from rtunnel.identity.errors import SiteRejected, StateError
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import StateStore
from rtunnel.mux import ErrorCode
from rtunnel.roles.enrollment import EnrollmentRequester
from rtunnel.roles.server import ServerPolicy, StateThread, TunnelServerService
from rtunnel.services import ServerConfig
from tests.roles_helpers import SITE_PEER, Built, ServerFixture, pump_all

#: How long a test waits for the database thread before failing (a bound, not a pause).
WAIT = 30.0


@implementer(IReactorFromThreads)
class ThreadedReactor(MemoryReactorClock):
    """A memory reactor that also takes calls from other threads; they run when the test delivers them."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., object], tuple[object, ...], dict[str, object]]]
        self.from_threads = queue.Queue()

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.from_threads.put((f, args, kwargs))

    def deliver(self) -> None:
        """Run what threads handed over so far; wait for nothing."""
        while True:
            try:
                f, args, kwargs = self.from_threads.get_nowait()
            except queue.Empty:
                return
            f(*args, **kwargs)

    def wait_for(self, d: Deferred[Any], pumps: tuple[IOPump, ...] = ()) -> None:
        """Deliver calls from threads (and pump the links) until C{d} has fired."""
        while True:
            for pump in pumps:
                pump_all(pump)
            self.deliver()
            if d.called:
                return
            f, args, kwargs = self.from_threads.get(timeout=WAIT)
            f(*args, **kwargs)

    def settle(self, database: StateThread, pumps: tuple[IOPump, ...] = ()) -> None:
        """Wait until the database thread has done every job submitted so far, and deliver their results."""
        self.wait_for(database.run(lambda: None))
        for pump in pumps:
            pump_all(pump)
        self.deliver()


class LogCapture:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str) -> list[str]:
        return [t for t in (formatEvent(e) for e in self.events) if containing in t]


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if f"-{name}-" in t.name]


class Locker:
    """A second, plain sqlite3 connection holding the database's write lock."""

    def __init__(self, case: SynchronousTestCase, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        case.addCleanup(self.db.close)
        self.held = False

    def hold(self) -> None:
        self.db.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.db.execute("ROLLBACK")


class StateThreadTests(SynchronousTestCase):
    def test_jobs_run_in_order_in_one_other_thread(self) -> None:
        """
        Jobs run one after another in the order submitted, all in one
        thread that is not the caller's; their results come back on the
        reactor in that order; stop ends the thread.
        """
        reactor = ThreadedReactor()
        database = StateThread(reactor, name="order")
        database.start()
        ran: list[tuple[int, int]] = []
        delivered: list[int] = []
        for i in range(20):
            database.run(lambda i=i: ran.append((i, threading.get_ident())) or i).addCallback(delivered.append)
        reactor.settle(database)
        self.assertEqual([i for i, _ in ran], list(range(20)))
        self.assertEqual(len({ident for _, ident in ran}), 1)
        self.assertNotEqual(ran[0][1], threading.get_ident())
        self.assertEqual(delivered, list(range(20)))
        stopped = database.stop()
        reactor.wait_for(stopped)
        self.assertTrue(stopped.result)
        self.assertEqual(pool_threads("order"), [])

    def test_inline_without_a_threaded_reactor(self) -> None:
        """With a reactor that takes no calls from threads, a job runs at once, here."""
        database = StateThread(Clock())
        database.start()
        d = database.run(threading.get_ident)
        self.assertEqual(d.result, threading.get_ident())
        self.assertTrue(database.stop().result)

    def test_failures_are_reported_once_per_change(self) -> None:
        """
        Failing writes give one warning when the database starts failing,
        whatever their number, and one line when a write works again; their
        Deferreds never fail.
        """
        log = LogCapture(self)
        database = StateThread(None)

        def locked() -> None:
            raise StateError("state database x is locked by another process (database is locked)")

        for _ in range(3):
            self.assertIsNone(database.write("recording that site alpha connected", locked).result)
        [line] = log.lines("state database")
        self.assertIn("recording that site alpha connected failed: state database x is locked", line)
        database.write("recording that site alpha disconnected", lambda: None)
        [_, again] = log.lines("state database")
        self.assertIn("state database works again (3 operations failed meanwhile)", again)
        database.write("recording that site alpha connected", lambda: None)
        self.assertEqual(len(log.lines("state database")), 2)

    def test_stop_gives_up_after_its_timeout(self) -> None:
        """
        A stop whose jobs do not finish within its timeout fires False with
        a warning; the jobs still queued are skipped, new ones refused, and
        the thread ends on its own once its current job returns.
        """
        log = LogCapture(self)
        reactor = ThreadedReactor()
        database = StateThread(reactor, name="bounded")
        database.start()
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        ran: list[str] = []

        def stuck() -> None:
            started.set()
            release.wait(WAIT)
            ran.append("stuck")

        database.run(stuck)
        database.run(lambda: ran.append("queued"))
        self.assertTrue(started.wait(WAIT))
        stopped = database.stop(timeout=10.0)
        reactor.advance(9.9)
        self.assertFalse(stopped.called)
        reactor.advance(0.1)
        self.assertFalse(stopped.result)
        [line] = log.lines("not done after")
        self.assertIn("state database: 2 writes not done after 10.0s at stop", line)
        self.failureResultOf(database.run(lambda: ran.append("late")), StateError)
        release.set()
        for thread in pool_threads("bounded"):
            thread.join(WAIT)
            self.assertFalse(thread.is_alive())
        self.assertEqual(ran, ["stuck"])


class RunningServer:
    """
    A TunnelServerService with a real database thread over a real state
    directory; sites enrolled before it starts, dialing it over real TLS in
    memory.
    """

    def __init__(
        self, case: SynchronousTestCase, sites: tuple[str, ...] = ("alpha",), busy_timeout: float | None = None
    ) -> None:
        self.case = case
        self.reactor = ThreadedReactor()
        self.fixture = ServerFixture(case)
        self.credentials = {name: self.fixture.enroll(name) for name in sites}
        self.path = self.fixture.state.store.path
        state = ServerState.load_or_create(self.fixture.directory)
        if busy_timeout is not None:
            state.store.close()
            state = attrs.evolve(state, store=StateStore(self.path, create=False, busy_timeout=busy_timeout))
        case.addCleanup(state.close)
        self.config = ServerConfig(
            state_dir=self.fixture.directory,
            listen="tcp:5500:interface=127.0.0.1",
            policy=ServerPolicy(keepalive=None),
        )
        self.fatal: list[str] = []
        self.service = TunnelServerService(self.config, state, self.reactor, self.fatal.append)
        self.database = self.service.database
        self.pumps: list[IOPump] = []
        self.other = StateStore(self.path, create=False)
        case.addCleanup(self.other.close)
        self.service.startService()
        case.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.reactor.wait_for(self.service.stopService(), tuple(self.pumps))

    def settle(self) -> None:
        self.reactor.settle(self.database, tuple(self.pumps))

    def dial(self, site: str = "alpha", credentials: Any = None, build: Any = None) -> tuple[Any, IOPump]:
        key, cert = credentials or self.credentials.get(site, (None, None))
        gate = self.reactor.tcpServers[0][1]
        clients = Built(build or (lambda: MuxProtocol(initiator=True, clock=self.reactor)))
        client_tls = TLSMemoryBIOFactory(self.fixture.site_options(key, cert), True, clients, clock=self.reactor)
        _, _, pump = connectedServerAndClient(
            lambda: gate.buildProtocol(SITE_PEER),
            lambda: client_tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500)),
            greet=False,
            clock=self.reactor,
        )
        self.pumps.append(pump)
        pump_all(pump)
        return clients.built[0], pump


class ServiceAdmissionTests(SynchronousTestCase):
    def test_locked_database_admits_known_sites_at_once(self) -> None:
        """
        With another connection holding the write lock, a known site is
        admitted and served at once: its "connected" write waits in the
        database thread, not on the reactor, and lands once the lock is
        released.
        """
        server = RunningServer(self, busy_timeout=WAIT)  # the write waits for the lock, however slow the test
        locker = Locker(self, server.path)
        locker.hold()
        self.addCleanup(locker.release)
        site, pump = server.dial("alpha")
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.service.registry.session_for("alpha"))
        self.assertGreaterEqual(server.database.pending, 1)
        record = server.other.site("alpha")
        assert record is not None
        self.assertIsNone(record.connected_since)
        locker.release()
        server.settle()
        record = server.other.site("alpha")
        assert record is not None
        self.assertTrue(record.connected)
        self.assertEqual(record.peer, "192.0.2.7:40123")
        self.assertTrue(site.ready)

    def test_failed_write_is_logged_once_and_cuts_nothing(self) -> None:
        """
        Writes that fail (the database locked beyond the busy timeout, here
        0) give one warning between them; the sessions they concern stay
        up; the next write that works says so.
        """
        log = LogCapture(self)
        server = RunningServer(self, sites=("alpha", "beta"), busy_timeout=0.0)
        server.settle()  # the public port's write, before the lock
        locker = Locker(self, server.path)
        locker.hold()
        self.addCleanup(locker.release)
        alpha, _ = server.dial("alpha")
        beta, beta_pump = server.dial("beta")
        server.settle()
        [line] = log.lines("state database:")
        self.assertIn("recording that site alpha connected failed", line)
        self.assertIn("locked", line)
        for site in (alpha, beta):
            self.assertTrue(site.ready)
            self.assertIsNone(site.peer_goaway)
        self.assertEqual(set(server.service.registry.connected_sites()), {"alpha", "beta"})
        locker.release()
        beta.abort()
        pump_all(beta_pump)
        server.settle()
        [again] = log.lines("state database works again")
        self.assertIn("(2 operations failed meanwhile)", again)
        self.assertTrue(alpha.ready)

    def test_writes_land_in_order(self) -> None:
        """
        A site's "connected" and "disconnected", queued together behind the
        lock, are written in that order: the site ends up disconnected.
        """
        server = RunningServer(self, busy_timeout=WAIT)  # the write waits for the lock, however slow the test
        locker = Locker(self, server.path)
        locker.hold()
        self.addCleanup(locker.release)
        site, pump = server.dial("alpha")
        site.abort()
        pump_all(pump)
        self.assertGreaterEqual(server.database.pending, 2)
        locker.release()
        server.settle()
        record = server.other.site("alpha")
        assert record is not None
        self.assertIsNotNone(record.connected_since)
        self.assertFalse(record.connected)
        self.assertIsNotNone(record.last_seen)

    def test_revocation_by_another_process_reaches_the_snapshot_at_the_poll(self) -> None:
        """
        A revocation committed by another connection is in the snapshot
        after the next poll (read in the database thread): the live session
        is cut and the site refused from then on, not before.
        """
        server = RunningServer(self)
        site, pump = server.dial("alpha")
        cert = server.credentials["alpha"][1]
        server.other.revoke_site("alpha", datetime.now(UTC))
        server.service.admission.check("alpha", certs.fingerprint(cert))
        server.reactor.advance(server.config.revocation_poll)
        server.settle()
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)
        self.assertIn("site-revoked", site.peer_goaway[1])
        self.assertIsNone(server.service.registry.session_for("alpha"))
        error = self.assertRaises(SiteRejected, server.service.admission.check, "alpha", certs.fingerprint(cert))
        self.assertEqual(error.code, "site-revoked")
        again, _ = server.dial("alpha")
        self.assertIn("site-revoked", again.peer_goaway[1])

    def test_enrollment_in_the_thread_admits_at_once(self) -> None:
        """
        An enrollment is redeemed in the database thread (the reply waits
        for it) and the new site is admitted on its next connection, with
        no poll in between.
        """
        server = RunningServer(self, sites=())
        token = server.other.create_token("gamma", timedelta(hours=1), datetime.now(UTC))
        key = certs.generate_private_key()
        request = EnrollRequest("gamma", token, certs.dump_csr(certs.create_csr(key, "gamma")))
        requester, pump = server.dial(
            credentials=(None, None), build=lambda: EnrollmentRequester(request, server.reactor)
        )
        self.assertFalse(requester.result.called)
        server.settle()
        pem = self.successResultOf(requester.result)
        site, _ = server.dial("gamma", credentials=(key, certs.load_certificate(pem)))
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.service.registry.session_for("gamma"))

    def test_enrollment_waiting_for_the_database_keeps_the_handshake_deadline(self) -> None:
        """
        An enrollment whose redemption waits behind the lock is dropped at
        the connection's handshake deadline, with a line that says why; the
        redemption still completes in the thread, and the site's retry with
        the same key gets the same certificate.
        """
        log = LogCapture(self)
        server = RunningServer(self, sites=(), busy_timeout=WAIT)
        token = server.other.create_token("gamma", timedelta(hours=1), datetime.now(UTC))
        key = certs.generate_private_key()
        request = EnrollRequest("gamma", token, certs.dump_csr(certs.create_csr(key, "gamma")))
        locker = Locker(self, server.path)
        locker.hold()
        self.addCleanup(locker.release)
        first, pump = server.dial(
            credentials=(None, None), build=lambda: EnrollmentRequester(request, server.reactor, timeout=60.0)
        )
        server.reactor.advance(server.config.policy.handshake_timeout)
        pump_all(pump)
        self.assertTrue(first.result.called)
        first.result.addErrback(lambda _: None)
        [line] = log.lines("dropping")
        self.assertIn("enrollment not decided (the state database did not answer in time)", line)
        locker.release()
        server.settle()
        [gone] = log.lines("decided after the connection was gone")
        self.assertIn("site gamma", gone)
        retry, _ = server.dial(credentials=(None, None), build=lambda: EnrollmentRequester(request, server.reactor))
        server.settle()
        pem = self.successResultOf(retry.result)
        record = server.other.site("gamma")
        assert record is not None
        self.assertEqual(record.certificate_fingerprint, certs.fingerprint(certs.load_certificate(pem)))
        site, _ = server.dial("gamma", credentials=(key, certs.load_certificate(pem)))
        self.assertTrue(site.ready)

    def test_stop_flushes_pending_writes(self) -> None:
        """
        Stopping waits for the writes still queued (here behind the lock),
        then writes the stop record after them, then ends the thread.
        """
        server = RunningServer(self, busy_timeout=WAIT)  # the write waits for the lock, however slow the test
        locker = Locker(self, server.path)
        locker.hold()
        self.addCleanup(locker.release)
        site, pump = server.dial("alpha")
        stopped = server.service.stopService()
        pump_all(pump)
        server.reactor.deliver()
        self.assertFalse(stopped.called)
        locker.release()
        server.reactor.wait_for(stopped, (pump,))
        self.assertEqual(site.peer_goaway[0], ErrorCode.GOING_AWAY)
        record = server.other.site("alpha")
        assert record is not None
        self.assertIsNotNone(record.connected_since)
        self.assertFalse(record.connected)
        self.assertEqual(server.other.live_replicas(datetime.now(UTC)), [])
        self.assertEqual(pool_threads("rtunnel-state"), [])
