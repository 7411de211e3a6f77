"""
rtunnel.address: the one grammar for hosts and ports. Round trips of every
valid value, canonical spellings, and refusals that name what is wrong.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtunnel.address import AddressError, HostPort, describe, is_wire_host, parse_host, parse_port, split_fields

_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?", fullmatch=True)
dns_names = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda n: not n.replace(".", "").isdigit())
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(dns_names, ipv4, ipv6)
ports = st.integers(1, 65535)
host_ports = st.builds(HostPort.of, hosts, ports)


@given(host_ports)
def test_parse_of_str_is_identity(value: HostPort) -> None:
    """For every valid value, parse(str(x)) == x, with or without a default port."""
    assert HostPort.parse(str(value)) == value
    assert HostPort.parse(str(value), default_port=1) == value


@given(hosts, ports)
def test_any_spelling_gives_one_value(host: str, port: int) -> None:
    """Upper case, a trailing dot, brackets and expanded IPv6 all mean the same address."""
    canonical = HostPort.of(host, port)
    spellings = []
    if ":" in host:
        spellings += [f"[{ipaddress.IPv6Address(host).exploded}]:{port}", f"[{host.upper()}]:{port}"]
    else:
        spellings += [f"{host.upper()}:{port}", f" {host}:{port} "]
        if ip_version_of(host) is None:
            spellings.append(f"{host}.:{port}")
    for spelling in spellings:
        assert HostPort.parse(spelling) == canonical, spelling


def ip_version_of(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


@given(hosts)
def test_wire_grammar_is_the_same(host: str) -> None:
    """Every host the parser accepts may travel in an OPEN frame, in any case."""
    assert is_wire_host(host.encode("ascii"))
    assert is_wire_host(host.upper().encode("ascii"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "address is empty"),
        ("camera", "expected HOST:PORT"),
        ("::1:22", "write IPv6 addresses in brackets, [ADDR]:PORT"),
        ("[::1", "has '[' without ']'"),
        ("[::1]22", "expected ':PORT' after ']'"),
        ("[camera]:22", "brackets are only for IPv6 addresses"),
        (":22", "has no host"),
        ("host:0", "port 0 is outside 1-65535"),
        ("host:65536", "port 65536 is outside 1-65535"),
        ("host:http", "port 'http' is not a number from 1 to 65535"),
        ("host:-1", "port '-1' is not a number from 1 to 65535"),
        ("999.1.1.1:22", "'999.1.1.1' is not a valid IPv4 address"),
        ("bad host:22", "is not a valid host name or IP address"),
        ("-lead.example:22", "is not a valid host name or IP address"),
        ("a..b:22", "is not a valid host name or IP address"),
        (("a" * 64) + ".example:22", "is not a valid host name or IP address"),
        (".".join(["abcdefghij"] * 26) + ":22", "is not a valid host name (1 to 253 characters)"),
        ("exa\u202emple:22", "is not a valid host name"),
    ],
)
def test_refusals_name_what_is_wrong(text: str, message: str) -> None:
    """Each malformed address is refused with a message that says what is wrong."""
    with pytest.raises(AddressError) as raised:
        HostPort.parse(text)
    assert message in str(raised.value), str(raised.value)


@given(st.text(max_size=40))
def test_garbage_raises_only_address_errors(text: str) -> None:
    """Anything at all either parses or raises AddressError, with a non-empty message."""
    for default in (None, 5500):
        try:
            HostPort.parse(text, default_port=default)
        except AddressError as e:
            assert str(e)


def test_default_port_and_bare_ipv6() -> None:
    """With a default port, HOST, [IPV6] and a bare IPV6 are addresses too."""
    assert HostPort.parse("tunnel.example", 5500) == HostPort("tunnel.example", 5500)
    assert HostPort.parse("[::1]", 5500) == HostPort("::1", 5500)
    assert HostPort.parse("::1", 5500) == HostPort("::1", 5500)
    assert HostPort.parse("fe80::1%eth0", 5500).host == "fe80::1%eth0"


def test_international_names_take_their_ascii_form() -> None:
    """A non-ASCII name is written as IDNA (xn--), as DNS carries it."""
    assert parse_host("Bücher.example") == "xn--bcher-kva.example"


def test_constructor_accepts_only_canonical_values() -> None:
    """HostPort() itself refuses a non-canonical host or a bad port; of() and parse() canonicalise."""
    with pytest.raises(AddressError):
        HostPort("Camera.Local", 80)
    with pytest.raises(AddressError):
        HostPort("camera.local", 0)
    assert HostPort.of("Camera.Local.", 80) == HostPort("camera.local", 80)
    assert str(HostPort.of("2001:DB8::5", 554)) == "[2001:db8::5]:554"


def test_parse_port() -> None:
    """Ports are decimal text from 1 to 65535."""
    assert parse_port("554") == 554
    for bad in ("0", "65536", "", "5 5", "0x10"):
        with pytest.raises(AddressError):
            parse_port(bad)


def test_split_fields_keeps_bracketed_ipv6_together() -> None:
    """Colons inside brackets do not split a spec."""
    assert split_fields("[::1]:8554:store-17:[2001:db8::5]:554") == [
        "[::1]",
        "8554",
        "store-17",
        "[2001:db8::5]",
        "554",
    ]
    assert split_fields("8554:store-17:10.0.0.5:554") == ["8554", "store-17", "10.0.0.5", "554"]


def test_describe() -> None:
    """Log lines bracket IPv6 hosts; addresses without a host read as their str()."""

    class Addr:
        def __init__(self, host: str, port: int) -> None:
            self.host, self.port = host, port

    assert describe(Addr("::1", 5500)) == "[::1]:5500"
    assert describe(Addr("127.0.0.1", 5500)) == "127.0.0.1:5500"
    assert describe(HostPort("::1", 22)) == "[::1]:22"
    assert describe("unix socket") == "unix socket"
