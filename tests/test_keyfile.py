"""
Tests for L{rtunnel.identity.keyfile}: the keyfile format, its file
handling and server address parsing.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtunnel import address
from rtunnel.identity.errors import AddressError, KeyfileError, KeyfileExists
from rtunnel.identity.keyfile import (
    DEFAULT_PORT,
    Keyfile,
    dumps_keyfile,
    format_address,
    loads_keyfile,
    parse_address,
    read_keyfile,
    token_digest,
    write_keyfile,
)
from tests.helpers_identity import NOW, Authority, site_names, tokens

_CA_PEM = Authority.create().ca_pem


def _keyfile(**changes: Any) -> Keyfile:
    values: dict[str, Any] = dict(
        site="alpha",
        addresses=("tunnel.example:5500", "[::1]:5501"),
        server_name="tunnel.example",
        ca_certificate_pem=_CA_PEM,
        token="A" * 43,
        expires=NOW + timedelta(hours=24),
    )
    values.update(changes)
    return Keyfile(**values)


def _document(**changes: Any) -> str:
    document = json.loads(dumps_keyfile(_keyfile()))
    for key, value in changes.items():
        if value is _DELETE:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document)


_DELETE = object()

addresses = st.tuples(
    st.sampled_from(["tunnel.example", "127.0.0.1", "::1", "a-b.c.example", "2001:db8::5"]),
    st.integers(1, 65535),
).map(lambda hp: format_address(*hp))


@given(
    site=site_names,
    token=tokens,
    addresses=st.lists(addresses, min_size=1, max_size=4).map(tuple),
    seconds=st.integers(0, 10**8),
)
def test_text_round_trip(site: str, token: str, addresses: tuple[str, ...], seconds: int) -> None:
    """
    Any valid keyfile survives serialization unchanged.
    """
    keyfile = _keyfile(site=site, token=token, addresses=addresses, expires=NOW + timedelta(seconds=seconds))
    assert loads_keyfile(dumps_keyfile(keyfile)) == keyfile


def test_format_header() -> None:
    """
    The JSON text identifies itself as format rtunnel-keyfile, version 1,
    with the expiry in UTC "Z" form.
    """
    document = json.loads(dumps_keyfile(_keyfile()))
    assert document["format"] == "rtunnel-keyfile"
    assert document["version"] == 1
    assert document["expires"] == "2030-01-03T03:04:05Z"
    assert document["addresses"] == ["tunnel.example:5500", "[::1]:5501"]


def test_write_creates_private_file_and_reads_back(tmp_path: Path) -> None:
    """
    A written keyfile has mode 0600 and reads back equal.
    """
    path = tmp_path / "alpha.rtkey"
    keyfile = _keyfile()
    write_keyfile(path, keyfile)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keyfile(path) == keyfile


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    """
    Writing over an existing file fails with KeyfileExists and leaves the
    file untouched.
    """
    path = tmp_path / "alpha.rtkey"
    path.write_text("precious")
    with pytest.raises(KeyfileExists, match="refusing to overwrite"):
        write_keyfile(path, _keyfile())
    assert path.read_text() == "precious"


def test_write_into_missing_directory(tmp_path: Path) -> None:
    """
    A missing directory is a KeyfileError naming the path.
    """
    path = tmp_path / "nowhere" / "alpha.rtkey"
    with pytest.raises(KeyfileError, match="cannot create keyfile .*nowhere"):
        write_keyfile(path, _keyfile())


def test_read_missing_file(tmp_path: Path) -> None:
    """
    A missing keyfile is reported as such.
    """
    with pytest.raises(KeyfileError, match="does not exist"):
        read_keyfile(tmp_path / "missing.rtkey")


def test_read_directory(tmp_path: Path) -> None:
    """
    A directory is not a keyfile.
    """
    with pytest.raises(KeyfileError, match="is a directory"):
        read_keyfile(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_read_unreadable_file(tmp_path: Path) -> None:
    """
    A file without read permission is reported as unreadable.
    """
    path = tmp_path / "alpha.rtkey"
    write_keyfile(path, _keyfile())
    path.chmod(0)
    with pytest.raises(KeyfileError, match="cannot read keyfile"):
        read_keyfile(path)


def test_read_error_other_than_missing(tmp_path: Path) -> None:
    """
    An OS error other than "missing" (here a path through a regular file) is
    reported as unreadable, with the system's reason.
    """
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyfileError, match="cannot read keyfile .*: Not a directory"):
        read_keyfile(tmp_path / "file" / "alpha.rtkey")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe", "not UTF-8 text"),
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"format": "something-else", "version": 1}', "not an rtunnel keyfile"),
        (b'{"version": 1}', "not an rtunnel keyfile"),
        (b"x" * 300_000, "too large"),
    ],
)
def test_read_garbage(tmp_path: Path, content: bytes, message: str) -> None:
    """
    Each kind of garbage has its own message.
    """
    path = tmp_path / "bad.rtkey"
    path.write_bytes(content)
    with pytest.raises(KeyfileError, match=message):
        read_keyfile(path)


@pytest.mark.parametrize("version", [2, "1", True, None])
def test_wrong_version(version: object) -> None:
    """
    Only version 1 (the integer) is read.
    """
    with pytest.raises(KeyfileError, match="version .* this rtunnel reads version 1"):
        loads_keyfile(_document(version=version))


@pytest.mark.parametrize("field", ["site", "addresses", "server_name", "expires", "token", "ca_certificate"])
def test_missing_field(field: str) -> None:
    """
    A missing field is named.
    """
    with pytest.raises(KeyfileError, match=f"missing the field '{field}'"):
        loads_keyfile(_document(**{field: _DELETE}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": 5}, "'site' must be a string"),
        ({"site": "Alpha"}, "invalid field: site name 'Alpha'"),
        ({"addresses": "tunnel.example"}, "'addresses' must be a list"),
        ({"addresses": []}, "at least one server address"),
        ({"addresses": ["[::1"]}, "invalid address"),
        ({"server_name": "*.example"}, "invalid address"),
        ({"expires": "tomorrow"}, "'expires' must be a UTC time"),
        ({"expires": "2030-01-01T00:00:00"}, "'expires' must be a UTC time"),
        ({"token": "short"}, "token must be"),
        ({"ca_certificate": "garbage"}, "'ca_certificate' is not a PEM certificate"),
        (
            {"ca_certificate": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----"},
            "'ca_certificate' is not a valid PEM certificate",
        ),
    ],
)
def test_invalid_field(changes: dict[str, Any], message: str) -> None:
    """
    An invalid field value is reported with the field and the problem.
    """
    with pytest.raises(KeyfileError, match=message):
        loads_keyfile(_document(**changes))


def test_addresses_are_normalized_on_read() -> None:
    """
    Addresses written by hand in another spelling read back canonical.
    """
    keyfile = loads_keyfile(_document(addresses=["Tunnel.Example", "[0::1]:7"]))
    assert keyfile.addresses == ("tunnel.example:5500", "[::1]:7")
    assert keyfile.parsed_addresses() == [("tunnel.example", 5500), ("::1", 7)]


def test_constructor_validates() -> None:
    """
    A Keyfile cannot be built with a non-canonical address or a naive
    expiry time.
    """
    with pytest.raises(AddressError):
        _keyfile(addresses=("Tunnel.Example:5500",))
    with pytest.raises(KeyfileError):
        _keyfile(expires=NOW.replace(tzinfo=None))


def test_is_expired() -> None:
    """
    A keyfile is expired from its expiry instant on.
    """
    keyfile = _keyfile(expires=NOW)
    assert not keyfile.is_expired(NOW - timedelta(microseconds=1))
    assert keyfile.is_expired(NOW)


def test_token_is_not_in_repr() -> None:
    """
    The secret token does not leak into reprs (and so into logs).
    """
    keyfile = _keyfile(token="S" * 43)
    assert "SSSS" not in repr(keyfile)
    assert keyfile.token_digest == token_digest("S" * 43)
    assert len(keyfile.token_digest) == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tunnel.example", ("tunnel.example", 5500)),
        ("tunnel.example:443", ("tunnel.example", 443)),
        ("192.0.2.7:1", ("192.0.2.7", 1)),
        ("[::1]:5500", ("::1", 5500)),
        ("[2001:db8::1]", ("2001:db8::1", 5500)),
        ("::1", ("::1", 5500)),
        (" Host.Example. ", ("host.example", 5500)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    """
    Hosts, ports and bracketed or bare IPv6 addresses parse.
    """
    assert parse_address(text) == expected


def test_parse_address_default_port() -> None:
    """
    The default port applies only when none is given; 0 (unchecked) tells a
    caller that none was written.
    """
    assert parse_address("h.example", default_port=7) == ("h.example", 7)
    assert parse_address("h.example:8", default_port=7) == ("h.example", 8)
    assert parse_address("[::1]", default_port=0) == ("::1", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "address is empty"),
        (":5500", "':5500': host is empty"),
        ("host:", "'host:': port must be a number from 1 to 65535, not ''"),
        ("host:http", "port must be a number from 1 to 65535, not 'http'"),
        ("host:0", "port must be a number from 1 to 65535, not '0'"),
        ("host:65536", "port must be a number from 1 to 65535, not '65536'"),
        ("[::1", "'\\[::1' has '\\[' without '\\]'"),
        ("[::1]5500", "expected ':PORT' after '\\]', found '5500'"),
        ("[host]:1", "brackets are only for IPv6"),
        ("2001:db8::1:x", "write IPv6 addresses in brackets, \\[ADDR\\]:PORT"),
        ("bad host:1", "'bad host' is not a valid host name or IP address: ' ' is not allowed"),
        ("300.1.1.1", "'300.1.1.1' is not a valid IPv4 address"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    """
    Each malformed address gets a message saying what is wrong: the words
    of rtunnel.address, raised as the identity layer's AddressError.
    """
    with pytest.raises(AddressError, match=message):
        parse_address(text)
    with pytest.raises(address.AddressError, match=message):
        address.HostPort.parse(text, default_port=DEFAULT_PORT)


@given(address=addresses)
def test_format_parse_round_trip(address: str) -> None:
    """
    Formatting a parsed canonical address gives it back.
    """
    assert format_address(*parse_address(address)) == address
