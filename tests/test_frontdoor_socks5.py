"""
The SOCKS5 handshake of the front door (rtunnel/frontdoor/socks5.py),
sans-IO: every reply byte, every refusal code, any chunking, and garbage.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.frontdoor.names import requested_name
from rtunnel.frontdoor.refusals import TABLE, Refusal, RefusalKind, SocksReply
from rtunnel.frontdoor.socks5 import Phase, Socks5Handshake, socks_reply
from rtunnel.frontdoor.steps import NEED_DATA, CheckCredentials, Refused, Request, Step

NAME = b"directory.store-17.rtunnel.internal"
SUCCESS = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def auth(user: bytes, password: bytes, version: int = 1) -> bytes:
    return bytes((version, len(user))) + user + bytes((len(password),)) + password


def connect(name: bytes = NAME, port: int = 389, command: int = 1, reserved: int = 0) -> bytes:
    return bytes((5, command, reserved, 3, len(name))) + name + port.to_bytes(2, "big")


def connect_ip(address: str, port: int = 80) -> bytes:
    ip = ipaddress.ip_address(address)
    return bytes((5, 1, 0, 1 if ip.version == 4 else 4)) + ip.packed + port.to_bytes(2, "big")


def reply(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


class Transcript:
    """
    Drives a handshake over chunks the way the adapter does and records
    every step other than NEED_DATA and everything written. Passwords are
    checked at once (C{defer_checks=False}) or only after every chunk was
    fed (the client keeps writing while the check runs).
    """

    def __init__(self, handshake: Socks5Handshake, good: dict[str, bytes] | None = None) -> None:
        self.handshake = handshake
        self.good = good or {}
        self.steps: list[Step] = []
        self.out = bytearray()
        self._waiting: CheckCredentials | None = None

    def _take(self, step: Step) -> None:
        self.out += self.handshake.data_to_send()
        if step is NEED_DATA:
            return
        self.steps.append(step)
        if isinstance(step, CheckCredentials):
            self._waiting = step

    def _answer(self) -> None:
        while self._waiting is not None:
            step, self._waiting = self._waiting, None
            self._take(self.handshake.credentials_checked(self.good.get(step.user) == step.password))

    def feed(self, chunks: list[bytes], defer_checks: bool = False) -> Transcript:
        for chunk in chunks:
            if isinstance(self.last, Refused):
                break  # the adapter reads nothing after a refusal
            self._take(self.handshake.receive(chunk))
            if not defer_checks:
                self._answer()
        self._answer()
        return self

    @property
    def last(self) -> Step:
        return self.steps[-1] if self.steps else NEED_DATA


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


class SuccessTests(SynchronousTestCase):
    def test_no_authentication(self) -> None:
        """
        Greeting with method 0, CONNECT to a name: the method reply, then a
        Request with the canonical name and port, and no user.
        """
        h = Socks5Handshake(require_auth=False)
        self.assertIs(h.receive(greeting(0)), NEED_DATA)
        self.assertEqual(h.data_to_send(), b"\x05\x00")
        step = h.receive(connect(b"Directory.Store-17.RTUNNEL.internal.", 389))
        self.assertEqual(step, Request("directory.store-17.rtunnel.internal", 389, None))
        self.assertEqual(h.data_to_send(), b"")
        self.assertEqual(h.phase, Phase.REQUESTED)
        h.accept()
        self.assertEqual(h.data_to_send(), SUCCESS)
        self.assertEqual(h.take_early_data(), b"")

    def test_success_reply_is_zero_address(self) -> None:
        """The success reply is REP 0 with BND.ADDR 0.0.0.0:0 (IPv4 type), 10 bytes."""
        self.assertEqual(socks_reply(SocksReply.SUCCEEDED), SUCCESS)

    def test_client_offering_several_methods(self) -> None:
        """Without users, method 0 is chosen even when the client also offers 2 (curl does)."""
        h = Socks5Handshake(require_auth=False)
        h.receive(greeting(2, 0, 1))
        self.assertEqual(h.data_to_send(), b"\x05\x00")

    def test_password(self) -> None:
        """
        With users: method 2 is chosen, the credentials are handed out for a
        check, status 0 follows a good check, and the Request carries the user.
        """
        h = Socks5Handshake(require_auth=True)
        h.receive(greeting(0, 2))
        self.assertEqual(h.data_to_send(), b"\x05\x02")
        step = h.receive(auth(b"federation", b"s3cret"))
        self.assertEqual(step, CheckCredentials("federation", b"s3cret"))
        self.assertNotIn("s3cret", repr(step))
        self.assertEqual(h.phase, Phase.CHECKING)
        self.assertEqual(h.data_to_send(), b"")
        self.assertIs(h.credentials_checked(True), NEED_DATA)
        self.assertEqual(h.data_to_send(), b"\x01\x00")
        self.assertEqual(h.receive(connect()), Request(NAME.decode(), 389, "federation"))

    def test_request_sent_during_the_check(self) -> None:
        """A request the client pipelined while its password was checked is handled after the check."""
        h = Socks5Handshake(require_auth=True)
        step = h.receive(greeting(2) + auth(b"u", b"p") + connect() + b"early")
        self.assertEqual(step, CheckCredentials("u", b"p"))
        self.assertEqual(h.data_to_send(), b"\x05\x02")
        self.assertIs(h.receive(b" more"), NEED_DATA)
        self.assertEqual(h.credentials_checked(True), Request(NAME.decode(), 389, "u"))
        self.assertEqual(h.data_to_send(), b"\x01\x00")
        h.accept()
        self.assertEqual(h.take_early_data(), b"early more")

    def test_pipelined_data_is_kept_for_the_stream(self) -> None:
        """Bytes after the request, in the same read and later, come out once accepted, in order."""
        h = Socks5Handshake(require_auth=False)
        self.assertIsInstance(h.receive(greeting(0) + connect() + b"GET / HTTP/1.1\r\n"), Request)
        self.assertIs(h.receive(b"Host: x\r\n\r\n"), NEED_DATA)
        with self.assertRaises(RuntimeError):
            h.take_early_data()  # not before the stream is open
        h.accept()
        self.assertEqual(h.take_early_data(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(h.take_early_data(), b"")

    def test_utf8_user_name(self) -> None:
        """RFC 1929 user names are bytes; UTF-8 ones come out as text."""
        h = Socks5Handshake(require_auth=True)
        step = h.receive(greeting(2) + auth("zoë".encode(), b"pw"))
        self.assertEqual(step, CheckCredentials("zoë", b"pw"))


class RefusalTests(SynchronousTestCase):
    def refused(self, h: Socks5Handshake, data: bytes) -> tuple[Refusal, bytes]:
        out = bytearray()
        step: Step = NEED_DATA
        for part in (data,):
            step = h.receive(part)
            out += h.data_to_send()
        assert isinstance(step, Refused), step
        self.assertEqual(h.phase, Phase.REFUSED)
        return step.refusal, bytes(out)

    def test_not_version_5(self) -> None:
        """SOCKS4, HTTP or TLS on the SOCKS port: closed without a reply, at the first byte."""
        for first in (b"\x04\x01\x00\x50", b"CONNECT ", b"\x16\x03\x01"):
            refusal, out = self.refused(Socks5Handshake(require_auth=False), first[:1])
            self.assertEqual(refusal.kind, RefusalKind.MALFORMED, first)
            self.assertIn(f"0x{first[0]:02x}", refusal.reason)
            self.assertEqual(out, b"")

    def test_no_acceptable_method(self) -> None:
        """
        Without users, a client offering only username/password (or nothing)
        gets method 0xFF: nothing would check what it sends.
        """
        for methods in ((2,), ()):
            refusal, out = self.refused(Socks5Handshake(require_auth=False), greeting(*methods))
            self.assertEqual(refusal.kind, RefusalKind.NO_ACCEPTABLE_METHOD)
            self.assertEqual(out, b"\x05\xff")

    def test_authentication_required(self) -> None:
        """With users, a client not offering username/password gets method 0xFF."""
        refusal, out = self.refused(Socks5Handshake(require_auth=True), greeting(0, 1))
        self.assertEqual(refusal.kind, RefusalKind.AUTH_REQUIRED)
        self.assertIn("0x00, 0x01", refusal.reason)
        self.assertEqual(out, b"\x05\xff")

    def test_bad_credentials(self) -> None:
        """A failed check answers RFC 1929 status 1 and refuses; nothing pipelined survives."""
        h = Socks5Handshake(require_auth=True)
        h.receive(greeting(2) + auth(b"eve", b"guess") + connect() + b"data")
        h.data_to_send()
        step = h.credentials_checked(False)
        assert isinstance(step, Refused)
        self.assertEqual(step.refusal.kind, RefusalKind.BAD_CREDENTIALS)
        self.assertIn("'eve'", step.refusal.reason)
        self.assertEqual(h.data_to_send(), b"\x01\x01")
        with self.assertRaises(RuntimeError):
            h.take_early_data()

    def test_malformed_authentication(self) -> None:
        """A wrong sub-negotiation version, an empty user, an empty password, a non-UTF-8 user: status 1."""
        cases = [
            (auth(b"u", b"p", version=5), RefusalKind.MALFORMED),
            (b"\x01\x00\x01p", RefusalKind.MALFORMED),
            (auth(b"u", b""), RefusalKind.BAD_CREDENTIALS),
            (auth(b"\xff\xfe", b"p"), RefusalKind.BAD_CREDENTIALS),
        ]
        for data, kind in cases:
            h = Socks5Handshake(require_auth=True)
            h.receive(greeting(2))
            h.data_to_send()
            refusal, out = self.refused(h, data)
            self.assertEqual((refusal.kind, out), (kind, b"\x01\x01"), data)

    def test_request_refusals(self) -> None:
        """Each malformed or unsupported request gets its REP code, then the handshake stays refused."""
        cases = [
            (b"\x04\x01\x00\x03", RefusalKind.MALFORMED, 0x01, "request version"),
            (connect(command=2), RefusalKind.COMMAND_NOT_SUPPORTED, 0x07, "BIND"),
            (connect(command=3), RefusalKind.COMMAND_NOT_SUPPORTED, 0x07, "UDP ASSOCIATE"),
            (connect(command=9), RefusalKind.COMMAND_NOT_SUPPORTED, 0x07, "0x09"),
            (connect(reserved=1), RefusalKind.MALFORMED, 0x01, "reserved"),
            (connect_ip("10.0.0.5", 80), RefusalKind.ADDRESS_TYPE, 0x08, "10.0.0.5:80"),
            (connect_ip("2001:db8::5", 443), RefusalKind.ADDRESS_TYPE, 0x08, "[2001:db8::5]:443"),
            (b"\x05\x01\x00\x07", RefusalKind.ADDRESS_TYPE, 0x08, "unknown address type 0x07"),
            (connect(b""), RefusalKind.NAME_INVALID, 0x01, "empty"),
            (connect(b"a b.store-17.rtunnel.internal"), RefusalKind.NAME_INVALID, 0x01, "' '"),
            (connect(b"a\x1b[31m.x"), RefusalKind.NAME_INVALID, 0x01, "\\x1b"),
            (connect("dïrectory.x".encode()), RefusalKind.NAME_INVALID, 0x01, "not ASCII"),
            (connect(b"a..b"), RefusalKind.NAME_INVALID, 0x01, "empty label"),
            (connect(b"a" * 64 + b".x"), RefusalKind.NAME_INVALID, 0x01, "at most 63"),
            (connect(b"a." * 127 + b"a"), RefusalKind.NAME_TOO_LONG, 0x01, "at most 253"),
            (connect(b"10.0.0.5"), RefusalKind.ADDRESS_TYPE, 0x08, "names only"),
            (connect(port=0), RefusalKind.MALFORMED, 0x01, "port 0"),
        ]
        for data, kind, code, words in cases:
            h = Socks5Handshake(require_auth=False)
            h.receive(greeting(0))
            h.data_to_send()
            refusal, out = self.refused(h, data)
            self.assertEqual(refusal.kind, kind, data)
            self.assertIn(words, refusal.reason, data)
            self.assertEqual(out, reply(code), data)
            self.assertEqual(TABLE[kind].socks, code)
            self.assertEqual(h.receive(b"more"), Refused(refusal))
            self.assertEqual(h.data_to_send(), b"")

    def test_name_of_255_bytes(self) -> None:
        """The longest name SOCKS can carry is refused as too long, not misparsed."""
        h = Socks5Handshake(require_auth=False)
        refusal, out = self.refused(h, greeting(0) + connect(b"a" * 255))
        self.assertEqual(refusal.kind, RefusalKind.NAME_TOO_LONG)
        self.assertEqual(out, b"\x05\x00" + reply(1))

    def test_longest_name(self) -> None:
        """A name of 253 characters (254 bytes with its trailing dot) is a request."""
        h = Socks5Handshake(require_auth=False)
        step = h.receive(greeting(0) + connect(b"a." * 127))
        self.assertEqual(step, Request("a." * 126 + "a", 389))

    def test_every_routing_refusal_has_its_code(self) -> None:
        """
        After a Request, refuse() answers with the table's REP code for
        every kind that has one, and closes without a reply for the others.
        """
        for kind, codes in TABLE.items():
            h = Socks5Handshake(require_auth=False)
            h.receive(greeting(0) + connect() + b"never forwarded")
            h.data_to_send()
            step = h.refuse(Refusal(kind, "because"))
            self.assertEqual(step, Refused(Refusal(kind, "because")))
            self.assertEqual(h.data_to_send(), b"" if codes.socks is None else reply(codes.socks), kind)
            with self.assertRaises(RuntimeError):
                h.accept()

    def test_early_data_is_bounded(self) -> None:
        """More than max_early_data bytes between request and reply: refused with REP 1."""
        h = Socks5Handshake(require_auth=False, max_early_data=10)
        self.assertIsInstance(h.receive(greeting(0) + connect() + b"0123456789"), Request)
        step = h.receive(b"x")
        assert isinstance(step, Refused)
        self.assertEqual(step.refusal.kind, RefusalKind.MALFORMED)
        self.assertEqual(h.data_to_send(), b"\x05\x00" + reply(1))

    def test_early_data_in_the_request_read_is_bounded(self) -> None:
        """The bound also holds for bytes that came in the same read as the request."""
        h = Socks5Handshake(require_auth=False, max_early_data=3)
        step = h.receive(greeting(0) + connect() + b"abcd")
        assert isinstance(step, Refused)
        self.assertEqual(h.data_to_send(), b"\x05\x00" + reply(1))

    def test_input_during_check_is_bounded(self) -> None:
        """While a password is checked, at most a request and the early-data bound are kept."""
        h = Socks5Handshake(require_auth=True, max_early_data=10)
        self.assertIsInstance(h.receive(greeting(2) + auth(b"u", b"p")), CheckCredentials)
        h.data_to_send()
        self.assertIs(h.receive(b"x" * 272), NEED_DATA)
        step = h.receive(b"x")
        assert isinstance(step, Refused)
        self.assertEqual(h.data_to_send(), b"\x01\x01")


class MisuseTests(SynchronousTestCase):
    def test_caller_misuse_raises(self) -> None:
        """The adapter's own mistakes are loud: accept or check at the wrong time, bytes after accept."""
        h = Socks5Handshake(require_auth=False)
        with self.assertRaises(RuntimeError):
            h.accept()
        with self.assertRaises(RuntimeError):
            h.credentials_checked(True)
        h.receive(greeting(0) + connect())
        h.accept()
        with self.assertRaises(RuntimeError):
            h.receive(b"x")
        with self.assertRaises(RuntimeError):
            h.refuse(Refusal(RefusalKind.INTERNAL, ""))

    def test_refuse_twice_keeps_the_first(self) -> None:
        """A second refusal changes nothing and sends nothing."""
        h = Socks5Handshake(require_auth=False)
        h.receive(greeting(0) + connect())
        first = h.refuse(Refusal(RefusalKind.UNKNOWN_SITE, "a"))
        h.data_to_send()
        self.assertEqual(h.refuse(Refusal(RefusalKind.INTERNAL, "b")), first)
        self.assertEqual(h.data_to_send(), b"")


SESSIONS = [
    (False, greeting(0) + connect() + b"early bytes"),
    (True, greeting(0, 2) + auth(b"alice", b"pw") + connect(b"cam.store-17.rtunnel.internal", 554) + b"x"),
    (True, greeting(2) + auth(b"alice", b"wrong") + connect()),
    (False, greeting(0) + connect_ip("10.1.2.3", 22)),
    (False, greeting(0) + connect(command=2)),
]


class ChunkingTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(SESSIONS),
        st.lists(st.integers(0, 400), max_size=30),
        st.booleans(),
    )
    def test_any_chunking_same_outcome(self, session: tuple[bool, bytes], cuts: list[int], defer_checks: bool) -> None:
        """
        However the client's bytes are cut into reads, and whether the
        password check answers at once or after everything arrived, the
        steps, the bytes written and the early data are the same as for one
        read.
        """
        require_auth, data = session
        whole = Transcript(Socks5Handshake(require_auth=require_auth), {"alice": b"pw"}).feed([data])
        parts = Transcript(Socks5Handshake(require_auth=require_auth), {"alice": b"pw"}).feed(
            chunked(data, cuts), defer_checks
        )
        self.assertEqual(parts.steps, whole.steps)
        self.assertEqual(bytes(parts.out), bytes(whole.out))
        if isinstance(whole.last, Request):
            whole.handshake.accept()
            parts.handshake.accept()
            self.assertEqual(parts.handshake.take_early_data(), whole.handshake.take_early_data())

    def test_one_byte_at_a_time(self) -> None:
        """Every session fed one byte per read gives the one-read outcome."""
        for require_auth, data in SESSIONS:
            whole = Transcript(Socks5Handshake(require_auth=require_auth), {"alice": b"pw"}).feed([data])
            single = [data[i : i + 1] for i in range(len(data))]
            parts = Transcript(Socks5Handshake(require_auth=require_auth), {"alice": b"pw"}).feed(single)
            self.assertEqual((parts.steps, parts.out), (whole.steps, whole.out))


#: The replies a refusal may write, by phase: nothing, method 0xFF, RFC 1929 failure, a REP code.
_REFUSAL_OUTPUTS = {b"", b"\x05\xff", b"\x01\x01"} | {reply(c) for c in range(1, 9)}


class GarbageTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.booleans(), st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8), st.booleans())
    def test_garbage_gives_a_defined_outcome(
        self, require_auth: bool, data: bytes, cuts: list[int], good_password: bool
    ) -> None:
        """
        Arbitrary bytes never raise: the handshake needs more data, asks for
        a check, makes a request, or refuses with one of its defined replies.
        """
        h = Socks5Handshake(require_auth=require_auth, max_early_data=64)
        last: Step = NEED_DATA
        out = bytearray()
        for chunk in chunked(data, cuts):
            if isinstance(last, Refused):
                break
            step = h.receive(chunk)
            out += h.data_to_send()
            while isinstance(step, CheckCredentials):
                step = h.credentials_checked(good_password)
                out += h.data_to_send()
            if step is not NEED_DATA:
                last = step
        if isinstance(last, Refused):
            self.assertEqual(h.phase, Phase.REFUSED)
            self.assertIsInstance(last.refusal.kind, RefusalKind)
            # The refusal's reply ends what was written.
            self.assertTrue(any(bytes(out).endswith(r) for r in _REFUSAL_OUTPUTS))
        elif isinstance(last, Request):
            self.assertEqual(h.phase, Phase.REQUESTED)
            self.assertTrue(1 <= last.port <= 65535)
            self.assertEqual(requested_name(last.name), last.name)
        else:
            self.assertIn(h.phase, (Phase.GREETING, Phase.AUTH, Phase.REQUEST, Phase.CHECKING))
