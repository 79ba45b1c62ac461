"""An entry's results as ``pdl1_analyze.groovy``'s analysis records give them, in the shape of the ``summary.json``
``pdl1 run`` writes, and which of the two an entry's numbers come from: for ``pdl1 report`` and
``pdl1 review-queue``, so a project analysed in QuPath (QuPath 0.7 has no paquo) is reported and ranked too.

Each record (:mod:`bridge.analysis_record`) is one analysed target of its entry (an annotation, a TMA core, the whole
image), with its scores; the records of an entry together are read as a ``pdl1 run`` of those targets
(:func:`bridge.run.merged_targets`: the TPS from the summed cells, the areas and nuclei summed, the flag set where
any target's is, each target's row in ``targets``), but a whole-image analysis and analyses of its annotations or
cores are alternatives, the newer counting (:func:`current_records`). Where an entry has both a summary and
records, the newer source is used whole (:func:`newer_source`): the records where one of them is newer than the
summary, as :func:`bridge.analysis_record.record_is_newer` tells (by what the files say of each other, else by the
clocks: the summary's ``provenance.analysed_at`` against the record's ``written_at``), as ``pdl1 train
--from-review`` orders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from shapely.geometry import mapping

from bridge.analysis_record import (
    QUPATH_ANALYSES,
    AnalysisRecord,
    RunOrder,
    entry_records,
    read_analysis_record,
    record_is_newer,
)
from bridge.targets import WHOLE_IMAGE, TargetRow, rows_from_summary

#: Where an entry's numbers come from (:func:`newer_source`).
RUN = "pdl1 run"
SCRIPT = "pdl1_analyze.groovy"


@dataclass(frozen=True)
class RecordsSummary:
    """An entry's records read as one summary.

    ``summary``: of the shape ``pdl1 run`` writes (``targets`` each record's row, in the order written), None where
    no record has scores; ``written_at``: the newest of those records' times; ``records``: (target row, record) of
    each record in ``summary``, in its targets' order (the rows its ``targets`` hold, carried so that no reader parses
    them back); ``unreadable``: each record that does not read, its path and why (a record without scores among
    them); ``superseded``: the records left out as replaced (:func:`current_records`).
    """

    summary: dict[str, Any] | None
    written_at: datetime | None
    records: tuple[tuple[TargetRow, AnalysisRecord], ...]
    unreadable: tuple[str, ...]
    superseded: int = 0

    def problems(self) -> list[str]:
        """What of the records is not in ``summary``, as a report or queue says it (empty where all is)."""
        out = [
            f"{why}; analyse its annotation or core again in QuPath (pdl1_analyze.groovy)" for why in self.unreadable
        ]
        k = self.superseded
        if k:
            out.append(
                f"{k} earlier {SCRIPT} {'analysis' if k == 1 else 'analyses'} replaced by a later one of the image "
                "(a whole-image analysis and analyses of its annotations or TMA cores are alternatives) "
                f"{'is' if k == 1 else 'are'} not counted"
            )
        return out


def _scored_target(path: Path, record: AnalysisRecord, *, image: str, entry_id: str | None) -> tuple[dict, TargetRow]:
    """A record's summary part (its scores' ``summary`` with ``metadata_counts``) and its target's row; ValueError
    saying what is wrong where its scores are not of the shape :func:`bridge.service.record.record_scores` writes."""
    scores = record.scores or {}
    summary, target, counts = scores.get("summary"), scores.get("target"), scores.get("metadata_counts")
    if not isinstance(summary, dict) or "mpp" not in summary or not isinstance(summary.get("details"), dict):
        raise ValueError("its 'scores' hold no summary (an object with 'mpp' and 'details')")
    if not isinstance(target, dict) or not isinstance(counts, dict) or not isinstance(summary.get("metadata"), dict):
        raise ValueError("its 'scores' hold no target row, metadata or cell counts")
    name = target.get("target") or f"parent {path.stem}"
    row_json = {**target, "image": image, "entry_id": entry_id, "target": str(name), "outline": mapping(record.outline)}
    try:
        (row,) = rows_from_summary({"targets": [row_json]})
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"its target row does not read ({err})") from err
    return {**summary, "metadata_counts": counts}, row


def entry_summary_from_records(sidecar: Path, *, image: str, entry_id: str | None) -> RecordsSummary:
    """The records of an entry (its sidecar folder ``<project>/pdl1/<entry ID>``; ``image``: its image name) read as
    the summary a ``pdl1 run`` of their targets writes (module docstring), in the order they were written. A record
    that does not read, or whose scores do not, is named in ``unreadable`` and left out, never raised."""
    from bridge.run import merged_targets

    scored = []
    unreadable = []
    for path in entry_records(sidecar):
        try:
            record = read_analysis_record(path)
            part, row = _scored_target(path, record, image=image, entry_id=entry_id)
        except (OSError, ValueError) as err:
            unreadable.append(f"{path} does not read ({err})")
            continue
        scored.append((record.written_at, path.name, record, part, row))
    if not scored:
        return RecordsSummary(None, None, (), tuple(unreadable))
    scored.sort(key=lambda item: (item[0], item[1]))
    kept = current_records([row for *_, row in scored])
    superseded = len(scored) - len(kept)
    scored = [scored[i] for i in kept]
    rows = [row for *_, row in scored]
    parts = [part for *_, part, _ in scored]
    newest = max(when for when, *_ in scored)
    base = {**parts[0], "entry_id": entry_id}
    del base["metadata_counts"]
    try:
        summary = merged_targets(base, parts, rows)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # hand-edited: numbers or metadata amiss
        folder = sidecar / QUPATH_ANALYSES
        unreadable.append(f"the records in {folder} do not add up as an image's results ({err!r:.120})")
        return RecordsSummary(None, None, (), tuple(unreadable), superseded)
    summary["provenance"] = {**(base.get("provenance") or {}), "analysed_at": newest.isoformat(timespec="seconds")}
    records = tuple((row, record) for (_, _, record, _, row) in scored)
    return RecordsSummary(summary, newest, records, tuple(unreadable), superseded)


def current_records(rows: list[TargetRow]) -> list[int]:
    """The indices of the records that count among an entry's, given their targets' rows in the order written: as a
    ``pdl1 run`` summary holds the whole image or its targets, never both, a whole-image analysis counts only where
    it is the newest record (then it alone), and otherwise every record but the whole-image ones, which the later
    analyses of annotations or cores replaced (the script removes a whole-image analysis when it analyses the cores,
    and its record with it, but folders of earlier versions of the script still hold such records).

    >>> from bridge.targets import missing_row
    >>> whole, core = TargetRow("a", "1", "PD-L1 analysis", WHOLE_IMAGE, "analysed"), missing_row("a", "1", "A-1")
    >>> current_records([whole, core, core]), current_records([core, whole, whole])
    ([1, 2], [2])
    """
    whole = [i for i, row in enumerate(rows) if row.target_type == WHOLE_IMAGE]
    if whole and whole[-1] == len(rows) - 1:
        return [whole[-1]]
    return [i for i, row in enumerate(rows) if row.target_type != WHOLE_IMAGE]


def newer_source(summary: dict[str, Any] | None, records: RecordsSummary) -> tuple[str, str]:
    """Which results an entry's numbers come from, :data:`RUN` (its ``summary.json``) or :data:`SCRIPT` (its records),
    and the text that says so: the records where one of them is newer than the summary
    (:func:`bridge.analysis_record.record_is_newer`: what the files say, else the clocks; a summary without a time is
    older), else the summary; the one there is where only one is.

    >>> from datetime import timezone
    >>> from bridge.analysis_record import RecordOrder
    >>> none = RecordsSummary(None, None, (), ())
    >>> run = {"run_id": "r1", "provenance": {"analysed_at": "2026-01-02T10:00:00+00:00"}}
    >>> newer_source(run, none)
    ('pdl1 run', 'pdl1 run')
    >>> class Record:  # what newer_source reads of a record
    ...     def __init__(self, day, after_run=None):
    ...         self.order = RecordOrder("p", datetime(2026, 1, day, tzinfo=timezone.utc), after_run)
    >>> later = RecordsSummary({}, datetime(2026, 1, 3, tzinfo=timezone.utc), (("a", Record(3)), ("b", Record(1))), ())
    >>> newer_source(run, later)[1]
    "pdl1_analyze.groovy's 2 analyses in QuPath (newer than pdl1 run's summary.json, which is not counted)"

    A record asked for after the script found that summary is newer, whatever the clocks say:

    >>> behind = RecordsSummary({}, datetime(2026, 1, 1, tzinfo=timezone.utc), (("a", Record(1, "r1")),), ())
    >>> newer_source(run, behind)[0]
    'pdl1_analyze.groovy'
    """
    n = len(records.records)
    analyses = f"{SCRIPT}'s {n} {'analysis' if n == 1 else 'analyses'} in QuPath"
    if records.summary is None or records.written_at is None:
        return RUN, RUN
    if summary is None:
        return SCRIPT, analyses
    run = RunOrder.of_summary(summary)
    if not any(record_is_newer(record.order, run) for _, record in records.records):
        return RUN, f"{RUN} (newer than {analyses}, which are not counted)"
    return SCRIPT, f"{analyses} (newer than {RUN}'s summary.json, which is not counted)"
