"""
Tests for L{rtunnel.identity.state}: the server and site state directories.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from datetime import timedelta
from pathlib import Path

from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath

from rtunnel.identity import certs, state
from rtunnel.identity.errors import CertificateError, EnrollmentRefused, StateError
from rtunnel.identity.keyfile import Keyfile
from rtunnel.identity.state import ServerState, SiteState, default_public_addresses
from tests.helpers_identity import NOW, Authority, TestCase


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class ServerStateTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())

    def load(self, *addresses: str) -> ServerState:
        server = ServerState.load_or_create(self.directory, addresses)
        self.addCleanup(server.close)
        return server

    def test_first_start_creates_private_state(self) -> None:
        """
        The first start creates the directory (0700), both keys (0600), both
        certificates and the database (0600); the server certificate is
        issued by the CA for the public addresses.
        """
        server = self.load("tunnel.example", "192.0.2.1:5500")
        self.assertEqual(_mode(self.directory), 0o700)
        for name in ("ca.key", "server.key", "state.sqlite3"):
            self.assertEqual(_mode(self.directory / name), 0o600, name)
        for name in ("ca.crt", "server.crt"):
            self.assertTrue((self.directory / name).is_file())
        certs.verify_issued_by(server.server_certificate, server.ca_certificate)
        self.assertEqual(server.server_names, ["tunnel.example", "192.0.2.1"])
        self.assertEqual(server.public_addresses, ["tunnel.example", "192.0.2.1"])
        self.assertIsInstance(server.directory, FilePath)

    def test_accepts_filepath(self) -> None:
        """
        The state directory may be given as a FilePath.
        """
        server = ServerState.load_or_create(FilePath(str(self.directory)), ["h.example"])
        self.addCleanup(server.close)
        self.assertTrue((self.directory / "ca.crt").exists())

    def test_restart_reuses_state(self) -> None:
        """
        A later start loads the same CA, key and certificate.
        """
        first = self.load("tunnel.example")
        second = self.load("tunnel.example")
        self.assertEqual(second.ca_certificate, first.ca_certificate)
        self.assertEqual(second.server_certificate, first.server_certificate)
        self.assertTrue(certs.key_matches_certificate(second.ca_key, first.ca_certificate))

    def test_new_public_address_reissues_server_certificate(self) -> None:
        """
        A public address the server certificate does not cover gets a new
        server certificate from the same CA and key, still covering the old
        names; enrolled sites are unaffected; the re-issue is logged.
        """
        first = self.load("tunnel.example")
        token = first.store.create_token("alpha", timedelta(hours=1), NOW)
        key = certs.generate_private_key()
        first.enroll("alpha", token, certs.dump_csr(certs.create_csr(key, "alpha")), NOW)
        with capturedLogs() as events:
            second = self.load("new.example")
        self.assertEqual(second.server_names, ["tunnel.example", "new.example"])
        self.assertNotEqual(second.server_certificate, first.server_certificate)
        self.assertEqual(second.ca_certificate, first.ca_certificate)
        self.assertTrue(certs.key_matches_certificate(first.server_key, second.server_certificate))
        certs.verify_issued_by(second.server_certificate, first.ca_certificate)
        self.assertEqual(
            certs.load_certificate((self.directory / "server.crt").read_bytes()),
            second.server_certificate,
        )
        [record] = second.store.list_sites()
        self.assertTrue(record.enrolled)
        self.assertEqual(second.public_addresses, ["new.example"])
        [event] = [e for e in events if "re-issued" in e["log_format"]]
        self.assertEqual(event["added"], "new.example")

    def test_default_public_addresses(self) -> None:
        """
        Without public addresses the certificate covers localhost, 127.0.0.1,
        ::1 and the host's FQDN.
        """
        self.patch(socket, "getfqdn", lambda: "Host.Example.")
        self.assertEqual(default_public_addresses(), ["localhost", "127.0.0.1", "::1", "host.example"])
        server = self.load()
        self.assertEqual(server.server_names, ["localhost", "127.0.0.1", "::1", "host.example"])

    def test_invalid_public_address(self) -> None:
        """
        An unparsable public address is a StateError naming it, and creates
        nothing.
        """
        error = self.assertRaises(StateError, ServerState.load_or_create, self.directory, ["bad host"])
        self.assertIn("invalid public address", str(error))
        self.assertFalse(self.directory.exists())

    def test_partial_state_is_refused(self) -> None:
        """
        A directory with only some state files is refused, naming the missing
        ones, and nothing is created over it.
        """
        self.load("tunnel.example").close()
        (self.directory / "state.sqlite3").unlink()
        (self.directory / "server.key").unlink()
        error = self.assertRaises(StateError, ServerState.load_or_create, self.directory, ["tunnel.example"])
        self.assertIn("incomplete", str(error))
        self.assertIn("server.key, state.sqlite3 missing", str(error))
        self.assertFalse((self.directory / "server.key").exists())

    def test_damaged_certificate_is_refused(self) -> None:
        """
        A garbled ca.crt is a StateError naming the file; it is left alone.
        """
        self.load("tunnel.example").close()
        (self.directory / "ca.crt").write_text("garbage")
        error = self.assertRaises(StateError, ServerState.load_or_create, self.directory, ["tunnel.example"])
        self.assertIn("ca.crt", str(error))
        self.assertIn("not a PEM certificate", str(error))
        self.assertEqual((self.directory / "ca.crt").read_text(), "garbage")

    def test_damaged_key_is_refused(self) -> None:
        """
        A garbled server.key is a StateError naming the file.
        """
        self.load("tunnel.example").close()
        (self.directory / "server.key").write_text("garbage")
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("server.key", str(error))

    def test_empty_file_is_refused(self) -> None:
        """
        An empty ca.key (a crash while writing, a full disk) is reported as
        empty.
        """
        self.load("tunnel.example").close()
        (self.directory / "ca.key").write_text("")
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("ca.key is empty", str(error))

    def test_mismatched_key_is_refused(self) -> None:
        """
        A server key that does not match the server certificate is refused.
        """
        self.load("tunnel.example").close()
        (self.directory / "server.key").write_bytes(certs.dump_private_key(certs.generate_private_key()))
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("server.key does not match server.crt", str(error))

    def test_server_certificate_from_another_ca_is_refused(self) -> None:
        """
        A server certificate not issued by ca.crt is refused.
        """
        self.load("tunnel.example").close()
        other = Authority.create()
        (self.directory / "server.key").write_bytes(certs.dump_private_key(other.server_key))
        (self.directory / "server.crt").write_text(certs.dump_certificate(other.server_certificate))
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("was not issued by ca.crt", str(error))

    def test_damaged_database_is_refused(self) -> None:
        """
        A state.sqlite3 that is not a database is a StateError naming it.
        """
        self.load("tunnel.example").close()
        for suffix in ("", "-wal", "-shm"):
            path = self.directory / f"state.sqlite3{suffix}"
            if path.exists():
                path.unlink()
        (self.directory / "state.sqlite3").write_bytes(b"not sqlite" * 500)
        error = self.assertRaises(StateError, ServerState.load_or_create, self.directory, ["tunnel.example"])
        self.assertIn("state.sqlite3", str(error))

    def test_state_path_is_a_file(self) -> None:
        """
        A regular file where the directory should be is refused.
        """
        self.directory.write_text("x")
        error = self.assertRaises(StateError, ServerState.load_or_create, self.directory)
        self.assertIn("not a directory", str(error))

    def test_open_existing_requires_state(self) -> None:
        """
        The CLI's open_existing never creates state; without it, the error
        says to start the server first.
        """
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("start the tunnel server", str(error))
        self.assertFalse(self.directory.exists())
        self.directory.mkdir()
        error = self.assertRaises(StateError, ServerState.open_existing, self.directory)
        self.assertIn("not a complete tunnel server state directory", str(error))

    def test_open_existing_does_not_reissue(self) -> None:
        """
        open_existing loads the state as it is.
        """
        created = self.load("tunnel.example")
        opened = ServerState.open_existing(self.directory)
        self.addCleanup(opened.close)
        self.assertEqual(opened.server_certificate, created.server_certificate)
        self.assertEqual(opened.public_addresses, ["tunnel.example"])

    def test_loose_key_permissions_are_warned_about(self) -> None:
        """
        A private key readable by others is used, with a warning naming it.
        """
        self.load("tunnel.example").close()
        os.chmod(self.directory / "ca.key", 0o644)
        with capturedLogs() as events:
            self.load("tunnel.example")
        [event] = [e for e in events if "accessible to other users" in e["log_format"]]
        self.assertTrue(event["path"].endswith("ca.key"))

    def test_enroll_checks_the_request(self) -> None:
        """
        enroll refuses an invalid site name (bad-request) and a CSR that is
        garbage or for another site (csr-invalid) before looking at the
        token; a good request returns a certificate for the site.
        """
        server = self.load("tunnel.example")
        token = server.store.create_token("alpha", timedelta(hours=1), NOW)
        key = certs.generate_private_key()
        good = certs.dump_csr(certs.create_csr(key, "alpha"))
        wrong = certs.dump_csr(certs.create_csr(key, "beta"))
        for site, csr, code in [
            ("Alpha", good, "bad-request"),
            ("alpha", "garbage", "csr-invalid"),
            ("alpha", wrong, "csr-invalid"),
        ]:
            error = self.assertRaises(EnrollmentRefused, server.enroll, site, token, csr, NOW)
            self.assertEqual(error.code, code)
        pem = server.enroll("alpha", token, good, NOW)
        cert = certs.load_certificate(pem)
        self.assertEqual(certs.site_name_of(cert), "alpha")
        self.assertTrue(certs.key_matches_certificate(key, cert))
        certs.verify_issued_by(cert, server.ca_certificate)


class SiteStateTests(TestCase):
    def setUp(self) -> None:
        self.server_dir = Path(self.mktemp())
        self.server = ServerState.load_or_create(self.server_dir, ["tunnel.example"])
        self.addCleanup(self.server.close)
        self.directory = Path(self.mktemp())

    def keyfile(self, site: str = "alpha") -> Keyfile:
        token = self.server.store.create_token(site, timedelta(hours=1), NOW)
        return Keyfile(
            site=site,
            addresses=("tunnel.example:5500",),
            server_name="tunnel.example",
            ca_certificate_pem=certs.dump_certificate(self.server.ca_certificate),
            token=token,
            expires=NOW + timedelta(hours=1),
        )

    def enroll(self, site_state: SiteState, keyfile: Keyfile) -> str:
        csr = site_state.enrollment_request(keyfile.site, keyfile.token_digest)
        pem = self.server.enroll(keyfile.site, keyfile.token, csr, NOW)
        site_state.complete_enrollment(keyfile, pem, NOW)
        return pem

    def test_load_creates_private_directory(self) -> None:
        """
        Loading a missing site directory creates it with mode 0700, not
        enrolled.
        """
        site = SiteState.load(self.directory)
        self.assertEqual(_mode(self.directory), 0o700)
        self.assertFalse(site.is_enrolled)
        self.assertTrue(site.needs_enrollment(None))
        self.assertIsNone(site.site_name)

    def test_pending_key_is_private_and_reused(self) -> None:
        """
        The enrollment key is written 0600 and reused by a retry with the
        same keyfile, so both requests are over the same public key.
        """
        site = SiteState.load(self.directory)
        keyfile = self.keyfile()
        first = certs.load_csr(site.enrollment_request("alpha", keyfile.token_digest))
        [pending] = self.directory.glob("pending-*.key")
        self.assertEqual(pending.name, f"pending-{keyfile.token_digest[:16]}.key")
        self.assertEqual(_mode(pending), 0o600)
        second = certs.load_csr(SiteState.load(self.directory).enrollment_request("alpha", keyfile.token_digest))
        self.assertEqual(certs.public_key_fingerprint(first), certs.public_key_fingerprint(second))

    def test_a_new_keyfile_never_reuses_a_pending_key(self) -> None:
        """
        A pending key left by an enrollment with another keyfile, or planted
        (also under the old name pending.key), is deleted, never certified:
        the new keyfile's request is over a fresh key.
        """
        site = SiteState.load(self.directory)
        planted = certs.generate_private_key()
        (self.directory / "pending.key").write_bytes(certs.dump_private_key(planted))
        earlier = self.keyfile()
        earlier_csr = certs.load_csr(site.enrollment_request("alpha", earlier.token_digest))
        keyfile = self.keyfile()
        csr = certs.load_csr(site.enrollment_request("alpha", keyfile.token_digest))
        fingerprints = {certs.public_key_fingerprint(planted), certs.public_key_fingerprint(earlier_csr)}
        self.assertNotIn(certs.public_key_fingerprint(csr), fingerprints)
        self.assertEqual(
            [p.name for p in self.directory.glob("pending*.key")], [f"pending-{keyfile.token_digest[:16]}.key"]
        )

    def test_state_directory_writable_by_others_is_refused(self) -> None:
        """
        As OpenSSH's StrictModes does, a state directory that its group or
        anyone can write is refused (a key planted there would be
        certified); one that others can only read is used, with a warning.
        """
        for mode, refused in ((0o770, True), (0o703, True), (0o722, True), (0o750, False), (0o755, False)):
            directory = Path(self.mktemp())
            directory.mkdir()
            directory.chmod(mode)
            if refused:
                error = self.assertRaises(StateError, SiteState.load, directory)
                self.assertIn("refusing to use it", str(error))
                self.assertIn(f"mode {mode:o}", str(error))
                error = self.assertRaises(StateError, ServerState.load_or_create, directory, ["tunnel.example"])
                self.assertIn("writable by", str(error))
            else:
                SiteState.load(directory)

    def test_state_directory_owned_by_another_user_is_refused(self) -> None:
        """A state directory owned by someone else (neither us nor root) is refused."""
        if os.geteuid() != 0:
            self.skipTest("only root can give a directory to another user")
        directory = Path(self.mktemp())
        directory.mkdir(mode=0o700)
        os.chown(directory, 4242, 4242)
        error = self.assertRaises(StateError, SiteState.load, directory)
        self.assertIn("owned by user id 4242", str(error))

    def test_enrollment_is_stored_and_reloaded(self) -> None:
        """
        After enrollment the directory holds site.key (0600), site.crt, the
        pinned ca.crt and site.json; a reload gives the same identity.
        """
        keyfile = self.keyfile()
        site = SiteState.load(self.directory)
        pem = self.enroll(site, keyfile)
        self.assertTrue(site.is_enrolled)
        self.assertEqual(list(self.directory.glob("pending*.key")), [])
        self.assertEqual(_mode(self.directory / "site.key"), 0o600)
        info = json.loads((self.directory / "site.json").read_text())
        self.assertEqual(info["site"], "alpha")
        self.assertEqual(info["addresses"], ["tunnel.example:5500"])
        self.assertEqual(info["server_name"], "tunnel.example")
        self.assertEqual(info["token_sha256"], keyfile.token_digest)
        self.assertNotIn(keyfile.token, (self.directory / "site.json").read_text())

        again = SiteState.load(self.directory)
        self.assertTrue(again.is_enrolled)
        self.assertEqual(again.certificate, certs.load_certificate(pem))
        assert again.private_key is not None and again.certificate is not None
        self.assertTrue(certs.key_matches_certificate(again.private_key, again.certificate))
        self.assertEqual(again.ca_certificate_pem, keyfile.ca_certificate_pem)
        self.assertEqual(again.site_name, "alpha")
        self.assertEqual(again.server_name, "tunnel.example")
        self.assertEqual(again.addresses, ("tunnel.example:5500",))

    def test_same_keyfile_does_not_reenroll_new_one_does(self) -> None:
        """
        A restart with the keyfile it enrolled with (or none) needs no
        enrollment; a keyfile with a new token does.
        """
        keyfile = self.keyfile()
        site = SiteState.load(self.directory)
        self.enroll(site, keyfile)
        self.assertFalse(site.needs_enrollment(keyfile))
        self.assertFalse(site.needs_enrollment(None))
        self.assertTrue(site.needs_enrollment(self.keyfile()))

    def test_reenrollment_uses_a_fresh_key(self) -> None:
        """
        Each enrollment certifies a new key: a key that leaked before is
        worthless afterwards.
        """
        site = SiteState.load(self.directory)
        self.enroll(site, self.keyfile())
        old_key = site.private_key
        assert old_key is not None
        self.enroll(site, self.keyfile())
        assert site.private_key is not None
        self.assertNotEqual(certs.public_key_fingerprint(old_key), certs.public_key_fingerprint(site.private_key))

    def test_certificate_from_another_ca_is_refused(self) -> None:
        """
        A certificate not issued by the keyfile's CA is not stored.
        """
        keyfile = self.keyfile()
        site = SiteState.load(self.directory)
        csr = certs.load_csr(site.enrollment_request("alpha", keyfile.token_digest))
        other = Authority.create()
        forged = certs.issue_site_certificate(other.ca_key, other.ca_certificate, csr, "alpha")
        self.assertRaises(CertificateError, site.complete_enrollment, keyfile, certs.dump_certificate(forged))
        self.assertFalse(site.is_enrolled)
        self.assertFalse((self.directory / "site.json").exists())

    def test_certificate_for_another_key_is_refused(self) -> None:
        """
        A certificate that does not certify the pending key is not stored.
        """
        keyfile = self.keyfile()
        site = SiteState.load(self.directory)
        site.enrollment_request("alpha", keyfile.token_digest)
        csr = certs.create_csr(certs.generate_private_key(), "alpha")
        cert = self.server.issue_site_certificate(csr, "alpha")
        error = self.assertRaises(CertificateError, site.complete_enrollment, keyfile, certs.dump_certificate(cert))
        self.assertIn("another key", str(error))

    def test_complete_without_request(self) -> None:
        """
        Completing an enrollment that was never started is a StateError.
        """
        site = SiteState.load(self.directory)
        self.assertRaises(StateError, site.complete_enrollment, self.keyfile(), "x")

    def test_interrupted_commit_enrolls_again(self) -> None:
        """
        If the files were being replaced when the site crashed (key and
        certificate disagree, pending.key still there), the site counts as not
        enrolled, and retrying with the same keyfile gets the same
        certificate back.
        """
        keyfile = self.keyfile()
        site = SiteState.load(self.directory)
        csr = site.enrollment_request("alpha", keyfile.token_digest)
        pem = self.server.enroll("alpha", keyfile.token, csr, NOW)
        # Simulate the crash: another identity's files next to pending.key.
        other = SiteState.load(self.mktemp())
        self.enroll(other, self.keyfile("beta"))
        for name in ("site.key", "site.crt", "ca.crt", "site.json"):
            (self.directory / name).write_bytes((Path(other.directory.path) / name).read_bytes())
        (self.directory / "site.key").write_bytes(certs.dump_private_key(certs.generate_private_key()))
        reloaded = SiteState.load(self.directory)
        self.assertFalse(reloaded.is_enrolled)
        retry_csr = reloaded.enrollment_request("alpha", keyfile.token_digest)
        self.assertEqual(self.server.enroll("alpha", keyfile.token, retry_csr, NOW), pem)
        reloaded.complete_enrollment(keyfile, pem)
        self.assertTrue(SiteState.load(self.directory).is_enrolled)

    def test_inconsistent_state_without_pending_key_is_refused(self) -> None:
        """
        A site key that does not match the site certificate, with no
        enrollment in progress, is a StateError.
        """
        site = SiteState.load(self.directory)
        self.enroll(site, self.keyfile())
        (self.directory / "site.key").write_bytes(certs.dump_private_key(certs.generate_private_key()))
        error = self.assertRaises(StateError, SiteState.load, self.directory)
        self.assertIn("site.key does not match site.crt", str(error))

    def test_incomplete_site_state_is_refused(self) -> None:
        """
        A site directory with some files missing is a StateError naming
        them.
        """
        site = SiteState.load(self.directory)
        self.enroll(site, self.keyfile())
        (self.directory / "site.crt").unlink()
        error = self.assertRaises(StateError, SiteState.load, self.directory)
        self.assertIn("site.crt", str(error))
        self.assertIn("incomplete", str(error))

    def test_damaged_site_json_is_refused(self) -> None:
        """
        A site.json that is not the expected document is a StateError naming
        the file.
        """
        site = SiteState.load(self.directory)
        self.enroll(site, self.keyfile())
        for content in ("{", '{"format": "other"}', json.dumps({"format": "rtunnel-site-state", "version": 1})):
            (self.directory / "site.json").write_text(content)
            error = self.assertRaises(StateError, SiteState.load, self.directory)
            self.assertIn("site.json is damaged", str(error))

    def test_module_exports_file_names(self) -> None:
        """
        The file names other code relies on are the documented ones.
        """
        self.assertEqual(
            (state.CA_KEY, state.CA_CERT, state.SERVER_KEY, state.SERVER_CERT, state.DATABASE),
            ("ca.key", "ca.crt", "server.key", "server.crt", "state.sqlite3"),
        )
        self.assertEqual(
            (state.SITE_KEY, state.SITE_CERT, state.SITE_CA_CERT, state.SITE_INFO),
            ("site.key", "site.crt", "ca.crt", "site.json"),
        )
