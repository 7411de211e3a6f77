"""
Tests for C{rtunnel forwards add/remove/list}, in-process against temporary
state directories (the running server is played by recording its start and
its forwards' states in the database, as it does).
"""

from __future__ import annotations

import json
import os

from rtunnel.identity.store import SOURCE_COMMAND_LINE, SOURCE_DATABASE, ForwardState
from tests.test_admin_cli import NOW, _CLITestCase


class ForwardsCommandTests(_CLITestCase):
    def forwards(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli("forwards", *argv, "--state", str(self.state))

    def server_running(self, *command_line: ForwardState) -> None:
        """Record a running server (this process) and its command-line forwards."""
        store = self.open_state().store
        store.record_server_start(os.getpid(), NOW)
        store.reset_forward_states(list(command_line), NOW)

    def test_add_list_remove(self) -> None:
        self.enroll("alpha")
        status, out, err = self.forwards("add", "8080:alpha:10.0.0.5:80")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("added forward 127.0.0.1:8080:alpha:10.0.0.5:80", out)
        self.assertNotIn("does not exist", out)
        status, out, _ = self.forwards("list")
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines()[:2],
            [
                "FORWARD                           SOURCE    STATE",
                "127.0.0.1:8080:alpha:10.0.0.5:80  database  not running",
            ],
        )
        status, out, err = self.forwards("remove", "8080")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("removed forward 127.0.0.1:8080:alpha:10.0.0.5:80", out)
        self.assertEqual(json.loads(self.forwards("list", "--json")[1]), [])

    def test_json_fields(self) -> None:
        self.server_running(ForwardState("127.0.0.1", 9090, "beta", "h", 2, SOURCE_COMMAND_LINE, "listening"))
        self.forwards("add", "[::1]:8080:alpha:[fe80::1]:80")
        status, out, _ = self.forwards("list", "--json")
        self.assertEqual(status, 0)
        self.assertEqual(
            json.loads(out),
            [
                {
                    "spec": "[::1]:8080:alpha:[fe80::1]:80",
                    "bind": "::1",
                    "port": 8080,
                    "site": "alpha",
                    "host": "fe80::1",
                    "hostport": 80,
                    "source": SOURCE_DATABASE,
                    "state": "pending",
                },
                {
                    "spec": "127.0.0.1:9090:beta:h:2",
                    "bind": "127.0.0.1",
                    "port": 9090,
                    "site": "beta",
                    "host": "h",
                    "hostport": 2,
                    "source": SOURCE_COMMAND_LINE,
                    "state": "listening",
                },
            ],
        )

    def test_a_site_that_does_not_exist_yet_is_allowed_with_a_note(self) -> None:
        status, out, err = self.forwards("add", "8080:later:h:1")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("note: site 'later' does not exist yet", out)

    def test_conflict_with_the_running_servers_command_line_names_both(self) -> None:
        self.server_running(ForwardState("127.0.0.1", 8080, "alpha", "h", 1, SOURCE_COMMAND_LINE, "listening"))
        status, _, err = self.forwards("add", "8080:beta:h:2")
        self.assertError(status, 1, err, "--forward 127.0.0.1:8080:alpha:h:1")
        self.assertIn("127.0.0.1:8080:beta:h:2", err)
        status, _, err = self.forwards("remove", "8080")
        self.assertError(status, 1, err, "command-line forward --forward 127.0.0.1:8080:alpha:h:1")

    def test_remove_with_a_running_server_says_what_happens_to_connections(self) -> None:
        self.server_running()
        self.forwards("add", "8080:alpha:h:1")
        status, out, _ = self.forwards("remove", "127.0.0.1:8080")
        self.assertEqual(status, 0)
        self.assertIn("connections open through it go on until they end", out)
        self.forwards("add", "8081:alpha:h:1")
        status, out, _ = self.forwards("remove", "8081", "--cut")
        self.assertEqual(status, 0)
        self.assertIn("closes its listener and the connections open through it", out)

    def test_bad_input(self) -> None:
        """Every bad input: one line on stderr and a non-zero status."""
        cases = [
            (("add", "8080:alpha:h"), 2, "expected [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT"),
            (("add", "70000:alpha:h:1"), 2, "listening port"),
            (("add", "8080:Alpha:h:1"), 2, "upper-case"),
            (("add", "8080:alpha:h:0"), 2, "target"),
            (("add", "b@d:8080:alpha:h:1"), 2, "bind address"),
            (("remove", "8080"), 1, "no forward on 127.0.0.1:8080"),
            (("remove", "a:b:c"), 2, "expected [BIND_ADDRESS:]PORT"),
            (("remove", "x"), 2, "listening port"),
        ]
        for argv, expected, fragment in cases:
            with self.subTest(argv=argv):
                status, out, err = self.forwards(*argv)
                self.assertError(status, expected, err, fragment)
                self.assertEqual(out, "")
        self.forwards("add", "8080:alpha:h:1")
        status, _, err = self.forwards("add", "127.0.0.1:8080:beta:h:1")
        self.assertError(status, 1, err, "stored already: 127.0.0.1:8080:alpha:h:1")

    def test_missing_state_directory(self) -> None:
        status, _, err = self.run_cli("forwards", "list", "--state", str(self.base / "nowhere"))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("rtunnel: error: "))
