"""A TCP relay that adds a fixed one-way delay: the bench's "WAN".

Why: ``tc netem`` is not available on these machines (no sch_netem), and a
tunnel's behaviour over distance is decided by its flow-control window versus
the round-trip time, which a plain loopback never shows.

How: every chunk read from one side is stamped with ``now + delay`` and
released to the other side at that time (FIFO, so order is kept).  Data is
read as fast as it comes, so this is a delay line, not a bandwidth limit:
a path with N ms each way and (almost) unlimited capacity.  The amount held
per direction is bounded (``--max-buffer``): above it the relay stops reading
and TCP back-pressure takes over, so memory stays bounded.  Half-close (EOF)
is delayed and forwarded like data; a close is delivered after the data
before it.

Loopback only: it listens on and connects to 127.0.0.1/::1 addresses and
refuses others.  Bounded in time by ``--timeout``; the bench also ends it by PID.

    python bench/relay.py --listen 127.0.0.1:0 --target 127.0.0.1:PORT --delay-ms 50

prints one JSON line ``{"ready": true, "port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
from collections import deque


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"relay: {host} is not a loopback address")
    return host, int(port)


class Leg(asyncio.Protocol):
    """One TCP connection of a relayed pair.

    Bytes received here are queued with their release time and written to
    ``peer``'s transport when due.
    """

    def __init__(self, cfg: argparse.Namespace) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.delay = cfg.delay_ms / 1000.0
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.queue: deque[tuple[float, object]] = deque()  # (due, bytes | "eof" | "close")
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.writing_paused = False  # our transport's write buffer is above its high mark
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.cfg.max_buffer // 2, low=self.cfg.max_buffer // 8)

    def data_received(self, data: bytes) -> None:
        self._push(data)
        self._check_pressure()

    def eof_received(self) -> bool:
        self._push("eof")
        return True  # keep our write side open: half-close is forwarded

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._push("close")

    def pause_writing(self) -> None:  # our outgoing buffer is full: stop reading the peer
        self.writing_paused = True
        if self.peer is not None:
            self.peer._check_pressure()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.peer is not None:
            self.peer._check_pressure()

    # -- delay line
    def _push(self, item: object) -> None:
        self.queue.append((self.loop.time() + self.delay, item))
        if isinstance(item, bytes):
            self.queued += len(item)
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.queue and self.peer is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        peer = self.peer
        assert peer is not None and peer.transport is not None
        now = self.loop.time()
        chunks: list[bytes] = []
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, bytes):
                chunks.append(item)
                self.queued -= len(item)
                continue
            if chunks:
                peer.transport.write(b"".join(chunks))
                chunks = []
            if item == "eof" and not peer.closed and peer.transport.can_write_eof():
                peer.transport.write_eof()
            elif item == "close":
                peer.transport.close()  # flushes what is buffered, then closes
        if chunks and not peer.transport.is_closing():
            peer.transport.write(b"".join(chunks))
        self._schedule()
        self._check_pressure()

    def _check_pressure(self) -> None:
        """Stop reading while the delay line or the peer's socket buffer is full.

        Both conditions end by an event that calls this again: the release
        timer drains the queue, ``resume_writing`` reports a drained buffer.
        """
        if self.transport is None or self.closed or self.peer is None:
            return
        full = self.queued > self.cfg.max_buffer or self.peer.writing_paused
        if full and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif self.reading_paused and not self.peer.writing_paused and self.queued <= self.cfg.max_buffer // 2:
            self.transport.resume_reading()
            self.reading_paused = False


class Inbound(Leg):
    """The accepted side: connects to the target before reading anything."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        Inbound.accepted += 1
        if Inbound.accepted > self.cfg.max_connections:  # bounded in count as well as time
            self.transport.abort()
            return
        self.transport.pause_reading()
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.cfg.target
        try:
            _, out = await asyncio.wait_for(self.loop.create_connection(lambda: Leg(self.cfg), host, port), 10)
        except (TimeoutError, OSError):
            assert self.transport is not None
            self.transport.abort()
            return
        assert isinstance(out, Leg)
        self.peer, out.peer = out, self
        self._schedule()
        out._schedule()
        if not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()


async def main(cfg: argparse.Namespace) -> None:
    host, port = cfg.listen
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Inbound(cfg), host, port, backlog=1024)
    actual = server.sockets[0].getsockname()[1]
    print(json.dumps({"ready": True, "port": actual}), flush=True)
    await asyncio.sleep(cfg.timeout)
    server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_split, required=True, help="HOST:PORT (loopback; port 0 = any)")
    p.add_argument("--target", type=_split, required=True, help="HOST:PORT (loopback)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay, each direction")
    p.add_argument("--max-buffer", type=int, default=128 * 1024 * 1024, help="bytes held per direction")
    p.add_argument("--timeout", type=float, default=1800.0, help="exit after this many seconds")
    p.add_argument("--max-connections", type=int, default=100_000, help="refuse connections after this many")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
