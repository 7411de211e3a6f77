"""
Builders of the two roles' services, from frozen configuration.

The twistd plugins (rtunnel/cli/*_tap.py) only parse options into a config and
call these; tests and applications that embed rtunnel call them directly with
any reactor. Each builder does its fallible preparation (state directory,
keyfile) at build time, so that a misconfiguration is reported before the
process starts serving, and returns a L{MultiService}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from typing import Any

from attrs import frozen
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from rtunnel.logs import Logger

from .adapter.address import describe
from .adapter.tls import BulkTLSFactory
from .endpoints import publish_registry, withdraw_registry
from .identity.keyfile import DEFAULT_PORT, PUBLIC_PORT_KEY, Keyfile, parse_address, read_keyfile
from .identity.state import ServerState, SiteState
from .identity.tlsconfig import server_tls_options
from .roles.descriptors import RESERVED, DescriptorWatch, soft_limit
from .roles.fatal import stop_with_status
from .roles.forward import ForwardFactory, ForwardSpec
from .roles.registry import SiteRegistry
from .roles.server import AdmissionGate, RevocationWatch, ServerPolicy, TunnelServerFactory
from .roles.site import SitePolicy, TunnelClientService
from .roles.target import Target, TargetConnector, tcp_endpoints

DEFAULT_LISTEN = "tcp:5500"
#: Listen backlog of the tunnel port unless its endpoint description sets
#: one. Twisted's default of 50 overflowed when a thousand sites came back
#: after a restart (384 SYNs dropped, each a one-second stall or worse); at
#: 10,000 sites a queue of 1,024 still dropped tens of thousands of SYNs.
#: Linux silently caps it at net.core.somaxconn (4,096 by default since 5.4).
TUNNEL_BACKLOG = 4096
_LOOPBACK = ("127.", "::1", "localhost")


def with_backlog(description: str, backlog: int = TUNNEL_BACKLOG) -> str:
    """
    C{description} with C{backlog=BACKLOG} added, for the endpoint types
    that take one (tcp, tcp6, unix, ssl), unless it already names one.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in {"tcp", "tcp6", "unix", "ssl"} or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def effective_max_preauth(configured: int, fd_limit: int) -> int:
    """
    The pre-auth cap actually applied: at most a quarter of the descriptors
    the process may open, so that pre-auth connections alone can never take
    the descriptors sites and forward clients need.
    """
    return max(1, min(configured, (fd_limit - RESERVED) // 4))


def _utcnow() -> datetime:
    return datetime.now(UTC)


@frozen
class ServerConfig:
    """Everything C{twistd rtunnel-server} is told."""

    state_dir: str
    listen: str = DEFAULT_LISTEN
    public_addresses: tuple[str, ...] = ()
    forwards: tuple[ForwardSpec, ...] = ()
    open_timeout: float = 5.0
    drain_grace: float = 10.0
    revocation_poll: float = 1.0
    max_streams_per_site: int = 1024
    max_pending_opens: int = 256
    policy: ServerPolicy = ServerPolicy()
    name: str = "default"


@frozen
class SiteConfig:
    """Everything C{twistd rtunnel} is told."""

    state_dir: str
    keyfile: str | None = None
    allow: tuple[Target, ...] = ()
    target_connect_timeout: float = 10.0
    policy: SitePolicy = SitePolicy()


class TunnelServerService(MultiService):
    """
    Listens for sites (TLS added here) and on each forward port; cuts
    revoked sites; drains every session on stop.
    """

    _log = Logger()

    def __init__(
        self, config: ServerConfig, state: ServerState, reactor: Any, on_fatal: Callable[[str], None] | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService.__init__ is unannotated in Twisted
        self.config = config
        if on_fatal is None:
            on_fatal = lambda message: stop_with_status(reactor, 1, message, "rtunnel-server")  # noqa: E731
        self.on_fatal = on_fatal
        self.state = state
        self.reactor = reactor
        # The store numbers each connection so that the end of a replaced
        # session can never mark its successor disconnected.
        store_sessions: dict[str, int] = {}

        def connected(site: str, peer: str) -> None:
            store_sessions[site] = state.store.mark_connected(site, peer, _utcnow())

        def disconnected(site: str) -> None:
            session = store_sessions.pop(site, None)
            if self.factory.stopping:
                # One write per site made a drain of ten thousand sessions
                # seconds longer (and the sites with it); record_server_stop
                # marks every site disconnected at the end.
                return
            state.store.mark_disconnected(site, _utcnow(), session)

        self.registry = SiteRegistry(
            reactor,
            on_connected=connected,
            on_disconnected=disconnected,
            max_pending_opens=config.max_pending_opens,
            max_streams_per_site=config.max_streams_per_site,
        )
        self.factory = TunnelServerFactory(state, self.registry, reactor, config.policy)
        self.gate: AdmissionGate | None = None
        self.forward_factories: list[ForwardFactory] = []
        # Listing /proc/self/fd every 2 s is costly with many sites: it is
        # read only when the connections we hold come near the warning level.
        self.descriptors = DescriptorWatch(reactor, estimate=self._connections)
        self.ports: list[IListeningPort] = []
        self.tunnel_port: IListeningPort | None = None
        self.forward_ports: dict[ForwardSpec, IListeningPort] = {}
        self._watch = RevocationWatch(state, self.registry)
        self._poll: task.LoopingCall | None = None
        self._listening: defer.Deferred[None] | None = None

    def _connections(self) -> int:
        """Connections this server holds a descriptor for: sites (and would-be sites), forward clients."""
        return self.factory.connections + sum(f.connections for f in self.forward_factories)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        self.state.store.record_server_start(os.getpid(), _utcnow())
        publish_registry(self.config.name, self.registry)
        self._poll = task.LoopingCall(self._watch.check)
        self._poll.clock = self.reactor
        self._poll.start(self.config.revocation_poll, now=False)
        self.descriptors.start()
        self._listening = self._listen_all()

    @defer.inlineCallbacks
    def _listen_all(self) -> Generator[defer.Deferred[Any], Any, None]:
        description = with_backlog(self.config.listen)
        try:
            # Our reactor, not the global one, times its small-write batching.
            tls_factory = BulkTLSFactory(server_tls_options(self.state), False, self.factory, clock=self.reactor)
            limit = effective_max_preauth(self.config.policy.max_preauth, soft_limit())
            if limit < self.config.policy.max_preauth:
                self._log.warn(
                    "at most {limit} unauthenticated connections at once (--max-preauth {configured} lowered to a "
                    "quarter of the file descriptor limit)",
                    limit=limit,
                    configured=self.config.policy.max_preauth,
                )
            self.gate = AdmissionGate(tls_factory, self.factory, limit, self.config.policy.max_handshakes)
            port = yield serverFromString(self.reactor, description).listen(self.gate)
            self.tunnel_port = port
            self.ports.append(port)
            self._log.info("tunnel server listening for sites on {address}", address=_address(port))
            self.state.store.set_meta(PUBLIC_PORT_KEY, str(self._public_port(port)))
            for spec in self.config.forwards:
                description = spec.endpoint_description()
                factory = ForwardFactory(spec, self.registry, self.config.open_timeout)
                self.forward_factories.append(factory)
                port = yield serverFromString(self.reactor, description).listen(factory)
                self.forward_ports[spec] = port
                self.ports.append(port)
                self._log.info("forward {forward} listening on {address}", forward=str(spec), address=_address(port))
                if not spec.bind.startswith(_LOOPBACK):
                    self._log.warn(
                        "forward {forward} is bound to {bind}, not loopback: anyone who can reach that address "
                        "reaches {site}:{target} without authentication (docs/security.md, forward clients)",
                        forward=str(spec),
                        bind=spec.bind,
                        site=spec.site,
                        target=str(spec.target),
                    )
        except Exception:
            failure = Failure()
            self.on_fatal(f"cannot listen on {description}: {failure.getErrorMessage()}")

    def _public_port(self, port: IListeningPort) -> int:
        """The port sites dial: from --public-address HOST:PORT if given,
        else the one we listen on."""
        for address in self.config.public_addresses:
            try:
                host, public = parse_address(address, default_port=0)
            except ValueError:
                continue
            if public:
                return public
        return int(getattr(port.getHost(), "port", DEFAULT_PORT))

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], object, None]:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self.descriptors.stop()
        withdraw_registry(self.config.name, self.registry)
        ports, self.ports = self.ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
        sessions = self.registry.sessions()
        # From now on sessions end without a line and a database write each
        # (see TunnelConnection._session_closed): one line says it all.
        self.factory.stopping = True
        if sessions:
            self._log.info(
                "draining {count} site sessions (grace {grace}s)", count=len(sessions), grace=self.config.drain_grace
            )
        started = self.reactor.seconds()
        yield defer.gatherResults(
            [s.drain(self.config.drain_grace, "tunnel server shutting down") for s in sessions], consumeErrors=True
        )
        if sessions:
            self._log.info(
                "drained {count} site sessions in {seconds:.1f}s",
                count=len(sessions),
                seconds=self.reactor.seconds() - started,
            )
        self.state.store.record_server_stop(_utcnow())
        self._log.info("tunnel server stopped")
        yield super().stopService()  # type: ignore[no-untyped-call]  # MultiService.stopService is unannotated in Twisted


def _address(port: IListeningPort) -> str:
    return describe(port.getHost())


def build_server_service(
    config: ServerConfig, reactor: Any, on_fatal: Callable[[str], None] | None = None
) -> TunnelServerService:
    """
    Open (or create, on first start) the server state and build the service.

    @param on_fatal: what to do when the service cannot run (a port cannot
        be listened on); by default the process stops with exit status 1.
        Applications embedding the server pass their own.

    @raise rtunnel.identity.errors.StateError: the state directory is unusable.
    """
    state = ServerState.load_or_create(config.state_dir, list(config.public_addresses))
    return TunnelServerService(config, state, reactor, on_fatal)


def build_site_service(
    config: SiteConfig,
    reactor: Any,
    on_fatal: Callable[[str], None] | None = None,
    local_factories: Mapping[Target, Factory] | None = None,
) -> TunnelClientService:
    """
    Load the site state and the keyfile (if given) and build the tunnel.

    @param on_fatal: what to do on an authentication failure; by default the
        process stops with exit status 1.
    @param local_factories: for applications that embed the site role:
        targets served by a Twisted factory in this process instead of a TCP
        connection (the cloud opens them like any other target).
    @raise rtunnel.identity.errors.StateError, KeyfileError: unusable input.
    """
    log = Logger(namespace="rtunnel.site")
    state = SiteState.load(config.state_dir)
    keyfile: Keyfile | None = read_keyfile(config.keyfile) if config.keyfile else None
    if not config.allow and not local_factories:
        log.warn("no --allow given: the cloud can reach nothing at this site")
    connector = TargetConnector(
        config.allow, tcp_endpoints(reactor, config.target_connect_timeout), reactor, local_factories=local_factories
    )
    if on_fatal is None:
        on_fatal = lambda message: stop_with_status(reactor, 1, message)  # noqa: E731
    return TunnelClientService(reactor, state, keyfile, connector, config.policy, on_fatal)


__all__ = [
    "ServerConfig",
    "SiteConfig",
    "TunnelServerService",
    "build_server_service",
    "build_site_service",
]
