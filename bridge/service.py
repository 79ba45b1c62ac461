"""``pdl1 serve``: the HTTP service the Groovy scripts in QuPath call.

Submit -> 202 + job id -> poll -> result. One inference worker thread owns the device and runs
jobs in order; models load once at start-up. Security: loopback by default; any other bind
needs a token, which every request must then carry (``Authorization: Bearer ...``); images
are opened only under ``--allow-root`` folders, checked when a job is submitted and again on
the file the worker opens (symlinks resolved, so no escape, also not by a folder swapped for a
symlink while the job waited); request bodies are size-limited and the queue is bounded
(uploads wait compressed). Every input error answers 4xx with a JSON ``detail``.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import io
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import shapely
from fastapi import Depends, FastAPI, Query, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from shapely.errors import ShapelyError
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.objects import feature_page, parent_measurements
from bridge.project import stain_of_image_type, uri_to_path
from bridge.project_config import OUTPUTS
from bridge.qupath_geojson import scan_coordinates
from bridge.run import entry_metadata, failure_message, metadata_counts
from inference import (
    MPP_PLAUSIBLE_RANGE,
    ArrayReader,
    Cancelled,
    MissingMppError,
    ModelFileError,
    Models,
    Mpp,
    Pdl1Error,
    PipelineConfig,
    RoiError,
    Slide,
    SlideFormatError,
    SlideNotFoundError,
    SlideResult,
    StainError,
    __version__,
    analyse_slide,
    demo_model_dir,
    open_slide,
    read_manifest,
    unconvertible_samples,
)

if TYPE_CHECKING:
    from PIL import Image

    from inference import Manifest  # read_manifest's answer, for annotations only

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Bounds on where an uploaded region sits and how it was scaled: QuPath's images are at most 2^31 px a side,
# and a region sent at a coarser downsample than this holds nothing a model can use.
MAX_COORDINATE_PX = 2.0**31
MAX_DOWNSAMPLE = 4096.0
# The most characters of a client's value (a path, a field name, a job id) an error answer repeats: a 100 kB path
# comes back as its start and end, not whole.
ECHO_LIMIT_CHARS = 200
# And the most characters of any error answer's detail: a backstop for a message that repeats a value whole.
MAX_DETAIL_CHARS = 4000


def _shortened(text: str, limit_chars: int) -> str:
    tail = limit_chars // 3
    return f"{text[: limit_chars - tail - 1]}…{text[-tail:]}"


def clipped(text: str, *, limit_chars: int = ECHO_LIMIT_CHARS) -> str:
    """``text`` as an error message repeats it: whole up to ``limit_chars``, else its start and end around an
    ellipsis, followed by its length, so a client sees which value it was without getting it all back.

    >>> clipped("/data/" + "x" * 300 + ".svs", limit_chars=20)
    '/data/xxxxxxx…xx.svs (310 characters)'
    """
    if len(text) <= limit_chars:
        return text
    return f"{_shortened(text, limit_chars)} ({len(text)} characters)"


def quoted(text: str, *, limit_chars: int = ECHO_LIMIT_CHARS) -> str:
    """``repr(text)`` for a message, shortened as :func:`clipped` does, with the length after the closing quote.

    >>> quoted("abc")
    "'abc'"
    >>> quoted("/data/" + "x" * 300 + ".svs", limit_chars=20)
    "'/data/xxxxxxx…xx.svs' (310 characters)"
    """
    if len(text) <= limit_chars:
        return repr(text)
    return f"{_shortened(text, limit_chars)!r} ({len(text)} characters)"


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


class QueueFullError(Pdl1Error, RuntimeError):
    """As many jobs wait as ``--max-queued`` allows."""


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs; built by the CLI (or by tests) and never read from the environment below it."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_roots: tuple[Path, ...] = ()
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_request_bytes: int = 64 * 2**20
    max_upload_px: int = 8192 * 8192
    max_page: int = 200_000
    keep_results: int = 16
    max_queued: int = 16

    def __post_init__(self) -> None:
        if self.keep_results < 1:
            raise ValueError(f"--keep-results must be at least 1, got {self.keep_results}")
        if self.max_queued < 1:
            raise ValueError(f"--max-queued must be at least 1, got {self.max_queued}")
        if self.host not in LOOPBACK and not self.token:
            raise ValueError(
                f"binding {self.host} exposes the service beyond this machine: pass --token (every request "
                "must then send it) or keep the default --host 127.0.0.1"
            )
        if not self.allow_roots:
            raise ValueError("no --allow-root: give the folders whose images the service may open")
        for root in self.allow_roots:
            # A root that is not there would refuse every image with 403 while the service looked healthy.
            if not root.is_dir():
                what = "is a file" if root.exists() else "does not exist"
                raise ValueError(
                    f"--allow-root {root} {what}; expected a folder on this machine that holds the images "
                    "(check the path, or mount the share before starting the service)"
                )


# ------------------------------------------------------------------------------------ models


class JobRequest(BaseModel):
    """An analysis of one image (or of its ROI)."""

    # A misspelt field (``roii``) must not be ignored: the whole slide would be analysed instead of the ROI.
    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        min_length=1,
        description="Image path or file: URI, as QuPath's server reports it.",
        json_schema_extra={"pattern": "^[^\\u0000]+$"},  # what _image_has_no_nul checks, for clients and fuzzers
    )
    roi: dict[str, Any] | None = Field(
        default=None,
        description="GeoJSON Polygon/MultiPolygon in level-0 px; omit for the whole tissue.",
        json_schema_extra={
            "required": ["type", "coordinates"],
            "properties": {"type": {"enum": ["Polygon", "MultiPolygon"]}, "coordinates": {"type": "array"}},
        },
    )
    mpp: float | None = Field(
        default=None,
        ge=MPP_PLAUSIBLE_RANGE[0],
        le=MPP_PLAUSIBLE_RANGE[1],
        allow_inf_nan=False,
        description="Microns per pixel QuPath reports.",
    )
    image_size_px: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Width and height at which QuPath shows the image; an image file that opens at another "
        "size (another scene of a multi-image file, a cropped view) is refused, since the ROI and the results "
        "would not line up.",
    )
    image_type: (
        Literal["BRIGHTFIELD_H_E", "BRIGHTFIELD_H_DAB", "BRIGHTFIELD_OTHER", "FLUORESCENCE", "OTHER", "UNSET"] | None
    ) = Field(
        default=None,
        description="QuPath's image type: BRIGHTFIELD_H_E runs the H&E models (segmentation ensemble, SUA, "
        "predicted TPS), BRIGHTFIELD_H_DAB the PD-L1 IHC nuclei ensemble (TPS, CPS); other types are refused. "
        "UNSET or omitted: the stain is told from the image's colour.",
    )
    outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Field(default=list(OUTPUTS))
    model: str = Field(default="default", description="Model set; only 'default' (the loaded models) for now.")

    @field_validator("image")
    @classmethod
    def _image_has_no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError(
                f"image path {quoted(value)} cannot be used: it holds a NUL byte, which no file system takes in a "
                "name; send the path (or file: URI) of an image file under an --allow-root folder"
            )
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs_are_not_empty(cls, value: list[str]) -> list[str]:
        # An empty list ran a job that returned no objects, and pdl1_analyze.groovy then removed the earlier
        # results and put none in their place.
        if not value:
            raise ValueError(
                f"outputs is empty, so the job would return no objects; send some of {', '.join(OUTPUTS)}, "
                "or omit outputs for all of them"
            )
        return value

    @field_validator("mpp", mode="before")
    @classmethod
    def _mpp_is_no_boolean(cls, value: Any) -> Any:
        # pydantic takes true as 1.0 µm/px: a wrong scale for every result, silently.
        if isinstance(value, bool):
            raise ValueError(
                f"mpp must be a number (the image's µm/px, e.g. 0.25), got {json.dumps(value)}; send the pixel "
                "size QuPath reports, or omit mpp to use the file's"
            )
        return value

    @field_validator("roi")
    @classmethod
    def _roi_is_geometry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("Polygon", "MultiPolygon"):
            given = value.get("type")
            shown = quoted(given) if isinstance(given, str) else clipped(json.dumps(given))
            came = "no type" if given is None else f"type {shown}"
            raise ValueError(f"roi must be a GeoJSON Polygon or MultiPolygon geometry, got {came}")
        if value is not None:
            bad = scan_coordinates(value.get("coordinates")).non_finite
            if bad is not None:
                raise ValueError(
                    f"roi coordinates must be finite numbers, got {json.dumps(bad)}; send the ROI's vertices in "
                    "level-0 px"
                )
        return value


def parse_roi(roi: dict[str, Any] | None, *, image_size_px: tuple[int, int] | None) -> BaseGeometry | None:
    """The request's ROI as a geometry; one no analysis could use is refused now (422), not as a job that fails.

    Unreadable, empty or invalid (self-intersecting, ...) is refused, and outside the image when the request
    says the image's size (else the worker checks it against the file's).
    """
    if roi is None:
        return None
    kind = roi.get("type")
    whole = "or omit roi to analyse the whole tissue"
    if "coordinates" not in roi:  # shape() would say only "('coordinates')"
        raise RoiError(
            f"roi is a GeoJSON {kind} without 'coordinates'; expected rings of at least 4 [x, y] vertices in "
            f"level-0 px under 'coordinates', the first repeated last: send the annotation's outline as QuPath "
            f"gives it, {whole}"
        )
    depth = scan_coordinates(roi["coordinates"]).depth
    if depth > 4:  # shapely recursed into it: a RecursionError, a 500
        expected = "3 (rings of [x, y] vertices)" if kind == "Polygon" else "4 (polygons of rings of [x, y] vertices)"
        raise RoiError(
            f"roi's coordinates are nested {depth} lists deep; a GeoJSON {kind} nests {expected}: "
            f"send the annotation's outline as QuPath gives it, {whole}"
        )
    try:
        geometry = shape(roi)
    except (ShapelyError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise RoiError(
            f"roi is not a readable GeoJSON {kind} ({clipped(str(err))}); expected rings of at least 4 [x, y] "
            "vertices in level-0 px, the first repeated last: send the annotation's outline as QuPath gives it, "
            f"{whole}"
        ) from err
    if geometry.is_empty:
        raise RoiError(f"roi is an empty {kind} (no vertices); send the annotation's outline in level-0 px, {whole}")
    if max(abs(v) for v in geometry.bounds) > MAX_COORDINATE_PX:
        # Queued, it failed with the vertex printed as a 300-digit number; no slide is 2^31 px across.
        bounds = ", ".join(f"{v:.4g}" for v in geometry.bounds)
        raise RoiError(
            f"roi has a vertex beyond {MAX_COORDINATE_PX:,.0f} px (bounds {bounds}); "
            f"expected level-0 px of this image, as QuPath's annotations are: send the annotation's outline, {whole}"
        )
    if not geometry.is_valid:
        # shapely says "Self-intersection[250 250]": where, as the (x, y) a user can find in QuPath.
        reason = re.sub(r"\[(\S+) (\S+)\]$", r" at (\1, \2)", shapely.is_valid_reason(geometry))
        raise RoiError(
            f"roi is not a valid {kind} ({reason}); expected an outline that does not cross or touch itself: "
            f"redraw the annotation in QuPath, {whole}"
        )
    if image_size_px is not None:
        width, height = image_size_px
        if geometry.intersection(box(0, 0, width, height)).area <= 0:
            x0, y0, x1, y1 = (round(v) for v in geometry.bounds)
            raise RoiError(
                f"roi ({x0}, {y0})-({x1}, {y1}) lies outside the image of {width} x {height} px (image_size_px); "
                "expected level-0 px of this image, as QuPath's annotations are: send the ROI of an annotation "
                f"on this image, {whole}"
            )
    return geometry


class ErrorDetail(BaseModel):
    """What every error answer carries: what was expected, what came, and the fix."""

    detail: str


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str
    result_url: str


class JobStatus(BaseModel):
    job_id: str
    state: Literal["queued", "running", "done", "failed", "cancelling", "cancelled"]
    progress: float
    tiles_done: int
    tiles_total: int
    error: str | None = None
    image: str
    created: float
    started: float | None = None
    finished: float | None = None


class ModelDescription(BaseModel):
    task: str
    name: str
    version: str
    sha256: str
    members: int
    input_mpp: float
    stain: str = Field(description="The stain it was trained on and runs on: H&E, or H-DAB (PD-L1 IHC).")


class Health(BaseModel):
    status: str
    version: str
    device: str
    models: list[ModelDescription]


# ------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    id: str
    image: str
    roi: BaseGeometry | None
    mpp: float | None
    outputs: tuple[str, ...]
    image_as_sent: str | None = None  # the path as the client named it (a file: URI as its path), for messages
    image_size_px: tuple[int, int] | None = None
    image_type: str | None = None  # QuPath's, as the request stated it
    # An uploaded PNG/TIFF as sent: decoded only when the job starts (8192² RGB is 200 MB, the
    # PNG often well under 1 MB), dropped when the job starts or is cancelled.
    upload: bytes | None = None
    origin_xy: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    state: str = "queued"
    tiles_done: int = 0
    tiles_total: int = 0
    error: str | None = None
    result: SlideResult | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    released: bool = False

    def status(self) -> JobStatus:
        progress = 1.0 if self.state == "done" else (self.tiles_done / self.tiles_total if self.tiles_total else 0.0)
        # Asked to stop but not yet stopped by the worker (queued jobs stop when their turn comes).
        state = "cancelling" if self.state in ("queued", "running") and self.cancel.is_set() else self.state
        return JobStatus(
            job_id=self.id,
            state=state,
            progress=round(progress, 4),
            tiles_done=self.tiles_done,
            tiles_total=self.tiles_total,
            error=self.error,
            image=self.image,
            created=self.created,
            started=self.started,
            finished=self.finished,
        )


# Finished jobs whose records (state, error; no result) are kept; older ones are forgotten.
KEEP_RECORDS = 1000


class Worker:
    """The one thread that runs inference; jobs wait in a FIFO queue.

    A service runs for weeks, so it must not grow with every slide it has analysed: the
    results of the newest ``keep_results`` finished jobs are held (a client fetches its
    result within seconds of ``done``), older ones are released, and the records of all but
    the newest :data:`KEEP_RECORDS` finished jobs are forgotten. At most ``max_queued`` jobs
    wait; uploads wait compressed.
    """

    def __init__(
        self,
        models: Models,
        pipeline: PipelineConfig,
        *,
        allow_roots: tuple[Path, ...],
        keep_results: int = 16,
        max_queued: int = 16,
    ):
        self.models = models
        self.pipeline = pipeline
        self.allow_roots = allow_roots
        self.keep_results = keep_results
        self.max_queued = max_queued
        self.jobs: dict[str, Job] = {}
        self.finished: deque[str] = deque()  # ids, oldest first
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="pdl1-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            # A cancelled job still in the queue holds nothing (its upload is dropped) and does not count.
            waiting = sum(j.state == "queued" and not j.cancel.is_set() for j in self.jobs.values())
            if waiting >= self.max_queued:
                raise QueueFullError(
                    f"{waiting} jobs are waiting, the most this service queues (--max-queued {self.max_queued}); "
                    "retry when one has finished, or cancel one you no longer need (DELETE /v1/jobs/{id})"
                )
            self.jobs[job.id] = job
        self.queue.put(job.id)

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(
                f"no job {quoted(job_id)}: never submitted, deleted, or older than the last {KEEP_RECORDS} finished "
                "jobs (jobs do not survive a restart of the service)"
            )
        return job

    def cancel(self, job: Job) -> None:
        """Ask a queued or running job to stop; a queued upload's bytes go at once, not when its turn comes."""
        job.cancel.set()  # only the worker changes a job's state
        job.upload = None

    def forget(self, job_id: str) -> bool:
        """Drop a finished job and its result (the client has what it needs); False if it has not finished."""
        with self.lock:
            if job_id not in self.finished:
                return False
            self.finished.remove(job_id)
            job = self.jobs.pop(job_id)
        job.result = None
        return True

    def stop(self) -> None:
        """Stop the worker at shutdown: the running job stops at its next tile and the queued ones do not start
        (jobs do not survive a restart); before, the worker went on through the whole queue, and the service
        waited for it until the join timed out and then exited mid-analysis."""
        with self.lock:
            unfinished = [job for job in self.jobs.values() if job.state in ("queued", "running")]
        for job in unfinished:
            self.cancel(job)
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _retire(self, job: Job) -> None:
        with self.lock:
            self.finished.append(job.id)
            for old_id in list(self.finished)[: -self.keep_results]:
                old = self.jobs[old_id]
                if old.result is not None:
                    old.result, old.released = None, True
            while len(self.finished) > KEEP_RECORDS:
                del self.jobs[self.finished.popleft()]

    def _loop(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None:
                return
            job = self.get(job_id)
            try:
                if job.cancel.is_set():
                    job.state = "cancelled"
                    continue
                job.state, job.started = "running", time.time()
                job.result = self._run(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Pdl1Error as err:  # what the input was wrong with: the client gets it; one log line
                log.warning("job %s failed: %s", job.id, err)
                job.state, job.error = "failed", self._failure(err)
            except Exception as err:  # a bug: the client gets the error, the log its traceback
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", failure_message(err)
            finally:
                job.finished = time.time()
                job.upload = None
                self._retire(job)

    def _failure(self, err: Pdl1Error) -> str:
        """What the client reads of a failed job: a missing ``--models DIR/nuclei-ihc`` in the service's words."""
        folder = self.pipeline.ihc_model_dir
        if isinstance(err, ModelFileError) and folder is not None and str(folder) in str(err):  # the IHC model's
            return ihc_folder_problem(self.pipeline) or failure_message(err)
        return failure_message(err)

    def _run(self, job: Job) -> SlideResult:
        config = replace(
            self.pipeline,
            mpp=job.mpp,
            run_nuclei="nuclei" in job.outputs and self.models.nuclei is not None,
            run_sua="sua" in job.outputs,
        )

        def on_progress(done: int, total: int) -> None:
            job.tiles_done, job.tiles_total = done, total

        if job.upload is not None:
            body, job.upload = job.upload, None
            slide_context = decoded_upload(body, mpp=config.mpp)
        else:
            slide_context = open_allowed(
                Path(job.image),
                self.allow_roots,
                mpp=config.mpp,
                shown=job.image_as_sent,
                openslide_only=config.openslide_only,
            )
        with slide_context as slide:
            return analyse_slide(
                slide,
                models=self.models,
                config=config,
                roi=job.roi,
                on_progress=on_progress,
                should_cancel=job.cancel.is_set,
                image_size_px=job.image_size_px,
                image_stain=stain_of_image_type(job.image_type),
                image_stain_source=f"QuPath's image type {job.image_type}",
                stain_advice=UPLOAD_STAIN_ADVICE if job.image == "upload" else PATH_STAIN_ADVICE,
            )


# How a client of the service states an image's stain, in the messages that refuse one (the library's default
# names pdl1 run's --stain, which a client cannot pass): pdl1_analyze.groovy sends QuPath's image type with a job
# on an image path; an upload carries none, so its colour alone tells its stain.
PATH_STAIN_ADVICE = "set its image type in QuPath (Image tab: Image type) and run pdl1_analyze.groovy again"
UPLOAD_STAIN_ADVICE = (
    "an uploaded region carries no image type, so its colour alone tells its stain: send a region with more of "
    "the stained tissue, or have the service open the image file (start it with --allow-root for the image's "
    "folder), whose job carries QuPath's image type (Image tab: Image type)"
)


# ------------------------------------------------------------------------------------ app


def _unusable_path(path: object, err: Exception) -> ImagePathError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ImagePathError(
        f"image path {quoted(str(path))} cannot be used: {reason}; send the path (or file: URI) of an image file "
        "under an --allow-root folder"
    )


def _under(real: Path, roots: tuple[Path, ...]) -> bool:
    return any(real.is_relative_to(root.resolve()) for root in roots)


def _not_allowed(path: Path, roots: tuple[Path, ...]) -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{clipped(str(path))} is outside the folders this service may open ({', '.join(str(r) for r in roots)}); "
        "start it with --allow-root for that folder"
    )


def _changed(real: Path) -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{clipped(str(real))} changed while it was being opened (a file or folder on its path was replaced); "
        "only files under the --allow-root folders are opened: submit the job again"
    )


def check_allowed(path: Path, roots: tuple[Path, ...]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots`` (symlinks resolved), else 403.

    A path the file system cannot take (NUL byte, name too long, symlink loop) is a 422, not a crash.
    """
    try:
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: a symlink loop before Python 3.13
        raise _unusable_path(path, err) from err
    if not _under(real, roots):
        raise _not_allowed(path, roots)
    return real


def image_path(image: str) -> Path:
    if image.startswith("file:"):
        try:
            return Path(str(uri_to_path(image)))
        except ValueError as err:  # urlparse: e.g. an unclosed IPv6 bracket in the host
            if isinstance(err, Pdl1Error):
                raise
            raise _unusable_path(image, err) from err
    return Path(image)


def require_absolute(image: str, path: Path) -> Path:
    """``path`` (of the request's ``image``) if it is absolute; a relative path would be resolved against the
    service's working folder, and a URL or another machine's Windows path names nothing here."""
    if path.is_absolute():
        return path
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", image) and not image.startswith("file:"):
        raise ImagePathError(
            f"image {quoted(image)} is a {clipped(image.split(':', 1)[0], limit_chars=20)}: URL; the service opens "
            "image files on its own machine: send the file's absolute path there (or its file: URI), or upload the "
            "region's pixels (POST /v1/jobs/pixels)"
        )
    if PureWindowsPath(str(path)).drive:
        raise ImagePathError(
            f"image path {quoted(image)} is a Windows path, which the service's machine cannot open; expected the "
            "absolute path at which that machine sees the file (for a share: under the folder it is mounted at), "
            "or its file: URI"
        )
    if image.startswith("file:"):  # "is relative" would puzzle: it is a URI, one that names no absolute path
        raise ImagePathError(
            f"image URI {quoted(image)} names no absolute path; expected a file: URI such as "
            "file:/data/slides/case.svs (as QuPath's server reports it), or the absolute path of the image file on "
            "the service's machine"
        )
    if image.startswith("~"):
        raise ImagePathError(
            f"image path {quoted(image)} starts with ~, which only a shell expands; expected the absolute path of the "
            "image file on the service's machine (e.g. /home/NAME/slides/case.svs) or its file: URI"
        )
    raise ImagePathError(
        f"image path {quoted(image)} is relative; expected the absolute path of the image file on the service's "
        "machine (e.g. /data/slides/case.svs) or its file: URI"
    )


def _not_a_regular_file(path: Path) -> ImagePathError:
    return ImagePathError(
        f"{clipped(str(path))} is not a regular file (a named pipe, socket or device); expected an image file (e.g. "
        "a .svs, .ndpi or .tif): send the path of the image file itself"
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as err:
        raise _unusable_path(path, err) from err


# OpenSlide finds these formats' other files beside the one named, so they are opened by name.
_MULTI_FILE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".dcm"})


# Where a QuPath user gives an image's µm/px (open_slide's mpp_advice): in QuPath, whence pdl1_analyze.groovy
# sends it with the job as its mpp, not --mpp.
def _qupath_mpp_advice(value: str) -> str:
    return (
        f"set the pixel size in QuPath (Image tab: Pixel width/height) to {value}; pdl1_analyze.groovy sends it "
        "with the job, so run the script again"
    )


# Where an upload's client gives its µm/px: the request's mpp query parameter, per uploaded pixel (a region
# read at a downsample has pixels that many times the scanner's).
_UPLOAD_MPP_SOURCE = "the mpp query parameter"


def _upload_mpp_advice(value: str) -> str:
    return f"send as mpp the µm per uploaded pixel: {value} times the downsample the region was read at"


def _as_sent(err: Pdl1Error, opened: tuple[Path, ...], shown: str) -> Pdl1Error:
    """``err`` as the client should read it: naming the image as it sent it, not the files the worker
    opened (a private link in a temporary folder)."""
    message = str(err)
    for path in opened:
        message = message.replace(str(path), shown)
    return err if message == str(err) else type(err)(message)


@contextmanager
def open_allowed(
    path: Path, roots: tuple[Path, ...], *, mpp: float | None, shown: str | None = None, openslide_only: bool = False
) -> Iterator[Slide]:
    """Open an image under ``roots``, checking the file actually opened, not only its name.

    The check at submission is not enough: a folder swapped for a symlink while the job waited
    leads elsewhere. So the path is resolved and checked again here, opened once, and the open
    file (its ``/proc/self/fd`` link on Linux) must still lie under a root. On Linux the reader
    then opens that very file, through a private link to the descriptor that keeps the file's
    name (readers look at suffixes); elsewhere, and for multi-file formats, it opens the checked
    name and the file found there afterwards must be the one checked. Errors, also those of the
    analysis inside the ``with``, name the image as ``shown`` (the client's path; default ``path``).
    ``openslide_only`` goes to ``open_slide`` (the service's ``PipelineConfig.openslide_only``).
    """
    shown = str(path) if shown is None else shown
    real = check_allowed(path, roots)
    try:
        # O_NONBLOCK: a named pipe put in the image's place while the job waited would block the open, and the one
        # worker with it, forever (no cancel reaches it); the descriptor only checks the file, readers open their own.
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(real, flags)
    except FileNotFoundError as err:
        raise SlideNotFoundError(f"image not found: {real} (it was there when the job was submitted)") from err
    except OSError as err:
        if err.errno != errno.ELOOP:  # e.g. no permission to read it
            raise _unusable_path(real, err) from err
        raise _changed(real) from err  # O_NOFOLLOW: the last part became a symlink after it was resolved
    link_dir: str | None = None
    slide: Slide | None = None
    source = real
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder is named by open_slide
            raise _not_a_regular_file(real)
        proc = Path(f"/proc/self/fd/{fd}")
        opened = Path(os.readlink(proc)) if proc.is_symlink() else real
        if not _under(opened, roots):
            raise _not_allowed(opened, roots)
        if proc.is_symlink() and real.suffix.lower() not in _MULTI_FILE_SUFFIXES:
            link_dir = tempfile.mkdtemp(prefix="pdl1-open-")  # mode 0700: no one else can swap the link
            source = Path(link_dir) / real.name
            source.symlink_to(proc)
        else:
            source = real
        slide = open_slide(
            source,
            mpp=mpp,
            mpp_source="the request's mpp",
            mpp_advice=_qupath_mpp_advice,
            openslide_only=openslide_only,
        )
        if source == real and not os.path.samestat(os.stat(real), os.fstat(fd)):
            raise _changed(real)
        slide.path = real  # provenance names the image, not the private link
        yield slide
    except Pdl1Error as err:
        translated = _as_sent(err, (source, real), shown)
        if translated is err:
            raise
        raise translated from err
    finally:
        if slide is not None:
            slide.close()
        os.close(fd)
        if link_dir is not None:
            shutil.rmtree(link_dir, ignore_errors=True)


def check_upload(body: bytes, *, mpp: float, max_px: int, content_type: str | None = None) -> None:
    """Refuse, before it queues, an upload that is no image, too large, or at an implausible MPP.

    Only the header is read here; the pixels are decoded when the job starts.
    """
    from PIL import Image, UnidentifiedImageError

    expected = "expected the region's PNG or TIFF bytes (Content-Type: image/png or image/tiff)"
    if not body:
        raise SlideFormatError(f"the request body is empty; {expected}")
    rgb8 = (
        "expected 8-bit RGB (or greyscale) pixels of a brightfield region, as QuPath shows it: export the region "
        "as an 8-bit RGB PNG or TIFF"
    )
    try:
        with Image.open(io.BytesIO(body)) as im:
            width, height = im.size
            kind = unconvertible_samples(im)
            pages = _full_resolution_frames(im)
            orientation = im.getexif().get(0x0112, 1)  # EXIF/TIFF Orientation: 1 is as stored
    except Image.DecompressionBombError as err:  # a header stating more pixels than Pillow will decode
        stated = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(stated.group(1))} px" if stated else f"more than {2 * Image.MAX_IMAGE_PIXELS} px"
        raise SlideFormatError(
            f"upload of {size} (as its header states) is over {min(max_px, 2 * Image.MAX_IMAGE_PIXELS)} px; "
            "send a smaller region or a lower resolution (downsample)"
        ) from err
    except UnidentifiedImageError as err:  # its message names only the in-memory file object
        damaged = _damaged_header(body)
        if damaged is not None:
            raise SlideFormatError(damaged) from err
        if body[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF, with samples Pillow does not decode (e.g. floating point)
            raise SlideFormatError(
                f"the request body ({len(body)} bytes) is a TIFF whose pixels cannot be decoded (floating-point or "
                f"other samples it cannot read as colours); {rgb8}"
            ) from err
        form = (content_type or "").split(";")[0].strip().lower()
        # curl -F, requests' files= or data=dict, a browser form (curl --data-binary's own default Content-Type
        # is the urlencoded one, so a form's type with the image's bytes is taken as the image above)
        if form in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise SlideFormatError(
                f"the request body is a form (Content-Type: {form}), not the image itself; {expected}, sent as the "
                "whole body: curl --data-binary @region.png -H 'Content-Type: image/png', requests.post(url, "
                "data=png_bytes)"
            ) from err
        raise SlideFormatError(
            f"the request body ({len(body)} bytes, starting {body[:8]!r}) is not a PNG or TIFF image; {expected}"
        ) from err
    except Exception as err:  # PIL raises several types for unreadable headers; all mean the same here
        damaged = _damaged_header(body)
        if damaged is not None:
            raise SlideFormatError(damaged) from err
        raise SlideFormatError(
            f"body is not a PNG/TIFF image ({type(err).__name__}: {err}); send the region's PNG or TIFF bytes"
        ) from err
    if kind is not None:  # converted to RGB, they would be clipped at 255: an image of white, analysed
        raise SlideFormatError(f"the uploaded image has {kind}; {rgb8}")
    if orientation not in (1, 0):  # viewers turn it; the pixels (and so the results' places) are as stored
        raise SlideFormatError(
            f"the uploaded image carries an orientation tag ({orientation}: {_ORIENTATIONS.get(orientation, 'unknown')}"
            "), so it is shown turned or mirrored but analysed as stored, and its results would not lie over the "
            "region; send the region's pixels as QuPath reads them, without an orientation tag (an exported PNG or "
            "TIFF; for a JPEG, turn the pixels and drop the tag, e.g. PIL.ImageOps.exif_transpose)"
        )
    if pages > 1:  # only the first would be decoded: the rest of a stack or animation dropped unsaid
        raise SlideFormatError(
            f"the uploaded image has {pages} pages or frames at full resolution (a stack or an animation), of which "
            "only the first would be analysed; send one region as a single-page PNG or TIFF (one upload per region)"
        )
    if width * height > max_px:
        raise SlideFormatError(
            f"upload of {width}x{height} px is over {max_px} px; send a smaller region or a lower resolution "
            "(downsample)"
        )
    # Slide checks the MPP's plausible range; a 1-px stand-in runs that check without the pixels.
    Slide(
        ArrayReader(np.zeros((1, 1, 3), np.uint8)),
        mpp=Mpp(mpp, mpp, _UPLOAD_MPP_SOURCE),
        mpp_advice=_upload_mpp_advice,
    ).close()


def _damaged_header(body: bytes) -> str | None:
    """Why a body that starts as a PNG or TIFF has no header Pillow reads, when it is cut short or damaged (as
    an interrupted transfer leaves it), else None (a TIFF whose samples Pillow does not decode)."""
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        kind = "PNG"
    elif body[:4] in (b"II*\x00", b"MM\x00*"):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(body)) as tif:
                tif.pages[0].shape  # noqa: B018 - reads the first page's header
        except Exception:  # tifffile raises several types for a cut or damaged header; all mean the same here
            kind = "TIFF"
        else:
            return None
    else:
        return None
    return (
        f"the request body ({len(body)} bytes) starts as a {kind} but is cut short or damaged before its pixels "
        f"begin; send the complete {kind} file (an interrupted transfer or a partial read sends only its start)"
    )


# EXIF/TIFF Orientation values (tag 274) other than 1, as a viewer shows the stored pixels.
_ORIENTATIONS = {
    2: "mirrored",
    3: "turned 180°",
    4: "flipped upside down",
    5: "mirrored and turned 90°",
    6: "turned 90° clockwise",
    7: "mirrored and turned 90° anticlockwise",
    8: "turned 90° anticlockwise",
}


def _full_resolution_frames(im: Image.Image) -> int:
    """How many frames (TIFF pages, animation frames) an opened image holds, not counting a TIFF's
    reduced-resolution pages (a pyramid's levels or a thumbnail, NewSubfileType bit 0), which add nothing."""
    frames = getattr(im, "n_frames", 1)
    if frames == 1 or im.format != "TIFF":
        return frames
    full = 0
    for index in range(frames):
        im.seek(index)
        full += not int(im.tag_v2.get(254, 0)) & 1  # NewSubfileType
    im.seek(0)
    return full


@contextmanager
def decoded_upload(body: bytes, *, mpp: float | None) -> Iterator[Slide]:
    """The uploaded region as a slide, decoded now that its job runs."""
    from PIL import Image

    if mpp is None:
        raise ValueError("an upload needs its mpp")  # the endpoint requires it; a bug if missing
    try:
        with Image.open(io.BytesIO(body)) as im:
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                # convert("RGB") drops alpha and keeps what lies under it, often black: analysed as dark
                # tissue. Transparent is no tissue; over white it reads as the slide's empty glass.
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                rgb = np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
            else:
                rgb = np.asarray(im.convert("RGB"))
    except Exception as err:  # a header that read but pixels that do not (truncated, corrupt)
        raise SlideFormatError(
            f"the uploaded image cannot be decoded ({type(err).__name__}: {err}); send a complete PNG or TIFF"
        ) from err
    del body
    slide = Slide(ArrayReader(rgb), mpp=Mpp(mpp, mpp, _UPLOAD_MPP_SOURCE), mpp_advice=_upload_mpp_advice)
    try:
        yield slide
    finally:
        slide.close()


_STATUS = {
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
}


class BodyLimit:
    """Refuses a request body over ``limit`` bytes while it is read, so a chunked body (no
    Content-Length) is stopped too; the 413 is the service's JSON error like any other."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # HTTPException: FastAPI passes it on from body parsing (anything else becomes a 400).
                    raise HTTPException(413, detail=too_large(f"more than {self.limit}", self.limit))
            return message

        await self.app(scope, limited, send)


def _token_sent(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a Bearer credential.

    The scheme is case-insensitive (RFC 7235: ``bearer`` is ``Bearer``); compare_digest, so the time taken
    does not tell how much of a guessed token was right.
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(), token.encode())


def too_large(size: str, limit: int) -> str:
    return (
        f"request body of {size} bytes is over the limit of {limit}; "
        "send a smaller region or a lower resolution (downsample)"
    )


def ihc_manifest(pipeline: PipelineConfig) -> Manifest | None:
    """The manifest of the PD-L1 IHC nuclei model the service would load, for listing it.

    The model loads on the first H-DAB job (``Models.ihc``); its manifest is read now without hashing the
    weights (the checksum is the manifest's), so listing it costs no start-up time. None, with a warning,
    where it does not read: H&E jobs run as before, and an H-DAB job fails naming the problem.
    """
    folder = pipeline.ihc_model_dir or demo_model_dir("nuclei-ihc")
    try:
        return read_manifest(folder, task="nuclei", verify=False)
    except ModelFileError as err:
        why = ihc_folder_problem(pipeline) or str(err)
        log.warning("the PD-L1 IHC nuclei model is not listed, and H-DAB images will fail: %s", why)
        return None


def ihc_folder_problem(pipeline: PipelineConfig) -> str | None:
    """Why ``pdl1 serve --models DIR`` has no PD-L1 IHC nuclei model in ``DIR/nuclei-ihc``, in the service's words;
    None where that folder holds a manifest (or the shipped demo's is used).

    The model's own error ends "or leave the model option out to use the shipped demo", which is what
    ``pdl1 run`` can do; the service takes its models from ``--models`` alone, so the fix is a folder there.
    """
    if pipeline.ihc_model_dir is None:
        return None
    folder = Path(pipeline.ihc_model_dir)
    if folder.name != "nuclei-ihc" or (folder / "manifest.json").is_file():  # a model: its own errors say more
        return None
    what = "is a file" if folder.is_file() else "holds no model manifest" if folder.is_dir() else "does not exist"
    return (
        f"{folder} {what}, so the service has no PD-L1 IHC nuclei model: add a nuclei-ihc/ model folder to the "
        f"--models folder {folder.parent} (copy the shipped {demo_model_dir('nuclei-ihc')}, or put a model "
        "trained with `pdl1 train` there); the next H-DAB job loads it, no restart needed"
    )


def query_parameters(endpoint: Any) -> tuple[str, ...]:
    """The query parameters an endpoint declares (those whose default is a ``Query``), from its signature: the
    ones a request may send, so any other is refused rather than ignored (a misspelt origin_x put every result of
    an upload at x 0)."""
    return tuple(
        name for name, p in inspect.signature(endpoint).parameters.items() if isinstance(p.default, params.Query)
    )


def _validation_problem(error: dict[str, Any], content_type: str | None) -> str:
    """One of pydantic's validation errors as ``where: what``; for the mistakes a client makes by
    accident (no JSON Content-Type, a body that is no object, a misspelt field) also what was expected."""
    loc = tuple(error["loc"])
    where = ".".join(clipped(str(p)) for p in loc)  # a field name is the client's too, and may be long
    if loc == ("body",):
        if error["type"] == "missing":
            return 'body: empty; expected a JSON object such as {"image": "/path/to/slide.svs"}'
        if isinstance(error.get("input"), bytes):  # FastAPI parses the body as JSON only when the header says so
            return (
                f"body: sent with Content-Type {content_type or '(none)'}; expected JSON with "
                "'Content-Type: application/json': send that header"
            )
        if error["type"] == "model_attributes_type":
            kinds = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
            return (
                f"body: a JSON {kinds.get(type(error.get('input')), 'value')}; expected a JSON object such as "
                '{"image": "/path/to/slide.svs"}'
            )
    if error["type"] == "json_invalid" and loc[:1] == ("body",):  # FastAPI puts the character's index after "body"
        at = f" at character {loc[1]}" if len(loc) == 2 else ""
        reason = (error.get("ctx") or {}).get("error", error["msg"])
        return (
            f"body: not valid JSON ({reason}{at}); expected a JSON object such as "
            '{"image": "/path/to/slide.svs"}: JSON takes double quotes around names and strings, and no trailing comma'
        )
    if error["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "query":
        fields = list((error.get("ctx") or {}).get("parameters", ()))
        if loc[1] == "roi":
            hint = "an upload is analysed whole: send only the ROI's bounding region (and its origin_x, origin_y); "
        else:
            close = difflib.get_close_matches(str(loc[1]), fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
        return (
            f"{where}: unknown parameter {quoted(str(loc[1]))}; {hint}the upload's parameters are {', '.join(fields)}"
        )
    if error["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "body":
        fields = list(JobRequest.model_fields)
        close = difflib.get_close_matches(str(loc[1]), fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown field {quoted(str(loc[1]))}; {hint}the request's fields are {', '.join(fields)}"
    return f"{where}: {error['msg']}"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers: each is the service's JSON ``detail``."""
    meaning = {
        400: "The body is not UTF-8 text (JSON that does not parse is a 422).",
        401: "Missing or wrong token.",
        403: "The image lies outside the --allow-root folders.",
        404: "No such image or job.",
        409: "The job is not in a state that allows this (e.g. not done yet), or an unknown model.",
        410: "The job's result was released (--keep-results).",
        413: "The request body is over the limit.",
        422: "The request is malformed or names an image that cannot be analysed.",
        429: "The queue is full (--max-queued); retry later.",
    }
    return {code: {"model": ErrorDetail, "description": meaning[code]} for code in codes}


def create_app(settings: ServiceSettings, *, models: Models | None = None) -> FastAPI:
    """The FastAPI app; ``models`` may be passed in (tests), else they load in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.models = models or Models(settings.pipeline)
        # The H&E models load now, as before the first job: a broken one stops the start-up with its message.
        app.state.models.load_he()
        app.state.ihc_manifest = ihc_manifest(settings.pipeline)
        app.state.worker = Worker(
            app.state.models,
            settings.pipeline,
            allow_roots=settings.allow_roots,
            keep_results=settings.keep_results,
            max_queued=settings.max_queued,
        )
        yield
        app.state.worker.stop()

    app = FastAPI(
        title="pdl1-bridge",
        version=__version__,
        lifespan=lifespan,
        description="Uncertainty-aware PD-L1 analysis for QuPath. Submit a job, poll it, fetch QuPath GeoJSON. "
        "Every error answers a JSON object whose `detail` says what was expected, what came, and the fix.",
        responses=_errors(401) if settings.token else None,
    )
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    def allowed_methods(scope: Scope) -> list[str]:
        """Methods some route serves at this path (Starlette's own 405 names only the first route's).

        A fixed path (``/v1/jobs/pixels``) is not also the templated one it happens to fit
        (``/v1/jobs/{job_id}``): where a route matches without path parameters, only such routes count.
        """
        matched: list[tuple[set[str], bool]] = []
        for route in app.router.routes:
            match, child = route.matches({**scope, "method": "GET"})
            if match != Match.NONE and getattr(route, "methods", None):
                matched.append((set(route.methods), bool(child.get("path_params"))))
        fixed = [methods for methods, templated in matched if not templated]
        return sorted({"OPTIONS"}.union(*(fixed or [m for m, _ in matched])))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.token and not _token_sent(request.headers.get("authorization", ""), settings.token):
            return JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse({"detail": too_large(length, settings.max_request_bytes)}, 413)
        if request.method == "OPTIONS":
            methods = allowed_methods(request.scope)
            if len(methods) > 1:
                return Response(status_code=204, headers={"Allow": ", ".join(methods)})
        return await call_next(request)

    @app.exception_handler(Pdl1Error)
    async def domain_error(request: Request, err: Pdl1Error):
        status = next((code for cls, code in _STATUS.items() if isinstance(err, cls)), 400)
        return JSONResponse({"detail": clipped(str(err), limit_chars=MAX_DETAIL_CHARS)}, status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        content_type = request.headers.get("content-type")
        problems = "; ".join(_validation_problem(e, content_type) for e in err.errors())
        return JSONResponse({"detail": clipped(f"bad request: {problems}", limit_chars=MAX_DETAIL_CHARS)}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        headers = dict(err.headers or {})
        if err.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.scope))
        detail = err.detail
        cause = err.__cause__
        if err.status_code == 400 and isinstance(cause, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            detail = (
                f"body: not UTF-8 text ({cause.reason} at byte {cause.start}); expected a JSON object in UTF-8 "
                'such as {"image": "/path/to/slide.svs"}: send the JSON encoded as UTF-8'
            )
        if isinstance(detail, str):
            detail = clipped(detail, limit_chars=MAX_DETAIL_CHARS)
        return JSONResponse({"detail": detail}, err.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def last_resort(request: Request, err: Exception):
        # A bug, not bad input (those are 4xx above): still a JSON answer; the traceback goes to the log.
        return JSONResponse(
            {"detail": f"internal error ({type(err).__name__}); the service log has the details, please report it"},
            500,
        )

    def worker() -> Worker:
        return app.state.worker

    def describe() -> list[ModelDescription]:
        loaded = app.state.models
        manifests = (
            ("segmentation", loaded.seg.manifest),
            ("nuclei", None if loaded.nuclei is None else loaded.nuclei.manifest),
            ("nuclei", app.state.ihc_manifest),  # the PD-L1 IHC model's: its stain tells it apart
        )
        return [
            ModelDescription(
                task=task,
                name=m.name,
                version=m.version,
                sha256=m.checksum,
                members=len(m.members),
                input_mpp=m.input_mpp,
                stain=m.stain,
            )
            for task, m in manifests
            if m is not None
        ]

    @app.get("/v1/health")
    def health() -> Health:
        return Health(status="ok", version=__version__, device=str(app.state.models.seg.device), models=describe())

    @app.get("/v1/models")
    def list_models() -> list[ModelDescription]:
        return describe()

    def accept(job: Job, w: Worker) -> JSONResponse:
        w.submit(job)
        body = JobAccepted(
            job_id=job.id, state=job.state, status_url=f"/v1/jobs/{job.id}", result_url=f"/v1/jobs/{job.id}/result"
        )
        return JSONResponse(body.model_dump(), 202)

    @app.post(
        "/v1/jobs",
        status_code=202,
        responses={202: {"model": JobAccepted}, **_errors(400, 403, 404, 409, 413, 422, 429)},
    )
    def submit(req: JobRequest, w: Worker = Depends(worker)) -> JSONResponse:
        if req.model != "default":
            raise JobStateError(f"unknown model {quoted(req.model)}; this service has 'default' (see /v1/models)")
        requested = require_absolute(req.image, image_path(req.image))
        path = check_allowed(requested, settings.allow_roots)
        if not _is_file(path):
            if path.is_dir():
                raise ImagePathError(
                    f"{clipped(str(requested))} is a folder; expected an image file (e.g. a .svs, .ndpi or .tif): "
                    "send the path of the image file itself"
                )
            if path.exists():  # "image not found" for a named pipe or device that is there
                raise _not_a_regular_file(requested)
            if str(requested) != str(requested).strip():  # pasted with a line end: the shown name looks right
                raise SlideNotFoundError(
                    f"image not found: {quoted(str(requested))}, which ends or starts with white space (a line end "
                    "copied with the path?); send the path without it"
                )
            raise SlideNotFoundError(f"image not found: {clipped(str(requested))}")
        if stain_of_image_type(req.image_type) == "other":  # no model runs on it: refused now, not as a failed job
            raise StainError(
                f"image_type {req.image_type}: pdl1-bridge analyses brightfield H&E (BRIGHTFIELD_H_E: the "
                "segmentation ensemble and a predicted TPS) and PD-L1 IHC (BRIGHTFIELD_H_DAB: TPS and CPS from its "
                "cells), nothing else. If the image is one of those, set its image type in QuPath (Image tab: Image "
                "type) and run the script again"
            )
        job = Job(
            id=uuid.uuid4().hex,
            image=str(path),
            image_as_sent=str(requested),
            roi=parse_roi(req.roi, image_size_px=req.image_size_px),
            mpp=req.mpp,
            outputs=tuple(dict.fromkeys(req.outputs)),
            image_size_px=req.image_size_px,
            image_type=req.image_type,
        )
        return accept(job, w)

    @app.post(
        "/v1/jobs/pixels",
        status_code=202,
        responses={202: {"model": JobAccepted}, **_errors(413, 422, 429)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in ("image/png", "image/tiff")},
            }
        },
    )
    async def submit_pixels(
        request: Request,
        mpp: float = Query(
            ge=MPP_PLAUSIBLE_RANGE[0],
            le=MPP_PLAUSIBLE_RANGE[1],
            allow_inf_nan=False,
            description="Microns per pixel of the uploaded region.",
        ),
        origin_x: float = Query(
            0.0,
            ge=-MAX_COORDINATE_PX,
            le=MAX_COORDINATE_PX,
            allow_inf_nan=False,
            description="Level-0 x of the region's top-left corner.",
        ),
        origin_y: float = Query(
            0.0,
            ge=-MAX_COORDINATE_PX,
            le=MAX_COORDINATE_PX,
            allow_inf_nan=False,
            description="Level-0 y of the region's top-left corner.",
        ),
        downsample: float = Query(
            1.0, gt=0, le=MAX_DOWNSAMPLE, allow_inf_nan=False, description="Level-0 px per uploaded px."
        ),
        outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Query(list(OUTPUTS)),
        w: Worker = Depends(worker),
    ) -> Response:
        """Upload a PNG or TIFF region for images the service cannot open itself."""
        known = query_parameters(submit_pixels)
        unknown = [name for name in request.query_params if name not in known]
        if unknown:
            raise RequestValidationError(
                [
                    {"type": "extra_forbidden", "loc": ("query", name), "msg": "unknown", "ctx": {"parameters": known}}
                    for name in unknown
                ]
            )
        # BodyLimit stops the read past max_request_bytes, stated length or not.
        try:
            body = await request.body()
        except ClientDisconnect:  # nobody is left to answer; one line, not a traceback
            log.info("client %s disconnected during an upload; nothing queued", request.client)
            return Response(status_code=400)
        check_upload(body, mpp=mpp, max_px=settings.max_upload_px, content_type=request.headers.get("content-type"))
        job = Job(
            id=uuid.uuid4().hex,
            image="upload",
            roi=None,
            mpp=mpp,
            outputs=tuple(dict.fromkeys(outputs)),
            upload=body,
            origin_xy=(origin_x, origin_y),
            scale=downsample,
        )
        return accept(job, w)

    @app.get("/v1/jobs/{job_id}", responses=_errors(404, 422))
    def job_status(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        return w.get(job_id).status()

    @app.delete("/v1/jobs/{job_id}", responses=_errors(404, 422))
    def cancel_or_forget(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        """Cancel a queued or running job (a queued upload is freed at once); forget a finished one and
        release its result."""
        job = w.get(job_id)
        if not w.forget(job_id):
            w.cancel(job)
        return job.status()

    @app.get("/v1/jobs/{job_id}/result", responses=_errors(404, 409, 410, 422))
    def result(
        job_id: str,
        offset: int = Query(0, ge=0, description="Index of the first feature of this page."),
        limit: int | None = Query(None, ge=1, description="Features per page (all when omitted, up to the maximum)."),
        w: Worker = Depends(worker),
    ) -> JSONResponse:
        """QuPath GeoJSON FeatureCollection of the job's objects, in pages; ``pdl1`` holds the parent's
        measurements, the entry metadata and ``next_offset`` (null on the last page)."""
        job = w.get(job_id)
        # The state before the result, each read once: the worker sets the result, then "done", and may release it
        # meanwhile. Read the other way round, a job finishing between the two reads looked deleted (a 404).
        state = job.state
        result = job.result
        if result is None and job.released:
            raise ResultReleasedError(
                f"job {job_id}'s result was released: the service holds the results of the last "
                f"{settings.keep_results} finished jobs (--keep-results); submit the job again"
            )
        if result is None and state == "done":  # forgotten by a DELETE since it was looked up: was "done, not done"
            raise JobNotFoundError(
                f"job {job_id} was deleted (DELETE /v1/jobs/{job_id}) while its result was asked for, and its result "
                "released with it; submit the job again"
            )
        if state != "done" or result is None:
            raise JobStateError(f"job {job_id} is {state}, not done" + (f": {job.error}" if job.error else ""))
        page = min(limit or settings.max_page, settings.max_page)
        features, total = feature_page(result, job.outputs, offset, page, scale=job.scale, origin_xy=job.origin_xy)
        next_offset = offset + page if offset + page < total else None
        measurements = {k: v for k, v in parent_measurements(result).items() if math.isfinite(v)}
        return JSONResponse(
            {
                "type": "FeatureCollection",
                "features": features,
                "pdl1": {
                    "total": total,
                    "offset": offset,
                    "next_offset": next_offset,
                    "parent_measurements": measurements,
                    "metadata": entry_metadata(result),
                    # What the metadata's TPS and CPS come from, so a client that analyses several annotations of an
                    # image can merge them as pdl1 run does (bridge.run.merge_entry_metadata).
                    "metadata_counts": metadata_counts(result),
                    "run_id": result.run_id,
                    "stain": result.stain,
                    "review_reasons": result.summary.get("review_reasons", []),
                    "domain": result.summary.get("domain"),
                },
            }
        )

    return app
