"""The record of what one analysis by ``pdl1_analyze.groovy`` wrote into QuPath, so that ``pdl1 train --from-review``
can tell a pathologist's review from the tool's output (``bridge.labels.WrittenObjects``).

The service builds it (``GET /v1/jobs/{id}/record``: :func:`bridge.service.record.analysis_record`), in the image's
level-0 px (an upload's results mapped back as its result pages are); the script saves it verbatim, once it has put
the job's results under the analysed parent, as ``<project>/pdl1/<entry ID>/qupath_analyses/<parent ID>.json``
(:func:`record_path`; the parent's QuPath ID, so a re-analysis of the parent replaces its record). Once the parent,
and every object of the tool that may be its output, is gone from the image as QuPath holds it in memory, the script
sets the record aside in ``qupath_analyses/removed/`` (:func:`set_aside_records`), which no reader here lists: QuPath
closed without saving brings the parent back from the saved data, and the script's next run on the image moves the
record back (meanwhile ``pdl1 train --from-review`` takes it where the objects it reads hold its parent:
``bridge.labels.WrittenObjects.taking_back``). ``pdl1_import_results.groovy`` sets aside there, the same way, the record
of a whole-image analysis whose output it replaces with ``pdl1 run``'s under the same parent; the script moves such a
record back only where the analysis's output is under the parent again (QuPath closed without saving the import),
by the regions, candidates and nuclei the record holds. It holds when it
was written (UTC), the analysed area (the parent's outline), the FN candidates (polygons), the bounds of the positive
regions (to tell whether the analysis's output is still in the image) and the nuclei as QuPath got them (arrays, as
:data:`~bridge.targets.TARGET_REGIONS_FILE` keeps them: a TMA core's cells as GeoJSON features would make it ten
times larger).

It also holds the analysis's scores (``scores``, :func:`bridge.service.record.record_scores`): what ``pdl1 run``
writes of one target in a summary (TPS, CPS, areas, details with the review reasons and the domain, the models) and
the target's row (its name as the script logs it, as ``summary.json``'s ``targets`` lists them), so ``pdl1 report``
and ``pdl1 review-queue`` take an entry's records as a ``pdl1 run`` of its targets (``bridge.record_summary``).
Records written before the scores were kept (version 1 all the same) have none: ``--from-review`` reads them as
before.

Which is newer, a record or the output of ``pdl1 run`` in the same entry folder (``summary.json``), decides what
``pdl1 report`` and ``pdl1 review-queue`` count and what ``pdl1 train --from-review`` takes as written; the two are
written by different machines (the service's, the batch run's), whose clocks may differ by minutes. So the files
say it where they can (:func:`record_is_newer`, which both readers use): the script tells the service which run's
``summary.json`` it found in the entry's folder when it asked for the record, and the record keeps it
(``after_run``: that summary's ``run_id``; null where there was none); ``pdl1 run`` lists in the summary it writes the
records it found there (``provenance.after_analyses``, :func:`records_found`). Only where neither says (files of
earlier versions) do the clocks decide. ``after_run`` is optional, so its records are version 1 still: a reader of
version 1 reads a record without it (the clocks decide for it), and an earlier pdl1-bridge reads one with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from shapely.errors import ShapelyError
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from bridge.targets import TargetNuclei

#: ``TargetRow.target_type`` of an analysed annotation (``bridge.run`` names it so).
ANNOTATION = "annotation"

#: The folder of an entry's records, in its sidecar folder ``<project>/pdl1/<entry ID>``.
QUPATH_ANALYSES = "qupath_analyses"
#: Where in :data:`QUPATH_ANALYSES` pdl1_analyze.groovy sets aside the records of parents no longer in the image
#: (its ``REMOVED_FOLDER``): not the entry's records (:func:`entry_records` lists the folder's own files alone).
SET_ASIDE = "removed"
#: What a record says it is (``format``), and the version of its layout (``version``) this code reads and writes.
RECORD_FORMAT = "pdl1-bridge analysis record"
RECORD_VERSION = 1
#: Where a ``pdl1 run`` summary lists the records it found in its entry's folder (under ``provenance``).
AFTER_ANALYSES = "after_analyses"
#: What the script sends as ``after_run`` where the entry's folder holds no ``summary.json`` (the record keeps null).
NO_RUN = "none"
#: A run id as ``pdl1 run`` writes it (``run_id``: a UUID), or :data:`NO_RUN`: what the service takes as ``after_run``.
AFTER_RUN_PATTERN = "^(none|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"


def record_path(sidecar: Path, parent_id: str) -> Path:
    """Where ``pdl1_analyze.groovy`` saves the record of its analysis of a parent (its QuPath ID) of the entry whose
    sidecar folder (``<project>/pdl1/<entry ID>``) is given."""
    return sidecar / QUPATH_ANALYSES / f"{parent_id}.json"


def entry_records(sidecar: Path) -> list[Path]:
    """The records of an entry's analyses by ``pdl1_analyze.groovy`` (none where it left none), by name: not the
    ``.part`` files of a save that was interrupted, nor those set aside (:func:`set_aside_records`)."""
    return _records_in(sidecar / QUPATH_ANALYSES)


def set_aside_records(sidecar: Path) -> list[Path]:
    """The records ``pdl1_analyze.groovy`` set aside of an entry (``qupath_analyses/removed/<parent ID>.json``), by
    name: their parent was not in the image as QuPath held it when the script last ran there, which may not be what
    QuPath saved (closed without saving, the parent is back); or ``pdl1_import_results.groovy`` replaced their
    analysis's output under the parent with ``pdl1 run``'s (closed without saving, that output is back). None where
    there are none."""
    return _records_in(sidecar / QUPATH_ANALYSES / SET_ASIDE)


def _records_in(folder: Path) -> list[Path]:
    """The ``*.json`` files of ``folder`` itself (not its subfolders), by name; none where it is no folder."""
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@dataclass(frozen=True)
class AnalysisRecord:
    """What one analysis wrote into QuPath under its parent, all in level-0 px.

    ``written_at``: when (timezone-aware, UTC); ``outline``: the analysed area (the parent's ROI; the image for a
    whole-image analysis); ``candidates``: the FN candidate polygons; ``region_bounds``: (R, 4) float64, each
    positive region's x0, y0, x1, y1; ``nuclei``: positions and the classes QuPath got; ``scores``: the analysis's
    scores (``bridge.service.record.record_scores``; checked by ``bridge.record_summary``, which reads them), None
    where the file holds none (``pdl1 train --from-review`` needs none; ``pdl1 report`` names such a record as not
    reading); ``after_run``: the ``run_id`` of the ``pdl1 run`` summary the script found in the entry's folder when
    it asked for the record (None: it found none, or did not say); ``parent_id``: the parent's QuPath ID, the
    file's name.
    """

    written_at: datetime
    run_id: str | None
    outline: BaseGeometry
    candidates: tuple[BaseGeometry, ...]
    region_bounds: np.ndarray
    nuclei: TargetNuclei
    scores: dict[str, Any] | None = None
    after_run: str | None = None
    parent_id: str = ""

    @property
    def order(self) -> RecordOrder:
        """What orders it against an entry's ``pdl1 run`` output (:func:`record_is_newer`)."""
        return RecordOrder(self.parent_id, self.written_at, self.after_run)


@dataclass(frozen=True)
class RecordOrder:
    """What orders a record against the output of ``pdl1 run`` in its entry's folder: its parent's QuPath ID (its
    file's name), when the service wrote it (its clock; timezone-aware) and the ``run_id`` of the ``summary.json``
    the script found in the entry's folder when it asked for it (``after_run``; None where it found none or did not
    say)."""

    parent_id: str
    written_at: datetime
    after_run: str | None = None


@dataclass(frozen=True)
class RunOrder:
    """What orders the output of ``pdl1 run`` in an entry's folder against the entry's records, from its
    ``summary.json`` (:meth:`of_summary`): its ``run_id``, when the batch machine wrote it (``analysed_at``, its clock;
    None where it says none) and the records it found in the folder then (``after_analyses``: parent ID to the
    record's ``written_at``; None where the summary does not say, as one of an earlier version)."""

    run_id: str | None
    analysed_at: datetime | None
    after_analyses: Mapping[str, datetime] | None = None

    @classmethod
    def of_summary(cls, summary: Mapping[str, Any] | None) -> RunOrder:
        """From a summary (None: there is none; its output is older than any record). A time that does not read is
        none (a time without a zone is UTC, as ``pdl1 run`` writes UTC), and so is a listed record's: for it the
        clocks decide, as for a summary without the list."""
        summary = summary or {}
        provenance = summary.get("provenance")
        provenance = provenance if isinstance(provenance, Mapping) else {}
        listed = provenance.get(AFTER_ANALYSES)
        after = None
        if isinstance(listed, Mapping):
            after = {str(k): when for k, v in listed.items() if (when := _utc_time(v)) is not None}
        run_id = summary.get("run_id")
        try:
            analysed_at = summary_analysed_at(summary)
        except ValueError:  # a damaged time: as none (for training, bridge.labels refuses it)
            analysed_at = None
        return cls(None if run_id is None else str(run_id), analysed_at, after)


def summary_analysed_at(summary: Mapping[str, Any]) -> datetime | None:
    """When the run a ``summary.json`` describes analysed its image: its ``provenance.analysed_at`` (as
    ``bridge.run.model_provenance`` writes it: UTC, with its zone), timezone-aware; None where the summary states
    no time (no ``provenance`` or no ``analysed_at``: an earlier version's). A time without a zone (hand-edited, or
    written elsewhere) is taken as UTC, the zone every pdl1 time is in. A time that is not an ISO time, or a
    ``provenance`` that is not an object, raises ValueError saying so: what a damaged summary means is the caller's
    (``pdl1 train --from-review`` refuses it, :meth:`RunOrder.of_summary` counts it as having no time).

    >>> summary_analysed_at({"provenance": {"analysed_at": "2026-01-02T10:00:00+01:00"}}).isoformat()
    '2026-01-02T10:00:00+01:00'
    >>> summary_analysed_at({"provenance": {"analysed_at": "2026-01-02T10:00:00"}}).isoformat()
    '2026-01-02T10:00:00+00:00'
    >>> summary_analysed_at({"provenance": {"pdl1_bridge": "0.1"}}) is None
    True
    >>> summary_analysed_at({"provenance": {"analysed_at": "yesterday"}})
    Traceback (most recent call last):
    ValueError: provenance.analysed_at 'yesterday' is not an ISO time such as 2026-01-02T10:00:00+00:00
    """
    provenance = summary.get("provenance")
    if provenance is None:
        return None
    if not isinstance(provenance, Mapping):
        raise ValueError(f"provenance is not an object of the run's details: {provenance!r:.60}")
    stamp = provenance.get("analysed_at")
    if stamp is None:
        return None
    when = _utc_time(stamp)
    if when is None:
        raise ValueError(f"provenance.analysed_at {stamp!r:.60} is not an ISO time such as 2026-01-02T10:00:00+00:00")
    return when


def _utc_time(value: Any) -> datetime | None:
    """An ISO time as timezone-aware (one without a zone as UTC); None where ``value`` is none or not one."""
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def record_is_newer(record: RecordOrder, run: RunOrder) -> bool:
    """Whether a record of ``pdl1_analyze.groovy`` was written after the ``pdl1 run`` output in its entry's folder (or
    else before it: never at once), for every reader that orders the two (``bridge.record_summary``,
    ``bridge.labels``). What the files say decides, whatever the two machines' clocks say:

    * newer where the script found this run's ``summary.json`` in the folder when it asked for the record (its
      ``after_run`` is the summary's ``run_id``);
    * older where the summary lists the record as found in the folder when it was written (its parent, with its
      ``written_at``: a record written again since is another one).

    Where neither says (a record or summary of an earlier version; a record the run did not find, which found another
    run's summary or none), the clocks do: newer where its ``written_at`` (the service's clock) is later than the
    summary's ``analysed_at`` (the batch machine's); a summary without a time is older than any record.

    >>> from datetime import timedelta
    >>> batch = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
    >>> behind = batch - timedelta(minutes=5)  # the service's clock, 5 minutes behind, after the run
    >>> record_is_newer(RecordOrder("p", behind, after_run="r1"), RunOrder("r1", batch))
    True
    >>> record_is_newer(RecordOrder("p", behind), RunOrder("r1", batch))  # nothing said: the clocks
    False
    >>> ahead = batch + timedelta(minutes=5)  # 5 minutes ahead, before the run that found the record
    >>> record_is_newer(RecordOrder("p", ahead), RunOrder("r1", batch, after_analyses={"p": ahead}))
    False
    """
    if record.after_run is not None and record.after_run == run.run_id:
        return True
    if run.after_analyses is not None and run.after_analyses.get(record.parent_id) == record.written_at:
        return False
    return run.analysed_at is None or record.written_at > run.analysed_at


def records_found(sidecar: Path) -> dict[str, str | None] | None:
    """The records in an entry's folder (``<project>/pdl1/<entry ID>``) as ``pdl1 run`` lists them in the summary it
    writes there (``provenance.after_analyses``, read by :meth:`RunOrder.of_summary`): each parent's ID and its
    record's ``written_at`` as the record says it; None where the record does not read (its order is then told by
    the clocks), so the list still says it was there. None where the folder cannot be listed: nothing is said."""
    try:
        paths = entry_records(sidecar)
    except OSError:
        return None
    found: dict[str, str | None] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        when = data.get("written_at") if isinstance(data, dict) else None
        found[path.stem] = when if isinstance(when, str) else None
    return found


def _geometry(value: Any, what: str) -> BaseGeometry:
    try:
        geometry = shape(value)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, ShapelyError) as err:
        raise ValueError(f"{what} is not a GeoJSON geometry ({err!r:.120})") from err
    if geometry.is_empty:
        raise ValueError(f"{what} is an empty geometry")
    return geometry


def read_analysis_record(path: Path) -> AnalysisRecord:
    """Read a record; one that does not read (not JSON, another format, a field of the wrong shape) raises
    ValueError saying what is wrong (an OSError where the file cannot be read)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        said = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"not a {RECORD_FORMAT!r} (its 'format' is {said!r})")
    if data.get("version") != RECORD_VERSION:
        raise ValueError(
            f"version {data.get('version')!r}, this pdl1-bridge reads version {RECORD_VERSION} (a newer one wrote it?)"
        )
    try:
        written_at = datetime.fromisoformat(str(data["written_at"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"'written_at' is not an ISO time ({data.get('written_at')!r:.60})") from err
    if written_at.tzinfo is None:
        raise ValueError(f"'written_at' ({data['written_at']}) has no time zone; a record's time is UTC")
    candidates = data.get("candidates")
    if not isinstance(candidates, list):
        raise ValueError(f"'candidates' is not a list of geometries: {candidates!r:.80}")
    try:
        bounds = np.asarray(data.get("region_bounds"), np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"'region_bounds' is not a list of [x0, y0, x1, y1] ({err})") from err
    if bounds.size == 0:
        bounds = bounds.reshape(0, 4)
    if bounds.ndim != 2 or bounds.shape[1] != 4 or not np.isfinite(bounds).all():
        raise ValueError(f"'region_bounds' is not a list of [x0, y0, x1, y1] (shape {bounds.shape})")
    run_id = data.get("run_id")
    scores = data.get("scores")
    if scores is not None and not isinstance(scores, dict):
        raise ValueError(f"'scores' is not a JSON object: {scores!r:.80}")
    after_run = data.get("after_run")
    if after_run is not None and not isinstance(after_run, str):
        raise ValueError(f"'after_run' is not a run id or null: {after_run!r:.80}")
    return AnalysisRecord(
        written_at=written_at,
        run_id=None if run_id is None else str(run_id),
        outline=_geometry(data.get("outline"), "'outline'"),
        candidates=tuple(_geometry(c, f"candidate {i + 1}") for i, c in enumerate(candidates)),
        region_bounds=bounds,
        nuclei=TargetNuclei.from_json(data.get("nuclei")),
        scores=scores,
        after_run=after_run,
        parent_id=Path(path).stem,
    )
