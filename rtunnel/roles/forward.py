"""
Cloud-side port forwards: a listening port whose every connection becomes a
stream to HOST:PORT at a site (`ssh -R` in reverse-tunnel terms).

The client's first bytes are not held back until the site answered: the stream
is opened at once and what the client sends travels as early data, which saves
a round trip on every short connection. If the site refuses (target not
allowed, down) or is not connected within the open timeout, the client's
connection is closed promptly and the reason is logged.
"""

from __future__ import annotations

from typing import cast

from attrs import frozen
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from rtunnel.address import AddressError, describe, join_host_port, parse_host, parse_port, split_fields
from rtunnel.logs import Logger

from ..adapter.stream import MuxStream, StreamOpenFailed, StreamReset
from ..identity.certs import validate_site_name
from ..identity.errors import InvalidSiteName
from ..mux.errors import code_name
from .registry import SiteRegistry
from .splice import TCPSide
from .target import Target

DEFAULT_BIND = "127.0.0.1"


@frozen
class ForwardSpec:
    """
    C{[BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT}, as C{ssh -R} spells it.
    """

    bind: str
    port: int
    site: str
    target: Target

    @classmethod
    def parse(cls, text: str) -> ForwardSpec:
        """
        Read a spec; the bind address and the target are hosts by the one
        grammar of L{rtunnel.address}, IPv6 in brackets.

        @raise ValueError: naming the spec and the part that is wrong.
        """
        parts = split_fields(text)
        if len(parts) == 4:
            bind_text, rest = DEFAULT_BIND, parts
        elif len(parts) == 5:
            bind_text, rest = parts[0], parts[1:]
        else:
            raise ValueError(f"--forward {text!r}: expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT")
        port_text, site, host, host_port = rest
        try:
            port = parse_port(port_text, "listening port", minimum=0)
        except AddressError as e:
            raise ValueError(f"--forward {text!r}: {e}") from None
        if not site:
            raise ValueError(f"--forward {text!r}: site name is empty")
        try:
            # A name no site can enroll under would make a forward that never works.
            validate_site_name(site)
        except InvalidSiteName as e:
            raise ValueError(f"--forward {text!r}: {e}") from None
        if bind_text.strip() in ("", "[]"):
            raise ValueError(f"--forward {text!r}: bind address is empty")
        try:
            bind = parse_host(bind_text)
        except AddressError as e:
            raise ValueError(f"--forward {text!r}: bind address {e}") from None
        try:
            target = Target.parse(f"{host}:{host_port}")
        except AddressError as e:
            raise ValueError(f"--forward {text!r}: target {e}") from None
        return cls(bind, port, site, target)

    def endpoint_description(self, backlog: int = 1024) -> str:
        """
        The Twisted server endpoint to listen on. The backlog is large:
        with Twisted's default of 50, 64 clients connecting at once lost a
        SYN and stalled for a second (measured on loopback; the kernel caps
        it at net.core.somaxconn).
        """
        bind = self.bind.replace(":", "\\:")
        return f"tcp:{self.port}:interface={bind}:backlog={backlog}"

    def __str__(self) -> str:
        return f"{join_host_port(self.bind, self.port)} -> {self.site}:{self.target}"


class ForwardProtocol(TCPSide):
    """
    One accepted client connection of a forward.
    """

    _log = Logger()

    def __init__(self, factory: ForwardFactory, peer: IAddress | None) -> None:
        super().__init__(on_closed=self._pipe_closed)
        self.factory = factory
        self.peer = peer
        self._opening: defer.Deferred[MuxStream] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        spec = self.factory.spec
        assert self.transport is not None
        d = self.factory.registry.open(spec.site, spec.target.host, spec.target.port, self.factory.open_timeout)
        if not d.called:
            # The site is away: read nothing until the stream exists (one
            # read at most waits here). When it is connected the stream
            # exists already, and pausing would cost two epoll changes.
            self._reading().pauseProducing()
        self._opening = d
        d.addCallbacks(self._stream_opened, self._open_failed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections -= 1
        self.factory.clients.discard(self)
        # A client gone while its site is awaited gives up its place in the
        # queue: no stream is opened for nobody.
        opening, self._opening = self._opening, None
        if opening is not None and not opening.called:
            opening.cancel()
        super().connectionLost(reason)

    def _stream_opened(self, stream: MuxStream) -> None:
        self._opening = None
        if self.closed:
            stream.opened.addErrback(lambda _: None)  # nobody waits for it
            stream.abortConnection()
            return
        stream.opened.addErrback(self._refused)
        assert self.transport is not None
        # Resume before joining: joining registers the stream's throttle,
        # which pauses us again if the tunnel is congested. Resuming after
        # it overrode that pause, and reads then piled up in the stream.
        self._reading().resumeProducing()
        self.join(stream)

    def _reading(self) -> IPushProducer:
        # A TCP transport is its own push producer; Protocol.transport is
        # typed only as ITransport.
        return cast(IPushProducer, self.transport)

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if isinstance(failure.value, defer.CancelledError):
            return  # the client left first
        self.factory.refused += 1
        self._log.warn(
            "forward {forward}: client {client} closed: {reason}",
            forward=str(self.factory.spec),
            client=describe(self.peer),
            reason=failure.getErrorMessage(),
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def _refused(self, failure: Failure) -> Failure | None:
        if not isinstance(failure.value, StreamOpenFailed):
            return failure  # not ours to handle: on down the errback chain
        self.factory.refused += 1
        self._log.warn(
            "forward {forward}: site refused the stream for client {client}: {reason}",
            forward=str(self.factory.spec),
            client=describe(self.peer),
            reason=str(failure.value),
        )
        return None

    def _pipe_closed(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, StreamReset) and self.stream is not None and self.stream.accepted:
            self._log.debug(
                "forward {forward}: stream of client {client} reset: {reason}",
                forward=str(self.factory.spec),
                client=describe(self.peer),
                reason=f"{code_name(value.code)}: {value.reason}",
            )


class ForwardFactory(Factory):
    """
    The listening factory of one forward.

    @param open_timeout: how long a client waits for an absent site to come
        back before its connection is closed.
    @ivar connections: client connections open now (one descriptor each;
        L{rtunnel.roles.descriptors.DescriptorWatch} estimates with it).
    @ivar accepted: client connections accepted since it was made.
    @ivar refused: client connections closed because no stream could be
        opened for them (the site away, a limit, the site's refusal).
    """

    noisy = False
    _log = Logger()

    def __init__(self, spec: ForwardSpec, registry: SiteRegistry, open_timeout: float) -> None:
        self.spec = spec
        self.registry = registry
        self.open_timeout = open_timeout
        self.connections = 0
        self.accepted = 0
        self.refused = 0
        #: the client connections open now, for L{cut}
        self.clients: set[ForwardProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> ForwardProtocol:
        self.connections += 1
        self.accepted += 1
        self.registry.figures.forward_connections += 1
        protocol = ForwardProtocol(self, addr)
        self.clients.add(protocol)
        return protocol

    def cut(self, reason: str) -> int:
        """
        Close every open client connection now (C{rtunnel forwards remove
        --cut}): aborted, not closed politely, since the operator wants them
        gone even if a client or its site has stopped reading. Their streams
        are reset as when a client goes away.

        @return: how many were closed.
        """
        clients = list(self.clients)
        for client in clients:
            self._log.info(
                "forward {forward}: client {client} cut: {reason}",
                forward=str(self.spec),
                client=describe(client.peer),
                reason=reason,
            )
            transport = client.transport
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()
        return len(clients)
