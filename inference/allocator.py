"""Keep the C allocator from handing large buffers back to the kernel between tiles.

glibc serves allocations above a moving threshold with fresh ``mmap`` pages and returns freed
memory at the top of the heap to the kernel. A sliding window allocates and frees the same
large activation buffers for every tile, so each tile pays for those pages again: on the 2-CPU
machine an 8192² analysis took 1.6 million minor page faults and 2.8 s of system time. Serving
every buffer up to glibc's largest mmap threshold from the heap, and keeping freed heap memory,
leaves 0.12 million and 0.3 s, 1.16x faster for 13 MB more peak RSS (benchmarks/README.md, ``allocator``).

Process-wide, so called once by the programs (the CLI, the service, Ray workers), never by the
library functions themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger blocks
# (a whole-slide map) still get their own pages and go back to the kernel when freed.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
TOP_PAD_BYTES = 64 * 1024 * 1024


def tune_allocator() -> bool:
    """Set glibc's malloc so freed tile buffers stay in the process; True when it was set.

    A no-op (False) off Linux or on a C library without ``mallopt`` (musl): nothing else changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Each call answers 1 on success; the mmap threshold is set first, which also stops glibc
    # from raising it (and lowering the others) by itself.
    done = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    if not done:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return done
