"""One `pdl1 run` at a time per project (or per ``--out`` folder).

Two runs writing one project would interleave their run status and, through paquo, their
``data.qpdata`` writes; the second run is refused instead, naming the first. The lock is a file
created exclusively (``<folder>/pdl1/run.lock``, holding who made it) and removed when the run ends,
also on Ctrl-C. Its content is written to a temporary file first and hard-linked into place, so a
full disk fails the run with no lock left behind. A lock left by a run that died on this machine is
taken over, and so is an empty or unreadable one older than a minute; a whole one from another
machine is not guessed about.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.project import PDL1_DIR, ProjectError, unwritable_fix

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
STALE_UNREADABLE_S = 60.0  # an empty or unreadable lock older than this is left by a run that died


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


def _write_holder(folder: Path, me: dict[str, Any]) -> Path:
    """The lock's content in a temporary file of its own, on disk before it can become the lock."""
    tmp = folder / f"{LOCK_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _place(tmp: Path, path: Path) -> None:
    """Make ``tmp`` the lock, or raise FileExistsError: a hard link is atomic and exclusive, so the lock
    never exists without its content. Where hard links are refused (some network or FAT drives) it is
    created exclusively and written in one call, and removed again if that write fails."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:  # no hard links on this drive
        pass
    data = tmp.read_bytes()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _stale(path: Path, holder: dict[str, Any], host: str) -> bool:
    """A lock nobody holds: its run died on this machine, or it is empty or unreadable and old (a run
    that died before writing it; one writing it right now would have finished within the minute)."""
    pid = holder.get("pid")
    if holder:
        return holder.get("host") == host and isinstance(pid, int) and not _alive(pid)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > STALE_UNREADABLE_S


@contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold ``<folder>/pdl1/run.lock`` for the duration; :class:`ProjectError` if another run holds it."""
    path = folder / PDL1_DIR / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only folder or drive was "[Errno 30] Read-only file system: 'out'"
        raise ProjectError(
            f"{folder}: cannot write there ({err.strerror or err}: {err.filename}); nothing was started; the run "
            f"writes its results and its lock under {path.parent}: give a folder you can write to (--out for "
            "plain slides), or make this one writable"
        ) from err
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    try:
        tmp = _write_holder(path.parent, me)
    except OSError as err:
        raise ProjectError(
            f"{path}: cannot write the run lock ({err.strerror or err}); nothing was started or left behind; "
            f"{unwritable_fix(err)}, and run again"
        ) from err
    try:
        for attempt in range(2):
            try:
                _place(tmp, path)
            except FileExistsError:
                holder = _holder(path)
                if attempt == 0 and _stale(path, holder, me["host"]):
                    try:
                        path.unlink(missing_ok=True)  # its run died without cleaning up
                    except OSError as err:  # a folder of that name, or a file we may not remove: was a traceback
                        what = (
                            "a folder where the run lock goes" if path.is_dir() else "a run lock no running pdl1 holds"
                        )
                        raise ProjectError(
                            f"{path}: {what}, which cannot be removed ({err.strerror or err}); nothing was started: "
                            "delete it (or have its owner delete it) and run again"
                        ) from err
                    continue
                pid = holder.get("pid")
                who = (
                    f"pid {pid} on {holder.get('host', '?')} since {holder.get('started', '?')}"
                    if holder
                    else "an empty or unreadable lock, less than a minute old"
                )
                raise ProjectError(
                    f"{folder}: another pdl1 run is writing here ({who}); wait for it to finish, or delete {path} "
                    "if that run is no longer going"
                ) from None
            except OSError as err:
                raise ProjectError(
                    f"{path}: cannot create the run lock ({err.strerror or err}); {unwritable_fix(err)}, and run again"
                ) from err
            break
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


_PART = re.compile(r".+\.[0-9a-f]{12}\.part")  # bridge.atomic's and the backups' temporary files: <name>.<12 hex>.part
_QPDATA_PART = re.compile(r"data\.qpdata.*\.[0-9a-f]{12}\.part")  # a data.qpdata backup or restore being copied
_LOCK_TMP = re.compile(re.escape(LOCK_FILE) + r"\.\d+\.[0-9a-f]{8}\.tmp")  # run_lock's holder before it is linked
_LOCK_TMP_STALE_S = 60  # a live run links its holder within milliseconds of writing it


def remove_orphan_parts(folder: Path, *, plain_slides: bool) -> list[Path]:
    """Remove the temporary files a killed run (or review-queue) left in this run's own folders.

    Called with the run lock held, so no other run of this folder is writing them. Only names the
    bridge makes are removed, and only where runs write: ``pdl1/`` (status, sidecars; ``pdl1/report``
    is left to ``pdl1 report``, which takes no lock), for plain slides the ``--out`` folder itself,
    for a project the copies of ``data.qpdata`` its backups go through (``data/<id>/``), and run-lock
    holders older than a minute that never became the lock.
    """
    pdl1 = folder / PDL1_DIR
    candidates = [p for p in pdl1.rglob("*.part") if (pdl1 / "report") not in p.parents]
    if plain_slides:
        candidates += folder.glob("*.part")
    else:
        candidates += [p for p in folder.glob("data/*/*.part") if _QPDATA_PART.fullmatch(p.name)]
    stale = time.time() - _LOCK_TMP_STALE_S
    candidates += [p for p in pdl1.glob(f"{LOCK_FILE}.*.tmp") if _LOCK_TMP.fullmatch(p.name) and _mtime(p) < stale]
    removed = []
    for path in sorted(candidates):
        if (_PART.fullmatch(path.name) or _LOCK_TMP.fullmatch(path.name)) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning(
            "removed %d unfinished file(s) an interrupted run left (first: %s); the files they were to replace "
            "are as that run left them",
            len(removed),
            removed[0],
        )
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile
        return time.time()
