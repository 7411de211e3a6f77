"""
TLS policy of the tunnel connection, as connection creators for
L{twisted.protocols.tls.TLSMemoryBIOFactory}, C{wrapClientTLS} and the SSL
endpoints.

Policy, on both ends:
  - TLS 1.2 minimum; TLS 1.3 preferred (negotiated whenever both ends can);
  - TLS 1.3 suites C{TLS_AES_128_GCM_SHA256}, C{TLS_CHACHA20_POLY1305_SHA256},
    C{TLS_AES_256_GCM_SHA384}, in that order (AES-128 is the cheapest and as
    strong in practice: with AES-NI about 4.5 GB/s per core here, against
    ChaCha20-Poly1305's 3.8, while OpenSSL's default picks AES-256), with the
    server's order deciding;
  - TLS 1.2 suites: ECDHE-ECDSA with AES-GCM or ChaCha20-Poly1305 only;
  - key exchange groups pinned (L{KEY_EXCHANGE_GROUPS}): the hybrid
    post-quantum X25519MLKEM768 where the linked OpenSSL offers it (as
    OpenSSH now defaults to a hybrid), then X25519, then P-256; never
    finite-field DH, which a client could otherwise choose;
  - no compression, renegotiation, session tickets or session cache: a
    tunnel is one long-lived connection, and every handshake re-verifies the
    peer fully.

The server presents its certificate, trusts only its own CA for client
certificates and I{requests} one without requiring it: a site that has no
certificate yet may connect to enroll, and nothing else (the roles decide by
L{peer_identity}).  The site trusts only the CA pinned from its keyfile and
checks the server's name with service-identity (DNS names and IP addresses).

Why not L{twisted.internet.ssl.optionsForClientTLS}: it builds its own
L{OpenSSL.SSL.Context} and offers no way to set TLS 1.3 cipher suites, so the
client creator here mirrors its small C{ClientTLSOptions} (SNI for DNS names,
a service-identity check on the leaf in the verify callback, failure reported
through C{TLSMemoryBIOProtocol.failVerification}) on a context we configure.
Its verify callback also turns OpenSSL's verification error numbers into
L{PeerVerificationFailed} with a readable reason, which is what the site logs
when it dials the wrong server.
"""

from __future__ import annotations

import ipaddress
import weakref
from typing import Any, Protocol

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError as _SICertificateError
from service_identity import VerificationError as _SIVerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.identity.certs import (
    PrivateKey,
    fingerprint,
    key_matches_certificate,
    load_certificate,
    normalize_host,
    site_name_of,
)
from rtunnel.identity.errors import CertificateError, PeerVerificationFailed
from rtunnel.logs import Logger

__all__ = [
    "KEY_EXCHANGE_GROUPS",
    "TLS13_CIPHERSUITES",
    "TLS12_CIPHERS",
    "server_tls_options",
    "server_tls_options_for",
    "site_tls_options",
    "peer_identity",
    "client_refusal",
    "ServerTLSOptions",
    "SiteTLSOptions",
]

TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"

# OpenSSL X509_V_ERR_* numbers a misconfigured deployment actually meets.
_VERIFY_ERRORS = {
    2: "it was not issued by the pinned rtunnel CA",
    7: "its signature is invalid",
    9: "it is not yet valid (check the clocks)",
    10: "it has expired",
    18: "it is self-signed, not issued by the pinned rtunnel CA",
    19: "it was issued by a CA other than the pinned rtunnel CA",
    20: "it was not issued by the pinned rtunnel CA",
    21: "it was not issued by the pinned rtunnel CA",
    24: "its issuer is not a valid CA",
    25: "the chain is longer than the CA allows",
    26: "it is not meant for this purpose (wrong extended key usage)",
    27: "it is not trusted",
    28: "it was rejected",
}

_log = Logger()

#: Key exchange groups, most preferred first, each list a fallback for an
#: OpenSSL that does not know a name in the one before it.
KEY_EXCHANGE_GROUPS = (
    "X25519MLKEM768:X25519:P-256",
    "X25519:P-256",
)


def _groups_setter() -> Any:
    """
    OpenSSL's C{SSL_CTX_set1_groups_list} (under its older name), which
    pyOpenSSL does not wrap: reached through pyOpenSSL's private binding,
    so checked here once. Without it, OpenSSL's default groups apply (which
    include finite-field DH) and one warning says so.
    """
    try:
        from OpenSSL._util import lib

        setter = lib.SSL_CTX_set1_curves_list
        probe = SSL.Context(SSL.TLS_METHOD)
        if not setter(probe._context, KEY_EXCHANGE_GROUPS[-1].encode("ascii")):
            raise ValueError("refused the basic group list")
    except Exception as e:  # any change of pyOpenSSL's internals
        _log.warn(
            "cannot pin the TLS key exchange groups with this pyOpenSSL ({error}); OpenSSL's defaults apply",
            error=str(e),
        )
        return None
    return setter


_set_groups = _groups_setter()


def _pin_groups(ctx: SSL.Context) -> str | None:
    """Pin the key exchange groups of C{ctx}; return the list applied."""
    if _set_groups is None:
        return None
    for groups in KEY_EXCHANGE_GROUPS:
        if _set_groups(ctx._context, groups.encode("ascii")):
            return groups
    return None


class _ServerIdentity(Protocol):
    server_key: PrivateKey
    server_certificate: x509.Certificate
    ca_certificate: x509.Certificate


def _describe(errno: int, peer_role: str = "server") -> str:
    text = _VERIFY_ERRORS.get(errno, f"OpenSSL verification error {errno}")
    # The site pins the CA from its keyfile; the server trusts its own CA.
    return text if peer_role == "server" else text.replace("the pinned rtunnel CA", "this server's CA")


def _base_context() -> SSL.Context:
    """
    A context with the version and cipher policy, and nothing else.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION
    )
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode("ascii"))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _pin_groups(ctx)
    return ctx


def _passthrough(conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
    return bool(ok)


#: Why a client certificate was refused, per server-side OpenSSL connection
#: (and per its app data: the TLS protocol, as Twisted sets it).
_refused_clients: weakref.WeakKeyDictionary[Any, PeerVerificationFailed] = weakref.WeakKeyDictionary()


def client_refusal(tls_protocol: object) -> PeerVerificationFailed | None:
    """
    Why the server refused the client certificate on C{tls_protocol}, if it
    did (the connection then ends with OpenSSL's generic error).

    Found by the protocol's OpenSSL connection (C{getHandle()}, public API
    of Twisted's TLS protocol, until its C{connectionLost} has run: the
    server asks from within it), or by the protocol itself, which Twisted
    makes the connection's app data (so that a caller may also ask later).
    """
    try:
        found = _refused_clients.get(tls_protocol)
    except TypeError:
        found = None
    if found is None:
        get_handle = getattr(tls_protocol, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if handle is not None:
            found = _refused_clients.get(handle)
    return found


def _refusal(peer_role: str, errno: int, depth: int) -> PeerVerificationFailed:
    where = "" if depth == 0 else f" (certificate {depth} of its chain)"
    return PeerVerificationFailed(
        f"{peer_role} certificate refused{where}: {_describe(errno, peer_role)}", errno, depth
    )


def _verify_client(conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
    """
    The server's verify callback: one for every connection, set on the
    context. A callback per connection (a closure and pyOpenSSL's cffi
    trampoline for it) cost 1.9 KiB of memory per connected site; this one
    needs nothing per connection, since the refusal is kept per OpenSSL
    connection, which the TLS protocol hands out (L{client_refusal}).

    It refuses whatever OpenSSL refused and lets OpenSSL fail the
    handshake, which sends the client a TLS alert (Twisted flushes it
    before closing): a site learns from its own, already verified server
    that its certificate is refused, and can stop instead of retrying. The
    reason is kept for the server's log (L{client_refusal}).
    """
    # An exception escaping an OpenSSL callback is lost or printed to
    # stderr, so catch everything and log it properly.
    try:
        if not ok:
            refusal = _refused_clients[conn] = _refusal("client", errno, depth)
            owner = conn.get_app_data()
            if owner is not None:
                try:
                    _refused_clients[owner] = refusal
                except TypeError:
                    pass  # not weakly referenceable: found by the connection only
        return bool(ok)
    except BaseException:
        _log.failure("while verifying a TLS client certificate")
        return False


def _verifier(tls_protocol: object, server_name: str) -> Any:
    """
    Build the site's OpenSSL verify callback for one connection to the
    server.

    It refuses whatever OpenSSL refused, and additionally a leaf
    certificate not valid for C{server_name}, with a
    L{PeerVerificationFailed} that says why, reported to the TLS protocol
    (C{failVerification}), which aborts: an impostor is told nothing.
    (The server, refusing a client, does otherwise: L{_verify_client}.)
    """
    ref: weakref.ReferenceType[Any] | None
    try:
        ref = weakref.ref(tls_protocol)
    except TypeError:
        ref = None

    def fail(error: PeerVerificationFailed) -> bool:
        protocol = None if ref is None else ref()
        if protocol is None:
            return False
        fail_verification = getattr(protocol, "failVerification", None)
        if fail_verification is not None:
            fail_verification(Failure(error))
        return False

    def callback(conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        # An exception escaping an OpenSSL callback is lost or printed to
        # stderr, so catch everything and log it properly.
        try:
            if not ok:
                return fail(_refusal("server", errno, depth))
            if depth == 0:
                leaf = cert.to_cryptography()
                try:
                    if _is_ip(server_name):
                        verify_certificate_ip_address(leaf, server_name)
                    else:
                        verify_certificate_hostname(leaf, server_name)
                except (_SIVerificationError, _SICertificateError):
                    return fail(PeerVerificationFailed(f"server certificate is not valid for {server_name!r}", None, 0))
            return True
        except BaseException:
            _log.failure("while verifying a TLS peer certificate")
            return False

    return callback


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSOptions:
    """
    Server connection creator: see L{server_tls_options}.
    """

    def __init__(
        self,
        key: PrivateKey,
        certificate: x509.Certificate,
        ca_certificate: x509.Certificate,
    ) -> None:
        if not key_matches_certificate(key, certificate):
            raise CertificateError("the server key does not match the server certificate")
        ctx = _base_context()
        ctx.use_certificate(certificate)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
        ca = X509.from_cryptography(ca_certificate)
        store = ctx.get_cert_store()
        assert store is not None
        store.add_cert(ca)
        ctx.add_client_ca(ca_certificate)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _verify_client)
        ctx.set_verify_depth(2)
        # Needed whenever client certificates are verified, even with the
        # session cache off.
        ctx.set_session_id(b"rtunnel-" + fingerprint(ca_certificate)[:16].encode())
        self._context = ctx

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one accepted TCP connection.
        """
        return SSL.Connection(self._context, None)

    def getContext(self) -> SSL.Context:
        """
        The shared context, for APIs that still want an
        C{IOpenSSLContextFactory}; verification failures then carry
        OpenSSL's generic reason only.
        """
        return self._context


@implementer(IOpenSSLClientConnectionCreator)
class SiteTLSOptions:
    """
    Client (site) connection creator: see L{site_tls_options}.
    """

    def __init__(
        self,
        ca_certificate: x509.Certificate,
        server_name: str,
        client_key: PrivateKey | None,
        client_certificate: x509.Certificate | None,
    ) -> None:
        self.server_name = normalize_host(server_name)
        ctx = _base_context()
        if client_certificate is not None and client_key is not None:
            if not key_matches_certificate(client_key, client_certificate):
                raise CertificateError("the site key does not match the site certificate")
            ctx.use_certificate(client_certificate)
            ctx.use_privatekey(client_key)
            ctx.check_privatekey()
        store = ctx.get_cert_store()
        assert store is not None
        store.add_cert(X509.from_cryptography(ca_certificate))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _passthrough)
        ctx.set_verify_depth(2)
        self._context = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one outgoing TCP connection.
        """
        connection = SSL.Connection(self._context, None)
        if not _is_ip(self.server_name):
            # SNI carries DNS names only (RFC 6066).
            connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verifier(tlsProtocol, self.server_name),
        )
        return connection


def server_tls_options_for(
    key: PrivateKey, certificate: x509.Certificate, ca_certificate: x509.Certificate
) -> ServerTLSOptions:
    """
    Server connection creator from explicit key material.
    """
    return ServerTLSOptions(key, certificate, ca_certificate)


def server_tls_options(server_state: _ServerIdentity) -> ServerTLSOptions:
    """
    Server connection creator for a L{ServerState}: presents the server
    certificate, requests (does not require) a client certificate, and
    accepts only client certificates from our CA with EKU C{clientAuth}.
    """
    return ServerTLSOptions(
        server_state.server_key,
        server_state.server_certificate,
        server_state.ca_certificate,
    )


def site_tls_options(
    ca_certificate_pem: str | bytes,
    server_name: str,
    client_key: PrivateKey | None = None,
    client_cert: x509.Certificate | None = None,
) -> SiteTLSOptions:
    """
    Site (client) connection creator.

    @param ca_certificate_pem: the pinned CA, the only one trusted.
    @param server_name: DNS name or IP address the server certificate must
        be valid for (and, if a DNS name, sent as SNI).
    @param client_key: the site key, presented with C{client_cert}; both
        C{None} to connect for enrollment.

    @raise CertificateError: if the CA certificate is malformed or the key
        does not match the certificate.
    @raise ValueError: if only one of C{client_key}, C{client_cert} is given.
    """
    if (client_key is None) != (client_cert is None):
        raise ValueError("give both client_key and client_cert, or neither")
    ca = load_certificate(ca_certificate_pem, "pinned CA certificate")
    return SiteTLSOptions(ca, server_name, client_key, client_cert)


def peer_identity(transport: object) -> tuple[str, str] | None:
    """
    Return C{(site_name, certificate_fingerprint)} of the site at the other
    end of a server-side TLS transport, or C{None} if it presented no
    certificate (it may only enroll).

    Only meaningful after the handshake: with L{server_tls_options} a
    certificate is only ever present once OpenSSL verified it against our CA
    and the C{clientAuth} purpose.  Whether that site may connect now is for
    L{StateStore.check_site} to say.

    @raise CertificateError: if the certificate names no site.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    if isinstance(cert, X509):
        cert = cert.to_cryptography()
    if not isinstance(cert, x509.Certificate):
        raise CertificateError(f"unexpected peer certificate type {type(cert).__name__}")
    return site_name_of(cert), fingerprint(cert)
