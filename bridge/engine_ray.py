"""``pdl1 run --engine ray``: one Ray task per image, on a local or remote Ray cluster.

Without QuPath, workers analyse an image and write its GeoJSON + summary (sidecars, or ``OUT/<stem>.*``). Through
QuPath (paquo), the driver reads each entry's targets (annotations of the target classes or names, else its TMA
cores not marked missing, else the whole image) as the local engine does, a worker analyses each target's region
and returns the results, and the driver writes them under their targets and writes the files. Workers never touch
the QuPath project: the driver alone writes into it (one JVM, no concurrent writers), records status for
``--resume``, and reports progress and the same outcomes as the local engine. A task whose worker dies is retried;
an image that fails is recorded and the batch goes on. Tasks ask for a GPU when the cluster has them.
"""

from __future__ import annotations

import logging
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from shapely.geometry.base import BaseGeometry

from bridge.project import ProjectError, RunStatus, status_for_run
from bridge.run import (
    EntryTargets,
    ExportedTargets,
    ImageOutcome,
    RunConfig,
    RunInterrupted,
    _compare_pairs,
    _Job,
    _jobs,
    _QuPathSession,
    _use_qupath,
    analysis_settings,
    exported_targets_of,
    failure_message,
    outcome_from_summary,
    output_paths,
    resume_skips,
    run_models,
    skipped_outcome,
    summary_of,
    whole_image_row,
    with_targets,
    write_exported,
    write_image_files,
    write_result_files,
    write_targets,
    written,
)
from bridge.run_lock import remove_orphan_parts, run_lock
from bridge.stopping import restore_handlers, termination_handlers
from inference import SlideResult

log = logging.getLogger(__name__)
_MODELS: dict[str, Any] = {}  # per worker process: models load once, not per image
# How long --address HOST:PORT may take to accept a TCP connection before the run is refused. Ray 2.x itself retries
# a port where nothing listens 20 times (RAY_NUM_REDIS_GET_RETRIES), each try taking some 40 s (measured: still
# retrying after 6 minutes), before it says so.
CONNECT_TIMEOUT_S = 5.0


def unreachable_address(address: str | None, *, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing answers at ``--address`` HOST:PORT (or ray://HOST:PORT), None where something does.

    Addresses without a port (``auto``, ``local``, a bare host) are Ray's to resolve: None.

    >>> unreachable_address("auto") is None and unreachable_address(None) is None
    True
    """
    if address is None:
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as err:  # refused, timed out, no route, unknown host
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _worker_models(config: RunConfig) -> tuple[Any, RunConfig]:
    """In a Ray worker: its models (loaded once per worker process) and the config it analyses with."""
    from bridge.user_dirs import openvino_cache_dir
    from inference import tune_allocator

    if config.pipeline.openvino_cache_dir is not None:  # the worker's own user cache, not the driver's
        config = replace(config, pipeline=replace(config.pipeline, openvino_cache_dir=str(openvino_cache_dir())))
    key = config.pipeline.digest()
    if key not in _MODELS:
        tune_allocator()  # a worker is a process of its own: as the CLI does for pdl1 run
        _MODELS.clear()
        _MODELS[key] = run_models(config)
    return _MODELS[key], config


def analyse_to_files(job: _Job, geojson: str, summary: str, entry_id: str | None, config: RunConfig) -> dict:
    """Runs in a Ray worker: analyse one image whole and write its files; returns the summary dict."""
    models, config = _worker_models(config)
    result = job.analyse(models, config)
    rows = [whole_image_row(job, result, entry_id)]
    data = with_targets(summary_of(result, entry_id=entry_id, run_config=config), [result], rows)
    write_result_files(result, Path(geojson), Path(summary), data, include_tiles=config.include_tiles)
    return data


def analyse_regions(job: _Job, rois: list[BaseGeometry], config: RunConfig) -> list[SlideResult]:
    """Runs in a Ray worker: each region's result, in their order (none: the whole image's alone); the driver
    writes them under their targets in the QuPath project (:meth:`bridge.run._QuPathSession.write`)."""
    models, config = _worker_models(config)
    if not rois:
        return [job.analyse(models, config)]
    return [job.analyse(models, config, roi=roi) for roi in rois]


def run_batch_ray(
    inputs: list[Path],
    config: RunConfig,
    *,
    address: str | None = None,
    on_image: Callable[[int, int, str], None] | None = None,
    max_retries: int = 2,
) -> list[ImageOutcome]:
    """Analyse every image as a Ray task; outcomes in input order."""
    try:
        import ray
    except ImportError as err:
        raise ProjectError("--engine ray needs Ray: pip install 'pdl1-bridge[ray]'") from err
    why = None if ray.is_initialized() else unreachable_address(address)  # before the images: fail in seconds
    if why is not None:
        raise ProjectError(
            f"--address {address}: nothing answers there ({why}); start the Ray cluster on that machine with "
            "`ray start --head` (its head node listens on port 6379; Ray Client, ray://, on 10001), or leave "
            "--address out for a local cluster of this machine's cores"
        )
    jobs, project, status_folder = _jobs(inputs, config)
    use_qupath = _use_qupath(config, project)
    with run_lock(status_folder):
        remove_orphan_parts(status_folder, plain_slides=project is None)
        status = status_for_run(status_folder, resume=config.resume, settings=analysis_settings(config))
        if not ray.is_initialized():
            # ray.init puts its own SIGTERM handler in (its C++ core then aborts: exit -6, a stack, nothing said):
            # the command's own goes back, so a kill stops the run as Ctrl-C does (bridge.cli.entry).
            handlers = termination_handlers()
            try:
                ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
            except (ValueError, ConnectionError, RuntimeError) as err:  # Ray's own words name no fix
                raise ProjectError(
                    f"--address {address}: Ray cannot reach a cluster there ({err}); expected auto (a cluster "
                    "started on this machine with `ray start --head`), HOST:PORT of its head node (port 6379) or "
                    "ray://HOST:PORT (Ray Client, port 10001, the ray[client] extra), or leave --address out for a "
                    "local cluster of this machine's cores"
                ) from err
            finally:
                restore_handlers(handlers)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        to_files = ray.remote(num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)(analyse_to_files)
        to_results = ray.remote(num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)(analyse_regions)

        def limit() -> int:
            """Tasks in flight at most: enough to keep every worker busy, few enough that results the driver has not
            yet written (an image's through QuPath: its nuclei and maps, hundreds of MB for a whole slide) do not pile
            up in the object store while it reads the other entries' targets or writes into the project. Counted
            anew for each image: an autoscaling cluster (its head node holding no CPUs) grows with the tasks waiting."""
            return 2 * max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)))

        outcomes: dict[str, ImageOutcome] = {}
        pending: dict[Any, tuple[_Job, float, Any]] = {}  # a task: its image, its start, its entry's targets or files
        qp_session = _QuPathSession(project) if use_qupath else None

        def collect_one() -> None:
            """Wait for a task, and write and record its image (the driver's part: QuPath, files, status)."""
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, t0, found = pending.pop(ready[0])
            try:
                if qp_session is not None:
                    try:
                        analysed = ray.get(ready[0])
                    except BaseException:
                        qp_session.let_go(found)
                        raise
                    results, rows = qp_session.write(job, config, found, analysed)
                    repointed = qp_session.repointed.get(job.key)
                    outcome = write_image_files(
                        job, config, project, status_folder, results, rows, t0, repointed=repointed
                    )
                elif isinstance(found, ExportedTargets):
                    outcome = write_exported(job, config, project, status_folder, found, ray.get(ready[0]), t0)
                else:
                    summary = ray.get(ready[0])
                    outcome = outcome_from_summary(job.key, job.name, summary, time.perf_counter() - t0, found)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # recorded per image; the batch goes on
                outcomes[job.key] = _failed(job, status, getattr(err, "cause", None) or err, t0)
            else:
                outcomes[job.key] = outcome
                status.record(
                    job.key,
                    state="done",
                    image=job.name,
                    run_id=outcome.run_id,
                    seconds=outcome.seconds,
                    **written(outcome),
                )
            if on_image is not None:
                on_image(len(outcomes), len(jobs), job.name)

        try:
            for job in jobs:
                if config.resume and resume_skips(
                    job, status, project, written_by_qupath=use_qupath, stain_given=config.stain, config=config
                ):
                    outcomes[job.key] = skipped_outcome(job, project, status_folder)
                    continue
                t0 = time.perf_counter()
                try:
                    if job.error is not None:
                        raise job.error
                    status.replacing(job.key, image=job.name)  # before its files are replaced
                    if qp_session is not None:
                        found = qp_session.read_targets(job, config)  # fails as the local engine fails the image
                        _log_cores(job, found)
                        pending[to_results.remote(job, found.rois, config)] = (job, t0, found)
                    elif project is not None and (exported := exported_targets_of(job, config, project.parent)):
                        _log_cores(job, exported)
                        pending[to_results.remote(job, exported.rois, config)] = (job, t0, exported)
                    else:
                        paths = output_paths(job.key, project, status_folder)
                        entry_id = job.key if project is not None else None
                        pending[to_files.remote(job, str(paths[0]), str(paths[1]), entry_id, config)] = (job, t0, paths)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:  # recorded per image; the batch goes on
                    outcomes[job.key] = _failed(job, status, err, t0)
                while len(pending) >= limit():
                    collect_one()
            while pending:
                collect_one()
        except KeyboardInterrupt:
            for ref in pending:  # else they go on using the cluster for results nobody writes
                ray.cancel(ref)
            # Each image is written as its task finishes: those are kept, and the table shows them.
            raise RunInterrupted([outcomes[j.key] for j in jobs if j.key in outcomes], None, len(jobs)) from None
        finally:
            if qp_session is not None:
                qp_session.close()
        ordered = [outcomes[job.key] for job in jobs]
        write_targets(jobs, ordered, project, status_folder)
        if config.compare_pairs:
            _compare_pairs(jobs, ordered, project, status_folder, config)
        return ordered


def _failed(job: _Job, status: RunStatus, err: BaseException, t0: float) -> ImageOutcome:
    """An image that failed (a Ray task's error unwrapped to its cause), recorded for the closing table and --resume."""
    message = failure_message(err)
    log.debug("image %s failed:\n%s", job.name, traceback.format_exc())
    status.record(job.key, state="failed", error=message, image=job.name)
    return ImageOutcome(job.key, job.name, "failed", time.perf_counter() - t0, error=message)


def _log_cores(job: _Job, found: EntryTargets | ExportedTargets) -> None:
    cores = [t.label for t in found.choice.targets if t.target_type == "TMA core"]
    if cores:
        log.info("%s: analysing TMA cores %s", job.name, ", ".join(cores))
