"""Files and folders replaced in one step: written beside the target, then renamed over it."""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TextIO


@contextlib.contextmanager
def replace_atomically(path: Path, *, newline: str | None = None) -> Iterator[TextIO]:
    """Open a text file (UTF-8) that replaces ``path`` when the ``with`` block ends without error.

    ``newline`` as :func:`open`'s (``""`` for the :mod:`csv` module).

    Readers see the old file or the new one, never half of one; after an error (or a crash)
    the old file is untouched and the temporary one is gone. The temporary file is made with
    ``open(..., "x")``, not ``tempfile.mkstemp``: mkstemp creates files readable by their
    owner only, which would lock colleagues out of a project on a shared drive. A new file
    gets the permissions the umask gives; a replaced file keeps its own.
    """
    with _replacing(path, "x", encoding="utf-8", newline=newline) as fh:
        yield fh


@contextlib.contextmanager
def _replacing(path: Path, mode: str, **open_kwargs) -> Iterator[IO]:
    """A file opened with ``mode`` (``"x"`` or ``"xb"``) beside ``path`` that replaces it when the block ends
    without error (:func:`replace_atomically`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_together(record: Path) -> Iterator[Callable[..., IO]]:
    """Files that replace theirs together when the ``with`` block ends without error, ``record`` last.

    ``record`` is the file that says what produced the others (an evaluation's ``provenance.json``). The block
    opens each new file with ``open_new(path, newline=None, binary=False)`` (UTF-8 text, ``newline`` as
    :func:`open`'s, or bytes) and writes it. Nothing is renamed before all are written: after an error (or a crash
    before the end) every earlier file is as it was and no temporary one is left. Then the old ``record`` is
    removed, the others are renamed into place in the order they were opened, and the new ``record`` (where
    one was opened) comes last.

    Why that order: the renames happen one at a time, so between them some files are new and some old, and a
    reader pairs them by ``record``. Gone before the first rename and back only after the last, ``record`` never
    stands beside a file it does not describe: a reader finds the old files with the old record, files being
    replaced with none, or the new files with the new one. (Renamed first, as the last-in-first-out exits of an
    ExitStack of :func:`replace_atomically` did, the new record stood beside the old files; renamed last
    without the removal, the old record would stand beside the new ones.) Where no new ``record`` is opened,
    the old one is removed all the same: the files it described are replaced.

    Permissions as :func:`replace_atomically` gives them.
    """
    staged: list[tuple[Path, Path, IO]] = []
    # Every temporary file's name, taken before it is made: a Ctrl-C between its open and its place in staged left it.
    temporary: list[Path] = []

    def open_new(path: Path, *, newline: str | None = None, binary: bool = False) -> IO:
        if any(path == target for target, _, _ in staged):
            raise ValueError(f"{path} is opened twice among the files replaced together; write it once")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
        temporary.append(tmp)
        fh = open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8", newline=newline)  # noqa: SIM115
        staged.append((path, tmp, fh))
        return fh

    try:
        yield open_new
        for path, tmp, fh in staged:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                shutil.copymode(path, tmp)
        record.unlink(missing_ok=True)
        for path, tmp, _ in sorted(staged, key=lambda s: s[0] == record):  # a stable sort: the record last
            os.replace(tmp, path)
    except BaseException:
        for _, _, fh in staged:
            # Closing flushes what is still buffered, which on a full disk fails again (the file is closed all the
            # same): raised here, it left every temporary file on the disk that had no room.
            with contextlib.suppress(OSError):
                fh.close()
        for tmp in temporary:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_replaced_whole(path: Path) -> Iterator[Path]:
    """A new folder to fill that becomes ``path`` (absent, or an empty folder) when the ``with`` block ends
    without error; after an error, a Ctrl-C or a kill the process catches (``pdl1`` takes SIGTERM and SIGHUP as a
    Ctrl-C) the half-filled folder is gone and ``path`` is as it was, and so are the folders above it made for it (a
    refused `pdl1 import nnunet --out new/model` leaves no ``new/``). A process killed outright (SIGKILL, power
    lost) leaves it, hidden, beside ``path``.

    Named with a leading dot, so tools that find folders by name (nnU-Net's ``DatasetNNN_*``) do not see it,
    and made with ``mkdir``, not ``tempfile.mkdtemp``, whose folders only their owner may open (colleagues on a
    shared drive would be locked out of the result, as with mkstemp above).
    """
    with empty_folders_removed(path.parent):  # on success path.parent holds path: it stays
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        tmp.mkdir()
        try:
            yield tmp
            os.replace(tmp, path)  # onto an empty folder too; a folder something was written into meanwhile stops it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def empty_folders_removed(folder: Path) -> Iterator[None]:
    """When the ``with`` block ends, however it ends, remove the folders from ``folder`` up that did not exist
    when it began and are empty then, deepest first: a block that makes ``folder`` to write into it and fails, or
    writes nothing, leaves no empty folders behind (``rmdir`` leaves one that something was put into meanwhile).
    """
    made = list(itertools.takewhile(lambda p: not p.exists(), (folder, *folder.parents)))
    try:
        yield
    finally:
        for each in made:
            with contextlib.suppress(OSError):
                each.rmdir()


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """``fig.savefig(path, **savefig_kwargs)``, replacing ``path`` in one step as :func:`replace_atomically` does.

    Saved straight to ``path``, an interrupt (or a full disk) left a PNG cut short under the report's name, in
    place of the whole one an earlier run drew. The format comes from ``path``'s suffix, as savefig takes it.
    """
    with _replacing(path, "xb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".").lower() or None, **savefig_kwargs)
