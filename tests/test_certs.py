"""
Tests for L{rtunnel.identity.certs}: what each kind of certificate says.

That a site certificate cannot pass as the server (and the reverse) in a real
TLS handshake is tested in test_tlsconfig.py (C{PurposeTests}).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from hashlib import sha256

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given

from rtunnel.identity import certs
from rtunnel.identity.errors import AddressError, CertificateError, InvalidSiteName
from tests.helpers_identity import NOW, Authority, site_names


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.create(["tunnel.example", "127.0.0.1", "::1"])


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_may_only_sign_leaf_certificates(authority: Authority) -> None:
    """
    The CA is a CA with path length 0, may sign certificates and CRLs only,
    and is valid for about ten years.
    """
    ca = authority.ca_certificate
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3640) < lifetime < timedelta(days=3670)
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)


def test_keys_are_p256_and_signatures_sha256(authority: Authority) -> None:
    """
    Every key is ECDSA P-256 and every certificate is signed with
    ECDSA-SHA256.
    """
    key, site = authority.site("alpha")
    for cert in (authority.ca_certificate, authority.server_certificate, site):
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(certs.generate_private_key().curve, ec.SECP256R1)


def test_server_certificate_names_and_purpose(authority: Authority) -> None:
    """
    The server certificate carries DNS names as DNS SANs and IP addresses as
    IP SANs, EKU serverAuth only, digitalSignature, and is not a CA.
    """
    cert = authority.server_certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tunnel.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    certs.verify_issued_by(cert, authority.ca_certificate)
    assert certs.server_names_of(cert) == ["tunnel.example", "127.0.0.1", "::1"]


def test_server_certificate_normalizes_and_deduplicates_names(authority: Authority) -> None:
    """
    Names are lower-cased, lose a trailing dot and IPv6 addresses are
    compressed; duplicates collapse.
    """
    cert = certs.issue_server_certificate(
        authority.ca_key,
        authority.ca_certificate,
        authority.server_key,
        ["Tunnel.Example.", "tunnel.example", "0:0:0:0:0:0:0:1", "::1"],
    )
    assert certs.server_names_of(cert) == ["tunnel.example", "::1"]


@pytest.mark.parametrize("name", ["", "*.example.com", "bad name", "-x.example", "1.2.3"])
def test_server_certificate_rejects_invalid_names(authority: Authority, name: str) -> None:
    """
    A name that is neither a DNS name nor an IP address is refused.
    """
    with pytest.raises(AddressError):
        certs.issue_server_certificate(authority.ca_key, authority.ca_certificate, authority.server_key, [name])


def test_certificate_covers_applies_service_identity_rules(authority: Authority) -> None:
    """
    C{certificate_covers} agrees with what a site's TLS check accepts:
    listed names and addresses in any spelling, nothing else.
    """
    cert = authority.server_certificate
    assert certs.certificate_covers(cert, "TUNNEL.example")
    assert certs.certificate_covers(cert, "0::1")
    assert certs.certificate_covers(cert, "127.0.0.1")
    assert not certs.certificate_covers(cert, "other.example")
    assert not certs.certificate_covers(cert, "127.0.0.2")
    assert not certs.certificate_covers(cert, "not a host")


def test_site_certificate_identity_and_purpose(authority: Authority) -> None:
    """
    A site certificate has subject CN=<site>, the SAN URI
    urn:rtunnel:site:<site>, EKU clientAuth only, is not a CA, certifies
    the CSR's key and expires with the CA.
    """
    key = certs.generate_private_key()
    csr = certs.create_csr(key, "alpha")
    cert = certs.issue_site_certificate(authority.ca_key, authority.ca_certificate, csr, "alpha")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpha"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:rtunnel:site:alpha"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certs.key_matches_certificate(key, cert)
    assert cert.not_valid_after_utc == authority.ca_certificate.not_valid_after_utc
    assert cert.not_valid_before_utc <= datetime.now(UTC)
    assert certs.site_name_of(cert) == "alpha"


@given(name=site_names)
def test_site_name_round_trips_through_certificate(name: str) -> None:
    """
    Any valid site name survives CSR, issuance and C{site_name_of}.
    """
    authority = _shared_authority()
    key = certs.generate_private_key()
    cert = certs.issue_site_certificate(authority.ca_key, authority.ca_certificate, certs.create_csr(key, name), name)
    assert certs.site_name_of(cert) == name


_AUTHORITY: list[Authority] = []


def _shared_authority() -> Authority:
    if not _AUTHORITY:
        _AUTHORITY.append(Authority.create())
    return _AUTHORITY[0]


def test_issue_site_certificate_refuses_csr_for_another_site(authority: Authority) -> None:
    """
    A CSR whose common name is another site is refused, naming both.
    """
    csr = certs.create_csr(certs.generate_private_key(), "beta")
    with pytest.raises(CertificateError, match="'beta', not for site 'alpha'"):
        certs.issue_site_certificate(authority.ca_key, authority.ca_certificate, csr, "alpha")


def test_validate_csr_refuses_other_curves() -> None:
    """
    A CSR over a key that is not P-256 is refused.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alpha")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="not P-256"):
        certs.validate_csr(csr, "alpha")


def test_validate_csr_refuses_bad_signature() -> None:
    """
    A CSR whose self-signature does not verify (tampered) is refused.
    """
    csr = certs.create_csr(certs.generate_private_key(), "alpha")
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(CertificateError, match="signature"):
        certs.validate_csr(tampered, "alpha")


class _SignatureSpy:
    """A real certificate request that records whether its signature was checked."""

    def __init__(self, csr: x509.CertificateSigningRequest) -> None:
        self._csr = csr
        self.signature_checked = False

    @property
    def is_signature_valid(self) -> bool:
        self.signature_checked = True
        return self._csr.is_signature_valid

    def __getattr__(self, name: str) -> object:
        return getattr(self._csr, name)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP521R1()),
    ],
    ids=["rsa", "p521"],
)
def test_validate_csr_checks_key_type_before_the_signature(make_key) -> None:  # type: ignore[no-untyped-def]
    """
    A request over a key that is not P-256 is refused for its key type
    without its signature ever being verified: before authentication, a
    client must not be able to make us spend CPU on an expensive signature
    (an RSA key with a huge public exponent costs milliseconds).
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alpha")]))
        .sign(make_key(), hashes.SHA256())
    )
    spy = _SignatureSpy(csr)
    with pytest.raises(CertificateError, match="not (an ECDSA )?P-256"):
        certs.validate_csr(spy, "alpha")  # type: ignore[arg-type]
    assert not spy.signature_checked


def test_validate_csr_checks_the_name_before_the_signature() -> None:
    """A P-256 request for another site is refused before its signature is verified."""
    spy = _SignatureSpy(certs.create_csr(certs.generate_private_key(), "beta"))
    with pytest.raises(CertificateError, match="'beta', not for site 'alpha'"):
        certs.validate_csr(spy, "alpha")  # type: ignore[arg-type]
    assert not spy.signature_checked


def test_site_name_of_refuses_non_site_certificates(authority: Authority) -> None:
    """
    The server certificate and the CA are not site certificates.
    """
    for cert in (authority.server_certificate, authority.ca_certificate):
        with pytest.raises(CertificateError, match="not an rtunnel site certificate"):
            certs.site_name_of(cert)


def test_site_name_of_requires_matching_common_name(authority: Authority) -> None:
    """
    A certificate whose CN disagrees with its site URI is refused.
    """
    key = certs.generate_private_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "beta")]))
        .issuer_name(authority.ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:rtunnel:site:alpha")]),
            critical=False,
        )
        .sign(authority.ca_key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="common name"):
        certs.site_name_of(cert)


def test_fingerprints(authority: Authority) -> None:
    """
    C{fingerprint} is the SHA-256 of the DER certificate in hex;
    C{public_key_fingerprint} is the same for a key, its public half and a
    CSR over it, and differs between keys.
    """
    cert = authority.server_certificate
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certs.fingerprint(cert) == sha256(der).hexdigest()
    key = certs.generate_private_key()
    csr = certs.create_csr(key, "alpha")
    fp = certs.public_key_fingerprint(key)
    assert len(fp) == 64
    assert fp == certs.public_key_fingerprint(key.public_key())
    assert fp == certs.public_key_fingerprint(csr)
    assert fp != certs.public_key_fingerprint(certs.generate_private_key())


def test_verify_issued_by_refuses_other_ca(authority: Authority) -> None:
    """
    A certificate is not accepted as issued by an unrelated CA.
    """
    other = Authority.create()
    with pytest.raises(CertificateError, match="not issued by this CA"):
        certs.verify_issued_by(authority.server_certificate, other.ca_certificate)


def test_pem_round_trips(authority: Authority) -> None:
    """
    Certificates, keys and CSRs survive dump and load.
    """
    cert = authority.server_certificate
    assert certs.load_certificate(certs.dump_certificate(cert)) == cert
    key = certs.load_private_key(certs.dump_private_key(authority.server_key))
    assert certs.key_matches_certificate(key, cert)
    csr = certs.create_csr(key, "alpha")
    assert certs.load_csr(certs.dump_csr(csr)) == csr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "no BEGIN CERTIFICATE"),
        ("hello", "no BEGIN CERTIFICATE"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid PEM"),
        ("caf\u00e9", "non-ASCII"),
    ],
)
def test_load_certificate_errors(data: str, message: str) -> None:
    """
    Malformed certificate text gives a specific message naming the source.
    """
    with pytest.raises(CertificateError, match=message) as info:
        certs.load_certificate(data, "ca.crt")
    assert "ca.crt" in str(info.value)


def test_load_certificate_refuses_several(authority: Authority) -> None:
    """
    Two certificates where one is expected is an error, not "take the first".
    """
    pem = authority.ca_pem + certs.dump_certificate(authority.server_certificate)
    with pytest.raises(CertificateError, match="holds 2 certificates"):
        certs.load_certificate(pem)


def test_load_private_key_errors() -> None:
    """
    Garbage, an encrypted key and a key on another curve are each refused
    with their own message.
    """
    with pytest.raises(CertificateError, match="not a valid PEM private key"):
        certs.load_private_key(b"garbage", "site.key")
    key = certs.generate_private_key()
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CertificateError, match="encrypted"):
        certs.load_private_key(encrypted, "site.key")
    p384 = certs.dump_private_key(ec.generate_private_key(ec.SECP384R1()))  # type: ignore[arg-type]
    with pytest.raises(CertificateError, match="secp384r1, not P-256"):
        certs.load_private_key(p384, "site.key")


def test_load_csr_error() -> None:
    """
    Garbage is not a CSR.
    """
    with pytest.raises(CertificateError, match="not a valid PEM certificate request"):
        certs.load_csr("nonsense")


@given(name=site_names)
def test_valid_site_names_are_accepted(name: str) -> None:
    """
    Every name of 1-63 characters from [a-z0-9._-] starting with a letter or
    digit is valid and returned unchanged.
    """
    assert certs.validate_site_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "site name is empty"),
        ("x" * 64, "64 characters long; the limit is 63"),
        ("Alpha", "upper-case letters; use 'alpha'"),
        ("-alpha", "must start with a lower-case letter or a digit"),
        (".alpha", "must start with a lower-case letter or a digit"),
        ("al pha", "contains ' '"),
        ("al/pha", "contains '/'"),
        ("alpha\n", "contains '\\\\n'"),
        (5, "must be text"),
    ],
)
def test_invalid_site_names(name: object, message: str) -> None:
    """
    Each broken rule is named in the error.
    """
    with pytest.raises(InvalidSiteName, match=message):
        certs.validate_site_name(name)


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("Example.COM.", "example.com"),
        ("localhost", "localhost"),
        ("0:0::1", "::1"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_normalize_host(host: str, normal: str) -> None:
    """
    Hosts get one canonical spelling.
    """
    assert certs.normalize_host(host) == normal
