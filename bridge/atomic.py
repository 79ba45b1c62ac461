"""Files and folders replaced in one step: written beside the target, then renamed over it."""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
from collections.abc import Iterator
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
def folder_replaced_whole(path: Path) -> Iterator[Path]:
    """A new folder to fill that becomes ``path`` (absent, or an empty folder) when the ``with`` block ends
    without error; after an error (or a crash) the half-filled folder is gone and ``path`` is as it was, and so
    are the folders above it made for it (a refused `pdl1 import nnunet --out new/model` leaves no ``new/``).

    Named with a leading dot, so tools that find folders by name (nnU-Net's ``DatasetNNN_*``) do not see it,
    and made with ``mkdir``, not ``tempfile.mkdtemp``, whose folders only their owner may open (colleagues on a
    shared drive would be locked out of the result, as with mkstemp above).
    """
    made = list(itertools.takewhile(lambda p: not p.exists(), (path.parent, *path.parent.parents)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)  # onto an empty folder too; a folder something was written into meanwhile stops it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # deepest first; rmdir leaves one that something else was put into meanwhile
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """``fig.savefig(path, **savefig_kwargs)``, replacing ``path`` in one step as :func:`replace_atomically` does.

    Saved straight to ``path``, an interrupt (or a full disk) left a PNG cut short under the report's name, in
    place of the whole one an earlier run drew. The format comes from ``path``'s suffix, as savefig takes it.
    """
    with _replacing(path, "xb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".").lower() or None, **savefig_kwargs)
