"""Keep the C allocator from handing large buffers back to the kernel between tiles.

glibc serves allocations above a moving threshold with fresh ``mmap`` pages and returns freed
memory at the top of the heap to the kernel. A sliding window allocates and frees the same
large activation buffers for every tile, so each tile pays for those pages again: on the 2-CPU
machine an 8192² analysis took 1.6 million minor page faults and 2.8 s of system time. Serving
every buffer up to glibc's largest mmap threshold from the heap, and keeping freed heap memory,
leaves 0.12 million and 0.3 s, 1.16x faster for 13 MB more peak RSS (benchmarks/README.md, ``allocator``; a
later run, with the hand-back below and 0.57 million faults under the defaults, 1.04x for 16 MB more).

:func:`tune_allocator` is process-wide, so called once by the programs (the CLI, the service, Ray
workers), never by the library functions themselves. What it keeps is only worth keeping for the next
tile: the sliding windows hand freed memory back every :data:`RELEASE_EVERY_TILES` tiles and when they
end (:func:`release_every`), which took a 32768² phantom's nuclei pass from 699 to 487 MB RSS at its
peak at the same speed (benchmarks/README.md, ``run_profile``).
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
#: Tiles between two hand-backs of freed memory in a sliding window (0: only when it ends; the
#: benchmarks set it to -1 to measure without). Freed tile buffers otherwise pile up between
#: long-lived results in the heap, which glibc cannot trim from its top.
RELEASE_EVERY_TILES = 64


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


def release_freed_memory() -> bool:
    """Hand memory the process has freed back to the kernel (glibc ``malloc_trim``); True when it ran.

    :func:`tune_allocator` keeps up to 512 MB of freed heap so that the next tile reuses it; between the
    phases of an analysis (the segmentation's tile buffers before the nuclei's, the last slide's before
    the next) that memory is only RSS. Releasing it costs the next phase one page fault per page it takes
    back, not one per tile. A no-op (False) off Linux or without ``malloc_trim``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
    return True


def release_every(tiles_before: int, tiles_after: int, *, finished: bool = False) -> None:
    """:func:`release_freed_memory` when a sliding window's tile count passes a multiple of
    :data:`RELEASE_EVERY_TILES`, and once when it has ``finished`` (read at call time; -1: never)."""
    n = RELEASE_EVERY_TILES
    if n < 0:
        return
    if finished or (n > 0 and tiles_after // n > tiles_before // n):
        release_freed_memory()
