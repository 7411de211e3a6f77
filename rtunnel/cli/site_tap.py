"""
C{twistd rtunnel}: options in, L{build_site_service} out.
"""

from __future__ import annotations

import functools
import sys

from twisted.application.service import IService
from twisted.python import usage

from ..adapter.protocol import Keepalive
from ..frontdoor.names import parse_service_spec
from ..identity.errors import IdentityError
from ..mux.frames import MAX_SERVICES
from ..mux.settings import MAX_STREAMS, Settings
from ..observe.web import AdminEndpointError, admin_option
from ..roles.descriptors import raise_soft_limit
from ..roles.site import SitePolicy
from ..roles.target import Target
from ..services import SiteConfig, build_site_service
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


class Options(usage.Options):
    synopsis = "--state DIR [--keyfile FILE] --allow HOST:PORT [--allow HOST:PORT]..."
    longdesc = (
        "Run the site role of rtunnel: dial out to the tunnel server and let the cloud open "
        "streams to the --allow targets. The first start needs --keyfile (from "
        "'rtunnel keyfile create'); later starts use the credentials stored in --state."
    )
    optParameters = [
        ["state", None, None, "Site state directory: private key, certificate, pinned server."],
        ["keyfile", None, None, "Keyfile to enroll with (first start, or to re-enroll)."],
        ["retry-cap", None, default(SitePolicy, "retry_cap"), "Longest delay in seconds between reconnect attempts."],
        [
            "connect-timeout",
            None,
            default(SitePolicy, "connect_timeout"),
            "Seconds to connect to the tunnel server or a target.",
        ],
        [
            "max-streams",
            None,
            default(Settings, "max_streams"),
            "Most streams the cloud may have open at this site at once.",
        ],
        [
            "handshake-timeout",
            None,
            default(SitePolicy, "handshake_timeout"),
            "Seconds for TLS and the server's HELLO on each connection to the server.",
        ],
        [
            "admin",
            None,
            None,
            "Serve a read-only admin endpoint here: /metrics (Prometheus), /healthz, and /readyz (ready while a "
            "tunnel session is open, with any of the server's replicas). A port or a Twisted endpoint, bound to "
            "127.0.0.1 unless it names an interface; off unless given.",
        ],
        *keepalive_parameters(Keepalive(), "3 x --keepalive"),
        *drain_parameters(default(SitePolicy, "drain_grace")),
        *FLOW_PARAMETERS,
        *LOG_PARAMETERS,
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options.__init__ is unannotated in Twisted
        self["allow"] = []
        self["service"] = {}

    def opt_allow(self, target: str) -> None:
        """HOST:PORT the cloud may open at this site (repeatable; [IPv6]:PORT)."""
        try:
            self["allow"].append(Target.parse(target))
        except ValueError as e:
            raise usage.UsageError(f"--allow {e}") from None

    def opt_service(self, spec: str) -> None:
        """NAME=HOST:PORT: a named service of this site, announced to the server and reachable
        without --allow (repeatable; NAME is a DNS label: a-z, 0-9, '-', at most 63)."""
        try:
            name, target = parse_service_spec(spec)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if name in self["service"]:
            raise usage.UsageError(f"--service {spec!r}: service {name} is declared twice")
        if len(self["service"]) >= MAX_SERVICES:
            raise usage.UsageError(f"--service {spec!r}: at most {MAX_SERVICES} services")
        self["service"][name] = target

    def postOptions(self) -> None:
        if not self["state"]:
            raise usage.UsageError("--state DIR is required")
        self.log_level = log_level_from(self)
        connect_timeout = positive_float("connect-timeout", self["connect-timeout"])
        settings, tuning = flow_from(self, max_streams=positive_int("max-streams", self["max-streams"], MAX_STREAMS))
        self.config = SiteConfig(
            state_dir=self["state"],
            keyfile=self["keyfile"],
            allow=tuple(self["allow"]),
            services=tuple(self["service"].items()),
            target_connect_timeout=connect_timeout,
            admin=_admin(self),
            policy=SitePolicy(
                settings=settings,
                tuning=tuning,
                keepalive=keepalive_from(self, Keepalive()),
                retry_cap=positive_float("retry-cap", self["retry-cap"]),
                connect_timeout=connect_timeout,
                handshake_timeout=positive_float("handshake-timeout", self["handshake-timeout"]),
                drain_grace=positive_float("drain-grace", self["drain-grace"]),
            ),
        )


def _admin(options: usage.Options) -> str | None:
    """C{--admin}, checked now: a mistake is a usage error, not a failure at start."""
    try:
        return admin_option(options["admin"])
    except AdminEndpointError as e:
        raise usage.UsageError(f"--admin: {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    tune_malloc()
    apply_log_level(options.log_level)
    raise_soft_limit()  # one descriptor per stream's target connection
    try:
        return build_site_service(
            options.config, reactor, on_fatal=functools.partial(stop_with_status, reactor, 1, program="rtunnel")
        )
    except (IdentityError, AdminEndpointError) as e:
        sys.exit(f"rtunnel: error: {e}")
