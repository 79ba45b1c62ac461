"""The signals a ``pdl1`` command takes as a Ctrl-C, and keeping their handlers across code that replaces them.

`kill`'s and a job scheduler's default (SIGTERM) and a closed terminal (SIGHUP) stop a command as a Ctrl-C does
(:func:`bridge.cli.entry.stop_on_termination`), so what a Ctrl-C cleans up they clean up too. Libraries that put
their own handlers in (``ray.init``'s SIGTERM handler aborts in Ray's C++ core) are wrapped by
:func:`termination_handlers` and :func:`restore_handlers`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

# Each is delivered as a SIGINT, so what a Ctrl-C cleans up they clean up too (a half-written dataset or model folder
# beside its target, staged files), held as it is while torch imports, and the command says what it stopped;
# uncaught, they ended it where it stood and left a hidden half-written folder for good. `pdl1 serve`'s uvicorn
# takes them over for its own graceful shutdown.
STOPPING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def termination_handlers() -> dict[int, Any]:
    """The handlers of :data:`STOPPING_SIGNALS` now (main thread only: elsewhere none are set, and none read)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}


def restore_handlers(handlers: dict[int, Any]) -> None:
    """Put back what :func:`termination_handlers` read; a handler set from outside Python (None) is left as it is."""
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)
