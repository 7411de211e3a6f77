"""
Endpoints: how Twisted applications in the cloud reach site services.

L{SiteEndpoint} is an L{IStreamClientEndpoint} that connects through a running
tunnel server to HOST:PORT at a site, so code written for
C{TCP4ClientEndpoint} works through the tunnel unchanged::

    endpoint = SiteEndpoint(registry, "store-17", "10.0.0.5", 554)
    protocol = await endpoint.connect(factory)

or, by description, once a tunnel server runs in the same process::

    endpoint = clientFromString(reactor, "rtunnel:site=store-17:host=10.0.0.5:port=554")

or a service the site declared (C{--service directory=HOST:PORT} at the
site), resolved at each connect from what the site's live session announced::

    endpoint = SiteEndpoint(registry, "store-17", service="directory")
    endpoint = clientFromString(reactor, "rtunnel:site=store-17:service=directory")

The description names the server (C{server=NAME}, default C{default}); a
tunnel server service publishes its registry under its name while it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from .adapter.stream import MuxStream, StreamOpenFailed
from .address import HostPort, parse_host, parse_port
from .mux.errors import ErrorCode
from .roles.registry import SiteRegistry, SiteUnavailable

DEFAULT_OPEN_TIMEOUT = 5.0

_registries: dict[str, SiteRegistry] = {}


def publish_registry(name: str, registry: SiteRegistry) -> None:
    """Make C{registry} reachable by C{rtunnel:…server=NAME} descriptions."""
    _registries[name] = registry


def withdraw_registry(name: str, registry: SiteRegistry) -> None:
    if _registries.get(name) is registry:
        del _registries[name]


def published_registry(name: str) -> SiteRegistry:
    try:
        return _registries[name]
    except KeyError:
        raise SiteUnavailable("*", f"no tunnel server named {name!r} runs in this process") from None


class PublishedRegistry:
    """
    The registry published under C{name}, looked up at each open, so that a
    description can be parsed before the tunnel server has started.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self, site: str, host: str, port: int, timeout: float) -> defer.Deferred[MuxStream]:
        try:
            registry = published_registry(self.name)
        except SiteUnavailable:
            return defer.fail()
        return registry.open(site, host, port, timeout)

    def when_services(self, site: str, timeout: float) -> defer.Deferred[Mapping[str, HostPort]]:
        try:
            registry = published_registry(self.name)
        except SiteUnavailable:
            return defer.fail()
        return registry.when_services(site, timeout)


@implementer(IStreamClientEndpoint)
class SiteEndpoint:
    """
    Connects to C{host}:C{port} at C{site} through the tunnel server that
    owns C{registry}.

    C{connect} fires once the site has connected to the target (OPEN_OK), with
    the protocol built by the factory; it fails with L{SiteUnavailable} (site
    not connected within C{open_timeout}, limits) or L{StreamOpenFailed}
    (the site refused: not allowed, target down).

    Give either C{host} and C{port} or C{service}: a named service of the
    site, looked up at each connect in what its live session announced (it
    must be connected within C{open_timeout} and declare the service; else
    L{SiteUnavailable} with the reason, e.g. C{site store-17 declares no
    service directory (declared: web)}).
    """

    def __init__(
        self,
        registry: SiteRegistry | PublishedRegistry,
        site: str,
        host: str | None = None,
        port: int | None = None,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        *,
        service: str | None = None,
    ) -> None:
        if (service is None) == (host is None or port is None) or (host is None) != (port is None):
            raise ValueError("SiteEndpoint takes either host and port, or service")
        self.service = service
        self.registry = registry
        self.site = site
        self.host = host
        self.port = port
        self.open_timeout = open_timeout

    def __repr__(self) -> str:
        if self.service is not None:
            return f"<SiteEndpoint {self.site}:service={self.service}>"
        return f"<SiteEndpoint {self.site}:{self.host}:{self.port}>"

    def _open(self) -> defer.Deferred[MuxStream]:
        if self.service is None:
            assert self.host is not None and self.port is not None
            return self.registry.open(self.site, self.host, self.port, self.open_timeout)
        from .frontdoor.names import route_service
        from .frontdoor.refusals import Refusal

        service = self.service

        def resolved(services: Mapping[str, HostPort]) -> defer.Deferred[MuxStream]:
            route = route_service(self.site, service, {self.site: services})
            if isinstance(route, Refusal):
                raise SiteUnavailable(self.site, route.reason)
            return self.registry.open(self.site, route.host, route.port, self.open_timeout)

        return self.registry.when_services(self.site, self.open_timeout).addCallback(resolved)

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        stream_d = self._open()

        def opened(stream: MuxStream) -> defer.Deferred[IProtocol]:
            # Cancelling the connect must abandon the stream too (RESET
            # CANCEL): without this it stayed open at both ends forever.
            cancelled = False

            def cancel(_: defer.Deferred[IProtocol]) -> None:
                nonlocal cancelled
                cancelled = True
                stream.reset(ErrorCode.CANCEL, "the connection attempt was cancelled")

            result: defer.Deferred[IProtocol] = defer.Deferred(cancel)

            def settle(outcome: IProtocol | Failure) -> None:
                if cancelled:
                    return  # result already failed with CancelledError
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

            stream.opened.addCallback(attach).addBoth(settle)
            return result

        def attach(stream: MuxStream) -> IProtocol:
            try:
                protocol = protocolFactory.buildProtocol(stream.getPeer())
            except BaseException:
                # Fail the connect, and do not leave the stream open at the site.
                stream.reset(ErrorCode.CANCEL, "the local factory failed to build a protocol")
                raise
            if protocol is None:
                stream.reset(ErrorCode.CANCEL, "the local factory declined the connection")
                raise StreamOpenFailed(ErrorCode.CANCEL, "the factory's buildProtocol returned None")
            stream.attach(protocol)
            return protocol

        return stream_d.addCallback(opened)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SiteEndpointParser:
    """
    C{rtunnel:site=NAME:host=HOST:port=PORT[:timeout=SECONDS][:server=NAME]}
    or C{rtunnel:site=NAME:service=SERVICE[:timeout=SECONDS][:server=NAME]}.
    """

    prefix = "rtunnel"

    def parseStreamClient(self, reactor: IReactorCore, *args: object, **params: object) -> SiteEndpoint:
        # clientFromString passes every parameter as a str; the interface
        # only says object.
        kwargs = cast(dict[str, str], params)
        if args:
            raise ValueError(f"rtunnel endpoint takes only key=value parameters, got {args!r}")
        unknown = set(kwargs) - {"site", "host", "port", "service", "timeout", "server"}
        if unknown:
            raise ValueError(f"rtunnel endpoint: unknown parameter(s) {', '.join(sorted(unknown))}")
        named = "service" in kwargs
        if named and ("host" in kwargs or "port" in kwargs):
            raise ValueError("rtunnel endpoint: give either service= or host= and port=, not both")
        for required in ("site", "service") if named else ("site", "host", "port"):
            if not kwargs.get(required):
                raise ValueError(f"rtunnel endpoint: missing {required}=")
        # Imported here: the dropin imports this module whenever any program
        # looks for Twisted plugins, and this pulls in cryptography.
        from .identity.certs import validate_site_name

        try:
            validate_site_name(kwargs["site"])
            # The one grammar of every address rtunnel reads (rtunnel.address):
            # a host no OPEN frame can carry would only fail later, at every
            # connect. Twisted has already unescaped an IPv6 host's colons.
            if named:
                from .frontdoor.names import validate_service_name

                service: str | None = validate_service_name(kwargs["service"])
                host: str | None = None
                port: int | None = None
            else:
                service = None
                host = parse_host(kwargs["host"])
                port = parse_port(kwargs["port"])
        except ValueError as e:
            raise ValueError(f"rtunnel endpoint: {e}") from None
        if "server" in kwargs and not kwargs["server"]:
            raise ValueError("rtunnel endpoint: server= is empty (leave it out for the default server)")
        timeout_text = kwargs.get("timeout", str(DEFAULT_OPEN_TIMEOUT))
        try:
            timeout = float(timeout_text)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ValueError(f"rtunnel endpoint: timeout={timeout_text!r} is not a positive number of seconds")
        registry = PublishedRegistry(kwargs.get("server", "default"))
        return SiteEndpoint(registry, kwargs["site"], host, port, timeout, service=service)
