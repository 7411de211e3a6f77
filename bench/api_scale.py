"""
What the JSON API and the status page cost the tunnel server's reactor at
fleet scale, in one process, without sites or TLS.

A real L{TunnelServerService} (not started: no port, no database thread)
is given N simulated sites: every one admitted and connected in its
registry with a stand-in session (bytes, an RTT, announced services), a
full throughput ring (L{SAMPLES} samples taken) and, for one in ten, a
last refusal. Then:

 - the view and the encoding, timed directly: C{ServerView.names()},
   C{site()} and C{throughput()} of every site, and the JSON of
   C{/api/v1/sites} with and without C{?history=1} (L{api.sites_body});
 - the admin endpoint served for real on the global reactor (loopback, a
   kernel-picked port) and fetched with C{curl} from a thread: per path the
   response size and the wall time, and the longest the reactor was held
   while it answered, seen by a 1 ms C{LoopingCall} (how late its calls
   came): what every tunnel's next read waits for.

Run: C{PYTHONPATH=. .venv/bin/python bench/api_scale.py [--sites 10000]}.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource

from rtunnel.address import HostPort
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import SiteAdmission
from rtunnel.observe import api
from rtunnel.observe.server_view import ServerView
from rtunnel.observe.stats import SAMPLES
from rtunnel.observe.web import AdminSite, admin_root
from rtunnel.roles.server import ServerPolicy, TunnelServerService
from rtunnel.services import ServerConfig

reactor: Any = global_reactor


class Session:
    """What the registry and the figures read of a live session, set by hand."""

    accepting_streams = True
    peer_label = "192.0.2.1:1"

    def __init__(self, index: int) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_rtt: float | None = 0.001 + (index % 50) / 1000
        self.streams: dict[int, object] = {i: None for i in range(index % 3)}
        self.figures: object = None

    def on_closed(self, callback: Callable[..., object], *args: object) -> None:
        pass

    def terminate(self, code: int, reason: str) -> None:
        pass


def fleet(n: int, directory: str) -> TunnelServerService:
    """A server service with C{n} connected sites, each with a full throughput history."""
    state = ServerState.load_or_create(directory, ["localhost"])
    config = ServerConfig(
        state_dir=directory,
        listen="tcp:0:interface=127.0.0.1",
        policy=ServerPolicy(keepalive=None),
        admin=None,
        name="api-scale",
    )
    service = TunnelServerService(config, state, reactor, lambda reason: print("fatal:", reason))
    names = [f"site-{i:05d}" for i in range(n)]
    revoked = datetime.now(UTC)
    service.admission.replace(
        {name: SiteAdmission(True, "ab" * 16, revoked if i % 97 == 0 else None) for i, name in enumerate(names)}
    )
    registry, figures = service.registry, service.figures
    sessions = []
    web = HostPort("127.0.0.1", 8080)
    ssh = HostPort("10.0.0.5", 22)
    for i, name in enumerate(names):
        if i % 97 == 0:
            continue  # revoked: down
        session = Session(i)
        registry.register(name, session, f"198.51.100.{i % 250}:{40000 + i % 20000}")  # type: ignore[arg-type]
        registry.announce(name, session, {"web": web, "ssh": ssh} if i % 2 else {"web": web})  # type: ignore[arg-type]
        sessions.append((i, session))
        if i % 10 == 0:
            figures.refuse(name, "stream", "TARGET_NOT_ALLOWED: 10.9.9.9:25 is not allowed at this site")
    for tick in range(SAMPLES):
        for i, session in sessions:
            session.bytes_sent += 1000 * (i % 7) + tick
            session.bytes_received += 50_000 * (i % 5)
        figures.sample()
    return service


def timed(what: Callable[[], object], repeat: int = 5) -> tuple[float, object]:
    """The median wall time of C{what()} in seconds, and its last result."""
    times = []
    result: object = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = what()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def direct(view: ServerView) -> dict[str, Any]:
    """The view and the encoding, each timed on its own (this thread, nothing else running)."""
    names_s, names = timed(view.names)
    assert isinstance(names, Sequence)
    sites_s, sites = timed(lambda: [view.site(name) for name in names])
    assert isinstance(sites, list)
    history_s, history = timed(lambda: {name: view.throughput(name) for name in names})
    assert isinstance(history, dict)
    plain_s, plain = timed(lambda: api.sites_body("2026-12-05T23:14:05Z", sites, False, {}))
    full_s, full = timed(lambda: api.sites_body("2026-12-05T23:14:05Z", sites, True, history))
    assert isinstance(plain, list) and isinstance(full, list)
    return {
        "names()": names_s,
        "site() x N": sites_s,
        "throughput() x N": history_s,
        "JSON of the list": plain_s,
        "JSON of the list with every history": full_s,
        "list bytes": sum(map(len, plain)),
        "list with history bytes": sum(map(len, full)),
    }


class Collections:
    """The garbage collector's pauses (C{gc.callbacks}): the longest, by generation, since the last reset."""

    def __init__(self) -> None:
        self.worst: dict[int, float] = {}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.worst = {}

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.worst[generation] = max(self.worst.get(generation, 0.0), time.perf_counter() - self._started)


class Lateness:
    """How late a 1 ms LoopingCall on the reactor runs: the longest the reactor was held."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.perf_counter()
        self._loop = task.LoopingCall(self._tick)

    def start(self) -> None:
        self._last = time.perf_counter()
        self._loop.start(0.001, now=False)

    def stop(self) -> None:
        self._loop.stop()

    def reset(self) -> None:
        self.worst = 0.0
        self._last = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.worst = max(self.worst, now - self._last - 0.001)
        self._last = now


def curl(url: str) -> tuple[int, float]:
    """One GET with curl (another process): the body's size and the wall time."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"{url}: HTTP {out[0]}")
    return int(out[1]), float(out[2])


def served(view: ServerView, paths: Sequence[str], repeat: int) -> dict[str, dict[str, float]]:
    """Each path fetched C{repeat} times from a real admin endpoint on the reactor; see the module doc."""
    root = admin_root(
        ready=lambda: None, metrics=Resource(), api=api.api_resource(view, reactor, api.in_thread_pool(reactor))
    )
    site = AdminSite(root, reactor)
    results: dict[str, dict[str, float]] = {}
    probe = Lateness()
    collections = Collections()

    def fetch_all(port: IListeningPort) -> None:
        base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        try:
            for path in paths:
                sizes, walls, worst, collected = [], [], [], []
                for _ in range(repeat):
                    reactor.callFromThread(probe.reset)
                    time.sleep(0.05)
                    collections.reset()
                    if path == "idle":
                        size, wall = 0, 0.2  # no request: the probe's own noise, for comparison
                        time.sleep(wall)
                    else:
                        size, wall = curl(base + path)
                    time.sleep(0.05)
                    sizes.append(size)
                    walls.append(wall)
                    worst.append(probe.worst)
                    collected.append(max(collections.worst.values(), default=0.0))
                results[path] = {
                    "bytes": statistics.median(sizes),
                    "wall median s": statistics.median(walls),
                    "reactor held max s": max(worst),
                    "reactor held median s": statistics.median(worst),
                    "gc pause max s": max(collected),
                }
        finally:
            reactor.callFromThread(port.stopListening)
            reactor.callFromThread(reactor.stop)

    def listening(port: IListeningPort) -> None:
        probe.start()
        threading.Thread(target=fetch_all, args=(port,), daemon=True).start()

    def failed(failure: Any) -> None:
        print(failure)
        reactor.stop()

    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    reactor.callWhenRunning(lambda: endpoint.listen(site).addCallbacks(listening, failed))
    reactor.run()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="fetches of each path")
    parser.add_argument("--no-gc", action="store_true", help="with the garbage collector off, to see its share")
    parser.add_argument(
        "--paths",
        nargs="*",
        default=["idle", "/api/v1/sites", "/api/v1/sites?history=1", "names"],
        help="paths to fetch; 'names' is ?history=1&names= with 100 sites, 'idle' no request (the probe's noise)",
    )
    options = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("needs curl (apt-get install curl)", file=sys.stderr)
        return 2
    if options.no_gc:
        gc.disable()
    directory = tempfile.mkdtemp(prefix="api-scale-")
    try:
        started = time.perf_counter()
        service = fleet(options.sites, directory)
        print(f"{options.sites:,} sites simulated in {time.perf_counter() - started:.1f} s")
        view = ServerView(service)
        print("direct (one thread, median of 5; the view's on the reactor, the JSON in a thread when served):")
        for key, value in direct(view).items():
            print(f"  {key:42} {value * 1000:9.1f} ms" if isinstance(value, float) else f"  {key:42} {value:9,}")
        print(f"served on the reactor, fetched by curl ({options.repeat} times each):")
        shown = [f"site-{i:05d}" for i in range(0, options.sites, max(1, options.sites // 100))][:100]
        paths = [f"/api/v1/sites?history=1&names={','.join(shown)}" if p == "names" else p for p in options.paths]
        for path, figures in served(view, paths, options.repeat).items():
            if "names=" in path:
                path = path.split("names=")[0] + f"names=({len(shown)} sites)"
            print(
                f"  {path:45} {figures['bytes']:11,.0f} B  wall {figures['wall median s'] * 1000:7.1f} ms  "
                f"reactor held {figures['reactor held median s'] * 1000:6.1f} ms median, "
                f"{figures['reactor held max s'] * 1000:6.1f} ms max; longest GC pause "
                f"{figures['gc pause max s'] * 1000:.1f} ms"
            )
        service.state.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
