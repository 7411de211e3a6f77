"""
Every way the front door says no, and how each protocol says it: one table.

A refusal has a I{kind} (what went wrong, from the front door's point of
view) and a I{reason} (the details, for the log line). The kind alone decides
the SOCKS5 reply code (RFC 1928 section 6), the HTTP status of a CONNECT
refusal (RFC 9110) and the words the log line starts with, so that a client
on either protocol and the operator reading the log see the same decision.
Keeping the mapping in one place is what keeps them from drifting apart.

Pure Python (no Twisted), shared by the sans-IO parsers, the router and the
Twisted adapter.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from attrs import frozen

from ..mux.errors import ErrorCode

__all__ = [
    "HTTP_REASONS",
    "TABLE",
    "Codes",
    "Refusal",
    "RefusalKind",
    "SocksReply",
    "refusal_for_open_failure",
]


class SocksReply(enum.IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class RefusalKind(enum.Enum):
    """
    What went wrong. The value is a stable identifier (the C{kind} field of
    the log event, for log shippers); the words of the log line are in
    L{TABLE}.
    """

    # The request itself.
    MALFORMED = "malformed"
    HEADERS_TOO_LARGE = "headers-too-large"
    NAME_INVALID = "name-invalid"
    NAME_TOO_LONG = "name-too-long"
    ADDRESS_TYPE = "address-type"
    COMMAND_NOT_SUPPORTED = "command-not-supported"
    NO_ACCEPTABLE_METHOD = "no-acceptable-method"
    CLIENT_TIMEOUT = "client-timeout"
    # Authentication.
    AUTH_REQUIRED = "auth-required"
    BAD_CREDENTIALS = "bad-credentials"
    # Routing by name (rtunnel.frontdoor.names).
    OUTSIDE_DOMAIN = "outside-domain"
    UNKNOWN_SITE = "unknown-site"
    UNKNOWN_SERVICE = "unknown-service"
    SERVICE_WRONG_PORT = "service-wrong-port"
    # Opening the stream (the registry, then the site's answer).
    SITE_NOT_CONNECTED = "site-not-connected"
    LIMITS = "limits"
    TARGET_NOT_ALLOWED = "target-not-allowed"
    TARGET_REFUSED = "target-refused"
    TARGET_UNREACHABLE = "target-unreachable"
    TARGET_DNS_FAILURE = "target-dns-failure"
    TARGET_TIMEOUT = "target-timeout"
    TARGET_FAILED = "target-failed"
    TUNNEL_LOST = "tunnel-lost"
    INTERNAL = "internal"


@frozen
class Refusal:
    """
    A decision to refuse one front-door request.

    @ivar reason: the details, for the log line only (never sent to the
        client: it may quote what the client sent, or name sites).
    """

    kind: RefusalKind
    reason: str

    @property
    def what(self) -> str:
        """How the log line names the kind (L{Codes.log})."""
        return TABLE[self.kind].log

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}" if self.reason else self.what


@frozen
class Codes:
    """
    One row of the table.

    @ivar socks: the REP code of the SOCKS5 reply, or C{None} for no reply
        (the connection is closed). Only used once a request can be
        answered: refusals in the greeting and authentication phases have
        their own replies (method C{0xFF}, RFC 1929 status C{0x01}), see
        L{rtunnel.frontdoor.socks5}.
    @ivar http: the status of the HTTP response.
    @ivar log: how the log line names the kind.
    """

    socks: SocksReply | None
    http: int
    log: str


_S = SocksReply

#: kind -> SOCKS5 reply code, HTTP status, log wording. The one place where
#: the two protocols' codes are decided.
TABLE: Mapping[RefusalKind, Codes] = MappingProxyType(
    {
        RefusalKind.MALFORMED: Codes(_S.GENERAL_FAILURE, 400, "malformed request"),
        RefusalKind.HEADERS_TOO_LARGE: Codes(_S.GENERAL_FAILURE, 431, "request too large"),
        RefusalKind.NAME_INVALID: Codes(_S.GENERAL_FAILURE, 400, "invalid name"),
        RefusalKind.NAME_TOO_LONG: Codes(_S.GENERAL_FAILURE, 400, "name too long"),
        RefusalKind.ADDRESS_TYPE: Codes(_S.ADDRESS_TYPE_NOT_SUPPORTED, 403, "address instead of a name"),
        RefusalKind.COMMAND_NOT_SUPPORTED: Codes(_S.COMMAND_NOT_SUPPORTED, 405, "not a CONNECT request"),
        RefusalKind.NO_ACCEPTABLE_METHOD: Codes(None, 400, "no acceptable authentication method"),
        RefusalKind.CLIENT_TIMEOUT: Codes(None, 408, "request not complete in time"),
        RefusalKind.AUTH_REQUIRED: Codes(None, 407, "credentials required"),
        RefusalKind.BAD_CREDENTIALS: Codes(None, 407, "bad credentials"),
        RefusalKind.OUTSIDE_DOMAIN: Codes(_S.NOT_ALLOWED, 403, "name outside the front door's domain"),
        RefusalKind.UNKNOWN_SITE: Codes(_S.HOST_UNREACHABLE, 404, "unknown site"),
        RefusalKind.UNKNOWN_SERVICE: Codes(_S.HOST_UNREACHABLE, 404, "unknown service"),
        RefusalKind.SERVICE_WRONG_PORT: Codes(_S.NOT_ALLOWED, 403, "declared service asked on another port"),
        RefusalKind.SITE_NOT_CONNECTED: Codes(_S.NETWORK_UNREACHABLE, 504, "site not connected"),
        RefusalKind.LIMITS: Codes(_S.GENERAL_FAILURE, 503, "limit reached"),
        RefusalKind.TARGET_NOT_ALLOWED: Codes(_S.NOT_ALLOWED, 502, "target not allowed by the site"),
        RefusalKind.TARGET_REFUSED: Codes(_S.CONNECTION_REFUSED, 502, "target refused the connection"),
        RefusalKind.TARGET_UNREACHABLE: Codes(_S.HOST_UNREACHABLE, 502, "target unreachable"),
        RefusalKind.TARGET_DNS_FAILURE: Codes(_S.HOST_UNREACHABLE, 502, "target name not found at the site"),
        RefusalKind.TARGET_TIMEOUT: Codes(_S.TTL_EXPIRED, 504, "target did not answer in time"),
        RefusalKind.TARGET_FAILED: Codes(_S.GENERAL_FAILURE, 502, "site could not reach the target"),
        RefusalKind.TUNNEL_LOST: Codes(_S.GENERAL_FAILURE, 502, "tunnel failed while opening"),
        RefusalKind.INTERNAL: Codes(_S.GENERAL_FAILURE, 500, "internal error"),
    }
)

#: Reason phrases of the statuses the table uses (RFC 9110 section 15, RFC 6585 for 431).
HTTP_REASONS: Mapping[int, str] = MappingProxyType(
    {
        200: "Connection Established",
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        407: "Proxy Authentication Required",
        408: "Request Timeout",
        431: "Request Header Fields Too Large",
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }
)

#: The site's OPEN_FAIL codes (rtunnel.roles.target) as refusal kinds.
_OPEN_FAIL_KINDS: Mapping[int, RefusalKind] = MappingProxyType(
    {
        ErrorCode.TARGET_NOT_ALLOWED: RefusalKind.TARGET_NOT_ALLOWED,
        ErrorCode.TARGET_REFUSED: RefusalKind.TARGET_REFUSED,
        ErrorCode.TARGET_UNREACHABLE: RefusalKind.TARGET_UNREACHABLE,
        ErrorCode.TARGET_DNS_FAILURE: RefusalKind.TARGET_DNS_FAILURE,
        ErrorCode.TARGET_TIMEOUT: RefusalKind.TARGET_TIMEOUT,
        ErrorCode.TARGET_ERROR: RefusalKind.TARGET_FAILED,
        # The site refuses beyond its own stream limit, as our registry does.
        ErrorCode.REFUSED_STREAM: RefusalKind.LIMITS,
    }
)


def refusal_for_open_failure(code: int, reason: str) -> Refusal:
    """
    The refusal for a stream the site did not accept: its OPEN_FAIL code
    says why (L{rtunnel.roles.target}); any other code (the tunnel went
    away, the stream was cancelled) is the tunnel's failure, not the site's
    decision.
    """
    return Refusal(_OPEN_FAIL_KINDS.get(code, RefusalKind.TUNNEL_LOST), reason)
