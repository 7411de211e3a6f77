"""
C{twistd rtunnel-server}: options in, L{build_server_service} out.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

from twisted.application.service import IService
from twisted.python import usage

from ..address import AddressError, HostPort
from ..frontdoor.wiring import FrontDoorError
from ..identity.errors import IdentityError, StateError
from ..identity.store import database_location
from ..mux.frames import advertise_problem, replica_id_problem
from ..observe.web import AdminEndpointError, admin_option
from ..roles.descriptors import describe_capacity, raise_soft_limit
from ..roles.forward import ForwardSpec
from ..roles.server import SERVER_KEEPALIVE, ServerPolicy
from ..services import DEFAULT_LISTEN, ServerConfig, build_server_service
from .fatal import stop_with_status
from .malloc import tune_malloc
from .options import (
    FLOW_PARAMETERS,
    LOG_PARAMETERS,
    apply_log_level,
    default,
    drain_parameters,
    flow_from,
    keepalive_from,
    keepalive_parameters,
    log_level_from,
    positive_float,
    positive_int,
)
from .server_workers import WORKER_PARAMETERS, make_supervisor, with_workers, worker_service


class Options(usage.Options):
    synopsis = "--state DIR [--listen ENDPOINT] [--public-address HOST]... [--forward SPEC]..."
    longdesc = (
        "Run the cloud role of rtunnel: sites dial in over TLS on --listen; each --forward "
        "[BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT listens on BIND_ADDRESS:PORT (default bind "
        "127.0.0.1) and leads every connection to HOST:HOSTPORT at SITE."
    )
    optParameters = [
        ["state", None, None, "State directory: CA, server certificate, database (created on first start)."],
        ["listen", None, DEFAULT_LISTEN, "Twisted server endpoint for sites; rtunnel adds TLS itself."],
        [
            "database",
            None,
            None,
            "Where tokens, sites and forwards live: sqlite:PATH or postgresql://USER@HOST/DBNAME "
            "(default: the SQLite file in --state; the CA and server identity stay in --state).",
        ],
        [
            "open-timeout",
            None,
            default(ServerConfig, "open_timeout"),
            "Seconds a forwarded client waits for an absent site to (re)connect.",
        ],
        [
            "handshake-timeout",
            None,
            default(ServerPolicy, "handshake_timeout"),
            "Seconds a site connection has to finish TLS and authenticate or enroll.",
        ],
        [
            "max-streams-per-site",
            None,
            default(ServerConfig, "max_streams_per_site"),
            "Most streams open at once to one site; further clients are refused.",
        ],
        [
            "max-pending-opens",
            None,
            default(ServerConfig, "max_pending_opens"),
            "Most clients waiting at once for one absent site.",
        ],
        [
            "max-preauth",
            None,
            default(ServerPolicy, "max_preauth"),
            "Most connections on the tunnel port that are not authenticated yet, waiting ones included; more are "
            "closed at accept (at most a quarter of the descriptor limit applies).",
        ],
        [
            "max-handshakes",
            None,
            default(ServerPolicy, "max_handshakes"),
            "TLS handshakes the server works on at once; further connections on the tunnel port wait their turn, "
            "unread.",
        ],
        *keepalive_parameters(
            SERVER_KEEPALIVE,
            f"{SERVER_KEEPALIVE.timeout:g}; 3 x --keepalive when that is given; sites ping first, the server"
            " mostly only answers",
        ),
        [
            "socks",
            None,
            None,
            "Serve SOCKS5 on this endpoint (a port, or a Twisted endpoint such as tcp:1080): a client asking for "
            "SERVICE.SITE.DOMAIN or HOST.SITE.DOMAIN reaches it at SITE. Bound to 127.0.0.1 unless the endpoint "
            "names an interface (tcp:1080:interface=0.0.0.0), which needs --proxy-users.",
        ],
        [
            "connect-proxy",
            None,
            None,
            "Serve HTTP CONNECT on this endpoint, with the names and binding of --socks.",
        ],
        [
            "domain",
            None,
            default(ServerConfig, "domain"),
            "The domain under which --socks and --connect-proxy serve names.",
        ],
        [
            "proxy-users",
            None,
            None,
            "Users file (USER:SCRYPT-HASH lines, mode 600; `rtunnel proxy-users add`) the front doors require; "
            "without it they serve anyone who can connect, so they must stay on loopback.",
        ],
        [
            "admin",
            None,
            default(ServerConfig, "admin"),
            "Serve the read-only admin endpoint here: /metrics (Prometheus), /healthz, /readyz, the JSON API "
            "/api/v1/... and the status page /. A port or a Twisted endpoint, bound to 127.0.0.1 unless it names "
            "an interface; 'none' turns it off.",
        ],
        [
            "replica-id",
            None,
            None,
            "This server's id among the replicas sharing its database (1-64 letters, digits and ._:@/+[]-); "
            "default HOSTNAME:PORT of --listen.",
        ],
        [
            "advertise",
            None,
            None,
            "HOST:PORT at which sites can reach this replica directly (told to sites); default: none, sites reach "
            "it through the address in their keyfile (a load balancer).",
        ],
        *WORKER_PARAMETERS,
        *drain_parameters(default(ServerConfig, "drain_grace")),
        *FLOW_PARAMETERS,
        *LOG_PARAMETERS,
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options.__init__ is unannotated in Twisted
        self["public-address"] = []
        self["forward"] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept as given: the workers of --workers N run with the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def opt_public_address(self, host: str) -> None:
        """Name or IP under which sites reach this server (repeatable); in its certificate."""
        self["public-address"].append(host)

    def opt_forward(self, spec: str) -> None:
        """[BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT (repeatable), like ssh -R."""
        try:
            self["forward"].append(ForwardSpec.parse(spec))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["state"]:
            raise usage.UsageError("--state DIR is required")
        keepalive = keepalive_from(self, SERVER_KEEPALIVE, SERVER_KEEPALIVE.interval / SERVER_KEEPALIVE.timeout)
        settings, tuning = flow_from(self)
        self.log_level = log_level_from(self)
        if self["database"] is not None:
            try:
                database_location(self["database"], self["state"])
            except StateError as e:
                raise usage.UsageError(str(e)) from None
        self.config = ServerConfig(
            state_dir=self["state"],
            database=self["database"],
            listen=self["listen"],
            public_addresses=tuple(self["public-address"]),
            forwards=tuple(self["forward"]),
            open_timeout=positive_float("open-timeout", self["open-timeout"]),
            drain_grace=positive_float("drain-grace", self["drain-grace"]),
            max_streams_per_site=positive_int("max-streams-per-site", self["max-streams-per-site"]),
            max_pending_opens=positive_int("max-pending-opens", self["max-pending-opens"]),
            socks=self["socks"],
            connect_proxy=self["connect-proxy"],
            domain=self["domain"],
            proxy_users=self["proxy-users"],
            admin=_admin(self),
            replica_id=_replica_id(self["replica-id"]),
            advertise=_advertise(self["advertise"]),
            policy=ServerPolicy(
                settings=settings,
                tuning=tuning,
                keepalive=keepalive,
                handshake_timeout=positive_float("handshake-timeout", self["handshake-timeout"]),
                max_preauth=positive_int("max-preauth", self["max-preauth"]),
                max_handshakes=positive_int("max-handshakes", self["max-handshakes"]),
            ),
        )
        self.config = with_workers(self, self.config)


def _admin(options: usage.Options) -> str | None:
    """C{--admin}, checked now: a mistake is a usage error, not a failure at start."""
    try:
        return admin_option(options["admin"])
    except AdminEndpointError as e:
        raise usage.UsageError(f"--admin: {e}") from None


def _replica_id(text: str | None) -> str | None:
    """C{--replica-id}, checked against the id grammar of the REPLICAS frame (docs/protocol.md)."""
    if text is None:
        return None
    problem = replica_id_problem(text)
    if problem is not None:
        raise usage.UsageError(f"--replica-id {text!r}: {problem}")
    return text


def _advertise(text: str | None) -> str | None:
    """C{--advertise HOST:PORT}, in canonical form (what sites compare and dial)."""
    if text is None:
        return None
    try:
        canonical = str(HostPort.parse(text))
    except AddressError as e:
        raise usage.UsageError(f"--advertise: {e}") from None
    problem = advertise_problem(canonical)
    if problem is not None:
        raise usage.UsageError(f"--advertise: {problem}")
    return canonical


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    tune_malloc()
    apply_log_level(options.log_level)
    # One descriptor per site: a server must not stop at the default soft
    # limit (1,024 under systemd) when the hard limit allows more.
    describe_capacity(*raise_soft_limit())
    try:
        if options.config.workers > 1:
            return make_supervisor(options, options.argv, reactor)
        service = build_server_service(
            options.config, reactor, on_fatal=functools.partial(stop_with_status, reactor, 1, program="rtunnel-server")
        )
        return worker_service(options, service, reactor)
    except (IdentityError, FrontDoorError, AdminEndpointError) as e:
        sys.exit(f"rtunnel-server: error: {e}")
