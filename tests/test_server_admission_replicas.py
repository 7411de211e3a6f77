"""
Admission when another replica (another connection to the same database)
enrolled the site after this server's snapshot was loaded: a site dials at
once after enrolling, and behind a balancer it reaches any replica, whose
revocation poll would only learn of the enrollment within a second. The
server asks the database before refusing a certificate its snapshot does
not know; a certificate its snapshot refuses for a revocation is refused
from memory.
"""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.identity import certs
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import SiteAdmission
from tests.roles_helpers import ServerFixture
from tests.test_server_role import Server


class _Counting:
    """Counts the store's one-site admission reads."""

    def __init__(self, state: ServerState) -> None:
        self.reads: list[str] = []
        store = state.store
        read = store.admission

        def counted(site: str) -> SiteAdmission | None:
            self.reads.append(site)
            return read(site)

        store.admission = counted  # type: ignore[method-assign]


def _enroll_elsewhere(case: SynchronousTestCase, fixture: ServerFixture, site: str) -> tuple[object, object]:
    """Enroll C{site} through another connection to the same state, as another replica does."""
    other = ServerState.open_existing(fixture.directory)
    case.addCleanup(other.close)
    key = certs.generate_private_key()
    csr = certs.dump_csr(certs.create_csr(key, site))
    pem = other.enroll(site, fixture.token(site), csr, datetime.now(UTC))
    return key, certs.load_certificate(pem)


class StaleSnapshotTests(SynchronousTestCase):
    def test_site_enrolled_by_another_replica_is_admitted_at_once(self) -> None:
        """
        Enrolled through another connection after the snapshot was loaded,
        and before any poll: the site is admitted on its first connection,
        and the snapshot now knows it.
        """
        server = Server(self)
        key, cert = _enroll_elsewhere(self, server.fixture, "alpha")
        self.assertIsNone(server.factory.admission.get("alpha"))
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        self.assertIsNotNone(server.registry.session_for("alpha"))
        known = server.factory.admission.get("alpha")
        assert known is not None
        self.assertEqual(known.certificate_fingerprint, certs.fingerprint(cert))  # type: ignore[arg-type]

    def test_site_enrolled_again_by_another_replica_is_admitted_at_once(self) -> None:
        """
        A site the snapshot knows with its old certificate, enrolled again
        elsewhere (a rotation, a move): its new certificate is admitted at
        once, the old one is refused as superseded.
        """
        server = Server(self)
        old_key, old_cert = server.fixture.enroll("alpha")
        key, cert = _enroll_elsewhere(self, server.fixture, "alpha")
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        stale, _, _ = server.dial(old_key, old_cert)
        self.assertIn("certificate-superseded", stale.peer_goaway[1])  # type: ignore[index]

    def test_unknown_site_is_refused_after_asking(self) -> None:
        """A certificate of a site no database row knows: asked once, refused as site-unknown."""
        server = Server(self)
        counting = _Counting(server.fixture.state)
        key, cert = server.fixture.certify_without_enrolling("ghost")
        ghost, _, _ = server.dial(key, cert)
        self.assertIn("site-unknown", ghost.peer_goaway[1])  # type: ignore[index]
        self.assertEqual(counting.reads, ["ghost"])

    def test_database_down_refuses_from_the_snapshot(self) -> None:
        """The lookup failing (database closed): the snapshot's refusal stands, and known sites still come in."""
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        ghost_key, ghost_cert = server.fixture.certify_without_enrolling("ghost")
        server.fixture.state.store.close()
        ghost, _, _ = server.dial(ghost_key, ghost_cert)
        self.assertIn("site-unknown", ghost.peer_goaway[1])  # type: ignore[index]
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)

    def test_known_sites_and_revoked_certificates_need_no_database(self) -> None:
        """
        A site the snapshot admits, and one it knows as revoked with the
        certificate presented, are decided from memory without a read.
        """
        server = Server(self)
        key, cert = server.fixture.enroll("alpha")
        revoked_key, revoked_cert = server.fixture.enroll("beta")
        server.fixture.state.store.revoke_site("beta", datetime.now(UTC))
        counting = _Counting(server.fixture.state)
        site, _, _ = server.dial(key, cert)
        self.assertTrue(site.ready)
        revoked, _, _ = server.dial(revoked_key, revoked_cert)
        self.assertIn("site-revoked", revoked.peer_goaway[1])  # type: ignore[index]
        self.assertEqual(counting.reads, [])
