"""
Shared fixtures for the identity tests: key material and an in-memory TLS
connection between two protocols (real OpenSSL, no sockets).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from attrs import frozen
from cryptography import x509
from hypothesis import strategies as st
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.identity import certs
from rtunnel.identity.certs import PrivateKey
from tests.common import Recorder as Recorder  # re-exported for the identity tests


class TestCase(SynchronousTestCase):
    """
    A synchronous test case whose C{mktemp} paths live under the system
    temporary directory (trial's default is relative to the working
    directory, which under pytest is the source tree) and are removed after
    the test.
    """

    def mktemp(self) -> str:
        base = tempfile.mkdtemp(prefix="rtunnel-test-")
        self.addCleanup(shutil.rmtree, base, True)
        return os.path.join(base, "t")


# A fixed instant for tests that need "now" (tokens, expiry).
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@frozen
class Authority:
    """
    A CA with a server certificate, built in memory.
    """

    ca_key: PrivateKey
    ca_certificate: x509.Certificate
    server_key: PrivateKey
    server_certificate: x509.Certificate

    @classmethod
    def create(cls, names: Sequence[str] = ("tunnel.example", "127.0.0.1")) -> Authority:
        ca_key, ca_cert = certs.create_ca("test CA")
        server_key = certs.generate_private_key()
        server_cert = certs.issue_server_certificate(ca_key, ca_cert, server_key, names)
        return cls(ca_key, ca_cert, server_key, server_cert)

    @property
    def ca_pem(self) -> str:
        return certs.dump_certificate(self.ca_certificate)

    def site(self, name: str = "alpha") -> tuple[PrivateKey, x509.Certificate]:
        """
        A site key and certificate issued by this CA.
        """
        key = certs.generate_private_key()
        csr = certs.create_csr(key, name)
        return key, certs.issue_site_certificate(self.ca_key, self.ca_certificate, csr, name)


def tls_pair(
    server_options: object,
    client_options: object,
    server_protocol: Protocol,
    client_protocol: Protocol,
    clock: Clock | None = None,
) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol, IOPump]:
    """
    Connect two application protocols through real TLS over an in-memory
    transport, and run the exchange to quiescence.

    @return: the client and server TLS protocols and the pump.
    """
    clock = clock or Clock()
    client_factory = TLSMemoryBIOFactory(
        client_options,
        isClient=True,
        wrappedFactory=ClientFactory.forProtocol(lambda: client_protocol),
        clock=clock,
    )
    server_factory = TLSMemoryBIOFactory(
        server_options,
        isClient=False,
        wrappedFactory=ServerFactory.forProtocol(lambda: server_protocol),
        clock=clock,
    )
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return client, server, pump


# Hypothesis strategies shared by the identity tests.
site_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True)
tokens = st.from_regex(r"[A-Za-z0-9_-]{22,64}", fullmatch=True)


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)
