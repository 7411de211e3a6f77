"""py-spy around the fleet benchmark's phases (``bench/fleet.py --pyspy``), and its summaries.

py-spy samples a running process from outside (``py-spy record --pid``), so
the measured processes run unchanged; ``--nonblocking`` keeps it from pausing
them at each sample.  It is not a dependency of rtunnel: install it into the
venv with ``.venv/bin/pip install py-spy`` (the benchmark says so when it is
missing).  Raw output is py-spy's collapsed-stack format, one line per
distinct stack: ``frame;frame;...;frame COUNT``, each frame
``function (file:line)``.

    python bench/fleet_profile.py FILE.txt [--top 30]

prints the summary of one raw file: samples, then the functions with the most
samples on top of the stack (self) and anywhere in it (inclusive), grouped by
function and file (line numbers dropped).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def pyspy_binary() -> str | None:
    venv = REPO / ".venv" / "bin" / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, rate: int = 100, duration: int = 900) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on ``pid`` (ended by ``stop``); None without py-spy."""
    binary = pyspy_binary()
    if binary is None:
        return None
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 (closed when the profiler ends)
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def stop(p: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> None:
    """SIGINT makes py-spy write what it sampled and exit; SIGKILL if it does not (bounded)."""
    if p is None or p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGINT)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    except ProcessLookupError:
        pass


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('fn')} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            stacks.append(([_name(f) for f in head.split(";")], int(count)))
    return stacks


def summarize(path: Path, top: int = 30) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    if not total:
        return f"{path.name}: no samples\n"
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
    lines = [f"{path.name}: {total:,} samples", "", "self (top of stack):"]
    lines += [f"  {100 * c / total:5.1f} %  {name}" for name, c in own.most_common(top)]
    lines += ["", "inclusive (anywhere in the stack):"]
    lines += [f"  {100 * c / total:5.1f} %  {name}" for name, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="Summarize a py-spy raw (collapsed stacks) file.")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for f in args.files:
        print(summarize(f, args.top))


if __name__ == "__main__":
    main()
