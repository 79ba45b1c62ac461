"""Settings read from the environment here, at the edge, and passed down in the configs.

Variables that choose how the library works (not where the user's folders are: :mod:`bridge.user_dirs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: The one nvImageCodec backend to decode slide tiles with on the GPU (a BackendKind name, e.g. HW_GPU_ONLY, the
#: hardware decoder of A100/H100-class GPUs); unset or empty: nvImageCodec picks. Goes to
#: ``SegmentConfig.decode_backend``.
NVIMGCODEC_BACKEND_ENV = "PDL1_NVIMGCODEC_BACKEND"


def nvimgcodec_backend(environ: Mapping[str, str] | None = None) -> str | None:
    """The nvImageCodec backend ``PDL1_NVIMGCODEC_BACKEND`` names, None where it is unset or empty.

    >>> nvimgcodec_backend({"PDL1_NVIMGCODEC_BACKEND": "HW_GPU_ONLY"}), nvimgcodec_backend({})
    ('HW_GPU_ONLY', None)
    """
    environ = os.environ if environ is None else environ
    return environ.get(NVIMGCODEC_BACKEND_ENV) or None


#: Set to 1 to read every slide pixel through OpenSlide, not decoding SVS / tiled TIFF tiles directly (a way out if
#: a file decodes differently); unset, empty or 0: direct where possible. Goes to ``PipelineConfig.openslide_only``
#: (pdl1 run, serve, eval, demo and the service's own opening of an image) and ``open_slide(openslide_only=...)``.
OPENSLIDE_ONLY_ENV = "PDL1_OPENSLIDE_ONLY"


def openslide_only(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``PDL1_OPENSLIDE_ONLY`` asks to read every pixel through OpenSlide (set, and neither empty nor 0).

    >>> openslide_only({"PDL1_OPENSLIDE_ONLY": "1"}), openslide_only({"PDL1_OPENSLIDE_ONLY": "0"}), openslide_only({})
    (True, False, False)
    """
    environ = os.environ if environ is None else environ
    return environ.get(OPENSLIDE_ONLY_ENV, "") not in ("", "0")
