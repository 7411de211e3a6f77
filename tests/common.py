"""
The test helpers every layer shares: one recording protocol, one stream
holder, one pump, one builder of two joined L{MuxProtocol}s. The layer
modules (adapter_helpers, roles_helpers, helpers_identity) build on these
and re-export them, so a test imports from the module of its layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from rtunnel.adapter import Keepalive, MuxProtocol, MuxStream
from rtunnel.mux import Settings


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    Records what a transport (a TCP or TLS connection, or a mux stream)
    hands its protocol: the connection, the TLS handshake and the peer's
    certificate, every byte, and how it ended. With C{greeting}, writes it
    once connected.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.data = bytearray()
        self.made = False
        self.handshook = False
        self.peer_certificate: Any = None
        self.lost: Failure | None = None
        self.read_closed = False

    @property
    def received(self) -> bytes:
        """Everything received so far."""
        return bytes(self.data)

    def connectionMade(self) -> None:
        self.made = True
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshook = True
        self.peer_certificate = self.transport.getPeerCertificate()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class Echo(Recorder):
    """A recorder that also writes back what it receives."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


class Holder:
    """A stream handler that keeps the peer's streams unanswered for the test to decide."""

    def __init__(self) -> None:
        self.streams: list[MuxStream] = []

    def __call__(self, stream: MuxStream) -> None:
        self.streams.append(stream)


def pump_all(pump: IOPump, limit: int = 100_000) -> None:
    """Pump until nothing moves (iosim's own flush stops at 1,000 rounds)."""
    for _ in range(limit):
        if not pump.pump():
            return
    raise AssertionError("link never went idle")


def joined_muxes(
    clock: Clock,
    client: Callable[[], MuxProtocol],
    server: Callable[[], MuxProtocol],
    *,
    greet: bool = True,
) -> tuple[MuxProtocol, MuxProtocol, IOPump]:
    """
    The one in-memory pair: C{client()} (the initiator: the site, in the
    roles) and C{server()} joined by iosim on C{clock}; with C{greet}, the
    HELLOs are exchanged and both ends are ready.
    """
    client_mux, server_mux, pump = connectedServerAndClient(server, client, clock=clock)
    if greet:
        pump_all(pump)
        assert client_mux.ready and server_mux.ready, "HELLOs were not exchanged"
    return client_mux, server_mux, pump


def mux_of(
    initiator: bool,
    clock: Clock,
    handler: Callable[[MuxStream], None] | None = None,
    settings: Settings | None = None,
    keepalive: Keepalive | None = None,
    label: str | None = None,
) -> MuxProtocol:
    """A MuxProtocol as the pairs make them (the label names its end in logs)."""
    return MuxProtocol(
        initiator=initiator,
        clock=clock,
        stream_handler=handler,
        settings=settings,
        keepalive=keepalive,
        label=label if label is not None else ("client" if initiator else "server"),
    )


__all__ = ["Echo", "Holder", "Recorder", "joined_muxes", "mux_of", "pump_all"]
