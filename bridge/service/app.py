"""The FastAPI app: its routes, error handlers and lifespan (models loaded, the worker started and stopped)."""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from shapely.geometry.base import BaseGeometry
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Scope

from bridge.analysis_record import AFTER_RUN_PATTERN
from bridge.objects import feature_page, parent_measurements
from bridge.project import review_reason_text, stain_of_image_type
from bridge.project_config import OUTPUTS
from bridge.review_advice import review_advice
from bridge.run import entry_metadata, metadata_counts
from bridge.service.bodies import ThreadParsedRoute
from bridge.service.errors import (
    HTTP_STATUS,
    ImageNotOpenedError,
    ImagePathError,
    JobNotFoundError,
    JobStateError,
    PathNotAllowedError,
    ResultReleasedError,
)
from bridge.service.guards import UPLOAD_PATH, BodyLimit, BodyLimits, cross_site_problem, token_problem
from bridge.service.ihc_model import ihc_manifest
from bridge.service.jobs import Job, Worker, stain_advice
from bridge.service.json_text import collector_paused, dumps_in_steps
from bridge.service.messages import MAX_DETAIL_CHARS, clipped, quoted
from bridge.service.paths import (
    allowed_slide_size,
    check_allowed,
    image_path,
    is_file,
    not_a_regular_file,
    require_absolute,
    stray_white_space,
)
from bridge.service.record import analysis_record
from bridge.service.roi import parse_roi, refuse_outside
from bridge.service.schemas import (
    IMAGE_TYPE_DESCRIPTION,
    MAX_COORDINATE_PX,
    MAX_DOWNSAMPLE,
    MIN_DOWNSAMPLE,
    Health,
    ImageType,
    JobAccepted,
    JobRequest,
    JobStatus,
    ModelDescription,
    UploadLimits,
)
from bridge.service.settings import ServiceSettings
from bridge.service.uploads import UPLOAD_MEDIA_TYPES, check_upload
from bridge.service.validation import (
    FOREIGN_REQUEST,
    RECORD,
    RESULT,
    UPLOAD,
    error_responses,
    refuse_unknown_parameters,
    validation_problem,
)
from inference import (
    MPP_PLAUSIBLE_RANGE,
    Models,
    Pdl1Error,
    SlideFormatError,
    SlideNotFoundError,
    SlideResult,
    StainError,
    __version__,
)

log = logging.getLogger(__name__)

# Features of a result page built and encoded at a time (see page_content).
FEATURES_PER_STEP = 2000

# Why the service cannot open a path job's image (or may not): answered with "cannot_open": true, so that
# pdl1_analyze.groovy sends the region's pixels instead (ImageNotOpenedError).
_NOT_OPENED = (SlideNotFoundError, PathNotAllowedError, ImagePathError, SlideFormatError)


def _cannot_open(err: Pdl1Error) -> ImageNotOpenedError:
    status = next((code for cls, code in HTTP_STATUS.items() if isinstance(err, cls)), 422)
    return ImageNotOpenedError(str(err), status=status)


def _check_model(model: str) -> None:
    """Refuse a model set the service does not have (a path job's and an upload's alike): one set per service."""
    if model != "default":
        raise JobStateError(f"unknown model {quoted(model)}; this service has 'default' (see /v1/models)")


def _check_image_type(image_type: str | None) -> None:
    """Refuse, before it queues, an image type no model runs on (a path job's and an upload's alike)."""
    if stain_of_image_type(image_type) == "other":
        raise StainError(
            f"image_type {image_type}: pdl1-bridge analyses brightfield H&E (BRIGHTFIELD_H_E: the "
            "segmentation ensemble and a predicted TPS) and PD-L1 IHC (BRIGHTFIELD_H_DAB: TPS and CPS from its "
            "cells), nothing else. If the image is one of those, set its image type in QuPath (Image tab: Image "
            "type) and run the script again"
        )


def _no_result_yet(job_id: str, state: str, job: Job) -> str:
    """Why a job that is not done has no result, and what the client should do: poll, or submit again."""
    if state == "failed":
        return f"job {job_id} failed, so it has no result: {job.error}"
    if state == "cancelled" or job.cancel.is_set():
        return f"job {job_id} was cancelled (DELETE /v1/jobs/{job_id}), so it has no result; submit the job again"
    return (
        f"job {job_id} is {state}, not done: poll GET /v1/jobs/{job_id} until its state is done, then ask for its "
        "result"
    )


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
        # Without a token every route refuses a request from a web page or to another host (guards.py): 403.
        responses=error_responses(401) if settings.token else {403: FOREIGN_REQUEST},
    )
    # Every route's JSON body model is parsed and validated in a worker thread (bridge.service.bodies).
    app.router.route_class = ThreadParsedRoute
    limits = BodyLimits(
        upload_bytes=settings.max_request_bytes,
        json_bytes=settings.max_json_bytes,
        roi_vertices=settings.max_roi_vertices,
    )
    app.add_middleware(BodyLimit, limits=limits)

    def route_methods(scope: Scope) -> list[str] | None:
        """Methods some route serves at this path (Starlette's own 405 names only the first route's); None where
        no route serves it.

        A fixed path (``/v1/jobs/pixels``) is not also the templated one it happens to fit
        (``/v1/jobs/{job_id}``): where a route matches without path parameters, only such routes count.
        """
        matched: list[tuple[set[str], bool]] = []
        for route in app.router.routes:
            match, child = route.matches({**scope, "method": "GET"})
            if match != Match.NONE and getattr(route, "methods", None):
                matched.append((set(route.methods), bool(child.get("path_params"))))
        if not matched:
            return None
        fixed = [methods for methods, templated in matched if not templated]
        return sorted({"OPTIONS"}.union(*(fixed or [m for m, _ in matched])))

    def allowed_methods(scope: Scope) -> list[str]:
        return route_methods(scope) or ["OPTIONS"]

    def endpoints() -> str:
        """The API's endpoints as a client calls them ("GET /v1/health, ..."), from the routes themselves."""
        served = [
            f"{' or '.join(sorted(route.methods - {'HEAD'}))} {route.path.replace('{job_id}', '{id}')}"
            for route in app.router.routes
            if route.path.startswith("/v1/") and getattr(route, "methods", None)
        ]
        return ", ".join(served)

    def not_allowed(method: str, path: str, allow: list[str]) -> str:
        takes = " or ".join(m for m in allow if m not in ("OPTIONS", "HEAD"))
        return (
            f"{method} is not a method of {clipped(path)}, which takes {takes}; the API's endpoints are "
            f"{endpoints()} (see /docs)"
        )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if not settings.token:
            problem = cross_site_problem(request.headers.get("host"), request.headers.get("origin"))
            if problem is not None:
                return JSONResponse({"detail": problem}, 403)
        refused = settings.token and token_problem(request.headers.get("authorization"), settings.token)
        if refused:
            return JSONResponse(
                {"detail": refused},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = request.headers.get("content-length")
        path = request.scope["path"]
        if length is not None and length.isdigit() and int(length) > limits.of(path):
            return JSONResponse({"detail": limits.problem(path, length)}, 413)
        methods = route_methods(request.scope)
        if request.method == "OPTIONS" and methods is not None:
            return Response(status_code=204, headers={"Allow": ", ".join(methods)})
        if methods is not None and request.method not in methods:
            # Where a fixed path fits a templated one too, Starlette served the templated route: GET
            # /v1/jobs/pixels said "no job 'pixels'" instead of that it takes POST uploads.
            return JSONResponse(
                {"detail": not_allowed(request.method, path, methods)}, 405, headers={"Allow": ", ".join(methods)}
            )
        return await call_next(request)

    @app.exception_handler(Pdl1Error)
    async def domain_error(request: Request, err: Pdl1Error):
        detail = clipped(str(err), limit_chars=MAX_DETAIL_CHARS)
        if isinstance(err, ImageNotOpenedError):  # a field a client can test, not words it would have to parse
            return JSONResponse({"detail": detail, "cannot_open": True}, err.status)
        status = next((code for cls, code in HTTP_STATUS.items() if isinstance(err, cls)), 400)
        return JSONResponse({"detail": detail}, status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        content_type = request.headers.get("content-type")
        problems = "; ".join(validation_problem(e, content_type) for e in err.errors())
        return JSONResponse({"detail": clipped(f"bad request: {problems}", limit_chars=MAX_DETAIL_CHARS)}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        if err.status_code == 400 and isinstance(err.__cause__, RecursionError):  # FastAPI's "error parsing the body"
            # JSON that does not parse is a 422 (validation_problem); this was a 400 that said only "an error".
            return JSONResponse(
                {
                    "detail": "bad request: body: not valid JSON here: its arrays or objects are nested inside each "
                    "other deeper than the service parses (a few hundred levels); expected a JSON object such as "
                    '{"image": "/path/to/slide.svs"}, whose roi nests its coordinates 3 lists deep (a Polygon) or 4 '
                    "(a MultiPolygon): send the annotation's outline as QuPath gives it"
                },
                422,
            )
        headers = dict(err.headers or {})
        detail = err.detail
        if err.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.scope))
            detail = not_allowed(request.method, request.scope["path"], allowed_methods(request.scope))
        if err.status_code == 404 and detail == "Not Found":  # no route: Starlette's words, which named no path
            detail = f"no endpoint {clipped(request.scope['path'])}; the API's endpoints are {endpoints()} (see /docs)"
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
                tile_size_px=m.tile_size_px,
                stain=m.stain,
            )
            for task, m in manifests
            if m is not None
        ]

    @app.get("/v1/health")
    def health() -> Health:
        return Health(
            status="ok",
            version=__version__,
            device=str(app.state.models.seg.device),
            models=describe(),
            upload_limits=UploadLimits(max_px=settings.max_upload_px, max_bytes=settings.max_request_bytes),
        )

    @app.get("/v1/models")
    def list_models() -> list[ModelDescription]:
        return describe()

    def checked_image(requested: Path) -> Path:
        """The real path of a job's image: under an --allow-root folder, and a regular file there."""
        path = check_allowed(requested, settings.allow_roots)
        if not is_file(path):
            if path.is_dir():
                raise ImagePathError(
                    f"{clipped(str(requested))} is a folder; expected an image file (e.g. a .svs, .ndpi or .tif): "
                    "send the path of the image file itself"
                )
            if path.exists():  # "image not found" for a named pipe or device that is there
                raise not_a_regular_file(requested)
            if str(requested) != str(requested).strip():  # pasted with a line end: the shown name looks right
                raise stray_white_space(str(requested))
            raise SlideNotFoundError(f"image not found: {clipped(str(requested))}")
        return path

    def accept(job: Job, w: Worker, *, submit: Callable[[Job], None] | None = None) -> JSONResponse:
        (submit or w.submit)(job)
        body = JobAccepted(
            job_id=job.id, state=job.state, status_url=f"/v1/jobs/{job.id}", result_url=f"/v1/jobs/{job.id}/result"
        )
        return JSONResponse(body.model_dump(), 202)

    @app.post(
        "/v1/jobs",
        status_code=202,
        responses={202: {"model": JobAccepted}, **error_responses(400, 403, 404, 409, 413, 422, 429, 503)},
    )
    def submit(req: JobRequest, w: Worker = Depends(worker)) -> JSONResponse:
        # A def endpoint: FastAPI runs it in a worker thread, so reading the image's header below keeps no other
        # request waiting on the event loop.
        _check_model(req.model)
        try:
            requested = require_absolute(req.image, image_path(req.image))
            path = checked_image(requested)
        except _NOT_OPENED as err:
            raise _cannot_open(err) from err
        _check_image_type(req.image_type)  # no model runs on it: refused now, not as a failed job
        roi = parse_roi(req.roi, image_size_px=req.image_size_px)
        # The image must open, and at the size QuPath shows it, before the job queues: a client that holds the
        # pixels then sends them instead (pdl1_analyze.groovy, on "cannot_open"), rather than learning it from a
        # failed job after the queue. Only the header is read; the worker opens the file again, checked again.
        try:
            size = allowed_slide_size(path, settings.allow_roots, shown=str(requested))
        except _NOT_OPENED as err:
            raise _cannot_open(err) from err
        if req.image_size_px is not None and tuple(req.image_size_px) != size:
            (w_px, h_px), (fw_px, fh_px) = req.image_size_px, size
            raise ImageNotOpenedError(
                f"{clipped(str(requested))}: QuPath shows this image at {w_px} x {h_px} px, but the file opens here "
                f"at {fw_px} x {fh_px} px, so results would not line up: QuPath shows another series or scene of a "
                "multi-image file (the service reads a file's first image), or the file is not the one QuPath "
                "opened (point the entry at the right file with File > Project... > Check project URIs). "
                "pdl1_analyze.groovy then sends the region's pixels (POST /v1/jobs/pixels)",
                status=422,
            )
        if roi is not None and req.image_size_px is None:
            # The header says the size: an ROI wholly outside it is refused now, not as a job that fails after
            # the queue (parse_roi could check only a size the request states).
            refuse_outside(roi, size, size_from="its size as the file opens here")
        job = Job(
            id=uuid.uuid4().hex,
            image=str(path),
            image_as_sent=str(requested),
            roi=roi,
            mpp=req.mpp,
            outputs=tuple(dict.fromkeys(req.outputs)),
            image_size_px=req.image_size_px,
            image_type=req.image_type,
        )
        return accept(job, w)

    @app.post(
        UPLOAD_PATH,
        status_code=202,
        responses={202: {"model": JobAccepted}, **error_responses(409, 413, 422, 429, 503)},  # 409: an unknown model
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in UPLOAD_MEDIA_TYPES},
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
            1.0,
            ge=MIN_DOWNSAMPLE,
            le=MAX_DOWNSAMPLE,
            allow_inf_nan=False,
            description="Level-0 px per uploaded px: the downsample the region was read at.",
        ),
        outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Query(list(OUTPUTS)),
        image_type: ImageType | None = Query(None, description=IMAGE_TYPE_DESCRIPTION),
        model: str = Query("default", description="Model set; only 'default' (the loaded models) for now."),
        w: Worker = Depends(worker),
    ) -> Response:
        """Upload a PNG or TIFF region for images the service cannot open itself.

        Its alpha says what each pixel is: 255 inside the ROI (analysed; results are reported there only, clipped
        to those pixels as a path job's are to its ROI); 1 to 254 context, the tissue around the ROI (seen by the
        models' tiles over the ROI's edge and by the tissue detector, nothing reported there); 0 absent (no part
        of the image, not glass). An image without alpha is all ROI. pdl1_analyze.groovy sends the ROI's bounds
        grown by the largest `tile_size_px` x `input_mpp` of the models the analysis runs (`GET /v1/models`),
        context alpha 128: so analysed, an upload gives what a path job on the same pixels gives.
        """
        refuse_unknown_parameters(request, submit_pixels, UPLOAD)
        _check_model(model)  # as a path job's: an upload ran the loaded models whatever model it named
        _check_image_type(image_type)  # before the body is read: no model runs on it
        # Room in the queue is taken before the body is read and its header parsed, and held while they are: a full
        # queue is a 429 at once, and no more uploads are in memory at a time than the queue takes.
        with w.upload_room() as submit:
            # BodyLimit stops the read past max_request_bytes, stated length or not.
            try:
                body = await request.body()
            except ClientDisconnect:  # nobody is left to answer; one line, not a traceback (a warning: shown)
                log.warning("client %s disconnected during an upload; nothing queued", request.client)
                return Response(status_code=400)
            # In a thread, as a def endpoint's work is: reading a header is quick, but not for every file a client
            # may send, and on the event loop no other request is answered meanwhile.
            await run_in_threadpool(
                check_upload,
                body,
                mpp=mpp,
                max_px=settings.max_upload_px,
                content_type=request.headers.get("content-type"),
            )
            job = Job(
                id=uuid.uuid4().hex,
                image="upload",
                roi=None,
                mpp=mpp,
                outputs=tuple(dict.fromkeys(outputs)),
                upload=body,
                origin_xy=(origin_x, origin_y),
                scale=downsample,
                image_type=image_type,
            )
            return accept(job, w, submit=submit)

    @app.get("/v1/jobs/{job_id}", responses=error_responses(404, 422))  # FastAPI lists a 422 anyway
    def job_status(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        return w.get(job_id).status()

    @app.delete("/v1/jobs/{job_id}", responses=error_responses(404, 422))  # FastAPI lists a 422 anyway
    def cancel_or_forget(job_id: str, w: Worker = Depends(worker)) -> JobStatus:
        """Cancel a queued or running job (a queued upload is freed at once); forget a finished one and
        release its result."""
        job = w.get(job_id)
        if not w.forget(job_id):
            w.cancel(job)
        return job.status()

    def finished(job_id: str, w: Worker) -> tuple[Job, SlideResult, BaseGeometry | None]:
        """A job that is done, with its result and the area it analysed (``Job.area``); else the error that says why
        there is none (410, 404, 409)."""
        job = w.get(job_id)
        # The state before the result, each read once: the worker sets the result, then "done", and may release it
        # meanwhile. Read the other way round, a job finishing between the two reads looked deleted (a 404). The area
        # before the result: the worker sets it first and releases it after the result.
        state = job.state
        area = job.area
        result = job.result
        if result is None and job.released:
            raise ResultReleasedError(
                f"job {job_id}'s result was released: the service holds the results of the last "
                f"{settings.keep_results} jobs done (--keep-results); submit the job again"
            )
        if result is None and state == "done":  # forgotten by a DELETE since it was looked up: was "done, not done"
            raise JobNotFoundError(
                f"job {job_id} was deleted (DELETE /v1/jobs/{job_id}) while its result was asked for, and its result "
                "released with it; submit the job again"
            )
        if state != "done" or result is None:
            raise JobStateError(_no_result_yet(job_id, state, job))
        return job, result, area

    @app.get("/v1/jobs/{job_id}/result", responses=error_responses(404, 409, 410, 422))
    def result(
        job_id: str,
        offset: int = Query(0, ge=0, description="Index of the first feature of this page."),
        limit: int | None = Query(
            None,
            ge=1,
            description=f"Features per page: all when omitted, at most {settings.max_page} (a larger limit is "
            "taken as that).",
        ),
        *,
        request: Request,
        w: Worker = Depends(worker),
    ) -> Response:
        """QuPath GeoJSON FeatureCollection of the job's objects, in pages; ``pdl1`` holds the parent's
        measurements, the entry metadata and ``next_offset`` (null on the last page)."""
        # A misspelt offset ("ofset") gave the first page again with its next_offset: a client paging on it looped.
        refuse_unknown_parameters(request, result, RESULT)
        job, analysed, _ = finished(job_id, w)
        page = min(limit or settings.max_page, settings.max_page)
        with collector_paused():  # each step's features are gone before the next: nothing for it to collect
            content = page_content(job, analysed, offset, page)
        return Response(content, media_type=JSONResponse.media_type)

    @app.get("/v1/jobs/{job_id}/record", responses=error_responses(404, 409, 410, 422))
    def record(
        job_id: str,
        target: str | None = Query(
            None, max_length=1000, description="The analysed parent's name as the script logs it ('A-1', 'Tumor')."
        ),
        target_type: str | None = Query(
            None, pattern="^(TMA core|annotation|whole image)$", description="What the analysed parent is."
        ),
        after_run: str | None = Query(
            None,
            pattern=AFTER_RUN_PATTERN,
            description="The run_id of the pdl1 run summary.json in the entry's folder (pdl1/<entry ID>/) when the "
            "record is asked for, or 'none' where there is none; the record keeps it (null for 'none') and is newer "
            "than that run's output whatever the clocks say. Left out: the record has no after_run.",
        ),
        *,
        request: Request,
        w: Worker = Depends(worker),
    ) -> Response:
        """What the job's result pages put into QuPath, for ``pdl1 train --from-review`` to tell a review from it:
        the analysed area, the FN candidates, the positive regions' bounds and the nuclei (arrays), in the image's
        level-0 px, with the time it is asked for (UTC; pdl1_analyze.groovy asks once it has the pages and saves it
        as ``<project>/pdl1/<entry ID>/qupath_analyses/<parent ID>.json``), and the analysis's scores, the target
        named by ``target`` and ``target_type``, for ``pdl1 report`` and ``pdl1 review-queue``; ``after_run``, the
        ``pdl1 run`` output the script found beside it, orders it against that output. See
        ``bridge.service.record``."""
        refuse_unknown_parameters(request, record, RECORD)  # a misspelt after_run ordered by the clocks unsaid
        job, result, area = finished(job_id, w)
        body = analysis_record(
            result,
            outputs=job.outputs,
            area=area,
            written_at=datetime.now(timezone.utc),
            scale=job.scale,
            origin_xy=job.origin_xy,
            target=target,
            target_type=target_type,
            after_run=after_run,
        )
        return Response(json.dumps(body, separators=(",", ":")), media_type=JSONResponse.media_type)

    def page_content(job: Job, result: SlideResult, offset: int, page: int) -> bytes:
        """The page's JSON, its features built and encoded a few thousand at a time: a whole page of 200 000
        (75 MiB of JSON) built at once and encoded by one json.dumps held the GIL, and with it the event loop,
        0.3 to 0.6 s, and its objects set off the garbage collector (json_text)."""
        _, total = feature_page(result, job.outputs, offset, 0)
        stop = min(offset + page, total)
        features = (
            feature_page(
                result,
                job.outputs,
                start,
                min(FEATURES_PER_STEP, stop - start),
                scale=job.scale,
                origin_xy=job.origin_xy,
            )[0]
            for start in range(offset, stop, FEATURES_PER_STEP)
        )
        next_offset = offset + page if offset + page < total else None
        measurements = {k: v for k, v in parent_measurements(result).items() if math.isfinite(v)}
        reasons = result.summary.get("review_reasons", [])
        # What to check for each kind of reason, once (what pdl1 run says under its table), the stain stated as the
        # client can: in QuPath (pdl1_analyze.groovy prints it), not with pdl1 run's --stain.
        advice = (
            review_advice((review_reason_text(r) for r in reasons), stain_fix=stain_advice(job))
            if result.uncertainty_flag
            else []
        )
        return dumps_in_steps(
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
                    "review_reasons": reasons,
                    "review_advice": advice,
                    "domain": result.summary.get("domain"),
                },
            },
            chunked="features",
        )

    return app
