"""
Builders of the two roles' services, from frozen configuration.

The twistd plugins (rtunnel/cli/*_tap.py) only parse options into a config and
call these; tests and applications that embed rtunnel call them directly with
any reactor. Each builder does its fallible preparation (state directory,
keyfile) at build time, so that a misconfiguration is reported before the
process starts serving, and returns a L{MultiService}.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from attrs import frozen
from twisted.internet.protocol import Factory

from rtunnel.logs import Logger

from .endpoints import publish_registry, withdraw_registry
from .frontdoor.names import DEFAULT_DOMAIN
from .frontdoor.wiring import add_front_doors, check_front_doors
from .identity.keyfile import Keyfile, read_keyfile
from .identity.state import ServerState, SiteState
from .observe.web import DEFAULT_SERVER_ADMIN, add_server_admin, add_site_admin
from .roles.forward import ForwardSpec
from .roles.server import (
    TUNNEL_BACKLOG,
    ServerPolicy,
    TunnelServerService,
    effective_max_preauth,
    with_backlog,
)
from .roles.site import SitePolicy, TunnelClientService
from .roles.target import Target, TargetConnector, tcp_endpoints

DEFAULT_LISTEN = "tcp:5500"


@frozen
class ServerConfig:
    """Everything C{twistd rtunnel-server} is told."""

    state_dir: str
    listen: str = DEFAULT_LISTEN
    #: C{--database}: C{sqlite:PATH} or C{postgresql://...}; None: the SQLite file in C{state_dir}
    database: str | None = None
    public_addresses: tuple[str, ...] = ()
    forwards: tuple[ForwardSpec, ...] = ()
    open_timeout: float = 5.0
    drain_grace: float = 10.0
    revocation_poll: float = 1.0
    max_streams_per_site: int = 1024
    max_pending_opens: int = 256
    policy: ServerPolicy = ServerPolicy()
    name: str = "default"
    #: front doors (rtunnel/frontdoor): endpoints, off when None; loopback unless they name an interface
    socks: str | None = None
    connect_proxy: str | None = None
    domain: str = DEFAULT_DOMAIN
    #: the front doors' users file; required for a door beyond loopback
    proxy_users: str | None = None
    #: the read-only admin endpoint (metrics, health, JSON API, status page); off when None
    admin: str | None = DEFAULT_SERVER_ADMIN
    #: C{--workers}: worker processes sharing the listening ports (L{rtunnel.roles.workers}); 1: this process serves
    workers: int = 1
    #: C{--replica-id}: this server's name among the replicas sharing its
    #: database; None: C{HOSTNAME:PORT} of the tunnel port
    #: (L{rtunnel.roles.replicas.default_replica_id})
    replica_id: str | None = None
    #: C{--advertise}: the canonical C{HOST:PORT} at which sites reach this
    #: replica directly; None: only through the shared (load-balanced) address
    advertise: str | None = None


@frozen
class SiteConfig:
    """Everything C{twistd rtunnel} is told."""

    state_dir: str
    keyfile: str | None = None
    allow: tuple[Target, ...] = ()
    target_connect_timeout: float = 10.0
    policy: SitePolicy = SitePolicy()
    #: C{--service NAME=HOST:PORT}: announced to the server, and reachable
    #: without an C{--allow} of their own
    services: tuple[tuple[str, Target], ...] = ()
    #: C{--admin}: metrics, health and readiness on this endpoint; off when None
    admin: str | None = None


def build_server_service(
    config: ServerConfig, reactor: Any, on_fatal: Callable[[str], None] | None = None
) -> TunnelServerService:
    """
    Open (or create, on first start) the server state and build the service.

    @param on_fatal: what to do when the service cannot run (a port cannot
        be listened on); by default L{stop_reactor}: log it and stop the
        reactor. C{twistd rtunnel-server} passes its own, which also makes
        the process exit with status 1; an embedding application passes
        what suits it.

    @raise rtunnel.identity.errors.StateError: the state directory is unusable.
    @raise rtunnel.frontdoor.wiring.FrontDoorError: a front door is
        misconfigured (beyond loopback without users, say).
    @raise rtunnel.observe.web.AdminEndpointError: C{admin} is no endpoint.
    """
    check_front_doors(config)
    state = ServerState.load_or_create(config.state_dir, list(config.public_addresses), database=config.database)
    if on_fatal is None:
        on_fatal = functools.partial(stop_reactor, reactor)
    service = TunnelServerService(
        config, state, reactor, on_fatal, publish=publish_registry, withdraw=withdraw_registry
    )
    add_front_doors(service, config, reactor, services=service.registry.last_announced)
    add_server_admin(service, config.admin, reactor)
    return service


def stop_reactor(reactor: Any, message: str) -> None:
    """
    The builders' default C{on_fatal}: log C{message} as critical and stop
    the reactor. Ending the process (and its exit status) is the CLI's
    business (L{rtunnel.cli.fatal}), not the library's.
    """
    _fatal_log.critical("{message}", message=message)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


_fatal_log = Logger(namespace="rtunnel.fatal")


def build_site_service(
    config: SiteConfig,
    reactor: Any,
    on_fatal: Callable[[str], None] | None = None,
    local_factories: Mapping[Target, Factory] | None = None,
) -> TunnelClientService:
    """
    Load the site state and the keyfile (if given) and build the tunnel.

    @param on_fatal: what to do when the site must not retry (its token is
        spent, its site revoked, ...); by default L{stop_reactor}. C{twistd
        rtunnel} passes its own, which also makes the process exit with
        status 1.
    @param local_factories: for applications that embed the site role:
        targets served by a Twisted factory in this process instead of a TCP
        connection (the cloud opens them like any other target).
    @raise rtunnel.identity.errors.StateError, KeyfileError: unusable input.
    @raise rtunnel.observe.web.AdminEndpointError: C{admin} is no endpoint.
    """
    log = Logger(namespace="rtunnel.site")
    state = SiteState.load(config.state_dir)
    keyfile: Keyfile | None = read_keyfile(config.keyfile) if config.keyfile else None
    if not config.allow and not config.services and not local_factories:
        log.warn("no --allow given: the cloud can reach nothing at this site")
    # A declared service is reachable without an --allow of its own.
    allowed = tuple(dict.fromkeys((*config.allow, *(target for _, target in config.services))))
    connector = TargetConnector(
        allowed, tcp_endpoints(reactor, config.target_connect_timeout), reactor, local_factories=local_factories
    )
    if on_fatal is None:
        on_fatal = functools.partial(stop_reactor, reactor)
    policy = attrs.evolve(config.policy, services=config.services) if config.services else config.policy
    service = TunnelClientService(reactor, state, keyfile, connector, policy, on_fatal)
    add_site_admin(service, config.admin, reactor)
    return service


__all__ = [
    "TUNNEL_BACKLOG",
    "ServerConfig",
    "SiteConfig",
    "TunnelServerService",
    "build_server_service",
    "build_site_service",
    "effective_max_preauth",
    "with_backlog",
]
