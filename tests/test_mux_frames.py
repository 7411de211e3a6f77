"""
Tests for L{rtunnel.mux.frames}: encoding, the incremental decoder, and the
checks it makes from the bytes alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.address import AddressError, is_wire_host, parse_host, wire_host_error
from rtunnel.mux.errors import ErrorCode, MuxUsageError, ProtocolError, code_name
from rtunnel.mux.frames import (
    HEADER,
    HEADER_SIZE,
    HELLO_MAGIC,
    MAX_REASON_BYTES,
    PRE_HELLO_MAX_LENGTH,
    Data,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    Ping,
    Reset,
    data_header,
    encode,
    parse_frame,
)
from tests import strategies as s
from tests.mux_helpers import ready_session

LIMIT = 16 * 1024
_HELLO = Hello(1, LIMIT, 65536, 100)


def primed_decoder(limit: int = LIMIT) -> FrameDecoder:
    """A decoder past its first frame (a HELLO), so C{limit} applies."""
    decoder = FrameDecoder(limit)
    assert decoder.feed(encode(_HELLO)) == [_HELLO]
    return decoder


def raw(ftype: int, payload: bytes = b"", stream_id: int = 1, flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


def decode_error(data: bytes) -> ProtocolError:
    """The error a primed decoder reports for C{data}, fed whole."""
    decoder = primed_decoder()
    frames = decoder.feed(data)
    assert frames == [], frames
    assert decoder.error is not None, "no error for malformed input"
    return decoder.error


class RoundTripTests(SynchronousTestCase):
    @given(s.frames)
    def test_frame_round_trip(self, frame):
        """Any frame decodes from its encoding to an equal frame."""
        self.assertEqual(primed_decoder().feed(encode(frame)), [frame])

    @settings(max_examples=150)
    @given(s.frame_lists, st.data())
    def test_chunked_sequence(self, frames, data):
        """A sequence of frames cut into arbitrary chunks decodes to the same
        sequence, leaving nothing buffered."""
        decoder = primed_decoder()
        decoded = []
        for chunk in data.draw(s.chunked(b"".join(map(encode, frames)))):
            decoded += decoder.feed(chunk)
        self.assertEqual(decoded, frames)
        self.assertEqual(decoder.buffered, 0)
        self.assertIsNone(decoder.error)

    def test_byte_at_a_time(self):
        """Frames fed one byte at a time come out whole, each exactly when its
        last byte arrives."""
        frames = [Open(1, "example.com", 443), Data(1, b"x" * 3000, fin=True), Ping(b"12345678")]
        decoder = primed_decoder()
        wire = b"".join(map(encode, frames))
        ends = []
        out = []
        for i in range(len(wire)):
            got = decoder.feed(wire[i : i + 1])
            if got:
                ends.append(i + 1)
                out += got
        self.assertEqual(out, frames)
        self.assertEqual(ends, [sum(len(encode(f)) for f in frames[: n + 1]) for n in range(3)])

    @given(s.stream_ids, s.payloads, s.fins)
    def test_data_header(self, stream_id, data, fin):
        """The hot path's separate DATA header equals the header encode() writes."""
        self.assertEqual(data_header(stream_id, len(data), fin) + data, encode(Data(stream_id, data, fin)))

    def test_long_reason_truncated(self):
        """A reason above 1,024 bytes is cut on a character boundary when encoded,
        so it still decodes as valid UTF-8."""
        reason = "é" * 600  # 1,200 bytes; 1,024 would split a character
        frame = primed_decoder().feed(encode(Reset(3, 7, reason)))[0]
        self.assertIsInstance(frame, Reset)
        self.assertEqual(frame.reason, "é" * 512)
        self.assertLessEqual(len(frame.reason.encode("utf-8")), MAX_REASON_BYTES)


class DecoderGarbageTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(s.garbage, st.data())
    def test_garbage_only_protocol_error(self, garbage, data):
        """Arbitrary bytes, cut anywhere, never raise from the decoder: it
        returns frames and at most sets one L{ProtocolError} with a defined
        code, after which it returns nothing; its buffer stays below one
        header plus one maximal frame."""
        decoder = FrameDecoder(LIMIT)
        errors = []
        for chunk in data.draw(s.chunked(garbage)):
            frames = decoder.feed(chunk)
            if errors:
                self.assertEqual(frames, [])
            self.assertLess(decoder.buffered, HEADER_SIZE + LIMIT)
            if decoder.error is not None:
                errors.append(decoder.error)
        if errors:
            self.assertIsInstance(errors[0], ProtocolError)
            self.assertIsInstance(errors[0].code, ErrorCode)
            self.assertTrue(all(e is errors[0] for e in errors))
            self.assertEqual(decoder.buffered, 0)

    def test_good_frames_before_bad(self):
        """Frames complete before a malformed one are returned; the decoder is
        then poisoned and ignores even valid input."""
        decoder = primed_decoder()
        ping = Ping(b"abcdefgh")
        out = decoder.feed(encode(ping) + raw(0x7F) + encode(ping))
        self.assertEqual(out, [ping])
        self.assertEqual(decoder.error.code, ErrorCode.PROTOCOL_ERROR)
        self.assertEqual(decoder.feed(encode(ping)), [])


class FrameSizeTests(SynchronousTestCase):
    def test_over_long_refused_at_header(self):
        """A header announcing more than the limit is refused as soon as the
        header is complete, with no payload sent, and nothing stays buffered."""
        decoder = primed_decoder()
        header = HEADER.pack(FrameType.DATA, 0, 1, LIMIT + 1)
        self.assertEqual(decoder.feed(header[:-1]), [])
        self.assertIsNone(decoder.error)
        self.assertEqual(decoder.feed(header[-1:]), [])
        self.assertEqual(decoder.error.code, ErrorCode.FRAME_SIZE_ERROR)
        self.assertEqual(decoder.buffered, 0)

    def test_at_limit_buffered(self):
        """A frame of exactly the limit is accepted: its payload is buffered
        until complete, and the buffer never exceeds header plus limit."""
        decoder = primed_decoder()
        wire = encode(Data(1, b"z" * LIMIT))
        self.assertEqual(decoder.feed(wire[:-1]), [])
        self.assertEqual(decoder.buffered, HEADER_SIZE + LIMIT - 1)
        self.assertEqual(decoder.feed(wire[-1:]), [Data(1, b"z" * LIMIT)])
        self.assertEqual(decoder.buffered, 0)

    def test_pre_hello_limit(self):
        """Before the first frame, any frame above 1,024 bytes is refused at its
        header, whatever limit we announce."""
        decoder = FrameDecoder(16 * 1024 * 1024)
        decoder.feed(HEADER.pack(FrameType.HELLO, 0, 0, PRE_HELLO_MAX_LENGTH + 1))
        self.assertEqual(decoder.error.code, ErrorCode.FRAME_SIZE_ERROR)
        self.assertEqual(decoder.buffered, 0)

    def test_first_frame_may_be_1024(self):
        """A first frame of exactly 1,024 bytes passes; the announced limit
        applies from the second frame on, also within the same read."""
        hello = raw(FrameType.HELLO, struct.pack(">4sHHIII", HELLO_MAGIC, 1, 0, LIMIT, 65536, 5) + bytes(1004), 0)
        big = Data(1, b"d" * LIMIT)
        decoder = FrameDecoder(LIMIT)
        self.assertEqual(decoder.feed(hello), [Hello(1, LIMIT, 65536, 5)])
        self.assertEqual(decoder.feed(encode(big)), [big])
        decoder = FrameDecoder(LIMIT)
        self.assertEqual(decoder.feed(hello + encode(big)), [Hello(1, LIMIT, 65536, 5), big])


def _hello_payload(magic: bytes = HELLO_MAGIC, reserved: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">4sHHIII", magic, 1, reserved, LIMIT, 65536, 5) + extra


#: (description, wire bytes, expected code) for every malformation the
#: decoder detects on its own.
MALFORMED = [
    ("unknown frame type", raw(0x09), ErrorCode.PROTOCOL_ERROR),
    ("undefined DATA flag", raw(FrameType.DATA, b"x", flags=0x02), ErrorCode.PROTOCOL_ERROR),
    ("flag on OPEN_OK", raw(FrameType.OPEN_OK, flags=0x01), ErrorCode.PROTOCOL_ERROR),
    ("undefined PING flag", raw(FrameType.PING, b"12345678", 0, flags=0x80), ErrorCode.PROTOCOL_ERROR),
    ("reserved stream id bit", raw(FrameType.DATA, b"x", stream_id=2**31 + 1), ErrorCode.PROTOCOL_ERROR),
    ("DATA on stream 0", raw(FrameType.DATA, b"x", stream_id=0), ErrorCode.PROTOCOL_ERROR),
    ("RESET on stream 0", raw(FrameType.RESET, b"\0\0", stream_id=0), ErrorCode.PROTOCOL_ERROR),
    ("PING on a stream", raw(FrameType.PING, b"12345678", stream_id=1), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY on a stream", raw(FrameType.GOAWAY, bytes(6), stream_id=3), ErrorCode.PROTOCOL_ERROR),
    ("HELLO on a stream", raw(FrameType.HELLO, _hello_payload(), stream_id=1), ErrorCode.PROTOCOL_ERROR),
    ("short WINDOW_UPDATE", raw(FrameType.WINDOW_UPDATE, b"\0\0\1"), ErrorCode.FRAME_SIZE_ERROR),
    ("long WINDOW_UPDATE", raw(FrameType.WINDOW_UPDATE, b"\0\0\0\1\0"), ErrorCode.FRAME_SIZE_ERROR),
    ("WINDOW_UPDATE of 0", raw(FrameType.WINDOW_UPDATE, bytes(4)), ErrorCode.FLOW_CONTROL_ERROR),
    ("WINDOW_UPDATE of 2^31", raw(FrameType.WINDOW_UPDATE, b"\x80\0\0\0"), ErrorCode.FLOW_CONTROL_ERROR),
    ("empty OPEN", raw(FrameType.OPEN), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN without host", raw(FrameType.OPEN, b"\0\x50"), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN host length too long", raw(FrameType.OPEN, b"\0\x50\x05abc"), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN host length too short", raw(FrameType.OPEN, b"\0\x50\x02abc"), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN host length 0", raw(FrameType.OPEN, b"\0\x50\x00"), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN host with a space", raw(FrameType.OPEN, b"\0\x50\x03a b"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN host not ASCII", raw(FrameType.OPEN, b"\0\x50\x02\xc3\xa9"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN host in brackets", raw(FrameType.OPEN, b"\0\x50\x05[::1]"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN port 0", raw(FrameType.OPEN, b"\0\0\x01a"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN_OK with payload", raw(FrameType.OPEN_OK, b"\0"), ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN_FAIL without code", raw(FrameType.OPEN_FAIL, b"\0"), ErrorCode.FRAME_SIZE_ERROR),
    ("RESET without code", raw(FrameType.RESET), ErrorCode.FRAME_SIZE_ERROR),
    ("RESET reason not UTF-8", raw(FrameType.RESET, b"\0\1\xff"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN_FAIL reason too long", raw(FrameType.OPEN_FAIL, b"\0\1" + b"r" * 1025), ErrorCode.FRAME_SIZE_ERROR),
    ("short PING", raw(FrameType.PING, b"1234567", 0), ErrorCode.FRAME_SIZE_ERROR),
    ("long PING", raw(FrameType.PING, b"123456789", 0), ErrorCode.FRAME_SIZE_ERROR),
    ("short GOAWAY", raw(FrameType.GOAWAY, bytes(5), 0), ErrorCode.FRAME_SIZE_ERROR),
    ("GOAWAY last id reserved bit", raw(FrameType.GOAWAY, b"\x80" + bytes(5), 0), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY reason not UTF-8", raw(FrameType.GOAWAY, bytes(6) + b"\xc3", 0), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY reason too long", raw(FrameType.GOAWAY, bytes(6) + b"g" * 1025, 0), ErrorCode.FRAME_SIZE_ERROR),
    ("short HELLO", raw(FrameType.HELLO, _hello_payload()[:19], 0), ErrorCode.FRAME_SIZE_ERROR),
    ("bad HELLO magic", raw(FrameType.HELLO, _hello_payload(b"RTMY"), 0), ErrorCode.PROTOCOL_ERROR),
]


class MalformedFrameTests(SynchronousTestCase):
    def test_each_malformation(self):
        """Each kind of malformed frame sets the decoder's error with the code
        docs/protocol.md names for it (PROTOCOL_ERROR, FRAME_SIZE_ERROR for a
        size violation, FLOW_CONTROL_ERROR for an increment out of range)."""
        wrong = []
        for name, wire, code in MALFORMED:
            got = decode_error(wire).code
            if got != code:
                wrong.append((name, got, code))
        self.assertEqual(wrong, [])

    def test_reason_of_1024_bytes(self):
        """A reason of exactly 1,024 bytes is valid."""
        frame = primed_decoder().feed(raw(FrameType.OPEN_FAIL, b"\0\x21" + b"r" * 1024))
        self.assertEqual(frame, [OpenFail(1, 33, "r" * 1024)])

    def test_unknown_codes_kept(self):
        """Codes this version does not know are decoded as they are."""
        frames = primed_decoder().feed(encode(Reset(5, 0xBEEF, "")) + encode(GoAway(4, 999, "bye")))
        self.assertEqual(frames, [Reset(5, 0xBEEF, ""), GoAway(4, 999, "bye")])

    def test_hello_extension_and_reserved_ignored(self):
        """HELLO bytes after the known settings are ignored on receipt (room
        for later settings); the field once reserved carries capability bits,
        passed on as they are (the session ignores those it does not know)."""
        payload = _hello_payload(reserved=0xFFFF, extra=b"future settings")
        self.assertEqual(primed_decoder().feed(raw(FrameType.HELLO, payload, 0)), [Hello(1, LIMIT, 65536, 5, 0xFFFF)])

    def test_code_names(self):
        """Known codes have their names; unknown ones a readable stand-in, and
        a ProtocolError reads as code and reason."""
        self.assertEqual(code_name(33), "TARGET_REFUSED")
        self.assertEqual(code_name(999), "UNKNOWN_999")
        self.assertEqual(str(ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "big")), "FRAME_SIZE_ERROR: big")

    def test_parse_frame_raises_protocol_error(self):
        """parse_frame itself reports malformation as a L{ProtocolError}."""
        with self.assertRaises(ProtocolError) as cm:
            parse_frame(0x42, 0, 1, b"")
        self.assertEqual(cm.exception.code, ErrorCode.PROTOCOL_ERROR)


_WIRE_CHARS = st.sampled_from(list("abZ09.-_:%"))


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except (ProtocolError, MuxUsageError) as e:
        return ("refused", str(e))


class WireHostTests(SynchronousTestCase):
    """
    The host of an OPEN frame is a host by the one grammar of
    L{rtunnel.address}, in any spelling of the wire's characters: the
    decoder, the sender's check in the session and C{parse_host} agree.
    """

    @given(st.one_of(st.text(_WIRE_CHARS, min_size=1, max_size=12), s.hosts))
    def test_decoder_session_and_parser_agree(self, host: str) -> None:
        """
        The session sends an OPEN host exactly when parse_host accepts it,
        and its refusal says why in parse_host's words. The decoder takes
        every host made of the wire's characters: one that is no host
        (C{a..b}) is refused by the receiving session for that stream only
        (tests/test_mux_session.py), not as a framing error.
        """
        try:
            problem = None
            parse_host(host)
        except AddressError as e:
            problem = str(e)
        payload = struct.pack(">HB", 554, len(host)) + host.encode("ascii")
        frame = _outcome(lambda: parse_frame(FrameType.OPEN, 0, 1, payload))
        sent = _outcome(lambda: ready_session().open_stream(host, 554))
        self.assertEqual(is_wire_host(host.encode("ascii")), problem is None)
        self.assertEqual(frame, Open(1, host, 554))
        if problem is None:
            self.assertEqual(sent, 1)
        else:
            self.assertEqual(sent, ("refused", f"target host {host!r} is not a DNS name or IP literal: {problem}"))

    def test_what_keeps_a_host_off_the_wire_is_named(self) -> None:
        """Characters outside the wire's set, length and grammar each have their message."""
        cases = [
            (b"", "host is empty"),
            (b"caf\xc3\xa9", "host is not ASCII"),
            (b"[::1]", "'[::1]' has characters an OPEN frame cannot carry"),
            (b" h", "' h' has characters an OPEN frame cannot carry"),
            (b"a" * 256, "host of 256 bytes (at most 255)"),
            (b"a..b", "'a..b' is not a valid host name: it has an empty label"),
        ]
        for raw_host, problem in cases:
            self.assertIn(problem, wire_host_error(raw_host) or "", raw_host)
            self.assertFalse(is_wire_host(raw_host), raw_host)


class ReasonEscapingTests(SynchronousTestCase):
    """
    Reasons are the peer's text: the decoder escapes them (one choke point
    for OPEN_FAIL, RESET and GOAWAY), so no log line or exception message
    built from one can carry a control character.
    """

    def test_controls_and_bidi_escaped(self):
        """A carriage return, an ANSI escape, a bidi override and a
        backslash in a received reason come out as visible escapes."""
        nasty = "ok\r\n2026-01-01 [forged#info] \x1b[31mred\u202egnp.exe\\x"
        frames = primed_decoder().feed(
            encode(Reset(3, 7, nasty)) + encode(OpenFail(5, 33, nasty)) + encode(GoAway(0, 1, nasty))
        )
        expected = "ok\\r\\n2026-01-01 [forged#info] \\x1b[31mred\\u202egnp.exe\\\\x"
        self.assertEqual([f.reason for f in frames], [expected] * 3)
        for frame in frames:
            self.assertTrue(frame.reason.isprintable())

    @given(s.any_reasons)
    def test_every_reason_printable(self, reason):
        """Whatever reason an application sent, the received one is
        printable, and a reason that was printable arrives unchanged."""
        (frame,) = primed_decoder().feed(encode(GoAway(0, 0, reason)))
        self.assertTrue(frame.reason.isprintable())
        if reason.isprintable() and "\\" not in reason:
            self.assertEqual(frame.reason, reason)
