"""
Tests for L{rtunnel.identity.tlsconfig}: real OpenSSL handshakes between
in-memory transports (L{twisted.test.iosim}), no sockets.

C{PurposeTests} holds the impersonation guarantee: certificates issued by the
one CA cannot cross roles, because of their extended key usage alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rtunnel.identity import certs
from rtunnel.identity.errors import CertificateError, PeerVerificationFailed
from rtunnel.identity.tlsconfig import (
    KEY_EXCHANGE_GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERSUITES,
    ServerTLSOptions,
    client_refusal,
    peer_identity,
    server_tls_options,
    site_tls_options,
)
from tests.helpers_identity import Authority, Recorder, TestCase, tls_pair

# OpenSSL's X509_V_ERR_INVALID_PURPOSE: "unsupported certificate purpose".
INVALID_PURPOSE = 26

_AUTHORITY = Authority.create(["tunnel.example", "127.0.0.1", "::1"])
_SITE_KEY, _SITE_CERT = _AUTHORITY.site("alpha")


def _leaf(
    authority: Authority,
    eku: x509.ObjectIdentifier,
    dns_name: str,
) -> tuple[certs.PrivateKey, x509.Certificate]:
    """
    A certificate from C{authority}'s CA that differs from a proper server
    certificate in nothing but (possibly) its extended key usage.
    """
    key = certs.generate_private_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(authority.ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(authority.ca_key, hashes.SHA256())
    )
    return key, cert


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _RawOptions:
    """
    A bare OpenSSL endpoint (no verification) with a chosen version and
    cipher offer, to probe the other side's policy.
    """

    def __init__(
        self,
        max_version: int = SSL.TLS1_3_VERSION,
        min_version: int = SSL.TLS1_2_VERSION,
        ciphers: str | None = None,
        suites: str | None = None,
        certificate: tuple[certs.PrivateKey, x509.Certificate] | None = None,
        groups: str | None = None,
    ) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(min_version)
        ctx.set_max_proto_version(max_version)
        if ciphers is not None:
            ctx.set_cipher_list(ciphers.encode())
        if suites is not None:
            ctx.set_tls13_ciphersuites(suites.encode())
        if certificate is not None:
            ctx.use_privatekey(certificate[0])
            ctx.use_certificate(certificate[1])
        if groups is not None:
            from OpenSSL._util import lib

            assert lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()), groups
        self.context = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def _site_options(server_name: str = "tunnel.example", with_certificate: bool = True) -> object:
    if with_certificate:
        return site_tls_options(_AUTHORITY.ca_pem, server_name, _SITE_KEY, _SITE_CERT)
    return site_tls_options(_AUTHORITY.ca_pem, server_name)


def _supports(group: str) -> bool:
    from OpenSSL._util import lib

    return bool(lib.SSL_CTX_set1_curves_list(SSL.Context(SSL.TLS_METHOD)._context, group.encode()))


class HandshakeTests(TestCase):
    def test_site_with_certificate(self) -> None:
        """
        An enrolled site and the server handshake with TLS 1.3 and
        TLS_AES_128_GCM_SHA256, data flows, and the server learns the site's
        name and certificate fingerprint.
        """
        server, site = Recorder(b"from server"), Recorder(b"from site")
        client_tls, server_tls, _ = tls_pair(server_tls_options(_AUTHORITY), _site_options(), server, site)
        self.assertTrue(server.handshook and site.handshook)
        self.assertEqual(server.received, b"from site")
        self.assertEqual(site.received, b"from server")
        handle = client_tls.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(handle.get_cipher_name(), "TLS_AES_128_GCM_SHA256")
        self.assertEqual(peer_identity(server_tls), ("alpha", certs.fingerprint(_SITE_CERT)))

    def test_client_certificate_is_optional(self) -> None:
        """
        A site without a certificate (enrolling) completes the handshake; the
        server sees no identity.
        """
        server, site = Recorder(), Recorder(b"enroll me")
        _, server_tls, _ = tls_pair(server_tls_options(_AUTHORITY), _site_options(with_certificate=False), server, site)
        self.assertTrue(server.handshook)
        self.assertEqual(server.received, b"enroll me")
        self.assertIsNone(peer_identity(server_tls))

    def test_server_order_decides_tls13_suite(self) -> None:
        """
        A client preferring AES-256 still gets AES-128: the server's order
        decides.
        """
        server, client = Recorder(), Recorder()
        client_tls, _, _ = tls_pair(
            server_tls_options(_AUTHORITY),
            _RawOptions(suites="TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"),
            server,
            client,
        )
        self.assertTrue(client.handshook)
        self.assertEqual(client_tls.getHandle().get_cipher_name(), "TLS_AES_128_GCM_SHA256")

    def test_key_exchange_prefers_the_hybrid_post_quantum_group(self) -> None:
        """
        Site and server agree on X25519MLKEM768 (the OpenSSL linked here
        offers it; else X25519), as OpenSSH now defaults to a hybrid.
        """
        server, site = Recorder(), Recorder()
        client_tls, server_tls, _ = tls_pair(server_tls_options(_AUTHORITY), _site_options(), server, site)
        self.assertTrue(site.handshook)
        expected = KEY_EXCHANGE_GROUPS[0].split(":")[0] if _supports("X25519MLKEM768") else "X25519"
        self.assertEqual(client_tls.getHandle().get_group_name(), expected)
        self.assertEqual(server_tls.getHandle().get_group_name(), expected)

    def test_key_exchange_groups_are_pinned(self) -> None:
        """
        A client offering only finite-field DH finds no common group; one
        offering only P-256 or only X25519 gets it.
        """
        server, client = Recorder(), Recorder(b"x")
        tls_pair(server_tls_options(_AUTHORITY), _RawOptions(groups="ffdhe2048:ffdhe3072"), server, client)
        self.assertFalse(client.handshook)
        self.assertEqual(server.received, b"")
        for group in ("P-256", "X25519"):
            server, client = Recorder(), Recorder()
            client_tls, _, _ = tls_pair(server_tls_options(_AUTHORITY), _RawOptions(groups=group), server, client)
            self.assertTrue(client.handshook, group)
            self.assertEqual(client_tls.getHandle().get_group_name(), {"P-256": "secp256r1", "X25519": "x25519"}[group])

    def test_tls12_client_gets_ecdhe_aes_gcm(self) -> None:
        """
        A TLS 1.2-only client is served, with ECDHE-ECDSA-AES128-GCM-SHA256.
        """
        server, client = Recorder(), Recorder()
        client_tls, _, _ = tls_pair(
            server_tls_options(_AUTHORITY),
            _RawOptions(max_version=SSL.TLS1_2_VERSION),
            server,
            client,
        )
        handle = client_tls.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(handle.get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_tls12_without_aead_is_refused(self) -> None:
        """
        A TLS 1.2 client offering only CBC suites finds no common cipher.
        """
        server, client = Recorder(), Recorder(b"x")
        tls_pair(
            server_tls_options(_AUTHORITY),
            _RawOptions(
                max_version=SSL.TLS1_2_VERSION,
                ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA",
            ),
            server,
            client,
        )
        self.assertFalse(client.handshook)
        self.assertIsNotNone(client.lost)
        self.assertEqual(server.received, b"")

    def test_tls11_is_refused(self) -> None:
        """
        TLS 1.1 and older are refused.
        """
        server, client = Recorder(), Recorder(b"x")
        tls_pair(
            server_tls_options(_AUTHORITY),
            _RawOptions(
                min_version=SSL.TLS1_VERSION,
                max_version=SSL.TLS1_1_VERSION,
                ciphers="DEFAULT:@SECLEVEL=0",
            ),
            server,
            client,
        )
        self.assertFalse(client.handshook)
        self.assertEqual(server.received, b"")

    def test_policy_cipher_lists(self) -> None:
        """
        Both ends offer exactly the policy suites: the three TLS 1.3 suites
        in the preferred order, then the three ECDHE-ECDSA AEAD suites.
        """
        expected = TLS13_CIPHERSUITES.split(":") + TLS12_CIPHERS.split(":")
        site_connection = _site_options().clientConnectionForTLS(object())  # type: ignore[attr-defined]
        server_connection = server_tls_options(_AUTHORITY).serverConnectionForTLS(object())
        self.assertEqual(site_connection.get_cipher_list(), expected)
        self.assertEqual(server_connection.get_cipher_list(), expected)

    def test_site_speaks_tls12(self) -> None:
        """
        The site still reaches a TLS 1.2-only server.
        """
        server, site = Recorder(), Recorder(b"x")
        client_tls, _, _ = tls_pair(
            _RawOptions(
                max_version=SSL.TLS1_2_VERSION,
                certificate=(_AUTHORITY.server_key, _AUTHORITY.server_certificate),
            ),
            _site_options(with_certificate=False),
            server,
            site,
        )
        self.assertTrue(site.handshook)
        self.assertEqual(client_tls.getHandle().get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(server.received, b"x")

    def test_sni(self) -> None:
        """
        A DNS server name is sent as SNI; an IP address is not (RFC 6066)
        but is verified against the certificate's IP addresses.
        """
        server, site = Recorder(), Recorder()
        _, server_tls, _ = tls_pair(server_tls_options(_AUTHORITY), _site_options(), server, site)
        self.assertEqual(server_tls.getHandle().get_servername(), b"tunnel.example")
        for address in ("127.0.0.1", "::1"):
            server, site = Recorder(), Recorder()
            _, server_tls, _ = tls_pair(server_tls_options(_AUTHORITY), _site_options(address), server, site)
            self.assertTrue(site.handshook, address)
            self.assertIsNone(server_tls.getHandle().get_servername())


class ServerVerificationTests(TestCase):
    """
    The site refuses a server it cannot verify during the handshake, so its
    application data (an enrollment token) is never sent.
    """

    def assertRefused(self, server_options: object, site_options: object) -> PeerVerificationFailed:
        server, site = Recorder(), Recorder(b"secret token")
        tls_pair(server_options, site_options, server, site)
        self.assertFalse(site.handshook)
        self.assertEqual(server.received, b"")
        assert site.lost is not None
        error = site.lost.value
        self.assertIsInstance(error, PeerVerificationFailed)
        assert isinstance(error, PeerVerificationFailed)
        return error

    def test_server_from_another_ca(self) -> None:
        """
        A server whose certificate comes from another CA (even with the right
        name) is refused as not issued by the pinned CA.
        """
        impostor = Authority.create(["tunnel.example"])
        error = self.assertRefused(server_tls_options(impostor), _site_options())
        self.assertIn("pinned rtunnel CA", str(error))

    def test_wrong_name(self) -> None:
        """
        Our own server certificate is refused for a name it does not carry.
        """
        error = self.assertRefused(server_tls_options(_AUTHORITY), _site_options("elsewhere.example"))
        self.assertIn("not valid for 'elsewhere.example'", str(error))
        self.assertIsNone(error.code)

    def test_wrong_ip_address(self) -> None:
        """
        An IP address the certificate does not list is refused.
        """
        error = self.assertRefused(server_tls_options(_AUTHORITY), _site_options("192.0.2.1"))
        self.assertIn("not valid for '192.0.2.1'", str(error))

    def test_self_signed_server(self) -> None:
        """
        A self-signed certificate is refused.
        """
        key, cert = certs.create_ca("tunnel.example")
        error = self.assertRefused(_RawOptions(certificate=(key, cert)), _site_options())
        self.assertIn("self-signed, not issued by the pinned rtunnel CA", str(error))


class PurposeTests(TestCase):
    """
    The impersonation guarantee: one CA signs both roles' certificates, and
    only their extended key usage keeps them apart.  These handshakes show
    OpenSSL's purpose check rejecting a crossed certificate
    (X509_V_ERR_INVALID_PURPOSE), and a control in which the same kind of
    certificate with the right EKU passes.
    """

    def test_site_certificate_cannot_act_as_server(self) -> None:
        """
        An attacker holding a site's key and certificate cannot pose as the
        tunnel server: the site refuses it on purpose, before any data.
        """
        server, site = Recorder(), Recorder(b"secret token")
        tls_pair(
            ServerTLSOptions(_SITE_KEY, _SITE_CERT, _AUTHORITY.ca_certificate),
            site_tls_options(_AUTHORITY.ca_pem, "alpha"),
            server,
            site,
        )
        self.assertEqual(server.received, b"")
        assert site.lost is not None
        self.assertIsInstance(site.lost.value, PeerVerificationFailed)
        self.assertEqual(site.lost.value.code, INVALID_PURPOSE)

    def test_eku_alone_decides_on_the_site(self) -> None:
        """
        A certificate from our CA valid for the server's name is refused as
        a server when its EKU is clientAuth, and accepted when it is
        serverAuth: nothing but the EKU differs.
        """
        server, site = Recorder(), Recorder(b"secret token")
        key, cert = _leaf(_AUTHORITY, ExtendedKeyUsageOID.CLIENT_AUTH, "tunnel.example")
        tls_pair(
            ServerTLSOptions(key, cert, _AUTHORITY.ca_certificate),
            _site_options(with_certificate=False),
            server,
            site,
        )
        self.assertEqual(server.received, b"")
        assert site.lost is not None
        self.assertEqual(site.lost.value.code, INVALID_PURPOSE)
        self.assertIn("wrong extended key usage", str(site.lost.value))

        server, site = Recorder(), Recorder(b"hello")
        key, cert = _leaf(_AUTHORITY, ExtendedKeyUsageOID.SERVER_AUTH, "tunnel.example")
        tls_pair(
            ServerTLSOptions(key, cert, _AUTHORITY.ca_certificate),
            _site_options(with_certificate=False),
            server,
            site,
        )
        self.assertTrue(site.handshook)
        self.assertEqual(server.received, b"hello")

    def test_server_certificate_cannot_act_as_site(self) -> None:
        """
        The server's own certificate presented as a client certificate is
        refused by the server on purpose; no application data gets through
        and no identity is derived.
        """
        server, site = Recorder(), Recorder(b"pretend site")
        _, server_tls, _ = tls_pair(
            server_tls_options(_AUTHORITY),
            site_tls_options(
                _AUTHORITY.ca_pem,
                "tunnel.example",
                _AUTHORITY.server_key,
                _AUTHORITY.server_certificate,
            ),
            server,
            site,
        )
        self.assertFalse(server.handshook)
        self.assertEqual(server.received, b"")
        assert server.lost is not None
        refusal = client_refusal(server_tls)
        self.assertIsInstance(refusal, PeerVerificationFailed)
        self.assertEqual(refusal.code, INVALID_PURPOSE)  # type: ignore[union-attr]
        self._site_told(site)

    def _site_told(self, site: Recorder) -> None:
        """
        The refused client was told by an alert, after its own handshake
        had completed (TLS 1.3: the server checks the client certificate
        last), so it can tell the refusal came from the verified server.
        """
        self.assertTrue(site.handshook)
        assert site.lost is not None
        self.assertIsInstance(site.lost.value, SSL.Error)
        self.assertIn("alert", str(site.lost.value))

    def test_client_certificate_from_another_ca(self) -> None:
        """
        A site certificate from another CA is refused by the server.
        """
        other = Authority.create()
        key, cert = other.site("alpha")
        server, site = Recorder(), Recorder(b"pretend site")
        _, server_tls, _ = tls_pair(
            server_tls_options(_AUTHORITY),
            site_tls_options(_AUTHORITY.ca_pem, "tunnel.example", key, cert),
            server,
            site,
        )
        self.assertFalse(server.handshook)
        self.assertEqual(server.received, b"")
        assert server.lost is not None
        self.assertIsInstance(client_refusal(server_tls), PeerVerificationFailed)
        self._site_told(site)


class SharedVerifierTests(TestCase):
    """
    The server verifies client certificates with one callback on its
    context, none per connection (each cost 1.9 KiB per connected site):
    the refusal is still found for the connection it belongs to.
    """

    def _handshake(self, server: SSL.Connection, client: SSL.Connection) -> None:
        for _ in range(20):  # a TLS 1.3 handshake takes two round trips; bounded
            for conn in (client, server):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    pass  # the refusal
            moved = False
            for src, dst in ((client, server), (server, client)):
                try:
                    data = src.bio_read(1 << 16)
                except SSL.WantReadError:
                    continue
                dst.bio_write(data)
                moved = True
            if not moved:
                return

    def test_refusal_found_by_the_connection(self) -> None:
        """
        Two server connections share the context's callback; a refused
        client certificate on one is found through that connection (as a
        TLS protocol's getHandle gives it, without Twisted's app data), and
        nothing is found for the other, accepted one.
        """
        options = server_tls_options(_AUTHORITY)
        other = Authority.create()
        bad_key, bad_cert = other.site("alpha")
        good_key, good_cert = _AUTHORITY.site("beta")
        refused, accepted = options.serverConnectionForTLS(object()), options.serverConnectionForTLS(object())
        for server, (key, cert) in ((refused, (bad_key, bad_cert)), (accepted, (good_key, good_cert))):
            server.set_accept_state()
            client = site_tls_options(_AUTHORITY.ca_pem, "tunnel.example", key, cert).clientConnectionForTLS(object())
            client.set_connect_state()
            self._handshake(server, client)

        class Handle:
            def __init__(self, connection: SSL.Connection) -> None:
                self.connection = connection

            def getHandle(self) -> SSL.Connection:
                return self.connection

        refusal = client_refusal(Handle(refused))
        self.assertIsInstance(refusal, PeerVerificationFailed)
        self.assertIn("client certificate refused", str(refusal))
        self.assertIsNone(client_refusal(Handle(accepted)))
        self.assertIsNotNone(accepted.get_peer_certificate())
        self.assertIsNone(client_refusal(object()))


class _FakeTransport:
    def __init__(self, cert: object) -> None:
        self.cert = cert

    def getPeerCertificate(self) -> object:
        return self.cert


class PeerIdentityTests(TestCase):
    def test_no_certificate(self) -> None:
        """
        No certificate (or no TLS at all) means no identity.
        """
        self.assertIsNone(peer_identity(_FakeTransport(None)))
        self.assertIsNone(peer_identity(object()))

    def test_site_certificate(self) -> None:
        """
        A site certificate, as pyOpenSSL or cryptography object, gives the
        site name and fingerprint.
        """
        expected = ("alpha", certs.fingerprint(_SITE_CERT))
        self.assertEqual(peer_identity(_FakeTransport(X509.from_cryptography(_SITE_CERT))), expected)
        self.assertEqual(peer_identity(_FakeTransport(_SITE_CERT)), expected)

    def test_not_a_site_certificate(self) -> None:
        """
        A certificate naming no site is an error, not an anonymous peer.
        """
        self.assertRaises(
            CertificateError,
            peer_identity,
            _FakeTransport(X509.from_cryptography(_AUTHORITY.server_certificate)),
        )


class OptionsTests(TestCase):
    def test_interfaces(self) -> None:
        """
        The creators provide Twisted's connection creator interfaces.
        """
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, server_tls_options(_AUTHORITY)))
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, _site_options()))

    def test_key_without_certificate(self) -> None:
        """
        A client key without its certificate (or the reverse) is a usage
        error.
        """
        self.assertRaises(ValueError, site_tls_options, _AUTHORITY.ca_pem, "h", _SITE_KEY, None)
        self.assertRaises(ValueError, site_tls_options, _AUTHORITY.ca_pem, "h", None, _SITE_CERT)

    def test_mismatched_keys(self) -> None:
        """
        A key that does not match its certificate is refused up front.
        """
        other = certs.generate_private_key()
        self.assertRaises(CertificateError, site_tls_options, _AUTHORITY.ca_pem, "h", other, _SITE_CERT)
        self.assertRaises(
            CertificateError,
            ServerTLSOptions,
            other,
            _AUTHORITY.server_certificate,
            _AUTHORITY.ca_certificate,
        )

    def test_bad_pinned_ca(self) -> None:
        """
        A malformed pinned CA is a CertificateError.
        """
        self.assertRaises(CertificateError, site_tls_options, "garbage", "tunnel.example")
