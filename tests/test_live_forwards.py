"""
Forwards managed live: the store's forward tables (real SQLite in temporary
directories) and the server's apply logic (L{LiveForwards} on a
L{MemoryReactorClock}, with real loopback sockets where the failure to
listen must be the kernel's own).
"""

from __future__ import annotations

import errno
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.identity.store import (
    SOURCE_COMMAND_LINE,
    SOURCE_DATABASE,
    STATE_NOT_RUNNING,
    STATE_PENDING,
    ForwardConflict,
    ForwardRecord,
    ForwardState,
    StateStore,
)
from rtunnel.roles.forward import ForwardFactory, ForwardSpec
from rtunnel.roles.live_forwards import LiveForwards, listen_failure_reason, spec_text
from rtunnel.roles.registry import SiteRegistry
from rtunnel.roles.server import StateThread
from tests.roles_helpers import ServerFixture, temp_dir

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _record(text: str) -> ForwardRecord:
    spec = ForwardSpec.parse(text)
    return ForwardRecord(spec.bind, spec.port, spec.site, spec.target.host, spec.target.port)


class StoreTests(SynchronousTestCase):
    """The forwards and forward_states tables, as the CLI and the server use them."""

    def setUp(self) -> None:
        self.path = os.path.join(temp_dir(self), "state.sqlite3")
        self.alive = True
        self.store = StateStore(self.path, process_alive=lambda pid: self.alive)
        self.addCleanup(self.store.close)
        self.store.record_server_start(4242, NOW)

    def other(self) -> StateStore:
        """Another connection to the same file, as the server's."""
        store = StateStore(self.path, create=False, process_alive=lambda pid: self.alive)
        self.addCleanup(store.close)
        return store

    def test_added_forward_is_pending_until_the_server_reports(self) -> None:
        """A stored forward is listed `pending` until the running server records its state."""
        self.store.add_forward(_record("8080:alpha:10.0.0.5:80"), NOW)
        [listed] = self.store.list_forwards()
        self.assertEqual(
            (listed.spec, listed.source, listed.state),
            ("127.0.0.1:8080:alpha:10.0.0.5:80", SOURCE_DATABASE, STATE_PENDING),
        )
        state = ForwardState("127.0.0.1", 8080, "alpha", "10.0.0.5", 80, SOURCE_DATABASE, "listening")
        self.other().record_forward_states([state], NOW)
        self.assertEqual([f.state for f in self.store.list_forwards()], ["listening"])

    def test_not_running_hides_stale_states(self) -> None:
        """
        With the recorded server gone, stored forwards are `not running` and
        command-line ones are not listed: what that server reported is stale.
        """
        self.store.add_forward(_record("8080:alpha:h:1"), NOW)
        states = [
            ForwardState("127.0.0.1", 8080, "alpha", "h", 1, SOURCE_DATABASE, "listening"),
            ForwardState("127.0.0.1", 9090, "alpha", "h", 2, SOURCE_COMMAND_LINE, "listening"),
        ]
        self.store.reset_forward_states(states, NOW)
        self.assertEqual(len(self.store.list_forwards()), 2)
        self.alive = False
        self.assertEqual(
            [(f.port, f.state) for f in self.store.list_forwards()],
            [(8080, STATE_NOT_RUNNING)],
        )

    def test_version_moves_with_every_change(self) -> None:
        """Adding and removing move the forwards version; forgetting applied removals does not."""
        versions = [self.store.forwards_version()]
        self.store.add_forward(_record("8080:alpha:h:1"), NOW)
        versions.append(self.store.forwards_version())
        self.store.remove_forward("127.0.0.1", 8080, cut=True)
        versions.append(self.store.forwards_version())
        self.assertEqual(versions, [0, 1, 2])
        [removed] = self.store.stored_forwards()
        self.assertTrue(removed.removed and removed.cut)
        self.assertEqual(self.store.list_forwards(), [])
        self.other().forget_removed_forwards([removed.key])
        self.assertEqual(self.store.stored_forwards(), [])
        self.assertEqual(self.store.forwards_version(), 2)

    def test_remove_without_a_server_deletes_at_once(self) -> None:
        """No server runs to apply the removal: the row goes at once."""
        self.alive = False
        self.store.add_forward(_record("[::1]:8080:alpha:h:1"), NOW)
        removed = self.store.remove_forward("::1", 8080, cut=False)
        self.assertEqual(removed.spec, "[::1]:8080:alpha:h:1")
        self.assertEqual(self.store.stored_forwards(), [])

    def test_same_port_twice_is_refused_naming_the_first(self) -> None:
        self.store.add_forward(_record("8080:alpha:h:1"), NOW)
        with self.assertRaises(ForwardConflict) as caught:
            self.store.add_forward(_record("127.0.0.1:8080:beta:h:2"), NOW)
        self.assertIn("127.0.0.1:8080:alpha:h:1", str(caught.exception))

    def test_readded_after_removal_replaces_the_removed_row(self) -> None:
        """Removed, not yet applied, added again: the new one stands and survives the forgetting."""
        self.store.add_forward(_record("8080:alpha:h:1"), NOW)
        self.store.remove_forward("127.0.0.1", 8080, cut=True)
        self.store.add_forward(_record("8080:beta:h:2"), NOW)
        self.store.forget_removed_forwards([("127.0.0.1", 8080)])
        [stored] = self.store.stored_forwards()
        self.assertEqual((stored.site, stored.removed, stored.cut), ("beta", False, False))

    def test_command_line_port_of_a_running_server_is_refused(self) -> None:
        """Both forwards are named: the one asked for and the server's --forward."""
        state = ForwardState("127.0.0.1", 8080, "alpha", "h", 1, SOURCE_COMMAND_LINE, "listening")
        self.other().reset_forward_states([state], NOW)
        with self.assertRaises(ForwardConflict) as caught:
            self.store.add_forward(_record("8080:beta:h:2"), NOW)
        message = str(caught.exception)
        self.assertIn("127.0.0.1:8080:beta:h:2", message)
        self.assertIn("--forward 127.0.0.1:8080:alpha:h:1", message)
        with self.assertRaises(ForwardConflict) as removing:
            self.store.remove_forward("127.0.0.1", 8080, cut=False)
        self.assertIn("command-line forward --forward 127.0.0.1:8080:alpha:h:1", str(removing.exception))
        # A server that is gone listens nowhere: the port is free to store.
        self.alive = False
        self.store.add_forward(_record("8080:beta:h:2"), NOW)

    def test_unknown_forward_cannot_be_removed(self) -> None:
        with self.assertRaises(ForwardConflict) as caught:
            self.store.remove_forward("127.0.0.1", 8080, cut=False)
        self.assertIn("no forward on 127.0.0.1:8080", str(caught.exception))

    def test_tables_are_added_to_an_older_database(self) -> None:
        """A database made before the forward tables existed gets them on open, its data kept."""
        self.store.create_token("alpha", timedelta(hours=1), NOW)
        self.store._db.execute("DROP TABLE forwards")
        self.store._db.execute("DROP TABLE forward_states")
        self.store._db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")  # as such a database says
        reopened = self.other()
        self.assertEqual(reopened.stored_forwards(), [])
        self.assertEqual([s.name for s in reopened.list_sites()], ["alpha"])


@implementer(IListeningPort)
class _Port:
    def __init__(self, spec: ForwardSpec) -> None:
        self.spec = spec
        self.stopped = False

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.spec.bind, self.spec.port)


class ApplyTests(SynchronousTestCase):
    """L{LiveForwards} on a MemoryReactorClock, the database thread inline."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.fixture = ServerFixture(self)
        self.fixture.state.store.record_server_start(os.getpid(), NOW)
        self.cli = StateStore(self.fixture.state.store.path, create=False)
        self.addCleanup(self.cli.close)
        self.registry = SiteRegistry(self.reactor)
        self.factories: list[ForwardFactory] = []
        self.ports: dict[tuple[str, int], _Port] = {}
        self.refuse: dict[tuple[str, int], Exception] = {}
        self.live = LiveForwards(
            self.fixture.state,
            self.registry,
            self.reactor,
            StateThread(None),
            5.0,
            self.factories,
            listen=self.listen,
        )
        self.log: list[str] = []
        observer = lambda event: self.log.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def listen(self, spec: ForwardSpec, factory: ForwardFactory) -> defer.Deferred[IListeningPort]:
        key = (spec.bind, spec.port)
        if key in self.refuse:
            return defer.fail(self.refuse[key])
        port = self.ports[key] = _Port(spec)
        return defer.succeed(port)

    def states(self) -> dict[tuple[int, str], str]:
        return {(f.port, f.source): f.state for f in self.cli.list_forwards()}

    def start(self, *command_line: str) -> None:
        self.live.start([ForwardSpec.parse(s) for s in command_line])
        self.addCleanup(self.live.stop)

    def test_stored_forwards_are_applied_at_start_and_command_line_ones_recorded(self) -> None:
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.start("9090:alpha:h:2")
        self.assertEqual(set(self.ports), {("127.0.0.1", 8080)})
        self.assertEqual(
            self.states(), {(8080, SOURCE_DATABASE): "listening", (9090, SOURCE_COMMAND_LINE): "listening"}
        )
        self.assertEqual(len(self.factories), 1)

    def test_addition_is_applied_by_the_next_poll(self) -> None:
        self.start()
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.assertEqual(self.ports, {})
        self.reactor.advance(1.0)
        self.assertEqual(set(self.ports), {("127.0.0.1", 8080)})
        self.assertEqual(self.states(), {(8080, SOURCE_DATABASE): "listening"})
        self.assertTrue(any("added from the database" in line for line in self.log))

    def test_removal_closes_the_listener_and_leaves_connections(self) -> None:
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.start()
        factory = self.factories[0]
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        client.makeConnection(transport)
        self.cli.remove_forward("127.0.0.1", 8080, cut=False)
        self.reactor.advance(1.0)
        self.assertTrue(self.ports[("127.0.0.1", 8080)].stopped)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.cli.stored_forwards(), [])
        self.assertEqual(self.states(), {})
        # Its connection is still counted until it ends, then forgotten.
        self.assertEqual(self.factories, [factory])
        client.connectionLost(Failure(Exception("done")))
        self.reactor.advance(1.0)
        self.assertEqual(self.factories, [])

    def test_removal_with_cut_closes_connections_with_the_reason_logged(self) -> None:
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.start()
        client = self.factories[0].buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        client.makeConnection(transport)
        self.cli.remove_forward("127.0.0.1", 8080, cut=True)
        self.reactor.advance(1.0)
        self.assertTrue(self.ports[("127.0.0.1", 8080)].stopped)
        self.assertTrue(transport.disconnecting)
        self.assertIn(
            "forward 127.0.0.1:8080 -> alpha:h:1: client 127.0.0.1:40000 cut: forward removed with --cut", self.log
        )

    def test_changed_target_is_listened_on_again(self) -> None:
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.start()
        first = self.ports[("127.0.0.1", 8080)]
        self.cli.remove_forward("127.0.0.1", 8080, cut=False)
        self.cli.add_forward(_record("8080:beta:h:2"), NOW)
        self.reactor.advance(1.0)
        self.assertTrue(first.stopped)
        second = self.ports[("127.0.0.1", 8080)]
        self.assertIsNot(second, first)
        self.assertEqual(second.spec.site, "beta")
        self.assertEqual([r.site for r in self.cli.stored_forwards()], ["beta"])

    def test_conflict_with_the_command_line_is_a_failed_state_naming_both(self) -> None:
        self.cli.add_forward(_record("8080:beta:h:2"), NOW)
        self.start("8080:alpha:h:1")
        self.assertEqual(self.ports, {})
        self.assertEqual(
            self.states(),
            {
                (8080, SOURCE_COMMAND_LINE): "listening",
                (8080, SOURCE_DATABASE): "failed: conflicts with the command-line forward "
                "--forward 127.0.0.1:8080:alpha:h:1 (both on 127.0.0.1:8080)",
            },
        )

    def test_a_listen_failure_is_a_state_and_the_rest_goes_on(self) -> None:
        """A forward that cannot listen is `failed: REASON`; the next one still listens."""
        self.refuse[("127.0.0.1", 8080)] = CannotListenError(
            "127.0.0.1", 8080, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        )
        self.cli.add_forward(_record("8080:alpha:h:1"), NOW)
        self.cli.add_forward(_record("8081:alpha:h:1"), NOW)
        self.start()
        self.assertEqual(
            self.states(),
            {
                (8080, SOURCE_DATABASE): "failed: port in use (Address already in use)",
                (8081, SOURCE_DATABASE): "listening",
            },
        )

    def test_nothing_is_read_again_while_the_version_stands(self) -> None:
        self.start()
        reads: list[Any] = []
        original = self.live._read
        self.live._read = lambda last: reads.append(original(last)) or reads[-1]  # type: ignore[method-assign]
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        self.assertEqual(reads, [None, None])

    def test_spec_text_reads_back(self) -> None:
        for text in ("127.0.0.1:8080:alpha:h:1", "[::1]:8080:alpha:[::1]:1"):
            self.assertEqual(spec_text(ForwardSpec.parse(text)), text)


class ListenFailureTests(SynchronousTestCase):
    """The reasons, from the kernel's own refusals on real loopback sockets."""

    def listen(self, text: str) -> Failure:
        spec = ForwardSpec.parse(text)
        d = serverFromString(global_reactor, spec.endpoint_description()).listen(
            ForwardFactory(spec, SiteRegistry(global_reactor), 1.0)
        )
        return self.failureResultOf(d, CannotListenError)

    def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            reason = listen_failure_reason(self.listen(f"127.0.0.1:{port}:alpha:h:1"))
        self.assertTrue(reason.startswith("port in use ("), reason)

    def test_address_not_of_this_host(self) -> None:
        reason = listen_failure_reason(self.listen("192.0.2.1:8080:alpha:h:1"))
        self.assertTrue(reason.startswith("bad address ("), reason)

    def test_permission_denied(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root may listen on any port")
        reason = listen_failure_reason(self.listen("127.0.0.1:1:alpha:h:1"))
        self.assertTrue(reason.startswith("permission denied ("), reason)
