"""Files the library replaces in one step: written beside the target, on disk, then renamed over it.

(``bridge.atomic`` does the same for the files the programs write; the library imports nothing from bridge.)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_text_whole(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file of this call's own, renamed over ``path``.

    Readers see the old file or the new one, never half of one; after an error or Ctrl-C the old file is
    untouched and the temporary one gone. The name is this call's own because a fixed ``NAME.part`` is shared by
    two writers of one file (one could rename the other's half-written file into place) and left behind by an
    interrupt.
    """
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
