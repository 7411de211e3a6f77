"""
The site with a tunnel server that is several replicas: TunnelClientService
on a MemoryReactorClock with a real enrolled site state, its connections
joined in memory (iosim) to tunnel-server ends that announce their replica
set as ReplicaMembership does, behind a stand-in balancer (the keyfile's
address) or at their advertised addresses.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.test.iosim import FakeTransport, IOPump
from twisted.test.iosim import connect as iosim_connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter.protocol import MuxProtocol
from rtunnel.adapter.stream import MuxStream
from rtunnel.address import HostPort
from rtunnel.mux import ErrorCode
from rtunnel.mux.frames import ReplicaEntry, Replicas
from rtunnel.mux.settings import ALL_CAPABILITIES, CAP_SERVICES, Settings
from rtunnel.observe.web import site_not_ready
from rtunnel.roles.reconnect import Phase
from rtunnel.roles.site import ReplicaFigures, SitePolicy, TunnelClientService, Verdict
from rtunnel.roles.target import Target, TargetConnector
from tests.roles_helpers import EndpointMap, ServerFixture

BALANCER = "127.0.0.1:5500"


class Replica:
    """One tunnel-server replica: accepts sessions, tells each the set once the site's HELLO came."""

    def __init__(self, world: World, replica_id: str, advertise: str = "", capable: bool = True) -> None:
        self.world = world
        self.replica_id = replica_id
        self.advertise = advertise
        self.capable = capable
        self.up = True
        #: in the set the replicas announce
        self.listed = True
        #: tells a session nothing when it registers
        self.silent = False
        self.sessions: list[MuxProtocol] = []

    def accept(self) -> MuxProtocol:
        capabilities = ALL_CAPABILITIES if self.capable else CAP_SERVICES
        mux = MuxProtocol(
            initiator=False, clock=self.world.clock, settings=Settings(capabilities=capabilities), label="alpha"
        )
        mux.when_ready().addCallback(self._registered)
        self.sessions.append(mux)
        return mux

    def _registered(self, mux: MuxProtocol) -> None:
        if mux.replicas_negotiated and not self.silent:
            mux.send_replicas(self.world.announcement(self.replica_id))

    def live(self) -> list[MuxProtocol]:
        return [mux for mux in self.sessions if mux.ready]

    def announce(self) -> None:
        """Tell every live session the set again (the set changed)."""
        for mux in self.live():
            if mux.replicas_negotiated:
                mux.send_replicas(self.world.announcement(self.replica_id))

    def kill(self) -> None:
        """Gone at once: every connection reset, no more connections accepted."""
        self.up = False
        for mux in self.sessions:
            transport = mux.transport
            if isinstance(transport, FakeTransport) and not transport.disconnecting:
                transport.disconnectReason = error.ConnectionLost("killed")
                transport.abortConnection()


class World:
    """The replicas, and the way to them: the balancer (round robin, or the picks given) and their own addresses."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        #: the balancer's next picks (replica ids); round robin over those up when empty
        self.picks: list[str] = []
        self._turn = 0
        self.pumps: list[IOPump] = []
        #: (address dialled, replica id reached or None)
        self.connects: list[tuple[str, str | None]] = []

    def add(self, replica_id: str, advertise: str = "", capable: bool = True) -> Replica:
        replica = self.replicas[replica_id] = Replica(self, replica_id, advertise, capable)
        return replica

    def announcement(self, own: str) -> Replicas:
        entries = tuple(
            ReplicaEntry(r.replica_id, r.advertise) for _, r in sorted(self.replicas.items()) if r.listed or r is own
        )
        return Replicas(own, entries)

    def _balance(self) -> Replica | None:
        if self.picks:
            return self.replicas[self.picks.pop(0)]
        up = [r for _, r in sorted(self.replicas.items()) if r.up]
        if not up:
            return None
        replica = up[self._turn % len(up)]
        self._turn += 1
        return replica

    def connect(self, address: str, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        if address == BALANCER:
            replica = self._balance()
        else:
            replica = next((r for r in self.replicas.values() if r.advertise == address), None)
        if replica is None or not replica.up:
            self.connects.append((address, None))
            return defer.fail(error.ConnectionRefusedError(address))
        self.connects.append((address, replica.replica_id))
        site = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500))
        assert site is not None
        server = replica.accept()
        here = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.connects))
        there = IPv4Address("TCP", "127.0.0.1", 5500)
        self.pumps.append(
            iosim_connect(
                server,
                FakeTransport(server, True, hostAddress=there, peerAddress=here),
                site,
                FakeTransport(site, False, hostAddress=here, peerAddress=there),
                greet=False,
                clock=self.clock,
            )
        )
        return defer.succeed(site)

    def pump(self) -> None:
        """Move every byte and every end until nothing moves (timers due now run too)."""
        for _ in range(10_000):
            count = len(self.pumps)
            self.clock.advance(0)
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved and len(self.pumps) == count:
                return
        raise AssertionError("the links never went idle")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()


@implementer(IStreamClientEndpoint)
class WorldEndpoint:
    def __init__(self, world: World, address: str) -> None:
        self.world = world
        self.address = address

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return self.world.connect(self.address, factory)


class InMemorySite(TunnelClientService):
    world: World

    def _tunnel_endpoint(self, address: str) -> IStreamClientEndpoint:
        return WorldEndpoint(self.world, address)


class LogLines:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def at(self, level: LogLevel, containing: str = "") -> list[str]:
        from twisted.logger import formatEvent

        lines = [formatEvent(e) for e in self.events if e.get("log_level") == level]
        return [line for line in lines if containing in line]


class SiteReplicasTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.world = World(self.clock)
        self.log = LogLines(self)
        self.fatal: list[str] = []
        self.targets = EndpointMap()
        fixture = ServerFixture(self)
        self.state = fixture.enrolled_site_state(self, "alpha", (BALANCER,))

    def start(self, services: tuple[tuple[str, HostPort], ...] = ()) -> InMemorySite:
        connector = TargetConnector([Target("10.0.0.5", 554)], self.targets, self.clock)
        policy = SitePolicy(keepalive=None, services=services)
        site = InMemorySite(self.clock, self.state, None, connector, policy, self.fatal.append, jitter=lambda: 0.5)
        site.world = self.world
        site.startService()
        self.addCleanup(self.stop, site)
        self.world.pump()
        return site

    def stop(self, site: TunnelClientService) -> None:
        if site.running:
            site.stopService()
            self.world.pump()

    def tearDown(self) -> None:
        self.assertEqual(self.fatal, [])

    def held(self, site: TunnelClientService) -> dict[str, str]:
        """Replica id -> the replica the session really goes to (checked: its server end is that replica's)."""
        result = {}
        for replica_id, mux in site.sessions.items():
            owner = next(r for r in self.world.replicas.values() if any(self.joined(s, mux) for s in r.sessions))
            result[replica_id] = owner.replica_id
        return result

    def joined(self, server: MuxProtocol, site: MuxProtocol) -> bool:
        return any(p.server is server and p.client is site for p in self.world.pumps)

    # -- a server without the capability -------------------------------------------

    def test_a_server_without_replicas_gets_one_session(self) -> None:
        """As before replicas: one session, kept under "", nothing else dialled, redialled alone when lost."""
        old = self.world.add("old", capable=False)
        site = self.start()
        self.assertEqual(list(site.sessions), [""])
        self.assertIs(site.session, site.sessions[""])
        self.assertEqual(len(site._slots), 1)
        self.world.advance(60)
        self.assertEqual(self.world.connects, [(BALANCER, "old")])
        self.assertEqual(site.replica_figures, ReplicaFigures(sessions=1, replicas=()))
        self.assertIsNone(site_not_ready(site))
        old.kill()
        self.world.pump()
        self.assertEqual(site.sessions, {})
        self.assertIsNotNone(site_not_ready(site))
        self.world.advance(1.5)  # the first retry: 1 s x (1 + jitter 0.5)
        self.assertEqual(self.world.connects[-1], (BALANCER, None))
        old.up = True
        self.world.advance(3.0)
        self.assertEqual(list(site.sessions), [""])
        self.assertEqual(len(site._slots), 1)

    # -- several replicas behind one address ---------------------------------------

    def test_a_session_with_every_replica_behind_the_balancer(self) -> None:
        for name in ("a", "b", "c"):
            self.world.add(name)
        site = self.start()
        self.assertEqual(self.held(site), {"a": "a", "b": "b", "c": "c"})
        self.assertEqual(len(site._slots), 3)
        self.assertEqual(site.replica_figures, ReplicaFigures(3, (("a", True), ("b", True), ("c", True))))
        self.world.advance(120)
        self.assertEqual(len(self.world.connects), 3, "nothing more is dialled once every replica is held")
        self.assertEqual(self.log.at(LogLevel.warn) + self.log.at(LogLevel.error), [])
        self.assertIn("site alpha: the tunnel server has 3 replica(s): a, b, c", self.log.at(LogLevel.info))

    def test_a_duplicate_is_closed_quietly_and_its_slot_backs_off(self) -> None:
        """
        The balancer sends the second dial to the replica held already: that
        session ends with GOAWAY NO_ERROR, logged at info only, and its slot
        dials again after 0.25 s x (1 + jitter), doubling, until it reaches b.
        """
        a, b = self.world.add("a"), self.world.add("b")
        self.world.picks = ["a", "a", "a", "a", "b"]
        site = self.start()
        self.assertEqual(list(site.sessions), ["a"])
        self.assertEqual(self.world.connects, [(BALANCER, "a"), (BALANCER, "a")])
        duplicate = a.sessions[1]
        self.assertEqual(duplicate.peer_goaway, (ErrorCode.NO_ERROR, "already connected to replica a"))
        self.assertTrue(a.sessions[0].ready, "the held session is left alone")
        times = []
        for delay in (0.375, 0.75, 1.5):
            count = len(self.world.connects)
            self.world.advance(delay - 0.01)
            self.assertEqual(len(self.world.connects), count)
            self.world.advance(0.01)
            self.assertEqual(len(self.world.connects), count + 1)
            times.append(delay)
        self.assertEqual(self.world.connects[-1], (BALANCER, "b"))
        self.assertEqual(self.held(site), {"a": "a", "b": "b"})
        self.assertTrue(b.sessions[0].ready)
        self.assertEqual(self.log.at(LogLevel.warn) + self.log.at(LogLevel.error), [])
        closing = self.log.at(LogLevel.info, "already connected to replica a; closing the extra session")
        self.assertEqual(len(closing), 3)
        self.assertEqual(site.figures.reconnects.get("duplicate"), 3)
        # A replica reached resets the slot's duplicate backoff.
        [slot] = [s for s in site._slots.values() if site.replicas.held_by(s.key) == "b"]
        self.assertEqual(slot.duplicates, 0)

    def test_duplicate_backoff_reaches_fifteen_seconds(self) -> None:
        self.world.add("a")
        self.world.add("b")
        self.world.picks = ["a"] * 12 + ["b"]
        site = self.start()
        [slot] = [s for s in site._slots.values() if site.replicas.held_by(s.key) is None]
        for _ in range(10):
            self.world.advance(15.0)
        self.assertEqual(slot.duplicates, 11)
        count = len(self.world.connects)
        self.world.advance(11.24)  # 7.5 x 1.5: the cap's half, spread by the jitter
        self.assertEqual(len(self.world.connects), count)
        self.world.advance(0.02)
        self.assertEqual(len(self.world.connects), count + 1)
        self.assertEqual(self.world.connects[-1], (BALANCER, "b"))
        self.assertEqual(sorted(site.sessions), ["a", "b"])

    def test_advertised_replicas_are_dialled_directly(self) -> None:
        self.world.add("a")
        self.world.add("b", advertise="10.0.0.2:4443")
        self.world.add("c", advertise="10.0.0.3:4443")
        self.world.picks = ["a"]
        site = self.start()
        self.assertEqual(self.held(site), {"a": "a", "b": "b", "c": "c"})
        self.assertEqual(self.world.connects, [(BALANCER, "a"), ("10.0.0.2:4443", "b"), ("10.0.0.3:4443", "c")])

    def test_streams_and_services_on_every_session(self) -> None:
        """Each replica's session serves the streams it opens, and was told the site's services."""
        for name in ("a", "b"):
            self.world.add(name)
        site = self.start(services=(("web", HostPort("10.0.0.7", 80)),))
        self.assertEqual(sorted(site.sessions), ["a", "b"])
        for replica in self.world.replicas.values():
            [server] = replica.live()
            services = self.successResultOf(server.when_services())
            self.assertEqual(dict(services or {}), {"web": HostPort("10.0.0.7", 80)})
            stream: MuxStream = server.open_stream("10.0.0.5", 554)
            self.world.pump()
            self.assertIsNotNone(stream)
        self.assertEqual(self.targets.requested, [("10.0.0.5", 554), ("10.0.0.5", 554)])

    def test_a_replica_killed_is_redialled_and_the_others_go_on(self) -> None:
        self.world.add("a")
        b = self.world.add("b")
        site = self.start()
        kept = site.sessions["a"]
        b.kill()
        self.world.pump()
        self.assertEqual(list(site.sessions), ["a"])
        self.assertIs(site.sessions["a"], kept)
        self.assertTrue(kept.accepting_streams)
        self.assertIsNone(site_not_ready(site))
        self.assertEqual(site.replica_figures, ReplicaFigures(1, (("a", True), ("b", False))))
        # Its slot dials again with the usual backoff; the balancer has only a now: duplicates.
        self.world.advance(1.5)
        self.assertEqual(self.world.connects[-1], (BALANCER, "a"))
        self.assertIs(site.sessions["a"], kept)
        # b comes back: reached again.
        b.up = True
        for _ in range(6):
            self.world.advance(1.0)
        self.world.picks = ["b"]
        self.world.advance(15.0)
        self.assertEqual(self.held(site), {"a": "a", "b": "b"})
        self.assertIs(site.sessions["a"], kept)

    def test_a_replica_back_under_the_same_id_is_dialled_at_once_when_the_set_is_told_again(self) -> None:
        """
        While b is down every dial for it lands on a (duplicates, the backoff
        growing); once b is back, the set told again by a (as a replica that
        starts again makes the others do) has the slot dial within 1-2 s, not
        after the backoff's up to 15 s.
        """
        a = self.world.add("a")
        b = self.world.add("b")
        site = self.start()
        b.kill()
        self.world.pump()
        for _ in range(5):
            self.world.advance(15.0)  # every dial lands on a: duplicates
        [slot] = [s for s in site._slots.values() if site.replicas.held_by(s.key) is None]
        self.assertGreaterEqual(slot.duplicates, 5)
        waiting = slot.client._retry
        assert waiting is not None
        self.assertGreater(waiting.getTime() - self.clock.seconds(), 3.0)
        b.up = True
        self.world.picks = ["b"]
        a.announce()
        self.world.pump()
        self.assertEqual(slot.duplicates, 0)
        self.assertEqual(
            self.log.at(LogLevel.info, "dialling for a replica not connected yet now")[-1:],
            ["site alpha: the replica set was told again; dialling for a replica not connected yet now"],
        )
        self.world.advance(1.49)  # 1 s + the jitter's 0.5 of 1 s
        self.assertEqual(sorted(site.sessions), ["a"])
        self.world.advance(0.02)
        self.assertEqual(self.held(site), {"a": "a", "b": "b"})
        # Told again with nothing waiting: nothing to hurry.
        count = len(self.world.connects)
        a.announce()
        self.world.advance(20.0)
        self.assertEqual(len(self.world.connects), count)

    def test_a_replica_dropped_from_the_set_is_not_redialled(self) -> None:
        a, b = self.world.add("a"), self.world.add("b")
        site = self.start()
        b.kill()
        b.listed = False
        a.announce()
        self.world.pump()
        self.assertEqual(site.replicas.missing(), [])
        self.assertEqual(len(site._slots), 1, "the slot that held b stopped")
        count = len(self.world.connects)
        self.world.advance(120)
        self.assertEqual(len(self.world.connects), count)
        self.assertEqual(site.replica_figures, ReplicaFigures(1, (("a", True),)))

    def test_a_held_replica_dropped_from_the_set_keeps_its_session(self) -> None:
        """Dropped while its session lives (its heartbeat late): it stays, and is not redialled once it ends."""
        a, b = self.world.add("a"), self.world.add("b")
        site = self.start()
        b.listed = False
        a.announce()
        self.world.pump()
        self.assertEqual(sorted(site.sessions), ["a", "b"])
        [server] = b.live()
        server.drain(1.0, "replica stopping")
        self.world.pump()
        self.assertEqual(list(site.sessions), ["a"])
        self.assertEqual(len(site._slots), 1)
        count = len(self.world.connects)
        self.world.advance(60)
        self.assertEqual(len(self.world.connects), count)

    def test_a_session_not_needed_any_more_is_drained_quietly(self) -> None:
        """
        A slot's session that has not said which replica it is yet, when
        every replica is held meanwhile: its slot stops, the session is
        drained (GOAWAY GOING_AWAY, "not needed"), nothing warned.
        """
        a, b = self.world.add("a"), self.world.add("b")
        b.silent = True
        site = self.start()
        self.assertEqual(list(site.sessions), ["a"])
        [pending] = b.live()
        self.assertEqual(len(site._slots), 2)
        b.listed = False
        a.announce()
        self.world.pump()
        self.assertEqual(len(site._slots), 1)
        self.assertEqual(pending.peer_goaway, (ErrorCode.GOING_AWAY, "not needed: connected to every replica"))
        self.assertFalse(pending.ready)
        self.assertEqual(self.log.at(LogLevel.warn) + self.log.at(LogLevel.error), [])
        self.assertEqual(site.replica_figures, ReplicaFigures(1, (("a", True),)))
        count = len(self.world.connects)
        self.world.advance(60)
        self.assertEqual(len(self.world.connects), count)

    def test_a_replica_joining_is_dialled(self) -> None:
        a = self.world.add("a")
        site = self.start()
        self.assertEqual(list(site.sessions), ["a"])
        self.world.add("b")
        a.announce()
        self.world.pump()
        self.assertEqual(self.held(site), {"a": "a", "b": "b"})

    def test_a_takeover_by_the_replica(self) -> None:
        """
        A replica that ends the held session when the new one registers
        (SESSION_REPLACED): the new session holds the replica, the old
        slot dials for what is missing.
        """
        a = self.world.add("a")
        self.world.add("b")
        self.world.picks = ["a", "a", "b"]

        original = a.accept

        def taking_over() -> MuxProtocol:
            for old in a.live():
                old.terminate(ErrorCode.SESSION_REPLACED, "a newer session of this site took over")
            return original()

        a.accept = taking_over  # type: ignore[method-assign]
        site = self.start()
        self.assertEqual(list(site.sessions), ["a"])
        self.assertIs(site.sessions["a"], self.peer_of(a.sessions[1], site))
        self.world.advance(1.5)
        self.assertEqual(self.held(site), {"a": "a", "b": "b"})
        self.assertEqual(len(site._slots), 2)

    def peer_of(self, server: MuxProtocol, site: TunnelClientService) -> MuxProtocol:
        [pump] = [p for p in self.world.pumps if p.server is server]
        client = pump.client
        assert isinstance(client, MuxProtocol)
        return client

    # -- stopping -------------------------------------------------------------------

    def test_stop_drains_every_session(self) -> None:
        for name in ("a", "b", "c"):
            self.world.add(name)
        site = self.start()
        done = site.stopService()
        self.assertNoResult(done)
        self.world.pump()
        self.successResultOf(done)
        for replica in self.world.replicas.values():
            [server] = replica.sessions
            self.assertEqual(server.peer_goaway, (ErrorCode.GOING_AWAY, "site shutting down"))
            self.assertFalse(server.ready)
        self.assertTrue(all(slot.client.phase is Phase.STOPPED for slot in site._slots.values()))
        count = len(self.world.connects)
        self.world.advance(60)
        self.assertEqual(len(self.world.connects), count)

    def test_a_refusal_from_any_replica_is_fatal_and_stops_every_slot(self) -> None:
        for name in ("a", "b"):
            self.world.add(name)
        site = self.start()
        [server] = self.world.replicas["b"].live()
        server.terminate(ErrorCode.NOT_AUTHORIZED, "site revoked")
        self.world.pump()
        self.assertEqual(self.fatal, ["tunnel server refused site alpha: site revoked"])
        self.fatal.clear()
        self.assertTrue(all(not slot.client.running for slot in site._slots.values()))

    def test_last_outcome_of_a_duplicate(self) -> None:
        self.world.add("a")
        self.world.add("b")
        self.world.picks = ["a", "a"]
        site = self.start()
        outcomes = [f.last_outcome for f in site.factories if f.last_outcome is not None]
        self.assertEqual([o.verdict for o in outcomes], [Verdict.DUPLICATE])
