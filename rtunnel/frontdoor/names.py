"""
Routing by name: which site, and which HOST:PORT there, a front-door request
for C{(name, port)} reaches.

Under the front door's domain C{D} (C{--domain}, default
C{rtunnel.internal}):

 - C{SERVICE.SITE.D}, asked on the service's declared port, reaches the
   HOST:PORT the site declared for SERVICE (C{--service NAME=HOST:PORT} at
   the site);
 - C{HOST.SITE.D} on any port reaches C{HOST:port} at SITE, where HOST is a
   DNS name of one or more labels or a dotted IPv4 address; the site's
   allowlist decides, exactly as for a forward.

Names are case-insensitive and may end with a dot.

B{SERVICE or HOST.} A single label in front of the site that equals one of
the site's declared services I{is} that service: asked on the declared port
it reaches the service, asked on any other port it is refused
(L{RefusalKind.SERVICE_WRONG_PORT}), never silently sent to a host of that
name. The declaration is the site operator's statement of what the name
means; letting the port pick between two meanings would make one name reach
two different machines. A single label that is not a declared service is a
host name at the site, like any other HOST (the site's allowlist decides).
So L{RefusalKind.UNKNOWN_SERVICE} comes from a name that stops at the site
(C{SITE.D}: nothing in front of it) and from asking for a service
explicitly (L{route_service}, for C{service=} in endpoint strings).

B{Sites with dots.} Site names may contain dots (L{validate_site_name}), so
C{a.b.store.x.D} could be site C{store.x} or site C{x}. The longest known
site name that leaves at least one label in front of it wins: names are
matched against the sites the server knows, and a longer match is the more
specific one. A site whose name has an empty label (C{a..b}) or ends with a
dot cannot be named this way.

Pure Python (no Twisted). Hosts follow the one grammar of
L{rtunnel.address}; nothing here re-implements it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from attrs import frozen

from ..address import MAX_HOST_LENGTH, AddressError, HostPort, ip_version, parse_host, split_fields
from ..identity.certs import validate_site_name
from ..identity.errors import InvalidSiteName
from ..logsafe import printable
from .refusals import Refusal, RefusalKind

__all__ = [
    "DEFAULT_DOMAIN",
    "Route",
    "SiteDirectory",
    "parse_domain",
    "parse_service_spec",
    "requested_name",
    "route",
    "route_service",
    "validate_service_name",
]

DEFAULT_DOMAIN = "rtunnel.internal"

#: What the router needs to know: every site the server knows (connected or
#: not: an unknown site is refused at once, a known one is waited for up to
#: the open timeout) and, for each, the services it last announced.
SiteDirectory = Mapping[str, Mapping[str, HostPort]]

#: The bytes a requested name may hold before the address grammar judges it.
_NAME_BYTES = re.compile(r"[A-Za-z0-9._-]+")
_SERVICE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@frozen
class Route:
    """
    Where a request goes: C{host}:C{port} at C{site}.

    @ivar service: the declared service reached, or C{None} for
        C{HOST.SITE.D}.
    @ivar single_label: a HOST of one label that is not a declared service
        of the site: if the site refuses it, the log line says that it was
        not taken for a service (a typo in a service name looks like this).
    """

    site: str
    host: str
    port: int
    service: str | None = None
    single_label: bool = False

    def describe(self) -> str:
        """How a log line names the destination."""
        what = f"service {self.service} = " if self.service is not None else ""
        return f"site {self.site}: {what}{HostPort(self.host, self.port)}"


def parse_domain(text: str) -> str:
    """
    The canonical spelling of a front-door domain (C{--domain}): a DNS name
    (lower case, no trailing dot), not an IP address.

    @raise ValueError: naming the domain and what is wrong.
    """
    try:
        domain = parse_host(text)
    except AddressError as e:
        raise ValueError(f"--domain {text!r}: {e}") from None
    if ip_version(domain) is not None:
        raise ValueError(f"--domain {text!r}: must be a DNS name, not an IP address")
    return domain


def validate_service_name(name: str) -> str:
    """
    Check a service name (C{--service NAME=HOST:PORT}) and return it: one
    DNS label of lower-case letters, digits and C{-}, at most 63, not
    starting or ending with C{-}. One label, so that C{SERVICE.SITE.D}
    parses one way only.

    @raise ValueError: saying which rule is broken.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("service name is empty")
    if len(name) > 63:
        raise ValueError(f"service name {name!r} is {len(name)} characters long; the limit is 63")
    if not _SERVICE_NAME.fullmatch(name):
        if _SERVICE_NAME.fullmatch(name.lower()):
            raise ValueError(f"service name {name!r} has upper-case letters; use {name.lower()!r}")
        raise ValueError(
            f"service name {name!r} is not a DNS label (lower-case letters, digits and '-', "
            "not starting or ending with '-')"
        )
    return name


def parse_service_spec(text: str) -> tuple[str, HostPort]:
    """
    Read C{NAME=HOST:PORT} (the site's C{--service}); HOST by the one
    address grammar, IPv6 in brackets.

    @raise ValueError: naming the spec and the part that is wrong.
    """
    name, equals, target = text.partition("=")
    if not equals:
        raise ValueError(f"--service {text!r}: expected NAME=HOST:PORT")
    try:
        validate_service_name(name)
        if len(split_fields(target)) != 2:
            raise ValueError(f"expected HOST:PORT after '=', not {target!r}")
        return name, HostPort.parse(target)
    except ValueError as e:
        raise ValueError(f"--service {text!r}: {e}") from None


def requested_name(raw: bytes | str) -> str | Refusal:
    """
    The canonical form of a name a client asked for (the SOCKS5 DST.ADDR of
    type domain name, the host of an HTTP CONNECT), or why it is refused:
    empty, longer than a DNS name can be, holding anything but letters,
    digits, C{.}, C{-} and C{_} (international names must come in their
    C{xn--} form), not a host by L{rtunnel.address}, or an IP address
    (the front door routes names only).
    """
    if isinstance(raw, bytes):
        if not raw.isascii():
            return Refusal(RefusalKind.NAME_INVALID, f"{printable(raw)} is not ASCII (send IDNA names as xn--)")
        text = raw.decode("ascii")
    else:
        text = raw
    if not text:
        return Refusal(RefusalKind.NAME_INVALID, "the name is empty")
    length = len(text) - 1 if text.endswith(".") else len(text)
    if length > MAX_HOST_LENGTH:
        return Refusal(RefusalKind.NAME_TOO_LONG, f"a name of {length} characters (at most {MAX_HOST_LENGTH})")
    if not _NAME_BYTES.fullmatch(text):
        bad = next(c for c in text if not _NAME_BYTES.fullmatch(c))
        return Refusal(
            RefusalKind.NAME_INVALID,
            f"'{printable(text)}' holds '{printable(bad)}' (a name is letters, digits, '.', '-' and '_')",
        )
    try:
        name = parse_host(text)
    except AddressError as e:
        return Refusal(RefusalKind.NAME_INVALID, printable(str(e)))
    if ip_version(name) is not None:
        return Refusal(RefusalKind.ADDRESS_TYPE, f"{name} is an IP address; the front door routes names only")
    return name


def route(name: bytes | str, port: int, domain: str, sites: SiteDirectory) -> Route | Refusal:
    """
    Where C{name}:C{port} goes under C{domain} (canonical, see
    L{parse_domain}), given the known C{sites} and their services; or why
    the request is refused. See the module docstring for the rules.
    """
    checked = requested_name(name)
    if isinstance(checked, Refusal):
        return checked
    if not 1 <= port <= 65535:
        return Refusal(RefusalKind.MALFORMED, f"port {port} (must be 1 to 65535)")
    suffix = "." + domain
    if not checked.endswith(suffix):
        return Refusal(RefusalKind.OUTSIDE_DOMAIN, f"{checked} is not under {domain}")
    labels = checked[: -len(suffix)].split(".")
    # Longest known site first, keeping at least one label in front of it.
    for cut in range(1, len(labels)):
        site = ".".join(labels[cut:])
        if site in sites:
            return _at_site(site, labels[:cut], port, sites[site])
    whole = ".".join(labels)
    if whole in sites:
        return Refusal(
            RefusalKind.UNKNOWN_SERVICE,
            f"{checked} names site {whole} but no service or host in front of it (SERVICE.{whole}.{domain})",
        )
    site = labels[-1]
    try:
        validate_site_name(site)
    except InvalidSiteName as e:
        return Refusal(RefusalKind.UNKNOWN_SITE, f"{checked}: {printable(str(e))}")
    return Refusal(RefusalKind.UNKNOWN_SITE, f"{checked}: no site named {site}")


def _at_site(site: str, front: list[str], port: int, services: Mapping[str, HostPort]) -> Route | Refusal:
    if len(front) == 1:
        service = services.get(front[0])
        if service is not None:
            if port != service.port:
                return Refusal(
                    RefusalKind.SERVICE_WRONG_PORT,
                    f"service {front[0]} of site {site} is on port {service.port}, asked on {port}",
                )
            return Route(site, service.host, service.port, service=front[0])
    host_text = ".".join(front)
    try:
        host = parse_host(host_text)
    except AddressError as e:
        return Refusal(RefusalKind.NAME_INVALID, f"host at site {site}: {printable(str(e))}")
    return Route(site, host, port, single_label=len(front) == 1 and ip_version(host) is None)


def route_service(site: str, service: str, sites: SiteDirectory) -> Route | Refusal:
    """
    Where an explicitly named service of a site goes (C{service=} in an
    C{rtunnel:} endpoint string, C{SiteEndpoint(..., service=...)}): its
    declared HOST:PORT, or L{RefusalKind.UNKNOWN_SITE} /
    L{RefusalKind.UNKNOWN_SERVICE}.
    """
    services = sites.get(site)
    if services is None:
        return Refusal(RefusalKind.UNKNOWN_SITE, f"no site named {printable(site)}")
    target = services.get(service)
    if target is None:
        declared = ", ".join(sorted(services)) or "none"
        return Refusal(
            RefusalKind.UNKNOWN_SERVICE,
            f"site {site} declares no service {printable(service)} (declared: {declared})",
        )
    return Route(site, target.host, target.port, service=service)
