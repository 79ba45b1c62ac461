"""``pdl1 serve``: the HTTP service the Groovy scripts in QuPath call.

Submit -> 202 + job id -> poll -> result. One inference worker thread owns the device and runs
jobs in order; models load once at start-up. Security: loopback by default; any other bind
needs a token, which every request must then carry (``Authorization: Bearer ...``); images
are opened only under ``--allow-root`` folders, checked when a job is submitted and again on
the file the worker opens (symlinks resolved, so no escape, also not by a folder swapped for a
symlink while the job waited); request bodies are size-limited and the queue is bounded
(uploads wait compressed). Every input error answers 4xx with a JSON ``detail``.

By concern: :mod:`.app` (routes, error handlers, lifespan), :mod:`.jobs` (jobs and the worker),
:mod:`.schemas` (request and answer bodies), :mod:`.roi`, :mod:`.paths` (which files may be opened),
:mod:`.uploads`, :mod:`.guards` (token, body size), :mod:`.bodies` (a job request's JSON parsed off the event
loop), :mod:`.json_text` (large JSON in and out in short steps), :mod:`.validation` (bad requests in the client's
terms), :mod:`.errors`, :mod:`.messages` (how answers repeat a client's values), :mod:`.ihc_model`,
:mod:`.settings`, :mod:`.server` (uvicorn's server, stopping the worker first).
"""

from bridge.project_config import OUTPUTS
from bridge.service.app import create_app
from bridge.service.errors import (
    HTTP_STATUS,
    ImageNotOpenedError,
    ImagePathError,
    JobNotFoundError,
    JobStateError,
    PathNotAllowedError,
    QueueFullError,
    RequestTooLargeError,
    ResultReleasedError,
)
from bridge.service.ihc_model import ihc_folder_problem, ihc_manifest
from bridge.service.jobs import KEEP_RECORDS, PATH_STAIN_ADVICE, UPLOAD_STAIN_ADVICE, Job, Worker
from bridge.service.messages import clipped, quoted
from bridge.service.paths import allowed_slide_size, check_allowed, open_allowed
from bridge.service.roi import parse_roi
from bridge.service.schemas import JobRequest
from bridge.service.settings import LOOPBACK, ServiceSettings
from bridge.service.uploads import check_upload, decoded_upload

__all__ = [
    "HTTP_STATUS",
    "KEEP_RECORDS",
    "LOOPBACK",
    "OUTPUTS",
    "PATH_STAIN_ADVICE",
    "UPLOAD_STAIN_ADVICE",
    "ImageNotOpenedError",
    "ImagePathError",
    "Job",
    "JobNotFoundError",
    "JobRequest",
    "JobStateError",
    "PathNotAllowedError",
    "QueueFullError",
    "RequestTooLargeError",
    "ResultReleasedError",
    "ServiceSettings",
    "Worker",
    "allowed_slide_size",
    "check_allowed",
    "check_upload",
    "clipped",
    "create_app",
    "decoded_upload",
    "ihc_folder_problem",
    "ihc_manifest",
    "open_allowed",
    "parse_roi",
    "quoted",
]
