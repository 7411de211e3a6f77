"""
Twisted's TLS protocol, tuned for one long-lived bulk connection.

L{TLSMemoryBIOProtocol} hands OpenSSL 16 KiB at a time and reads the result
back 32 KiB at a time: for every 64 KiB frame that is four encrypt calls, four
reads of the memory BIO and four writes to the socket transport, and on the
receiving side one C{dataReceived} of the multiplexer per 16 KiB TLS record.
Per-call Python work, not the cipher, is what limits a tunnel here (measured
on a 2-core development machine: one core encrypts AES-128-GCM at about
4.5 GB/s, while two plain Twisted TLS relays carried about 0.6 GB/s on one
stream), so L{BulkTLSProtocol}:

 - passes whole writes to OpenSSL (it cuts records itself) and drains the
   BIO into one transport write;
 - gathers every record decrypted from one socket read into one
   C{dataReceived};
 - reads the socket in larger pieces;
 - sends on its TCP transport at once when nothing is queued
   (L{rtunnel.adapter.eager}).

The TLS behaviour (handshake, verification, shutdown, errors) is Twisted's,
unchanged.

The overridden and called methods are private to Twisted:
L{rtunnel.adapter.fence} checks each of them once per process, and when one
is missing or changed, or C{RTUNNEL_STOCK_IO} is set, L{BulkTLSFactory}
builds Twisted's own TLS protocol instead.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from . import fence
from .eager import send_eagerly

#: Largest plaintext handed to OpenSSL in one call.
WRITE_CHUNK = 256 * 1024
#: Read size for the BIO and for one TLS record's plaintext.
BIO_READ = 256 * 1024
RECORD_READ = 2**15
#: Socket read size (Twisted's default is 64 KiB).
SOCKET_READ = 256 * 1024


class BulkTLSProtocol(TLSMemoryBIOProtocol):
    """L{TLSMemoryBIOProtocol} with fewer, larger calls (see module doc)."""

    def makeConnection(self, transport: Any) -> None:
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = SOCKET_READ
        send_eagerly(transport)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        sent_total = 0
        size = len(data)
        while sent_total < size:
            chunk = data if sent_total == 0 and size <= WRITE_CHUNK else data[sent_total : sent_total + WRITE_CHUNK]
            try:
                sent = self._tlsConnection.send(chunk)
            except WantReadError:
                self._bufferedWrite(data[sent_total:])  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated
                break
            except Error:
                self._tlsShutdownFinished(Failure())  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated
                break
            sent_total += sent
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        try:
            data = connection.bio_read(BIO_READ)
        except WantReadError:
            return
        if len(data) == BIO_READ:
            # More may wait; read until the BIO is empty. (A short read means
            # it is empty already: no second call, no WantReadError raised.)
            chunks = [data]
            while True:
                try:
                    chunks.append(connection.bio_read(BIO_READ))
                except WantReadError:
                    break
            data = b"".join(chunks)
        assert self.transport is not None
        self.transport.write(data)

    def _flushReceiveBIO(self) -> None:
        chunks: list[bytes] = []
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                chunks.append(connection.recv(RECORD_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated
                self._tlsShutdownFinished(None)  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(failure)  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol's own method, unannotated
        self._deliver(chunks)
        self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))


class BulkTLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{BulkTLSProtocol}, or Twisted's own TLS
    protocol when this process runs on stock Twisted I/O
    (L{rtunnel.adapter.fence}).
    """

    protocol: type[TLSMemoryBIOProtocol] = BulkTLSProtocol
    noisy = False

    def __init__(
        self, contextFactory: Any, isClient: bool, wrappedFactory: IProtocolFactory, clock: Any = None
    ) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        if fence.current().stock:
            self.protocol = TLSMemoryBIOFactory.protocol


@implementer(IStreamClientEndpoint)
class BulkTLSClientEndpoint:
    """
    Like C{wrapClientTLS(creator, endpoint)}, with L{BulkTLSFactory}'s
    protocol: C{connect} fires with the application protocol. C{clock} schedules the
    TLS layer's write batching (the global reactor if not given).
    """

    def __init__(self, creator: Any, wrapped: IStreamClientEndpoint, clock: Any = None) -> None:
        self._creator = creator
        self._wrapped = wrapped
        self._clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        factory = BulkTLSFactory(self._creator, True, protocolFactory, clock=self._clock)

        def unwrap(tls: IProtocol) -> IProtocol:
            return cast(TLSMemoryBIOProtocol, tls).wrappedProtocol

        return self._wrapped.connect(factory).addCallback(unwrap)
