"""
The twistd entry points: plugin discovery (service makers and the endpoint
parser), option parsing into the frozen configs with clear usage errors,
and makeService / the builders with a real state directory.
"""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from rtunnel.adapter import Keepalive
from rtunnel.cli import server_tap, site_tap
from rtunnel.endpoints import SiteEndpointParser
from rtunnel.identity.keyfile import write_keyfile
from rtunnel.mux import Settings
from rtunnel.mux.settings import ALL_CAPABILITIES
from rtunnel.roles.forward import ForwardSpec
from rtunnel.roles.server import ServerPolicy, TunnelServerService
from rtunnel.roles.site import SitePolicy, TunnelClientService
from rtunnel.roles.target import Target
from rtunnel.services import ServerConfig, SiteConfig, build_server_service, build_site_service
from tests.roles_helpers import ServerFixture, temp_dir


class PluginDiscoveryTests(SynchronousTestCase):
    def test_service_makers(self) -> None:
        """
        getPlugins(IServiceMaker) finds both rtunnel service makers, each a
        valid IServiceMaker whose options are our tap's Options.
        """
        makers = {m.tapname: m for m in getPlugins(IServiceMaker) if m.tapname in ("rtunnel-server", "rtunnel")}
        self.assertEqual(sorted(makers), ["rtunnel", "rtunnel-server"])
        for maker in makers.values():
            self.assertTrue(verifyObject(IServiceMaker, maker))
            self.assertTrue(verifyObject(IPlugin, maker))
            self.assertTrue(maker.description)
        self.assertIsInstance(makers["rtunnel-server"].options(), server_tap.Options)
        self.assertIsInstance(makers["rtunnel"].options(), site_tap.Options)

    def test_endpoint_parser(self) -> None:
        """getPlugins finds the rtunnel client endpoint parser, a valid provider of the interface."""
        parsers = [
            p
            for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
            if getattr(p, "prefix", None) == "rtunnel"
        ]
        self.assertEqual(len(parsers), 1)
        self.assertIsInstance(parsers[0], SiteEndpointParser)
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, parsers[0]))


def parse_server(*argv: str) -> ServerConfig:
    options = server_tap.Options()
    options.parseOptions(list(argv))
    return options.config  # type: ignore[no-any-return]


def parse_site(*argv: str) -> SiteConfig:
    options = site_tap.Options()
    options.parseOptions(list(argv))
    return options.config  # type: ignore[no-any-return]


class ServerOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With only --state, every setting has its documented default."""
        config = parse_server("--state", "/srv/rtunnel")
        self.assertEqual(
            config,
            ServerConfig(
                state_dir="/srv/rtunnel",
                listen="tcp:5500",
                open_timeout=5.0,
                drain_grace=10.0,
                policy=ServerPolicy(keepalive=Keepalive(25.0, 30.0), handshake_timeout=30.0),
            ),
        )

    def test_every_option(self) -> None:
        """Every option lands in the frozen config, repeatable ones in order."""
        config = parse_server(
            "--state=/s",
            "--listen=tcp:6000:interface=0.0.0.0",
            "--public-address=tunnel.example",
            "--public-address=203.0.113.5",
            "--forward=8080:alpha:10.0.0.5:554",
            "--forward=[::1]:9000:beta:[::1]:22",
            "--open-timeout=2.5",
            "--handshake-timeout=7",
            "--max-streams-per-site=50",
            "--max-pending-opens=9",
            "--keepalive=4",
            "--keepalive-timeout=20",
            "--drain-grace=3",
            "--max-preauth=64",
            "--max-handshakes=16",
        )
        self.assertEqual(config.state_dir, "/s")
        self.assertEqual(config.listen, "tcp:6000:interface=0.0.0.0")
        self.assertEqual(config.public_addresses, ("tunnel.example", "203.0.113.5"))
        self.assertEqual(
            config.forwards,
            (ForwardSpec.parse("8080:alpha:10.0.0.5:554"), ForwardSpec.parse("[::1]:9000:beta:[::1]:22")),
        )
        self.assertEqual((config.open_timeout, config.drain_grace), (2.5, 3.0))
        self.assertEqual((config.max_streams_per_site, config.max_pending_opens), (50, 9))
        self.assertEqual(
            config.policy,
            ServerPolicy(keepalive=Keepalive(4.0, 20.0), handshake_timeout=7.0, max_preauth=64, max_handshakes=16),
        )

    def test_log_level(self) -> None:
        """--log-level picks the threshold of rtunnel's own log lines; info by default."""
        for tap in (server_tap, site_tap):
            options = tap.Options()
            options.parseOptions(["--state=/s"])
            self.assertEqual(options.log_level, LogLevel.info)
            for name, level in (("debug", LogLevel.debug), ("WARN", LogLevel.warn), ("warning", LogLevel.warn)):
                options = tap.Options()
                options.parseOptions(["--state=/s", f"--log-level={name}"])
                self.assertEqual(options.log_level, level)
            with self.assertRaises(usage.UsageError) as raised:
                tap.Options().parseOptions(["--state=/s", "--log-level=chatty"])
            self.assertIn(
                "--log-level: 'chatty' is not one of debug, info, warn, error, critical", str(raised.exception)
            )

    def test_keepalive_off(self) -> None:
        """--keepalive 0 (in any spelling) or off turns keepalive off."""
        for value in ("0", "0.0", "00", "0.000", "off"):
            self.assertIsNone(parse_server("--state=/s", f"--keepalive={value}").policy.keepalive, value)

    def test_keepalive_timeout_defaults_to_three_intervals(self) -> None:
        """Without --keepalive-timeout the peer is dead after three intervals of silence."""
        self.assertEqual(parse_server("--state=/s", "--keepalive=5").policy.keepalive, Keepalive(5.0, 15.0))

    def test_server_keepalive_leaves_pinging_to_sites(self) -> None:
        """
        The server pings after 25 s of silence and gives up after 30 s: the
        sites (10 s) ping first. --keepalive 25 alone is the default again;
        --keepalive-timeout alone keeps the interval at 5/6 of the timeout
        at most, so a shorter timeout (accepted before the server's own
        defaults existed) still gets a ping before it expires.
        """
        self.assertEqual(ServerPolicy().keepalive, Keepalive(25.0, 30.0))
        self.assertEqual(parse_server("--state=/s", "--keepalive=25").policy.keepalive, Keepalive(25.0, 75.0))
        self.assertEqual(parse_server("--state=/s", "--keepalive-timeout=60").policy.keepalive, Keepalive(25.0, 60.0))
        self.assertEqual(parse_server("--state=/s", "--keepalive-timeout=15").policy.keepalive, Keepalive(12.5, 15.0))
        help_text = str(server_tap.Options())
        self.assertIn("default 25", help_text)

    def test_usage_errors(self) -> None:
        """Each bad value is a usage error naming the option and the value."""
        cases = [
            ((), "--state DIR is required"),
            (("--forward=8080:alpha:h",), "--forward '8080:alpha:h': expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT"),
            (("--forward=8080:Alpha:h:1",), "site name 'Alpha' has upper-case letters"),
            (("--keepalive=soon",), "--keepalive: 'soon' is not a number of seconds"),
            (("--keepalive=-1",), "--keepalive: must be greater than 0, got -1"),
            (("--keepalive=10", "--keepalive-timeout=5"), "--keepalive-timeout must not be shorter than --keepalive"),
            (("--keepalive-timeout=x",), "--keepalive-timeout: 'x' is not a number of seconds"),
            (("--open-timeout=0",), "--open-timeout: must be greater than 0, got 0"),
            (("--open-timeout=inf",), "--open-timeout: must be a finite number of seconds, got inf"),
            (("--open-timeout=nan",), "--open-timeout: must be greater than 0, got nan"),
            (("--handshake-timeout=-3",), "--handshake-timeout: must be greater than 0, got -3"),
            (("--drain-grace=later",), "--drain-grace: 'later' is not a number of seconds"),
            (("--max-streams-per-site=0",), "--max-streams-per-site: must be at least 1, got 0"),
            (("--max-pending-opens=many",), "--max-pending-opens: 'many' is not a whole number"),
            (("--max-preauth=0",), "--max-preauth: must be at least 1, got 0"),
            (("--max-handshakes=0",), "--max-handshakes: must be at least 1, got 0"),
        ]
        for argv, message in cases:
            args = argv if argv == () else ("--state=/s", *argv)
            with self.assertRaises(usage.UsageError, msg=repr(argv)) as raised:
                parse_server(*args)
            self.assertIn(message, str(raised.exception), repr(argv))


class SiteOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With only --state, every setting has its documented default."""
        config = parse_site("--state", "/var/lib/rtunnel")
        self.assertEqual(
            config,
            SiteConfig(
                state_dir="/var/lib/rtunnel",
                policy=SitePolicy(keepalive=Keepalive(10.0, 30.0)),
            ),
        )

    def test_every_option(self) -> None:
        """Every option lands in the frozen config; --allow is repeatable and canonical."""
        config = parse_site(
            "--state=/s",
            "--keyfile=/tmp/alpha.rtkey",
            "--allow=10.0.0.5:554",
            "--allow=[::1]:22",
            "--allow=Camera.Local:80",
            "--retry-cap=12",
            "--connect-timeout=4",
            "--max-streams=20",
            "--keepalive=6",
            "--keepalive-timeout=30",
            "--drain-grace=2",
        )
        self.assertEqual(config.keyfile, "/tmp/alpha.rtkey")
        self.assertEqual(config.allow, (Target("10.0.0.5", 554), Target("::1", 22), Target("camera.local", 80)))
        self.assertEqual(config.target_connect_timeout, 4.0)
        self.assertEqual(
            config.policy,
            SitePolicy(
                settings=Settings(max_streams=20, capabilities=ALL_CAPABILITIES),
                keepalive=Keepalive(6.0, 30.0),
                retry_cap=12.0,
                connect_timeout=4.0,
                drain_grace=2.0,
            ),
        )

    def test_keepalive_defaults(self) -> None:
        """
        The site pings after 10 s of silence and gives up after 30 s; a
        --keepalive-timeout alone keeps the 10-s interval (and may not be
        shorter than it).
        """
        self.assertEqual(parse_site("--state=/s", "--keepalive-timeout=60").policy.keepalive, Keepalive(10.0, 60.0))
        self.assertEqual(parse_site("--state=/s", "--keepalive=4").policy.keepalive, Keepalive(4.0, 12.0))
        self.assertIsNone(parse_site("--state=/s", "--keepalive=off").policy.keepalive)
        with self.assertRaises(usage.UsageError) as raised:
            parse_site("--state=/s", "--keepalive-timeout=5")
        self.assertIn("--keepalive-timeout must not be shorter than --keepalive", str(raised.exception))

    def test_usage_errors(self) -> None:
        """Each bad value is a usage error naming the option and the value."""
        cases = [
            ((), "--state DIR is required"),
            (("--allow=camera",), "--allow 'camera': expected HOST:PORT"),
            (("--allow=::1:22",), "--allow '::1:22': write IPv6 addresses in brackets"),
            (("--allow=host:0",), "--allow 'host:0': port must be a number from 1 to 65535"),
            (("--retry-cap=0",), "--retry-cap: must be greater than 0, got 0"),
            (("--connect-timeout=fast",), "--connect-timeout: 'fast' is not a number of seconds"),
            (("--keepalive=1", "--keepalive-timeout=0.5"), "--keepalive-timeout must not be shorter than --keepalive"),
            (("--max-streams=0",), "--max-streams: must be at least 1, got 0"),
            (("--max-streams=3000000000",), "--max-streams: must be at most 2147483647, got 3000000000"),
        ]
        for argv, message in cases:
            args = argv if argv == () else ("--state=/s", *argv)
            with self.assertRaises(usage.UsageError, msg=repr(argv)) as raised:
                parse_site(*args)
            self.assertIn(message, str(raised.exception), repr(argv))


class MakeServiceTests(SynchronousTestCase):
    def test_server_make_service_creates_state(self) -> None:
        """
        The server tap's makeService builds the tunnel server service on a
        new state directory (CA and certificates created), not started yet.
        """
        directory = os.path.join(temp_dir(self), "state")
        options = server_tap.Options()
        options.parseOptions(
            ["--state", directory, "--public-address", "tunnel.example", "--forward", "8080:alpha:h:1"]
        )
        service = server_tap.makeService(options)
        self.addCleanup(service.state.close)  # type: ignore[attr-defined]
        self.assertIsInstance(service, TunnelServerService)
        self.assertFalse(service.running)
        self.assertEqual(service.config, options.config)  # type: ignore[attr-defined]
        self.assertIn("tunnel.example", service.state.server_names)  # type: ignore[attr-defined]
        self.assertTrue(os.path.exists(os.path.join(directory, "ca.crt")))

    def test_server_make_service_reports_bad_state(self) -> None:
        """A state path that is not a directory ends the process with a one-line error."""
        path = os.path.join(temp_dir(self), "file")
        open(path, "w").close()
        options = server_tap.Options()
        options.parseOptions(["--state", path])
        with self.assertRaises(SystemExit) as raised:
            server_tap.makeService(options)
        self.assertIn("rtunnel-server: error: ", str(raised.exception.code))
        self.assertIn("not a directory", str(raised.exception.code))

    def test_server_make_service_reports_bad_public_address(self) -> None:
        """An invalid --public-address ends the process with a one-line error naming it."""
        options = server_tap.Options()
        options.parseOptions(["--state", temp_dir(self), "--public-address", "bad host!"])
        with self.assertRaises(SystemExit) as raised:
            server_tap.makeService(options)
        self.assertIn("rtunnel-server: error: invalid public address", str(raised.exception.code))
        self.assertIn("bad host!", str(raised.exception.code))

    def test_site_make_service_reads_keyfile(self) -> None:
        """
        The site tap's makeService loads the state and the keyfile and
        builds the tunnel service with the allowlist, not started yet.
        """
        fixture = ServerFixture(self)
        keyfile = os.path.join(temp_dir(self), "alpha.rtkey")
        write_keyfile(keyfile, fixture.keyfile("alpha"))
        options = site_tap.Options()
        options.parseOptions(
            ["--state", os.path.join(temp_dir(self), "site"), "--keyfile", keyfile, "--allow", "10.0.0.5:554"]
        )
        service = site_tap.makeService(options)
        self.assertIsInstance(service, TunnelClientService)
        self.assertFalse(service.running)
        self.assertEqual(service.keyfile.site, "alpha")  # type: ignore[attr-defined, union-attr]
        self.assertEqual(service.connector.allow, frozenset({Target("10.0.0.5", 554)}))  # type: ignore[attr-defined]

    def test_site_make_service_reports_missing_keyfile(self) -> None:
        """A keyfile that does not exist ends the process with a one-line error naming it."""
        missing = os.path.join(temp_dir(self), "nope.rtkey")
        options = site_tap.Options()
        options.parseOptions(["--state", temp_dir(self), "--keyfile", missing])
        with self.assertRaises(SystemExit) as raised:
            site_tap.makeService(options)
        self.assertIn("rtunnel: error: ", str(raised.exception.code))
        self.assertIn("nope.rtkey", str(raised.exception.code))


class BuilderTests(SynchronousTestCase):
    def test_server_builder_reuses_state(self) -> None:
        """Building twice on the same directory keeps the same CA (sites stay enrolled)."""
        directory = temp_dir(self)
        first = build_server_service(ServerConfig(state_dir=directory), MemoryReactorClock())
        first.state.close()
        second = build_server_service(ServerConfig(state_dir=directory), MemoryReactorClock())
        self.addCleanup(second.state.close)
        self.assertEqual(first.state.ca_certificate, second.state.ca_certificate)

    def test_site_builder_enrolls_first(self) -> None:
        """
        A fresh site started with a keyfile dials the keyfile's server
        address (to enroll) with the configured connect timeout.
        """
        fixture = ServerFixture(self)
        keyfile = os.path.join(temp_dir(self), "alpha.rtkey")
        write_keyfile(keyfile, fixture.keyfile("alpha", addresses=("127.0.0.1:5599",)))
        reactor = MemoryReactorClock()
        fatal: list[str] = []
        config = SiteConfig(state_dir=temp_dir(self), keyfile=keyfile, policy=SitePolicy(connect_timeout=4.0))
        service = build_site_service(config, reactor, on_fatal=fatal.append)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(h, p, t) for h, p, _, t, _ in reactor.tcpClients], [("127.0.0.1", 5599, 4.0)])
        self.assertEqual(fatal, [])

    def test_site_builder_enrolled_state_dials_tunnel(self) -> None:
        """
        An enrolled site started without a keyfile does not enroll: it
        dials its tunnel to the stored server address straight away.
        """
        fixture = ServerFixture(self)
        state = fixture.enrolled_site_state(self, "alpha", ("127.0.0.1:5598",))
        reactor = MemoryReactorClock()
        config = SiteConfig(state_dir=state.directory.path, policy=SitePolicy(keepalive=None))
        service = build_site_service(config, reactor, on_fatal=self.fail)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("127.0.0.1", 5598)])
        self.assertIsNotNone(service.client)  # type: ignore[attr-defined]


class FlowOptionTests(SynchronousTestCase):
    def test_window_and_frame_options_reach_both_configs(self) -> None:
        """
        --window, --max-frame-size and --max-window set what each role
        announces and how far its windows may grow; --max-window 0 turns
        growth off.
        """
        from rtunnel.cli import server_tap, site_tap

        server = server_tap.Options()
        server.parseOptions(["--state", "/tmp/x", "--window", "1M", "--max-frame-size", "128K", "--max-window", "0"])
        policy = server.config.policy
        self.assertEqual((policy.settings.initial_window, policy.settings.max_frame_size), (1 << 20, 128 << 10))
        self.assertFalse(policy.tuning.enabled)
        site = site_tap.Options()
        site.parseOptions(
            [
                "--state",
                "/tmp/y",
                "--window",
                "65536",
                "--max-window",
                "4M",
                "--max-streams",
                "10",
                "--handshake-timeout",
                "7",
            ]
        )
        policy = site.config.policy
        self.assertEqual(policy.handshake_timeout, 7.0)
        self.assertEqual((policy.settings.initial_window, policy.settings.max_streams), (65536, 10))
        self.assertEqual(policy.tuning.max_window, 4 << 20)
        self.assertTrue(policy.tuning.enabled)

    def test_bad_sizes_are_usage_errors(self) -> None:
        """Sizes that are not sizes, or out of the protocol's ranges, are one-line usage errors."""
        from twisted.python import usage

        from rtunnel.cli import site_tap

        for argv, words in (
            (["--window", "lots"], "is not a size"),
            (["--window", "512"], "--window must be"),
            (["--max-frame-size", "8K"], "--max-frame-size 16K-16M"),
            (["--window", "1M", "--max-window", "512K"], "must not be smaller"),
        ):
            options = site_tap.Options()
            with self.assertRaises(usage.UsageError) as caught:
                options.parseOptions(["--state", "/tmp/y", *argv])
            self.assertIn(words, str(caught.exception))
