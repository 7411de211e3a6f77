"""
SiteRegistry with a site that keeps one session per server replica (both
ends negotiated REPLICAS): a second session of the site does not replace a
live one at once, since the site closes an extra session with a replica
itself; it takes over only if the site keeps it for REPLICA_TAKEOVER_GRACE
seconds. Sessions are real MuxProtocol pairs joined in memory; time is a
Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter.protocol import MuxProtocol
from rtunnel.address import HostPort
from rtunnel.mux import ErrorCode
from rtunnel.mux.settings import ALL_CAPABILITIES, CAP_SERVICES, Settings
from rtunnel.roles.registry import REPLICA_TAKEOVER_GRACE, SiteRegistry
from tests.common import joined_muxes, pump_all


def pair(
    clock: Clock, capabilities: int = ALL_CAPABILITIES, services: dict[str, HostPort] | None = None
) -> tuple[MuxProtocol, MuxProtocol, IOPump]:
    """(server end, site end, pump), HELLOs exchanged, both offering C{capabilities}."""
    settings = Settings(capabilities=capabilities)
    site, server, pump = joined_muxes(
        clock,
        lambda: MuxProtocol(initiator=True, clock=clock, settings=settings, services=services),
        lambda: MuxProtocol(initiator=False, clock=clock, settings=settings, label="alpha"),
    )
    return server, site, pump


class ReplicaAwareTakeoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.connected: list[str] = []
        self.registry = SiteRegistry(self.clock, on_connected=lambda site, peer: self.connected.append(peer))

    def test_an_extra_session_closed_by_the_site_replaces_nothing(self) -> None:
        old_server, old_site, old_pump = pair(self.clock)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        new_server, new_site, new_pump = pair(self.clock)
        self.assertTrue(new_server.replicas_negotiated)
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        self.assertIs(self.registry.session_for("alpha"), old_server)
        # The site closes it as a duplicate.
        new_site.terminate(ErrorCode.NO_ERROR, "already connected to replica a")
        pump_all(new_pump)
        self.assertFalse(new_server.ready)
        self.clock.advance(REPLICA_TAKEOVER_GRACE * 2)
        pump_all(old_pump)
        self.assertIs(self.registry.session_for("alpha"), old_server)
        self.assertIsNone(old_site.peer_goaway)
        self.assertTrue(old_site.accepting_streams)
        self.assertEqual(self.connected, ["192.0.2.7:1"])

    def test_an_extra_session_the_site_keeps_takes_over_after_the_grace(self) -> None:
        """The site kept it (its old session was dead at its end): after the grace it replaces the old one."""
        old_server, old_site, old_pump = pair(self.clock)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        new_server, _, new_pump = pair(self.clock, services={"web": HostPort("10.0.0.7", 80)})
        self.registry.announce("alpha", new_server, self.successResultOf(new_server.when_services()))
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        self.clock.advance(REPLICA_TAKEOVER_GRACE - 0.01)
        self.assertIs(self.registry.session_for("alpha"), old_server)
        self.assertIsNone(self.registry.services("alpha"))
        self.clock.advance(0.01)
        pump_all(old_pump)
        self.assertIs(self.registry.session_for("alpha"), new_server)
        self.assertEqual(old_site.peer_goaway[0], ErrorCode.SESSION_REPLACED)  # type: ignore[index]
        self.assertEqual(self.connected, ["192.0.2.7:1", "192.0.2.7:2"])
        # Its announcement, ignored while it waited, counts now.
        self.assertEqual(dict(self.registry.services("alpha") or {}), {"web": HostPort("10.0.0.7", 80)})

    def test_without_the_capability_the_takeover_is_immediate(self) -> None:
        old_server, old_site, old_pump = pair(self.clock, CAP_SERVICES)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        new_server, _, _ = pair(self.clock, CAP_SERVICES)
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        pump_all(old_pump)
        self.assertIs(self.registry.session_for("alpha"), new_server)
        self.assertEqual(old_site.peer_goaway[0], ErrorCode.SESSION_REPLACED)  # type: ignore[index]

    def test_an_old_session_going_away_is_replaced_at_once(self) -> None:
        old_server, _, old_pump = pair(self.clock)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        old_server.drain(10.0, "replica stopping")
        pump_all(old_pump)
        new_server, _, _ = pair(self.clock)
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        self.assertIs(self.registry.session_for("alpha"), new_server)

    def test_a_cut_ends_the_waiting_session_too(self) -> None:
        old_server, old_site, old_pump = pair(self.clock)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        new_server, new_site, new_pump = pair(self.clock)
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        self.assertTrue(self.registry.cut("alpha", ErrorCode.NOT_AUTHORIZED, "site-revoked"))
        pump_all(old_pump)
        pump_all(new_pump)
        self.assertEqual(old_site.peer_goaway, (ErrorCode.NOT_AUTHORIZED, "site-revoked"))
        self.assertEqual(new_site.peer_goaway, (ErrorCode.NOT_AUTHORIZED, "site-revoked"))
        self.clock.advance(REPLICA_TAKEOVER_GRACE * 2)
        self.assertIsNone(self.registry.session_for("alpha"))

    def test_the_waiting_session_is_live_at_once_when_the_old_one_ends(self) -> None:
        old_server, old_site, old_pump = pair(self.clock)
        self.registry.register("alpha", old_server, "192.0.2.7:1")
        new_server, _, _ = pair(self.clock)
        self.registry.register("alpha", new_server, "192.0.2.7:2")
        self.assertIs(self.registry.session_for("alpha"), old_server)
        old_site.abort()
        pump_all(old_pump)
        self.assertIs(self.registry.session_for("alpha"), new_server)
        self.assertEqual(self.connected, ["192.0.2.7:1", "192.0.2.7:2"])
        self.clock.advance(REPLICA_TAKEOVER_GRACE * 2)
        self.assertIs(self.registry.session_for("alpha"), new_server)
