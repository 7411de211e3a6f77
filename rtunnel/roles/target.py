"""
The site's side of a stream: check the allowlist, connect to the target, and
splice the stream into that TCP connection.

The allowlist is the site operator's word on what the cloud may reach: the
cloud names a target in each OPEN, and anything not listed is refused with
TARGET_NOT_ALLOWED and logged here (the cloud logs the refusal it receives).
Connection failures are answered with a specific code (refused, unreachable,
timeout, DNS), so the cloud-side log says what went wrong at the site.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from rtunnel.address import HostPort, ip_version
from rtunnel.logs import Logger
from rtunnel.logsafe import LogBudget

from ..adapter.stream import MuxStream
from ..mux.errors import ErrorCode
from .splice import TCPSide

#: A HOST:PORT the cloud may open at this site: an allowlist entry (C{--allow}),
#: a forward's target, the key of an in-process target. The one address type
#: (L{rtunnel.address.HostPort}): C{Target.parse} reads C{--allow} by the same
#: grammar, with the same messages, as every other address rtunnel reads.
Target = HostPort


#: How the site reaches a target: (host, port) -> an endpoint.
EndpointFactory = Callable[[str, int], IStreamClientEndpoint]


def tcp_endpoints(reactor: IReactorTCP, timeout: float) -> EndpointFactory:
    """
    Targets reached by plain TCP. An IP literal is connected to directly: a
    HostnameEndpoint would first "resolve" it through getaddrinfo in a
    thread, a thread hop per stream that costs latency and connection rate.
    Names go through HostnameEndpoint (IPv4/IPv6, happy eyeballs).
    """

    def endpoint_for(host: str, port: int) -> IStreamClientEndpoint:
        version = ip_version(host)
        if version is None:
            return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
        if version == 4:
            return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)

    return endpoint_for


_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


def _failure_code(failure: Failure) -> int:
    value = failure.value
    if isinstance(value, error.ConnectionRefusedError):
        return ErrorCode.TARGET_REFUSED
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError, defer.CancelledError)):
        return ErrorCode.TARGET_TIMEOUT
    if isinstance(value, error.DNSLookupError):
        return ErrorCode.TARGET_DNS_FAILURE
    if isinstance(value, error.NoRouteError):
        return ErrorCode.TARGET_UNREACHABLE
    # Twisted maps only ENETUNREACH to NoRouteError; "no route to host"
    # arrives as a plain ConnectError carrying the errno.
    if isinstance(value, error.ConnectError) and getattr(value, "osError", None) in _UNREACHABLE_ERRNOS:
        return ErrorCode.TARGET_UNREACHABLE
    return ErrorCode.TARGET_ERROR


class TargetConnector:
    """
    The site-side stream handler of a tunnel session.

    @param allow: the targets the cloud may open.
    @param endpoint_for: how to reach a target; injected for tests.
    @param local_factories: targets served in this process by a Twisted
        factory instead of a TCP connection (for applications that embed the
        site role); they need no allowlist entry, being explicit already.
    """

    _log = Logger()

    def __init__(
        self,
        allow: Iterable[Target],
        endpoint_for: EndpointFactory,
        clock: IReactorTime,
        local_factories: Mapping[Target, Factory] | None = None,
    ) -> None:
        self.allow = frozenset(allow)
        self.endpoint_for = endpoint_for
        self.clock = clock
        self.local_factories = dict(local_factories or {})
        self._budget = LogBudget(rate=1.0, burst=5)

    def __call__(self, stream: MuxStream) -> None:
        # The host passed the wire grammar (frames.py), so it has a
        # canonical form: allowlist entries match however the cloud wrote it.
        target = Target.of(stream.host, stream.port)
        factory = self.local_factories.get(target)
        if factory is not None:
            protocol: IProtocol | None = factory.buildProtocol(stream.getPeer())
            if protocol is None:
                stream.refuse(ErrorCode.TARGET_REFUSED, f"{target} refused the stream")
            else:
                stream.accept(protocol)
            return
        if target not in self.allow:
            # The cloud's clients decide how often this happens: one line per
            # target and second at most, with a count of what was left out.
            allowed, suppressed = self._budget.allow(target, self.clock.seconds())
            if allowed:
                self._log.warn(
                    "refused stream {streamID} to {target}: not in the allowlist (--allow){not_logged}",
                    streamID=stream.stream_id,
                    target=str(target),
                    suppressed=suppressed,
                    not_logged=f" ({suppressed} similar not logged)" if suppressed else "",
                )
            stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, f"{target} is not allowed at this site")
            return
        leg = TCPSide()

        def connected(_: object) -> None:
            if stream.disconnected:  # the cloud gave up meanwhile
                if leg.transport is not None:
                    leg.transport.loseConnection()
                return
            stream.accept()
            leg.join(stream)

        def failed(failure: Failure) -> None:
            if stream.disconnected:
                return
            code = _failure_code(failure)
            reason = f"connecting to {target} failed: {failure.getErrorMessage()}"
            allowed, suppressed = self._budget.allow((target, code), self.clock.seconds())
            if allowed:
                self._log.warn(
                    "refused stream {streamID}: {reason}{not_logged}",
                    streamID=stream.stream_id,
                    reason=reason,
                    suppressed=suppressed,
                    not_logged=f" ({suppressed} similar not logged)" if suppressed else "",
                )
            stream.refuse(code, reason)

        d = self.endpoint_for(target.host, target.port).connect(_OneShot(leg, stream))
        d.addCallbacks(connected, failed)
        # The cloud gave up (RESET) before we answered: stop connecting now
        # rather than hold a socket to a slow target until the connect timeout.
        stream.opened.addErrback(lambda _: d.cancel())


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol: TCPSide, stream: MuxStream) -> None:
        self._protocol = protocol
        self._stream = stream

    def buildProtocol(self, addr: object) -> TCPSide | None:
        # None drops a connection made after the cloud gave up, also through
        # an endpoint that could not stop connecting when cancelled.
        return None if self._stream.disconnected else self._protocol
