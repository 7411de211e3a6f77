"""Memory of one idle rtunnel TLS connection on the server, measured in-process without sockets.

    PYTHONPATH=. .venv/bin/python bench/fleet_tlsmem.py [--count 2000]

Builds a throw-away server state (CA, server certificate) and one site
certificate, then K connection pairs with rtunnel's own connection creators
(``server_tls_options`` / ``site_tls_options``, the same objects the server
and the sites use), completes the mutual-TLS handshakes through pyOpenSSL's
memory BIOs (as Twisted's TLS protocol does), exchanges one small record each
way (as HELLO does) and drops the client side.  What the K server-side
connections still hold is read from glibc's ``mallinfo2`` (OpenSSL allocates
with malloc) and from ``sys.getallocatedblocks`` (Python's small objects).

This isolates the TLS layer's share of the fleet benchmark's "server RSS per
idle site" (docs/performance.md, "Fleet"): the rest is rtunnel's and Twisted's
Python objects per session.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from OpenSSL import SSL  # noqa: E402

from rtunnel.identity.certs import create_csr, dump_certificate, generate_private_key  # noqa: E402
from rtunnel.identity.state import ServerState  # noqa: E402
from rtunnel.identity.tlsconfig import server_tls_options, site_tls_options  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _MallInfo2


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def malloc_in_use() -> int:
    mi = _libc.mallinfo2()
    return int(mi.uordblks + mi.hblkhd)


class _Holder:
    """Stands in for the Twisted TLS protocol the connection creators are given."""


def _pump(a: SSL.Connection, b: SSL.Connection) -> bool:
    moved = False
    for src, dst in ((a, b), (b, a)):
        while True:
            try:
                data = src.bio_read(1 << 16)
            except SSL.WantReadError:
                break
            if not data:
                break
            dst.bio_write(data)
            moved = True
    return moved


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    done = {id(server): False, id(client): False}
    for _ in range(50):
        for conn in (client, server):
            if done[id(conn)]:
                continue
            try:
                conn.do_handshake()
                done[id(conn)] = True
            except SSL.WantReadError:
                pass
        moved = _pump(client, server)
        if all(done.values()) and not moved:
            return
    raise RuntimeError("handshake did not complete")


def _record(sender: SSL.Connection, receiver: SSL.Connection, size: int) -> None:
    sender.send(b"h" * size)
    _pump(sender, receiver)
    receiver.recv(1 << 16)
    _pump(sender, receiver)


def measure(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = ServerState.load_or_create(tmp, ["127.0.0.1"])
        site_key = generate_private_key()
        cert = state.issue_site_certificate(create_csr(site_key, "mem-site"), "mem-site")
        server_opts = server_tls_options(state)
        site_opts = site_tls_options(dump_certificate(state.ca_certificate), "127.0.0.1", site_key, cert)
        gc.collect()
        m0, b0, r0 = malloc_in_use(), sys.getallocatedblocks(), rss_kib()
        servers, clients, holders = [], [], []
        t0 = time.monotonic()
        for _ in range(count):
            h = _Holder()
            s = server_opts.serverConnectionForTLS(h)
            s.set_accept_state()
            c = site_opts.clientConnectionForTLS(h)
            c.set_connect_state()
            _handshake(s, c)
            _record(c, s, 40)  # HELLO and a PING from the site
            _record(s, c, 40)  # HELLO and a PONG from the server
            servers.append(s)
            clients.append(c)
            holders.append(h)
        elapsed = time.monotonic() - t0
        gc.collect()
        m1, r1 = malloc_in_use(), rss_kib()
        clients.clear()
        gc.collect()
        m2, b2 = malloc_in_use(), sys.getallocatedblocks()
        servers.clear()
        holders.clear()
        gc.collect()
        m3 = malloc_in_use()
        state.close()
    return {
        "pair_malloc_kib": (m1 - m0) / count / 1024,
        "pair_rss_kib": (r1 - r0) / count,
        "server_malloc_kib": (m2 - m0) / count / 1024,
        "server_blocks": (b2 - b0) / count,
        "left_after_free_kib": (m3 - m0) / count / 1024,
        "handshake_pair_ms": 1000 * elapsed / count,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    args = ap.parse_args()
    r = measure(args.count)
    print(f"{args.count} idle mutual-TLS connections ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}):")
    print(
        f"  server side, malloc in use: {r['server_malloc_kib']:.1f} KiB per connection "
        f"(+ {r['server_blocks']:.0f} pymalloc blocks)"
    )
    print(
        f"  both sides:                 {r['pair_malloc_kib']:.1f} KiB per pair in malloc, "
        f"{r['pair_rss_kib']:.1f} KiB per pair in RSS"
    )
    print(f"  after freeing both:         {r['left_after_free_kib']:.1f} KiB per connection left")
    print(f"  handshake, both sides in this process: {r['handshake_pair_ms']:.2f} ms per pair")


if __name__ == "__main__":
    main()
