"""Keep PyTorch's CPU threads from spinning when another process wants the cores.

PyTorch's Linux CPU wheels run their thread pool on GNU OpenMP (libgomp). At the end of every parallel
region its threads spin for :envvar:`GOMP_SPINCOUNT` iterations (300 000 by default, milliseconds)
before they sleep. On a quiet machine that saves a wake-up per layer; beside any other busy process
(QuPath, a second run, a test suite) it is a trap: a thread descheduled in the middle of a layer holds
up its peers, which spin on the very core it needs. On the 2-CPU machine (benchmarks/README.md,
``cpu_contention``) one busy process beside ``pdl1 run``'s analysis of a 4096² phantom made it 3-15x
slower with libgomp's default (5-27 s against 1.7 s quiet; its CPU time rose from 3 to 7-20 s of
spinning), against 3.1-4.2 s with 1 000 spins. Quiet, 1 000 spins cost 0-7 % (OMP's passive policy,
no spinning, 10-20 %), and it spends a fifth less CPU time.

libgomp reads the variable once, when PyTorch loads it, so :func:`tune_openmp` must run before the
first ``import torch`` of the process: the programs (the CLI, hence the service and Ray workers started
from it) call it at start-up, never the library functions. A wait policy the user set
(:envvar:`OMP_WAIT_POLICY` or :envvar:`GOMP_SPINCOUNT`) is kept: ``OMP_WAIT_POLICY=ACTIVE pdl1 run ...``
restores the spinning.
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
