"""
Routing by name (rtunnel/frontdoor/names.py): SERVICE.SITE.D and
HOST.SITE.D, the rule between a service and a one-label host, sites with
dots, and every refusal kind.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.address import HostPort
from rtunnel.frontdoor.names import (
    DEFAULT_DOMAIN,
    Route,
    SiteDirectory,
    parse_domain,
    parse_service_spec,
    requested_name,
    route,
    route_service,
    validate_service_name,
)
from rtunnel.frontdoor.refusals import Refusal, RefusalKind

D = DEFAULT_DOMAIN
SITES: SiteDirectory = {
    "store-17": {"directory": HostPort("10.0.0.5", 389), "video": HostPort("cam.local", 554)},
    "store-18": {"directory": HostPort("10.1.0.5", 3389)},
    "quiet": {},
    "eu.store-1": {"web": HostPort("::1", 8080)},
    "store-1": {},
}


class RouteTests(SynchronousTestCase):
    def test_routing_table(self) -> None:
        """Each name and port goes to its site and target, or is refused with its own kind."""
        cases: list[tuple[str, int, Route | RefusalKind]] = [
            # SERVICE.SITE.D on the declared port
            (f"directory.store-17.{D}", 389, Route("store-17", "10.0.0.5", 389, service="directory")),
            (f"video.store-17.{D}", 554, Route("store-17", "cam.local", 554, service="video")),
            (f"directory.store-18.{D}", 3389, Route("store-18", "10.1.0.5", 3389, service="directory")),
            # HOST.SITE.D on any port
            (f"cam1.store-17.{D}", 554, Route("store-17", "cam1", 554, single_label=True)),
            (f"nvr.floor2.store-17.{D}", 80, Route("store-17", "nvr.floor2", 80)),
            (f"10.0.0.9.store-17.{D}", 22, Route("store-17", "10.0.0.9", 22)),
            (f"db_1.quiet.{D}", 5432, Route("quiet", "db_1", 5432, single_label=True)),
            (f"localhost.quiet.{D}", 1, Route("quiet", "localhost", 1, single_label=True)),
            # a service on another port is refused, never taken for a host
            (f"directory.store-17.{D}", 80, RefusalKind.SERVICE_WRONG_PORT),
            (f"directory.store-18.{D}", 389, RefusalKind.SERVICE_WRONG_PORT),
            # the longest known site wins
            (f"web.eu.store-1.{D}", 8080, Route("eu.store-1", "::1", 8080, service="web")),
            (f"web.eu.store-1.{D}", 80, RefusalKind.SERVICE_WRONG_PORT),
            (f"x.eu.store-1.{D}", 1, Route("eu.store-1", "x", 1, single_label=True)),
            (f"eu.store-1.{D}", 1, Route("store-1", "eu", 1, single_label=True)),
            # refusals
            (f"store-17.{D}", 389, RefusalKind.UNKNOWN_SERVICE),
            (f"x.store-99.{D}", 1, RefusalKind.UNKNOWN_SITE),
            (f"x._bad.{D}", 1, RefusalKind.UNKNOWN_SITE),
            (f"{D}", 1, RefusalKind.OUTSIDE_DOMAIN),
            ("directory.store-17.example.com", 389, RefusalKind.OUTSIDE_DOMAIN),
            (f"directory.store-17.x{D}", 389, RefusalKind.OUTSIDE_DOMAIN),
            ("10.0.0.5", 80, RefusalKind.ADDRESS_TYPE),
            (f"1.2.3.store-17.{D}", 1, RefusalKind.NAME_INVALID),
            (f"a..store-17.{D}", 1, RefusalKind.NAME_INVALID),
            ("", 1, RefusalKind.NAME_INVALID),
            ("a" * 254, 1, RefusalKind.NAME_TOO_LONG),
            (f"directory.store-17.{D}", 0, RefusalKind.MALFORMED),
            (f"directory.store-17.{D}", 65536, RefusalKind.MALFORMED),
        ]
        for name, port, expected in cases:
            result = route(name, port, D, SITES)
            if isinstance(expected, Route):
                self.assertEqual(result, expected, (name, port))
            else:
                assert isinstance(result, Refusal), (name, port, result)
                self.assertEqual(result.kind, expected, (name, port, result))

    def test_case_and_trailing_dot(self) -> None:
        """Names are case-insensitive, and a trailing dot is the same name."""
        expected = Route("store-17", "10.0.0.5", 389, service="directory")
        for name in (
            "DIRECTORY.Store-17.RTunnel.Internal",
            f"directory.store-17.{D}.",
            b"Directory.STORE-17.rtunnel.internal.",
        ):
            self.assertEqual(route(name, 389, D, SITES), expected, name)
        self.assertEqual(route(f"CAM1.store-17.{D}", 554, D, SITES), Route("store-17", "cam1", 554, single_label=True))

    def test_other_domain(self) -> None:
        """The domain is a parameter: names are routed under it, and the default one is then outside."""
        domain = parse_domain("Fleet.Example.")
        self.assertEqual(domain, "fleet.example")
        self.assertEqual(route("directory.store-18.fleet.example", 3389, domain, SITES).site, "store-18")  # type: ignore[union-attr]
        refused = route(f"directory.store-18.{D}", 3389, domain, SITES)
        assert isinstance(refused, Refusal)
        self.assertEqual(refused.kind, RefusalKind.OUTSIDE_DOMAIN)

    def test_reasons_say_what(self) -> None:
        """Refusal reasons name the site, service and ports involved."""
        wrong = route(f"directory.store-17.{D}", 80, D, SITES)
        self.assertEqual(
            str(wrong),
            "declared service asked on another port: service directory of site store-17 is on port 389, asked on 80",
        )
        unknown = route(f"x.store-99.{D}", 1, D, SITES)
        self.assertEqual(str(unknown), f"unknown site: x.store-99.{D}: no site named store-99")
        bare = route(f"store-17.{D}", 1, D, SITES)
        self.assertIn("no service or host in front of it", str(bare))

    def test_directory_is_read_not_copied(self) -> None:
        """Any mapping works as the directory, and a site added later is routed at once."""
        sites: dict[str, dict[str, HostPort]] = {}
        self.assertIsInstance(route(f"a.new.{D}", 1, D, sites), Refusal)
        sites["new"] = {}
        self.assertEqual(route(f"a.new.{D}", 1, D, sites), Route("new", "a", 1, single_label=True))

    def test_route_describe(self) -> None:
        """How a log line names a destination: site, service if any, HOST:PORT with IPv6 in brackets."""
        self.assertEqual(
            Route("store-17", "10.0.0.5", 389, service="directory").describe(),
            "site store-17: service directory = 10.0.0.5:389",
        )
        self.assertEqual(Route("eu.store-1", "::1", 8080).describe(), "site eu.store-1: [::1]:8080")

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=300), st.binary(max_size=300)), st.integers(-5, 70000))
    def test_never_raises(self, name: str | bytes, port: int) -> None:
        """Any name and port give a route or a refusal, never an exception."""
        result = route(name, port, D, SITES)
        self.assertIsInstance(result, Route | Refusal)
        if isinstance(result, Route):
            self.assertIn(result.site, SITES)
            self.assertEqual(HostPort.of(result.host, result.port).host, result.host)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4),
        st.sampled_from(sorted(SITES)),
        st.integers(1, 65535),
    )
    def test_host_names_route_to_their_site(self, labels: list[str], site: str, port: int) -> None:
        """A HOST.SITE.D whose host is not a service of the site reaches that host and port at that site."""
        host = ".".join(labels)
        if host.replace(".", "").isdigit() or (len(labels) == 1 and host in SITES[site]):
            return
        result = route(f"{host}.{site}.{D}", port, D, SITES)
        # With sites that end like another site's name, the longer one wins.
        longest = max((s for s in SITES if f"{host}.{site}".endswith("." + s)), key=len)
        assert isinstance(result, Route), result
        self.assertEqual(result.site, longest)
        self.assertEqual(f"{result.host}.{result.site}", f"{host}.{site}")
        self.assertEqual(result.port, port)


class RouteServiceTests(SynchronousTestCase):
    def test_explicit_service(self) -> None:
        """A service named explicitly (the endpoint's service=): its target, or unknown site/service."""
        self.assertEqual(
            route_service("store-17", "video", SITES), Route("store-17", "cam.local", 554, service="video")
        )
        unknown = route_service("store-17", "ftp", SITES)
        assert isinstance(unknown, Refusal)
        self.assertEqual(unknown.kind, RefusalKind.UNKNOWN_SERVICE)
        self.assertIn("declared: directory, video", unknown.reason)
        none = route_service("quiet", "x", SITES)
        assert isinstance(none, Refusal)
        self.assertIn("declared: none", none.reason)
        site = route_service("nowhere", "x", SITES)
        assert isinstance(site, Refusal)
        self.assertEqual(site.kind, RefusalKind.UNKNOWN_SITE)


class RequestedNameTests(SynchronousTestCase):
    def test_names(self) -> None:
        """The canonical form of a requested name, or why it cannot be one."""
        self.assertEqual(requested_name(b"A.B-c_d.EXAMPLE."), "a.b-c_d.example")
        self.assertEqual(requested_name("xn--bcher-kva.example"), "xn--bcher-kva.example")
        cases: list[tuple[str | bytes, RefusalKind, str]] = [
            (b"", RefusalKind.NAME_INVALID, "empty"),
            (b".", RefusalKind.NAME_INVALID, ""),
            (b"b\xc3\xbccher.example", RefusalKind.NAME_INVALID, "not ASCII"),
            ("bücher.example", RefusalKind.NAME_INVALID, "'ü'"),
            (b"a b", RefusalKind.NAME_INVALID, "' '"),
            (b"a\r\nb", RefusalKind.NAME_INVALID, "'\\r'"),
            (b"-a.b", RefusalKind.NAME_INVALID, "starts or ends with '-'"),
            (b"1.2.3.4.5", RefusalKind.NAME_INVALID, "not a valid IPv4"),
            (b"a" * 64, RefusalKind.NAME_INVALID, "at most 63"),
            (b"a" * 254, RefusalKind.NAME_TOO_LONG, "254 characters"),
            (b"127.0.0.1", RefusalKind.ADDRESS_TYPE, "127.0.0.1 is an IP address"),
            (b"::1", RefusalKind.NAME_INVALID, "':'"),
        ]
        for raw, kind, words in cases:
            result = requested_name(raw)
            assert isinstance(result, Refusal), raw
            self.assertEqual(result.kind, kind, raw)
            self.assertIn(words, result.reason, raw)
        longest = ("a" * 63 + ".") * 3 + "a" * 61
        self.assertEqual(len(longest), 253)
        self.assertEqual(requested_name(longest + "."), longest)  # the trailing dot does not count
        self.assertNotIn("\x1b", requested_name(b"\x1b[2J").reason)  # type: ignore[union-attr]


class ConfigurationTests(SynchronousTestCase):
    def test_domain(self) -> None:
        """--domain: a DNS name in canonical form; an IP address or a bad name is refused."""
        self.assertEqual(parse_domain("RTunnel.Internal."), "rtunnel.internal")
        self.assertEqual(parse_domain("internal"), "internal")
        for bad, words in (("10.0.0.1", "not an IP address"), ("a..b", "empty label"), ("", "empty")):
            with self.assertRaises(ValueError) as raised:
                parse_domain(bad)
            self.assertIn(words, str(raised.exception), bad)

    def test_service_names(self) -> None:
        """A service name is one lower-case DNS label."""
        for good in ("directory", "a", "video-2", "x" * 63, "0"):
            self.assertEqual(validate_service_name(good), good)
        for bad, words in (
            ("", "empty"),
            ("Directory", "upper-case"),
            ("a.b", "not a DNS label"),
            ("a_b", "not a DNS label"),
            ("-a", "not a DNS label"),
            ("a-", "not a DNS label"),
            ("x" * 64, "the limit is 63"),
        ):
            with self.assertRaises(ValueError) as raised:
                validate_service_name(bad)
            self.assertIn(words, str(raised.exception), bad)

    def test_service_spec(self) -> None:
        """--service NAME=HOST:PORT, by the one address grammar."""
        self.assertEqual(parse_service_spec("directory=10.0.0.5:389"), ("directory", HostPort("10.0.0.5", 389)))
        self.assertEqual(parse_service_spec("web=[::1]:8080"), ("web", HostPort("::1", 8080)))
        self.assertEqual(parse_service_spec("cam=CAM.Local.:554"), ("cam", HostPort("cam.local", 554)))
        for bad, words in (
            ("directory", "expected NAME=HOST:PORT"),
            ("Dir=h:1", "upper-case"),
            ("d=h", "expected HOST:PORT"),
            ("d=h:0", "from 1 to 65535"),
            ("d=h:1:2", "expected HOST:PORT"),
            ("d=::1:80", "expected HOST:PORT"),
        ):
            with self.assertRaises(ValueError) as raised:
                parse_service_spec(bad)
            self.assertIn(f"--service {bad!r}: ", str(raised.exception))
            self.assertIn(words, str(raised.exception), bad)
