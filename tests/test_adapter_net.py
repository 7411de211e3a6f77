"""
The listening helper of rtunnel.adapter.net: endpoints parsed as Twisted
parses them, what workers cannot share refused with a reason, and real
loopback listeners sharing one port with SO_REUSEPORT.
"""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from rtunnel.adapter import net
from rtunnel.adapter.net import SharedEndpoint, SharedPortError, listen, listen_shared, share_ports, shared_endpoint


class SharedEndpointTests(unittest.SynchronousTestCase):
    def test_tcp_forms(self) -> None:
        """Positional and keyword forms, Twisted's defaults and orders (tcp: port, interface, backlog)."""
        inet = socket.AF_INET
        self.assertEqual(shared_endpoint("tcp:5500"), SharedEndpoint(5500, "", 50, inet))
        self.assertEqual(
            shared_endpoint("tcp:5500:interface=127.0.0.1:backlog=1024"), SharedEndpoint(5500, "127.0.0.1", 1024, inet)
        )
        self.assertEqual(shared_endpoint("tcp:5500:127.0.0.2:7"), SharedEndpoint(5500, "127.0.0.2", 7, inet))
        self.assertEqual(shared_endpoint(" TCP:port=80 "), SharedEndpoint(80, "", 50, inet))
        self.assertEqual(shared_endpoint(r"tcp:5500:interface=\:\:1"), SharedEndpoint(5500, "::1", 50, socket.AF_INET6))

    def test_tcp6_forms(self) -> None:
        """tcp6: takes port, backlog, interface in that order, and binds :: by default."""
        inet6 = socket.AF_INET6
        self.assertEqual(shared_endpoint("tcp6:5500"), SharedEndpoint(5500, "::", 50, inet6))
        self.assertEqual(shared_endpoint(r"tcp6:5500:9:\:\:1"), SharedEndpoint(5500, "::1", 9, inet6))

    def test_refused(self) -> None:
        """Each description workers cannot share is refused, the reason named."""
        cases = {
            "unix:/tmp/x.sock": "cannot be shared by --workers: give a tcp: or tcp6: endpoint",
            "ssl:443:privateKey=k.pem": "cannot be shared by --workers",
            "systemd:domain=INET:index=0": "cannot be shared by --workers",
            "5500": "cannot be shared by --workers",
            "tcp:0": "port 0 would give each worker a port of its own",
            "tcp:0:interface=127.0.0.1": "port 0",
            "tcp:interface=127.0.0.1": "names no port",
            "tcp:http": "port 'http' is not a number from 0 to 65535",
            "tcp:70000": "port '70000' is not a number",
            "tcp:5500:backlog=0": "backlog '0' is not a number from 1",
            "tcp:5500:reuse=1": "tcp: takes no reuse=",
            "tcp:5500:port=5501": "port given twice",
            "tcp:5500:127.0.0.1:5:extra": "too many values",
        }
        for description, reason in cases.items():
            with self.assertRaises(SharedPortError) as caught:
                shared_endpoint(description)
            self.assertIn(reason, str(caught.exception), description)
            self.assertIn(repr(description), str(caught.exception))
        self.assertTrue(issubclass(SharedPortError, ValueError))


class Counting(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]
        assert self.transport is not None
        self.transport.loseConnection()


def counting_factory() -> Factory:
    factory = Factory.forProtocol(Counting)
    factory.accepted = 0  # type: ignore[attr-defined]
    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SharedListeningTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.addCleanup(share_ports, net.sharing_ports())

    @defer.inlineCallbacks
    def connect_until(self, port: int, factories: list[Factory], attempts: int = 200):  # type: ignore[no-untyped-def]
        """
        Connect, each time from a new source port, until every listener
        accepted one: the kernel picks the listener by a hash of the
        connection's addresses, so all of them landing on one listener in
        C{attempts} tries has a chance of 2**-(attempts - 1) per listener.
        """
        from twisted.internet import reactor

        for made in range(1, attempts + 1):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            # The reactor accepts it (the trial timeout bounds the wait).
            while sum(f.accepted for f in factories) < made:  # type: ignore[attr-defined]
                yield _turn(reactor)
            if all(f.accepted for f in factories):  # type: ignore[attr-defined]
                return
        self.fail(f"not every listener accepted in {attempts} connections: {[f.accepted for f in factories]}")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_two_listeners_on_one_port_both_accept(self):  # type: ignore[no-untyped-def]
        """
        Two shared listeners on the same loopback port both listen, and the
        kernel gives each a share of the connections.
        """
        from twisted.internet import reactor

        port = free_port()
        factories = [counting_factory(), counting_factory()]
        ports = [listen_shared(reactor, f"tcp:{port}:interface=127.0.0.1:backlog=64", f) for f in factories]
        for listening in ports:
            self.addCleanup(listening.stopListening)
            self.assertEqual(listening.getHost().port, port)
        yield self.connect_until(port, factories)

    @defer.inlineCallbacks
    def test_listen_shares_only_when_told(self):  # type: ignore[no-untyped-def]
        """
        L{listen} is Twisted's endpoint parser until L{share_ports}: then a
        description workers cannot share fails its Deferred, and a TCP port
        is shared (a second listener on it succeeds).
        """
        from twisted.internet import reactor

        share_ports(False)
        plain = yield listen(reactor, "tcp:0:interface=127.0.0.1", counting_factory())
        self.addCleanup(plain.stopListening)
        self.assertNotEqual(plain.getHost().port, 0)
        # Not shared: a second listener on that port is refused by the kernel.
        with self.assertRaises(OSError):
            listen_shared(reactor, f"tcp:{plain.getHost().port}:interface=127.0.0.1", counting_factory())

        share_ports(True)
        self.assertTrue(net.sharing_ports())
        with self.assertRaises(SharedPortError):
            yield listen(reactor, "unix:/nonexistent/x.sock", counting_factory())
        port = free_port()
        factories = [counting_factory(), counting_factory()]
        for factory in factories:
            listening = yield listen(reactor, f"tcp:{port}:interface=127.0.0.1", factory)
            self.addCleanup(listening.stopListening)
        yield self.connect_until(port, factories)


def _turn(reactor) -> defer.Deferred[None]:  # type: ignore[no-untyped-def]
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.001, d.callback, None)
    return d
