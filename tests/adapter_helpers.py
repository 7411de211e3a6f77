"""
Shared fixtures for the adapter tests: recording protocols, producers, two
L{MuxProtocol}s joined in memory (iosim, or a hand-driven link that counts
bytes per stream), and throwaway TLS certificates.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump
from zope.interface import implementer

from rtunnel.adapter import Keepalive, MuxProtocol, MuxStream
from rtunnel.mux import Settings
from tests.common import Holder as Holder  # re-exported: the adapter tests import their helpers from here
from tests.common import Recorder, joined_muxes, mux_of
from tests.common import pump_all as pump_all

KIB = 1024
MIB = 1024 * KIB

#: What the in-memory pairs announce unless a test says otherwise: pinned, so
#: that window arithmetic in the tests does not follow changes of the defaults.
TEST_SETTINGS = Settings(max_frame_size=64 * KIB, initial_window=256 * KIB, max_streams=1024)


# -- application protocols ---------------------------------------------------


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A L{Recorder} that accepts half-close, like a TCP forwarder leg."""

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Recorder):
    """Echoes what it receives; on the peer's FIN it ends its own direction."""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        assert self.transport is not None
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class HashSink(Protocol):
    """Counts and hashes what it receives without keeping it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


# -- producers ---------------------------------------------------------------


class PatternSource:
    """
    A deterministic pseudo-random byte stream, produced in chunks without
    materialising it; C{digest()} is the SHA-256 of everything produced.
    """

    _BLOCK = random.Random(20261127).randbytes(MIB + 256 * KIB)

    def __init__(self, total: int, chunk: int, salt: int = 0) -> None:
        self.total = total
        self.chunk = chunk
        self.salt = salt
        self.produced = 0
        self._index = 0
        self._hash = hashlib.sha256()

    def next_chunk(self) -> bytes:
        size = min(self.chunk, self.total - self.produced)
        start = (self._index * 7919 + self.salt * 104729) % MIB
        data = self._BLOCK[start : start + size]
        self._index += 1
        self.produced += size
        self._hash.update(data)
        return data

    @property
    def done(self) -> bool:
        return self.produced >= self.total

    def digest(self) -> bytes:
        assert self.done
        return self._hash.digest()

    @classmethod
    def expected_digest(cls, total: int, chunk: int, salt: int = 0) -> bytes:
        source = cls(total, chunk, salt)
        while not source.done:
            source.next_chunk()
        return source.digest()


@implementer(IPushProducer)
class StreamingWriter:
    """
    A push producer that writes a L{PatternSource} to a consumer as fast as
    it is allowed: it writes until it is paused, and resumes when told.
    When everything is written it unregisters and, if C{finish}, calls
    C{loseConnection} (sending FIN). Records how it was driven.
    """

    def __init__(self, consumer: MuxStream, source: PatternSource, finish: bool = True) -> None:
        self.consumer = consumer
        self.source = source
        self.finish = finish
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0
        self._writing = False

    def start(self) -> None:
        self.consumer.registerProducer(self, True)
        self._write_loop()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self._write_loop()

    def stopProducing(self) -> None:
        self.stopped = True

    def _write_loop(self) -> None:
        if self._writing:  # resumed from inside our own write: the loop goes on
            return
        self._writing = True
        try:
            while not self.paused and not self.stopped and not self.source.done:
                self.consumer.write(self.source.next_chunk())
        finally:
            self._writing = False
        if self.source.done and not self.stopped and self.consumer._producer is self:
            self.consumer.unregisterProducer()
            if self.finish:
                self.consumer.loseConnection()


# -- two ends in memory ------------------------------------------------------


def make_mux(
    initiator: bool,
    clock: Clock,
    handler: Callable[[MuxStream], None] | None = None,
    settings: Settings | None = None,
    keepalive: Keepalive | None = None,
) -> MuxProtocol:
    return mux_of(initiator, clock, handler, settings if settings is not None else TEST_SETTINGS, keepalive)


class Acceptor:
    """A stream handler that accepts every stream with a new protocol."""

    def __init__(self, factory: Callable[[], Protocol] = Recorder) -> None:
        self.factory = factory
        self.streams: list[MuxStream] = []
        self.protocols: list[Protocol] = []

    def __call__(self, stream: MuxStream) -> None:
        protocol = self.factory()
        self.streams.append(stream)
        self.protocols.append(protocol)
        stream.accept(protocol)


def iosim_pair(
    clock: Clock | None = None,
    *,
    server_handler: Callable[[MuxStream], None] | None = None,
    client_handler: Callable[[MuxStream], None] | None = None,
    server_settings: Settings | None = None,
    client_settings: Settings | None = None,
    keepalive: Keepalive | None = None,
) -> tuple[MuxProtocol, MuxProtocol, IOPump, Clock]:
    """A client (initiator) and a server MuxProtocol joined by iosim, HELLOs exchanged."""
    clock = clock if clock is not None else Clock()
    client, server, pump = joined_muxes(
        clock,
        lambda: make_mux(True, clock, client_handler, client_settings, keepalive),
        lambda: make_mux(False, clock, server_handler, server_settings, keepalive),
        greet=False,
    )
    return client, server, pump, clock


_HEADER = struct.Struct(">BBII")
_DATA = 0x04


class FrameTap:
    """
    Independent of the core: follows frame boundaries in one direction of
    the link and counts DATA payload bytes per stream id.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # payload bytes of the current frame still to pass
        self._skip_stream = 0
        self.data_bytes: dict[int, int] = {}

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._skip:
                n = min(self._skip, len(view) - pos)
                if self._skip_stream:
                    self.data_bytes[self._skip_stream] = self.data_bytes.get(self._skip_stream, 0) + n
                self._skip -= n
                pos += n
                continue
            need = _HEADER.size - len(self._buf)
            self._buf += view[pos : pos + need]
            pos += min(need, len(view) - pos)
            if len(self._buf) == _HEADER.size:
                ftype, _flags, stream_id, length = _HEADER.unpack(self._buf)
                self._buf.clear()
                self._skip = length
                self._skip_stream = stream_id if ftype == _DATA else 0


class SocketLikeTransport(StringTransport):
    """
    A L{StringTransport} that treats what was written and not yet taken as a
    socket send buffer: like a TCP transport it pauses its registered
    producer when more than C{high_water} bytes wait, and resumes it when
    the buffer has been emptied by L{take}.
    """

    def __init__(self, high_water: int) -> None:
        super().__init__()
        self.high_water = high_water
        self.producer_paused = False
        self.pauses = 0
        self.most_pending = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        pending = self.io.tell()
        self.most_pending = max(self.most_pending, pending)
        if self.producer is not None and not self.producer_paused and pending > self.high_water:
            self.producer_paused = True
            self.pauses += 1
            self.producer.pauseProducing()

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class Link:
    """
    Two MuxProtocols over L{SocketLikeTransport}s, joined by a hand-driven
    pump. Unlike iosim it pauses an end's MuxProtocol while its transport
    holds more than C{high_water} bytes. C{taps[end]} counts the DATA bytes
    each end has given its transport, per stream.
    """

    def __init__(
        self,
        *,
        server_handler: Callable[[MuxStream], None] | None = None,
        client_handler: Callable[[MuxStream], None] | None = None,
        settings: Settings | None = None,
        high_water: int = 512 * KIB,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.client = make_mux(True, self.clock, client_handler, settings)
        self.server = make_mux(False, self.clock, server_handler, settings)
        self.client_transport = SocketLikeTransport(high_water)
        self.server_transport = SocketLikeTransport(high_water)
        self.taps = {self.client: FrameTap(), self.server: FrameTap()}
        self.client.makeConnection(self.client_transport)
        self.server.makeConnection(self.server_transport)
        self.pump_all()

    def pump(self) -> bool:
        """Move everything waiting, both ways, once. Returns whether anything moved."""
        moved = False
        for src, transport, dst in (
            (self.client, self.client_transport, self.server),
            (self.server, self.server_transport, self.client),
        ):
            data = transport.take()
            if data:
                self.taps[src].feed(data)
                dst.dataReceived(data)
                moved = True
        return moved

    def pump_all(self, limit: int = 100_000, each: Callable[[], None] | None = None) -> None:
        """Pump until nothing moves; call C{each} after every round."""
        for _ in range(limit):
            moved = self.pump()
            if each is not None:
                each()
            if not moved:
                return
        raise AssertionError("link never went idle")


# -- TLS material ----------------------------------------------------------


def make_tls_material(hostname: str = "localhost") -> tuple[bytes, bytes]:
    """
    A throwaway CA and a server certificate it signed for C{hostname} and
    127.0.0.1, made by rtunnel's own certificate code (ECDSA P-256).
    Returns (CA certificate PEM, server certificate + key PEM).
    """
    from rtunnel.identity import certs

    ca_key, ca_cert = certs.create_ca("rtunnel test CA")
    key = certs.generate_private_key()
    cert = certs.issue_server_certificate(ca_key, ca_cert, key, [hostname, "127.0.0.1"])
    return certs.dump_certificate(ca_cert).encode(), certs.dump_certificate(cert).encode() + certs.dump_private_key(key)


# -- one end against hand-made frames ---------------------------------------


class RawPeer:
    """
    One MuxProtocol on a StringTransport, driven by frames the test writes
    by hand; its output is decoded into frames for inspection.
    """

    def __init__(self, mux: MuxProtocol) -> None:
        from rtunnel.mux.frames import FrameDecoder

        self.mux = mux
        self.transport = StringTransport()
        mux.makeConnection(self.transport)
        self._decoder = FrameDecoder(16 * MIB)
        self.frames: list[object] = []

    def send(self, *frames: object) -> None:
        from rtunnel.mux.frames import encode

        self.mux.dataReceived(b"".join(encode(f) for f in frames))  # type: ignore[arg-type]

    def hello(self, settings: Settings | None = None) -> None:
        from rtunnel.mux.frames import Hello

        s = settings if settings is not None else Settings()
        self.send(Hello(s.version, s.max_frame_size, s.initial_window, s.max_streams))

    def received(self) -> list[object]:
        """Frames the MuxProtocol wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        new = list(self._decoder.feed(data))
        self.frames += new
        return new
