"""
Shared fixtures for the role-layer tests: TCP-like in-memory transports,
endpoints that connect or fail on command, two L{MuxProtocol}s joined in
memory, a real server state in a temporary directory with enrolled sites,
and real TLS between two protocol factories over iosim.

Nothing here replaces our own code: every test runs the real registry,
connector, forwarder, server and site roles over these.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import Keepalive, MuxProtocol, MuxStream
from rtunnel.identity import certs
from rtunnel.identity.certs import PrivateKey
from rtunnel.identity.keyfile import Keyfile
from rtunnel.identity.state import ServerState, SiteState
from rtunnel.identity.tlsconfig import server_tls_options, site_tls_options
from rtunnel.mux import Settings
from tests.common import Echo as Echo  # re-exported: the roles tests import their helpers from here
from tests.common import Holder as Holder
from tests.common import Recorder as Recorder
from tests.common import joined_muxes, mux_of, pump_all

SERVER_NAME = "localhost"
SITE_PEER = IPv4Address("TCP", "192.0.2.7", 40123)
CLIENT_PEER = IPv4Address("TCP", "198.51.100.9", 51515)


def temp_dir(case: SynchronousTestCase) -> str:
    """A fresh directory removed after the test (mktemp would litter the cwd)."""
    path = tempfile.mkdtemp(prefix="rtunnel-roles-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


# -- TCP legs ----------------------------------------------------------------


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """
    A L{StringTransport} that also offers TCP half-close, as a real TCP
    connection does: C{loseWriteConnection} is recorded in C{write_closed},
    C{abortConnection} in C{aborted}. Lenient: real TCP transports accept
    pause/resume after C{loseConnection}.
    """

    def __init__(self, peer: IAddress | None = None) -> None:
        super().__init__(peerAddress=peer, lenient=True)
        self.write_closed = False
        self.aborted = False
        self.nodelay = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        """Closed gracefully or aborted."""
        return bool(self.disconnecting)

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data


# -- endpoints ---------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class ControlledEndpoint:
    """
    An endpoint whose connection attempts stay pending until the test
    completes them with L{complete} (a L{TCPTransport} is connected) or
    fails them with L{fail} (any exception, e.g. Twisted's own).
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, defer.Deferred[IProtocol]]] = []
        self.transports: list[TCPTransport] = []
        self.protocols: list[IProtocol] = []

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        d: defer.Deferred[IProtocol] = defer.Deferred()
        self.attempts.append((protocolFactory, d))
        return d

    def complete(self, index: int = -1) -> tuple[IProtocol, TCPTransport]:
        factory, d = self.attempts[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 554))
        assert protocol is not None
        transport = TCPTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        d.callback(protocol)
        return protocol, transport

    def fail(self, exception: BaseException, index: int = -1) -> None:
        self.attempts[index][1].errback(Failure(exception))


class EndpointMap:
    """An C{endpoint_for} for L{TargetConnector}: one endpoint per target, recorded."""

    def __init__(self, make: Callable[[], IStreamClientEndpoint] = ControlledEndpoint) -> None:
        self.make = make
        self.requested: list[tuple[str, int]] = []
        self.endpoints: list[IStreamClientEndpoint] = []

    def __call__(self, host: str, port: int) -> IStreamClientEndpoint:
        self.requested.append((host, port))
        endpoint = self.make()
        self.endpoints.append(endpoint)
        return endpoint

    @property
    def last(self) -> ControlledEndpoint:
        endpoint = self.endpoints[-1]
        assert isinstance(endpoint, ControlledEndpoint)
        return endpoint


# -- application protocols ---------------------------------------------------


# -- two ends in memory --------------------------------------------------------


def mux_pair(
    clock: Clock,
    site_handler: Callable[[MuxStream], None] | None = None,
    *,
    site_settings: Settings | None = None,
    keepalive: Keepalive | None = None,
) -> tuple[MuxProtocol, MuxProtocol, IOPump]:
    """
    The server end (acceptor) and the site end (initiator) of a tunnel,
    joined by iosim with HELLOs exchanged.

    @return: (server mux, site mux, pump)
    """
    site, server, pump = joined_muxes(
        clock,
        lambda: mux_of(True, clock, site_handler, site_settings, keepalive, label=""),
        lambda: mux_of(False, clock, keepalive=keepalive, label="alpha"),
    )
    return server, site, pump


# -- identities ----------------------------------------------------------------


class ServerFixture:
    """
    A real tunnel server state in a temporary directory, certifying
    C{localhost}, with helpers to enroll sites the way the enrollment
    exchange does (token, CSR, L{ServerState.enroll}).
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = temp_dir(case)
        self.state = ServerState.load_or_create(self.directory, [SERVER_NAME])
        case.addCleanup(self.state.close)

    @property
    def ca_pem(self) -> str:
        return certs.dump_certificate(self.state.ca_certificate)

    def token(self, site: str) -> str:
        return self.state.store.create_token(site, timedelta(hours=1), datetime.now(UTC))

    def enroll(self, site: str = "alpha") -> tuple[PrivateKey, x509.Certificate]:
        """Enroll C{site} with a fresh key; return its key and certificate."""
        key = certs.generate_private_key()
        csr = certs.dump_csr(certs.create_csr(key, site))
        pem = self.state.enroll(site, self.token(site), csr, datetime.now(UTC))
        return key, certs.load_certificate(pem)

    def certify_without_enrolling(self, site: str) -> tuple[PrivateKey, x509.Certificate]:
        """A certificate from our CA for a site the database does not know."""
        key = certs.generate_private_key()
        return key, self.state.issue_site_certificate(certs.create_csr(key, site), site)

    def server_options(self) -> object:
        return server_tls_options(self.state)

    def site_options(
        self, key: PrivateKey | None = None, cert: x509.Certificate | None = None, server_name: str = SERVER_NAME
    ) -> object:
        return site_tls_options(self.ca_pem, server_name, client_key=key, client_cert=cert)

    def keyfile(self, site: str = "alpha", addresses: tuple[str, ...] = ("127.0.0.1:5500",)) -> Keyfile:
        return Keyfile(
            site=site,
            addresses=addresses,
            server_name=SERVER_NAME,
            ca_certificate_pem=self.ca_pem,
            token=self.token(site),
            expires=datetime.now(UTC) + timedelta(hours=1),
        )

    def enrolled_site_state(
        self, case: SynchronousTestCase, site: str = "alpha", addresses: tuple[str, ...] = ("127.0.0.1:5500",)
    ) -> SiteState:
        """A real site state directory enrolled with this server."""
        state = SiteState.load(temp_dir(case))
        keyfile = self.keyfile(site, addresses)
        csr = state.enrollment_request(site, keyfile.token_digest)
        pem = self.state.enroll(site, keyfile.token, csr, datetime.now(UTC))
        state.complete_enrollment(keyfile, pem)
        return state


def tls_connect(
    server_factory: IProtocolFactory,
    server_options: object,
    client_factory: IProtocolFactory,
    client_options: object,
    clock: Clock,
    *,
    client_tls: bool = True,
) -> tuple[Protocol, Protocol, IOPump]:
    """
    Connect C{client_factory} to C{server_factory} through real TLS over an
    in-memory link (as twisted's test_tls does), and pump to quiescence.
    With C{client_tls} false the client speaks plain bytes (no handshake).

    @return: the client and server TLS protocols and the pump.
    """
    server_tls = TLSMemoryBIOFactory(server_options, False, server_factory, clock=clock)
    if client_tls:
        client_side = TLSMemoryBIOFactory(client_options, True, client_factory, clock=clock)
    else:
        client_side = client_factory
    client, server, pump = connectedServerAndClient(
        lambda: server_tls.buildProtocol(SITE_PEER),
        lambda: client_side.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5500)),
        greet=False,
        clock=clock,
    )
    pump_all(pump)
    return client, server, pump


class Built(Factory):
    """A factory that builds with C{build} and remembers what it built."""

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self.build = build
        self.built: list[Protocol] = []

    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        protocol = self.build()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class Watching(Factory):
    """Delegates to a real factory and remembers the protocols it built."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self.wrapped = factory
        self.built: list[IProtocol] = []

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is not None:
            self.built.append(protocol)
        return protocol
