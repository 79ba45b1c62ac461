"""Files replaced in one step: written beside the target, flushed to disk, then renamed over it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def replace_atomically(path: Path) -> Iterator[TextIO]:
    """Open a text file that replaces ``path`` when the ``with`` block ends without error.

    Readers see the old file or the new one, never half of one; after an error (or a crash)
    the old file is untouched and the temporary one is gone. The temporary file is made with
    ``open(..., "x")``, not ``tempfile.mkstemp``: mkstemp creates files readable by their
    owner only, which would lock colleagues out of a project on a shared drive. A new file
    gets the permissions the umask gives; a replaced file keeps its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
