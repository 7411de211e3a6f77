"""
The HTTP CONNECT handshake of the front door
(rtunnel/frontdoor/http_connect.py), sans-IO: requests, every refusal
status, the header bounds, any chunking, and garbage.
"""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.frontdoor.http_connect import (
    ESTABLISHED,
    HttpConnectHandshake,
    Phase,
    refusal_response,
)
from rtunnel.frontdoor.names import requested_name
from rtunnel.frontdoor.refusals import HTTP_REASONS, TABLE, Refusal, RefusalKind
from rtunnel.frontdoor.steps import NEED_DATA, CheckCredentials, Refused, Request, Step

NAME = "directory.store-17.rtunnel.internal"


def basic(user: bytes, password: bytes) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"


def request(target: bytes = NAME.encode() + b":389", *fields: bytes, method: bytes = b"CONNECT") -> bytes:
    host = b"Host: " + target + b"\r\n"
    return method + b" " + target + b" HTTP/1.1\r\n" + host + b"".join(fields) + b"\r\n"


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, fields (lower-case names) and body of one response; checks its framing."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        fields[name.lower()] = value
    assert int(fields["content-length"]) == len(body), data
    return int(status), fields, body


class SuccessTests(SynchronousTestCase):
    def test_connect(self) -> None:
        """A CONNECT to a name is a Request; accepting it answers 200 Connection Established."""
        h = HttpConnectHandshake(require_auth=False)
        step = h.receive(b"CONNECT Directory.Store-17.rtunnel.internal.:389 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(step, Request(NAME, 389, None))
        self.assertEqual(h.data_to_send(), b"")
        self.assertEqual(h.phase, Phase.REQUESTED)
        h.accept()
        self.assertEqual(h.data_to_send(), b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.assertEqual(h.data_to_send(), b"")
        self.assertEqual(ESTABLISHED, b"HTTP/1.1 200 Connection Established\r\n\r\n")

    def test_early_data_kept(self) -> None:
        """Bytes after the header block (same read or later) come out once accepted."""
        h = HttpConnectHandshake(require_auth=False)
        self.assertIsInstance(h.receive(request() + b"\x16\x03\x01 hello"), Request)
        self.assertIs(h.receive(b" more"), NEED_DATA)
        h.accept()
        self.assertEqual(h.take_early_data(), b"\x16\x03\x01 hello more")

    def test_lenient_forms(self) -> None:
        """
        HTTP/1.0, bare LF line ends, empty lines before the request line, no
        Host field, Content-Length 0, mixed-case field names, OWS: all accepted.
        """
        for data in (
            b"CONNECT a.store-17.rtunnel.internal:1 HTTP/1.0\r\n\r\n",
            b"CONNECT a.store-17.rtunnel.internal:1 HTTP/1.1\n\n",
            b"\r\n\nCONNECT a.store-17.rtunnel.internal:1 HTTP/1.1\r\nHost: a\n\r\n",
            b"CONNECT a.store-17.rtunnel.internal:1 HTTP/1.1\r\nCONTENT-length:   0  \r\nUser-Agent:\t curl/8\r\n\r\n",
        ):
            h = HttpConnectHandshake(require_auth=False)
            self.assertEqual(h.receive(data), Request("a.store-17.rtunnel.internal", 1), data)

    def test_authorization_ignored_without_users(self) -> None:
        """Without users, Proxy-Authorization is not looked at (even a broken one)."""
        h = HttpConnectHandshake(require_auth=False)
        self.assertEqual(h.receive(request(NAME.encode() + b":1", b"Proxy-Authorization: Bogus\r\n")), Request(NAME, 1))

    def test_basic_credentials(self) -> None:
        """With users, Basic credentials are handed out for a check; a good check gives the Request with the user."""
        h = HttpConnectHandshake(require_auth=True)
        step = h.receive(request(NAME.encode() + b":389", basic("zoë".encode(), b"pa:ss")) + b"early")
        self.assertEqual(step, CheckCredentials("zoë", b"pa:ss"))
        self.assertEqual(h.phase, Phase.CHECKING)
        self.assertIs(h.receive(b"!"), NEED_DATA)
        self.assertEqual(h.credentials_checked(True), Request(NAME, 389, "zoë"))
        self.assertEqual(h.data_to_send(), b"")
        h.accept()
        self.assertEqual(h.take_early_data(), b"early!")

    def test_scheme_is_case_insensitive(self) -> None:
        """RFC 9110: the auth scheme is case-insensitive."""
        h = HttpConnectHandshake(require_auth=True)
        token = base64.b64encode(b"u:p")
        step = h.receive(request(NAME.encode() + b":1", b"proxy-authorization: bAsIc " + token + b"\r\n"))
        self.assertEqual(step, CheckCredentials("u", b"p"))


class RefusalTests(SynchronousTestCase):
    def refused(self, h: HttpConnectHandshake, *chunks: bytes) -> tuple[Refusal, int, dict[str, str], bytes]:
        step: Step = NEED_DATA
        out = bytearray()
        for chunk in chunks:
            step = h.receive(chunk)
            out += h.data_to_send()
        assert isinstance(step, Refused), step
        self.assertEqual(h.phase, Phase.REFUSED)
        status, fields, body = parse_response(bytes(out))
        self.assertEqual(fields["connection"], "close")
        return step.refusal, status, fields, body

    def test_other_methods(self) -> None:
        """GET, POST, or any other method: 405 with Allow: CONNECT."""
        for method in (b"GET", b"POST", b"connect", b"PRI"):
            refusal, status, fields, _ = self.refused(
                HttpConnectHandshake(require_auth=False), request(b"/", method=method)
            )
            self.assertEqual((refusal.kind, status), (RefusalKind.COMMAND_NOT_SUPPORTED, 405), method)
            self.assertEqual(fields["allow"], "CONNECT")

    def test_authentication_refusals(self) -> None:
        """
        Missing credentials, another scheme, broken Basic, two fields: 407
        with Proxy-Authenticate: Basic realm="rtunnel".
        """
        target = NAME.encode() + b":389"
        cases = [
            (request(target), RefusalKind.AUTH_REQUIRED, "no Proxy-Authorization"),
            (request(target, b"Proxy-Authorization: Bearer abc\r\n"), RefusalKind.AUTH_REQUIRED, "'Bearer'"),
            (request(target, b"Proxy-Authorization: Basic !!!\r\n"), RefusalKind.BAD_CREDENTIALS, "base64"),
            (
                request(target, b"Proxy-Authorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n"),
                RefusalKind.BAD_CREDENTIALS,
                "without ':'",
            ),
            (request(target, basic(b"u", b"")), RefusalKind.BAD_CREDENTIALS, "empty"),
            (request(target, basic(b"\xff", b"p")), RefusalKind.BAD_CREDENTIALS, "not UTF-8"),
            (request(target, basic(b"u", b"p"), basic(b"v", b"q")), RefusalKind.BAD_CREDENTIALS, "more than one"),
        ]
        for data, kind, words in cases:
            refusal, status, fields, _ = self.refused(HttpConnectHandshake(require_auth=True), data)
            self.assertEqual((refusal.kind, status), (kind, 407), data)
            self.assertIn(words, refusal.reason, data)
            self.assertEqual(fields["proxy-authenticate"], 'Basic realm="rtunnel"')

    def test_wrong_password(self) -> None:
        """A failed check: 407, and the bytes sent after the request are dropped."""
        h = HttpConnectHandshake(require_auth=True)
        h.receive(request(NAME.encode() + b":389", basic(b"eve", b"guess")) + b"secret payload")
        step = h.credentials_checked(False)
        assert isinstance(step, Refused)
        self.assertEqual(step.refusal.kind, RefusalKind.BAD_CREDENTIALS)
        status, fields, body = parse_response(h.data_to_send())
        self.assertEqual(status, 407)
        self.assertNotIn(b"secret", body)
        with self.assertRaises(RuntimeError):
            h.take_early_data()

    def test_malformed(self) -> None:
        """Each malformed request is 400 with a reason naming what is wrong."""
        ok = b"CONNECT a.b.rtunnel.internal:1 HTTP/1.1\r\n"
        cases = [
            (b"CONNECT a.b.rtunnel.internal:1\r\n\r\n", "request line"),
            (b"CONNECT  a.b.rtunnel.internal:1 HTTP/1.1\r\n\r\n", "request line"),
            (b"CONNECT a.b.rtunnel.internal:1 HTTP/2.0\r\n\r\n", "HTTP/2.0"),
            (b"CONNECT a.b.rtunnel.internal:1 HTTP/1.1\rX\r\n\r\n", "bare CR"),
            (ok + b"Host: a\r\n folded\r\n\r\n", "line folding"),
            (ok + b"Host : a\r\n\r\n", "header line"),
            (ok + b"Ho\x01st: a\r\n\r\n", "header line"),
            (ok + b"X: a\x7fb\r\n\r\n", "control character"),
            (ok + b"Content-Length: 5\r\n\r\nhello", "no content"),
            (ok + b"Transfer-Encoding: chunked\r\n\r\n", "no content"),
            (b"CONNECT a.b.rtunnel.internal HTTP/1.1\r\n\r\n", "no port"),
            (b"CONNECT a.b.rtunnel.internal:0 HTTP/1.1\r\n\r\n", "from 1 to 65535"),
            (b"CONNECT a.b.rtunnel.internal:65536 HTTP/1.1\r\n\r\n", "from 1 to 65535"),
            (b"CONNECT a.b.rtunnel.internal:x HTTP/1.1\r\n\r\n", "from 1 to 65535"),
            (b"CONNECT http://a.b.rtunnel.internal:1/ HTTP/1.1\r\n\r\n", "not HOST:PORT"),
            (b"CONNECT u@a.b.rtunnel.internal:1 HTTP/1.1\r\n\r\n", "not HOST:PORT"),
            (b"CONNECT [zz]:1 HTTP/1.1\r\n\r\n", "request target"),
        ]
        for data, words in cases:
            refusal, status, _, _ = self.refused(HttpConnectHandshake(require_auth=False), data)
            self.assertEqual((refusal.kind, status), (RefusalKind.MALFORMED, 400), data)
            self.assertIn(words, refusal.reason, data)

    def test_names(self) -> None:
        """Bad names are 400, too-long names 400 (their own kind), IP literals 403 (names are required)."""
        cases = [
            (b"a_b!.x:1", RefusalKind.NAME_INVALID, 400),
            (b"a..b.rtunnel.internal:1", RefusalKind.NAME_INVALID, 400),
            (b"x" * 64 + b".rtunnel.internal:1", RefusalKind.NAME_INVALID, 400),
            (b"a." * 150 + b"x:1", RefusalKind.NAME_TOO_LONG, 400),
            (b"10.0.0.5:80", RefusalKind.ADDRESS_TYPE, 403),
            (b"[2001:db8::5]:443", RefusalKind.ADDRESS_TYPE, 403),
            (b"[fe80::1%eth0]:443", RefusalKind.ADDRESS_TYPE, 403),
        ]
        for target, kind, code in cases:
            refusal, status, _, body = self.refused(HttpConnectHandshake(require_auth=False), request(target))
            self.assertEqual((refusal.kind, status), (kind, code), target)
            self.assertNotIn(target, body)  # the body quotes nothing the client sent

    def test_other_protocols_refused_at_once(self) -> None:
        """
        A SOCKS5 greeting or a TLS ClientHello on the HTTP port is refused
        with 400 at its first bytes, without waiting for a line end.
        """
        for data in (b"\x05\x01\x00", b"\x16\x03\x01\x02\x00", b"CONNECT a\x00"):
            refusal, status, _, _ = self.refused(HttpConnectHandshake(require_auth=False), data)
            self.assertEqual((refusal.kind, status), (RefusalKind.MALFORMED, 400))
            self.assertIn("not HTTP", refusal.reason)

    def test_stray_byte_in_a_later_chunk_of_the_request_line(self) -> None:
        """The request line is checked as it arrives, chunk after chunk."""
        h = HttpConnectHandshake(require_auth=False)
        self.assertIs(h.receive(b"CONNECT a"), NEED_DATA)
        refusal, status, _, _ = self.refused(h, b"b\x01")
        self.assertEqual(status, 400)

    def test_header_block_bounds(self) -> None:
        """
        No end of the header block within 8 KiB, a request line longer than
        that, or more than 64 fields: 431. Exactly at the bounds: accepted.
        """
        line = b"CONNECT a.b.rtunnel.internal:1 HTTP/1.1\r\n"
        filler = b"X-Filler: " + b"f" * (8192 - len(line) - 2 - 12) + b"\r\n"
        exact = line + filler + b"\r\n"
        self.assertEqual(len(exact), 8192)
        self.assertIsInstance(HttpConnectHandshake(require_auth=False).receive(exact), Request)
        cases = [
            (line + b"X: " + b"f" * 9000, "no end of the header block"),
            (line + filler.replace(b"ff", b"fff", 1) + b"\r\n", "a header block of 8193 bytes"),
            (b"CONNECT " + b"a" * 9000, "request line over"),
            (line + b"X: y\r\n" * 65 + b"\r\n", "65 header fields"),
        ]
        for data, words in cases:
            refusal, status, _, _ = self.refused(HttpConnectHandshake(require_auth=False), data)
            self.assertEqual((refusal.kind, status), (RefusalKind.HEADERS_TOO_LARGE, 431))
            self.assertIn(words, refusal.reason)
        self.assertIsInstance(
            HttpConnectHandshake(require_auth=False).receive(line + b"X: y\r\n" * 64 + b"\r\n"), Request
        )

    def test_early_data_bounded(self) -> None:
        """Bytes after the header block beyond max_early_data: 400."""
        h = HttpConnectHandshake(require_auth=False, max_early_data=4)
        self.assertIsInstance(h.receive(request() + b"1234"), Request)
        refusal, status, _, _ = self.refused(h, b"5")
        self.assertEqual((refusal.kind, status), (RefusalKind.MALFORMED, 400))
        h = HttpConnectHandshake(require_auth=False, max_early_data=4)
        refusal, status, _, _ = self.refused(h, request() + b"12345")
        self.assertEqual(status, 400)

    def test_every_kind_has_its_status(self) -> None:
        """
        refuse() after a Request answers each kind with the table's status,
        its reason phrase, the right extra field, and a body naming only the kind.
        """
        for kind, codes in TABLE.items():
            h = HttpConnectHandshake(require_auth=False)
            h.receive(request() + b"never forwarded")
            h.refuse(Refusal(kind, "site secret-site unknown"))
            data = h.data_to_send()
            status, fields, body = parse_response(data)
            self.assertEqual(status, codes.http, kind)
            self.assertTrue(data.startswith(f"HTTP/1.1 {status} {HTTP_REASONS[status]}\r\n".encode()))
            self.assertEqual(body, f"{status} {HTTP_REASONS[status]}: {codes.log}\n".encode())
            self.assertEqual("allow" in fields, status == 405)
            self.assertEqual("proxy-authenticate" in fields, status == 407)
            self.assertEqual(refusal_response(Refusal(kind, "")), data)
        self.assertEqual({c.http for c in TABLE.values()} - set(HTTP_REASONS), set())


class MisuseTests(SynchronousTestCase):
    def test_caller_misuse_raises(self) -> None:
        """Accepting or answering a check at the wrong time, feeding after accept: loud."""
        h = HttpConnectHandshake(require_auth=False)
        with self.assertRaises(RuntimeError):
            h.accept()
        with self.assertRaises(RuntimeError):
            h.credentials_checked(True)
        h.receive(request())
        h.accept()
        with self.assertRaises(RuntimeError):
            h.receive(b"x")
        with self.assertRaises(RuntimeError):
            h.refuse(Refusal(RefusalKind.INTERNAL, ""))


SESSIONS = [
    (False, request() + b"early"),
    (True, request(NAME.encode() + b":389", basic(b"alice", b"pw")) + b"after"),
    (True, request(NAME.encode() + b":389", basic(b"alice", b"nope"))),
    (False, b"\r\n" + request(b"10.0.0.1:22")),
    (False, request(b"/", method=b"GET")),
    (False, b"CONNECT a.b.rtunnel.internal:1 HTTP/1.1\nX: y\n\nz"),
]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


def run(h: HttpConnectHandshake, chunks: list[bytes], good: bool | None = None) -> tuple[list[Step], bytes]:
    """Feed chunks as the adapter does; answer checks with C{good} (default: alice/pw)."""
    steps: list[Step] = []
    out = bytearray()
    for chunk in chunks:
        if steps and isinstance(steps[-1], Refused):
            break
        step = h.receive(chunk)
        out += h.data_to_send()
        while isinstance(step, CheckCredentials):
            steps.append(step)
            ok = good if good is not None else (step.user, step.password) == ("alice", b"pw")
            step = h.credentials_checked(ok)
            out += h.data_to_send()
        if step is not NEED_DATA:
            steps.append(step)
    return steps, bytes(out)


class ChunkingTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(SESSIONS), st.lists(st.integers(0, 400), max_size=30))
    def test_any_chunking_same_outcome(self, session: tuple[bool, bytes], cuts: list[int]) -> None:
        """However the bytes are cut into reads, the steps, the output and the early data are those of one read."""
        require_auth, data = session
        whole_h = HttpConnectHandshake(require_auth=require_auth)
        parts_h = HttpConnectHandshake(require_auth=require_auth)
        whole = run(whole_h, [data])
        parts = run(parts_h, chunked(data, cuts))
        self.assertEqual(parts, whole)
        if whole[0] and isinstance(whole[0][-1], Request):
            whole_h.accept()
            parts_h.accept()
            self.assertEqual(parts_h.take_early_data(), whole_h.take_early_data())

    def test_one_byte_at_a_time(self) -> None:
        """Every session fed one byte per read gives the one-read outcome."""
        for require_auth, data in SESSIONS:
            whole = run(HttpConnectHandshake(require_auth=require_auth), [data])
            single = run(HttpConnectHandshake(require_auth=require_auth), [data[i : i + 1] for i in range(len(data))])
            self.assertEqual(single, whole, data)


_HTTPISH = st.lists(
    st.sampled_from(
        [
            b"CONNECT ",
            b"GET ",
            b"a.store-17.rtunnel.internal:80",
            b"10.0.0.1:1",
            b"[::1]:2",
            b" HTTP/1.1",
            b"\r\n",
            b"\n",
            b"\r",
            b"Proxy-Authorization: Basic ",
            base64.b64encode(b"alice:pw"),
            b"Content-Length: 0",
            b"Host: x",
            b":",
            b" ",
            b"\x00",
            b"\xff",
        ]
    ),
    max_size=25,
).map(b"".join)


class GarbageTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(
        st.booleans(),
        st.one_of(st.binary(max_size=400), _HTTPISH),
        st.lists(st.integers(0, 400), max_size=8),
        st.booleans(),
    )
    def test_garbage_gives_a_defined_outcome(self, require_auth: bool, data: bytes, cuts: list[int], ok: bool) -> None:
        """
        Arbitrary bytes (random, and shuffled pieces of real requests) never
        raise: more data is needed, or a Request with a canonical name, or a
        refusal with a complete response of the table's status for its kind.
        """
        h = HttpConnectHandshake(require_auth=require_auth, max_header_bytes=256, max_early_data=64)
        steps, out = run(h, chunked(data, cuts), good=ok)
        last = steps[-1] if steps else NEED_DATA
        if isinstance(last, Refused):
            status, _, _ = parse_response(out)
            self.assertEqual(status, TABLE[last.refusal.kind].http)
        elif isinstance(last, Request):
            self.assertEqual(out, b"")
            self.assertEqual(requested_name(last.name), last.name)
            self.assertTrue(1 <= last.port <= 65535)
        else:
            self.assertEqual(out, b"")
            self.assertIn(h.phase, (Phase.HEADERS, Phase.CHECKING))
