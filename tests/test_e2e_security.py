"""
Security behaviour end to end, with real twistd processes: every way a
keyfile, a token or a certificate can be wrong is refused with its specific
reason, on both ends, and the site process exits non-zero instead of retrying.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rtunnel.harness import Deployment, free_port, wait_until
from rtunnel.identity.certs import create_ca, dump_certificate
from rtunnel.mux.frames import Hello, Open, encode
from tests.e2e_support import EchoServer, read_until_closed

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
    proc = d.start_site(site, allow=[echo.target], keyfile=keyfile or d.create_keyfile(site), extra=["--retry-cap", "2"])
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
    wait_until(lambda: datetime.now(timezone.utc) > expires, 5, "the token to expire")
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
    sends the token: against {what} it exits non-zero, and the token stays
    unspent (the untouched keyfile still enrolls afterwards).
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
    assert proc.wait(EXIT_TIMEOUT) == 1, proc.output()
    assert "could not prove the identity" in proc.output() or "does not match" in proc.output(), proc.output()
    assert f"enrolled site {site}" not in d.server.output()
    good = _enroll(d, site, echo, keyfile)
    assert good.stop() == 0


def test_revoked_site_is_cut_and_cannot_come_back(world):
    """
    `rtunnel sites revoke` cuts the live tunnel within a few seconds; the
    site exits non-zero and is refused when started again.
    """
    d, echo, _ = world
    proc = _enroll(d, "doomed", echo)
    d.rtunnel("sites", "revoke", "doomed", "--state", str(d.server_state))
    assert proc.wait(10) == 1, proc.output()
    assert "revoked" in proc.output()
    entry = next(s for s in d.sites() if s["name"] == "doomed")
    assert entry["revoked"] and not entry["connected"]
    again = d.start_site("doomed", allow=[echo.target], name="site-doomed-again")
    assert again.wait(EXIT_TIMEOUT) == 1
    assert "revoked" in again.output()


def test_a_client_without_a_site_certificate_opens_no_stream(world):
    """
    A TLS client without a site certificate that speaks the multiplexer
    (HELLO, then OPEN to the victim's service) gets no stream: the server
    only lets it enroll, so the site's service never sees a connection.
    """
    d, echo, _ = world
    victim = _enroll(d, "victim", echo)
    before = echo.accepted
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", d.server_port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(encode(Hello(1, 65536, 262144, 1024)) + encode(Open(2, "127.0.0.1", echo.port)))
            data, ended = read_until_closed(tls, timeout=10)
    assert ended
    assert not data.startswith(struct.pack(">B", 0)), "the server answered with a mux HELLO"
    assert echo.accepted == before
    assert victim.running()
