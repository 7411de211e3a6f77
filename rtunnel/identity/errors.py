"""
Errors raised by the identity and state layer.

Every exception here carries a message written for an operator: the admin CLI
prints C{str(error)} as its one line of diagnosis, and the tunnel roles log it.
So messages name the file, field or site concerned and say what is wrong, not
how the code noticed.
"""

from __future__ import annotations

from rtunnel import address

__all__ = [
    "IdentityError",
    "CertificateError",
    "InvalidSiteName",
    "AddressError",
    "KeyfileError",
    "KeyfileExists",
    "StateError",
    "SiteNotFound",
    "EnrollmentProtocolError",
    "EnrollmentIncomplete",
    "PeerVerificationFailed",
    "CodedError",
    "EnrollmentRefused",
    "SiteRejected",
    "TOKEN_UNKNOWN",
    "TOKEN_SPENT",
    "TOKEN_EXPIRED",
    "TOKEN_WRONG_SITE",
    "TOKEN_REVOKED",
    "BAD_REQUEST",
    "CSR_INVALID",
    "INTERNAL_ERROR",
    "SITE_UNKNOWN",
    "SITE_REVOKED",
    "CERTIFICATE_SUPERSEDED",
]

# Refusal codes of the enrollment exchange.  They travel on the wire (see
# rtunnel.identity.enrollment), so they are part of the protocol: never rename.
TOKEN_UNKNOWN = "token-unknown"
TOKEN_SPENT = "token-spent"
TOKEN_EXPIRED = "token-expired"
TOKEN_WRONG_SITE = "token-wrong-site"
TOKEN_REVOKED = "token-revoked"
BAD_REQUEST = "bad-request"
CSR_INVALID = "csr-invalid"
INTERNAL_ERROR = "internal-error"

# Reasons a tunnel server turns away a site presenting a valid certificate.
SITE_UNKNOWN = "site-unknown"
SITE_REVOKED = "site-revoked"
CERTIFICATE_SUPERSEDED = "certificate-superseded"


class IdentityError(Exception):
    """
    Base of every error of this layer; C{str()} is a complete sentence for
    an operator.
    """


class CertificateError(IdentityError):
    """
    A certificate, key or certificate request is malformed, of the wrong
    kind, or does not say what it must.
    """


class InvalidSiteName(IdentityError, ValueError):
    """
    A site name breaks the naming rule (1-63 characters of C{a-z 0-9 . _ -},
    starting with a letter or digit).
    """


class AddressError(IdentityError, address.AddressError):
    """
    A server address (C{HOST[:PORT]}) or host name cannot be parsed (by
    L{rtunnel.address}, whose refusal this is, as an identity error).
    """


class KeyfileError(IdentityError):
    """
    A keyfile cannot be read or written, or its content is not a valid
    version 1 rtunnel keyfile.
    """


class KeyfileExists(KeyfileError):
    """
    Writing a keyfile was refused because the path already exists: keyfiles
    hold a secret and are never silently replaced.
    """


class StateError(IdentityError):
    """
    A state directory or database is missing, incomplete, damaged or of an
    unsupported version.  State is never recreated over such damage, because
    that would silently lock out every enrolled site.
    """


class SiteNotFound(StateError):
    """
    An operation named a site the state store has never heard of.
    """


class EnrollmentProtocolError(IdentityError):
    """
    The bytes received during an enrollment exchange are not a well-formed
    enrollment message.
    """


class EnrollmentIncomplete(IdentityError):
    """
    The enrollment connection ended (or timed out) before the server
    answered.  Safe to retry with the same key and token.
    """


class PeerVerificationFailed(IdentityError):
    """
    The TLS peer's certificate was refused during the handshake.

    @ivar code: the OpenSSL X509 verification error number, or C{None} when
        the chain was fine but the name did not match.
    @ivar depth: position in the chain of the offending certificate (0 is
        the peer's own).
    """

    def __init__(self, message: str, code: int | None = None, depth: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.depth = depth


class CodedError(IdentityError):
    """
    An error with a stable machine-readable code and a human message.

    @ivar code: a short stable identifier such as C{"token-spent"}.
    @ivar message: an explanation for the operator.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, CodedError)
        return (self.code, self.message) == (other.code, other.message)

    def __hash__(self) -> int:
        return hash((type(self), self.code, self.message))


class EnrollmentRefused(CodedError):
    """
    The tunnel server refused to enroll a site.  Codes: C{token-unknown},
    C{token-spent}, C{token-expired}, C{token-wrong-site}, C{token-revoked},
    C{bad-request}, C{csr-invalid}, C{internal-error}.
    """


class SiteRejected(CodedError):
    """
    A site presented a certificate from our CA but may not connect.  Codes:
    C{site-unknown}, C{site-revoked}, C{certificate-superseded}.
    """
