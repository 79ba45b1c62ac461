"""Folders of the user running ``pdl1``, read from the environment here, at the edge, and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def openvino_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where OpenVINO conversions of members go when their model folder cannot be written:
    ``$XDG_CACHE_HOME/pdl1-bridge/openvino`` (``~/.cache/pdl1-bridge/openvino`` without it), as the XDG base
    directory specification places caches.

    >>> openvino_cache_dir({"XDG_CACHE_HOME": "/tmp/cache"}).as_posix()
    '/tmp/cache/pdl1-bridge/openvino'
    """
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdl1-bridge" / "openvino"
