"""
Server replicas on the wire (issue 13 section 2): the CAP_REPLICAS
capability, the REPLICAS frame (values, encoding, every payload the decoder
refuses), the session's rules (who may send it, when, what a receiver does
with one it should not get), mixed versions in both directions, and the
flood accounting (a REPLICAS is a control frame that elicits nothing).

Sessions are sans-IO L{MuxSession}s: pairs joined in memory
(L{tests.mux_helpers.SessionPair}) or one session fed frames by hand.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.address import HostPort
from rtunnel.mux import ErrorCode, MuxSession, MuxUsageError, Settings
from rtunnel.mux import events as ev
from rtunnel.mux.frames import (
    HEADER,
    MAX_REPLICAS,
    MAX_REPLICAS_BYTES,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    ReplicaEntry,
    Replicas,
    advertise_problem,
    encode,
    replica_id_problem,
    replicas_payload,
)
from rtunnel.mux.settings import ALL_CAPABILITIES, CAP_REPLICAS, CAP_SERVICES, ROLE_SETTINGS, Allowance, FloodLimits
from tests.mux_helpers import SessionPair, feed, of_type, ready_session, received_bytes, sent_frames
from tests.strategies import canonical_hosts, ports

#: An end that predates replicas but has named services (the release before them).
SERVICES_ONLY = Settings(capabilities=CAP_SERVICES)
ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+[]-")

THREE = Replicas(
    own="edge-b:7000",
    replicas=(
        ReplicaEntry("edge-c:7000"),
        ReplicaEntry("edge-a:7000", "10.0.0.1:7000"),
        ReplicaEntry("edge-b:7000", "[2001:db8::2]:7000"),
    ),
)

_ids = st.from_regex(r"[A-Za-z0-9._:@/+\[\]-]{1,64}", fullmatch=True)
_advertised = st.one_of(
    st.just(""),
    st.builds(HostPort, canonical_hosts.filter(lambda h: len(h) <= 60), ports).map(str),
)


@st.composite
def replica_sets(draw: st.DrawFn) -> Replicas:
    ids = draw(st.lists(_ids, min_size=1, max_size=MAX_REPLICAS, unique=True))
    entries = [ReplicaEntry(i, draw(_advertised)) for i in ids]
    return Replicas(draw(st.sampled_from(ids)), draw(st.permutations(entries)))


def hello(capabilities: int = ALL_CAPABILITIES) -> Hello:
    s = Settings()
    return Hello(s.version, s.max_frame_size, s.initial_window, s.max_streams, capabilities)


def raw_replicas(payload: bytes, flags: int = 0, stream_id: int = 0) -> bytes:
    return HEADER.pack(FrameType.REPLICAS, flags, stream_id, len(payload)) + payload


def entry_bytes(replica_id: bytes, advertise: bytes = b"") -> bytes:
    return bytes([len(replica_id)]) + replica_id + bytes([len(advertise)]) + advertise


def decoder_error(wire: bytes) -> tuple[ErrorCode, str]:
    """The code and reason a decoder past the HELLO refuses C{wire} with."""
    decoder = FrameDecoder(64 * 1024)
    decoder.feed(encode(hello()))
    assert decoder.feed(wire) == []
    error = decoder.error
    assert error is not None, wire
    return error.code, error.reason


def site_and_server(
    site: Settings = ROLE_SETTINGS, server: Settings = ROLE_SETTINGS, site_flood: FloodLimits | None = None
) -> SessionPair:
    """
    The site (initiator) and the tunnel server (acceptor), HELLOs (and
    SERVICES, where both offer them) exchanged.
    """
    pair = SessionPair(site, server, handshake=False, client_flood=site_flood)
    pair.client.start()
    pair.server.start()
    pair.pump()
    assert pair.client.ready and pair.server.ready
    return pair


class CapabilityTests(SynchronousTestCase):
    def test_bits(self) -> None:
        """CAP_REPLICAS is its own bit, offered by every rtunnel role; the plain default offers none."""
        self.assertEqual(CAP_REPLICAS, 0x0002)
        self.assertEqual(CAP_REPLICAS & CAP_SERVICES, 0)
        self.assertEqual(ALL_CAPABILITIES, CAP_SERVICES | CAP_REPLICAS)
        self.assertEqual(ROLE_SETTINGS.capabilities, ALL_CAPABILITIES)
        self.assertEqual(Settings().capabilities, 0)

    def test_hello_carries_both(self) -> None:
        """A role's HELLO carries both bits on the wire."""
        session = MuxSession(initiator=True, settings=ROLE_SETTINGS)
        session.start()
        [frame] = sent_frames(session)
        assert isinstance(frame, Hello)
        self.assertEqual(frame.capabilities, CAP_SERVICES | CAP_REPLICAS)


class ValueTests(SynchronousTestCase):
    def test_sorted_whatever_the_order(self) -> None:
        """Entries are kept sorted by id, however they were given (a list too)."""
        self.assertEqual(THREE.ids, ("edge-a:7000", "edge-b:7000", "edge-c:7000"))
        again = Replicas("edge-b:7000", list(reversed(THREE.replicas)))
        self.assertEqual(again, THREE)
        self.assertEqual(THREE.get("edge-a:7000"), ReplicaEntry("edge-a:7000", "10.0.0.1:7000"))
        self.assertIsNone(THREE.get("edge-d:7000"))

    @given(st.text(max_size=80))
    def test_id_rule(self, text: str) -> None:
        """replica_id_problem is None exactly for 1-64 characters of the grammar, and ReplicaEntry agrees."""
        valid = 1 <= len(text) <= 64 and set(text) <= ID_CHARS
        self.assertEqual(replica_id_problem(text) is None, valid)
        try:
            ReplicaEntry(text)
            built = True
        except ValueError:
            built = False
        self.assertEqual(built, valid)

    def test_id_problems_say_what(self) -> None:
        """Each bad id gets a message naming what is wrong; peer text comes back escaped."""
        self.assertEqual(replica_id_problem(""), "the replica id is empty")
        self.assertIn("has 65 characters (at most 64)", replica_id_problem("x" * 65) or "")
        self.assertIn("has ' ' at position 5", replica_id_problem("edge a") or "")
        problem = replica_id_problem("ok\x1b[31m\u202e") or ""
        self.assertIn("'\\x1b' at position 3", problem)
        self.assertNotIn("\x1b", problem)
        self.assertNotIn("\u202e", problem)
        self.assertIn("must be text", replica_id_problem(7) or "")  # type: ignore[arg-type]
        for good in ["a", "edge-1.example:7000", "[::1]:7000/w2", "r@host+1", "A_B.c"]:
            self.assertIsNone(replica_id_problem(good), good)

    def test_advertise_rule(self) -> None:
        """An advertised address is empty or canonical HOST:PORT, IPv6 in brackets."""
        for good in ["", "10.0.0.1:7000", "edge.example:443", "[2001:db8::2]:7000"]:
            self.assertIsNone(advertise_problem(good), good)
        for bad, says in [
            ("Edge.example:443", "not in canonical form (write edge.example:443)"),
            ("[2001:DB8::2]:7000", "not in canonical form (write [2001:db8::2]:7000)"),
            ("edge.example", "expected HOST:PORT"),
            ("2001:db8::2:7000", "brackets"),
            ("edge:0", "from 1 to 65535"),
            (" edge:1", "not in canonical form"),
        ]:
            problem = advertise_problem(bad)
            assert problem is not None, bad
            self.assertIn(says, problem)

    def test_values_refused(self) -> None:
        """A Replicas value that a peer would refuse cannot be made: ValueError naming why."""
        a, b = ReplicaEntry("a"), ReplicaEntry("b")
        for build, says in [
            (lambda: Replicas("c", (a, b)), "the own replica id c is not among the replicas"),
            (lambda: Replicas("a", (a, b, ReplicaEntry("a", "h:1"))), "replica id a is listed twice"),
            (lambda: Replicas("a", ()), "the own replica id a is not among"),
            (lambda: Replicas("x y", (a,)), "has ' '"),
            (lambda: ReplicaEntry("a", "h"), "expected HOST:PORT"),
            (lambda: ReplicaEntry(""), "empty"),
            (lambda: Replicas("a", (a, "b")), "not a ReplicaEntry"),  # type: ignore[arg-type]
            (
                lambda: Replicas("r0", (ReplicaEntry(f"r{i}") for i in range(MAX_REPLICAS + 1))),
                f"65 replicas; at most {MAX_REPLICAS}",
            ),
        ]:
            with self.assertRaises(ValueError) as raised:
                build()
            self.assertIn(says, str(raised.exception))

    def test_too_large(self) -> None:
        """64 long ids with long addresses exceed 16 KiB: refused, as the receiver would."""
        host = ".".join(["a" * 60] * 3) + ".example"
        entries = [ReplicaEntry(f"{i:02d}" + "x" * 62, f"{host}:65535") for i in range(MAX_REPLICAS)]
        with self.assertRaises(ValueError) as raised:
            Replicas(entries[0].replica_id, entries)
        self.assertIn(f"at most {MAX_REPLICAS_BYTES} can be announced", str(raised.exception))
        # With one fewer it fits, and the frame is within every peer's frame limit.
        fits = Replicas(entries[0].replica_id, entries[:62])
        self.assertLessEqual(len(replicas_payload(fits)), MAX_REPLICAS_BYTES)


class EncodingTests(SynchronousTestCase):
    def test_layout(self) -> None:
        """The payload as docs/protocol.md draws it: own id, count, then id and address per replica."""
        value = Replicas("b", (ReplicaEntry("b", "h:1"), ReplicaEntry("a")))
        self.assertEqual(replicas_payload(value), b"\x01b\x02\x01a\x00\x01b\x03h:1")
        self.assertEqual(encode(value), HEADER.pack(0x0A, 0, 0, 12) + b"\x01b\x02\x01a\x00\x01b\x03h:1")

    @given(replica_sets())
    def test_round_trip(self, value: Replicas) -> None:
        """A REPLICAS frame decodes to the value it was made of, cut anywhere."""
        wire = encode(hello()) + encode(value)
        decoder = FrameDecoder(64 * 1024)
        got = []
        for i in range(0, len(wire), 7):
            got += decoder.feed(wire[i : i + 7])
        self.assertIsNone(decoder.error)
        self.assertEqual(got[1:], [value])
        self.assertEqual(encode(got[1]), encode(value))

    def test_any_order_on_the_wire(self) -> None:
        """Entries out of order on the wire are taken, and sorted."""
        payload = b"\x01a\x02" + entry_bytes(b"b") + entry_bytes(b"a", b"h:1")
        decoder = FrameDecoder(64 * 1024)
        frames = decoder.feed(encode(hello()) + raw_replicas(payload))
        self.assertEqual(frames[1], Replicas("a", (ReplicaEntry("a", "h:1"), ReplicaEntry("b"))))

    def test_refused_payloads(self) -> None:
        """Every malformed REPLICAS gets its own error: the code and a reason that says what is wrong."""
        a = entry_bytes(b"a")
        cases = [
            ("empty", b"", ErrorCode.FRAME_SIZE_ERROR, "REPLICAS payload too short"),
            ("own id cut", b"\x05ab", ErrorCode.FRAME_SIZE_ERROR, "ends before its replica count"),
            ("no count", b"\x01a", ErrorCode.FRAME_SIZE_ERROR, "ends before its replica count"),
            ("own id empty", b"\x00\x01" + a, ErrorCode.PROTOCOL_ERROR, "own replica id: the replica id is empty"),
            ("own id bad", b"\x03a b\x01" + a, ErrorCode.PROTOCOL_ERROR, "own replica id: replica id 'a b' has ' '"),
            (
                "own id too long",
                b"\x41" + b"x" * 65 + b"\x01" + a,
                ErrorCode.PROTOCOL_ERROR,
                "has 65 characters (at most 64)",
            ),
            (
                "too many",
                b"\x01a\x41" + a * 65,
                ErrorCode.PROTOCOL_ERROR,
                f"REPLICAS lists 65 replicas (at most {MAX_REPLICAS})",
            ),
            ("none", b"\x01a\x00", ErrorCode.PROTOCOL_ERROR, "does not list its own replica a"),
            ("own not listed", b"\x01a\x01" + entry_bytes(b"b"), ErrorCode.PROTOCOL_ERROR, "own replica a"),
            ("fewer than counted", b"\x01a\x02" + a, ErrorCode.FRAME_SIZE_ERROR, "ends before replica 2"),
            ("id cut", b"\x01a\x01\x05ab", ErrorCode.FRAME_SIZE_ERROR, "ends inside replica 1"),
            ("no address length", b"\x01a\x01\x01a", ErrorCode.FRAME_SIZE_ERROR, "ends inside replica 1"),
            ("address cut", b"\x01a\x01\x01a\x09h:1", ErrorCode.FRAME_SIZE_ERROR, "ends inside replica 1"),
            ("entry id bad", b"\x01a\x02" + a + entry_bytes(b"b\x00"), ErrorCode.PROTOCOL_ERROR, "replica 2: "),
            ("duplicate", b"\x01a\x02" + a + entry_bytes(b"a", b"h:1"), ErrorCode.PROTOCOL_ERROR, "replica a twice"),
            (
                "address not ASCII",
                b"\x01a\x01" + entry_bytes(b"a", "hé:1".encode()),
                ErrorCode.PROTOCOL_ERROR,
                "REPLICAS replica a: the advertised address is not ASCII",
            ),
            (
                "address not canonical",
                b"\x01a\x01" + entry_bytes(b"a", b"H:1"),
                ErrorCode.PROTOCOL_ERROR,
                "REPLICAS replica a: advertised address 'H:1' is not in canonical form",
            ),
            (
                "address without port",
                b"\x01a\x01" + entry_bytes(b"a", b"h"),
                ErrorCode.PROTOCOL_ERROR,
                "expected HOST:PORT",
            ),
            ("trailing bytes", b"\x01a\x01" + a + b"!", ErrorCode.FRAME_SIZE_ERROR, "1 bytes after its last replica"),
            (
                "too large",
                b"\x01a\x01" + a + bytes(MAX_REPLICAS_BYTES),
                ErrorCode.FRAME_SIZE_ERROR,
                f"REPLICAS payload of {MAX_REPLICAS_BYTES + 6} bytes (at most {MAX_REPLICAS_BYTES})",
            ),
        ]
        wrong = []
        for name, payload, code, says in cases:
            got_code, reason = decoder_error(raw_replicas(payload))
            if got_code != code or says not in reason:
                wrong.append((name, got_code, reason))
        self.assertEqual(wrong, [])

    def test_peer_text_escaped(self) -> None:
        """A control character or a bidi override in a peer's id reaches the reason escaped."""
        code, reason = decoder_error(raw_replicas(b"\x04a\x1b\xe2\x80\x01" + entry_bytes(b"a")))
        self.assertEqual(code, ErrorCode.PROTOCOL_ERROR)
        self.assertIn("own replica id: replica id 'a\\x1b", reason)
        self.assertTrue(reason.isprintable(), reason)

    def test_refused_at_the_header(self) -> None:
        """Flags, or a stream other than 0, are refused before the payload is looked at."""
        good = replicas_payload(THREE)
        self.assertEqual(
            decoder_error(raw_replicas(good, flags=0x01)),
            (ErrorCode.PROTOCOL_ERROR, "REPLICAS frame with undefined flags 0x01"),
        )
        self.assertEqual(
            decoder_error(raw_replicas(good, stream_id=1)),
            (ErrorCode.PROTOCOL_ERROR, "REPLICAS frame not allowed on stream 1"),
        )


class SessionTests(SynchronousTestCase):
    def test_announced_to_the_site(self) -> None:
        """
        The server's REPLICAS reach the site as ReplicasAnnounced, each
        replacing the last in peer_replicas; both ends see the capability
        negotiated, and nothing answers a REPLICAS.
        """
        pair = site_and_server()
        self.assertTrue(pair.client.replicas_negotiated and pair.server.replicas_negotiated)
        self.assertIsNone(pair.client.peer_replicas)
        pair.server.send_replicas(THREE)
        self.assertEqual(pair.send(pair.server), [ev.ReplicasAnnounced(THREE)])
        self.assertEqual(pair.client.peer_replicas, THREE)
        self.assertEqual(pair.client.data_to_send(), b"")
        two = Replicas("edge-b:7000", THREE.replicas[1:])
        pair.server.send_replicas(two)
        self.assertEqual(pair.send(pair.server), [ev.ReplicasAnnounced(two)])
        self.assertEqual(pair.client.peer_replicas, two)
        self.assertIsNone(pair.server.peer_replicas)
        self.assertFalse(pair.client.failed or pair.server.failed)

    def test_not_negotiated_before_the_hello(self) -> None:
        """Until the peer's HELLO, replicas_negotiated is False and nothing can be sent."""
        server = MuxSession(initiator=False, settings=ROLE_SETTINGS)
        server.start()
        self.assertFalse(server.replicas_negotiated)
        with self.assertRaises(MuxUsageError) as raised:
            server.send_replicas(THREE)
        self.assertIn("before the peer's HELLO", str(raised.exception))

    def test_send_rules(self) -> None:
        """The site may never send REPLICAS; the server only when both HELLOs offer the capability."""
        pair = site_and_server()
        with self.assertRaises(MuxUsageError) as raised:
            pair.client.send_replicas(THREE)
        self.assertIn("only the acceptor", str(raised.exception))
        for site, server in [(SERVICES_ONLY, ROLE_SETTINGS), (ROLE_SETTINGS, SERVICES_ONLY), (Settings(), Settings())]:
            pair = site_and_server(site, server)
            self.assertFalse(pair.server.replicas_negotiated or pair.client.replicas_negotiated)
            with self.assertRaises(MuxUsageError) as raised:
                pair.server.send_replicas(THREE)
            self.assertIn("not both HELLOs offer the capability", str(raised.exception))
            self.assertEqual(pair.server.data_to_send(), b"")
        with self.assertRaises(MuxUsageError):
            site_and_server().server.send_replicas(("a",))  # type: ignore[arg-type]

    def test_nothing_after_failure(self) -> None:
        """A server whose session failed queues no REPLICAS, and does not raise."""
        pair = site_and_server()
        pair.server.go_away(ErrorCode.INTERNAL_ERROR, "broken")
        pair.server.data_to_send()
        pair.server.send_replicas(THREE)
        self.assertEqual(pair.server.data_to_send(), b"")

    def test_received_by_the_server(self) -> None:
        """A REPLICAS from the site is a protocol error: GOAWAY PROTOCOL_ERROR saying so."""
        server = ready_session(initiator=False, settings=ROLE_SETTINGS, peer_settings=ROLE_SETTINGS)
        events = feed(server, THREE)
        [failed] = of_type(events, ev.SessionFailed)
        self.assertEqual(failed.code, ErrorCode.PROTOCOL_ERROR)
        self.assertIn("REPLICAS frame from the initiator", failed.reason)
        self.assertEqual(of_type(events, ev.ReplicasAnnounced), [])
        [goaway] = sent_frames(server)
        assert isinstance(goaway, GoAway)
        self.assertEqual((goaway.code, goaway.reason), (ErrorCode.PROTOCOL_ERROR, failed.reason))
        self.assertIsNone(server.peer_replicas)

    def test_received_without_the_capability(self) -> None:
        """
        A site that did not offer the capability, or whose server did not,
        takes a REPLICAS as an old end takes an unknown frame: GOAWAY
        PROTOCOL_ERROR.
        """
        for local, peer in [(SERVICES_ONLY, ROLE_SETTINGS), (ROLE_SETTINGS, SERVICES_ONLY), (Settings(), Settings())]:
            site = ready_session(initiator=True, settings=local, peer_settings=peer)
            events = feed(site, THREE)
            [failed] = of_type(events, ev.SessionFailed)
            self.assertEqual(failed.code, ErrorCode.PROTOCOL_ERROR)
            self.assertEqual(failed.reason, "REPLICAS frame without the capability in both HELLOs")
            [goaway] = sent_frames(site)
            assert isinstance(goaway, GoAway)
            self.assertEqual(goaway.code, ErrorCode.PROTOCOL_ERROR)
            self.assertIsNone(site.peer_replicas)

    def test_malformed_ends_the_session(self) -> None:
        """A malformed REPLICAS ends the site's session with the decoder's code and reason."""
        site = ready_session(initiator=True, settings=ROLE_SETTINGS, peer_settings=ROLE_SETTINGS)
        events = feed(site, raw_replicas(b"\x01a\x01" + entry_bytes(b"a", b"H:1")))
        [failed] = of_type(events, ev.SessionFailed)
        self.assertEqual(failed.code, ErrorCode.PROTOCOL_ERROR)
        self.assertIn("not in canonical form", failed.reason)
        [goaway] = sent_frames(site)
        assert isinstance(goaway, GoAway)
        self.assertEqual(goaway.reason, failed.reason)

    def test_with_the_hello_and_in_any_number(self) -> None:
        """REPLICAS may come in the read of the HELLO, and many in one read: each reported, in order."""
        site = MuxSession(initiator=True, settings=ROLE_SETTINGS)
        site.start()
        sets = [Replicas(f"r{i}", [ReplicaEntry(f"r{j}") for j in range(i + 1)]) for i in range(5)]
        events = feed(site, hello(), *sets)
        self.assertEqual(events[1:], [ev.ReplicasAnnounced(s) for s in sets])
        self.assertEqual(site.peer_replicas, sets[-1])


class MixedVersionTests(SynchronousTestCase):
    """One end offers SERVICES but not REPLICAS (the release before), in both directions."""

    def check(self, site: Settings, server: Settings) -> None:
        pair = site_and_server(site, server)
        self.assertFalse(pair.client.replicas_negotiated)
        self.assertFalse(pair.server.replicas_negotiated)
        self.assertTrue(pair.client.services_negotiated and pair.server.services_negotiated)
        # Each end sent exactly one SERVICES and nothing else after its HELLO.
        self.assertEqual(of_type(pair.events[pair.server], ev.ServicesAnnounced), [ev.ServicesAnnounced({})])
        self.assertEqual(of_type(pair.events[pair.client], ev.ServicesAnnounced), [ev.ServicesAnnounced({})])
        # Streams work both ways.
        stream_id = pair.open(pair.server, "10.0.0.5", 554)
        pair.server.send_data(stream_id, b"request", fin=True)
        self.assertEqual(received_bytes(pair.send(pair.server), stream_id), b"request")
        pair.client.send_data(stream_id, b"answer", fin=True)
        self.assertEqual(received_bytes(pair.send(pair.client), stream_id), b"answer")
        self.assertRaises(MuxUsageError, pair.server.send_replicas, THREE)
        frames = sent_frames(pair.server) + sent_frames(pair.client)
        self.assertEqual([f for f in frames if isinstance(f, Replicas)], [])
        self.assertIsNone(pair.client.peer_replicas)
        self.assertFalse(pair.client.failed or pair.server.failed)

    def test_old_site_new_server(self) -> None:
        self.check(SERVICES_ONLY, ROLE_SETTINGS)

    def test_new_site_old_server(self) -> None:
        self.check(ROLE_SETTINGS, SERVICES_ONLY)

    def test_services_still_travel(self) -> None:
        """A new site's services reach an old server with REPLICAS out of the picture."""
        site = MuxSession(initiator=True, settings=ROLE_SETTINGS, services={"web": HostPort("127.0.0.1", 80)})
        server = MuxSession(initiator=False, settings=SERVICES_ONLY)
        site.start()
        server.start()
        server_events = server.receive_data(site.data_to_send())
        site.receive_data(server.data_to_send())
        server_events += server.receive_data(site.data_to_send())
        self.assertIn(ev.ServicesAnnounced({"web": HostPort("127.0.0.1", 80)}), server_events)
        self.assertFalse(site.failed or server.failed)


class FloodAccountingTests(SynchronousTestCase):
    """A REPLICAS is a control frame the server sends when it has news: it costs no allowance and elicits nothing."""

    def test_many_replicas_are_not_a_flood(self) -> None:
        """Far more REPLICAS than any useless-frame allowance, at one instant, end nothing."""
        tight = Allowance(rate=1, burst=1)
        limits = FloodLimits(pings=tight, empty_data=tight, refused_opens=tight, reply_pause=1, reply_limit=1)
        pair = site_and_server(site_flood=limits)
        pair.now = 100.0
        for i in range(50):
            pair.server.send_replicas(Replicas("a", [ReplicaEntry("a"), ReplicaEntry(f"b{i}")]))
        events = pair.send(pair.server)
        self.assertEqual(len(of_type(events, ev.ReplicasAnnounced)), 50)
        self.assertEqual(of_type(events, ev.FloodDetected), [])
        self.assertFalse(pair.client.failed)
        self.assertEqual(pair.client.data_to_send(), b"")

    def test_no_reply_debt(self) -> None:
        """REPLICAS received while the site's peer reads nothing owe no reply; sent ones are no reply either."""
        pair = site_and_server()
        pair.client.set_peer_reading(False)
        pair.server.set_peer_reading(False)
        for _ in range(10):
            pair.server.send_replicas(THREE)
        pair.send(pair.server)
        self.assertEqual(pair.client.reply_debt, 0)
        self.assertEqual(pair.server.reply_debt, 0)
        self.assertFalse(pair.client.reading_should_pause)
