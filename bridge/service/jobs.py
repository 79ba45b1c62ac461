"""Jobs and the one worker thread that runs them, in order, on the loaded models."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from bridge.project import stain_of_image_type
from bridge.review_advice import SCRIPT_STAIN_FIX
from bridge.run import failure_message
from bridge.service.errors import JobNotFoundError, QueueFullError, ServiceStoppingError
from bridge.service.ihc_model import ihc_folder_problem
from bridge.service.messages import quoted
from bridge.service.paths import open_allowed
from bridge.service.schemas import JobStatus
from bridge.service.uploads import opened_upload
from inference import (
    Cancelled,
    ModelFileError,
    Models,
    Pdl1Error,
    PipelineConfig,
    Slide,
    SlideResult,
    analyse_slide,
    analysis_grid_um,
)

log = logging.getLogger(__name__)


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
    # What the analysis covered, in the analysed image's px (a path job's ROI, an upload's ROI pixels' outline; None:
    # all of it), kept with the result for its record (GET /v1/jobs/{id}/record) and released with it.
    area: BaseGeometry | None = None
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
            # As the client sent it: the resolved path would tell where a symlinked --allow-root really lies.
            image=self.image if self.image_as_sent is None else self.image_as_sent,
            created=self.created,
            started=self.started,
            finished=self.finished,
        )


# Finished jobs whose records (state, error; no result) are kept; older ones are forgotten.
KEEP_RECORDS = 1000


class Worker:
    """The one thread that runs inference; jobs wait in a FIFO queue.

    A service runs for weeks, so it must not grow with every slide it has analysed: the
    results of the newest ``keep_results`` jobs done are held (a client fetches its result
    within seconds of ``done``; failed and cancelled jobs hold none and do not count), older
    ones are released, and the records (results or not) of all but
    the newest :data:`KEEP_RECORDS` finished jobs are forgotten. At most ``max_queued`` jobs
    wait, uploads still arriving among them (:meth:`upload_room`); uploads wait compressed.
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
        self.receiving = 0  # uploads whose bodies are being read and checked, under the lock (upload_room)
        self.stopping = False  # set once, by halt(), under the lock
        self.thread = threading.Thread(target=self._loop, name="pdl1-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            self._refuse_another()
            self.jobs[job.id] = job
        self.queue.put(job.id)

    @contextmanager
    def upload_room(self) -> Iterator[Callable[[Job], None]]:
        """Room in the queue for an upload while its body is read and checked, refused now where there is none; gives
        the submit of its job, which takes that room. Left without it (the body too large, no image, the client gone),
        the room is free again.

        Only queued jobs counted before: any number of uploads were read at once, each held whole in memory until
        the full queue refused it (30 uploads of 32 MiB sent together took the service from 0.36 to 2.3 GB).
        """
        with self.lock:
            self._refuse_another()
            self.receiving += 1
        held = True

        def submit(job: Job) -> None:
            nonlocal held
            with self.lock:
                self.receiving -= 1
                held = False
                self._refuse_another()  # only a shutdown begun meanwhile: the room was this upload's
                self.jobs[job.id] = job
            self.queue.put(job.id)

        try:
            yield submit
        finally:
            if held:
                with self.lock:
                    self.receiving -= 1

    def _refuse_another(self) -> None:
        if self.stopping:  # it would wait behind the worker's end of queue forever
            raise ServiceStoppingError(
                "the service is shutting down and starts no more jobs; submit the job again once it has been "
                "started again (pdl1 serve)"
            )
        # A cancelled job still in the queue holds nothing (its upload is dropped) and does not count.
        waiting = sum(j.state == "queued" and not j.cancel.is_set() for j in self.jobs.values()) + self.receiving
        if waiting >= self.max_queued:
            arriving = f" ({self.receiving} of them uploads still arriving)" if self.receiving else ""
            raise QueueFullError(
                f"{waiting} jobs are waiting{arriving}, the most this service queues (--max-queued "
                f"{self.max_queued}); retry when one has finished, or cancel one you no longer need "
                "(DELETE /v1/jobs/{id})"
            )

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
        """Ask a queued or running job to stop; a queued upload's bytes and a queued ROI go at once, not when its
        turn comes (a cancelled job no longer counts against ``max_queued``, so what it held would pile up with
        each one submitted and cancelled while a long job ran; a running job's analysis has its ROI already)."""
        job.cancel.set()  # only the worker changes a job's state
        job.upload = None
        job.roi = None

    def forget(self, job_id: str) -> bool:
        """Drop a finished job and its result (the client has what it needs); False if it has not finished."""
        with self.lock:
            if job_id not in self.finished:
                return False
            self.finished.remove(job_id)
            job = self.jobs.pop(job_id)
        job.result, job.area = None, None
        return True

    def halt(self) -> None:
        """Tell the worker to stop, without waiting for it: the running job stops at its next tile, the queued ones
        do not start, and a job submitted from now on is refused (jobs do not survive a restart). The server calls
        it as its shutdown begins, before it waits for open connections (``bridge.service.server``); calling it
        again does nothing more."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            unfinished = [job for job in self.jobs.values() if job.state in ("queued", "running")]
        for job in unfinished:
            self.cancel(job)
        self.queue.put(None)

    def stop(self) -> None:
        """Stop the worker at shutdown (:meth:`halt`) and wait for it; before, the worker went on through the whole
        queue, and the service waited for it until the join timed out and then exited mid-analysis."""
        self.halt()
        self.thread.join(timeout=30)

    def _retire(self, job: Job) -> None:
        with self.lock:
            self.finished.append(job.id)
            # Only jobs that hold a result count: failed and cancelled ones released the results nobody had fetched.
            holding = [old_id for old_id in self.finished if self.jobs[old_id].result is not None]
            for old_id in holding[: -self.keep_results]:
                old = self.jobs[old_id]
                old.result, old.area, old.released = None, None, True
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
                result = self._run(job)
                if job.cancel.is_set():  # asked during the last batch, after the analysis's last look: cancelled
                    raise Cancelled("cancelled as its analysis ended")
                job.result, job.state = result, "done"
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

        roi = job.roi
        if job.cancel.is_set():  # cancelled as its turn came: cancel() may have taken its ROI (read first, above)
            raise Cancelled("cancelled before it started")
        if job.upload is not None:
            body, job.upload = job.upload, None
            # An upload's ROI is its alpha-255 pixels; a client sends the tissue around it as context (alpha 1-254)
            # or transparent. Padded onto the file's grid, its results map back from the padded corner.
            grid_um = analysis_grid_um(self.models, config)
            with opened_upload(body, mpp=config.mpp, origin_xy=job.origin_xy, scale=job.scale, grid_um=grid_um) as up:
                job.origin_xy, job.area = up.origin_xy, up.area
                return self._analyse(job, up.slide, config, roi=up.area, on_progress=on_progress)
        with open_allowed(
            Path(job.image),
            self.allow_roots,
            mpp=config.mpp,
            shown=job.image_as_sent,
            openslide_only=config.openslide_only,
        ) as slide:
            job.area = roi
            return self._analyse(job, slide, config, roi=roi, on_progress=on_progress)

    def _analyse(
        self,
        job: Job,
        slide: Slide,
        config: PipelineConfig,
        *,
        roi: BaseGeometry | None,
        on_progress: Callable[[int, int], None],
    ) -> SlideResult:
        return analyse_slide(
            slide,
            models=self.models,
            config=config,
            roi=roi,
            on_progress=on_progress,
            should_cancel=job.cancel.is_set,
            image_size_px=job.image_size_px,
            image_stain=stain_of_image_type(job.image_type),
            image_stain_source=f"QuPath's image type {job.image_type}",
            stain_advice=stain_advice(job),
        )


# How a client of the service states an image's stain, in the messages that refuse one and in a result's review
# advice (pdl1 run's --stain, which a client cannot pass, is not it): pdl1_analyze.groovy sends QuPath's image type
# with a job on an image path and with an upload; an upload sent without one has only its colour to tell its stain.
PATH_STAIN_ADVICE = SCRIPT_STAIN_FIX
UPLOAD_STAIN_ADVICE = (
    "the upload stated no image_type, so its colour alone tells its stain: send image_type=BRIGHTFIELD_H_E or "
    "BRIGHTFIELD_H_DAB with it (pdl1_analyze.groovy sends QuPath's: set it in the Image tab, Image type), or a "
    "region with more of the stained tissue"
)


def stain_advice(job: Job) -> str:
    """How the client of ``job`` states its image's stain: in QuPath, unless an upload came without QuPath's image
    type."""
    return UPLOAD_STAIN_ADVICE if job.image == "upload" and job.image_type is None else PATH_STAIN_ADVICE
