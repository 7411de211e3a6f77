"""
Security behaviour end to end, with real twistd processes: every way a
keyfile, a token or a certificate can be wrong is refused with its specific
reason, on both ends. A refusal that provably comes from the authenticated
server makes the site exit non-zero; what anyone on the path could cause (a
server that fails verification, a forged TLS alert) is logged as an error
and retried.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rtunnel.identity.certs import (
    create_ca,
    create_csr,
    dump_certificate,
    issue_site_certificate,
    load_certificate,
    load_private_key,
)
from tests.e2e_support import AlertingPath, EchoServer
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

EXIT_TIMEOUT = 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    echo = EchoServer()
    d = Deployment(tmp_path_factory.mktemp("security"))
    forward = free_port()
    d.start_server(forwards=[f"127.0.0.1:{forward}:victim:127.0.0.1:{echo.port}"])
    yield d, echo, forward
    statuses = d.stop_all()
    echo.close()
    assert statuses["server"] == 0, statuses


def _edit(keyfile: Path, **changes: str) -> Path:
    data = json.loads(keyfile.read_text())
    data.update(changes)
    edited = keyfile.with_name(keyfile.stem + "-edited.rtkey")
    edited.write_text(json.dumps(data))
    edited.chmod(0o600)
    return edited


def _expect_refusal(d: Deployment, site: str, keyfile: Path, code: str, allow=()) -> str:
    """Start a site with C{keyfile}; it must exit non-zero naming C{code}."""
    proc = d.start_site(site, allow=list(allow), keyfile=keyfile, name=f"site-{site}-{code}")
    status = proc.wait(EXIT_TIMEOUT)
    output = proc.output()
    assert status == 1, output
    assert code in output, output
    return output


def _enroll(d: Deployment, site: str, echo: EchoServer, keyfile: Path | None = None):
    proc = d.start_site(
        site, allow=[echo.target], keyfile=keyfile or d.create_keyfile(site), extra=["--retry-cap", "2"]
    )
    d.wait_connected(site, watch=proc)
    return proc


def test_spent_token_is_refused_on_both_ends(world, tmp_path):
    """
    A keyfile whose token was already redeemed cannot enroll a second site
    state (another machine): refused as token-spent, logged by the server,
    and the second tunnel process exits with status 1.
    """
    d, echo, _ = world
    keyfile = d.create_keyfile("spent")
    first = _enroll(d, "spent", echo, keyfile)
    assert first.stop() == 0
    # Same keyfile, fresh state directory: a second enrollment attempt.
    proc = d.twistd(
        "site-spent-again",
        ["rtunnel", "--state", str(tmp_path / "other-state"), "--keyfile", str(keyfile), "--allow", echo.target],
    )
    assert proc.wait(EXIT_TIMEOUT) == 1
    assert "token-spent" in proc.output()
    wait_until(lambda: "token-spent" in d.server.output(), 5, "the server to log token-spent")


def test_expired_token_is_refused(world):
    """A token used after its expiry is refused as token-expired."""
    d, _, _ = world
    keyfile = d.create_keyfile("late", expires="1s")
    expires = datetime.fromisoformat(json.loads(keyfile.read_text())["expires"].replace("Z", "+00:00"))
    wait_until(lambda: datetime.now(UTC) > expires, 5, "the token to expire")
    _expect_refusal(d, "late", keyfile, "token-expired")
    assert "token-expired" in d.server.output()


def test_unknown_token_is_refused(world):
    """A token the server never issued is refused as token-unknown."""
    d, _, _ = world
    keyfile = _edit(d.create_keyfile("forged"), token="A" * 43)
    _expect_refusal(d, "forged", keyfile, "token-unknown")


def test_token_for_another_site_is_refused(world):
    """A token issued for one site cannot enroll another site name."""
    d, _, _ = world
    keyfile = _edit(d.create_keyfile("rightful"), site="intruder")
    _expect_refusal(d, "intruder", keyfile, "token-wrong-site")


@pytest.mark.parametrize(
    "change, what",
    [
        ("ca", "a server whose certificate is not from the pinned CA"),
        ("name", "a server whose certificate does not carry the pinned name"),
    ],
)
def test_server_that_cannot_prove_its_identity_never_gets_the_token(world, change, what):
    """
    The site verifies the server against the keyfile's CA and name before it
    sends the token: against {what} it logs an error naming the cause and
    keeps retrying (an impostor on the path must not stop a site for good),
    and the token stays unspent (the untouched keyfile still enrolls).
    """
    d, echo, _ = world
    site = f"pinned-{change}"
    keyfile = d.create_keyfile(site)
    if change == "ca":
        _, other_ca = create_ca("someone else's CA")
        bad = _edit(keyfile, ca_certificate=dump_certificate(other_ca))
    else:
        bad = _edit(keyfile, server_name="not-the-server.example")
    proc = d.start_site(site, allow=[], keyfile=bad, name=f"site-{site}-bad")
    wait_until(
        lambda: proc.output().count("the token was not sent; retrying") >= 2 or not proc.running(),
        EXIT_TIMEOUT,
        "two failed enrollment attempts",
    )
    output = proc.output()
    assert proc.running(), output
    assert "could not prove the identity" in output or "does not match" in output, output
    assert "[-] site" not in output or "error" in output.lower()
    assert proc.stop() == 0
    assert f"enrolled site {site}" not in d.server.output()
    good = _enroll(d, site, echo, keyfile)
    assert good.stop() == 0


def test_forged_tls_alert_cannot_stop_a_site(world, tmp_path):
    """
    An on-path attacker answering the ClientHello with seven plaintext bytes
    (a fatal bad_certificate alert) makes each attempt fail, during
    enrollment and later on reconnect; the site logs the TLS error, keeps
    retrying, and is connected as soon as the path is clean again.
    """
    d, echo, _ = world
    path = AlertingPath(d.server_port, alerts=2)
    try:
        keyfile = d.create_keyfile("harassed", address=f"127.0.0.1:{path.port}")
        proc = d.start_site("harassed", allow=[echo.target], keyfile=keyfile, extra=["--retry-cap", "2"])
        d.wait_connected("harassed", watch=proc)
        assert path.alerted == 2
        assert proc.output().count("alert bad certificate") >= 2, proc.output()
        # Later, on reconnect: the path is cut and alerts again, twice.
        path.alerts = 2
        path.cut()
        wait_until(lambda: path.alerted == 4, 30, "two forged alerts on reconnect")
        d.wait_connected("harassed", watch=proc)
        assert proc.running()
        assert proc.stop() == 0
    finally:
        path.close()


def test_certificate_rejected_by_the_server_stops_the_site(world, tmp_path):
    """
    A site whose certificate the server rejects in the handshake (here: one
    from the right CA that is not valid yet) gets the server's alert after the
    handshake completed, encrypted: a refusal that provably comes from its
    server, so it exits non-zero saying so, and the server logs the refusal.
    """
    d, echo, _ = world
    proc = _enroll(d, "early", echo)
    assert proc.stop() == 0
    state = d.site_state("early")
    ca_key = load_private_key((d.server_state / "ca.key").read_bytes())
    ca_cert = load_certificate((d.server_state / "ca.crt").read_bytes())
    key = load_private_key((state / "site.key").read_bytes())
    in_five_years = datetime.now(UTC) + timedelta(days=5 * 365)
    early = issue_site_certificate(ca_key, ca_cert, create_csr(key, "early"), "early", in_five_years)
    (state / "site.crt").write_text(dump_certificate(early))
    again = d.start_site("early", allow=[echo.target], name="site-early-again")
    assert again.wait(EXIT_TIMEOUT) == 1, again.output()
    assert "rejected this site's certificate" in again.output(), again.output()
    wait_until(lambda: "refused TLS connection" in d.server.output(), 5, "the server to log the refused certificate")
    assert "it is not yet valid" in d.server.output()
