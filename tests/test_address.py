"""
rtunnel.address: the one grammar for hosts and ports. Round trips of every
valid value, canonical spellings, and refusals that name what is wrong.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock

from rtunnel.address import AddressError, HostPort, describe, is_wire_host, parse_host, parse_port, split_fields
from rtunnel.endpoints import SiteEndpointParser
from rtunnel.identity.certs import normalize_host
from rtunnel.identity.errors import IdentityError
from rtunnel.identity.keyfile import normalize_address, parse_address
from rtunnel.roles.forward import ForwardSpec
from rtunnel.roles.target import Target

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
        ("camera", "'camera': expected HOST:PORT"),
        ("[::1]", "'[::1]': expected [IPV6]:PORT"),
        ("::1:22", "'::1:22': write IPv6 addresses in brackets, [ADDR]:PORT"),
        ("[::1", "'[::1' has '[' without ']'"),
        ("[::1]22", "'[::1]22': expected ':PORT' after ']', found '22'"),
        ("[camera]:22", "'[camera]': brackets are only for IPv6 addresses"),
        ("[1::x]:22", "'[1::x]' is not a valid IPv6 address"),
        ("[]:22", "'[]:22': host is empty"),
        (":22", "':22': host is empty"),
        ("host:", "port must be a number from 1 to 65535, not ''"),
        ("host:0", "'host:0': port must be a number from 1 to 65535, not '0'"),
        ("host:65536", "port must be a number from 1 to 65535, not '65536'"),
        ("host:http", "port must be a number from 1 to 65535, not 'http'"),
        ("host:-1", "port must be a number from 1 to 65535, not '-1'"),
        ("host:\u0663", "port must be a number from 1 to 65535, not '\u0663'"),
        ("999.1.1.1:22", "'999.1.1.1:22': '999.1.1.1' is not a valid IPv4 address"),
        ("bad host:22", "'bad host' is not a valid host name or IP address: ' ' is not allowed"),
        ("x/y:22", "'x/y' is not a valid host name or IP address: '/' is not allowed"),
        ("a%b:22", "'a%b' is not a valid host name or IP address: '%' is not allowed"),
        ("-lead.example:22", "'-lead.example' is not a valid host name: label '-lead' starts or ends with '-'"),
        ("a..b:22", "'a..b' is not a valid host name: it has an empty label"),
        (".:22", "'.' is not a valid host name: it has an empty label"),
        (("a" * 64) + ".example:22", "is not a valid host name: a label of 64 characters (at most 63)"),
        (".".join(["abcdefghij"] * 26) + ":22", "is not a valid host name: longer than 253 characters"),
        ("exa\u202emple:22", "is not a valid host name: it has no international (IDNA) form"),
        ("[fe80::1%eth 0]:22", "the zone after '%' may hold only letters, digits, '.', '-' and '_'"),
        ("a]b:22", "'a]b': brackets must enclose a whole IPv6 address"),
    ],
)
def test_refusals_name_what_is_wrong(text: str, message: str) -> None:
    """Each malformed address is refused with a message that quotes it and says what is wrong."""
    with pytest.raises(AddressError) as raised:
        HostPort.parse(text)
    assert message in str(raised.value), str(raised.value)
    if text.strip():
        assert str(raised.value).startswith(repr(text)), str(raised.value)


#: Host texts that are often wrong: characters of names, IP addresses and
#: zones, and some that no host may hold; brackets are syntax, left out.
_host_chars = st.sampled_from(list("abcXYZ0189.-_:%/* \u00e9\u202e"))
host_texts = st.one_of(
    st.text(_host_chars, min_size=1, max_size=30),
    hosts,
    hosts.map(str.upper),
    hosts.map(lambda h: f" {h}. "),
    ipv6.map(lambda h: f"{h}%eth0"),
)


@given(host_texts)
def test_host_refusals_quote_the_host(text: str) -> None:
    """
    parse_host either gives a canonical host (which it gives back unchanged)
    or refuses with a message that quotes the host as written (spaces
    around it ignored): the offending part.
    """
    try:
        host = parse_host(text)
    except AddressError as e:
        assert str(e) == "host is empty" if not text.strip() else repr(text.strip()) in str(e), (text, str(e))
    else:
        assert parse_host(host) == host
        assert is_wire_host(host)


@given(host_texts, st.one_of(ports.map(str), st.text("0123456789x-", max_size=7)))
def test_address_refusals_name_the_part_at_fault(host: str, port: str) -> None:
    """
    HOST:PORT is refused with the host's own message when the host is at
    fault, else with the port's, each after the address quoted whole.
    """
    field = f"[{host}]" if ":" in host else host
    text = f"{field}:{port}"
    try:
        expected_host: str | AddressError = parse_host(field)
    except AddressError as e:
        expected_host = e
    try:
        expected_port: int | AddressError = parse_port(port)
    except AddressError as e:
        expected_port = e
    try:
        value = HostPort.parse(text)
    except AddressError as e:
        if isinstance(expected_host, AddressError):
            assert str(e) == f"{text!r}: {expected_host}"
        else:
            assert isinstance(expected_port, AddressError)
            assert str(e) == f"{text!r}: {expected_port}"
            assert repr(port) in str(e)
    else:
        assert (value.host, value.port) == (expected_host, expected_port)


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
    """Ports are decimal text from 1 (or 0 where asked) to 65535, refused with one message naming the text."""
    assert parse_port("554") == 554
    assert parse_port("0", minimum=0) == 0
    for bad in ("0", "65536", "", "5 5", "0x10", "+1", "\u0663"):
        with pytest.raises(AddressError) as raised:
            parse_port(bad)
        assert str(raised.value) == f"port must be a number from 1 to 65535, not {bad!r}"
    with pytest.raises(AddressError, match="listening port must be a number from 0 to 65535, not '-1'"):
        parse_port("-1", "listening port", minimum=0)


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


def _outcome(parse: Callable[[], object]) -> object:
    """What a parser gives: its value, or the text of the ValueError it raised."""
    try:
        return parse()
    except ValueError as e:
        return ("refused", str(e))


@given(host_texts)
def test_every_parser_takes_the_same_hosts(host: str) -> None:
    """
    The keyfile, the allowlist (Target), forward specs, endpoint strings and
    certificate names accept exactly the hosts parse_host accepts, with the
    same canonical spelling, and refuse the others with parse_host's
    message, after naming where it was read. Where a port follows, an IPv6
    host is written in brackets, which parse_host reads alike.
    """
    field = f"[{host}]" if ":" in host else host
    address = f"{field}:554"
    spec = f"8080:alpha:{address}"
    want = _outcome(lambda: parse_host(field))
    assert (_outcome(lambda: parse_host(host)) == want) or (
        isinstance(want, tuple) and isinstance(_outcome(lambda: parse_host(host)), tuple)
    ), "brackets change what is accepted"

    if isinstance(want, str):
        expected = HostPort(want, 554)
        assert parse_address(address) == (want, 554)
        assert normalize_address(address) == str(expected)
        assert Target.parse(address) == expected
        assert ForwardSpec.parse(spec).target == expected
        endpoint = SiteEndpointParser().parseStreamClient(MemoryReactorClock(), site="alpha", host=host, port="554")
        assert (endpoint.host, endpoint.port) == (want, 554)
        assert normalize_host(host) == want
        return
    reason = want[1]
    direct = _outcome(lambda: parse_host(host))
    assert isinstance(direct, tuple)
    assert _outcome(lambda: parse_address(address)) == ("refused", f"{address!r}: {reason}")
    assert _outcome(lambda: Target.parse(address)) == ("refused", f"{address!r}: {reason}")
    assert _outcome(lambda: ForwardSpec.parse(spec)) == ("refused", f"--forward {spec!r}: target {address!r}: {reason}")
    parsed = _outcome(
        lambda: SiteEndpointParser().parseStreamClient(MemoryReactorClock(), site="alpha", host=host, port="554")
    )
    assert parsed == ("refused", f"rtunnel endpoint: {direct[1]}")
    assert _outcome(lambda: normalize_host(host)) == direct
    with pytest.raises(IdentityError):
        parse_address(address)
