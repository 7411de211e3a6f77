"""
The front door over Twisted (rtunnel/frontdoor/protocol.py): client
connections on in-memory TCP transports, the real SiteRegistry, and real
MuxProtocol pairs joined by iosim, with the site end either holding streams
for the test to answer (Holder) or running the real TargetConnector.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import MuxProtocol, MuxStream
from rtunnel.address import HostPort
from rtunnel.frontdoor.names import SiteDirectory
from rtunnel.frontdoor.protocol import DoorKind, FrontDoorFactory, FrontDoorProtocol, refusal_for_unavailable
from rtunnel.frontdoor.refusals import TABLE, Refusal, RefusalKind, SocksReply, refusal_for_open_failure
from rtunnel.frontdoor.users import UserStore, make_line
from rtunnel.mux.errors import ErrorCode
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from rtunnel.roles.splice import TCPSide
from rtunnel.roles.target import Target, TargetConnector
from tests.roles_helpers import CLIENT_PEER, EndpointMap, Holder, Recorder, TCPTransport, mux_pair, pump_all

D = "rtunnel.internal"
KIB = 1024
SUCCESS = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
SITES: SiteDirectory = {
    "store-17": {"directory": HostPort("10.0.0.5", 389)},
    "store-18": {"directory": HostPort("10.1.0.5", 389)},
    "store-19": {},
}


def reply(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def socks(name: str, port: int, *, user: bytes | None = None, password: bytes = b"") -> bytes:
    """A whole SOCKS5 client handshake: greeting, optional RFC 1929, CONNECT to a name."""
    raw = name.encode()
    if user is None:
        head = b"\x05\x01\x00"
    else:
        head = b"\x05\x01\x02" + bytes((1, len(user))) + user + bytes((len(password),)) + password
    return head + bytes((5, 1, 0, 3, len(raw))) + raw + port.to_bytes(2, "big")


def http(name: str, port: int, *, user: bytes | None = None, password: bytes = b"") -> bytes:
    auth = b""
    if user is not None:
        auth = b"Proxy-Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"
    target = f"{name}:{port}".encode()
    return b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + auth + b"\r\n"


@implementer(IReactorFromThreads)
class ThreadsClock(Clock):
    """A Clock that also takes calls "from threads", run when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.from_threads.append((f, args))

    def run_from_threads(self) -> None:
        while self.from_threads:
            f, args = self.from_threads.pop(0)
            f(*args)


class StepPool:
    """
    A thread pool whose jobs run when the test says so, on the test's
    thread: the order of events is the test's, not the scheduler's.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[bool, object], None], Callable[..., object], tuple[object, ...]]] = []

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], func: Callable[..., object], *args: object
    ) -> None:
        self.jobs.append((onResult, func, args))

    def run(self) -> None:
        while self.jobs:
            on_result, func, args = self.jobs.pop(0)
            try:
                on_result(True, func(*args))
            except Exception:
                on_result(False, Failure())


class LogCapture:
    """The front door's log lines while installed."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("rtunnel.frontdoor"):
            self.events.append(event)

    def lines(self, containing: str = "") -> list[str]:
        return [text for text in map(formatEvent, self.events) if containing in text]


class Door:
    """
    A front door with the real registry; sites connected in memory, each
    with a stream handler (a Holder unless given).
    """

    def __init__(
        self,
        kind: DoorKind = DoorKind.SOCKS5,
        *,
        connected: tuple[str, ...] = ("store-17", "store-18"),
        users: UserStore | None = None,
        clock: Clock | None = None,
        thread_pool: StepPool | None = None,
        handler: Callable[[MuxStream], None] | None = None,
        **factory_args: Any,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.registry = SiteRegistry(self.clock, max_streams_per_site=factory_args.pop("max_streams_per_site", 1024))
        self.sites: dict[str, dict[str, HostPort]] = {k: dict(v) for k, v in SITES.items()}
        self.holders: dict[str, Holder] = {}
        self.muxes: dict[str, tuple[MuxProtocol, MuxProtocol, IOPump]] = {}
        self.factory = FrontDoorFactory(
            kind,
            directory=lambda: self.sites,
            opener=self.registry.open,
            reactor=self.clock,
            open_timeout=5.0,
            users=users,
            thread_pool=cast(ThreadPool, thread_pool),
            **factory_args,
        )
        for site in connected:
            self.connect_site(site, handler)

    def connect_site(self, name: str, handler: Callable[[MuxStream], None] | None = None) -> None:
        holder = Holder()
        server, site, pump = mux_pair(self.clock, handler or holder)
        self.holders[name] = holder
        self.muxes[name] = (server, site, pump)
        self.registry.register(name, server, "192.0.2.7:40123")

    def client(self) -> tuple[FrontDoorProtocol, TCPTransport]:
        protocol = self.factory.buildProtocol(CLIENT_PEER)
        transport = TCPTransport(CLIENT_PEER)
        protocol.makeConnection(transport)
        return protocol, transport

    def pump(self) -> None:
        for _, _, pump in self.muxes.values():
            pump_all(pump)

    def streams(self, site: str) -> list[MuxStream]:
        return self.holders[site].streams

    def no_streams_open(self) -> bool:
        """No stream open at either end of any tunnel (after the links went quiet)."""
        self.pump()
        return all(not server.streams and not site.streams for server, site, _ in self.muxes.values())

    def no_streams_anywhere(self) -> bool:
        """No stream was ever asked of any site, and none is open."""
        return self.no_streams_open() and not any(holder.streams for holder in self.holders.values())


class SocksTests(SynchronousTestCase):
    def test_connect_by_service_name(self) -> None:
        """
        A SOCKS CONNECT to SERVICE.SITE.D opens a stream to the service's
        HOST:PORT at that site. Bytes the client pipelined after its request
        reach the site only after the site accepted the stream, and the
        success reply comes then too; after it, bytes flow both ways.
        """
        door = Door()
        protocol, transport = door.client()
        self.assertTrue(transport.nodelay)
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389) + b"pipelined")
        self.assertEqual(transport.take(), b"\x05\x00")  # the method; no answer to the request yet
        self.assertEqual(transport.producerState, "paused")
        door.pump()
        [stream] = door.streams("store-17")
        self.assertEqual((stream.host, stream.port), ("10.0.0.5", 389))
        self.assertEqual(door.streams("store-18"), [])
        site_app = Recorder()
        stream.attach(site_app)  # delivers whatever arrived before the answer: nothing
        self.assertEqual(site_app.data, b"")
        self.assertEqual(transport.take(), b"")
        stream.accept()
        door.pump()
        self.assertEqual(transport.take(), SUCCESS)
        self.assertEqual(site_app.data, b"pipelined")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b" and more")
        stream.write(b"answer")
        door.pump()
        self.assertEqual(site_app.data, b"pipelined and more")
        self.assertEqual(transport.take(), b"answer")
        self.assertFalse(transport.closed)

    def test_connect_by_host_name_reaches_the_right_site(self) -> None:
        """HOST.SITE.D goes to HOST:PORT at that site, and never to another one."""
        door = Door()
        for name, port, site, target in (
            (f"10.9.9.9.store-18.{D}", 8080, "store-18", ("10.9.9.9", 8080)),
            (f"nvr.floor2.STORE-17.{D}.", 554, "store-17", ("nvr.floor2", 554)),
        ):
            protocol, transport = door.client()
            protocol.dataReceived(socks(name, port))
            door.pump()
            stream = door.streams(site)[-1]
            self.assertEqual((stream.host, stream.port), target)
        self.assertEqual((len(door.streams("store-17")), len(door.streams("store-18"))), (1, 1))

    def test_refused_requests_open_no_stream(self) -> None:
        """
        Each request the front door itself refuses gets its REP code and a
        close, opens no stream at any site, and leaves nobody waiting.
        """
        cases = [
            (socks("directory.store-17.example.com", 389), 0x02),
            (socks(f"x.store-99.{D}", 80), 0x04),
            (socks(f"store-17.{D}", 80), 0x04),
            (socks(f"directory.store-17.{D}", 80), 0x02),
            (socks(f"a..b.store-17.{D}", 80), 0x01),
            (b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x05\x00\x50", 0x08),
            (b"\x05\x01\x00\x05\x02\x00\x03\x01a\x00\x50", 0x07),
        ]
        door = Door()
        for data, code in cases:
            protocol, transport = door.client()
            protocol.dataReceived(data + b"never forwarded")
            self.assertEqual(transport.take(), b"\x05\x00" + reply(code), data)
            self.assertTrue(transport.closed)
            self.assertFalse(transport.aborted)
            protocol.dataReceived(b"ignored after the refusal")
            self.assertEqual(transport.value(), b"")
        self.assertTrue(door.no_streams_anywhere())
        self.assertEqual(door.registry.connected_sites().keys(), {"store-17", "store-18"})

    def test_site_not_connected_within_open_timeout(self) -> None:
        """
        A known site that is not connected is waited for (nothing is read
        meanwhile); after the open timeout the client gets REP 3 (network
        unreachable) and is closed.
        """
        door = Door()
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"x.store-19.{D}", 80))
        self.assertEqual(transport.take(), b"\x05\x00")
        self.assertEqual(transport.producerState, "paused")
        door.clock.advance(4.9)
        self.assertFalse(transport.closed)
        door.clock.advance(0.1)
        self.assertEqual(transport.take(), reply(0x03))
        self.assertTrue(transport.closed)

    def test_site_connecting_within_open_timeout_is_served(self) -> None:
        """A client asking for a site that connects within the open timeout is served."""
        door = Door(connected=())
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"x.store-19.{D}", 80) + b"hi")
        door.clock.advance(3)
        door.connect_site("store-19")
        door.pump()
        [stream] = door.streams("store-19")
        app = Recorder()
        stream.accept(app)
        door.pump()
        self.assertEqual(transport.take(), b"\x05\x00" + SUCCESS)
        self.assertEqual(app.data, b"hi")
        door.clock.advance(60)
        self.assertFalse(transport.closed)

    def test_stream_limit(self) -> None:
        """Past the registry's stream limit per site: REP 1 at once, as a forward is closed."""
        door = Door(max_streams_per_site=1)
        first, _ = door.client()
        first.dataReceived(socks(f"a.store-17.{D}", 1))
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"b.store-17.{D}", 1))
        self.assertEqual(transport.take(), b"\x05\x00" + reply(0x01))
        self.assertTrue(transport.closed)
        door.pump()
        self.assertEqual([s.host for s in door.streams("store-17")], ["a"])

    def test_client_gone_while_waiting_for_the_site(self) -> None:
        """A client that leaves while its site is awaited gets no stream when the site connects."""
        door = Door(connected=())
        protocol, _ = door.client()
        protocol.dataReceived(socks(f"x.store-19.{D}", 80))
        protocol.connectionLost(Failure(error.ConnectionLost("gone")))
        door.connect_site("store-19")
        self.assertTrue(door.no_streams_anywhere())
        self.assertEqual(door.factory.connections, 0)

    def test_client_gone_while_the_site_decides(self) -> None:
        """A client that leaves after OPEN was sent has its stream reset at the site."""
        door = Door()
        protocol, _ = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389) + b"early")
        door.pump()
        [stream] = door.streams("store-17")
        app = Recorder()
        stream.attach(app)
        protocol.connectionLost(Failure(error.ConnectionLost("gone")))
        door.pump()
        self.assertTrue(stream.disconnected)
        self.assertEqual(app.data, b"")
        self.assertTrue(door.no_streams_open())

    def test_no_timeout_once_spliced(self) -> None:
        """The handshake deadline ends with the handshake: a spliced connection may idle."""
        door = Door()
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389))
        door.pump()
        door.streams("store-17")[0].accept(Recorder())
        door.pump()
        door.clock.advance(3600)
        self.assertFalse(transport.closed)

    def test_handshake_timeout(self) -> None:
        """
        A client that sends nothing, or half a request, is closed after the
        handshake timeout, without a SOCKS reply.
        """
        door = Door(handshake_timeout=7.0)
        silent, silent_tcp = door.client()
        partial, partial_tcp = door.client()
        partial.dataReceived(b"\x05\x01\x00\x05\x01")
        door.clock.advance(6.9)
        self.assertFalse(silent_tcp.closed or partial_tcp.closed)
        door.clock.advance(0.1)
        self.assertTrue(silent_tcp.closed and partial_tcp.closed)
        self.assertEqual((silent_tcp.value(), partial_tcp.value()), (b"", b"\x05\x00"))

    def test_client_eof_mid_request(self) -> None:
        """A client that shuts down its side before its request is complete is closed, and no stream opens."""
        door = Door()
        protocol, transport = door.client()
        protocol.dataReceived(b"\x05\x01\x00")
        protocol.readConnectionLost()
        self.assertTrue(transport.closed)
        self.assertTrue(door.no_streams_anywhere())


class TargetTests(SynchronousTestCase):
    """The real site: TargetConnector with an allowlist and controlled connections."""

    def door(self, kind: DoorKind = DoorKind.SOCKS5) -> tuple[Door, EndpointMap]:
        clock = Clock()
        endpoints = EndpointMap()
        connector = TargetConnector([Target("10.0.0.5", 389)], endpoints, clock)
        return Door(kind, clock=clock, handler=connector), endpoints

    def test_target_answers(self) -> None:
        """
        What the site says about the target comes back as the protocol's own
        code: not allowed 2 / 502, refused 5 / 502, unreachable 4 / 502,
        timeout 6 / 504, and the pipelined bytes never reach a target.
        """
        cases: list[tuple[str, BaseException | None, int, int]] = [
            ("cam.store-17", None, 0x02, 502),
            ("directory.store-17", error.ConnectionRefusedError(), 0x05, 502),
            ("directory.store-17", error.NoRouteError(), 0x04, 502),
            ("directory.store-17", error.DNSLookupError(), 0x04, 502),
            ("directory.store-17", error.TimeoutError(), 0x06, 504),
            ("directory.store-17", error.ConnectError("other"), 0x01, 502),
        ]
        for kind, method in ((DoorKind.SOCKS5, socks), (DoorKind.HTTP_CONNECT, http)):
            for name, failure, code, status in cases:
                door, endpoints = self.door(kind)
                protocol, transport = door.client()
                protocol.dataReceived(method(f"{name}.{D}", 389) + b"early")
                door.pump()
                if failure is None:
                    self.assertEqual(endpoints.requested, [])
                else:
                    endpoints.last.fail(failure)
                    door.pump()
                out = transport.take()
                if kind is DoorKind.SOCKS5:
                    self.assertEqual(out, b"\x05\x00" + reply(code), (name, failure))
                else:
                    self.assertTrue(out.startswith(f"HTTP/1.1 {status} ".encode()), (out, failure))
                self.assertTrue(transport.closed)
                self.assertEqual(endpoints.last.transports if endpoints.endpoints else [], [])  # no target connection

    def test_half_close_and_backpressure_as_a_forward(self) -> None:
        """
        Once spliced, the client's EOF half-closes the target and replies
        still flow; a client that stops reading pauses the target after a
        window, and resuming drains it, exactly as through a forward.
        """
        door, endpoints = self.door()
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389) + b"request")
        door.pump()
        target, target_tcp = endpoints.last.complete()
        assert isinstance(target, TCPSide)
        door.pump()
        self.assertEqual(transport.take(), b"\x05\x00" + SUCCESS)
        self.assertEqual(target_tcp.take(), b"request")
        protocol.readConnectionLost()
        door.pump()
        self.assertTrue(target_tcp.write_closed)
        self.assertFalse(target_tcp.closed)
        assert transport.producer is not None
        transport.producer.pauseProducing()  # the client's socket buffer is full
        for _ in range(300):
            target.dataReceived(b"x" * KIB)
        door.pump()
        self.assertEqual(target_tcp.producerState, "paused")
        self.assertEqual(transport.value(), b"")
        transport.producer.resumeProducing()
        door.pump()
        self.assertEqual(len(transport.take()), 300 * KIB)
        self.assertEqual(target_tcp.producerState, "producing")
        target.readConnectionLost()
        door.pump()
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.aborted or target_tcp.aborted)

    def test_target_reset_aborts_client(self) -> None:
        """A target connection that fails after the splice aborts the client, as a forward does."""
        door, endpoints = self.door()
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389))
        door.pump()
        target, _ = endpoints.last.complete()
        door.pump()
        target.connectionLost(Failure(error.ConnectionLost("Connection reset by peer")))
        door.pump()
        self.assertTrue(transport.aborted)


class AuthenticationTests(SynchronousTestCase):
    def users(self) -> UserStore:
        return UserStore.parse(make_line("federation", "s3cret", ln=4))

    def test_good_password_inline(self) -> None:
        """Without a thread pool the check runs inline: status 0, then the request is served."""
        door = Door(users=self.users())
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389, user=b"federation", password=b"s3cret"))
        self.assertEqual(transport.take(), b"\x05\x02\x01\x00")
        door.pump()
        self.assertEqual(len(door.streams("store-17")), 1)

    def test_bad_password(self) -> None:
        """A wrong password: RFC 1929 status 1, a close, and no stream; HTTP: 407."""
        for kind, method, expected in (
            (DoorKind.SOCKS5, socks, b"\x05\x02\x01\x01"),
            (DoorKind.HTTP_CONNECT, http, b"HTTP/1.1 407 Proxy Authentication Required\r\n"),
        ):
            door = Door(kind, users=self.users())
            protocol, transport = door.client()
            protocol.dataReceived(method(f"directory.store-17.{D}", 389, user=b"federation", password=b"guess"))
            self.assertTrue(transport.take().startswith(expected), kind)
            self.assertTrue(transport.closed)
            self.assertTrue(door.no_streams_anywhere())

    def test_http_without_credentials(self) -> None:
        """An HTTP client without Proxy-Authorization gets 407 with the Basic challenge."""
        door = Door(DoorKind.HTTP_CONNECT, users=self.users())
        protocol, transport = door.client()
        protocol.dataReceived(http(f"directory.store-17.{D}", 389))
        self.assertIn(b'Proxy-Authenticate: Basic realm="rtunnel"\r\n', transport.take())
        self.assertTrue(door.no_streams_anywhere())

    def test_check_in_the_thread_pool(self) -> None:
        """
        With a thread pool, the check is a pool job; the client is not read
        from meanwhile; the result comes back through the reactor and the
        pipelined request goes on from there.
        """
        clock = ThreadsClock()
        pool = StepPool()
        door = Door(users=self.users(), clock=clock, thread_pool=pool)
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"directory.store-17.{D}", 389, user=b"federation", password=b"s3cret"))
        self.assertEqual(transport.take(), b"\x05\x02")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual((len(pool.jobs), door.factory.pending_checks), (1, 1))
        pool.run()
        door.pump()
        self.assertEqual(door.streams("store-17"), [])  # the answer is still on its way back
        clock.run_from_threads()
        self.assertEqual(transport.take(), b"\x01\x00")
        self.assertEqual(door.factory.pending_checks, 0)
        door.pump()
        self.assertEqual(len(door.streams("store-17")), 1)

    def test_remembered_password_needs_no_job(self) -> None:
        """A user's next connection with the same good password is checked without scrypt."""
        clock = ThreadsClock()
        pool = StepPool()
        door = Door(users=self.users(), clock=clock, thread_pool=pool)
        first, _ = door.client()
        first.dataReceived(socks(f"a.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        pool.run()
        clock.run_from_threads()
        second, transport = door.client()
        second.dataReceived(socks(f"b.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        self.assertEqual(pool.jobs, [])
        self.assertEqual(transport.take(), b"\x05\x02\x01\x00")
        third, transport = door.client()
        third.dataReceived(socks(f"c.store-17.{D}", 1, user=b"federation", password=b"other"))
        self.assertEqual(len(pool.jobs), 1)  # a different password is checked for real

    def test_pending_checks_are_bounded(self) -> None:
        """Beyond max_pending_checks waiting checks, a client is refused instead of queued."""
        clock = ThreadsClock()
        pool = StepPool()
        door = Door(users=self.users(), clock=clock, thread_pool=pool, max_pending_checks=1)
        first, first_tcp = door.client()
        first.dataReceived(socks(f"a.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        second, second_tcp = door.client()
        second.dataReceived(socks(f"a.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        self.assertEqual(second_tcp.take(), b"\x05\x02\x01\x01")
        self.assertTrue(second_tcp.closed)
        self.assertEqual(len(pool.jobs), 1)

    def test_client_gone_during_check(self) -> None:
        """A client that leaves during its check: the job's result is dropped, and the count freed."""
        clock = ThreadsClock()
        pool = StepPool()
        door = Door(users=self.users(), clock=clock, thread_pool=pool)
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"a.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        transport.clear()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        pool.run()
        clock.run_from_threads()
        self.assertEqual((transport.value(), door.factory.pending_checks), (b"", 0))
        self.assertTrue(door.no_streams_anywhere())

    def test_timeout_during_check(self) -> None:
        """The handshake deadline covers the check: a check still running at the deadline ends the client."""
        clock = ThreadsClock()
        pool = StepPool()
        door = Door(users=self.users(), clock=clock, thread_pool=pool)
        protocol, transport = door.client()
        protocol.dataReceived(socks(f"a.store-17.{D}", 1, user=b"federation", password=b"s3cret"))
        transport.clear()
        clock.advance(10)
        self.assertEqual(transport.take(), b"\x01\x01")
        self.assertTrue(transport.closed)
        pool.run()
        clock.run_from_threads()
        self.assertEqual(transport.value(), b"")

    def test_thread_pool_needs_a_threaded_reactor(self) -> None:
        """A thread pool with a reactor that cannot take calls from threads is a mistake, said at once."""
        with self.assertRaises(TypeError):
            Door(users=self.users(), thread_pool=StepPool())


class HttpTests(SynchronousTestCase):
    def test_connect(self) -> None:
        """HTTP CONNECT by name: 200 once the site accepted, then the early bytes, then both ways."""
        door = Door(DoorKind.HTTP_CONNECT)
        protocol, transport = door.client()
        protocol.dataReceived(http(f"directory.store-18.{D}", 389) + b"\x16\x03\x01hello")
        self.assertEqual(transport.take(), b"")
        door.pump()
        [stream] = door.streams("store-18")
        self.assertEqual((stream.host, stream.port), ("10.1.0.5", 389))
        app = Recorder()
        stream.accept(app)
        door.pump()
        self.assertEqual(transport.take(), b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.assertEqual(app.data, b"\x16\x03\x01hello")

    def test_refusals(self) -> None:
        """Routing and protocol refusals are HTTP responses with the table's status, then a close."""
        cases = [
            (http(f"x.store-99.{D}", 80), 404),
            (http(f"store-17.{D}", 80), 404),
            (http("example.com", 443), 403),
            (http(f"directory.store-17.{D}", 80), 403),
            (http("10.0.0.5", 80), 403),
            (b"GET / HTTP/1.1\r\n\r\n", 405),
            (b"\x05\x01\x00", 400),
        ]
        door = Door(DoorKind.HTTP_CONNECT)
        for data, status in cases:
            protocol, transport = door.client()
            protocol.dataReceived(data)
            self.assertTrue(transport.take().startswith(f"HTTP/1.1 {status} ".encode()), data)
            self.assertTrue(transport.closed)
        protocol, transport = door.client()
        protocol.dataReceived(http(f"x.store-19.{D}", 80))
        door.clock.advance(5)
        self.assertTrue(transport.take().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertTrue(door.no_streams_anywhere())

    def test_timeout_answers_408(self) -> None:
        """An HTTP client that does not finish its request in time gets 408."""
        door = Door(DoorKind.HTTP_CONNECT)
        protocol, transport = door.client()
        protocol.dataReceived(b"CONNECT a.store-17.rtunnel.internal:1 HTTP/1.1\r\nHost: a")
        door.clock.advance(10)
        self.assertTrue(transport.take().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(transport.closed)

    def test_stream_limit_is_503(self) -> None:
        """Past the stream limit per site: 503."""
        door = Door(DoorKind.HTTP_CONNECT, max_streams_per_site=1)
        first, _ = door.client()
        first.dataReceived(http(f"a.store-17.{D}", 1))
        protocol, transport = door.client()
        protocol.dataReceived(http(f"b.store-17.{D}", 1))
        self.assertTrue(transport.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))


class LogTests(SynchronousTestCase):
    def test_refusal_line(self) -> None:
        """A refusal logs one line naming the door, the client, the request and the reason."""
        log = LogCapture(self)
        door = Door()
        protocol, _ = door.client()
        protocol.dataReceived(socks(f"x.store-99.{D}", 80))
        [line] = log.lines()
        self.assertEqual(
            line,
            f"front door socks5: refused 198.51.100.9:51515 asking for x.store-99.{D}:80: "
            f"unknown site: x.store-99.{D}: no site named store-99",
        )

    def test_client_text_is_escaped(self) -> None:
        """Whatever the client sent reaches the log escaped (no terminal controls)."""
        log = LogCapture(self)
        door = Door(users=UserStore.parse(make_line("u", "p", ln=4)))
        protocol, _ = door.client()
        protocol.dataReceived(socks(f"x.store-17.{D}", 80, user=b"\x1b[2Jroot", password=b"x"))
        [line] = log.lines()
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b[2Jroot", line)

    def test_rate_limited(self) -> None:
        """
        One client repeating a refusal logs five lines at once, then one a
        second with the count of what was left out.
        """
        log = LogCapture(self)
        door = Door()
        for _ in range(8):
            protocol, _ = door.client()
            protocol.dataReceived(socks("example.com", 80))
        self.assertEqual(len(log.lines()), 5)
        door.clock.advance(1)
        protocol, _ = door.client()
        protocol.dataReceived(socks("example.com", 80))
        self.assertIn("(3 similar from this host not logged)", log.lines()[-1])

    def test_site_refusal_line_names_the_target(self) -> None:
        """A site's refusal logs the route and the site's code, and notes a one-label host that is no service."""
        log = LogCapture(self)
        clock = Clock()
        connector = TargetConnector([], EndpointMap(), clock)
        door = Door(clock=clock, handler=connector)
        protocol, _ = door.client()
        protocol.dataReceived(socks(f"directroy.store-17.{D}", 389))
        door.pump()
        [line] = log.lines("front door")
        self.assertIn("target not allowed by the site: site store-17: directroy:389: TARGET_NOT_ALLOWED", line)
        self.assertIn("(directroy is not a declared service of store-17 either)", line)


class UnavailableTests(SynchronousTestCase):
    def test_registry_reasons(self) -> None:
        """
        The registry's SiteUnavailable reasons map to site-not-connected
        (after the open timeout, or with none) or to a limit; pinned against
        the real registry's words.
        """
        clock = Clock()
        registry = SiteRegistry(clock, max_pending_opens=1, max_streams_per_site=1)

        def failure_of(d: defer.Deferred[MuxStream]) -> SiteUnavailable:
            value = self.failureResultOf(d, SiteUnavailable).value
            assert isinstance(value, SiteUnavailable)
            return value

        kinds = [refusal_for_unavailable(failure_of(registry.open("gone", "h", 1, 0))).kind]
        waiting = registry.open("gone", "h", 1, 5)
        kinds.append(refusal_for_unavailable(failure_of(registry.open("gone", "h", 1, 5))).kind)
        clock.advance(5)
        kinds.append(refusal_for_unavailable(failure_of(waiting)).kind)
        server, _, _ = mux_pair(clock, Holder())
        registry.register("here", server, "peer")
        self.successResultOf(registry.open("here", "h", 1, 5))
        kinds.append(refusal_for_unavailable(failure_of(registry.open("here", "h", 1, 5))).kind)
        self.assertEqual(
            kinds,
            [RefusalKind.SITE_NOT_CONNECTED, RefusalKind.LIMITS, RefusalKind.SITE_NOT_CONNECTED, RefusalKind.LIMITS],
        )


class RefusalTableTests(SynchronousTestCase):
    def test_every_kind_has_a_row(self) -> None:
        """Every kind has its codes and log words (words, not the identifier), and reads as 'words: reason'."""
        self.assertEqual(set(TABLE), set(RefusalKind))
        for kind, codes in TABLE.items():
            self.assertIn(" ", codes.log, kind)
            self.assertNotEqual(codes.log, kind.value)
            self.assertEqual(str(Refusal(kind, "why")), f"{codes.log}: why")
            self.assertEqual(str(Refusal(kind, "")), codes.log)
        self.assertEqual({c.socks for c in TABLE.values()} - {None}, set(SocksReply) - {SocksReply.SUCCEEDED})

    def test_open_failures(self) -> None:
        """The site's OPEN_FAIL codes map to their kinds; anything else is the tunnel's failure."""
        expected = {
            ErrorCode.TARGET_NOT_ALLOWED: RefusalKind.TARGET_NOT_ALLOWED,
            ErrorCode.TARGET_REFUSED: RefusalKind.TARGET_REFUSED,
            ErrorCode.TARGET_UNREACHABLE: RefusalKind.TARGET_UNREACHABLE,
            ErrorCode.TARGET_DNS_FAILURE: RefusalKind.TARGET_DNS_FAILURE,
            ErrorCode.TARGET_TIMEOUT: RefusalKind.TARGET_TIMEOUT,
            ErrorCode.TARGET_ERROR: RefusalKind.TARGET_FAILED,
            ErrorCode.REFUSED_STREAM: RefusalKind.LIMITS,
            ErrorCode.CANCEL: RefusalKind.TUNNEL_LOST,
            ErrorCode.GOING_AWAY: RefusalKind.TUNNEL_LOST,
            999: RefusalKind.TUNNEL_LOST,
        }
        for code, kind in expected.items():
            self.assertEqual(refusal_for_open_failure(code, "r"), Refusal(kind, "r"), code)
