"""Keep PyTorch's CPU threads from spinning when another process wants the cores.

PyTorch's Linux CPU wheels run their thread pool on GNU OpenMP (libgomp). At the end of every parallel
region its threads spin for :envvar:`GOMP_SPINCOUNT` iterations (300 000 by default, milliseconds)
before they sleep. On a quiet machine that saves a wake-up per layer; beside any other busy process
(QuPath, a second run, a test suite) it is a trap: a thread descheduled in the middle of a layer holds
up its peers, which spin on the very core it needs. On the 2-CPU machine (benchmarks/README.md,
``cpu_contention``, 2026-12-05) ``pdl1 run``'s analysis of a 4096² phantom took a median 5.5 s beside one
busy process and 25.9 s beside two with libgomp's default (single runs up to 35 and 69 s, and once 23.6 s on
a machine thought quiet), against 3.1 and 4.0 s with 1 000 spins, which cost 4 % when quiet (1.99 s against
1.92; OpenMP's passive policy, no spinning at all, 9 %) and spend less CPU time (3.2 s against 3.6).

libgomp reads the variable once, when PyTorch loads it, so :func:`tune_openmp` must run before the
first ``import torch`` of the process: the programs (the CLI, hence the service and Ray workers started
from it) call it at start-up, never the library functions. A wait policy the user set
(:envvar:`OMP_WAIT_POLICY` or :envvar:`GOMP_SPINCOUNT`) is kept: ``GOMP_SPINCOUNT=300000 pdl1 run ...``
restores libgomp's default.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

#: Spins before an idle OpenMP thread sleeps (libgomp's default: 300 000).
SPIN_COUNT = 1000
#: The variables that state a wait policy; any of them set by the user wins.
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def tune_openmp(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Set :data:`SPIN_COUNT` for libgomp in ``environ`` (the process's environment); True when it was set.

    False, and nothing changed, when the user already states a wait policy or PyTorch is loaded (too
    late: libgomp has read its settings).
    """
    if any(name in environ for name in WAIT_POLICY_VARIABLES):
        return False
    if "torch" in sys.modules:
        log.debug("torch is loaded: libgomp's spin count stays as it read it")
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
