"""
The taps take their defaults from the config classes (one source): with no
option but --state, each twistd plugin builds exactly the default config, and
its --help shows the defaults the config classes hold.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.cli import server_tap, site_tap
from rtunnel.cli.options import default, size_text
from rtunnel.roles.server import ServerPolicy
from rtunnel.roles.site import SitePolicy
from rtunnel.services import ServerConfig, SiteConfig


class DefaultsTests(SynchronousTestCase):
    def test_server_tap_builds_the_default_config(self) -> None:
        """No option but --state: the config is ServerConfig's own default, field for field."""
        options = server_tap.Options()
        options.parseOptions(["--state", "/nonexistent/state"])
        self.assertEqual(options.config, ServerConfig(state_dir="/nonexistent/state"))

    def test_site_tap_builds_the_default_config(self) -> None:
        """No option but --state: the config is SiteConfig's own default, field for field."""
        options = site_tap.Options()
        options.parseOptions(["--state", "/nonexistent/state"])
        self.assertEqual(options.config, SiteConfig(state_dir="/nonexistent/state"))

    def test_help_shows_the_config_defaults(self) -> None:
        """--help text states the defaults held by the config classes."""
        server = str(server_tap.Options())
        self.assertIn(f"[default: {ServerPolicy().max_preauth}]", server)
        self.assertIn("[default: 5]", server)  # --open-timeout
        site = str(site_tap.Options())
        self.assertIn(f"[default: {SitePolicy().retry_cap:g}]", site)
        self.assertIn("[default: 256K]", site)

    def test_default_and_size_text(self) -> None:
        """Floats print as the option is written (5, not 5.0); sizes in the largest exact unit."""
        self.assertEqual(default(ServerConfig, "open_timeout"), "5")
        self.assertEqual(default(ServerPolicy, "max_preauth"), "4096")
        self.assertEqual(size_text(256 * 1024), "256K")
        self.assertEqual(size_text(16 * 1024 * 1024), "16M")
        self.assertEqual(size_text(1000), "1000")
