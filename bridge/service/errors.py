"""The service's own errors, and the HTTP status each error answers with."""

from __future__ import annotations

from inference import MissingMppError, Pdl1Error, RoiError, SlideFormatError, SlideNotFoundError, StainError


class PathNotAllowedError(Pdl1Error, PermissionError):
    """An image path outside the allowed roots."""


class JobNotFoundError(Pdl1Error, LookupError):
    """No job with that id."""


class JobStateError(Pdl1Error, ValueError):
    """The job is not in a state that allows this (e.g. result of a running job)."""


class ResultReleasedError(Pdl1Error, LookupError):
    """A finished job whose result the service no longer holds."""


class RequestTooLargeError(Pdl1Error, ValueError):
    """A request body over the service's limit."""


class ImagePathError(Pdl1Error, ValueError):
    """An image path the service cannot use: not absolute, not a file, or not one the file system takes
    (NUL byte, too long, a symlink loop)."""


class ImageNotOpenedError(Pdl1Error, ValueError):
    """A path job's image that the service cannot open, or not as QuPath shows it: not found on its machine,
    outside --allow-root, a path it cannot use, a format no reader here opens, another size than the client
    shows. Answered with ``status`` (that of the error it stands for) and ``"cannot_open": true`` beside the
    ``detail``, so a client that holds the pixels (pdl1_analyze.groovy) sends them to POST /v1/jobs/pixels
    instead of giving up."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class QueueFullError(Pdl1Error, RuntimeError):
    """As many jobs wait as ``--max-queued`` allows."""


class ServiceStoppingError(Pdl1Error, RuntimeError):
    """A job submitted while the service shuts down (``Worker.halt``)."""


HTTP_STATUS = {
    SlideNotFoundError: 404,
    JobNotFoundError: 404,
    PathNotAllowedError: 403,
    SlideFormatError: 422,
    MissingMppError: 422,
    RoiError: 422,
    StainError: 422,
    ImagePathError: 422,
    JobStateError: 409,
    ResultReleasedError: 410,
    RequestTooLargeError: 413,
    QueueFullError: 429,
    ServiceStoppingError: 503,
}
