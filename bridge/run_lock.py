"""One `pdl1 run` at a time per project (or per ``--out`` folder).

Two runs writing one project would interleave their run status and, through paquo, their
``data.qpdata`` writes; the second run is refused instead, naming the first. The lock is a file
created exclusively (``<folder>/pdl1/run.lock``, holding who made it) and removed when the run ends,
also on Ctrl-C. A lock left by a run that died on this machine is taken over; one from another
machine is not guessed about.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.project import PDL1_DIR, ProjectError

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would signal the process there; assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # being written this instant, or damaged: treat as held
        return {}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold ``<folder>/pdl1/run.lock`` for the duration; :class:`ProjectError` if another run holds it."""
    path = folder / PDL1_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            pid = holder.get("pid")
            stale = holder.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid)
            if stale and attempt == 0:
                path.unlink(missing_ok=True)  # its run died without cleaning up
                continue
            who = f"pid {pid} on {holder.get('host', '?')} since {holder.get('started', '?')}" if holder else "?"
            raise ProjectError(
                f"{folder}: another pdl1 run is writing here ({who}); wait for it to finish, or delete {path} "
                "if that run is no longer going"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
