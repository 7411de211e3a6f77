"""
Tests for the enrollment exchange: the sans-IO codec
(L{rtunnel.identity.enrollment}) and the Twisted protocols
(L{rtunnel.roles.enrollment}), the latter over real TLS in memory.
"""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from zope.interface import implementer

from rtunnel.identity import certs
from rtunnel.identity.enrollment import (
    MAGIC,
    MAX_MESSAGE_SIZE,
    EnrollAccepted,
    EnrollRejected,
    EnrollRequest,
    ReplyReader,
    RequestReader,
    decode_reply,
    encode_reply,
    encode_request,
    is_enrollment_prefix,
)
from rtunnel.identity.errors import (
    EnrollmentIncomplete,
    EnrollmentProtocolError,
    EnrollmentRefused,
    PeerVerificationFailed,
)
from rtunnel.identity.keyfile import Keyfile, token_digest
from rtunnel.identity.state import ServerState, SiteState
from rtunnel.identity.tlsconfig import peer_identity, server_tls_options, site_tls_options
from rtunnel.roles.enrollment import EnrollmentRequester, EnrollmentResponder, enroll
from tests.helpers_identity import Authority, Recorder, TestCase, tls_pair

_REQUEST = EnrollRequest("alpha", "T" * 43, "-----BEGIN CERTIFICATE REQUEST-----\n...")
#: the token digest a test's pending key is bound to (these tests need no real keyfile)
PENDING_FOR = "ab" * 32

texts = st.text(max_size=200)


def _feed(reader: Any, data: bytes, cuts: list[int]) -> list[Any]:
    """
    Feed C{data} to C{reader} split at C{cuts}; return what each call gave.
    """
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [reader.receive_data(data[a:b]) for a, b in zip(points, points[1:], strict=False)]


def _header(length: int) -> bytes:
    return MAGIC + struct.pack(">I", length)


def _body(document: object) -> bytes:
    raw = json.dumps(document).encode()
    return _header(len(raw)) + raw


# -- codec ---------------------------------------------------------------


@given(site=texts, token=texts, csr=texts, cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_request_round_trip_in_any_chunking(site: str, token: str, csr: str, cuts: list[int]) -> None:
    """
    A request decodes to itself however the bytes are split, and only the
    last piece yields it.
    """
    request = EnrollRequest(site, token, csr)
    results = _feed(RequestReader(), encode_request(request), cuts)
    assert results[-1] == request
    assert all(r is None for r in results[:-1])


printable_texts = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")).filter(lambda c: c != "\\")
    | st.just(" "),
    max_size=200,
)


@given(
    reply=st.one_of(
        st.builds(EnrollAccepted, texts),
        st.builds(EnrollRejected, printable_texts.filter(lambda t: len(t) <= 64), printable_texts),
    ),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_reply_round_trip_in_any_chunking(reply: Any, cuts: list[int]) -> None:
    """
    A reply (accepted or rejected) decodes to itself however split.
    """
    results = _feed(ReplyReader(), encode_reply(reply), cuts)
    assert results[-1] == reply


def test_refusal_text_is_escaped() -> None:
    """
    A refusal's code and message are for humans (the site logs them and
    prints them on stderr): a carriage return, an ANSI escape or a bidi
    control in them arrives escaped, so it cannot forge or hide a line.
    """
    raw = EnrollRejected("token-spent\x1b[2J", "spent\r\n2026-01-01 [-] site enrolled\u202e")
    [reply] = [r for r in _feed(ReplyReader(), encode_reply(raw), []) if r is not None]
    assert reply == EnrollRejected("token-spent\\x1b[2J", "spent\\r\\n2026-01-01 [-] site enrolled\\u202e")


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_garbage_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    """
    Arbitrary bytes, with or without a valid header in front, either wait
    for more or raise EnrollmentProtocolError; nothing else escapes.
    """
    for payload in (data, _header(len(data)) + data, MAGIC + data):
        reader = RequestReader()
        try:
            _feed(reader, payload, cuts)
        except EnrollmentProtocolError:
            pass


def test_messages_start_with_magic_unlike_mux() -> None:
    """
    Enrollment messages start with b"RTEN", never with the 0x00 of the
    multiplexer's HELLO frame, so a server can tell them apart at the
    first byte.
    """
    encoded = encode_request(_REQUEST)
    assert encoded[:4] == b"RTEN"
    assert encode_reply(EnrollAccepted("x"))[:4] == b"RTEN"
    assert is_enrollment_prefix(b"") and is_enrollment_prefix(b"RT")
    assert is_enrollment_prefix(encoded)
    assert not is_enrollment_prefix(b"\x00")
    assert not is_enrollment_prefix(b"RTEX")


def test_first_wrong_byte_fails_at_once() -> None:
    """
    A mux HELLO (first byte 0x00) is rejected on its first byte.
    """
    with pytest.raises(EnrollmentProtocolError, match="not an enrollment message"):
        RequestReader().receive_data(b"\x00")


def test_size_cap_is_checked_at_the_length_prefix() -> None:
    """
    A length over 64 KiB is rejected as soon as the 8-byte header is in,
    without waiting for (or buffering) the body.
    """
    reader = RequestReader()
    assert reader.receive_data(_header(MAX_MESSAGE_SIZE + 1)[:7]) is None
    with pytest.raises(EnrollmentProtocolError, match="65537 bytes exceeds the 65536-byte limit"):
        reader.receive_data(_header(MAX_MESSAGE_SIZE + 1)[7:])


def test_message_of_exactly_the_cap_is_accepted() -> None:
    """
    A request of exactly 64 KiB decodes.
    """
    document = {"type": "enroll", "version": 1, "site": "a", "token": "t", "csr": ""}
    padding = MAX_MESSAGE_SIZE - len(json.dumps(document).encode())
    document["csr"] = "x" * padding
    data = _body(document)
    assert len(data) == 8 + MAX_MESSAGE_SIZE
    request = RequestReader().receive_data(data)
    assert request is not None and len(request.csr_pem) == padding


def test_encoding_over_the_cap_is_refused() -> None:
    """
    The encoder refuses to produce a message the peer would reject.
    """
    with pytest.raises(ValueError):
        encode_request(EnrollRequest("a", "t", "x" * MAX_MESSAGE_SIZE))


def test_data_after_the_message() -> None:
    """
    Bytes after the one message are an error, whether they arrive with it
    or later.
    """
    data = encode_request(_REQUEST)
    with pytest.raises(EnrollmentProtocolError, match="after the enrollment message"):
        RequestReader().receive_data(data + b"x")
    reader = RequestReader()
    reader.receive_data(data)
    assert reader.done
    assert reader.receive_data(b"") is None
    with pytest.raises(EnrollmentProtocolError, match="after the enrollment message"):
        reader.receive_data(b"x")


_GOOD = {"type": "enroll", "version": 1, "site": "a", "token": "t", "csr": "c"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_header(0), "is empty"),
        (_header(2) + b"\xff\xfe", "not UTF-8"),
        (_header(1) + b"{", "not valid JSON"),
        (_body([1]), "not a JSON object"),
        (_body({**_GOOD, "type": "hello"}), "type 'hello', expected 'enroll'"),
        (_body({k: v for k, v in _GOOD.items() if k != "type"}), "type None"),
        (_body({**_GOOD, "version": 2}), "version 2 is not supported"),
        (_body({**_GOOD, "version": True}), "version True is not supported"),
        (_body({k: v for k, v in _GOOD.items() if k != "token"}), "no 'token' field"),
        (_body({**_GOOD, "site": 7}), "'site' must be a string"),
        (_body({**_GOOD, "token": "t" * 257}), "'token' is longer than 256"),
    ],
)
def test_malformed_requests(data: bytes, message: str) -> None:
    """
    Each kind of malformed request has its own message.
    """
    with pytest.raises(EnrollmentProtocolError, match=message):
        RequestReader().receive_data(data)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "no boolean 'ok'"),
        ({"ok": "yes"}, "no boolean 'ok'"),
        ({"ok": True}, "no 'certificate' field"),
        ({"ok": False, "code": "x" * 65, "message": ""}, "'code' is longer than 64"),
        ({"ok": False, "code": "c"}, "no 'message' field"),
    ],
)
def test_malformed_replies(document: dict[str, Any], message: str) -> None:
    """
    Malformed replies are protocol errors with a specific message.
    """
    with pytest.raises(EnrollmentProtocolError, match=message):
        decode_reply(json.dumps(document).encode())


def test_token_not_in_request_repr() -> None:
    """
    The token does not appear in the request's repr (log lines).
    """
    assert "TTTT" not in repr(_REQUEST)


# -- responder and requester over a plain transport ------------------------


class _Enroller:
    def __init__(self, outcome: str | Exception = "CERT") -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, str, str, datetime]] = []

    def enroll(self, site: str, token: str, csr_pem: str, now: datetime) -> str:
        self.calls.append((site, token, csr_pem, now))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


_CERT_PEM = certs.dump_certificate(Authority.create().server_certificate)


class ResponderTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_900_000_000)
        self.transport = StringTransport()

    def respond(self, enroller: _Enroller, data: bytes, **kwargs: Any) -> EnrollmentResponder:
        responder = EnrollmentResponder(enroller, self.clock, peer="192.0.2.5:4000", **kwargs)
        responder.makeConnection(self.transport)
        responder.dataReceived(data)
        return responder

    def reply(self) -> Any:
        reader = ReplyReader()
        return reader.receive_data(self.transport.value())

    def test_success(self) -> None:
        """
        A complete request is passed to the enroller with the clock's time;
        the certificate goes back, the connection closes, the timer is gone,
        and the enrollment is logged.
        """
        enroller = _Enroller(_CERT_PEM)
        with capturedLogs() as events:
            self.respond(enroller, encode_request(_REQUEST))
        [(site, token, csr, now)] = enroller.calls
        self.assertEqual((site, token, csr), ("alpha", "T" * 43, _REQUEST.csr_pem))
        self.assertEqual(now, datetime.fromtimestamp(1_900_000_000, UTC))
        self.assertEqual(self.reply(), EnrollAccepted(_CERT_PEM))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [event] = [e for e in events if e.get("log_namespace", "").endswith("EnrollmentResponder")]
        self.assertEqual(event["log_format"], "enrolled site {site} from {peer}: certificate {fingerprint}")
        self.assertEqual((event["site"], event["peer"]), ("alpha", "192.0.2.5:4000"))

    def test_refusal_is_replied_and_logged(self) -> None:
        """
        A refusal goes back with its code and message, and is logged as a
        structured event with site, peer, code and message.
        """
        enroller = _Enroller(EnrollmentRefused("token-spent", "already used"))
        with capturedLogs() as events:
            self.respond(enroller, encode_request(_REQUEST))
        self.assertEqual(self.reply(), EnrollRejected("token-spent", "already used"))
        [event] = [e for e in events if "refused" in e["log_format"]]
        self.assertEqual(
            event["log_format"],
            "enrollment refused for site {site} from {peer}: {code}: {reason}",
        )
        self.assertEqual(
            (event["site"], event["peer"], event["code"], event["reason"]),
            ("alpha", "192.0.2.5:4000", "token-spent", "already used"),
        )

    def test_byte_by_byte(self) -> None:
        """
        A request arriving one byte at a time is handled once, at the end.
        """
        enroller = _Enroller(_CERT_PEM)
        responder = self.respond(enroller, b"")
        for byte in encode_request(_REQUEST):
            responder.dataReceived(bytes([byte]))
        self.assertEqual(len(enroller.calls), 1)
        self.assertEqual(self.reply(), EnrollAccepted(_CERT_PEM))

    def test_malformed_request(self) -> None:
        """
        Garbage gets a bad-request reply and the connection closes; the
        enroller is not consulted.
        """
        enroller = _Enroller()
        self.respond(enroller, _body({"type": "nope"}))
        reply = self.reply()
        self.assertEqual(reply.code, "bad-request")
        self.assertIn("expected 'enroll'", reply.message)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(enroller.calls, [])

    def test_internal_error(self) -> None:
        """
        An unexpected failure answers internal-error (no details on the
        wire) and is logged with its traceback.
        """
        self.respond(_Enroller(RuntimeError("disk on fire")), encode_request(_REQUEST))
        reply = self.reply()
        self.assertEqual(reply.code, "internal-error")
        self.assertNotIn("disk on fire", reply.message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_timeout_drops_connection(self) -> None:
        """
        If no complete request arrives within 30 seconds, the connection is
        aborted without a reply.
        """
        self.respond(_Enroller(), encode_request(_REQUEST)[:10])
        self.clock.advance(29.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_custom_timeout(self) -> None:
        """
        The deadline is configurable.
        """
        self.respond(_Enroller(), b"", timeout=5)
        self.clock.advance(5)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_cancels_timer(self) -> None:
        """
        A connection that goes away leaves no timer behind.
        """
        responder = self.respond(_Enroller(), b"RT")
        responder.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage_site_name_is_logged_safely(self) -> None:
        """
        A site name that is not valid is logged as a repr, so it cannot
        forge log lines.
        """
        enroller = _Enroller(EnrollmentRefused("bad-request", "invalid site name"))
        with capturedLogs() as events:
            self.respond(enroller, encode_request(EnrollRequest("x\nFAKE", "t", "c")))
        [event] = [e for e in events if "refused" in e["log_format"]]
        self.assertEqual(event["site"], "'x\\nFAKE'")

    def test_peer_from_transport(self) -> None:
        """
        Without an explicit peer, the transport's peer address is used.
        """
        responder = EnrollmentResponder(_Enroller(), self.clock)
        responder.makeConnection(self.transport)
        self.assertEqual(responder.peer, "192.168.1.1:54321")


class _LaterEnroller:
    """An enroller that decides later, as the tunnel server's database thread does."""

    def __init__(self) -> None:
        self.pending: list[Deferred[str]] = []

    def enroll(self, site: str, token: str, csr_pem: str, now: datetime) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.pending.append(d)
        return d


class DeferredDecisionTests(TestCase):
    """The responder with an enroller that answers with a Deferred."""

    setUp = ResponderTests.setUp
    respond = ResponderTests.respond
    reply = ResponderTests.reply

    def test_reply_waits_for_the_decision(self) -> None:
        """
        Nothing is written while the decision is pending (the responder is
        C{deciding}, its own timer is done, more bytes are ignored); the
        reply goes out when the Deferred fires.
        """
        enroller = _LaterEnroller()
        responder = self.respond(enroller, encode_request(_REQUEST))
        self.assertTrue(responder.deciding)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        responder.dataReceived(encode_request(_REQUEST))
        self.assertEqual(len(enroller.pending), 1)
        self.assertEqual(self.transport.value(), b"")
        enroller.pending[0].callback(_CERT_PEM)
        self.assertFalse(responder.deciding)
        self.assertEqual(self.reply(), EnrollAccepted(_CERT_PEM))
        self.assertTrue(self.transport.disconnecting)

    def test_refusal_later(self) -> None:
        """A refusal that comes as a failed Deferred is replied as one raised at once."""
        enroller = _LaterEnroller()
        self.respond(enroller, encode_request(_REQUEST))
        enroller.pending[0].errback(EnrollmentRefused("token-spent", "already used"))
        self.assertEqual(self.reply(), EnrollRejected("token-spent", "already used"))

    def test_decision_after_the_connection_is_gone(self) -> None:
        """
        A decision that comes after the connection was dropped (the
        server's handshake deadline) is logged and written nowhere.
        """
        enroller = _LaterEnroller()
        responder = self.respond(enroller, encode_request(_REQUEST))
        responder.connectionLost(Failure(ConnectionDone()))
        self.transport.clear()
        with capturedLogs() as events:
            enroller.pending[0].callback(_CERT_PEM)
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(responder.reply)
        [line] = [e["log_format"] for e in events if "gone" in e.get("log_format", "")]
        self.assertIn("decided after the connection was gone", line)


class RequesterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.requester = EnrollmentRequester(_REQUEST, self.clock)
        self.requester.makeConnection(self.transport)

    def test_request_waits_for_the_handshake(self) -> None:
        """
        Nothing is sent until the TLS handshake completed.
        """
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.requester.sent)
        self.requester.handshakeCompleted()
        self.assertEqual(self.transport.value(), encode_request(_REQUEST))
        self.assertTrue(self.requester.sent)

    def test_accepted(self) -> None:
        """
        An accepted reply fires the result with the certificate and closes.
        """
        self.requester.handshakeCompleted()
        self.requester.dataReceived(encode_reply(EnrollAccepted("PEM")))
        self.assertEqual(self.successResultOf(self.requester.result), "PEM")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused(self) -> None:
        """
        A refusal fails the result with EnrollmentRefused carrying the code
        and message.
        """
        self.requester.handshakeCompleted()
        self.requester.dataReceived(encode_reply(EnrollRejected("token-expired", "too late")))
        failure = self.failureResultOf(self.requester.result, EnrollmentRefused)
        self.assertEqual(failure.value, EnrollmentRefused("token-expired", "too late"))

    def test_garbage_reply(self) -> None:
        """
        A garbage reply fails with EnrollmentProtocolError and drops the
        connection.
        """
        self.requester.handshakeCompleted()
        self.requester.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.failureResultOf(self.requester.result, EnrollmentProtocolError)
        self.assertTrue(self.transport.disconnecting)

    def test_closed_before_answer(self) -> None:
        """
        A connection that ends cleanly or not before the answer fails with
        EnrollmentIncomplete (safe to retry).
        """
        for reason in (ConnectionDone(), ConnectionLost()):
            requester = EnrollmentRequester(_REQUEST, self.clock)
            requester.makeConnection(StringTransport())
            requester.connectionLost(Failure(reason))
            self.failureResultOf(requester.result, EnrollmentIncomplete)

    def test_tls_failure_passes_through(self) -> None:
        """
        Any other reason (a refused server certificate) is the result's
        failure as is.
        """
        self.requester.connectionLost(Failure(PeerVerificationFailed("wrong server", 20)))
        self.failureResultOf(self.requester.result, PeerVerificationFailed)

    def test_timeout(self) -> None:
        """
        No answer within 30 seconds fails with EnrollmentIncomplete and
        drops the connection.
        """
        self.requester.handshakeCompleted()
        self.clock.advance(30)
        failure = self.failureResultOf(self.requester.result, EnrollmentIncomplete)
        self.assertIn("within 30 seconds", str(failure.value))
        self.assertTrue(self.transport.disconnecting)


# -- the exchange over real TLS --------------------------------------------


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    """
    A client endpoint whose connections reach C{server_factory} through
    in-memory transports.
    """

    def __init__(self, server_factory: Factory, clock: Clock) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: list[IOPump] = []

    def connect(self, factory: Factory) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        assert client is not None and server is not None
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client), greet=False, clock=self.clock)
        self.pumps.append(pump)
        return succeed(client)


class ExchangeTests(TestCase):
    def setUp(self) -> None:
        # The clock reads wall time (whole seconds) because certificates
        # issued at that time must pass OpenSSL's validity check, which uses
        # the real clock; behaviour stays deterministic.
        self.clock = Clock()
        self.clock.advance(int(time.time()))
        self.now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        self.server = ServerState.load_or_create(self.mktemp(), ["tunnel.example"], now=self.now)
        self.addCleanup(self.server.close)
        self.site = SiteState.load(self.mktemp())
        self.ca_pem = certs.dump_certificate(self.server.ca_certificate)

    def token(self, site: str = "alpha", ttl: timedelta = timedelta(hours=1)) -> str:
        return self.server.store.create_token(site, ttl, self.now)

    def exchange(
        self, site: str, token: str, csr: str | None = None, server_name: str = "tunnel.example"
    ) -> tuple[EnrollmentRequester, EnrollmentResponder, list[Any]]:
        if csr is None:
            csr = self.site.enrollment_request(site, PENDING_FOR)
        requester = EnrollmentRequester(EnrollRequest(site, token, csr), self.clock)
        responder = EnrollmentResponder(self.server, self.clock)
        with capturedLogs() as events:
            tls_pair(
                server_tls_options(self.server),
                site_tls_options(self.ca_pem, server_name),
                responder,
                requester,
                self.clock,
            )
        return requester, responder, list(events)

    def refused(self, code: str, site: str, token: str, csr: str | None = None) -> None:
        requester, _, events = self.exchange(site, token, csr)
        failure = self.failureResultOf(requester.result, EnrollmentRefused)
        self.assertEqual(failure.value.code, code)
        [event] = [e for e in events if "refused" in e.get("log_format", "")]
        self.assertEqual((event["site"], event["code"]), (site, code))
        self.assertIsInstance(event["peer"], str)

    def test_enroll_then_connect(self) -> None:
        """
        enroll() over wrapClientTLS gets a certificate; the site stores it,
        and its next connection is identified and admitted by the server.
        """
        keyfile_token = self.token()
        csr = self.site.enrollment_request("alpha", token_digest(keyfile_token))
        server_factory = TLSMemoryBIOFactory(
            server_tls_options(self.server),
            False,
            ServerFactory.forProtocol(lambda: EnrollmentResponder(self.server, self.clock)),
            clock=self.clock,
        )
        memory = _MemoryEndpoint(server_factory, self.clock)
        endpoint = wrapClientTLS(site_tls_options(self.ca_pem, "tunnel.example"), memory, clock=self.clock)
        result = enroll(endpoint, "alpha", keyfile_token, csr, clock=self.clock)
        memory.pumps[0].flush()
        pem = self.successResultOf(result)
        keyfile = Keyfile(
            site="alpha",
            addresses=("tunnel.example:5500",),
            server_name="tunnel.example",
            ca_certificate_pem=self.ca_pem,
            token=keyfile_token,
            expires=self.now + timedelta(hours=1),
        )
        self.site.complete_enrollment(keyfile, pem, self.now)

        server, site = Recorder(), Recorder(b"hello")
        _, server_tls, _ = tls_pair(
            server_tls_options(self.server),
            site_tls_options(
                self.site.ca_certificate_pem,  # type: ignore[arg-type]
                "tunnel.example",
                self.site.private_key,
                self.site.certificate,
            ),
            server,
            site,
            self.clock,
        )
        identity = peer_identity(server_tls)
        assert identity is not None
        self.assertEqual(identity[0], "alpha")
        self.server.store.check_site(*identity)
        self.assertEqual(server.received, b"hello")

    def test_token_unknown(self) -> None:
        """
        An unknown token is refused; the site learns token-unknown.
        """
        self.refused("token-unknown", "alpha", "U" * 43)

    def test_token_wrong_site(self) -> None:
        """
        A token for another site is refused as token-wrong-site.
        """
        self.refused("token-wrong-site", "beta", self.token("alpha"))

    def test_token_expired(self) -> None:
        """
        An expired token is refused as token-expired.
        """
        token = self.token(ttl=timedelta(seconds=10))
        self.clock.advance(10)
        self.refused("token-expired", "alpha", token)

    def test_token_spent(self) -> None:
        """
        A token already used by another key is refused as token-spent.
        """
        token = self.token()
        requester, _, _ = self.exchange("alpha", token)
        self.successResultOf(requester.result)
        other = certs.dump_csr(certs.create_csr(certs.generate_private_key(), "alpha"))
        self.refused("token-spent", "alpha", token, other)

    def test_token_revoked(self) -> None:
        """
        A token withdrawn by revoking its site is refused as token-revoked.
        """
        token = self.token()
        self.server.store.revoke_site("alpha", self.now)
        self.refused("token-revoked", "alpha", token)

    def test_csr_invalid(self) -> None:
        """
        A CSR for another site is refused as csr-invalid.
        """
        csr = certs.dump_csr(certs.create_csr(certs.generate_private_key(), "beta"))
        self.refused("csr-invalid", "alpha", self.token(), csr)

    def test_bad_site_name(self) -> None:
        """
        An invalid site name is refused as bad-request.
        """
        csr = certs.dump_csr(certs.create_csr(certs.generate_private_key(), "alpha"))
        requester, _, _ = self.exchange("Alpha", self.token(), csr)
        failure = self.failureResultOf(requester.result, EnrollmentRefused)
        self.assertEqual(failure.value.code, "bad-request")

    def test_retry_after_cut(self) -> None:
        """
        If the connection is cut after the server issued the certificate but
        before the site got it, the site sees EnrollmentIncomplete; retrying
        with the same key and token returns the same certificate.
        """
        token = self.token()
        csr = self.site.enrollment_request("alpha", PENDING_FOR)
        requester = EnrollmentRequester(EnrollRequest("alpha", token, csr), self.clock)
        responder = EnrollmentResponder(self.server, self.clock)
        client_factory = TLSMemoryBIOFactory(
            site_tls_options(self.ca_pem, "tunnel.example"),
            True,
            Factory.forProtocol(lambda: requester),
            clock=self.clock,
        )
        server_factory = TLSMemoryBIOFactory(
            server_tls_options(self.server),
            False,
            Factory.forProtocol(lambda: responder),
            clock=self.clock,
        )
        endpoint = _MemoryEndpoint(server_factory, self.clock)
        endpoint.connect(client_factory)
        pump = endpoint.pumps[0]
        while responder.reply is None:
            self.assertTrue(pump.pump())
        self.clock.advance(0)
        pump.serverIO.getOutBuffer()  # the reply is lost...
        pump.serverIO.loseConnection()  # ...with the connection
        pump.flush()
        self.failureResultOf(requester.result, EnrollmentIncomplete)
        assert isinstance(responder.reply, EnrollAccepted)

        retry, _, _ = self.exchange("alpha", token, self.site.enrollment_request("alpha", PENDING_FOR))
        self.assertEqual(self.successResultOf(retry.result), responder.reply.certificate_pem)

    def _impostor(self, server_options: object, server_name: str = "tunnel.example") -> EnrollmentRequester:
        token = self.token()
        requester = EnrollmentRequester(
            EnrollRequest("alpha", token, self.site.enrollment_request("alpha", PENDING_FOR)), self.clock
        )
        server = Recorder()
        tls_pair(server_options, site_tls_options(self.ca_pem, server_name), server, requester, self.clock)
        self.assertFalse(requester.sent)
        self.assertEqual(server.received, b"")
        self.failureResultOf(requester.result, PeerVerificationFailed)
        return requester

    def test_server_with_another_ca_never_sees_the_token(self) -> None:
        """
        A server whose certificate is not from the pinned CA fails TLS
        verification before the request (with the token) is written.
        """
        impostor = Authority.create(["tunnel.example"])
        self._impostor(server_tls_options(impostor))

    def test_server_with_wrong_name_never_sees_the_token(self) -> None:
        """
        Our own CA's server reached under a name its certificate lacks is
        refused before the request is written.
        """
        self._impostor(server_tls_options(self.server), "elsewhere.example")
