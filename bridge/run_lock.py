"""One `pdl1 run` at a time per project (or per ``--out`` folder).

Two runs writing one project would interleave their run status and, through paquo, their
``data.qpdata`` writes; the second run is refused instead, naming the first. The lock is a file
created exclusively (``<folder>/pdl1/run.lock``, holding who made it) and removed when the run ends,
also on Ctrl-C. Its content is written to a temporary file first and hard-linked into place, so a
full disk fails the run with no lock left behind. A lock left by a run that died on this machine is
taken over, and so is an empty or unreadable one older than a minute; a whole one from another
machine is not guessed about. Commands that read a project's objects (``pdl1 train``, ``pdl1 export
nnunet``) hold the same lock while they read (:func:`project_read_lock`), so a read never sees a run
half-way. A lock held by such a read (or by ``pdl1 review-queue``: work of seconds to minutes, whose lock
says what it does) is waited for, up to :data:`WAIT_FOR_SHORT_HOLDER_S`, saying so; a lock held by a run
(hours) is not: the command is refused at once, naming the run.
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bridge.atomic import empty_folders_removed
from bridge.project import PDL1_DIR, ProjectError, first_names, not_a_folder, unwritable_fix

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
STALE_UNREADABLE_S = 60.0  # an empty or unreadable lock older than this is left by a run that died
# A read of a project's objects or a ranking takes seconds to minutes: two `pdl1 train` of one project started
# together, or a run started during a read, wait for it rather than fail. A run's lock (hours) is never waited for.
WAIT_FOR_SHORT_HOLDER_S = 600.0
_POLL_S = 0.5
_REWRITE_TRIES = 3  # a waiting holder's file written again, where its folder goes between making it and writing


class RunLockBusyError(ProjectError):
    """The lock is held by a live process (another run, or a read of the project): nothing was started."""


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


def _process_start(pid: int) -> str | None:
    """Which start of process ``pid`` runs now, where the system says (Linux: the boot's id and the start time in
    clock ticks since boot, from /proc), else None. A lock naming a pid alive now but started otherwise was left by a
    run that died, its pid since given to another process (after a reboot, often), which kept every run out."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command's name, which may hold spaces and parentheses
    return f"{boot}/{fields[19]}" if len(fields) > 19 else None  # field 22, starttime


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # being written this instant, or damaged: treat as held
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(path: Path, me: dict[str, Any]) -> Path:
    """The content of the lock ``path`` in a temporary file of its own, on disk before it can become the lock."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _kept_fresh(tmp: Path, path: Path, me: dict[str, Any], lock: str) -> Path:
    """A waiting holder's file ``tmp`` touched: the lock holder's remove_orphan_parts takes one a minute old for a
    dead run's. Written again where it was taken all the same, and the pdl1 folder with it, which a read that made it
    removes when it leaves it empty (also between making it again and writing into it: a few tries)."""
    try:
        os.utime(tmp)
        return tmp
    except FileNotFoundError:
        pass
    for _ in range(_REWRITE_TRIES):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return _write_holder(path, me)
        except FileNotFoundError:
            continue
    raise ProjectError(
        f"{path.parent}: the folder of the {lock} was removed {_REWRITE_TRIES} times while this command waited to "
        "take it; nothing was started: run again once nothing else works on the project"
    )


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
        if holder.get("host") != host or not isinstance(pid, int):
            return False
        started = holder.get("process_start")  # absent in a lock of an earlier version, or where /proc is not
        return not _alive(pid) or (isinstance(started, str) and _process_start(pid) not in (None, started))
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > STALE_UNREADABLE_S


def _live_holder(path: Path) -> dict[str, Any] | None:
    """What the lock ``path`` holds where a live process holds it (empty for an unreadable one under a minute
    old); None where there is no lock, or a stale one (:func:`_stale`)."""
    if not path.is_file():
        return None
    holder = _holder(path)
    return None if _stale(path, holder, socket.gethostname()) else holder


def _doing(holder: dict[str, Any]) -> str | None:
    """What a holder said it does (a read of the project, a ranking); None for a run, which says nothing."""
    doing = holder.get("doing")
    return doing if isinstance(doing, str) else None


def _short_holder(holder: dict[str, Any]) -> bool:
    """A holder worth waiting for: one that says what it does (:func:`_doing`) and is another process (a process
    waiting for its own lock would wait forever)."""
    return _doing(holder) is not None and holder.get("pid") != os.getpid()


def _who(holder: dict[str, Any]) -> str:
    """Who holds a lock, from what it holds (:func:`_held` writes it)."""
    if not holder:
        return "an empty or unreadable lock, less than a minute old"
    return f"pid {holder.get('pid')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


@contextmanager
def run_lock(folder: Path, *, doing: str | None = None, wait_s: float = WAIT_FOR_SHORT_HOLDER_S) -> Iterator[Path]:
    """Hold ``<folder>/pdl1/run.lock`` for the duration; :class:`RunLockBusyError` if another run holds it (at once),
    or a read of the project (:func:`project_read_lock`) or a ranking still holds it after ``wait_s`` seconds of
    waiting; :class:`ProjectError` if ``<folder>/pdl1`` cannot be made (a file in its place is named, with the fix).
    ``doing``: what another command refused meanwhile is told holds the lock (``pdl1 review-queue is ranking the
    project here``); None: a run writing there."""
    path = folder / PDL1_DIR / LOCK_FILE
    in_the_way = not_a_folder(path.parent)
    if in_the_way is not None:  # was "cannot write there (File exists: proj/pdl1) ... make this one writable"
        raise ProjectError(
            f"{folder}: {path.parent} {in_the_way}, but the run keeps its results and its lock in a folder there; "
            "nothing was started: move or rename that file, and run again"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only folder or drive was "[Errno 30] Read-only file system: 'out'"
        raise ProjectError(
            f"{folder}: cannot write there ({err.strerror or err}: {err.filename}); nothing was started; the run "
            f"writes its results and its lock under {path.parent}: give a folder you can write to (--out for "
            "plain slides), or make this one writable"
        ) from err
    with _held(
        path,
        busy=lambda who, theirs: (
            f"{folder}: {theirs or 'another pdl1 run is writing here'} ({who}); wait for it to finish, "
            f"or delete {path} if {'that run' if theirs is None else 'it'} is no longer going"
        ),
        doing=doing,
        wait_s=wait_s,
    ):
        yield path


def run_in_progress(folder: Path) -> str | None:
    """Who is running ``pdl1 run`` on ``folder`` now (its run lock's live holder, as the lock's messages name it), or
    None: no lock, a stale one, or one held by a read or a ranking (which change no results). For readers that take
    no lock (``pdl1 report``), to say their results may be half old, half new."""
    holder = _live_holder(folder / PDL1_DIR / LOCK_FILE)
    if not holder or _doing(holder) is not None:
        return None
    return _who(holder)


@contextmanager
def project_read_lock(folder: Path, *, reader: str, wait_s: float = WAIT_FOR_SHORT_HOLDER_S) -> Iterator[None]:
    """Hold the project's run lock (``<folder>/pdl1/run.lock``, :func:`run_lock`'s) while ``reader`` (the command,
    as its messages name it: ``pdl1 train``) reads the project's objects, so the read never sees a ``pdl1 run``
    half-way through replacing them, and a run started meanwhile waits for the read (up to its ``wait_s``, then is
    refused, naming the read). Only for the read: what follows it (training, minutes to hours) holds no lock.

    A live run holding the lock is a :class:`RunLockBusyError` saying who and what to do; another read (or a ranking)
    is waited for, up to ``wait_s`` seconds, and then is one. Where the
    lock cannot be taken (a project on a read-only drive, a folder this user may not write) the project is read
    without it, with a warning, unless a live process holds it; where a file named ``pdl1`` stands in its folder's
    place no run can write the project, and it is read without a word. A ``pdl1`` folder made for the lock is removed
    again where nothing else was put in it.
    """
    path = folder / PDL1_DIR / LOCK_FILE

    def busy(who: str, theirs: str | None) -> str:
        if theirs is not None:  # another read of the same project (pdl1 train, pdl1 export nnunet)
            return (
                f"{folder}: {theirs} ({who}); {reader} reads the project while nothing else holds its run lock: wait "
                f"for that to finish (a read takes seconds to minutes) and run {reader} again, or delete {path} if it "
                "is no longer going"
            )
        return (
            f"{folder}: a pdl1 run is writing here ({who}), and {reader} reads the project only while no run writes "
            f"it (a run replaces the objects it reads); wait for the run to finish and run {reader} again, or delete "
            f"{path} if that run is no longer going"
        )

    if not_a_folder(path.parent) is not None:  # no run can lock, so none can write, the project
        yield
        return
    with empty_folders_removed(path.parent), ExitStack() as held:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(
                _held(path, busy=busy, doing=f"{reader} is reading the project's objects here", wait_s=wait_s)
            )
        except RunLockBusyError:
            raise
        except (OSError, ProjectError) as err:  # the lock cannot be written: read without it, unless it is held
            holder = _live_holder(path)
            if holder is not None:
                raise RunLockBusyError(busy(_who(holder), _doing(holder))) from err
            log.warning(
                "%s: %s reads the project without its run lock, which it cannot take (%s); a pdl1 run started on the "
                "project meanwhile is not refused, so start none until it has read the labels",
                folder,
                reader,
                err,
            )
        yield


@contextmanager
def _held(
    path: Path,
    *,
    busy: Callable[[str, str | None], str],
    lock: str = "run lock",
    doing: str | None = None,
    wait_s: float = 0.0,
) -> Iterator[None]:
    """Hold the lock file ``path`` (its folder exists) for the duration; :class:`RunLockBusyError` with
    ``busy(who, theirs)`` where a live process holds it (``theirs``: what its holder said it does, None for a run).
    A holder that says what it does (:func:`_short_holder`) is waited for, up to ``wait_s`` seconds, with a warning
    when the wait begins. ``lock``: what the messages call it; ``doing``: what this holder says it does (kept in the
    lock, for the messages of others refused meanwhile)."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        **({} if doing is None else {"doing": doing}),
        **({} if (started := _process_start(os.getpid())) is None else {"process_start": started}),
    }
    try:
        tmp = _write_holder(path, me)
    except OSError as err:
        raise ProjectError(
            f"{path}: cannot write the {lock} ({err.strerror or err}); nothing was started or left behind; "
            f"{unwritable_fix(err)}, and run again"
        ) from err
    deadline = time.monotonic() + wait_s
    taken_over = waiting = False
    try:
        while True:
            try:
                _place(tmp, path)
            except FileExistsError:
                holder = _holder(path)
                if not taken_over and _stale(path, holder, me["host"]):
                    taken_over = True
                    try:
                        path.unlink(missing_ok=True)  # its run died without cleaning up
                    except OSError as err:  # a folder of that name, or a file we may not remove: was a traceback
                        what = f"a folder where the {lock} goes" if path.is_dir() else f"a {lock} no running pdl1 holds"
                        raise ProjectError(
                            f"{path}: {what}, which cannot be removed ({err.strerror or err}); nothing was started: "
                            "delete it (or have its owner delete it) and run again"
                        ) from err
                    continue
                theirs = _doing(holder)
                if _short_holder(holder) and time.monotonic() < deadline:
                    if not waiting:
                        waiting = True
                        log.warning(
                            "%s: %s (%s); waiting for it to finish (up to %.0f s)", path, theirs, _who(holder), wait_s
                        )
                    time.sleep(_POLL_S)
                    tmp = _kept_fresh(tmp, path, me, lock)
                    continue
                said = busy(_who(holder), theirs)
                if waiting:
                    said += f" (waited {wait_s:.0f} s for it)"
                raise RunLockBusyError(said) from None
            except OSError as err:
                raise ProjectError(
                    f"{path}: cannot create the {lock} ({err.strerror or err}); {unwritable_fix(err)}, and run again"
                ) from err
            break
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


# bridge.atomic's and the backups' temporary files, <name>.<12 hex>.part; the group is the file it replaces.
_PART = re.compile(r"(.+)\.[0-9a-f]{12}\.part")
_QPDATA_PART = re.compile(r"data\.qpdata.*\.[0-9a-f]{12}\.part")  # a data.qpdata backup or restore being copied
_LOCK_TMP = re.compile(re.escape(LOCK_FILE) + r"\.\d+\.[0-9a-f]{8}\.tmp")  # run_lock's holder before it is linked
# A live run links its holder within milliseconds of writing it, or keeps it fresh while it waits (_held).
_LOCK_TMP_STALE_S = 60


def remove_orphan_parts(folder: Path, *, plain_slides: bool) -> list[Path]:
    """Remove the temporary files a killed run (or review-queue) left in this run's own folders.

    Called with the run lock held, so no other run of this folder is writing them. Only names the
    bridge makes are removed, and only where runs write: ``pdl1/`` (status, sidecars; ``pdl1/report``
    is left to ``pdl1 report``, which cleans it under that folder's own lock, :func:`output_folder_lock`),
    for plain slides the ``--out`` folder itself, for a project the copies of ``data.qpdata`` its backups
    go through (``data/<id>/``), and run-lock holders older than a minute that never became the lock.
    """
    pdl1 = folder / PDL1_DIR
    candidates = [p for p in pdl1.rglob("*.part") if (pdl1 / "report") not in p.parents]
    if plain_slides:
        candidates += folder.glob("*.part")
    else:
        candidates += [p for p in folder.glob("data/*/*.part") if _QPDATA_PART.fullmatch(p.name)]
    stale = time.time() - _LOCK_TMP_STALE_S
    candidates += [p for p in pdl1.glob(f"{LOCK_FILE}.*.tmp") if _LOCK_TMP.fullmatch(p.name) and _mtime(p) < stale]
    return _removed(
        (p for p in candidates if _PART.fullmatch(p.name) or _LOCK_TMP.fullmatch(p.name)), left_by="an interrupted run"
    )


def _removed(paths: Iterable[Path], *, left_by: str) -> list[Path]:
    """Remove the files among ``paths`` (in name order) and warn once of what ``left_by`` left; the removed."""
    removed = []
    for path in sorted(paths):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning(
            "removed %d unfinished file(s) %s left (first: %s); the files they were to replace are as it left them",
            len(removed),
            left_by,
            removed[0],
        )
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile
        return time.time()


OUTPUT_LOCK_FILE = ".pdl1-output.lock"  # in a folder `pdl1 report` or `pdl1 eval` writes, while it writes there
_OUTPUT_LOCK_TMP = re.compile(re.escape(OUTPUT_LOCK_FILE) + r"\.\d+\.[0-9a-f]{8}\.tmp")


@contextmanager
def output_folder_lock(
    folder: Path,
    *,
    command: str,
    own: Callable[[str], bool],
    written_before: Callable[[Path], bool] | None = None,
    writes: str = "",
) -> Iterator[list[Path]]:
    """Hold ``<folder>/.pdl1-output.lock`` while ``pdl1 <command>`` writes ``folder`` (made where missing), and
    first remove what a killed one left there: the staged files (``<name>.<12 hex>.part``) of the names
    ``own(name)`` says it writes, and lock holders older than a minute that never became the lock. Yields the
    files removed.

    The lock is that folder's, not the project's run lock: only these commands write there (a run neither writes
    ``pdl1/report`` nor an eval's folder), so a report taken while a run goes on is not refused, and ``--out``
    folders outside any project are covered too. While it is held no other report or eval writes the folder, so
    a staged file there is one that a killed one left (a lock a dead process left is taken over, as the run
    lock's is). An age rule would not know: a report drawing the thumbnails of a slow drive's slides, or a process
    stopped with Ctrl-Z, leaves its staged files unchanged for as long as it likes. Another process's files there
    (names ``own`` does not claim) are left alone. Folders this made are removed again where nothing was written
    into them (a refused eval leaves no empty ``--out``).

    ``written_before(folder)``: whether the folder holds this command's earlier output (its own mark), which it
    replaces; a folder holding other files and no such output is refused, naming them and ``writes`` (what it
    writes there). Without it any folder is taken (the command's own default folder).
    """
    if written_before is not None:
        refuse_foreign_folder(folder, written_before=written_before, command=command, writes=writes)
    with empty_folders_removed(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ProjectError(
                f"{folder}: cannot write there ({err.strerror or err}: {err.filename}); nothing was written: give a "
                "folder you can write to, or make this one writable"
            ) from err
        path = folder / OUTPUT_LOCK_FILE
        with _held(
            path,
            busy=lambda who, _theirs: (
                f"{folder}: another pdl1 {command} is writing here ({who}); wait for it to finish, or give another "
                f"folder, or delete {path} if that one is no longer going"
            ),
            lock=f"lock of {folder}",
        ):
            yield remove_orphan_outputs(folder, own=own)


def refuse_foreign_folder(folder: Path, *, written_before: Callable[[Path], bool], command: str, writes: str) -> None:
    """Refuse ``--out folder`` where it holds files (other than a lock or staged files) and no earlier output of
    ``pdl1 command`` (``written_before``): its files of the names the command writes would be replaced. ``pdl1
    report --out`` a folder of PNG slides replaced a slide with its thumbnail, and ``--out PROJECT/pdl1`` the
    run's targets.csv; ``pdl1 eval --out`` a user's metrics.csv."""
    try:
        names = sorted(p.name for p in folder.iterdir() if not _own_or_system_file(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return
    if not names or written_before(folder):
        return
    shown = first_names(names)
    raise ProjectError(
        f"--out {folder} holds other files ({shown}) and no earlier pdl1 {command}; {writes} there, and would replace "
        "files of those names: give a new or empty folder"
    )


# What a file manager puts in any folder it shows: no user's file the output would replace.
_SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _own_or_system_file(name: str) -> bool:
    """The output lock, its holders' temporary files and staged files (a killed command's), a file manager's files."""
    return (
        name == OUTPUT_LOCK_FILE
        or _OUTPUT_LOCK_TMP.fullmatch(name) is not None
        or _PART.fullmatch(name) is not None
        or name in _SYSTEM_FILES
    )


def remove_orphan_outputs(folder: Path, *, own: Callable[[str], bool]) -> list[Path]:
    """Remove the staged files of the names ``own`` claims in ``folder`` (not below it), and output-lock holders
    older than a minute; called with the folder's lock held (:func:`output_folder_lock`)."""
    stale = time.time() - _LOCK_TMP_STALE_S

    def ours(path: Path) -> bool:
        match = _PART.fullmatch(path.name)
        return (match is not None and own(match.group(1))) or (
            _OUTPUT_LOCK_TMP.fullmatch(path.name) is not None and _mtime(path) < stale
        )

    return _removed(filter(ours, folder.iterdir()), left_by="an interrupted one")
