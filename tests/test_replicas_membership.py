"""
ReplicaMembership (rtunnel/roles/replicas.py) on a Clock with a small
in-memory store: the start record and heartbeats, the set read back and
told to the sessions that negotiated REPLICAS (when it changes, and at once
to one that registers), expiry, a database that fails and works again, the
stop record; and the default replica id.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxProtocol
from rtunnel.identity import certs
from rtunnel.identity.errors import StateError
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import HEARTBEAT_INTERVAL, REPLICA_TIMEOUT, ReplicaRecord, SiteAdmission, StateStore
from rtunnel.mux import ErrorCode
from rtunnel.mux.frames import MAX_REPLICAS, ReplicaEntry, Replicas
from rtunnel.mux.settings import CAP_SERVICES, ROLE_SETTINGS, Settings
from rtunnel.roles.replicas import PUSH_STEP, ReplicaMembership, default_replica_id, listen_port
from rtunnel.roles.server import RevocationWatch, StateThread, TunnelServerFactory
from rtunnel.services import build_server_service
from tests import test_server_role
from tests.observe_web_helpers import turn
from tests.roles_helpers import SITE_PEER, Built, Watching, pump_all
from tests.test_admission import ThreadedReactor
from tests.test_server_role import POLICY, Server
from tests.test_taps import parse_server

T0 = datetime(2026, 12, 6, 2, 0, 0, tzinfo=UTC)


class FakeStore:
    """The replica part of StateStore, in memory; every call is recorded, and it fails on demand."""

    def __init__(self) -> None:
        self.rows: dict[str, ReplicaRecord] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StateError("state database is locked")

    def add(self, replica_id: str, heartbeat: datetime, advertise: str = "", restarted: bool = False) -> None:
        """Another replica's row, as its own heartbeat leaves it (or its start, when C{restarted})."""
        old = self.rows.get(replica_id)
        started = heartbeat if old is None or restarted else old.started_at
        self.rows[replica_id] = ReplicaRecord(replica_id, advertise, 1, "elsewhere", started, heartbeat)

    def replica_started(self, replica_id: str, advertise: str, pid: int, host: str, now: datetime) -> None:
        self._check()
        self.calls.append(("started", replica_id, advertise, pid, host, now))
        self.rows[replica_id] = ReplicaRecord(replica_id, advertise, pid, host, now, now)

    def replica_heartbeat(self, replica_id: str, advertise: str, now: datetime) -> None:
        self._check()
        self.calls.append(("heartbeat", replica_id, now))
        old = self.rows.get(replica_id)
        started = now if old is None else old.started_at
        self.rows[replica_id] = ReplicaRecord(replica_id, advertise, None, None, started, now)

    def replica_stopped(self, replica_id: str) -> None:
        self._check()
        self.calls.append(("stopped", replica_id))
        self.rows.pop(replica_id, None)

    def expire_replicas(self, now: datetime, timeout: float = REPLICA_TIMEOUT) -> list[str]:
        self._check()
        gone = sorted(i for i, r in self.rows.items() if r.heartbeat_at < now - timedelta(seconds=timeout))
        for replica_id in gone:
            del self.rows[replica_id]
        return gone

    def live_replicas(self, now: datetime, timeout: float = REPLICA_TIMEOUT) -> list[ReplicaRecord]:
        self._check()
        cutoff = now - timedelta(seconds=timeout)
        return [r for _, r in sorted(self.rows.items()) if r.heartbeat_at >= cutoff]


class FakeSession:
    """A site session: whether it negotiated REPLICAS, and what it was sent."""

    def __init__(self, negotiated: bool = True) -> None:
        self.negotiated = negotiated
        self.sent: list[Replicas] = []

    @property
    def replicas_negotiated(self) -> bool:
        return self.negotiated

    def send_replicas(self, replicas: Replicas) -> None:
        assert self.negotiated, "sent REPLICAS to a session that did not negotiate them"
        self.sent.append(replicas)


class Lines:
    """rtunnel's log lines while the test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("rtunnel"):
            self.events.append(event)

    def __call__(self, containing: str = "") -> list[str]:
        return [text for text in map(formatEvent, self.events) if containing in text]


def ids(replicas: Replicas) -> list[str]:
    return [entry.replica_id for entry in replicas.replicas]


class Setup:
    def __init__(self, case: SynchronousTestCase, replica_id: str = "a:5500", advertise: str = "") -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.database = StateThread(None)  # jobs run inline, in order
        self.sessions: list[FakeSession] = []
        self.membership = ReplicaMembership(
            self.store,  # type: ignore[arg-type]
            self.database,
            self.clock,
            replica_id,
            advertise,
            lambda: self.sessions,
            now=self.now,
            pid=4242,
            host="cloud-a",
        )
        case.addCleanup(self.stop)

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock.seconds())

    def stop(self) -> None:
        loop = self.membership._loop
        if loop is not None and loop.running:
            loop.stop()

    def beat(self) -> None:
        """Let one heartbeat interval pass."""
        self.clock.advance(HEARTBEAT_INTERVAL)


class DefaultIdTests(SynchronousTestCase):
    def test_host_and_port(self) -> None:
        """HOSTNAME:PORT, the port as --listen gives it in any of its forms."""
        self.assertEqual(default_replica_id(5500, "cloud-1.example"), "cloud-1.example:5500")
        for description, port in [
            ("tcp:5500", 5500),
            ("5501", 5501),
            ("tcp:port=5502:interface=127.0.0.1", 5502),
            ("tcp:5503:interface=127.0.0.1", 5503),
            ("tcp6:port=5504:interface=\\:\\:1", 5504),
            ("ssl:5505", 5505),
        ]:
            self.assertEqual(listen_port(description), port, description)

    def test_no_fixed_port(self) -> None:
        """Port 0 (any free port), a unix socket or another endpoint type name no port."""
        for description in ["tcp:0", "0", "unix:/run/rtunnel.sock", "tcp:interface=::1", "systemd:domain=INET:index=0"]:
            self.assertIsNone(listen_port(description), description)

    def test_fits_the_grammar(self) -> None:
        """Characters the id grammar does not allow become '-', and a long host name is shortened to 64 in all."""
        self.assertEqual(default_replica_id(5500, "host name!x_y"), "host-name-x_y:5500")
        long = default_replica_id(65535, "h" * 100)
        self.assertEqual(len(long), 64)
        self.assertTrue(long.endswith("h:65535"))
        self.assertEqual(default_replica_id(5500, ""), "localhost:5500")
        ReplicaEntry(long)  # valid for the frame


class MembershipTests(SynchronousTestCase):
    def test_start_records_then_beats(self) -> None:
        """
        The start record is the first beat's (at once), then one heartbeat
        per interval; the set holds this replica alone until it reads more.
        """
        s = Setup(self)
        self.assertEqual(ids(s.membership.current), ["a:5500"])
        s.membership.start()
        self.assertEqual(s.store.calls, [("started", "a:5500", "", 4242, "cloud-a", T0)])
        s.beat()
        s.beat()
        self.assertEqual(
            s.store.calls[1:],
            [("heartbeat", "a:5500", T0 + timedelta(seconds=1)), ("heartbeat", "a:5500", T0 + timedelta(seconds=2))],
        )
        self.assertEqual(s.membership.current, Replicas("a:5500", (ReplicaEntry("a:5500"),)))
        self.assertEqual(s.membership.live, 1)

    def test_registering_session_told_at_once(self) -> None:
        """
        A session that registers is told the current set at once, this
        replica included even before the first read; one that did not
        negotiate REPLICAS is told nothing.
        """
        s = Setup(self, advertise="192.0.2.10:5500")
        new, old = FakeSession(), FakeSession(negotiated=False)
        s.membership.tell(new)
        s.membership.tell(old)
        self.assertEqual(new.sent, [Replicas("a:5500", (ReplicaEntry("a:5500", "192.0.2.10:5500"),))])
        self.assertEqual(old.sent, [])

    def test_change_pushed_and_logged(self) -> None:
        """
        When another replica joins, every live session that negotiated
        REPLICAS is sent the new set, and one line names who joined; a beat
        that reads the same set sends and logs nothing.
        """
        lines = Lines(self)
        s = Setup(self)
        new, old = FakeSession(), FakeSession(negotiated=False)
        s.sessions += [new, old]
        s.membership.start()
        self.assertEqual(new.sent, [])
        s.store.add("b:5500", s.now(), advertise="[2001:db8::2]:5500")
        s.beat()
        expected = Replicas("a:5500", (ReplicaEntry("a:5500"), ReplicaEntry("b:5500", "[2001:db8::2]:5500")))
        self.assertEqual(new.sent, [expected])
        self.assertEqual(s.membership.current, expected)
        self.assertEqual(s.membership.live, 2)
        [line] = lines("replica set changed")
        self.assertEqual(line, "replica set changed: b:5500 joined; now 2: a:5500, b:5500")
        s.store.add("b:5500", s.now(), advertise="[2001:db8::2]:5500")
        s.beat()
        self.assertEqual(len(new.sent), 1)
        self.assertEqual(len(lines("replica set changed")), 1)

    def test_expired_replica_leaves(self) -> None:
        """
        A replica whose heartbeat stopped is dropped once it is older than
        the timeout (not before): the sessions are sent the smaller set, and
        the lines say who left and why.
        """
        lines = Lines(self)
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.store.add("b:5500", s.now())
        s.membership.start()
        self.assertEqual(ids(session.sent[-1]), ["a:5500", "b:5500"])
        s.clock.advance(REPLICA_TIMEOUT)  # b's heartbeat is exactly the timeout old: still live
        self.assertEqual(ids(s.membership.current), ["a:5500", "b:5500"])
        s.beat()
        self.assertEqual(ids(session.sent[-1]), ["a:5500"])
        self.assertEqual(len(session.sent), 2)
        self.assertEqual(lines("dropped replicas"), [f"dropped replicas b:5500: no heartbeat for {REPLICA_TIMEOUT:g}s"])
        self.assertEqual(lines("replica set changed")[-1], "replica set changed: b:5500 left; now 1: a:5500")

    def test_restart_under_the_same_id_is_told_again(self) -> None:
        """
        A replica that starts again under the same id (a worker restarted,
        a replica back before its row expired) leaves the set as it was,
        but the sessions are told it again: a site then dials at once for
        the replica it lost instead of waiting out its duplicate backoff.
        """
        lines = Lines(self)
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.store.add("b:5500", s.now())
        s.membership.start()
        self.assertEqual(len(session.sent), 1)
        s.store.add("b:5500", s.now())
        s.beat()
        self.assertEqual(len(session.sent), 1)  # a heartbeat only
        s.store.add("b:5500", s.now(), restarted=True)
        s.beat()
        self.assertEqual(len(session.sent), 2)
        self.assertEqual(session.sent[-1], session.sent[0])
        self.assertEqual(lines("started again"), ["replica b:5500 started again; telling the sites the set again"])
        s.beat()
        self.assertEqual(len(session.sent), 2)

    def test_advertise_change(self) -> None:
        """A replica that now advertises another address is a change too."""
        lines = Lines(self)
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.store.add("b:5500", s.now())
        s.membership.start()
        s.store.add("b:5500", s.now(), advertise="198.51.100.2:5500")
        s.beat()
        self.assertEqual(session.sent[-1].get("b:5500"), ReplicaEntry("b:5500", "198.51.100.2:5500"))
        self.assertIn("b:5500 now advertises 198.51.100.2:5500", lines("replica set changed")[-1])

    def test_database_down_keeps_the_set(self) -> None:
        """
        A database that fails keeps the last set (nothing is sent), and is
        reported once when it starts failing and once when it works again;
        the heartbeat goes on meanwhile.
        """
        lines = Lines(self)
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.store.add("b:5500", s.now())
        s.membership.start()
        sent = list(session.sent)
        s.store.down = True
        for _ in range(int(REPLICA_TIMEOUT) + 3):
            s.beat()
            s.store.add("b:5500", s.now())  # b goes on beating meanwhile
        self.assertEqual(session.sent, sent)
        self.assertEqual(ids(s.membership.current), ["a:5500", "b:5500"])
        self.assertTrue(s.database.failing)
        self.assertEqual(len(lines("the replica heartbeat failed")), 1)
        s.store.down = False
        s.beat()
        self.assertFalse(s.database.failing)
        self.assertEqual(len(lines("state database works again")), 1)
        self.assertEqual(s.store.calls[-1], ("heartbeat", "a:5500", s.now()))
        self.assertEqual(session.sent, sent)

    def test_start_record_retried(self) -> None:
        """A start record that failed is written by the next beat that works (not a bare heartbeat)."""
        s = Setup(self)
        s.store.down = True
        s.membership.start()
        s.store.down = False
        s.beat()
        self.assertEqual(s.store.calls, [("started", "a:5500", "", 4242, "cloud-a", s.now())])
        s.beat()
        self.assertEqual(s.store.calls[-1][0], "heartbeat")

    def test_own_row_missing(self) -> None:
        """A read without this replica's row (expired by another just then) still announces this replica."""
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.membership.start()
        s.store.add("b:5500", s.now())
        original = s.store.live_replicas

        def without_own(now: datetime, timeout: float = REPLICA_TIMEOUT) -> list[ReplicaRecord]:
            return [r for r in original(now, timeout) if r.replica_id != "a:5500"]

        s.store.live_replicas = without_own  # type: ignore[method-assign]
        s.beat()
        self.assertEqual(ids(session.sent[-1]), ["a:5500", "b:5500"])
        self.assertEqual(session.sent[-1].own, "a:5500")

    def test_at_most_max_replicas(self) -> None:
        """
        More live replicas than a frame may list: this one and the first
        others by id, MAX_REPLICAS in all; the count (for the metrics) is
        every live one. A row whose id is no replica id is left out with a
        warning.
        """
        lines = Lines(self)
        s = Setup(self, replica_id="z:5500")
        session = FakeSession()
        s.sessions.append(session)
        for n in range(MAX_REPLICAS + 5):
            s.store.add(f"r{n:03}:5500", s.now())
        s.store.add("bad id", s.now())
        s.membership.start()
        announced = session.sent[-1]
        self.assertEqual(len(announced.replicas), MAX_REPLICAS)
        self.assertEqual(ids(announced)[-1], "z:5500")
        self.assertEqual(ids(announced)[:2], ["r000:5500", "r001:5500"])
        self.assertEqual(s.membership.live, MAX_REPLICAS + 6)
        s.beat()
        s.beat()
        self.assertEqual(len(lines("ignoring replica row 'bad id'")), 1)

    def test_push_in_turns(self) -> None:
        """
        A change is told PUSH_STEP sessions a reactor turn; a change during
        a push starts over with the newer set, so every session ends with
        the newest; a stop ends a push in progress.
        """
        s = Setup(self)
        s.sessions += [FakeSession() for _ in range(2 * PUSH_STEP + 10)]
        s.membership.start()
        s.store.add("b:5500", s.now())
        s.membership.beat()  # the first turn of the push
        told = [len(x.sent) for x in s.sessions]
        self.assertEqual(told.count(1), PUSH_STEP)
        self.assertEqual(turn(s.clock), 1)
        self.assertEqual([len(x.sent) for x in s.sessions].count(1), 2 * PUSH_STEP)
        s.store.add("c:5500", s.now())
        s.membership.beat()  # a change before the last turn
        while turn(s.clock):
            pass
        self.assertTrue(all(ids(x.sent[-1]) == ["a:5500", "b:5500", "c:5500"] for x in s.sessions))
        self.assertEqual(sum(len(x.sent) for x in s.sessions), 2 * PUSH_STEP + len(s.sessions))
        s.store.add("d:5500", s.now())
        s.membership.beat()
        self.successResultOf(s.membership.stop())
        turn(s.clock)
        self.assertEqual(sum(1 for x in s.sessions if ids(x.sent[-1])[-1] == "d:5500"), PUSH_STEP)

    def test_stop(self) -> None:
        """
        Stopping ends the heartbeat and removes this replica (after the
        writes queued before); a beat in flight then changes nothing.
        """
        s = Setup(self)
        session = FakeSession()
        s.sessions.append(session)
        s.membership.start()
        self.successResultOf(s.membership.stop())
        self.assertEqual(s.store.calls[-1], ("stopped", "a:5500"))
        calls = len(s.store.calls)
        s.clock.advance(10 * HEARTBEAT_INTERVAL)
        self.assertEqual(len(s.store.calls), calls)
        s.store.add("b:5500", s.now())
        s.membership._apply(([], s.store.live_replicas(s.now())))
        self.assertEqual(session.sent, [])

    def test_stop_without_start_records_nothing(self) -> None:
        """
        A server that never listened (so never started its membership)
        writes no stop record: with the default id it shares with a server
        already running on the same state and port, it would drop that one.
        """
        s = Setup(self)
        s.store.add("a:5500", s.now())  # the running server's row
        self.successResultOf(s.membership.stop())
        self.assertEqual(s.store.calls, [])
        self.assertIn("a:5500", s.store.rows)

    def test_rename_before_start_only(self) -> None:
        """A default id completed once the tunnel port is bound; never once started."""
        s = Setup(self, replica_id="a:0")
        s.membership.rename("a:40123")
        self.assertEqual(ids(s.membership.current), ["a:40123"])
        s.membership.start()
        self.assertEqual(s.store.calls[0][1], "a:40123")
        self.assertRaises(RuntimeError, s.membership.rename, "a:1")


class ServiceReplicaTests(SynchronousTestCase):
    """The replica in a TunnelServerService on a MemoryReactorClock, over a real state database."""

    # test_server_role's ServiceTests', without collecting its tests here
    setUp = test_server_role.ServiceTests.setUp
    start = test_server_role.ServiceTests.start

    def dial_site(self, settings: Settings = ROLE_SETTINGS) -> tuple[MuxProtocol, Any]:
        """test_server_role's dial_site, with a site that offers every capability (REPLICAS among them)."""
        key, cert = self.fixture.enroll("alpha")
        self.reactor.advance(self.config.revocation_poll)
        tls_factory = self.reactor.tcpServers[0][1]
        clients = Built(lambda: MuxProtocol(initiator=True, clock=self.reactor, settings=settings))
        client_tls = TLSMemoryBIOFactory(self.fixture.site_options(key, cert), True, clients, clock=self.reactor)
        _, _, pump = connectedServerAndClient(
            lambda: tls_factory.buildProtocol(SITE_PEER),
            lambda: client_tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500)),
            greet=False,
            clock=self.reactor,
        )
        pump_all(pump)
        site: MuxProtocol = clients.built[0]
        return site, pump

    def other_store(self) -> StateStore:
        other = StateStore(self.fixture.state.store.path, create=False)
        self.addCleanup(other.close)
        return other

    def test_replica_id(self) -> None:
        """By default HOSTNAME:PORT of --listen; --replica-id when given; --advertise recorded as given."""
        self.assertEqual(self.service.replica_id, default_replica_id(5500))
        config = attrs.evolve(self.config, replica_id="cloud-a", advertise="192.0.2.10:5500", name="svc-b")
        service = build_server_service(config, self.reactor)
        self.addCleanup(service.state.close)
        self.assertEqual(service.replica_id, "cloud-a")
        service.startService()
        self.addCleanup(service.stopService)
        [record] = [r for r in self.other_store().live_replicas(datetime.now(UTC)) if r.replica_id == "cloud-a"]
        self.assertEqual(record.advertise, "192.0.2.10:5500")

    def test_sessions_recorded_with_the_replica(self) -> None:
        """A site's session is recorded as one with this replica, and removed when it ends."""
        self.start()
        site, pump = self.dial_site()
        sessions = self.other_store().list_sessions(datetime.now(UTC))
        [session] = sessions["alpha"]
        self.assertEqual((session.replica_id, session.peer), (self.service.replica_id, "192.0.2.7:40123"))
        site.abort()
        pump_all(pump)
        self.assertEqual(self.other_store().list_sessions(datetime.now(UTC)).get("alpha", ()), ())
        record = self.other_store().site("alpha")
        assert record is not None
        self.assertFalse(record.connected)

    def test_site_told_the_replicas(self) -> None:
        """
        A site's session is told the set when it registers (this replica
        alone), and again once the heartbeat reads another replica.
        """
        self.start()
        site, pump = self.dial_site()
        own = self.service.replica_id
        self.assertEqual(site.peer_replicas, Replicas(own, (ReplicaEntry(own),)))
        self.other_store().replica_heartbeat("cloud-b", "198.51.100.2:5500", datetime.now(UTC))
        self.reactor.advance(HEARTBEAT_INTERVAL)
        pump_all(pump)
        self.assertEqual(
            site.peer_replicas, Replicas(own, (ReplicaEntry(own), ReplicaEntry("cloud-b", "198.51.100.2:5500")))
        )
        self.assertEqual(self.service.membership.live, 2)

    def test_site_without_the_capability(self) -> None:
        """A site that does not offer REPLICAS (an older one) is told nothing and served as before."""
        self.start()
        site, pump = self.dial_site(Settings(capabilities=CAP_SERVICES))
        self.other_store().replica_heartbeat("cloud-b", "", datetime.now(UTC))
        self.reactor.advance(HEARTBEAT_INTERVAL)
        pump_all(pump)
        self.assertTrue(site.ready)
        self.assertIsNone(site.peer_replicas)
        self.assertIsNone(site.peer_goaway)
        self.assertIsNotNone(self.service.registry.session_for("alpha"))

    def test_stop_removes_the_replica(self) -> None:
        """A clean stop removes this replica and its sessions from the database."""
        self.start()
        _, pump = self.dial_site()
        self.assertEqual(
            [r.replica_id for r in self.other_store().live_replicas(datetime.now(UTC))], [self.service.replica_id]
        )
        stopped = self.service.stopService()
        pump_all(pump)
        self.successResultOf(stopped)
        self.assertEqual(self.other_store().live_replicas(datetime.now(UTC)), [])
        self.assertEqual(self.other_store().list_sessions(datetime.now(UTC)), {})


class RevocationAmongReplicasTests(SynchronousTestCase):
    def test_heartbeats_reload_nothing_revocation_cuts(self) -> None:
        """
        Other replicas' heartbeats (commits through other connections) do
        not make the revocation poll reload the admission table; a
        revocation through another connection does, at the next poll, and
        cuts the site.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        store = server.fixture.state.store
        watch = RevocationWatch(server.fixture.state, server.registry, server.factory.admission)
        site, _, pump = server.dial(key, cert)
        other = StateStore(store.path, create=False)
        self.addCleanup(other.close)
        loads: list[int] = []
        table = store.admission_table

        def counted() -> dict[str, SiteAdmission]:
            loads.append(1)
            return table()

        store.admission_table = counted  # type: ignore[method-assign]
        for _ in range(3):
            other.replica_heartbeat("cloud-b", "", datetime.now(UTC))
            watch.check()
        self.assertEqual(loads, [])
        other.revoke_site("alpha", datetime.now(UTC))
        other.replica_heartbeat("cloud-b", "", datetime.now(UTC))
        watch.check()
        pump_all(pump)
        self.assertEqual(loads, [1])
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("site-revoked", site.peer_goaway[1])  # type: ignore[index]


class TapOptionTests(SynchronousTestCase):
    def test_replica_options(self) -> None:
        """--replica-id as given; --advertise in canonical form; neither given: None (the defaults apply)."""
        config = parse_server("--state=/s")
        self.assertEqual((config.replica_id, config.advertise), (None, None))
        config = parse_server("--state=/s", "--replica-id=eu-1/w2", "--advertise=[2001:DB8::5]:5500")
        self.assertEqual((config.replica_id, config.advertise), ("eu-1/w2", "[2001:db8::5]:5500"))
        self.assertEqual(parse_server("--state=/s", "--advertise=Cloud-A.Example:443").advertise, "cloud-a.example:443")

    def test_replica_usage_errors(self) -> None:
        """A bad id or address is a usage error saying what is wrong."""
        cases = [
            (("--replica-id=",), "--replica-id '': the replica id is empty"),
            (("--replica-id=a b",), "has ' ' at position 2"),
            (("--replica-id=" + "a" * 65,), "has 65 characters (at most 64)"),
            (("--advertise=cloud-a",), "--advertise: 'cloud-a': expected HOST:PORT"),
            (("--advertise=cloud-a:0",), "--advertise: 'cloud-a:0': port must be a number from 1 to 65535"),
            (("--advertise=::1:5500",), "write IPv6 addresses in brackets"),
        ]
        for argv, message in cases:
            with self.assertRaises(usage.UsageError, msg=repr(argv)) as raised:
                parse_server("--state=/s", *argv)
            self.assertIn(message, str(raised.exception), repr(argv))


class AdmissionAcrossReplicasTests(SynchronousTestCase):
    """
    A site enrolled through another replica (another connection to the
    database) dials this one before its revocation poll has seen the
    enrollment: the refusal the snapshot would give is checked against the
    database first.
    """

    def setUp(self) -> None:
        self.server = Server(self)
        # This replica's own connection and snapshot, loaded before the enrollment below.
        self.state = ServerState.open_existing(self.server.fixture.directory)
        self.addCleanup(self.state.close)
        self.server.factory = TunnelServerFactory(self.state, self.server.registry, self.server.clock, POLICY)
        self.server.accepting = Watching(self.server.factory)

    def test_enrolled_elsewhere_is_admitted(self) -> None:
        """Enrolled through another connection a moment ago: admitted, and the snapshot learns of it."""
        key, cert = self.server.fixture.enroll("alpha")
        self.assertIsNone(self.server.factory.admission.get("alpha"))
        site, _, _ = self.server.dial(key, cert)
        self.assertTrue(site.ready)
        self.assertIsNotNone(self.server.registry.session_for("alpha"))
        admission = self.server.factory.admission.get("alpha")
        assert admission is not None
        self.assertEqual(admission.certificate_fingerprint, certs.fingerprint(cert))

    def test_reenrolled_elsewhere_is_admitted(self) -> None:
        """Enrolled again elsewhere (a new certificate the snapshot does not know yet): admitted."""
        self.server.fixture.enroll("alpha")
        self.server.factory.admission.replace(self.state.store.admission_table())
        key, cert = self.server.fixture.enroll("alpha")
        site, _, _ = self.server.dial(key, cert)
        self.assertTrue(site.ready)

    def test_unknown_to_the_database_too(self) -> None:
        """A certificate of our CA for a site the database does not know either: refused, site-unknown."""
        key, cert = self.server.fixture.certify_without_enrolling("ghost")
        site, _, _ = self.server.dial(key, cert)
        self.assertEqual(site.peer_goaway[0], ErrorCode.NOT_AUTHORIZED)  # type: ignore[index]
        self.assertIn("site-unknown", site.peer_goaway[1])  # type: ignore[index]

    def test_revoked_is_refused_from_memory(self) -> None:
        """A revoked site presenting the certificate the snapshot knows is refused without asking the database."""
        key, cert = self.server.fixture.enroll("alpha")
        self.server.fixture.state.store.revoke_site("alpha", datetime.now(UTC))
        self.server.factory.admission.replace(self.state.store.admission_table())
        asked: list[str] = []
        self.state.store.admission = asked.append  # type: ignore[assignment, method-assign]
        site, _, _ = self.server.dial(key, cert)
        self.assertIn("site-revoked", site.peer_goaway[1])  # type: ignore[index]
        self.assertEqual(asked, [])

    def test_database_down_refuses(self) -> None:
        """The database does not answer: the snapshot decides (a refusal), the connection is not left hanging."""
        key, cert = self.server.fixture.enroll("alpha")
        self.state.store.close()
        site, _, _ = self.server.dial(key, cert)
        self.assertIn("site-unknown", site.peer_goaway[1])  # type: ignore[index]


class RunFirstTests(SynchronousTestCase):
    """StateThread.run_first, which the heartbeat uses, in a real thread."""

    def setUp(self) -> None:
        self.reactor = ThreadedReactor()
        self.database = StateThread(self.reactor, name="first")
        self.database.start()
        self.addCleanup(lambda: self.reactor.wait_for(self.database.stop()))

    def test_ahead_of_queued_jobs(self) -> None:
        """
        Behind a job that holds the thread, the jobs queued wait; a
        run_first job submitted after them runs before them, and its result
        comes back on the reactor.
        """
        gate = threading.Event()
        order: list[str] = []
        self.database.run(gate.wait, 30.0)
        for name in ("a", "b"):
            self.database.run(order.append, name)
        first = self.database.run_first(lambda: order.append("first") or "beat")
        gate.set()
        self.reactor.settle(self.database)
        self.assertEqual(order, ["first", "a", "b"])
        self.assertEqual(self.successResultOf(first), "beat")
        self.assertEqual(self.database.pending, 0)

    def test_alone_and_failing(self) -> None:
        """With nothing queued it runs all the same; its failure is delivered on the reactor."""
        ran = self.database.run_first(threading.get_ident)
        self.reactor.wait_for(ran)
        self.assertNotEqual(self.successResultOf(ran), threading.get_ident())
        failed = self.database.run_first(self.fail_in_thread)
        self.reactor.wait_for(failed)
        self.failureResultOf(failed, StateError)
        self.assertEqual(self.database.pending, 0)

    @staticmethod
    def fail_in_thread() -> None:
        raise StateError("state database is locked")
