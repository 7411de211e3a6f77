"""
Test helpers for the multiplexer core: two engines over a fake link
(h11's ConnectionPair), raw frame injection, and output decoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from rtunnel.mux import events as ev
from rtunnel.mux.frames import HEADER, HEADER_SIZE, Frame, Hello, encode, parse_frame
from rtunnel.mux.session import MuxSession
from rtunnel.mux.settings import FloodLimits, Settings


class SessionPair:
    """
    A client (initiator) and a server (acceptor) L{MuxSession} joined by an
    in-memory link. Bytes move only when a test asks, so frames can be made
    to cross; with C{byte_at_a_time} every delivery is cut into 1-byte reads.

    Every event either end reports is also appended to its log in
    L{events}, keyed by the receiving session. Deliveries pass L{now} as
    the time of arrival (C{None}: no time, so no flood rate caps).
    """

    def __init__(
        self,
        client_settings: Settings | None = None,
        server_settings: Settings | None = None,
        *,
        handshake: bool = True,
        byte_at_a_time: bool = False,
        client_flood: FloodLimits | None = None,
        server_flood: FloodLimits | None = None,
    ) -> None:
        self.client = MuxSession(initiator=True, settings=client_settings, flood_limits=client_flood)
        self.server = MuxSession(initiator=False, settings=server_settings, flood_limits=server_flood)
        self.byte_at_a_time = byte_at_a_time
        self.now: float | None = None
        self.events: dict[MuxSession, list[ev.Event]] = {self.client: [], self.server: []}
        if handshake:
            self.client.start()
            self.server.start()
            client_events, server_events = self.pump()
            assert [type(e) for e in client_events] == [ev.SessionReady], client_events
            assert [type(e) for e in server_events] == [ev.SessionReady], server_events

    @property
    def ends(self) -> tuple[MuxSession, MuxSession]:
        return self.client, self.server

    def peer(self, end: MuxSession) -> MuxSession:
        return self.server if end is self.client else self.client

    def send(self, sender: MuxSession) -> list[ev.Event]:
        """
        Deliver everything C{sender} queued to its peer; return the peer's
        events.
        """
        return self._deliver(self.peer(sender), sender.data_to_send())

    def _deliver(self, receiver: MuxSession, data: bytes) -> list[ev.Event]:
        events: list[ev.Event] = []
        if self.byte_at_a_time:
            for i in range(len(data)):
                events += receiver.receive_data(data[i : i + 1], now=self.now)
        elif data:
            events = receiver.receive_data(data, now=self.now)
        self.events[receiver] += events
        return events

    def pump(self) -> tuple[list[ev.Event], list[ev.Event]]:
        """
        Shuttle bytes both ways until neither end has anything to say;
        return (client events, server events).
        """
        client_events: list[ev.Event] = []
        server_events: list[ev.Event] = []
        for _ in range(1000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not (to_server or to_client):
                return client_events, server_events
            server_events += self._deliver(self.server, to_server)
            client_events += self._deliver(self.client, to_client)
        raise AssertionError("the sessions never went quiet")

    def open(self, opener: MuxSession, host: str = "example.com", port: int = 80) -> int:
        """
        Open a stream from C{opener} and have the other end accept it;
        return its id.
        """
        stream_id = opener.open_stream(host, port)
        assert self.send(opener) == [ev.StreamRequested(stream_id, host, port)]
        target = self.peer(opener)
        target.accept_stream(stream_id)
        assert self.send(target) == [ev.StreamAccepted(stream_id)]
        return stream_id


def ready_session(
    initiator: bool = True,
    settings: Settings | None = None,
    peer_settings: Settings | None = None,
    flood_limits: FloodLimits | None = None,
) -> MuxSession:
    """
    A started session that has received a valid HELLO from a scripted peer,
    with its own HELLO already taken from the output.
    """
    session = MuxSession(initiator=initiator, settings=settings, flood_limits=flood_limits)
    session.start()
    p = peer_settings or Settings()
    events = feed(session, Hello(p.version, p.max_frame_size, p.initial_window, p.max_streams, p.capabilities))
    assert events == [ev.SessionReady(p, min(p.version, session.local_settings.version))], events
    session.data_to_send()
    return session


def feed(session: MuxSession, *frames: Frame | bytes, now: float | None = None) -> list[ev.Event]:
    """
    Hand C{session} the wire bytes of C{frames} (raw bytes pass as they are)
    in one read, arrived at C{now}; return its events.
    """
    return session.receive_data(b"".join(f if isinstance(f, bytes) else encode(f) for f in frames), now=now)


def decode_all(data: bytes) -> list[Frame]:
    """
    The frames in C{data}, which must be whole, valid frames of any size.
    """
    frames = []
    offset = 0
    while offset < len(data):
        ftype, flags, stream_id, length = HEADER.unpack_from(data, offset)
        start = offset + HEADER_SIZE
        assert start + length <= len(data), "truncated frame in output"
        frames.append(parse_frame(ftype, flags, stream_id, data[start : start + length]))
        offset = start + length
    return frames


def sent_frames(session: MuxSession) -> list[Frame]:
    """Take and decode everything C{session} queued."""
    return decode_all(session.data_to_send())


def stream_payload(seed: int, size: int) -> bytes:
    """
    C{size} bytes unique to C{seed}: a sha256 chain, so that a byte out of
    place on any stream shows.
    """
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big", signed=True)).digest()
    while len(out) < size:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])


def of_type(events: Iterable[ev.Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def received_bytes(events: Iterable[ev.Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id)


def transfer(pair: SessionPair, sender: MuxSession, stream_id: int, payload: bytes) -> bytes:
    """
    Send C{payload} on C{stream_id} as fast as credit allows while the
    receiving end consumes everything at once; return what it received.

    @raise AssertionError: the transfer stopped making progress.
    """
    receiver = pair.peer(sender)
    got = bytearray()
    offset = 0
    while len(got) < len(payload):
        n = min(sender.send_window(stream_id), len(payload) - offset)
        if n:
            sender.send_data(stream_id, payload[offset : offset + n])
            offset += n
        arrived = received_bytes(pair.send(sender), stream_id)
        if arrived:
            got += arrived
            receiver.consumed(stream_id, len(arrived))
        pair.send(receiver)
        if not (n or arrived):
            raise AssertionError(f"transfer stalled after {len(got)} of {len(payload)} bytes")
    return bytes(got)
