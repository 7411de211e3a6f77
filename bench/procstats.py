"""Memory and CPU of a tunnel's own processes, read from /proc.

Why /proc and not psutil: no dependency beyond the project venv, and the two
numbers the bench needs are plain fields:

* RSS: ``VmRSS`` in ``/proc/PID/status`` (KiB), summed over the processes.
* CPU: ``utime + stime`` (fields 14 and 15 of ``/proc/PID/stat``, clock ticks),
  summed over the processes and turned into seconds.

A tunnel is one or more root PIDs that the bench started itself; forking
servers (sshd forks a monitor and a session process per SSH connection) are
covered by walking the children of those roots through ``/proc/*/stat``.  Only
descendants of processes we started are ever looked at.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces or parens)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ..." -> fields[0] is state, fields[1] ppid, [11] utime, [12] stime
    return raw[raw.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process visible now."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def descendants(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """All live descendants of ``root`` (not ``root`` itself), bounded walk."""
    kids = children_map() if kids is None else kids
    out: list[int] = []
    todo = list(kids.get(root, []))
    while todo and len(out) < 100_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone or is a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0.0 if gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def total_rss_kib(pids: Iterable[int]) -> int:
    return sum(rss_kib(p) for p in set(pids))


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    """pid -> CPU seconds, for a before/after difference."""
    return {p: cpu_seconds(p) for p in set(pids)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots.

    A process that appeared in between counts from zero; one that vanished
    loses its time (the tunnels measured keep their processes for the whole
    transfer, so this does not happen in practice).
    """
    return sum(max(0.0, t - before.get(p, 0.0)) for p, t in after.items())


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""
