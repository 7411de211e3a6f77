"""
Named services (issue 11 section 2): the HELLO capability, the SERVICES frame,
negotiation with peers that have the capability and peers that predate it (in
both directions), the registry's record, and the site's C{--service}.

Sessions are real L{MuxSession}s and L{MuxProtocol} pairs joined in memory;
an "old" peer is one whose HELLO offers no capability (C{Settings()}, or the
raw bytes of a HELLO with the field sent as 0).
"""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter.protocol import MuxProtocol
from rtunnel.adapter.stream import MuxStream, StreamOpenFailed
from rtunnel.address import HostPort
from rtunnel.cli.site_tap import Options as SiteOptions
from rtunnel.endpoints import SiteEndpoint
from rtunnel.frontdoor.names import validate_service_name
from rtunnel.mux import ErrorCode, MuxSession, Settings
from rtunnel.mux import events as ev
from rtunnel.mux.frames import (
    HEADER,
    MAX_SERVICES,
    FrameDecoder,
    FrameType,
    Hello,
    Services,
    encode,
    services_payload,
)
from rtunnel.mux.settings import ALL_CAPABILITIES, CAP_SERVICES, ROLE_SETTINGS
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from tests.common import joined_muxes, pump_all
from tests.test_admin_cli import NOW, _CLITestCase

WEB = {"web": HostPort("127.0.0.1", 8080), "directory": HostPort("10.0.0.5", 389)}

_names = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
)
_entries = st.dictionaries(_names, st.tuples(_hosts, st.integers(1, 65535)), max_size=MAX_SERVICES).map(
    lambda d: tuple((name, host, port) for name, (host, port) in d.items())
)


def old_hello_bytes() -> bytes:
    """A HELLO exactly as rtunnel 0.2 sent it: the u16 after the version is 0."""
    payload = struct.pack(">4sHHIII", b"RTMX", 1, 0, 65536, 262144, 1024)
    return HEADER.pack(FrameType.HELLO, 0, 0, len(payload)) + payload


def frames_of(data: bytes) -> list[object]:
    decoder = FrameDecoder(16 * 1024 * 1024)
    frames: list[object] = decoder.feed(data)
    assert decoder.error is None, decoder.error
    return frames


class FrameTests(SynchronousTestCase):
    @given(_entries)
    def test_round_trip(self, entries: tuple[tuple[str, str, int], ...]) -> None:
        """A SERVICES frame decodes to the entries it was made of, cut anywhere."""
        wire = encode(Hello(1, 65536, 262144, 1024, CAP_SERVICES)) + encode(Services(entries))
        decoder = FrameDecoder(65536)
        got = []
        for i in range(0, len(wire), 7):
            got += decoder.feed(wire[i : i + 7])
        self.assertIsNone(decoder.error)
        self.assertEqual(got[1], Services(entries))

    @given(st.text(max_size=70))
    def test_name_rule_is_validate_service_name(self, name: str) -> None:
        """The wire's name rule and the site's --service rule agree."""
        try:
            validate_service_name(name)
            valid = True
        except ValueError:
            valid = False
        try:
            services_payload(((name, "h", 1),))
            sent = True
        except ValueError:
            sent = False
        self.assertEqual(valid, sent)

    def test_bounds(self) -> None:
        """More than 64 services, a bad name, port 0 or a too-large payload
        cannot be sent, and are refused on receipt."""
        too_many = tuple((f"s{i}", "h", 1) for i in range(MAX_SERVICES + 1))
        self.assertRaises(ValueError, services_payload, too_many)
        self.assertRaises(ValueError, services_payload, (("Web", "h", 1),))
        self.assertRaises(ValueError, services_payload, (("web", "h", 0),))
        big = tuple((f"s{i}-" + "x" * 50, "h" * 250, 1) for i in range(MAX_SERVICES))
        self.assertRaises(ValueError, services_payload, big)
        for payload, code in [
            (bytes([MAX_SERVICES + 1]), ErrorCode.PROTOCOL_ERROR),
            (b"\x01\x03Web\x00\x01\x01h", ErrorCode.PROTOCOL_ERROR),
            (b"\x01\x03web\x00\x00\x01h", ErrorCode.PROTOCOL_ERROR),
            (b"\x01\x03web\x00\x01\x02h", ErrorCode.FRAME_SIZE_ERROR),
            (b"\x01\x03web\x00\x01\x01h!", ErrorCode.FRAME_SIZE_ERROR),
            (b"", ErrorCode.FRAME_SIZE_ERROR),
        ]:
            decoder = FrameDecoder(65536)
            decoder.feed(encode(Hello(1, 65536, 262144, 1024)))
            decoder.feed(HEADER.pack(FrameType.SERVICES, 0, 0, len(payload)) + payload)
            assert decoder.error is not None, payload
            self.assertEqual(decoder.error.code, code, payload)
        decoder = FrameDecoder(65536)
        decoder.feed(encode(Hello(1, 65536, 262144, 1024)))
        decoder.feed(HEADER.pack(FrameType.SERVICES, 0, 1, 1) + b"\x00")
        self.assertIsNotNone(decoder.error)  # not on stream 0


class NegotiationTests(SynchronousTestCase):
    """Both directions of mixed versions, sans-IO."""

    def session(self, initiator: bool, capable: bool) -> MuxSession:
        settings = ROLE_SETTINGS if capable else Settings()
        s = MuxSession(initiator=initiator, settings=settings, services=WEB if initiator else None)
        s.start()
        return s

    def exchange(self, site: MuxSession, server: MuxSession) -> tuple[list[ev.Event], list[ev.Event]]:
        a, b = site.data_to_send(), server.data_to_send()
        site_events = site.receive_data(b)
        server_events = server.receive_data(a)
        site_events += site.receive_data(server.data_to_send())
        server_events += server.receive_data(site.data_to_send())
        return site_events, server_events

    def test_both_capable(self) -> None:
        """Each end sends one SERVICES after the peer's HELLO; the server learns the site's."""
        site, server = self.session(True, True), self.session(False, True)
        site_events, server_events = self.exchange(site, server)
        self.assertIn(ev.ServicesAnnounced(WEB), server_events)
        self.assertEqual(dict(server.peer_services or {}), WEB)
        self.assertEqual(dict(site.peer_services or {}), {})
        self.assertFalse(site.failed or server.failed)

    def test_old_server(self) -> None:
        """A new site never sends SERVICES to a server that does not offer the
        capability: the server sees only its HELLO, and stays up."""
        site, server = self.session(True, True), self.session(False, False)
        hello_out = site.data_to_send()
        site.receive_data(server.data_to_send())
        self.assertEqual(site.data_to_send(), b"")  # nothing after the old HELLO
        events = server.receive_data(hello_out)
        self.assertEqual([type(e) for e in events], [ev.SessionReady])
        self.assertFalse(server.failed or site.failed)
        self.assertFalse(site.services_pending)

    def test_old_site_raw_hello(self) -> None:
        """A server with the capability, given the raw HELLO of an old site,
        sends no SERVICES and expects none."""
        server = self.session(False, True)
        server.data_to_send()
        events = server.receive_data(old_hello_bytes())
        self.assertEqual([type(e) for e in events], [ev.SessionReady])
        self.assertEqual(server.data_to_send(), b"")
        self.assertFalse(server.services_pending)
        self.assertIsNone(server.peer_services)

    def test_unsolicited_services_is_a_protocol_error(self) -> None:
        """SERVICES to an end that did not offer the capability is what an
        unknown frame type is to an old peer: PROTOCOL_ERROR."""
        server = self.session(False, False)
        server.data_to_send()
        events = server.receive_data(encode(Hello(1, 65536, 262144, 1024, CAP_SERVICES)) + encode(Services(())))
        failed = [e for e in events if isinstance(e, ev.SessionFailed)]
        self.assertEqual(failed[0].code, ErrorCode.PROTOCOL_ERROR)

    def test_second_services_and_duplicates(self) -> None:
        """One SERVICES per session, no name twice, hosts by the grammar."""
        for extra in [
            encode(Services(())) + encode(Services(())),
            encode(Services((("a", "h", 1), ("a", "h", 2)))),
            encode(Services((("a", "a..b", 1),))),
        ]:
            server = self.session(False, True)
            events = server.receive_data(encode(Hello(1, 65536, 262144, 1024, ALL_CAPABILITIES)) + extra)
            failed = [e for e in events if isinstance(e, ev.SessionFailed)]
            self.assertEqual(failed[0].code, ErrorCode.PROTOCOL_ERROR, extra)

    def test_unknown_capability_bits_ignored(self) -> None:
        server = self.session(False, True)
        events = server.receive_data(encode(Hello(1, 65536, 262144, 1024, 0xFFFE)))
        self.assertEqual([type(e) for e in events], [ev.SessionReady])
        self.assertFalse(server.services_pending)


def site_mux(clock: Clock, capable: bool, services: dict[str, HostPort] | None = None) -> MuxProtocol:
    settings = ROLE_SETTINGS if capable else Settings()
    return MuxProtocol(initiator=True, clock=clock, settings=settings, services=services, label="site")


def server_mux(clock: Clock, capable: bool) -> MuxProtocol:
    settings = ROLE_SETTINGS if capable else Settings()
    return MuxProtocol(initiator=False, clock=clock, settings=settings, label="server")


class ProtocolAndRegistryTests(SynchronousTestCase):
    """Real MuxProtocol pairs in memory, and the registry's record."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.stored: list[tuple[str, dict[str, HostPort]]] = []
        self.registry = SiteRegistry(self.clock, on_services=lambda s, m: self.stored.append((s, dict(m))))

    def join(self, site_capable: bool, server_capable: bool) -> tuple[MuxProtocol, MuxProtocol]:
        site, server, pump = joined_muxes(
            self.clock, lambda: site_mux(self.clock, site_capable, WEB), lambda: server_mux(self.clock, server_capable)
        )
        self.registry.register("store-17", server, "192.0.2.1:1")
        server.when_services().addCallback(lambda s: self.registry.announce("store-17", server, s))
        pump_all(pump)
        return site, server

    def test_new_site_new_server(self) -> None:
        _, server = self.join(True, True)
        self.assertEqual(dict(self.successResultOf(server.when_services()) or {}), WEB)
        self.assertEqual(dict(self.registry.services("store-17") or {}), WEB)
        self.assertEqual(self.stored, [("store-17", WEB)])
        self.assertEqual(dict(self.registry.directory(["other"])), {"other": {}, "store-17": WEB})
        self.assertEqual(dict(self.successResultOf(self.registry.when_services("store-17", 1))), WEB)

    def test_old_site_new_server(self) -> None:
        """A site without the capability works; its services are simply absent."""
        site, server = self.join(False, True)
        self.assertIsNone(self.successResultOf(server.when_services()))
        live = self.registry.services("store-17")
        assert live is not None
        self.assertEqual(dict(live), {})
        self.assertTrue(site.ready and server.ready)
        self.assertEqual(self.stored, [])  # nothing changed: nothing to store

    def test_new_site_old_server(self) -> None:
        """A new site at an old server keeps its session; nothing announced."""
        site, server = self.join(True, False)
        self.assertTrue(site.ready and server.ready)
        self.assertFalse(site.session.failed or server.session.failed)
        self.assertIsNone(server.session.peer_services)

    def test_last_announced_kept_after_disconnect(self) -> None:
        """The directory keeps what a site last announced after it leaves;
        services() (live) does not, and when_services waits, then fails."""
        site, server = self.join(True, True)
        server.terminate(ErrorCode.NO_ERROR, "bye")
        server.connectionLost()
        self.assertIsNone(self.registry.services("store-17"))
        self.assertEqual(dict(self.registry.directory(["store-17"])["store-17"]), WEB)
        d = self.registry.when_services("store-17", 2)
        self.clock.advance(2)
        self.failureResultOf(d, SiteUnavailable)


class SiteOptionsTests(SynchronousTestCase):
    def test_service_option(self) -> None:
        options = SiteOptions()
        options.parseOptions(["--state", "/nonexistent", "--service", "web=127.0.0.1:8080", "--service", "db=h:5"])
        self.assertEqual(options.config.services, (("web", HostPort("127.0.0.1", 8080)), ("db", HostPort("h", 5))))

    def test_bad_and_duplicate_services(self) -> None:
        for args in [["--service", "Web=h:1"], ["--service", "web"], ["--service", "a=h:1", "--service", "a=h:2"]]:
            self.assertRaises(usage.UsageError, SiteOptions().parseOptions, ["--state", "/x", *args])


class EndpointTests(SynchronousTestCase):
    """SiteEndpoint(..., service=) and rtunnel:site=S:service=NAME."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SiteRegistry(self.clock)
        self.asked: list[tuple[str, int]] = []

        def handler(stream: MuxStream) -> None:
            self.asked.append((stream.host, stream.port))
            stream.refuse(ErrorCode.TARGET_REFUSED, "test")

        def site() -> MuxProtocol:
            return MuxProtocol(
                initiator=True, clock=self.clock, settings=ROLE_SETTINGS, services=WEB, stream_handler=handler
            )

        _, server, self.pump = joined_muxes(self.clock, site, lambda: server_mux(self.clock, True))
        self.registry.register("store-17", server, "192.0.2.1:1")
        server.when_services().addCallback(lambda s: self.registry.announce("store-17", server, s))
        pump_all(self.pump)

    def test_service_resolves_to_the_declared_target(self) -> None:
        d = SiteEndpoint(self.registry, "store-17", service="directory").connect(Factory.forProtocol(Protocol))
        pump_all(self.pump)
        self.assertEqual(self.asked, [("10.0.0.5", 389)])
        self.failureResultOf(d, StreamOpenFailed)

    def test_unknown_service_and_site(self) -> None:
        d = SiteEndpoint(self.registry, "store-17", service="nope").connect(Factory.forProtocol(Protocol))
        failure = self.failureResultOf(d, SiteUnavailable)
        self.assertIn("declares no service nope (declared: directory, web)", str(failure.value))
        d = SiteEndpoint(self.registry, "store-99", service="web", open_timeout=1).connect(
            Factory.forProtocol(Protocol)
        )
        self.clock.advance(1)
        self.failureResultOf(d, SiteUnavailable)
        self.assertEqual(self.asked, [])

    def test_exactly_one_of_host_port_or_service(self) -> None:
        self.assertRaises(ValueError, SiteEndpoint, self.registry, "s")
        self.assertRaises(ValueError, SiteEndpoint, self.registry, "s", "h", 1, service="web")
        self.assertRaises(ValueError, SiteEndpoint, self.registry, "s", "h")

    def test_string_parser(self) -> None:
        endpoint = clientFromString(self.clock, "rtunnel:site=store-17:service=directory")
        assert isinstance(endpoint, SiteEndpoint)
        self.assertEqual((endpoint.site, endpoint.service, endpoint.host), ("store-17", "directory", None))
        for bad in [
            "rtunnel:site=s:service=Web",
            "rtunnel:site=s:service=web:host=h:port=1",
            "rtunnel:site=s:service=",
        ]:
            self.assertRaises(ValueError, clientFromString, self.clock, bad)


class SitesListTests(_CLITestCase):
    """The store keeps what each site last announced; sites list shows it."""

    def test_store_and_sites_list(self) -> None:
        self.enroll("alpha")
        self.enroll("beta")
        server = self.open_state()
        server.store.record_services("alpha", {"web": HostPort("127.0.0.1", 8080)}, NOW)
        server.store.record_services("alpha", WEB, NOW)  # the last announcement replaces the one before
        self.assertEqual(server.store.site_services(), {"alpha": WEB})
        status, out, _ = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual(status, 0)
        header, alpha, beta = out.splitlines()
        self.assertEqual(header.split(), ["SITE", "ENROLLED", "REVOKED", "SERVICES", "REPLICAS", "CONNECTED"])
        self.assertIn(" directory=10.0.0.5:389,web=127.0.0.1:8080 ", alpha)
        self.assertNotIn("=", beta)
        status, out, _ = self.run_cli("sites", "list", "--state", str(self.state), "--json")
        listed = {entry["name"]: entry["services"] for entry in json.loads(out)}
        self.assertEqual(listed, {"alpha": {"directory": "10.0.0.5:389", "web": "127.0.0.1:8080"}, "beta": {}})
