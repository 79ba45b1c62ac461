"""``pdl1 serve``: the HTTP service the Groovy scripts in QuPath call.

Submit -> 202 + job id -> poll -> result. One inference worker thread owns the device and runs
jobs in order; models load once at start-up. Security: loopback by default; any other bind
needs a token, which every request must then carry (``Authorization: Bearer ...``); images
are opened only under ``--allow-root`` folders (symlinks resolved, so no escape); request
bodies are size-limited.
"""

from __future__ import annotations

import inspect
import io
import logging
import math
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, PositiveInt, field_validator
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from bridge.objects import feature_page, parent_measurements
from bridge.project import uri_to_path
from bridge.run import entry_metadata
from inference import (
    ArrayReader,
    Cancelled,
    MissingMppError,
    Models,
    Mpp,
    Pdl1Error,
    PipelineConfig,
    RoiError,
    Slide,
    SlideFormatError,
    SlideNotFoundError,
    SlideResult,
    __version__,
    analyse_slide,
)

log = logging.getLogger(__name__)
OUTPUTS = ("regions", "uncertainty_tiles", "sua", "nuclei")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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

    def __post_init__(self) -> None:
        if self.keep_results < 1:
            raise ValueError(f"--keep-results must be at least 1, got {self.keep_results}")
        if self.host not in LOOPBACK and not self.token:
            raise ValueError(
                f"binding {self.host} exposes the service beyond this machine: pass --token (every request "
                "must then send it) or keep the default --host 127.0.0.1"
            )
        if not self.allow_roots:
            raise ValueError("no --allow-root: give the folders whose images the service may open")


# ------------------------------------------------------------------------------------ models


class JobRequest(BaseModel):
    """An analysis of one image (or of its ROI)."""

    image: str = Field(description="Image path or file: URI, as QuPath's server reports it.")
    roi: dict[str, Any] | None = Field(
        default=None, description="GeoJSON Polygon/MultiPolygon in level-0 px; omit for the whole tissue."
    )
    mpp: float | None = Field(default=None, gt=0, le=50, description="Microns per pixel QuPath reports.")
    image_size_px: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Width and height at which QuPath shows the image; an image file that opens at another "
        "size (another scene of a multi-image file, a cropped view) is refused, since the ROI and the results "
        "would not line up.",
    )
    outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Field(default=list(OUTPUTS))
    model: str = Field(default="default", description="Model set; only 'default' (the loaded models) for now.")

    @field_validator("roi")
    @classmethod
    def _roi_is_geometry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"roi must be a GeoJSON Polygon or MultiPolygon geometry, got type {value.get('type')!r}")
        return value


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
    image_size_px: tuple[int, int] | None = None
    slide: Slide | None = None  # uploaded pixels, dropped once the job has finished
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
        state = "cancelling" if self.state == "running" and self.cancel.is_set() else self.state
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
    the newest :data:`KEEP_RECORDS` finished jobs are forgotten.
    """

    def __init__(self, models: Models, pipeline: PipelineConfig, *, keep_results: int = 16):
        self.models = models
        self.pipeline = pipeline
        self.keep_results = keep_results
        self.jobs: dict[str, Job] = {}
        self.finished: deque[str] = deque()  # ids, oldest first
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="pdl1-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.id] = job
        self.queue.put(job.id)

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(
                f"no job {job_id!r}: never submitted, deleted, or older than the last {KEEP_RECORDS} finished "
                "jobs (jobs do not survive a restart of the service)"
            )
        return job

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
            except Exception as err:  # reported to the client as the job's error, never swallowed
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", f"{type(err).__name__}: {err}"
            finally:
                job.finished = time.time()
                if job.slide is not None:
                    job.slide.close()
                    job.slide = None
                self._retire(job)

    def _run(self, job: Job) -> SlideResult:
        from dataclasses import replace

        config = replace(
            self.pipeline,
            mpp=job.mpp,
            run_nuclei="nuclei" in job.outputs and self.models.nuclei is not None,
            run_sua="sua" in job.outputs,
        )

        def on_progress(done: int, total: int) -> None:
            job.tiles_done, job.tiles_total = done, total

        image = job.slide if job.slide is not None else job.image
        return analyse_slide(
            image,
            models=self.models,
            config=config,
            roi=job.roi,
            on_progress=on_progress,
            should_cancel=job.cancel.is_set,
            image_size_px=job.image_size_px,
        )


# ------------------------------------------------------------------------------------ app


def check_allowed(path: Path, roots: tuple[Path, ...]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots`` (symlinks resolved), else 403."""
    real = path.resolve()
    for root in roots:
        if real.is_relative_to(root.resolve()):
            return real
    raise PathNotAllowedError(
        f"{path} is outside the folders this service may open ({', '.join(str(r) for r in roots)}); "
        "start it with --allow-root for that folder"
    )


def image_path(image: str) -> Path:
    if image.startswith("file:"):
        return Path(str(uri_to_path(image)))
    return Path(image)


_STATUS = {
    SlideNotFoundError: 404,
    JobNotFoundError: 404,
    PathNotAllowedError: 403,
    SlideFormatError: 422,
    MissingMppError: 422,
    RoiError: 422,
    JobStateError: 409,
    ResultReleasedError: 410,
    RequestTooLargeError: 413,
}


def streamed_body_limit(limit: int) -> dict[str, int]:
    """FastAPI's own limit on streamed bodies where it has one (newer FastAPI, Starlette >= 1.6).

    ``guard`` refuses a stated Content-Length over the limit on any version; a chunked body
    states none, and only a limit that counts the bytes as they are read can stop it.
    """
    return {"max_body_size": limit} if "max_body_size" in inspect.signature(FastAPI).parameters else {}


def create_app(settings: ServiceSettings, *, models: Models | None = None) -> FastAPI:
    """The FastAPI app; ``models`` may be passed in (tests), else they load in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.models = models or Models(settings.pipeline)
        app.state.worker = Worker(app.state.models, settings.pipeline, keep_results=settings.keep_results)
        yield
        app.state.worker.stop()

    app = FastAPI(
        title="pdl1-bridge",
        version=__version__,
        lifespan=lifespan,
        description="Uncertainty-aware PD-L1 analysis for QuPath. Submit a job, poll it, fetch QuPath GeoJSON.",
        **streamed_body_limit(settings.max_request_bytes),
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        sent = request.headers.get("authorization", "").encode()
        if settings.token and not secrets.compare_digest(sent, f"Bearer {settings.token}".encode()):
            return JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"}, 401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse(
                {"detail": f"request body of {length} bytes is over the limit of {settings.max_request_bytes}"}, 413
            )
        return await call_next(request)

    @app.exception_handler(Pdl1Error)
    async def domain_error(request: Request, err: Pdl1Error):
        status = next((code for cls, code in _STATUS.items() if isinstance(err, cls)), 400)
        return JSONResponse({"detail": str(err)}, status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"detail": f"bad request: {problems}"}, 422)

    def worker() -> Worker:
        return app.state.worker

    def describe() -> list[ModelDescription]:
        out = []
        for task, ens in (("segmentation", app.state.models.seg), ("nuclei", app.state.models.nuclei)):
            if ens is not None:
                m = ens.manifest
                out.append(
                    ModelDescription(
                        task=task,
                        name=m.name,
                        version=m.version,
                        sha256=m.checksum,
                        members=len(m.members),
                        input_mpp=m.input_mpp,
                    )
                )
        return out

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

    def parse_roi(roi: dict[str, Any] | None) -> BaseGeometry | None:
        if roi is None:
            return None
        try:
            return shape(roi)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise RoiError(f"roi is not a readable GeoJSON geometry: {err}") from err

    @app.post("/v1/jobs", status_code=202, responses={202: {"model": JobAccepted}})
    def submit(req: JobRequest, w: Worker = Depends(worker)) -> JSONResponse:
        if req.model != "default":
            raise JobStateError(f"unknown model {req.model!r}; this service has 'default' (see /v1/models)")
        path = check_allowed(image_path(req.image), settings.allow_roots)
        if not path.is_file():
            raise SlideNotFoundError(f"image not found: {path}")
        job = Job(
            id=uuid.uuid4().hex,
            image=str(path),
            roi=parse_roi(req.roi),
            mpp=req.mpp,
            outputs=tuple(dict.fromkeys(req.outputs)),
            image_size_px=req.image_size_px,
        )
        return accept(job, w)

    @app.post("/v1/jobs/pixels", status_code=202, responses={202: {"model": JobAccepted}})
    async def submit_pixels(
        request: Request,
        mpp: float = Query(gt=0, le=50, description="Microns per pixel of the uploaded region."),
        origin_x: float = Query(0.0, description="Level-0 x of the region's top-left corner."),
        origin_y: float = Query(0.0, description="Level-0 y of the region's top-left corner."),
        downsample: float = Query(1.0, gt=0, description="Level-0 px per uploaded px."),
        outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Query(list(OUTPUTS)),
        w: Worker = Depends(worker),
    ) -> JSONResponse:
        """Upload a PNG or TIFF region for images the service cannot open itself."""
        from PIL import Image

        # Read up to the limit only: a chunked upload states no length for the middleware to check.
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_request_bytes:
                raise RequestTooLargeError(
                    f"upload of more than {settings.max_request_bytes} bytes is over the limit; "
                    "send a smaller region or a lower resolution (downsample)"
                )
        try:
            with Image.open(io.BytesIO(body)) as im:
                if im.width * im.height > settings.max_upload_px:
                    raise SlideFormatError(f"upload of {im.width}x{im.height} px is over {settings.max_upload_px} px")
                rgb = np.asarray(im.convert("RGB"))
        except SlideFormatError:
            raise
        except Exception as err:
            raise SlideFormatError(f"body is not a PNG/TIFF image: {err}") from err
        slide = Slide(ArrayReader(rgb), mpp=Mpp(mpp, mpp, "upload"))
        job = Job(
            id=uuid.uuid4().hex,
            image="upload",
            roi=None,
            mpp=mpp,
            outputs=tuple(dict.fromkeys(outputs)),
            slide=slide,
            origin_xy=(origin_x, origin_y),
            scale=downsample,
        )
        return accept(job, w)

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        return w.get(job_id).status()

    @app.delete("/v1/jobs/{job_id}")
    def cancel_or_forget(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        """Cancel a queued or running job; forget a finished one and release its result."""
        job = w.get(job_id)
        if not w.forget(job_id):
            job.cancel.set()  # only the worker changes a job's state
        return job.status()

    @app.get("/v1/jobs/{job_id}/result")
    def result(
        job_id: str,
        offset: int = Query(0, ge=0, description="Index of the first feature of this page."),
        limit: int | None = Query(None, ge=1, description="Features per page (all when omitted, up to the maximum)."),
        w: Worker = Depends(worker),
    ) -> JSONResponse:
        """QuPath GeoJSON FeatureCollection of the job's objects, in pages; ``pdl1`` holds the parent's
        measurements, the entry metadata and ``next_offset`` (null on the last page)."""
        job = w.get(job_id)
        result = job.result  # read once: the worker may release it meanwhile
        if result is None and job.released:
            raise ResultReleasedError(
                f"job {job_id}'s result was released: the service holds the results of the last "
                f"{settings.keep_results} finished jobs (--keep-results); submit the job again"
            )
        if job.state != "done" or result is None:
            raise JobStateError(f"job {job_id} is {job.state}, not done" + (f": {job.error}" if job.error else ""))
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
                    "run_id": result.run_id,
                },
            }
        )

    return app
