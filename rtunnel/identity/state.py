"""
The persistent state directories of the two roles.

Tunnel server (L{ServerState}), one directory of mode 0700::

    ca.key         CA private key (0600): signs server and site certificates
    ca.crt         CA certificate: the trust root every keyfile pins
    server.key     TLS server private key (0600)
    server.crt     TLS server certificate, EKU serverAuth, SAN = public names
    state.sqlite3  tokens, sites, revocations, connection status (0600);
                   absent when C{--database} puts them elsewhere (another
                   SQLite file, or PostgreSQL shared by several servers)

Site (L{SiteState}), one directory of mode 0700::

    site.key       the site's private key (0600); generated here, never sent
    site.crt       the site's certificate, EKU clientAuth
    ca.crt         the pinned CA of the tunnel server (from the keyfile)
    site.json      site name, server addresses and name, SHA-256 of the
                   enrollment token
    pending-<T>.key  (only during enrollment) the key being certified for
                   the keyfile whose token digest begins with T

State is created on first use and reused afterwards.  Anything damaged,
unreadable or incomplete raises L{StateError} naming the file: replacing it
would silently disconnect every enrolled site (server) or discard an identity
(site), which an operator must decide, not a restart.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import define, field, frozen
from cryptography import x509
from twisted.logger import Logger as TwistedLogger
from twisted.python.filepath import FilePath

from rtunnel.identity.certs import (
    PrivateKey,
    create_ca,
    create_csr,
    dump_certificate,
    dump_csr,
    dump_private_key,
    fingerprint,
    generate_private_key,
    issue_server_certificate,
    issue_site_certificate,
    key_matches_certificate,
    load_certificate,
    load_csr,
    load_private_key,
    normalize_host,
    public_key_fingerprint,
    server_names_of,
    site_name_of,
    validate_csr,
    validate_site_name,
    verify_issued_by,
)
from rtunnel.identity.errors import (
    BAD_REQUEST,
    CSR_INVALID,
    AddressError,
    CertificateError,
    EnrollmentRefused,
    IdentityError,
    InvalidSiteName,
    StateError,
)
from rtunnel.identity.keyfile import Keyfile, normalize_address, parse_address
from rtunnel.identity.store import StateStore, database_location
from rtunnel.logs import Logger

__all__ = [
    "CA_KEY",
    "CA_CERT",
    "SERVER_KEY",
    "SERVER_CERT",
    "DATABASE",
    "SITE_KEY",
    "SITE_CERT",
    "SITE_CA_CERT",
    "SITE_INFO",
    "PENDING_KEY",
    "default_public_addresses",
    "ServerState",
    "SiteInfo",
    "SiteState",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
DATABASE = "state.sqlite3"
_IDENTITY_FILES = (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT)
_SERVER_FILES = (*_IDENTITY_FILES, DATABASE)

SITE_KEY = "site.key"
SITE_CERT = "site.crt"
SITE_CA_CERT = "ca.crt"
SITE_INFO = "site.json"
PENDING_KEY = "pending.key"  # before 0.2: one pending key, whatever the keyfile
_PENDING_PREFIX = "pending-"
_SITE_FILES = (SITE_KEY, SITE_CERT, SITE_CA_CERT, SITE_INFO)
_SITE_INFO_FORMAT = "rtunnel-site-state"

_MAX_FILE_SIZE = 1024 * 1024


def _files(path: str, location: str) -> tuple[str, ...]:
    """The files a server state directory holds: the database file only where it is the default."""
    return _SERVER_FILES if location == os.path.join(path, DATABASE) else _IDENTITY_FILES


def default_public_addresses() -> list[str]:
    """
    The host names a server certificate covers when none are configured:
    C{localhost}, C{127.0.0.1}, C{::1} and this host's fully qualified name.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        fqdn = normalize_host(socket.getfqdn())
    except AddressError:
        fqdn = None
    if fqdn and fqdn not in names:
        names.append(fqdn)
    return names


def _path_of(directory: FilePath[str] | str | os.PathLike[str]) -> str:
    if isinstance(directory, FilePath):
        return str(directory.path)
    return os.fspath(directory)


_state_log = Logger(namespace="rtunnel.identity.state")


def _ensure_directory(path: str, what: str) -> None:
    """
    Create C{path} (mode 0700) or check the existing directory the way
    OpenSSH's StrictModes checks C{~/.ssh}: owned by us (or root) and
    writable by nobody else, or refused. Whoever can write into a state
    directory can plant a key that gets certified, or replace the pinned CA;
    a directory merely readable by others is only warned about (the secrets
    inside are 0600 anyway).
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StateError(f"{what} {path} exists but is not a directory")
    if not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)
        except OSError as e:
            raise StateError(f"cannot create {what} {path}: {e.strerror}") from None
        return
    info = os.stat(path)
    mode = info.st_mode & 0o777
    if info.st_uid not in (os.geteuid(), 0):
        raise StateError(
            f"{what} {path} is owned by user id {info.st_uid}, not by this user ({os.geteuid()}) or root; "
            "refusing to use it (another user could replace the keys and certificates in it)"
        )
    if mode & 0o022:
        raise StateError(
            f"{what} {path} is writable by {'others' if mode & 0o002 else 'its group'} (mode {mode:o}); "
            f"refusing to use it (whoever can write there can plant keys): chmod 700 {path}"
        )
    if mode & 0o077:
        _state_log.warn(
            "{what} {path} is accessible to other users (mode {mode:o}); chmod 700 it",
            what=what,
            path=path,
            mode=mode,
        )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_SIZE + 1)
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > _MAX_FILE_SIZE:
        raise StateError(f"{path} is too large to be an rtunnel state file")
    if not data.strip():
        raise StateError(f"{path} is empty")
    return data


def _write_new(path: str, data: bytes, mode: int) -> None:
    """
    Create C{path} (which must not exist) with C{mode} and C{data}, durably.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise StateError(f"{path} appeared while creating state; refusing to overwrite it") from None
    except OSError as e:
        raise StateError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _write_replace(path: str, data: bytes, mode: int) -> None:
    """
    Replace C{path} atomically: readers see the old or the new content.
    """
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"cannot remove stale {tmp}: {e.strerror}") from None
    _write_new(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise StateError(f"cannot replace {path}: {e.strerror}") from None


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pending_keys(directory: str) -> list[str]:
    """The pending keys in a site state directory (also the pre-0.2 name)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        os.path.join(directory, n)
        for n in names
        if n == PENDING_KEY or (n.startswith(_PENDING_PREFIX) and n.endswith(".key"))
    )


def _load_cert_file(path: str) -> x509.Certificate:
    try:
        return load_certificate(_read(path), path)
    except CertificateError as e:
        raise StateError(str(e)) from None


def _load_key_file(path: str, log: TwistedLogger) -> PrivateKey:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    if mode & 0o077:
        log.warn(
            "private key {path} is accessible to other users (mode {mode}); it should be 0600",
            path=path,
            mode=oct(mode & 0o777),
        )
    try:
        return load_private_key(_read(path), path)
    except CertificateError as e:
        raise StateError(str(e)) from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _utcnow(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


@define
class ServerState:
    """
    The identity and database of one tunnel server.

    @ivar directory: the state directory.
    @ivar ca_key: signs site certificates at enrollment.
    @ivar ca_certificate: the trust root pinned by every site.
    @ivar server_key: the TLS server key.
    @ivar server_certificate: the TLS server certificate.
    @ivar store: the state database.
    """

    _log = Logger()

    directory: FilePath[str]
    ca_key: PrivateKey = field(repr=False)
    ca_certificate: x509.Certificate = field(repr=False)
    server_key: PrivateKey = field(repr=False)
    server_certificate: x509.Certificate = field(repr=False)
    store: StateStore = field(repr=False)

    @classmethod
    def load_or_create(
        cls,
        state_dir: FilePath[str] | str | os.PathLike[str],
        public_addresses: Sequence[str] = (),
        *,
        now: datetime | None = None,
        database: str | None = None,
    ) -> ServerState:
        """
        Load the server state in C{state_dir}, creating it on first use.

        If a public address is not covered by the server certificate, the
        certificate is re-issued from the same CA for the old names plus the
        new ones (same key): enrolled sites keep working.

        @param public_addresses: host names or IP addresses sites dial (an
            optional C{:port} is ignored here); by default those recorded at
            the last start, or L{default_public_addresses} on the first.
        @param database: C{--database}: where tokens, sites and the rest
            live (see L{database_location}); the CA and the server identity
            stay files in C{state_dir}. A database elsewhere than the default
            file is created (or migrated) on open, whatever the files.

        @raise StateError: if the directory holds damaged, unreadable or only
            some of the state files.
        """
        path = _path_of(state_dir)
        when = _utcnow(now)
        location = database_location(database, path)
        files = _files(path, location)
        try:
            given = _hosts(public_addresses)
        except AddressError as e:
            raise StateError(f"invalid public address: {e}") from None
        _ensure_directory(path, "state directory")
        present = [f for f in files if os.path.lexists(os.path.join(path, f))]
        if not present:
            hosts = given or default_public_addresses()
            state = cls._create(path, hosts, when, location)
        elif len(present) == len(files):
            state = cls._load(path, location, create_store=files is _IDENTITY_FILES)
            # Without --public-address, keep the addresses recorded before:
            # keyfiles created later must still name what sites can reach.
            hosts = given or state.store.public_addresses() or default_public_addresses()
            state._cover(hosts, when)
        else:
            missing = [f for f in files if f not in present]
            raise StateError(
                f"state directory {path} is incomplete: {', '.join(present)} "
                f"present but {', '.join(missing)} missing; refusing to create new "
                "state over it (if no site was ever enrolled, remove the directory)"
            )
        state.store.record_public_addresses(hosts)
        return state

    @classmethod
    def open_existing(
        cls, state_dir: FilePath[str] | str | os.PathLike[str], database: str | None = None
    ) -> ServerState:
        """
        Open the state of a server that has run before (for the admin CLI).

        @param database: as for L{load_or_create}.
        @raise StateError: if there is no complete state in C{state_dir}.
        """
        path = _path_of(state_dir)
        location = database_location(database, path)
        if not os.path.isdir(path):
            raise StateError(
                f"no tunnel server state at {path}: start the tunnel server with "
                "this state directory first (it creates the state), or pass the "
                "right --state"
            )
        missing = [f for f in _files(path, location) if not os.path.lexists(os.path.join(path, f))]
        if missing:
            raise StateError(f"{path} is not a complete tunnel server state directory ({', '.join(missing)} missing)")
        return cls._load(path, location, create_store=False)

    @classmethod
    def _create(cls, path: str, hosts: list[str], now: datetime, location: str) -> ServerState:
        ca_key, ca_cert = create_ca(f"rtunnel CA {hosts[0]}", now)
        server_key = generate_private_key()
        server_cert = issue_server_certificate(ca_key, ca_cert, server_key, hosts, now)
        _write_new(os.path.join(path, CA_KEY), dump_private_key(ca_key), 0o600)
        _write_new(os.path.join(path, CA_CERT), dump_certificate(ca_cert).encode(), 0o644)
        _write_new(os.path.join(path, SERVER_KEY), dump_private_key(server_key), 0o600)
        _write_new(os.path.join(path, SERVER_CERT), dump_certificate(server_cert).encode(), 0o644)
        store = StateStore(location, create=True)
        _fsync_directory(path)
        cls._log.info(
            "created tunnel server state in {directory}: CA {ca_fingerprint}, server certificate for {names}",
            directory=path,
            ca_fingerprint=fingerprint(ca_cert),
            names=", ".join(hosts),
        )
        return cls(FilePath(path), ca_key, ca_cert, server_key, server_cert, store)

    @classmethod
    def _load(cls, path: str, location: str, create_store: bool) -> ServerState:
        ca_key = _load_key_file(os.path.join(path, CA_KEY), cls._log)
        ca_cert = _load_cert_file(os.path.join(path, CA_CERT))
        server_key = _load_key_file(os.path.join(path, SERVER_KEY), cls._log)
        server_cert = _load_cert_file(os.path.join(path, SERVER_CERT))
        if not _is_ca(ca_cert):
            raise StateError(f"{os.path.join(path, CA_CERT)} is not a CA certificate")
        if not key_matches_certificate(ca_key, ca_cert):
            raise StateError(f"{CA_KEY} does not match {CA_CERT} in {path}")
        if not key_matches_certificate(server_key, server_cert):
            raise StateError(f"{SERVER_KEY} does not match {SERVER_CERT} in {path}")
        try:
            verify_issued_by(server_cert, ca_cert)
        except CertificateError:
            raise StateError(f"{os.path.join(path, SERVER_CERT)} was not issued by {CA_CERT}") from None
        store = StateStore(location, create=create_store)
        return cls(FilePath(path), ca_key, ca_cert, server_key, server_cert, store)

    def _cover(self, hosts: Sequence[str], now: datetime) -> None:
        """
        Re-issue the server certificate if it misses any of C{hosts}.
        """
        names = server_names_of(self.server_certificate)
        missing = [h for h in hosts if h not in names]
        if not missing:
            return
        certificate = issue_server_certificate(
            self.ca_key, self.ca_certificate, self.server_key, [*names, *missing], now
        )
        _write_replace(
            os.path.join(self.directory.path, SERVER_CERT),
            dump_certificate(certificate).encode(),
            0o644,
        )
        _fsync_directory(self.directory.path)
        self.server_certificate = certificate
        self._log.info(
            "re-issued the server certificate to add {added}; it now covers {names}",
            added=", ".join(missing),
            names=", ".join(server_names_of(certificate)),
        )

    @property
    def server_names(self) -> list[str]:
        """
        The host names and IP addresses the server certificate covers.
        """
        return server_names_of(self.server_certificate)

    @property
    def public_addresses(self) -> list[str]:
        """
        The public host names the server last started with (falling back to
        the names its certificate covers).
        """
        return self.store.public_addresses() or self.server_names

    def issue_site_certificate(
        self, csr: x509.CertificateSigningRequest, site: str, now: datetime | None = None
    ) -> x509.Certificate:
        """
        Sign a site certificate request with this server's CA.
        """
        return issue_site_certificate(self.ca_key, self.ca_certificate, csr, site, now)

    def enroll(self, site: str, token: str, csr_pem: str, now: datetime) -> str:
        """
        Handle one enrollment request: check the request, redeem the token and
        return the new site certificate as PEM.

        @raise EnrollmentRefused: C{bad-request} for an invalid site name,
            C{csr-invalid} for a certificate request that is malformed, badly
            signed, not P-256 or not for C{site}, else as
            L{StateStore.redeem_token}.
        """
        try:
            validate_site_name(site)
        except InvalidSiteName as e:
            raise EnrollmentRefused(BAD_REQUEST, str(e)) from None
        try:
            csr = load_csr(csr_pem)
            validate_csr(csr, site)
        except CertificateError as e:
            raise EnrollmentRefused(CSR_INVALID, str(e)) from None
        return self.store.redeem_token(
            site,
            token,
            public_key_fingerprint(csr),
            lambda: dump_certificate(self.issue_site_certificate(csr, site, now)),
            now,
        )

    def close(self) -> None:
        """
        Close the state database.
        """
        self.store.close()


def _hosts(addresses: Sequence[str]) -> list[str]:
    hosts: list[str] = []
    for address in addresses:
        host = parse_address(address)[0]
        if host not in hosts:
            hosts.append(host)
    return hosts


@frozen
class SiteInfo:
    """
    The content of C{site.json}: what a site enrolled as, and with what.

    @ivar token_sha256: digest of the enrollment token, so that a restart
        with the same keyfile does not enroll again while a new keyfile does.
    """

    site: str
    addresses: tuple[str, ...]
    server_name: str
    token_sha256: str
    enrolled_at: datetime

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": _SITE_INFO_FORMAT,
                    "version": 1,
                    "site": self.site,
                    "addresses": list(self.addresses),
                    "server_name": self.server_name,
                    "token_sha256": self.token_sha256,
                    "enrolled_at": self.enrolled_at.isoformat(),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, data: bytes, source: str) -> SiteInfo:
        try:
            document: Any = json.loads(data.decode("utf-8"))
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            if document.get("format") != _SITE_INFO_FORMAT or document.get("version") != 1:
                raise ValueError("not a version 1 rtunnel site state file")
            addresses = document["addresses"]
            if not isinstance(addresses, list) or not addresses:
                raise ValueError("'addresses' must be a non-empty list")
            enrolled_at = datetime.fromisoformat(document["enrolled_at"])
            if enrolled_at.tzinfo is None:
                raise ValueError("'enrolled_at' has no time zone")
            digest = document["token_sha256"]
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError("'token_sha256' is not a SHA-256 hex digest")
            return cls(
                site=validate_site_name(document["site"]),
                addresses=tuple(normalize_address(a) for a in addresses),
                server_name=normalize_host(document["server_name"]),
                token_sha256=digest,
                enrolled_at=enrolled_at,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, IdentityError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise StateError(f"{source} is damaged: {detail}") from None


@define
class SiteState:
    """
    The identity of one site: its key, its certificate and the pinned
    server it enrolled with.

    The private key is generated here and never leaves the directory; each
    enrollment certifies a fresh key, so a key that leaked before a site was
    revoked and re-enrolled is worthless afterwards.

    @ivar directory: the site state directory.
    @ivar private_key: the enrolled key, or C{None} before enrollment.
    @ivar certificate: the site certificate, or C{None}.
    @ivar ca_certificate_pem: the pinned server CA, or C{None}.
    @ivar info: the content of C{site.json}, or C{None}.
    """

    _log = Logger()

    directory: FilePath[str]
    private_key: PrivateKey | None = field(default=None, repr=False)
    certificate: x509.Certificate | None = field(default=None, repr=False)
    ca_certificate_pem: str | None = field(default=None, repr=False)
    info: SiteInfo | None = None

    @classmethod
    def load(cls, state_dir: FilePath[str] | str | os.PathLike[str]) -> SiteState:
        """
        Load a site state directory, creating it (mode 0700) if missing.

        @raise StateError: if a state file is unreadable or damaged.
        """
        path = _path_of(state_dir)
        _ensure_directory(path, "site state directory")
        state = cls(FilePath(path))

        def join(name: str) -> str:
            return os.path.join(path, name)

        present = [f for f in _SITE_FILES if os.path.lexists(join(f))]
        if not present:
            return state
        if len(present) != len(_SITE_FILES) or SITE_INFO not in present:
            if _pending_keys(path):
                # An enrollment was interrupted while its files were being
                # moved into place: enroll again (the server hands out the
                # same certificate for the same pending key).
                return state
            missing = [f for f in _SITE_FILES if f not in present]
            raise StateError(
                f"site state directory {path} is incomplete ({', '.join(missing)} "
                "missing); enroll again with a new keyfile after removing "
                f"{', '.join(present)}"
            )
        info = SiteInfo.from_json(_read(join(SITE_INFO)), join(SITE_INFO))
        key = _load_key_file(join(SITE_KEY), cls._log)
        cert = _load_cert_file(join(SITE_CERT))
        ca = _load_cert_file(join(SITE_CA_CERT))
        problem = None
        if not key_matches_certificate(key, cert):
            problem = f"{SITE_KEY} does not match {SITE_CERT}"
        else:
            try:
                verify_issued_by(cert, ca)
                if site_name_of(cert) != info.site:
                    problem = f"{SITE_CERT} is not for site {info.site!r}"
            except CertificateError as e:
                problem = f"{SITE_CERT}: {e}"
        if problem is not None:
            if _pending_keys(path):
                return state
            raise StateError(f"site state in {path} is inconsistent: {problem}")
        state.private_key = key
        state.certificate = cert
        state.ca_certificate_pem = dump_certificate(ca)
        state.info = info
        return state

    @property
    def is_enrolled(self) -> bool:
        """
        Whether this site holds a certificate and a pinned server.
        """
        return self.info is not None and self.certificate is not None

    @property
    def site_name(self) -> str | None:
        return None if self.info is None else self.info.site

    @property
    def addresses(self) -> tuple[str, ...]:
        return () if self.info is None else self.info.addresses

    @property
    def server_name(self) -> str | None:
        return None if self.info is None else self.info.server_name

    def needs_enrollment(self, keyfile: Keyfile | None) -> bool:
        """
        Whether the site must enroll before connecting: it never enrolled,
        or C{keyfile} carries a different token than the one it enrolled with
        (a new keyfile re-enrolls; a restart with the same one does not).
        """
        if not self.is_enrolled:
            return True
        if keyfile is None:
            return False
        assert self.info is not None
        return keyfile.token_digest != self.info.token_sha256

    def _pending_key_path(self, token_digest: str) -> str:
        return os.path.join(self.directory.path, f"{_PENDING_PREFIX}{token_digest[:16]}.key")

    def enrollment_request(self, site: str, token_digest: str) -> str:
        """
        Return a PEM certificate request for C{site} over the pending key of
        the keyfile whose token has the SHA-256 C{token_digest}.

        The key is generated (mode 0600) for that keyfile; only a retry with
        the same keyfile, after an interrupted enrollment, presents it again
        (which the server accepts for an already-spent token). A pending key
        left for any other keyfile, or planted, is deleted, never certified:
        every new keyfile enrolls a fresh key.
        """
        validate_site_name(site)
        path = self._pending_key_path(token_digest)
        for other in _pending_keys(self.directory.path):
            if other != path:
                try:
                    os.unlink(other)
                except OSError as e:
                    raise StateError(f"cannot remove stale {other}: {e.strerror}") from None
                self._log.info("removed {path}, a pending key of another enrollment", path=other)
        if os.path.lexists(path):
            key = _load_key_file(path, self._log)
        else:
            key = generate_private_key()
            _write_new(path, dump_private_key(key), 0o600)
            _fsync_directory(self.directory.path)
        return dump_csr(create_csr(key, site))

    def complete_enrollment(self, keyfile: Keyfile, certificate_pem: str, now: datetime | None = None) -> None:
        """
        Store the certificate the server issued, making the pending key the
        site key and pinning the keyfile's CA.

        @raise CertificateError: if the certificate was not issued by the
            keyfile's CA, is not for the keyfile's site, or does not certify
            the pending key.
        @raise StateError: if there is no pending key or files cannot be
            written.
        """
        path = self._pending_key_path(keyfile.token_digest)
        if not os.path.lexists(path):
            raise StateError(f"no enrollment in progress in {self.directory.path} ({os.path.basename(path)} missing)")
        key = _load_key_file(path, self._log)
        cert = load_certificate(certificate_pem, "certificate from the tunnel server")
        ca = load_certificate(keyfile.ca_certificate_pem, "keyfile CA certificate")
        verify_issued_by(cert, ca)
        if site_name_of(cert) != keyfile.site:
            raise CertificateError(
                f"the tunnel server issued a certificate for {site_name_of(cert)!r}, not for site {keyfile.site!r}"
            )
        if not key_matches_certificate(key, cert):
            raise CertificateError("the tunnel server issued a certificate for another key")
        info = SiteInfo(
            site=keyfile.site,
            addresses=keyfile.addresses,
            server_name=keyfile.server_name,
            token_sha256=keyfile.token_digest,
            enrolled_at=_utcnow(now),
        )

        def join(name: str) -> str:
            return os.path.join(self.directory.path, name)

        # site.json goes last: until it is replaced, a crash leaves the old
        # identity or (with pending.key still present) a state that enrolls
        # again and gets this same certificate back.
        _write_replace(join(SITE_KEY), dump_private_key(key), 0o600)
        _write_replace(join(SITE_CERT), dump_certificate(cert).encode(), 0o644)
        _write_replace(join(SITE_CA_CERT), dump_certificate(ca).encode(), 0o644)
        _write_replace(join(SITE_INFO), info.to_json().encode(), 0o644)
        os.unlink(path)
        _fsync_directory(self.directory.path)
        self.private_key = key
        self.certificate = cert
        self.ca_certificate_pem = dump_certificate(ca)
        self.info = info
        self._log.info(
            "enrolled as site {site} with certificate {fingerprint}",
            site=keyfile.site,
            fingerprint=fingerprint(cert),
        )
