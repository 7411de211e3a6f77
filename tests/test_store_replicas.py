"""
The state store's replicas (issue 13): each tunnel server replica records
itself with a heartbeat and is dropped when it stops; a site's sessions are
recorded per replica and count only while their replica is live; forward
states are recorded per replica and listed as one state per forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from twisted.logger import formatEvent, globalLogPublisher

from rtunnel.identity.errors import SiteNotFound, StateError
from rtunnel.identity.store import (
    HEARTBEAT_INTERVAL,
    REPLICA_TIMEOUT,
    SOURCE_COMMAND_LINE,
    SOURCE_DATABASE,
    STATE_NOT_RUNNING,
    STATE_PENDING,
    ForwardConflict,
    ForwardRecord,
    ForwardState,
    SessionRecord,
    StateStore,
)
from tests.helpers_identity import NOW, later
from tests.test_store import _Site, _StoreTestCase


def _started(store: StateStore, replica_id: str, at: float = 0, advertise: str = "") -> None:
    store.replica_started(replica_id, advertise, 1000 + len(replica_id), f"host-{replica_id}", later(at))


def _state(port: int, state: str, source: str = SOURCE_DATABASE) -> ForwardState:
    return ForwardState("127.0.0.1", port, "alpha", "10.0.0.5", 80, source, state)


class _ReplicaTestCase(_StoreTestCase):
    #: seconds after NOW: the stores' clock, for the calls not given a time
    clock_at = 0.0

    def open(self, **kwargs: object) -> StateStore:
        kwargs.setdefault("clock", lambda: later(self.clock_at))
        return super().open(**kwargs)

    def setUp(self) -> None:
        super().setUp()
        self.enroll(_Site("alpha"))
        self.enroll(_Site("beta"))
        #: a second connection to the same database, as another replica's
        self.other = self.open()

    def states(self, at: float) -> list[tuple[int, str, str]]:
        return [(f.port, f.source, f.state) for f in self.store.list_forwards(later(at))]


class HeartbeatTests(_ReplicaTestCase):
    def test_constants(self) -> None:
        """A replica is dropped after six heartbeats missed, not one."""
        self.assertEqual((HEARTBEAT_INTERVAL, REPLICA_TIMEOUT), (1.0, 6.0))

    def test_live_set_follows_heartbeats(self) -> None:
        """
        A replica is live while its last heartbeat is at most the timeout
        old; expire deletes the others and names them; each row holds what
        the replica recorded.
        """
        _started(self.store, "a", advertise="192.0.2.1:5500")
        _started(self.other, "b")
        self.store.replica_heartbeat("a", "192.0.2.1:5500", later(5))
        self.assertEqual([r.replica_id for r in self.store.live_replicas(later(6))], ["a", "b"])
        self.assertEqual([r.replica_id for r in self.store.live_replicas(later(6.5))], ["a"])
        self.assertEqual([r.replica_id for r in self.store.live_replicas(later(7), timeout=10)], ["a", "b"])
        [a] = self.other.live_replicas(later(6.5))
        self.assertEqual(
            (a.advertise, a.pid, a.host, a.started_at, a.heartbeat_at),
            ("192.0.2.1:5500", 1001, "host-a", NOW, later(5)),
        )
        self.assertEqual(self.store.expire_replicas(later(6.5)), ["b"])
        self.assertEqual(self.store.expire_replicas(later(6.5)), [])
        self.assertEqual([r.replica_id for r in self.store.live_replicas(later(0))], ["a"])
        self.assertEqual(self.store.expire_replicas(later(20)), ["a"])
        self.assertEqual(self.store.live_replicas(later(0)), [])

    def test_heartbeat_changes_the_advertised_address(self) -> None:
        _started(self.store, "a")
        self.store.replica_heartbeat("a", "[::1]:5501", later(1))
        [a] = self.other.live_replicas(later(1))
        self.assertEqual(a.advertise, "[::1]:5501")

    def test_stop_deletes_the_replica(self) -> None:
        """A replica that stops cleanly leaves at once: no row, no session, no forward state."""
        _started(self.store, "a")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.store.record_forward_states([_state(8080, "listening")], later(1), replica_id="a")
        self.store.replica_stopped("a", later(2))
        self.assertEqual(self.other.live_replicas(later(2)), [])
        self.assertEqual(self.other.list_sessions(later(2)), {})
        self.assertEqual(self.store._db.execute("SELECT count(*) FROM forward_states").fetchone()[0], 0)
        alpha = self.other.site("alpha", later(2))
        assert alpha is not None
        self.assertEqual((alpha.connected, alpha.last_seen), (False, later(2)))

    def test_a_replica_start_ends_the_single_server_record(self) -> None:
        """
        The connection flags of a server older than replicas count while its
        recorded process runs, until a replica starts on the database.
        """
        self.alive.add(4242)
        self.store.record_server_start(4242, NOW)
        self.store.mark_connected("alpha", "192.0.2.9:40000", NOW)
        self.assertEqual([s.name for s in self.other.list_sites() if s.connected], ["alpha"])
        self.assertTrue(self.other.server_running())
        _started(self.other, "a")
        self.assertEqual([s.name for s in self.other.list_sites() if s.connected], [])
        self.assertIsNone(self.store.get_meta("server_pid"))

    def test_replica_ids_are_not_empty(self) -> None:
        self.assertRaises(ValueError, self.store.replica_started, "", "", 1, "h", NOW)
        self.assertRaises(ValueError, self.store.replica_heartbeat, "", "", NOW)
        self.assertRaises(ValueError, self.store.session_opened, "alpha", "", "192.0.2.9:1", NOW)


class SessionTests(_ReplicaTestCase):
    def test_sessions_with_two_replicas(self) -> None:
        """
        A site with sessions on two replicas is connected while either is
        open, from its oldest session's peer; each replica's sessions are
        its own.
        """
        _started(self.store, "a")
        _started(self.other, "b")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.other.session_opened("alpha", "b", "192.0.2.9:40001", later(2))
        self.other.session_opened("beta", "b", "192.0.2.10:40000", later(2))
        alpha = self.store.site("alpha", later(3))
        assert alpha is not None
        self.assertEqual(
            alpha.sessions,
            (
                SessionRecord("a", "192.0.2.9:40000", later(1)),
                SessionRecord("b", "192.0.2.9:40001", later(2)),
            ),
        )
        self.assertEqual((alpha.connected, alpha.peer, alpha.connected_since), (True, "192.0.2.9:40000", later(1)))
        self.assertEqual(self.store.list_sites(later(3))[0], alpha)
        self.assertEqual(
            {site: [s.replica_id for s in sessions] for site, sessions in self.other.list_sessions(later(3)).items()},
            {"alpha": ["a", "b"], "beta": ["b"]},
        )
        self.store.session_closed("alpha", "a", later(4))
        alpha = self.other.site("alpha", later(4))
        assert alpha is not None
        self.assertEqual(
            (alpha.connected, alpha.peer, [s.replica_id for s in alpha.sessions]), (True, "192.0.2.9:40001", ["b"])
        )
        self.other.session_closed("alpha", "b", later(5))
        alpha = self.store.site("alpha", later(5))
        assert alpha is not None
        self.assertEqual((alpha.connected, alpha.sessions, alpha.last_seen), (False, (), later(5)))
        self.assertEqual(self.store._db.execute("SELECT connected FROM sites WHERE name = 'alpha'").fetchone()[0], 0)

    def test_a_session_counts_only_with_a_live_replica(self) -> None:
        """A replica that stopped sending heartbeats (killed) no longer holds its sites connected."""
        _started(self.store, "a")
        _started(self.other, "b")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.other.session_opened("beta", "b", "192.0.2.10:40000", later(1))
        self.other.replica_heartbeat("b", "", later(6))
        sites = {r.name: r for r in self.other.list_sites(later(6.5))}
        self.assertEqual((sites["alpha"].connected, sites["alpha"].sessions), (False, ()))
        self.assertTrue(sites["beta"].connected)
        self.assertEqual(list(self.other.list_sessions(later(6.5))), ["beta"])
        self.assertFalse(self.other.server_running(later(13)))
        self.assertTrue(self.other.server_running(later(12)))

    def test_expired_replica_takes_its_sessions_along(self) -> None:
        """Expiry deletes the dead replica's sessions; its sites are last seen at its last heartbeat."""
        _started(self.store, "a")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.store.replica_heartbeat("a", "", later(2))
        _started(self.other, "b", at=10)
        self.assertEqual(self.other.expire_replicas(later(10)), ["a"])
        count = self.store._db.execute("SELECT count(*) FROM site_sessions").fetchone()[0]
        self.assertEqual(count, 0)
        alpha = self.other.site("alpha", later(10))
        assert alpha is not None
        self.assertEqual((alpha.connected, alpha.last_seen), (False, later(2)))

    def test_restart_with_the_same_id_clears_stale_sessions(self) -> None:
        """
        A replica killed and started again with its id: the sessions and
        forward states of its earlier run are gone, the site disconnected
        (last seen at the earlier run's last heartbeat); the other replicas'
        stay.
        """
        _started(self.store, "a")
        _started(self.other, "b")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.store.session_opened("beta", "a", "192.0.2.10:40000", later(1))
        self.other.session_opened("beta", "b", "192.0.2.10:40001", later(1))
        self.store.record_forward_states([_state(8080, "listening")], later(1), replica_id="a")
        self.other.record_forward_states([_state(8080, "listening")], later(1), replica_id="b")
        self.store.replica_heartbeat("a", "", later(3))
        restarted = self.open()
        _started(restarted, "a", at=4)
        sites = {r.name: r for r in restarted.list_sites(later(4))}
        self.assertEqual((sites["alpha"].connected, sites["alpha"].last_seen), (False, later(3)))
        self.assertEqual([s.replica_id for s in sites["beta"].sessions], ["b"])
        rows = self.store._db.execute("SELECT replica_id FROM forward_states").fetchall()
        self.assertEqual([r[0] for r in rows], ["b"])
        [a] = [r for r in restarted.live_replicas(later(4)) if r.replica_id == "a"]
        self.assertEqual(a.started_at, later(4))

    def test_unknown_site(self) -> None:
        """A session of a site the database does not know is refused, and nothing is recorded."""
        _started(self.store, "a")
        self.assertRaises(SiteNotFound, self.store.session_opened, "gamma", "a", "192.0.2.9:1", NOW)
        self.assertEqual(self.store.list_sessions(NOW), {})
        # nor written back by a heartbeat
        self.store.expire_replicas(later(100))
        self.store.replica_heartbeat("a", "", later(101))
        self.assertEqual(self.store.list_sessions(later(101)), {})

    def test_a_reopened_session_replaces_the_earlier(self) -> None:
        _started(self.store, "a")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.store.session_opened("alpha", "a", "192.0.2.9:40002", later(2))
        self.assertEqual(
            self.store.list_sessions(later(2)), {"alpha": (SessionRecord("a", "192.0.2.9:40002", later(2)),)}
        )


class RestoreTests(_ReplicaTestCase):
    """
    A replica that another expired (its heartbeats late: a stall, the
    database out of reach) is written back whole by its next heartbeat, and
    so is what its failed writes missed.
    """

    def logged(self) -> list[str]:
        """The store's log lines from now on."""
        lines: list[str] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "rtunnel.identity.store":
                lines.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    def test_expired_by_another_then_back(self) -> None:
        logged = self.logged()
        _started(self.store, "a")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(1))
        self.store.session_opened("beta", "a", "192.0.2.10:40000", later(1))
        self.store.session_closed("beta", "a", later(2))
        self.store.reset_forward_states([_state(9000, "listening", SOURCE_COMMAND_LINE)], later(1), replica_id="a")
        self.store.record_forward_states([_state(8080, "listening")], later(2), replica_id="a")
        _started(self.other, "b", at=10)
        self.assertEqual(self.other.expire_replicas(later(10)), ["a"])
        self.assertEqual(self.other.list_sessions(later(10)), {})
        self.store.replica_heartbeat("a", "", later(11))
        [a, _] = self.other.live_replicas(later(11))
        self.assertEqual((a.replica_id, a.pid, a.host, a.started_at), ("a", 1001, "host-a", NOW))
        self.assertEqual(
            self.other.list_sessions(later(11)), {"alpha": (SessionRecord("a", "192.0.2.9:40000", later(1)),)}
        )
        alpha = self.other.site("alpha", later(11))
        assert alpha is not None
        self.assertTrue(alpha.connected)
        rows = self.other._db.execute("SELECT port, source, state FROM forward_states ORDER BY port").fetchall()
        self.assertEqual(
            [tuple(r) for r in rows], [(8080, SOURCE_DATABASE, "listening"), (9000, SOURCE_COMMAND_LINE, "listening")]
        )
        self.assertEqual(
            logged,
            ["state database: replica a written back with its 1 site session(s) (another process had dropped it)"],
        )

    def test_start_retried_keeps_what_was_recorded_meanwhile(self) -> None:
        """
        A replica whose start failed to be written retries it; the sessions
        it recorded in between stay (those of an earlier process go).
        """
        _started(self.other, "a")
        self.other.session_opened("beta", "a", "192.0.2.10:40000", later(1))  # an earlier process of a
        with self.database_down():
            self.assertRaises(StateError, _started, self.store, "a", 2)
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(3))
        _started(self.store, "a", at=4)
        self.assertEqual(list(self.other.list_sessions(later(4))), ["alpha"])
        [a] = self.other.live_replicas(later(4))
        self.assertEqual((a.started_at, a.heartbeat_at), (later(2), later(4)))

    def test_written_before_the_start(self) -> None:
        """
        A site that connects, and forwards recorded, before the replica's
        start is written (its first heartbeat, queued behind them) stay:
        the start drops only what an earlier process left.
        """
        _started(self.other, "a")
        self.other.session_opened("beta", "a", "192.0.2.10:40000", later(1))  # an earlier process of a
        self.store.reset_forward_states([_state(9000, "listening", SOURCE_COMMAND_LINE)], later(2), replica_id="a")
        self.store.session_opened("alpha", "a", "192.0.2.9:40000", later(2))
        _started(self.store, "a", at=3)
        self.assertEqual(list(self.other.list_sessions(later(3))), ["alpha"])
        self.assertEqual(self.states(3), [(9000, SOURCE_COMMAND_LINE, "listening")])
        [a] = self.other.live_replicas(later(3))
        self.assertEqual((a.pid, a.started_at), (1001, later(3)))

    def test_heartbeat_of_a_replica_this_connection_did_not_start(self) -> None:
        """Another connection's heartbeat makes the row again, without what it cannot know."""
        _started(self.store, "a")
        self.store.expire_replicas(later(10))
        self.other.replica_heartbeat("a", "192.0.2.1:5500", later(11))
        [a] = self.store.live_replicas(later(11))
        self.assertEqual((a.advertise, a.pid, a.host, a.started_at), ("192.0.2.1:5500", None, None, later(11)))

    @contextmanager
    def database_down(self) -> Iterator[None]:
        """Every write through C{self.store} fails, as with the database out of reach."""

        @contextmanager
        def failing() -> Iterator[None]:
            raise StateError("state database: connection refused")
            yield

        self.patch(self.store, "_transaction", failing)
        try:
            yield
        finally:
            del self.store._transaction

    def test_failed_writes_are_made_good(self) -> None:
        """Sessions opened and closed while writes failed are right in the database after the next heartbeat."""
        logged = self.logged()
        _started(self.store, "a")
        self.store.session_opened("beta", "a", "192.0.2.10:40000", later(1))
        with self.database_down():
            self.assertRaises(StateError, self.store.session_opened, "alpha", "a", "192.0.2.9:40000", later(2))
            self.assertRaises(StateError, self.store.session_closed, "beta", "a", later(2))
            self.assertRaises(StateError, self.store.record_forward_states, [_state(8080, "listening")], later(2), "a")
        self.assertEqual(list(self.other.list_sessions(later(2))), ["beta"])
        self.store.replica_heartbeat("a", "", later(3))
        self.assertEqual(list(self.other.list_sessions(later(3))), ["alpha"])
        self.assertEqual(self.states(3), [])  # no stored forward: the state alone is not listed
        count = self.other._db.execute("SELECT count(*) FROM forward_states WHERE replica_id = 'a'").fetchone()[0]
        self.assertEqual(count, 1)
        self.assertEqual(
            logged, ["state database: replica a written back with its 1 site session(s) (writes had failed)"]
        )
        # once made good, a heartbeat writes only the heartbeat
        self.other._db.execute("DELETE FROM site_sessions")
        self.store.replica_heartbeat("a", "", later(4))
        self.assertEqual(self.other.list_sessions(later(4)), {})


class ForwardStateTests(_ReplicaTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store.add_forward(ForwardRecord("127.0.0.1", 8080, "alpha", "10.0.0.5", 80), NOW)

    def test_one_state_per_forward(self) -> None:
        """
        The live replicas' reports agree: that state; they differ: mixed,
        naming each; a replica that died no longer counts.
        """
        self.assertEqual(self.states(0), [(8080, SOURCE_DATABASE, STATE_NOT_RUNNING)])
        _started(self.store, "a")
        _started(self.other, "b")
        self.assertEqual(self.states(0), [(8080, SOURCE_DATABASE, STATE_PENDING)])
        self.store.record_forward_states([_state(8080, "listening")], later(1), replica_id="a")
        self.assertEqual(self.states(1), [(8080, SOURCE_DATABASE, "listening")])
        self.other.record_forward_states([_state(8080, "listening")], later(1), replica_id="b")
        self.assertEqual(self.states(1), [(8080, SOURCE_DATABASE, "listening")])
        self.other.record_forward_states([_state(8080, "failed: address in use")], later(2), replica_id="b")
        self.assertEqual(self.states(2), [(8080, SOURCE_DATABASE, "mixed: a listening, b failed: address in use")])
        self.store.replica_heartbeat("a", "", later(6))
        self.assertEqual(self.states(7), [(8080, SOURCE_DATABASE, "listening")])

    def test_command_line_forwards_of_every_replica(self) -> None:
        """Each replica's command-line forwards are listed once per forward, while their replica lives."""
        _started(self.store, "a")
        _started(self.other, "b")
        self.store.reset_forward_states([_state(9000, "listening", SOURCE_COMMAND_LINE)], NOW, replica_id="a")
        self.other.reset_forward_states(
            [_state(9000, "listening", SOURCE_COMMAND_LINE), _state(9001, "listening", SOURCE_COMMAND_LINE)],
            NOW,
            replica_id="b",
        )
        self.assertEqual(
            self.states(1),
            [
                (8080, SOURCE_DATABASE, STATE_PENDING),
                (9000, SOURCE_COMMAND_LINE, "listening"),
                (9001, SOURCE_COMMAND_LINE, "listening"),
            ],
        )
        # b's next run has no --forward on 9001: its reset forgets only its own
        self.other.reset_forward_states([], later(1), replica_id="b")
        self.assertEqual([port for port, _, _ in self.states(1)], [8080, 9000])
        self.store.replica_heartbeat("a", "", later(5))
        self.assertEqual(self.states(12), [(8080, SOURCE_DATABASE, STATE_NOT_RUNNING)])

    def test_command_line_forward_of_a_live_replica_conflicts(self) -> None:
        """A port a live replica's --forward holds cannot be stored; once that replica is gone it can."""
        _started(self.store, "a")
        self.store.reset_forward_states([_state(9000, "listening", SOURCE_COMMAND_LINE)], NOW, replica_id="a")
        record = ForwardRecord("127.0.0.1", 9000, "beta", "h", 1)
        error = self.assertRaises(ForwardConflict, self.other.add_forward, record, later(1))
        self.assertIn("--forward 127.0.0.1:9000:alpha:10.0.0.5:80", str(error))
        self.other.add_forward(record, later(10))

    def test_removed_forward_goes_once_every_live_replica_closed_it(self) -> None:
        _started(self.store, "a")
        _started(self.other, "b")
        for store, replica in ((self.store, "a"), (self.other, "b")):
            store.record_forward_states([_state(8080, "listening")], NOW, replica_id=replica)
        self.store.remove_forward("127.0.0.1", 8080, cut=True)
        self.store.forget_removed_forwards([("127.0.0.1", 8080)], replica_id="a")
        [kept] = self.store.stored_forwards()
        self.assertTrue(kept.removed and kept.cut)
        self.other.forget_removed_forwards([("127.0.0.1", 8080)], replica_id="b")
        self.assertEqual(self.store.stored_forwards(), [])
        self.assertEqual(self.store._db.execute("SELECT count(*) FROM forward_states").fetchone()[0], 0)
