"""
Keys and certificates of an rtunnel deployment.

One private certificate authority per tunnel server signs two kinds of leaf
certificate, and their extended key usages keep the two apart:

  - the server certificate: EKU C{serverAuth} only, subject alternative names
    are the server's public host names and IP addresses;
  - site certificates: EKU C{clientAuth} only, subject C{CN=<site>} and the
    SAN URI C{urn:rtunnel:site:<site>}.

OpenSSL's purpose check (X509_PURPOSE_SSL_SERVER on a client, SSL_CLIENT on a
server) therefore refuses a site certificate presented as a server and the
server certificate presented as a site, even though one CA signed both.

All keys are ECDSA P-256 and all signatures SHA-256: handshakes stay cheap on
small site hardware.  Certificates are valid until the CA expires; a site's
right to connect is decided per connection by the state store (revocation,
supersession), not by certificate lifetime.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from hashlib import sha256

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_identity import CertificateError as _SICertificateError
from service_identity import VerificationError as _SIVerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from rtunnel import address
from rtunnel.address import parse_host
from rtunnel.identity.errors import AddressError, CertificateError, InvalidSiteName

__all__ = [
    "PrivateKey",
    "SITE_URI_PREFIX",
    "CA_LIFETIME",
    "generate_private_key",
    "create_ca",
    "issue_server_certificate",
    "create_csr",
    "validate_csr",
    "issue_site_certificate",
    "site_name_of",
    "server_names_of",
    "certificate_covers",
    "fingerprint",
    "public_key_fingerprint",
    "key_matches_certificate",
    "verify_issued_by",
    "validate_site_name",
    "normalize_host",
    "dump_certificate",
    "load_certificate",
    "dump_private_key",
    "load_private_key",
    "dump_csr",
    "load_csr",
]

PrivateKey = ec.EllipticCurvePrivateKey

SITE_URI_PREFIX = "urn:rtunnel:site:"
CA_LIFETIME = timedelta(days=3652)
# Certificates start an hour in the past so that a peer whose clock lags a
# little still accepts a certificate issued a moment ago.
_BACKDATE = timedelta(hours=1)
_SITE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_SITE_NAME_CHAR_RE = re.compile(r"[a-z0-9._-]")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return now.astimezone(UTC)


def validate_site_name(name: object) -> str:
    """
    Check a site name and return it unchanged.

    Site names end up in certificates, log lines, file names chosen by
    operators and endpoint strings, so they are deliberately plain: 1 to 63
    characters of lower-case letters, digits, C{.}, C{_} and C{-}, starting
    with a letter or digit.

    @raise InvalidSiteName: with a message saying which rule is broken.
    """
    if not isinstance(name, str):
        raise InvalidSiteName(f"site name must be text, not {type(name).__name__}")
    if not name:
        raise InvalidSiteName("site name is empty")
    if len(name) > 63:
        raise InvalidSiteName(f"site name {name!r} is {len(name)} characters long; the limit is 63")
    if _SITE_NAME_RE.match(name):
        return name
    if _SITE_NAME_RE.match(name.lower()):
        raise InvalidSiteName(f"site name {name!r} has upper-case letters; use {name.lower()!r}")
    if not _SITE_NAME_CHAR_RE.match(name[0]) or name[0] in "._-":
        raise InvalidSiteName(f"site name {name!r} must start with a lower-case letter or a digit")
    bad = next(c for c in name if not _SITE_NAME_CHAR_RE.match(c))
    raise InvalidSiteName(f"site name {name!r} contains {bad!r}; allowed are a-z, 0-9, '.', '_' and '-'")


def normalize_host(host: str) -> str:
    """
    Return the canonical spelling of a host name or IP address, by the one
    grammar of L{rtunnel.address.parse_host}: IP addresses compressed (no
    brackets), DNS names in lower case without a trailing dot.

    @raise AddressError: if C{host} is neither an IP address nor a valid DNS
        name (wildcards are not accepted), with L{parse_host}'s message.
    """
    try:
        return parse_host(host)
    except address.AddressError as e:
        raise AddressError(str(e)) from None


def generate_private_key() -> PrivateKey:
    """
    Generate a fresh ECDSA P-256 private key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def _check_p256(key: object, source: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{source} holds a {_key_kind(key)}, not an ECDSA P-256 key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"{source} holds an ECDSA key on curve {key.curve.name}, not P-256")


def _key_kind(key: object) -> str:
    name = type(key).__name__.replace("PublicKey", "").replace("PrivateKey", "")
    return f"{name or 'unknown'} key"


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def create_ca(common_name: str, now: datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    """
    Create the certificate authority of one tunnel server.

    The CA may sign leaf certificates only (C{pathlen:0}), so a leaked site or
    server key can never be used to mint further certificates.

    @return: the CA private key and its self-signed certificate, valid for
        about ten years.
    """
    issued = _now(now)
    key = generate_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rtunnel"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - _BACKDATE)
        .not_valid_after(issued + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf_builder(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    eku: x509.ObjectIdentifier,
    san: list[x509.GeneralName],
    now: datetime | None,
) -> x509.Certificate:
    issued = _now(now)
    if not key_matches_certificate(ca_key, ca_cert):
        raise CertificateError("the CA key does not match the CA certificate")
    not_after = ca_cert.not_valid_after_utc
    if not_after <= issued:
        raise CertificateError(f"the CA certificate expired on {not_after:%Y-%m-%d}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _general_name(host: str) -> x509.GeneralName:
    name = normalize_host(host)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_server_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    server_key: PrivateKey,
    names: Sequence[str],
    now: datetime | None = None,
) -> x509.Certificate:
    """
    Issue the tunnel server's certificate.

    @param names: host names and IP addresses sites may use to reach the
        server; each becomes a DNS or IP subject alternative name (the first
        also the common name).  Duplicates are dropped.

    @return: a certificate for C{server_key} with EKU C{serverAuth} only.

    @raise AddressError: if a name is neither a host name nor an IP address.
    """
    general: list[x509.GeneralName] = []
    for host in names:
        entry = _general_name(host)
        if entry not in general:
            general.append(entry)
    if not general:
        raise AddressError("a server certificate needs at least one host name")
    first = str(general[0].value)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rtunnel"),
            x509.NameAttribute(NameOID.COMMON_NAME, first[:64]),
        ]
    )
    return _leaf_builder(
        ca_key,
        ca_cert,
        subject,
        server_key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        general,
        now,
    )


def create_csr(site_key: PrivateKey, site_name: str) -> x509.CertificateSigningRequest:
    """
    Create the certificate request a site sends when it enrolls.

    The request proves possession of C{site_key}; the private key itself
    never leaves the site.
    """
    validate_site_name(site_name)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_name)]))
        .sign(site_key, hashes.SHA256())
    )


def validate_csr(csr: x509.CertificateSigningRequest, site_name: str) -> None:
    """
    Check that a site's certificate request may be signed for C{site_name}.

    The cheap checks come first and the signature last: a request arrives
    before the client has authenticated, and verifying, say, an RSA
    signature with a huge public exponent costs milliseconds of reactor
    time, which nobody should be able to buy with an unauthenticated
    request. Only a P-256 key's signature is ever verified.

    @raise CertificateError: if the key is not ECDSA P-256, the common name
        is not exactly C{site_name}, or the self-signature is invalid.
    """
    try:
        key = csr.public_key()
    except Exception as e:
        raise CertificateError(f"certificate request public key is unusable: {e}") from e
    _check_p256(key, "certificate request")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertificateError(f"certificate request must have exactly one common name, it has {len(cns)}")
    if cns[0].value != site_name:
        raise CertificateError(f"certificate request is for {str(cns[0].value)[:64]!r}, not for site {site_name!r}")
    try:
        valid = csr.is_signature_valid
    except Exception as e:
        raise CertificateError(f"certificate request signature cannot be checked: {e}") from e
    if not valid:
        raise CertificateError("certificate request signature is invalid")


def issue_site_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    site_name: str,
    now: datetime | None = None,
) -> x509.Certificate:
    """
    Sign a site's certificate request.

    @return: a certificate with subject C{CN=site_name}, SAN URI
        C{urn:rtunnel:site:<site_name>} and EKU C{clientAuth} only.

    @raise InvalidSiteName: if C{site_name} is not a valid site name.
    @raise CertificateError: if C{csr} fails L{validate_csr}.
    """
    validate_site_name(site_name)
    validate_csr(csr, site_name)
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_name)])
    return _leaf_builder(
        ca_key,
        ca_cert,
        subject,
        public_key,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site_name)],
        now,
    )


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def site_name_of(cert: x509.Certificate) -> str:
    """
    Return the site a site certificate was issued to.

    The SAN URI is authoritative; the common name must agree with it.

    @raise CertificateError: if the certificate names no site, several
        sites, or an invalid site name.
    """
    san = _san(cert)
    uris = [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)
    sites = [u[len(SITE_URI_PREFIX) :] for u in uris if u.startswith(SITE_URI_PREFIX)]
    if len(sites) != 1:
        raise CertificateError(
            f"certificate is not an rtunnel site certificate ({len(sites)} {SITE_URI_PREFIX}<name> names)"
        )
    try:
        name = validate_site_name(sites[0])
    except InvalidSiteName as e:
        raise CertificateError(f"certificate names an invalid site: {e}") from e
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [name]:
        raise CertificateError(f"certificate common name does not match its site name {name!r}")
    return name


def server_names_of(cert: x509.Certificate) -> list[str]:
    """
    Return the DNS names and IP addresses a server certificate covers, in
    certificate order.
    """
    san = _san(cert)
    if san is None:
        return []
    return [str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress)]


def certificate_covers(cert: x509.Certificate, host: str) -> bool:
    """
    Tell whether a site dialling C{host} would accept C{cert} by name.

    This applies the same service-identity rules as the site's TLS check.
    """
    try:
        name = normalize_host(host)
    except AddressError:
        return False
    try:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            verify_certificate_hostname(cert, name)
        else:
            verify_certificate_ip_address(cert, name)
    except (_SIVerificationError, _SICertificateError):
        return False
    return True


def fingerprint(cert: x509.Certificate) -> str:
    """
    Return the SHA-256 fingerprint of a certificate's DER encoding, as
    lower-case hex.
    """
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_fingerprint(
    key: ec.EllipticCurvePublicKey | PrivateKey | x509.CertificateSigningRequest,
) -> str:
    """
    Return the SHA-256 of the DER SubjectPublicKeyInfo of a key (or of the
    key in a certificate request), as lower-case hex.
    """
    public = key.public_key() if isinstance(key, (x509.CertificateSigningRequest, ec.EllipticCurvePrivateKey)) else key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sha256(der).hexdigest()


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    """
    Tell whether C{cert} certifies the public half of C{key}.
    """
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """
    Check that C{ca_cert} signed C{cert}.

    @raise CertificateError: if it did not.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError("certificate was not issued by this CA") from None


def dump_certificate(cert: x509.Certificate) -> str:
    """
    Return a certificate as PEM text.
    """
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _as_bytes(data: str | bytes, source: str) -> bytes:
    if isinstance(data, bytes):
        return data
    try:
        return data.encode("ascii")
    except UnicodeEncodeError:
        raise CertificateError(f"{source} contains non-ASCII characters; PEM is ASCII") from None


def load_certificate(data: str | bytes, source: str = "certificate") -> x509.Certificate:
    """
    Parse exactly one PEM certificate.

    @param source: what the data is, for the error message (a file name or
        a field name).

    @raise CertificateError: if C{data} is not exactly one PEM certificate.
    """
    raw = _as_bytes(data, source)
    if b"-----BEGIN CERTIFICATE-----" not in raw:
        raise CertificateError(f"{source} is not a PEM certificate (no BEGIN CERTIFICATE line)")
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as e:
        raise CertificateError(f"{source} is not a valid PEM certificate: {e}") from e
    if len(certs) != 1:
        raise CertificateError(f"{source} holds {len(certs)} certificates; expected one")
    return certs[0]


def dump_private_key(key: PrivateKey) -> bytes:
    """
    Return a private key as unencrypted PKCS#8 PEM.  Protect it with file
    permissions: see docs/security.md.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: str | bytes, source: str = "private key") -> PrivateKey:
    """
    Parse an unencrypted PEM ECDSA P-256 private key.

    @raise CertificateError: if C{data} is not such a key.
    """
    raw = _as_bytes(data, source)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise CertificateError(f"{source} is encrypted; rtunnel keys are not") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"{source} is not a valid PEM private key: {e}") from None
    _check_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def dump_csr(csr: x509.CertificateSigningRequest) -> str:
    """
    Return a certificate request as PEM text.
    """
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_csr(data: str | bytes, source: str = "certificate request") -> x509.CertificateSigningRequest:
    """
    Parse a PEM certificate request (without checking its content: see
    L{validate_csr}).

    @raise CertificateError: if C{data} is not a PEM certificate request.
    """
    raw = _as_bytes(data, source)
    try:
        return x509.load_pem_x509_csr(raw)
    except ValueError as e:
        raise CertificateError(f"{source} is not a valid PEM certificate request: {e}") from e
