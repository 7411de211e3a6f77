"""
The keyfile: everything a site needs to enroll with a tunnel server, in one
small JSON text file (format described in docs/keyfile.md).

A keyfile carries a secret one-time token, so it is written with mode 0600,
never over an existing file, and is worthless once spent or expired.  It also
carries the server's CA certificate, which the site pins: the site trusts no
other authority, so a keyfile must reach the site over a channel that an
attacker cannot modify.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from attrs import field, frozen

from rtunnel import address as _address
from rtunnel.address import join_host_port, parse_host_port
from rtunnel.identity.certs import load_certificate, normalize_host, validate_site_name
from rtunnel.identity.errors import (
    AddressError,
    CertificateError,
    IdentityError,
    KeyfileError,
    KeyfileExists,
)

__all__ = [
    "DEFAULT_PORT",
    "PUBLIC_PORT_KEY",
    "FORMAT",
    "VERSION",
    "Keyfile",
    "parse_address",
    "format_address",
    "normalize_address",
    "token_digest",
    "write_keyfile",
    "read_keyfile",
    "dumps_keyfile",
    "loads_keyfile",
]

DEFAULT_PORT = 5500
#: State-store meta key: the port sites dial, recorded by the running server.
PUBLIC_PORT_KEY = "public_port"
FORMAT = "rtunnel-keyfile"
VERSION = 1
# A real keyfile is about 1 KiB; anything far larger is not one, and reading
# it whole would be a waste.
_MAX_KEYFILE_SIZE = 256 * 1024
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22,256}\Z")


def token_digest(token: str) -> str:
    """
    Return the SHA-256 of an enrollment token, as lower-case hex.

    The server stores only this digest, and a site remembers the digest of
    the token it enrolled with, so neither keeps a usable token at rest.
    """
    return sha256(token.encode("utf-8")).hexdigest()


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """
    Parse C{HOST}, C{HOST:PORT}, C{[IPV6]} or C{[IPV6]:PORT}, by the one
    grammar of L{rtunnel.address.parse_host_port}.

    A bare IPv6 address (C{::1}) is accepted as a host without port;
    combining an IPv6 address with a port requires brackets.

    @return: the normalized host (see L{normalize_host}; no brackets) and
        the port (C{default_port} if none is written).

    @raise AddressError: with a message saying what is wrong.
    """
    try:
        return parse_host_port(text, default_port)
    except _address.AddressError as e:
        raise AddressError(str(e)) from None


def format_address(host: str, port: int) -> str:
    """
    Format a host and port as C{host:port}, bracketing IPv6 addresses.
    """
    return join_host_port(host, port)


def normalize_address(text: str, default_port: int = DEFAULT_PORT) -> str:
    """
    Return the canonical C{host:port} spelling of an address.
    """
    return format_address(*parse_address(text, default_port))


def _check_addresses(instance: object, attribute: object, value: tuple[str, ...]) -> None:
    if not isinstance(value, tuple) or not value:
        raise AddressError("a keyfile needs at least one server address")
    for address in value:
        if normalize_address(address) != address:
            raise AddressError(f"address {address!r} is not in canonical host:port form")


def _check_site(instance: object, attribute: object, value: str) -> None:
    validate_site_name(value)


def _check_server_name(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or normalize_host(value) != value:
        raise AddressError(f"server name {value!r} is not a canonical host name")


def _check_ca(instance: object, attribute: object, value: str) -> None:
    load_certificate(value, "CA certificate")


def _check_token(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise KeyfileError("token must be 22 to 256 characters of A-Z, a-z, 0-9, '-' and '_'")


def _check_expires(instance: object, attribute: object, value: datetime) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise KeyfileError("expiry must be a timezone-aware datetime")


def _to_utc(value: datetime) -> datetime:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value


def _to_tuple(value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@frozen
class Keyfile:
    """
    The content of a keyfile.

    @ivar site: the site name this keyfile enrolls.
    @ivar addresses: server addresses to dial, canonical C{host:port}
        (IPv6 as C{[::1]:5500}), in order of preference.
    @ivar server_name: the name the server certificate must carry, checked
        with service-identity whichever address is dialled.
    @ivar ca_certificate_pem: the tunnel server's CA certificate, pinned by
        the site as its only trust root.
    @ivar token: the secret one-time enrollment token.
    @ivar expires: when the token stops being accepted (UTC); enforced by
        the server.
    """

    site: str = field(validator=_check_site)
    addresses: tuple[str, ...] = field(converter=_to_tuple, validator=_check_addresses)
    server_name: str = field(validator=_check_server_name)
    ca_certificate_pem: str = field(validator=_check_ca, repr=False)
    token: str = field(validator=_check_token, repr=False)
    expires: datetime = field(converter=_to_utc, validator=_check_expires)

    def is_expired(self, now: datetime) -> bool:
        """
        Tell whether the token has expired at C{now}.  Only advisory: the
        server decides.
        """
        return now >= self.expires

    @property
    def token_digest(self) -> str:
        """
        The SHA-256 of the token (see L{token_digest}).
        """
        return token_digest(self.token)

    def parsed_addresses(self) -> list[tuple[str, int]]:
        """
        The addresses as C{(host, port)} pairs.
        """
        return [parse_address(a) for a in self.addresses]


def dumps_keyfile(keyfile: Keyfile) -> str:
    """
    Serialize a keyfile to its JSON text (see docs/keyfile.md).
    """
    document = {
        "format": FORMAT,
        "version": VERSION,
        "site": keyfile.site,
        "addresses": list(keyfile.addresses),
        "server_name": keyfile.server_name,
        "expires": keyfile.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "token": keyfile.token,
        "ca_certificate": keyfile.ca_certificate_pem,
    }
    return json.dumps(document, indent=2) + "\n"


_FIELDS = ("site", "addresses", "server_name", "expires", "token", "ca_certificate")


def loads_keyfile(text: str, source: str = "keyfile") -> Keyfile:
    """
    Parse the JSON text of a keyfile.

    @param source: how to name the keyfile in error messages.

    @raise KeyfileError: naming what is wrong.
    """
    try:
        document = json.loads(text)
    except ValueError as e:
        raise KeyfileError(f"{source} is not a keyfile: not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise KeyfileError(f"{source} is not a keyfile: expected a JSON object")
    fmt = document.get("format")
    if fmt != FORMAT:
        raise KeyfileError(f'{source} is not an rtunnel keyfile (its "format" is {fmt!r}, expected {FORMAT!r})')
    version = document.get("version")
    if version != VERSION or isinstance(version, bool):
        raise KeyfileError(f"{source} has keyfile version {version!r}; this rtunnel reads version {VERSION} only")
    for name in _FIELDS:
        if name not in document:
            raise KeyfileError(f"{source} is missing the field {name!r}")
    values: dict[str, Any] = {}
    for name in ("site", "server_name", "token", "ca_certificate", "expires"):
        if not isinstance(document[name], str):
            raise KeyfileError(f"{source}: field {name!r} must be a string")
    addresses = document["addresses"]
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise KeyfileError(f"{source}: field 'addresses' must be a list of strings")
    try:
        values["addresses"] = tuple(normalize_address(a) for a in addresses)
        values["server_name"] = normalize_host(document["server_name"])
    except AddressError as e:
        raise KeyfileError(f"{source}: invalid address: {e}") from None
    try:
        values["expires"] = _parse_time(document["expires"])
    except ValueError:
        raise KeyfileError(
            f"{source}: field 'expires' must be a UTC time like 2030-01-31T12:00:00Z, not {document['expires']!r}"
        ) from None
    try:
        load_certificate(document["ca_certificate"], "field 'ca_certificate'")
    except CertificateError as e:
        raise KeyfileError(f"{source}: {e}") from None
    try:
        return Keyfile(
            site=document["site"],
            addresses=values["addresses"],
            server_name=values["server_name"],
            ca_certificate_pem=document["ca_certificate"],
            token=document["token"],
            expires=values["expires"],
        )
    except IdentityError as e:
        raise KeyfileError(f"{source}: invalid field: {e}") from None


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("naive")
    return value.astimezone(UTC)


def write_keyfile(path: str | os.PathLike[str], keyfile: Keyfile) -> None:
    """
    Write a keyfile, creating it with mode 0600.

    @raise KeyfileExists: if C{path} exists; a keyfile is never overwritten.
    @raise KeyfileError: if it cannot be written.
    """
    name = os.fspath(path)
    data = dumps_keyfile(keyfile).encode("utf-8")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyfileExists(f"refusing to overwrite existing file {name}") from None
    except OSError as e:
        raise KeyfileError(f"cannot create keyfile {name}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        try:
            os.unlink(name)
        except OSError:
            pass
        raise KeyfileError(f"cannot write keyfile {name}: {e.strerror}") from None


def read_keyfile(path: str | os.PathLike[str]) -> Keyfile:
    """
    Read and validate a keyfile.

    @raise KeyfileError: with a message for a missing or unreadable file,
        text that is not JSON, a wrong format or version, a missing or
        invalid field, or a bad CA certificate.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read(_MAX_KEYFILE_SIZE + 1)
    except FileNotFoundError:
        raise KeyfileError(f"keyfile {name} does not exist") from None
    except IsADirectoryError:
        raise KeyfileError(f"keyfile {name} is a directory") from None
    except OSError as e:
        raise KeyfileError(f"cannot read keyfile {name}: {e.strerror}") from None
    if len(raw) > _MAX_KEYFILE_SIZE:
        raise KeyfileError(f"{name} is too large to be a keyfile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyfileError(f"{name} is not a keyfile: not UTF-8 text") from None
    return loads_keyfile(text, f"keyfile {name}")
