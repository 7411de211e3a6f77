"""
The front doors inside a running tunnel server: what C{--socks},
C{--connect-proxy}, C{--domain} and C{--proxy-users} turn into.

L{add_front_doors} builds one L{FrontDoorFactory} per door and hands it to
the server's service as an L{ExtraListener} (the roles never import this
layer; they only listen on what they are given). Its inputs:

 - B{the endpoint}, made loopback unless it names an interface
   (L{loopback_endpoint}): a front door reaches every site, so exposing it
   must be a decision written on the command line, and beyond loopback it
   needs users (L{unauthenticated_exposure}), refused at build time with the
   reason;
 - B{the directory} (L{KnownSites}): every site enrolled and not revoked
   (the admission snapshot, kept current by the server) or connected now,
   with the services each last announced; read per request, so a site
   enrolled while the server runs is routed at once;
 - B{a small thread pool} for scrypt (L{PasswordPool}), a child service, so
   it starts and stops with the server and the reactor never runs scrypt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.python.threadpool import ThreadPool

from ..adapter.net import split_description
from ..address import HostPort
from ..identity.store import AdmissionSnapshot
from ..roles.registry import SiteRegistry
from ..roles.server import ExtraListener, TunnelServerService, with_backlog
from .names import parse_domain
from .protocol import DoorKind, FrontDoorFactory
from .users import UsersFileError, UserStore, unauthenticated_exposure

__all__ = [
    "FrontDoorError",
    "FrontDoorSettings",
    "KnownSites",
    "PasswordPool",
    "ServicesOf",
    "add_front_doors",
    "check_front_doors",
    "loopback_endpoint",
]

#: Listen backlog of a front door: that of a forward (L{ForwardSpec.endpoint_description
#: <rtunnel.roles.forward.ForwardSpec.endpoint_description>}), for the same bursts of clients.
FRONT_DOOR_BACKLOG = 1024

#: Password-check threads: scrypt is memory-hard (16 MiB each), so a few at most.
PASSWORD_THREADS = 2

#: The services a site last announced (C{{}} for a site that announced none).
ServicesOf = Callable[[str], Mapping[str, HostPort]]

_WITH_INTERFACE = {"tcp": "127.0.0.1", "tcp6": "::1", "ssl": "127.0.0.1"}


class FrontDoorError(ValueError):
    """A front door cannot be set up as configured (the message says why)."""


class FrontDoorSettings(Protocol):
    """What the front doors read of the server's configuration (L{rtunnel.services.ServerConfig})."""

    @property
    def socks(self) -> str | None: ...
    @property
    def connect_proxy(self) -> str | None: ...
    @property
    def domain(self) -> str: ...
    @property
    def proxy_users(self) -> str | None: ...
    @property
    def open_timeout(self) -> float: ...


def loopback_endpoint(description: str) -> tuple[str, str | None]:
    """
    A front door's endpoint description as listened on: a bare port number
    is C{tcp:PORT}; a C{tcp}/C{tcp6}/C{ssl} endpoint without an interface is
    bound to loopback (C{127.0.0.1}, C{::1} for C{tcp6}); the listen backlog
    of the forwards is added.

    @return: the description, and the interface bound (C{None} for a
        C{unix} socket, which is local by nature).
    @raise FrontDoorError: another endpoint type (its reach cannot be judged).
    """
    text = description.strip()
    if text.isdigit():
        text = f"tcp:{text}"
    parts = split_description(text)
    kind = parts[0].lower()
    if kind == "unix":
        return with_backlog(text, FRONT_DOOR_BACKLOG), None
    if kind not in _WITH_INTERFACE:
        raise FrontDoorError(
            f"endpoint {description!r}: a front door listens on tcp:, tcp6:, ssl: or unix: endpoints (or a bare port)"
        )
    named = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")]
    positional = [p for p in parts[1:] if "=" not in p]
    # tcp:PORT:INTERFACE, as Twisted's positional form has it
    interface = named[0] if named else positional[1] if len(positional) > 1 else None
    if interface is None:
        interface = _WITH_INTERFACE[kind]
        text += ":interface=" + interface.replace(":", "\\:")
    return with_backlog(text, FRONT_DOOR_BACKLOG), interface.replace("\\:", ":")


class KnownSites(Mapping[str, Mapping[str, HostPort]]):
    """
    The front door's L{SiteDirectory <rtunnel.frontdoor.names.SiteDirectory>},
    looked up per name rather than copied per request: a site is known when
    it is enrolled and not revoked (the admission snapshot) or connected now.
    A lookup costs two dictionary reads, whatever the number of sites.
    """

    def __init__(self, admission: AdmissionSnapshot, registry: SiteRegistry, services: ServicesOf | None = None):
        self.admission = admission
        self.registry = registry
        self.services: ServicesOf = services if services is not None else _no_services

    def _known(self, site: str) -> bool:
        admitted = self.admission.get(site)
        if admitted is not None and admitted.enrolled and admitted.revoked_at is None:
            return True
        return self.registry.live_session(site) is not None

    def __getitem__(self, site: str) -> Mapping[str, HostPort]:
        if not isinstance(site, str) or not self._known(site):
            raise KeyError(site)
        return self.services(site)

    def __iter__(self) -> Iterator[str]:
        names = set(self.admission) | set(self.registry.connected_sites())
        return iter(sorted(s for s in names if self._known(s)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _no_services(site: str) -> Mapping[str, HostPort]:
    return {}


class PasswordPool(Service):
    """The threads that check passwords, started and stopped with the server."""

    def __init__(self, threads: int = PASSWORD_THREADS) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="rtunnel-passwords")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        self.pool.start()

    def stopService(self) -> None:
        # Joins the threads: at most one scrypt each (tens of milliseconds).
        self.pool.stop()
        super().stopService()  # type: ignore[no-untyped-call]  # Service.stopService is unannotated in Twisted


def _doors(config: FrontDoorSettings) -> list[tuple[DoorKind, str, str]]:
    doors = [
        (DoorKind.SOCKS5, "--socks", config.socks),
        (DoorKind.HTTP_CONNECT, "--connect-proxy", config.connect_proxy),
    ]
    return [(kind, option, endpoint) for kind, option, endpoint in doors if endpoint]


def check_front_doors(config: FrontDoorSettings) -> list[tuple[DoorKind, str]]:
    """
    Judge the front doors' configuration without opening anything:
    endpoints, domain, and no door beyond loopback without users.

    @return: each door and the endpoint description it listens on.
    @raise FrontDoorError: what is wrong and why.
    """
    try:
        parse_domain(config.domain)
    except ValueError as e:
        raise FrontDoorError(f"--domain: {e}") from None
    checked = []
    for kind, option, endpoint in _doors(config):
        description, interface = loopback_endpoint(endpoint)
        if interface is not None:
            problem = unauthenticated_exposure(interface, config.proxy_users is not None, option)
            if problem is not None:
                raise FrontDoorError(problem)
        checked.append((kind, description))
    return checked


def add_front_doors(
    service: TunnelServerService,
    config: FrontDoorSettings,
    reactor: Any,
    services: ServicesOf | None = None,
) -> list[FrontDoorFactory]:
    """
    Give C{service} the front doors C{config} asks for (none: nothing
    changes), before it starts.

    @param services: the services each site last announced; without it,
        names reach hosts only (C{HOST.SITE.D}).
    @raise FrontDoorError: a door beyond loopback without users, a bad
        endpoint or domain, an unusable users file.
    """
    doors = check_front_doors(config)
    if not doors:
        return []
    users = None
    if config.proxy_users is not None:
        try:
            users = UserStore.load(config.proxy_users)
        except UsersFileError as e:
            raise FrontDoorError(str(e)) from None
    pool = None
    if users is not None:
        passwords = PasswordPool()
        passwords.setServiceParent(service)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        pool = passwords.pool
    directory = KnownSites(service.admission, service.registry, services)
    factories = []
    for kind, description in doors:
        factory = FrontDoorFactory(
            kind,
            directory=lambda: directory,
            opener=service.registry.open,
            reactor=reactor,
            open_timeout=config.open_timeout,
            domain=config.domain,
            users=users,
            thread_pool=pool,
            figures=service.figures.door(kind.value),
        )
        service.listeners.append(ExtraListener(f"front door {kind.value}", description, factory))
        factories.append(factory)
    return factories
