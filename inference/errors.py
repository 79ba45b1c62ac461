"""Exceptions of pdl1-bridge.

Every error about what a caller gave (a slide or image, a model folder, an ROI, a stain, phantom
truth; in ``bridge``, a project, labels, a service request) derives from :class:`Pdl1Error`, and
also from the built-in exception that fits, so callers can catch either (``except
FileNotFoundError`` still works for a missing slide). An argument out of its range (an unknown
device, a phantom file name without .svs or .tif) raises the built-in alone. Messages say what was
expected, what came, and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence


class Pdl1Error(Exception):
    """Base class of every pdl1-bridge error."""


class SlideNotFoundError(Pdl1Error, FileNotFoundError):
    """The slide file does not exist."""


class SlideFormatError(Pdl1Error, ValueError):
    """The file exists but no reader could open it as an image, or it opens at another size than the caller
    shows it at (another scene of a multi-image file, a cropped view)."""


class MissingMppError(Pdl1Error, ValueError):
    """The slide does not state its microns per pixel and none was given, or the one it states or was given is
    implausible (not a positive number within ``MPP_PLAUSIBLE_RANGE``)."""


class ResolutionError(Pdl1Error, ValueError):
    """The image's pixels are too coarse for a model: reading it at the model's µm/px would enlarge it."""


class StainError(Pdl1Error, ValueError):
    """The image is of another stain than a model was trained on (an H&E model on a PD-L1 immunostain)."""


class RoiError(Pdl1Error, ValueError):
    """A region of interest is invalid or lies outside the image."""


class ModelFileError(Pdl1Error, ValueError):
    """A model folder, manifest or weight file is missing, corrupt or of the wrong kind."""


class RuntimeUnavailableError(Pdl1Error, ImportError):
    """A runtime for the members was asked for whose package is not installed (OpenVINO without its extra)."""


class EngineExportError(Pdl1Error, RuntimeError):
    """A member converted for another runtime (OpenVINO) does not give the PyTorch member's outputs."""


class TruthNotFoundError(Pdl1Error, FileNotFoundError):
    """No phantom truth lies beside a slide that is to be evaluated, or it lacks what the evaluation needs (an
    IHC's truth that names no paired H&E)."""


class TruthFormatError(Pdl1Error, ValueError):
    """A phantom's truth folder is there but a file in it is missing, cut short or not in the written layout."""


class Cancelled(Exception):  # noqa: N818 - reads as what happened; not an error, so not a Pdl1Error
    """Raised between batches when ``should_cancel()`` answers True."""


def raise_together(errors: Sequence[Pdl1Error], heading: str) -> None:
    """Raise what every input of a batch checked before any work found, so that all are fixed at once: the error
    itself where there is one, else one of their common class (:class:`Pdl1Error` where they differ) led by
    ``heading`` ("2 of 5 slides ...:"), each on its own indented line; nothing where there is none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kinds = {type(err) for err in errors}
        kind = kinds.pop() if len(kinds) == 1 else Pdl1Error
        lines = "\n".join(f"  {err}" for err in errors)
        raise kind(f"{heading}\n{lines}") from errors[0]
