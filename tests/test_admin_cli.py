"""
Tests for the C{rtunnel} admin command (L{rtunnel.cli.admin.main}), run
in-process against temporary state directories, plus one real
C{python -m rtunnel} process.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rtunnel.cli.admin import main, parse_duration
from rtunnel.identity import certs
from rtunnel.identity.errors import SiteRejected
from rtunnel.identity.keyfile import read_keyfile
from rtunnel.identity.state import ServerState
from tests.helpers_identity import TestCase

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
_ROOT = Path(__file__).resolve().parent.parent


class _CLITestCase(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.state = self.base / "server"
        server = ServerState.load_or_create(self.state, ["tunnel.example", "192.0.2.1"])
        server.close()

    def run_cli(self, *argv: str, now: datetime = NOW) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), stdout=out, stderr=err, now=now)
        return status, out.getvalue(), err.getvalue()

    def assertError(self, status: int, expected_status: int, err: str, fragment: str) -> None:
        """
        An error is exactly one line, prefixed, with no traceback.
        """
        self.assertEqual(status, expected_status)
        self.assertTrue(err.startswith("rtunnel: error: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertIn(fragment, err)

    def open_state(self) -> ServerState:
        server = ServerState.open_existing(self.state)
        self.addCleanup(server.close)
        return server

    def create_keyfile(self, site: str = "alpha", *extra: str) -> Path:
        output = self.base / f"{site}-{len(list(self.base.iterdir()))}.rtkey"
        status, _, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            site,
            "--output",
            str(output),
            *extra,
        )
        self.assertEqual((status, err), (0, ""))
        return output

    def enroll(self, site: str = "alpha") -> str:
        """
        Enroll C{site} through a keyfile, as the server would; return the
        certificate fingerprint.
        """
        keyfile = read_keyfile(self.create_keyfile(site))
        server = self.open_state()
        key = certs.generate_private_key()
        pem = server.enroll(site, keyfile.token, certs.dump_csr(certs.create_csr(key, site)), NOW)
        return certs.fingerprint(certs.load_certificate(pem))


class KeyfileCreateTests(_CLITestCase):
    def test_creates_keyfile(self) -> None:
        """
        keyfile create writes a 0600 keyfile for the site with the server's
        public addresses on port 5500, its CA and a token the server accepts
        for 24 hours; it says what it wrote and when the token expires.
        """
        output = self.base / "alpha.rtkey"
        status, out, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            "alpha",
            "--output",
            str(output),
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(stat.S_IMODE(output.stat().st_mode), 0o600)
        keyfile = read_keyfile(output)
        server = self.open_state()
        self.assertEqual(keyfile.site, "alpha")
        self.assertEqual(keyfile.addresses, ("tunnel.example:5500", "192.0.2.1:5500"))
        self.assertEqual(keyfile.server_name, "tunnel.example")
        self.assertEqual(keyfile.ca_certificate_pem, certs.dump_certificate(server.ca_certificate))
        self.assertEqual(keyfile.expires, NOW + timedelta(hours=24))
        self.assertIn(str(output), out)
        self.assertIn("2030-01-03 03:04:05 UTC", out)
        self.assertNotIn(keyfile.token, out)
        key = certs.generate_private_key()
        csr = certs.dump_csr(certs.create_csr(key, "alpha"))
        server.enroll("alpha", keyfile.token, csr, NOW + timedelta(hours=23))

    def test_expiry_and_addresses(self) -> None:
        """
        --expires sets the token lifetime; --address (repeatable, IPv6 in
        brackets) replaces the default addresses, the first host being the
        name the site verifies.
        """
        output = self.create_keyfile(
            "alpha", "--expires", "30m", "--address", "192.0.2.1:443", "--address", "tunnel.example"
        )
        keyfile = read_keyfile(output)
        self.assertEqual(keyfile.expires, NOW + timedelta(minutes=30))
        self.assertEqual(keyfile.addresses, ("192.0.2.1:443", "tunnel.example:5500"))
        self.assertEqual(keyfile.server_name, "192.0.2.1")

    def test_address_not_covered_by_server_certificate(self) -> None:
        """
        An address whose host the server certificate lacks is refused with
        advice to restart the server with --public-address; no keyfile and
        no token are left behind.
        """
        output = self.base / "alpha.rtkey"
        status, _, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            "alpha",
            "--output",
            str(output),
            "--address",
            "[2001:db8::7]:5500",
        )
        self.assertError(status, 1, err, "--public-address 2001:db8::7")
        self.assertFalse(output.exists())
        self.assertEqual(self.open_state().store.list_sites(), [])

    def test_refuses_to_overwrite(self) -> None:
        """
        An existing output file is never replaced, and no token is created.
        """
        output = self.base / "alpha.rtkey"
        output.write_text("precious")
        status, _, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            "alpha",
            "--output",
            str(output),
        )
        self.assertError(status, 1, err, "refusing to overwrite")
        self.assertEqual(output.read_text(), "precious")
        self.assertEqual(self.open_state().store.list_sites(), [])

    def test_unwritable_output_withdraws_token(self) -> None:
        """
        If the keyfile cannot be written, the token created for it is
        withdrawn.
        """
        status, _, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            "alpha",
            "--output",
            str(self.base / "missing-dir" / "alpha.rtkey"),
        )
        self.assertError(status, 1, err, "cannot create keyfile")
        self.assertEqual(self.open_state().store.list_sites(), [])

    def test_usage_errors(self) -> None:
        """
        A bad site name, a bad duration, a bad address or a missing option is
        a usage error (status 2), one line naming the problem.
        """
        base = ["keyfile", "create", "--state", str(self.state), "--output", str(self.base / "k")]
        for argv, fragment in [
            (base + ["--site", "Alpha"], "upper-case letters"),
            (base + ["--site", "alpha", "--expires", "3x"], "invalid duration '3x'"),
            (base + ["--site", "alpha", "--expires", "0h"], "longer than zero"),
            (base + ["--site", "alpha", "--address", "[::1"], "'[' without ']'"),
            (["keyfile", "create", "--site", "alpha"], "--state"),
            (["keyfile"], "ACTION"),
            ([], "COMMAND"),
            (["bogus"], "invalid choice"),
        ]:
            status, _, err = self.run_cli(*argv)
            self.assertError(status, 2, err, fragment)

    def test_missing_state(self) -> None:
        """
        A state directory that does not exist is a runtime error telling to
        start the server first.
        """
        status, _, err = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.base / "nowhere"),
            "--site",
            "alpha",
            "--output",
            str(self.base / "k"),
        )
        self.assertError(status, 1, err, "start the tunnel server")

    def test_works_while_server_holds_the_database(self) -> None:
        """
        A keyfile can be created while a server process has the database
        open (and has written to it).
        """
        server = ServerState.load_or_create(self.state, ["tunnel.example"])
        self.addCleanup(server.close)
        server.store.record_server_start(os.getpid(), NOW)
        keyfile = read_keyfile(self.create_keyfile("alpha"))
        key = certs.generate_private_key()
        server.enroll("alpha", keyfile.token, certs.dump_csr(certs.create_csr(key, "alpha")), NOW)

    def test_note_when_site_is_enrolled(self) -> None:
        """
        Creating a keyfile for an enrolled site says that it will replace the
        site's certificate.
        """
        self.enroll("alpha")
        status, out, _ = self.run_cli(
            "keyfile",
            "create",
            "--state",
            str(self.state),
            "--site",
            "alpha",
            "--output",
            str(self.base / "again.rtkey"),
        )
        self.assertEqual(status, 0)
        self.assertIn("replaces its certificate", out)


class SitesTests(_CLITestCase):
    def sites_json(self) -> list[dict[str, Any]]:
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state), "--json")
        self.assertEqual(status, 0)
        # No server answers here: at most the one line saying the listing has no live figures.
        self.assertIn(err.count("\n"), (0, 1), err)
        self.assertTrue(err == "" or err.startswith("rtunnel: no live figures: "), err)
        result = json.loads(out)
        self.assertIsInstance(result, list)
        return result

    def test_empty_list(self) -> None:
        """
        With no sites the listing says so; the JSON form is an empty array.
        """
        status, out, _ = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual(status, 0)
        self.assertIn("no sites yet", out)
        self.assertEqual(self.sites_json(), [])

    def test_table(self) -> None:
        """
        The table shows each site with when it enrolled, whether it is
        revoked, and whether (from where, since when) it is connected; a
        site with only a keyfile shows as pending.
        """
        self.enroll("alpha")
        self.create_keyfile("beta")
        server = self.open_state()
        server.store.record_server_start(os.getpid(), NOW)
        server.store.mark_connected("alpha", "198.51.100.4:50000", NOW + timedelta(minutes=1))
        status, out, _ = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual(status, 0)
        header, alpha, beta = out.splitlines()
        self.assertEqual(header.split(), ["SITE", "ENROLLED", "REVOKED", "SERVICES", "REPLICAS", "CONNECTED"])
        self.assertTrue(alpha.startswith("alpha "))
        self.assertIn("2030-01-02 03:04:05 UTC", alpha)
        self.assertIn("yes, from 198.51.100.4:50000 since 2030-01-02 03:05:05 UTC", alpha)
        self.assertTrue(beta.startswith("beta "))
        self.assertIn("pending (token expires 2030-01-03 03:04:05 UTC)", beta)
        self.assertTrue(beta.endswith("no"))

    def test_json(self) -> None:
        """
        --json gives one object per site with name (str), connected (bool),
        enrolled_at, revoked and peer.
        """
        fingerprint = self.enroll("alpha")
        server = self.open_state()
        server.store.record_server_start(os.getpid(), NOW)
        server.store.mark_connected("alpha", "198.51.100.4:50000", NOW)
        [alpha] = self.sites_json()
        self.assertEqual(alpha["name"], "alpha")
        self.assertIs(alpha["connected"], True)
        self.assertEqual(alpha["peer"], "198.51.100.4:50000")
        self.assertEqual(alpha["enrolled_at"], "2030-01-02T03:04:05+00:00")
        self.assertIs(alpha["revoked"], False)
        self.assertIsNone(alpha["revoked_at"])
        self.assertEqual(alpha["certificate_fingerprint"], fingerprint)

    def test_dead_server_shows_nothing_connected(self) -> None:
        """
        Connection flags left by a server that is no longer running are not
        reported.
        """
        self.enroll("alpha")
        server = self.open_state()
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        server.store.record_server_start(child.pid, NOW)
        server.store.mark_connected("alpha", "198.51.100.4:50000", NOW)
        [alpha] = self.sites_json()
        self.assertIs(alpha["connected"], False)
        self.assertIsNone(alpha["peer"])

    def test_revoke(self) -> None:
        """
        sites revoke marks the site revoked (the server then refuses it);
        revoking again reports the original time.
        """
        fingerprint = self.enroll("alpha")
        status, out, err = self.run_cli("sites", "revoke", "alpha", "--state", str(self.state))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("revoked site 'alpha'", out)
        [alpha] = self.sites_json()
        self.assertIs(alpha["revoked"], True)
        self.assertEqual(alpha["revoked_at"], "2030-01-02T03:04:05+00:00")
        error = self.assertRaises(SiteRejected, self.open_state().store.check_site, "alpha", fingerprint)
        self.assertEqual(error.code, "site-revoked")
        status, out, _ = self.run_cli(
            "sites", "revoke", "alpha", "--state", str(self.state), now=NOW + timedelta(hours=1)
        )
        self.assertEqual(status, 0)
        self.assertIn("already revoked at 2030-01-02 03:04:05 UTC", out)

    def test_revoke_unknown_site(self) -> None:
        """
        Revoking an unknown site is a runtime error naming it.
        """
        status, _, err = self.run_cli("sites", "revoke", "ghost", "--state", str(self.state))
        self.assertError(status, 1, err, "no site named 'ghost'")

    def test_damaged_database(self) -> None:
        """
        A damaged state database is one clear error line, and is left as it
        is.
        """
        for suffix in ("", "-wal", "-shm"):
            path = self.state / f"state.sqlite3{suffix}"
            if path.exists():
                path.unlink()
        (self.state / "state.sqlite3").write_bytes(b"garbage" * 1000)
        status, _, err = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertError(status, 1, err, "state.sqlite3")
        self.assertEqual((self.state / "state.sqlite3").read_bytes(), b"garbage" * 1000)

    def test_help(self) -> None:
        """
        --help prints usage to stdout and succeeds.
        """
        status, out, err = self.run_cli("sites", "list", "--help")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("usage: rtunnel sites list", out)


class DurationTests(TestCase):
    def test_units(self) -> None:
        """
        Durations combine numbers with s, m, h, d and w.
        """
        self.assertEqual(parse_duration("30m"), timedelta(minutes=30))
        self.assertEqual(parse_duration("24h"), timedelta(hours=24))
        self.assertEqual(parse_duration("7d"), timedelta(days=7))
        self.assertEqual(parse_duration("1d12h"), timedelta(hours=36))
        self.assertEqual(parse_duration("2W"), timedelta(weeks=2))

    def test_invalid(self) -> None:
        """
        Missing units, unknown units, zero and more than a year are refused.
        """
        for text in ("30", "3x", "h", "", "0m", "400d", "-1h"):
            self.assertRaises(ValueError, parse_duration, text)


class ProcessTests(TestCase):
    def test_python_m_rtunnel(self) -> None:
        """
        C{python -m rtunnel} is the admin command: a runtime error exits 1
        with one stderr line and no traceback; a usage error exits 2.
        """
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        missing = str(Path(self.mktemp()) / "nowhere")
        result = subprocess.run(
            [sys.executable, "-m", "rtunnel", "sites", "list", "--state", missing],
            capture_output=True,
            text=True,
            env=env,
            cwd=_ROOT,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertTrue(result.stderr.startswith("rtunnel: error: no tunnel server state at"))
        usage = subprocess.run(
            [sys.executable, "-m", "rtunnel", "sites"],
            capture_output=True,
            text=True,
            env=env,
            cwd=_ROOT,
            timeout=60,
        )
        self.assertEqual(usage.returncode, 2)
        self.assertTrue(usage.stderr.startswith("rtunnel: error: "))
        self.assertNotIn("Traceback", usage.stderr)
