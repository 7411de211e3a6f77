"""
The C{rtunnel} command and replicas (issue 13): C{sites list} shows each
site's sessions per replica (a REPLICAS column, C{sessions} in --json), and
C{rtunnel replicas list} the live replicas; in process and as the real
command, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rtunnel.identity import certs
from rtunnel.identity.state import ServerState
from tests.pg_support import cluster
from tests.test_admin_cli import _ROOT, NOW, _CLITestCase


def _at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


class _ReplicaCLITestCase(_CLITestCase):
    """Sites alpha and beta enrolled, gamma with a keyfile only, in the database C{url} (None: SQLite)."""

    url: str | None = None

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.state = self.base / "server"
        self.database = () if self.url is None else ("--database", self.url)
        server = self.open_state()
        for site in ("alpha", "beta"):
            token = server.store.create_token(site, timedelta(hours=1), NOW)
            server.enroll(site, token, certs.dump_csr(certs.create_csr(certs.generate_private_key(), site)), NOW)
        server.store.create_token("gamma", timedelta(hours=1), NOW)

    def open_state(self) -> ServerState:
        server = ServerState.load_or_create(self.state, ["tunnel.example"], database=self.url)
        self.addCleanup(server.close)
        return server

    def cli(self, *argv: str, now: datetime = NOW) -> tuple[int, str, str]:
        return self.run_cli(*argv, "--state", str(self.state), *self.database, now=now)

    def two_replicas(self) -> None:
        """Replicas a (advertising its address) and b; alpha on both, beta on b."""
        store = self.open_state().store
        store.replica_started("a", "192.0.2.1:5500", 4001, "host-a", NOW)
        store.replica_started("b", "", 4002, "host-b", _at(0.5))
        store.session_opened("alpha", "a", "198.51.100.4:50000", _at(1))
        store.session_opened("alpha", "b", "198.51.100.4:50001", _at(2))
        store.session_opened("beta", "b", "198.51.100.5:50000", _at(2))
        store.replica_heartbeat("a", "192.0.2.1:5500", _at(3))
        store.replica_heartbeat("b", "", _at(2.5))


class SitesListTests(_ReplicaCLITestCase):
    def test_replicas_column(self) -> None:
        """
        REPLICAS names the replicas each site has a session with, before
        CONNECTED; "-" for none; a replica whose heartbeat stopped drops out.
        """
        self.two_replicas()
        status, out, _ = self.cli("sites", "list", now=_at(3))
        self.assertEqual(status, 0)
        header, alpha, beta, gamma = out.splitlines()
        self.assertEqual(header.split(), ["SITE", "ENROLLED", "REVOKED", "SERVICES", "REPLICAS", "CONNECTED"])
        column = header.index("REPLICAS")
        self.assertEqual(alpha[column:].split()[0], "a,b")
        self.assertIn("yes, from 198.51.100.4:50000 since 2030-01-02 03:04:06 UTC", alpha)
        self.assertEqual(beta[column:].split()[0], "b")
        self.assertEqual(gamma[column:].split(), ["-", "no"])
        # b's heartbeat is 6.5 s old: only a counts
        status, out, _ = self.cli("sites", "list", now=_at(9))
        _, alpha, beta, _ = out.splitlines()
        self.assertEqual(alpha[column:].split()[0], "a")
        self.assertEqual(beta[column:].split()[:2], ["-", "no"])

    def test_json_sessions(self) -> None:
        self.two_replicas()
        status, out, _ = self.cli("sites", "list", "--json", now=_at(3))
        self.assertEqual(status, 0)
        sites = {site["name"]: site for site in json.loads(out)}
        self.assertEqual(
            sites["alpha"]["sessions"],
            [
                {"replica": "a", "peer": "198.51.100.4:50000", "since": "2030-01-02T03:04:06+00:00"},
                {"replica": "b", "peer": "198.51.100.4:50001", "since": "2030-01-02T03:04:07+00:00"},
            ],
        )
        self.assertIs(sites["alpha"]["connected"], True)
        self.assertEqual([s["replica"] for s in sites["beta"]["sessions"]], ["b"])
        self.assertEqual(sites["gamma"]["sessions"], [])


class ReplicasListTests(_ReplicaCLITestCase):
    def test_table(self) -> None:
        self.two_replicas()
        status, out, err = self.cli("replicas", "list", now=_at(3.25))
        self.assertEqual((status, err), (0, ""))
        header, a, b = out.splitlines()
        self.assertEqual(header.split(), ["REPLICA", "ADVERTISE", "PID", "HOST", "STARTED", "LAST", "HEARTBEAT"])
        self.assertEqual(
            a.split(), ["a", "192.0.2.1:5500", "4001", "host-a", "2030-01-02", "03:04:05", "UTC", "0.2s", "ago"]
        )
        self.assertEqual(b.split()[:4], ["b", "-", "4002", "host-b"])
        self.assertTrue(b.endswith("0.8s ago"), b)
        # the columns line up
        self.assertEqual(a.index("4001"), header.index("PID"))
        self.assertEqual(b.index("0.8s"), header.index("LAST HEARTBEAT"))

    def test_json(self) -> None:
        self.two_replicas()
        status, out, _ = self.cli("replicas", "list", "--json", now=_at(3.25))
        self.assertEqual(status, 0)
        a, b = json.loads(out)
        self.assertEqual(
            a,
            {
                "replica": "a",
                "advertise": "192.0.2.1:5500",
                "pid": 4001,
                "host": "host-a",
                "started_at": "2030-01-02T03:04:05+00:00",
                "heartbeat_at": "2030-01-02T03:04:08+00:00",
                "heartbeat_age_seconds": 0.25,
            },
        )
        self.assertEqual((b["replica"], b["advertise"], b["heartbeat_age_seconds"]), ("b", None, 0.75))

    def test_none_live(self) -> None:
        """No replica (none ever, or all their heartbeats too old): said in words; [] in JSON."""
        self.assertEqual(
            self.cli("replicas", "list"),
            (0, "no tunnel server replica is running (none sent a heartbeat lately)\n", ""),
        )
        self.two_replicas()
        self.assertEqual(self.cli("replicas", "list", "--json", now=_at(10)), (0, "[]\n", ""))

    def test_errors(self) -> None:
        """A missing state or a bad option: one line on stderr and a non-zero status, as every command."""
        status, out, err = self.run_cli("replicas", "list", "--state", str(self.base / "nowhere"))
        self.assertError(status, 1, err, f"no tunnel server state at {self.base / 'nowhere'}")
        self.assertEqual(out, "")
        status, _, err = self.run_cli("replicas", "list", "--state", str(self.state), "--database", "mysql://x/y")
        self.assertError(status, 1, err, "not a database this rtunnel knows")
        status, _, err = self.run_cli("replicas", "list")
        self.assertError(status, 2, err, "--state")
        status, _, err = self.run_cli("replicas", "lst", "--state", str(self.state))
        self.assertError(status, 2, err, "invalid choice: 'lst'")


class ProcessTests(_ReplicaCLITestCase):
    """The real rtunnel command (python -m rtunnel), with the system clock."""

    def run_rtunnel(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rtunnel", *argv, "--state", str(self.state), *self.database],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(_ROOT)},
            cwd=_ROOT,
            timeout=60,
        )

    def test_real_command(self) -> None:
        now = datetime.now(UTC)
        store = self.open_state().store
        store.replica_started("host1:5500", "", os.getpid(), "host1", now)
        store.session_opened("alpha", "host1:5500", "198.51.100.4:50000", now)
        replicas = self.run_rtunnel("replicas", "list")
        self.assertEqual((replicas.returncode, replicas.stderr), (0, ""))
        header, row = replicas.stdout.splitlines()
        self.assertTrue(header.startswith("REPLICA "))
        self.assertEqual(row.split()[:4], ["host1:5500", "-", str(os.getpid()), "host1"])
        sites = self.run_rtunnel("sites", "list", "--json")
        self.assertEqual(sites.returncode, 0, sites.stderr)
        listed = {site["name"]: site["sessions"] for site in json.loads(sites.stdout)}
        self.assertEqual([s["replica"] for s in listed["alpha"]], ["host1:5500"])
        self.assertEqual(listed["beta"], [])
        failed = self.run_rtunnel("replicas", "list", "--bogus")
        self.assertEqual(failed.returncode, 2)
        self.assertEqual(failed.stdout, "")
        self.assertTrue(failed.stderr.startswith("rtunnel: error: unrecognized arguments: --bogus"), failed.stderr)


class _OnPostgreSQL(_ReplicaCLITestCase):
    """The state's database on a fresh PostgreSQL database, named by --database."""

    def setUp(self) -> None:
        pg = cluster()
        name = pg.new_database()
        self.addCleanup(pg.drop_database, name)
        self.url = pg.url(name)
        super().setUp()


class PostgreSQLSitesListTests(_OnPostgreSQL, SitesListTests):
    pass


class PostgreSQLReplicasListTests(_OnPostgreSQL, ReplicasListTests):
    pass


class PostgreSQLProcessTests(_OnPostgreSQL, ProcessTests):
    pass
