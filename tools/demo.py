"""
C{make demo}: a real tunnel server, a real site, real traffic, on loopback.

 1. start C{twistd rtunnel-server} with a forward of a cloud port to the site's
    stream source;
 2. create a keyfile with C{rtunnel keyfile create};
 3. start C{twistd rtunnel --keyfile …} (it enrolls, then connects with its own
    certificate);
 4. start a stream source at the "site" (standing in for a video redirector);
 5. pull 256 MB through the cloud-side forward, verify SHA-256, print the
    throughput and C{rtunnel sites list};
 6. pull it again by name through the server's SOCKS5 front door
    (C{--socks}): the site declares its source as the service C{video}
    (C{--service video=HOST:PORT}), reached as
    C{video.demo-site.rtunnel.internal}, no forward needed;
 7. ask the server's admin endpoint: /readyz, and the site's byte counter
    in /metrics, which must hold exactly the bytes of both pulls;
 8. stop everything with SIGTERM (graceful drain) and check that it all ended.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from rtunnel.identity.state import DATABASE
from rtunnel.identity.store import StateStore
from rtunnel.observe.live import ADMIN_URL_KEY
from tools.harness import ROOT, Deployment, free_port, wait_until
from tools.socks import socks5_handshake

MIB = 1024 * 1024


class StreamSource:
    """
    A TCP server that sends C{size} bytes of random data to each client and
    closes; it records the SHA-256 of what it sent.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent_digests: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._blocks = [os.urandom(MIB) for _ in range(8)]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        remaining = self.size
        i = 0
        with conn:
            try:
                while remaining > 0:
                    block = self._blocks[(i * 5 + i // 8) % len(self._blocks)][: min(MIB, remaining)]
                    conn.sendall(block)
                    digest.update(block)
                    remaining -= len(block)
                    i += 1
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return
        self.sent_digests.append(digest.hexdigest())

    def close(self) -> None:
        self.sock.close()


def pull(port: int, timeout: float, by_name: tuple[str, int] | None = None) -> tuple[int, str, float]:
    """
    Read everything from 127.0.0.1:C{port}; return (bytes, sha256, seconds).

    @param by_name: (name, port) to ask for when C{port} is a SOCKS5 front door.
    """
    digest = hashlib.sha256()
    total = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if by_name is not None:
            socks5_handshake(s, *by_name)
        while True:
            data = s.recv(4 * MIB)
            if not data:
                break
            digest.update(data)
            total += len(data)
    return total, digest.hexdigest(), time.perf_counter() - start


def show_admin(deployment: Deployment, site: str, expected_from_site: int) -> bool:
    """
    Step 7: the server's admin endpoint (its URL as the server recorded it
    in the state database, the port the kernel picked): readiness, and the
    site's byte counter, which must hold exactly what the two pulls carried.
    """
    with StateStore(deployment.server_state / DATABASE, create=False) as store:
        url = store.get_meta(ADMIN_URL_KEY)
    if not url:
        print("7. the admin endpoint recorded no URL", file=sys.stderr)
        return False
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
        ready = response.read().decode().strip()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        scrape = response.read().decode()
    counted = {
        sample.labels["direction"]: int(sample.value)
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name == "rtunnel_site_bytes_total" and sample.labels.get("site") == site
    }
    from_site = counted.get("from_site", -1)
    exact = from_site == expected_from_site
    print(f"7. admin endpoint {url} (status page at {url}/): /readyz says {ready!r}")
    print(
        f'   /metrics: rtunnel_site_bytes_total{{site="{site}",direction="from_site"}} {from_site:,} '
        f"({'exactly' if exact else 'NOT'} the {expected_from_site:,} bytes pulled)"
    )
    return ready == "ready" and exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=256, help="how much to pull through the tunnel")
    parser.add_argument("--workdir", default=str(ROOT / "_demo"), help="scratch directory (wiped first)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    deployment = Deployment(workdir)
    source = StreamSource(args.megabytes * MIB)
    forward_port = free_port()
    socks_port = free_port()
    site = "demo-site"
    ok = False
    try:
        print(
            f"1. tunnel server on 127.0.0.1:{deployment.server_port}, "
            f"forward 127.0.0.1:{forward_port} -> {site}:127.0.0.1:{source.port}, "
            f"SOCKS5 front door on 127.0.0.1:{socks_port}"
        )
        deployment.start_server(
            forwards=[f"127.0.0.1:{forward_port}:{site}:127.0.0.1:{source.port}"],
            extra=["--socks", f"tcp:{socks_port}"],
        )
        keyfile = deployment.create_keyfile(site)
        print(f"2. keyfile for {site}: {keyfile.relative_to(ROOT) if keyfile.is_relative_to(ROOT) else keyfile}")
        # The source is a declared service (reachable by name, no --allow needed for it).
        site_proc = deployment.start_site(
            site, allow=[], keyfile=keyfile, extra=["--service", f"video=127.0.0.1:{source.port}"]
        )
        deployment.wait_connected(site, timeout=30, watch=site_proc)
        print(f"3. site {site} enrolled and connected (twistd pid {site_proc.pid})")
        print(f"4. pulling {args.megabytes} MB from the site's stream source through the forward ...")
        total, received, seconds = pull(forward_port, timeout=60)
        wait_until(lambda: bool(source.sent_digests), 10, "the source to finish")
        sent = source.sent_digests[0]
        ok = total == source.size and received == sent
        print(f"   received {total:,} bytes in {seconds:.2f}s = {total / seconds / 1e6:.0f} MB/s")
        print(f"   sha256 sent     {sent}")
        print(f"   sha256 received {received}  {'OK' if ok else 'MISMATCH'}")
        print("5. rtunnel sites list:")
        listing = deployment.rtunnel("sites", "list", "--state", str(deployment.server_state))
        print("   " + listing.stdout.rstrip().replace("\n", "\n   "))
        name = f"video.{site}.rtunnel.internal"
        print(f"6. pulling it again by name through the SOCKS5 front door: {name}:{source.port} ...")
        total, received, seconds = pull(socks_port, timeout=60, by_name=(name, source.port))
        wait_until(lambda: len(source.sent_digests) > 1, 10, "the source to finish")
        sent = source.sent_digests[1]
        by_name_ok = total == source.size and received == sent
        ok = ok and by_name_ok
        print(f"   received {total:,} bytes in {seconds:.2f}s = {total / seconds / 1e6:.0f} MB/s")
        print(f"   sha256 sent     {sent}")
        print(f"   sha256 received {received}  {'OK' if by_name_ok else 'MISMATCH'}")
        ok = show_admin(deployment, site, 2 * source.size) and ok
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        for proc in deployment.processes:
            print(f"--- {proc.name} log (tail) ---\n{proc.output()[-3000:]}", file=sys.stderr)
        ok = False
    finally:
        statuses = deployment.stop_all()
        source.close()
    left = [p.name for p in deployment.processes if p.running()]
    print(
        f"8. stopped: {', '.join(f'{name} exit {code}' for name, code in statuses.items())}; "
        f"still running: {left or 'nothing'}"
    )
    if statuses and any(code != 0 for code in statuses.values()):
        ok = False
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
