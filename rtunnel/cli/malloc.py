"""
Fixed glibc malloc thresholds for the tunnel processes.

glibc serves an allocation above C{M_MMAP_THRESHOLD} with a fresh C{mmap},
and gives free memory at the top of the heap back to the kernel once it
exceeds C{M_TRIM_THRESHOLD}; both start low (128 KiB) and move with the
allocation history. rtunnel's data path allocates and frees buffers of
64 KiB to a few MiB thousands of times a second (256 KiB socket reads, TLS
output, frames), several alive at once. Depending on the order of its first
large allocations, a process then either reuses heap memory or settles into
trimming the heap and faulting every buffer in afresh. Measured here (one
process pair, 1 GiB per round, docs/performance.md): ~500 page faults per
GiB moved in the good mode, ~260,000 (one per 4 KiB) and 35-45 % less
throughput in the bad one, which a process fell into in about half of the
runs, making results bimodal from run to run.

Fixed thresholds (setting them also turns glibc's adjustment off) leave only
the good mode: buffers up to 4 MiB come from the heap, and up to 32 MiB of
freed heap stays mapped for reuse (the most a quiet process keeps beyond
what it uses).

Applied by the twistd plugins, which own their process. An application
that embeds rtunnel decides for itself: call L{tune_malloc} or set
C{GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432}.
An operator's own malloc settings in the environment are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc(environ: dict[str, str] | None = None) -> bool:
    """
    Fix glibc's mmap and trim thresholds (see the module doc).

    @param environ: the environment to look for the operator's own malloc
        settings in (default: C{os.environ}).
    @return: whether the thresholds were set: C{False} off Linux, with
        another C library, or when the environment already tunes malloc.
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(name in env for name in _OPERATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
