"""Start ``twistd`` with a memory probe: what the fleet benchmark's ``--probe`` runs instead of plain twistd.

    python bench/fleet_probe.py -n --pidfile= --logfile=LOG rtunnel-server ...

is ``twistd`` (the same ``run()`` that tools/harness.py starts) with one
addition: on SIGUSR2 the process writes what its memory is made of to
``$RTUNNEL_FLEET_PROBE/probe-LABEL.json``, where LABEL (and whether to call
``malloc_trim`` afterwards) is read from ``$RTUNNEL_FLEET_PROBE/probe-request.json``:

* objects the garbage collector tracks, counted and sized (``sys.getsizeof``,
  shallow) by type;
* ``sys.getallocatedblocks()`` (pymalloc blocks in use);
* glibc ``mallinfo2()`` (heap in use and free, mmapped chunks);
* with ``PYTHONTRACEMALLOC`` set: tracemalloc's traced total, the top lines and
  files by live bytes, and the bytes in blocks above pymalloc's 512-byte limit
  (those come from malloc);
* with ``trim``: VmRSS before and after ``malloc_trim(0)`` (freed heap that
  glibc kept: the product fixes its trim threshold at 32 MiB).

Python signal handlers run in the main thread between bytecodes, so the dump
sees a consistent heap; the reactor simply waits meanwhile.  This file changes
nothing in rtunnel: the measured server is the product as shipped, plus the
handler (and tracemalloc's own overhead when that is on, which is why RSS and
CPU figures come from runs without ``--probe``).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

PROBE_ENV = "RTUNNEL_FLEET_PROBE"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
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


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _mallinfo() -> dict[str, int] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    mi = fn()
    return {field[0]: int(getattr(mi, field[0])) for field in _MallInfo2._fields_}


def dump(directory: Path) -> None:
    req = json.loads((directory / "probe-request.json").read_text())
    t0 = time.monotonic()
    out: dict[str, Any] = {"label": req["label"], "rss_kib": _rss_kib(), "allocated_blocks": sys.getallocatedblocks()}
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        t = type(obj)
        key = f"{t.__module__}.{t.__qualname__}"
        counts[key] += 1
        sizes[key] += sys.getsizeof(obj)
    out["gc_objects"] = sum(counts.values())
    out["gc_bytes_shallow"] = sum(sizes.values())
    out["types"] = [[k, n, sizes[k]] for k, n in counts.most_common(120)]
    out["mallinfo2"] = _mallinfo()
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        out["traced_bytes"], out["traced_peak"] = tracemalloc.get_traced_memory()
        out["traced_top_lines"] = [[str(s.traceback), s.size, s.count] for s in snap.statistics("lineno")[:80]]
        out["traced_top_files"] = [[str(s.traceback), s.size, s.count] for s in snap.statistics("filename")[:40]]
        big = [tr.size for tr in snap.traces if tr.size > 512]
        out["traced_big_blocks"] = [len(big), sum(big)]
        out["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
    if req.get("trim"):
        before = _rss_kib()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        out["trim"] = [before, _rss_kib()]
    out["probe_s"] = time.monotonic() - t0
    tmp = directory / f"probe-{req['label']}.json.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(directory / f"probe-{req['label']}.json")


def main() -> None:
    directory = os.environ.get(PROBE_ENV)
    if directory:
        signal.signal(signal.SIGUSR2, lambda *_: dump(Path(directory)))
    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()


if __name__ == "__main__":
    main()
