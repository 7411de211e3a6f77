"""
Hypothesis strategies for the multiplexer core, all in one place.

Values stay inside what the wire can carry (u16 codes, 31-bit stream ids,
reasons of at most 1,024 UTF-8 bytes), so that a frame built from them must
survive an encode/decode round trip unchanged.
"""

from __future__ import annotations

from hypothesis import strategies as st

from rtunnel.mux.frames import (
    HEADER,
    MAX_HOST_BYTES,
    MAX_REASON_BYTES,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING_SIZE,
    Data,
    Frame,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    OpenOk,
    Ping,
    Reset,
    WindowUpdate,
    encode,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
stream_ids = st.integers(1, MAX_STREAM_ID)
#: Small ids, so that random frames hit live streams of a session now and then.
small_stream_ids = st.integers(1, 12)
codes = u16
#: Hosts by the one grammar (rtunnel.address): DNS names, IPv4, IPv6, as
#: parse_host writes them; OPEN carries any spelling, so some in upper case.
_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?", fullmatch=True)
dns_names = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda n: not n.replace(".", "").isdigit())
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
canonical_hosts = st.one_of(dns_names, ipv4_hosts, ipv6_hosts)
hosts = st.one_of(canonical_hosts, canonical_hosts.map(str.upper)).filter(lambda h: len(h) <= MAX_HOST_BYTES)
ports = st.integers(1, 65535)
#: Reasons that travel unchanged: a received reason is escaped for logs
#: (L{rtunnel.logsafe.printable}), so controls, format characters and
#: backslashes come back escaped; tests/test_mux_flood.py covers those.
reasons = st.text(
    st.characters(
        exclude_categories=("Cc", "Cf", "Zl", "Zp", "Zs", "Co", "Cn", "Cs"),
        include_characters=" ",
        exclude_characters="\\",
    ),
    max_size=300,
).filter(lambda s: s.isprintable() and len(s.encode("utf-8")) <= MAX_REASON_BYTES)
#: Any reason text at all, as an application might pass it.
any_reasons = st.text(max_size=300).filter(lambda s: len(s.encode("utf-8")) <= MAX_REASON_BYTES)
payloads = st.binary(max_size=2048)


def _frames(ids: st.SearchStrategy[int], data: st.SearchStrategy[bytes]) -> st.SearchStrategy[Frame]:
    return st.one_of(
        st.builds(Hello, version=u16, max_frame_size=u32, initial_window=u32, max_streams=u32),
        st.builds(Open, stream_id=ids, host=hosts, port=ports),
        st.builds(OpenOk, stream_id=ids),
        st.builds(OpenFail, stream_id=ids, code=codes, reason=reasons),
        st.builds(Data, stream_id=ids, data=data, fin=st.booleans()),
        st.builds(WindowUpdate, stream_id=ids, increment=st.integers(1, MAX_WINDOW)),
        st.builds(Reset, stream_id=ids, code=codes, reason=reasons),
        st.builds(Ping, opaque=st.binary(min_size=PING_SIZE, max_size=PING_SIZE), ack=st.booleans()),
        st.builds(GoAway, last_stream_id=st.integers(0, MAX_STREAM_ID), code=codes, reason=reasons),
    )


#: Any valid frame value, with payloads small enough for any decoder limit.
frames = _frames(stream_ids, payloads)

#: Valid frames aimed at the first few stream ids, to poke at a live session.
session_frames = _frames(small_stream_ids, st.binary(max_size=64))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """
    C{data} cut at arbitrary points (empty chunks included).
    """
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


#: A frame header with arbitrary fields followed by arbitrary payload bytes:
#: near misses of valid frames (bad types, flags, lengths, ids).
raw_frames = st.builds(
    lambda t, f, s, body, lie: HEADER.pack(t, f, s, len(body) if lie is None else lie) + body,
    st.one_of(st.sampled_from([int(t) for t in FrameType]), u8),
    st.one_of(st.just(0), st.just(1), u8),
    st.one_of(st.just(0), small_stream_ids, u32),
    st.binary(max_size=64),
    st.one_of(st.none(), st.integers(0, 80), u32),
)

#: Byte strings that look a little like a mux session: valid frames for
#: small stream ids, near-miss frames and plain garbage, in any order.
hostile_input = st.lists(
    st.one_of(session_frames.map(encode), raw_frames, st.binary(max_size=32)),
    max_size=12,
).map(b"".join)

#: Steps of a flow-control run on one stream: the sender writes, the
#: receiver's consumer takes bytes, or queued bytes cross the link one way.
#: Sizes are clamped by the test to what is possible at that moment.
flow_steps = st.lists(
    st.tuples(st.sampled_from(["write", "consume", "deliver", "return"]), st.integers(0, 20_000)),
    max_size=40,
)

#: Several valid frames in a row.
frame_lists = st.lists(frames, max_size=8)

#: Anything at all: plain random bytes, or near-valid session traffic.
garbage = st.one_of(st.binary(max_size=200), hostile_input)

fins = st.booleans()
