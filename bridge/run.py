"""Batch runs over QuPath projects or plain slides: targets -> pipeline -> write, image by image.

A failed image is recorded with its error and the batch goes on; finished images are kept
in a status file so ``--resume`` skips them (once it has checked that what they left is whole);
every output is written through a temporary file and renamed, so a crash never leaves half a file,
and the next run removes the temporary files a killed one left. With QuPath (paquo) the results go
into the project's hierarchy (each touched ``data.qpdata`` backed up first and restored on
failure); without it they go to GeoJSON sidecars that ``qupath_scripts/pdl1_import_results.groovy``
imports, and for plain slides to ``OUT/<stem>.geojson``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from bridge import exported_targets
from bridge.analysis_record import AFTER_ANALYSES, records_found
from bridge.atomic import replaced_together
from bridge.classes import PDL1_ANALYSIS
from bridge.exported_targets import (
    TARGET_OBJECTS_FOLDER,
    ExportedEntry,
    export_again,
    export_stamp,
    read_exported_entry,
    stamp_matches,
    target_objects_path,
)
from bridge.objects import (
    candidate_objects,
    parent_measurements,
    qupath_classes,
    region_objects,
    result_features,
    tile_objects,
)
from bridge.options import option_setting
from bridge.project import (
    PDL1_DIR,
    WITH_PROJECT,
    ImageMovedError,
    ImageSearch,
    ProjectEntry,
    ProjectError,
    RunStatus,
    claimed_twice,
    distinct_inputs,
    find_image,
    not_a_folder,
    qpdata_problem,
    read_project,
    repeat_note,
    review_reason_text,
    sharing_a_stem,
    sidecar_dir,
    status_for_run,
    summary_problem,
    unwritable_fix,
)
from bridge.project_config import ProjectConfig
from bridge.qupath_geojson import QuPathObject, write_features_to
from bridge.review_advice import RUN_STAIN_FIX
from bridge.run_lock import remove_orphan_parts, run_lock
from bridge.targets import (
    MISSING,
    OF_ANOTHER_RUN,
    RUN_IMAGE_AGAIN,
    TARGETS_FILE,
    TMA_CORE,
    TMA_CORES,
    UNREADABLE,
    WHOLE_IMAGE,
    TargetChoice,
    TargetNuclei,
    TargetRow,
    analysed_row,
    analysed_targets,
    choose_targets,
    core_label,
    furthest_domain,
    missing_row,
    nested_targets,
    numbered,
    rows_from_summary,
    rows_to_json,
    run_target_regions,
    target_regions_path,
    target_regions_record,
    write_target_table,
)
from inference import (
    Cps,
    Models,
    Pdl1Error,
    PipelineConfig,
    SlideResult,
    Tps,
    __version__,
    analyse_slide,
    cps_category,
    cps_text,
    is_finite_number,
    tps_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """A batch run, built at the edge (CLI, service) and passed down.

    ``qupath``: ``auto`` writes into the project through paquo when QuPath is installed and
    sidecars otherwise; ``never`` always writes sidecars; ``always`` fails without QuPath.
    ``target_classes``/``target_names`` choose annotations to analyse (read through QuPath, or from each image's
    export by ``pdl1_export_labels.groovy``); with none, each TMA core of an image with a grid, else each image's
    tissue under a ``PD-L1 analysis`` annotation. ``settings``: the
    project config with the command line over it, which each summary records (None: not recorded).
    ``stain``: the stain of every image ("H&E", "H-DAB"), over what QuPath's image types say (None:
    theirs, and the image's colour where the project states none). ``compare_pairs``: after the run, pair
    each case's H&E with its PD-L1 IHC and compare them (``pairs.json``, see :mod:`bridge.pairs`); ``case_key``:
    the entry metadata key that names each image's case there.
    ``pipeline``: how each image is analysed. ``out``: the results folder of plain slides (a project's are in
    it). ``resume``: leave the images a status file records as done. ``search_dirs``: folders to look for images
    the project does not find where it says; through QuPath, each entry written whose image was found away from its
    URI (there, or relative to the moved project) is pointed at it first (:func:`bridge.qupath.point_entry_at`).
    ``include_tiles``: write the uncertainty tiles.
    """

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    out: Path | None = None
    resume: bool = False
    qupath: str = "auto"
    target_classes: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    search_dirs: tuple[Path, ...] = ()
    include_tiles: bool = True
    settings: ProjectConfig | None = None
    stain: str | None = None
    compare_pairs: bool = True
    case_key: str = "case"


@dataclass(frozen=True)
class ImageOutcome:
    """What happened to one image; the closing table shows these."""

    key: str
    name: str
    state: str  # done, failed or skipped
    seconds: float = 0.0
    tps_percent: float | None = None
    tps_category: str | None = None
    positive_area_pct: float | None = None
    uncertainty_flag: bool | None = None
    candidates: int | None = None
    error: str | None = None
    run_id: str | None = None
    cps_percent: float | None = None  # a PD-L1 IHC's (the image's, over its targets)
    outputs: tuple[str, ...] = ()
    stain: str | None = None
    stain_source: str | None = None
    review_reasons: tuple[str, ...] = ()  # why it needs review (the summary's, with value and limit): closing lines


@dataclass(frozen=True)
class _Job:
    key: str
    name: str
    image: Path | None
    entry: ProjectEntry | None
    error: Exception | None = None
    # Whether a run through QuPath points the entry at ``image`` before writing into it: found away from its URI,
    # where the run was given --search-dir or the project moved with its images (_jobs).
    repoint: bool = False

    @property
    def size_px(self) -> tuple[int, int] | None:
        """The image's size as the project states it: the file must open at that size."""
        return None if self.entry is None else self.entry.size_px

    @property
    def mpp(self) -> float | None:
        """µm/px of the project's calibration (a user may have set it in QuPath), if it states one."""
        return None if self.entry is None else self.entry.mpp

    def analyse(
        self,
        models: Models,
        config: RunConfig,
        on_tiles: Callable[[int, int], None] | None = None,
        *,
        roi: BaseGeometry | None = None,
    ) -> SlideResult:
        """The pipeline call for this image (local engine, QuPath session and Ray workers alike), in the
        frame and calibration its project states."""
        stain, source = self.stain(config)
        return analyse_slide(
            self.image,
            models=models,
            config=config.pipeline,
            roi=roi,
            on_progress=on_tiles,
            image_size_px=self.size_px,
            image_mpp=self.mpp,
            image_stain=stain,
            image_stain_source=source,
            stain_advice=RUN_STAIN_ADVICE,
            mpp_advice=run_mpp_advice,
            config_mpp_source="--mpp",
        )

    def stain(self, config: RunConfig) -> tuple[str | None, str]:
        """The image's stain and where that comes from: ``--stain``, else QuPath's image type."""
        if config.stain is not None:
            return config.stain, "--stain"
        if self.entry is None or self.entry.stain is None:
            return None, ""
        return self.entry.stain, f"QuPath's image type {self.entry.image_type}"


# How a user of `pdl1 run` states an image's stain, in the messages that refuse one (analyse_slide's stain_advice;
# the library's own words name no program's option, and the service passes its clients'): --stain states every
# image's, so it is the fix only where the run is of one stain.
RUN_STAIN_ADVICE = RUN_STAIN_FIX


def run_models(config: RunConfig) -> Models:
    """The models of a `pdl1 run`: what their runtime refuses during the run (a conversion to OpenVINO that fails)
    is advised as its options (--runtime torch), not the library's config fields (runtime='torch')."""
    return Models(config.pipeline, setting=option_setting)


def run_mpp_advice(value: str) -> str:
    """How a user of `pdl1 run` gives an image's µm/px, in the messages that ask for it (analyse_slide's mpp_advice;
    the library's own words name its argument, and the service passes its clients')."""
    return (
        f"give {value}, with --mpp, or set the pixel size in QuPath (Image tab: Pixel width/height) and analyse "
        "the project"
    )


# A CPS's category, written only where it has one: "insufficient tumour cells" (fewer than 100 tumour cells).
CPS_CATEGORY_KEY = "PD-L1 CPS category"


def tps_metadata_keys(stain: str) -> tuple[str, str]:
    """The entry metadata keys of the TPS and its category: measured on an IHC, predicted on an H&E."""
    if stain == "H-DAB":
        return "PD-L1 TPS %", "PD-L1 TPS category"
    return "PD-L1 Predicted TPS % (H&E)", "PD-L1 Predicted TPS category (H&E)"


def _cps_metadata(cps: Cps) -> dict[str, str]:
    """A CPS's entry metadata: ``PD-L1 CPS`` (:func:`inference.cps_text`: one decimal, more where one would carry it
    to a whole number, a cut-off, it lies below) where there is one, and ``PD-L1 CPS category`` where it has one
    (under 100 tumour cells, ``insufficient tumour cells``, as the TPS's category beside it;
    :func:`inference.cps_category`). Without a tumour cell there is no CPS: its key is left out, never written
    empty (an empty value in QuPath's metadata reads as a fault), and the category says why."""
    category = cps_category(cps.tumour)
    return {
        **({} if cps.percent is None else {"PD-L1 CPS": cps_text(cps.percent)}),
        **({CPS_CATEGORY_KEY: category} if category else {}),
    }


def _tps_metadata(tps: Tps | None, stain: str) -> dict[str, str]:
    """A TPS's entry metadata (:func:`tps_metadata_keys`): its text (:func:`inference.tps_text`: more decimals where
    one would carry it across a cut-off) where there is a number, and its category where there is a TPS. Without a
    tumour cell the number's key is left out, never written empty (an empty value in QuPath's metadata reads as a
    fault), and the category, ``insufficient tumour cells``, says why; without nuclei both are left out.

    >>> from inference import tumour_proportion_score
    >>> _tps_metadata(tumour_proportion_score(0, 0), "H-DAB")
    {'PD-L1 TPS category': 'insufficient tumour cells'}
    >>> _tps_metadata(tumour_proportion_score(30, 70), "H&E")
    {'PD-L1 Predicted TPS % (H&E)': '30.0', 'PD-L1 Predicted TPS category (H&E)': '1-49%'}
    """
    if tps is None:
        return {}
    percent_key, category_key = tps_metadata_keys(stain)
    return {**({} if tps.percent is None else {percent_key: tps_text(tps.percent)}), category_key: tps.category}


def entry_metadata(result: SlideResult) -> dict[str, str]:
    """Project entry metadata (strings), DESIGN.md §3: a key with no value is left out, never written empty."""
    model = result.seg_model or result.nuclei_model
    out = {
        **_tps_metadata(result.tps, result.stain),
        **({} if model is None else {"PD-L1 model": f"{model.name} {model.version} ({model.sha256[:12]})"}),
        "PD-L1 run": result.run_id,
    }
    if result.cps is not None:
        out |= _cps_metadata(result.cps)
    if result.stain != "H&E":
        out["PD-L1 stain"] = result.stain
    return out


# Every entry metadata key :func:`entry_metadata` writes, for either stain: a re-run owns them all. A list, not
# every "PD-L1 ..." key: a pathologist's own "PD-L1 TPS (manual)" stays, and so do `pdl1 review-queue`'s keys,
# which that command writes and removes. The Groovy scripts hold the same list (a test keeps them equal).
RUN_METADATA_KEYS = (
    *tps_metadata_keys("H-DAB"),
    *tps_metadata_keys("H&E"),
    "PD-L1 CPS",
    CPS_CATEGORY_KEY,
    "PD-L1 stain",
    "PD-L1 model",
    "PD-L1 run",
)


def stale_entry_metadata(keys: Iterable[str], fresh: Mapping[str, str]) -> list[str]:
    """The entry metadata an earlier run wrote that this run's ``fresh`` metadata does not replace.

    Left in place, a re-run after the stain was corrected kept the H&E's predicted TPS beside the IHC's
    TPS (or an H&E kept the IHC's ``PD-L1 stain``). Others' keys stay.

    >>> stale_entry_metadata(["case", "PD-L1 TPS %", "PD-L1 stain", "PD-L1 run", "PD-L1 review rank"],
    ...                      {"PD-L1 Predicted TPS % (H&E)": "12.0", "PD-L1 run": "r2"})
    ['PD-L1 TPS %', 'PD-L1 stain']
    """
    return [k for k in keys if k in RUN_METADATA_KEYS and k not in fresh]


def _put_back(metadata: MutableMapping[str, str], before: Mapping[str, str]) -> None:
    """``metadata`` made what it was (``before``), changing only the keys that differ.

    >>> m = {"a": "1", "PD-L1 TPS %": "40.0"}
    >>> _put_back(m, {"a": "1", "PD-L1 TPS %": "12.0", "case": "A"}); m
    {'a': '1', 'PD-L1 TPS %': '12.0', 'case': 'A'}
    """
    for key in [k for k in metadata if k not in before]:
        del metadata[key]
    for key, value in before.items():
        if metadata.get(key) != value:
            metadata[key] = value


def set_entry_metadata(metadata: MutableMapping[str, str], fresh: Mapping[str, str]) -> None:
    """Write ``fresh`` into an entry's ``metadata`` (paquo's mapping), first removing this tool's stale keys."""
    for key in stale_entry_metadata(list(metadata), fresh):
        del metadata[key]
    for key, value in fresh.items():
        metadata[key] = value


def summary_of(result: SlideResult, *, entry_id: str | None, run_config: RunConfig) -> dict[str, Any]:
    """The per-image summary JSON: numbers, metadata and provenance."""
    return {
        "entry_id": entry_id,
        **result_scores(result),
        IMAGE_FILE_BYTES: _file_bytes(result.image_path),
        "provenance": {
            **model_provenance(result, analysed_at=datetime.now(timezone.utc)),
            "pipeline_config": _pipeline_record(run_config, result),
            "settings": None if run_config.settings is None else run_config.settings.run_record(),
        },
    }


# A summary's size in bytes of the image file analysed: --resume tells by it a same-named file from another one.
IMAGE_FILE_BYTES = "image_file_bytes"


def _file_bytes(path: str | Path) -> int | None:
    try:
        return Path(path).stat().st_size
    except (OSError, TypeError, ValueError):
        return None


def result_scores(result: SlideResult) -> dict[str, Any]:
    """What a summary holds of one analysed target's result (:func:`summary_of` but the entry and the provenance);
    also what an analysis record of ``pdl1_analyze.groovy`` keeps of it (``bridge.analysis_record``)."""
    tps = result.tps
    return {
        "image": result.image_path,
        "image_size_px": [result.image_width_px, result.image_height_px],
        "mpp": result.mpp,
        "run_id": result.run_id,
        "config_hash": result.config_hash,
        "tps_percent": None if tps is None else tps.percent,
        "tps_category": None if tps is None else tps.category,
        "stain": result.stain,
        "stain_source": result.stain_source,
        "cps": None if result.cps is None else result.cps.percent,
        **summed_numbers([result]),
        "uncertainty_flag": result.uncertainty_flag,
        "parent_measurements": {k: v for k, v in parent_measurements(result).items() if v == v},
        "metadata": entry_metadata(result),
        "details": result.summary,
    }


def model_provenance(result: SlideResult, *, analysed_at: datetime) -> dict[str, Any]:
    """When (UTC, to the second), by which pdl1-bridge, Python and models a result was analysed: a summary's
    ``provenance`` but the run's config."""
    return {
        "analysed_at": analysed_at.isoformat(timespec="seconds"),
        "pdl1_bridge": __version__,
        "python": platform.python_version(),
        "seg_model": None if result.seg_model is None else asdict(result.seg_model),
        "nuclei_model": None if result.nuclei_model is None else asdict(result.nuclei_model),
    }


def _pipeline_record(run_config: RunConfig, result: SlideResult) -> dict[str, Any]:
    """The pipeline config as it ran: ``nuclei.tta`` is the value used (the config holds None where the model's
    manifest decides) and ``nuclei.tta_source`` says whether the run's option or the manifest decided."""
    record = asdict(run_config.pipeline)
    if "nuclei_tta" in result.summary:  # the nuclei model ran
        record["nuclei"]["tta"] = result.summary["nuclei_tta"]
        record["nuclei"]["tta_source"] = result.summary["nuclei_tta_source"]
    return record


def summed_numbers(results: list[SlideResult]) -> dict[str, Any]:
    """The summary's numbers that add up over an image's analysed targets (one, or several: TMA cores, annotations):
    the nuclei per class, the analysed and positive area, and the SUA candidates and regions, which are None, not 0,
    where no segmentation ran (a PD-L1 IHC is scored by its cells): nothing was looked for."""
    return added_numbers([_target_numbers(r) for r in results])


def _target_numbers(result: SlideResult) -> dict[str, Any]:
    segmented = result.seg_model is not None
    return {
        "nuclei": {} if result.nuclei is None else {n: result.nuclei.count(n) for n in result.nuclei.class_names},
        "positive_area_um2": result.positive_area_um2,
        "analysed_area_um2": result.analysed_area_um2,
        "sua_candidates": len(result.candidates) if segmented else None,
        "regions": len(result.regions) if segmented else None,
    }


def added_numbers(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`summed_numbers` from each target's own (a summary's ``nuclei``, ``positive_area_um2``,
    ``analysed_area_um2``, ``sua_candidates``, ``regions``), as a summary or an analysis record keeps them."""
    nuclei: dict[str, int] = {}
    for part in parts:
        for name, count in (part.get("nuclei") or {}).items():
            nuclei[name] = nuclei.get(name, 0) + int(count)
    analysed = sum(float(p.get("analysed_area_um2") or 0.0) for p in parts)
    positive = sum(float(p.get("positive_area_um2") or 0.0) for p in parts)
    candidates = [p["sua_candidates"] for p in parts if p.get("sua_candidates") is not None]
    regions = [p["regions"] for p in parts if p.get("regions") is not None]
    return {
        "nuclei": nuclei,
        "positive_area_um2": positive,
        "positive_area_pct": 100 * positive / analysed if analysed > 0 else None,
        "analysed_area_um2": analysed,
        "sua_candidates": sum(candidates) if candidates else None,
        "regions": sum(regions) if regions else None,
    }


def region_children(result: SlideResult, *, include_tiles: bool = True) -> Iterator[QuPathObject]:
    """A result's positive regions, SUA candidates and (``include_tiles``) uncertainty tiles: its objects but the
    nuclei, which :data:`TARGET_REGIONS_FILE` keeps as arrays (:func:`written_nuclei`; a TMA's cells as GeoJSON
    features would outweigh all else)."""
    yield from region_objects(result)
    yield from candidate_objects(result)
    if include_tiles:
        yield from tile_objects(result)


def written_nuclei(result: SlideResult) -> TargetNuclei:
    """A result's nuclei as they are written into QuPath (positions, and the classes QuPath gets: an IHC's graded
    ``Tumor: 1+`` ...), for :data:`TARGET_REGIONS_FILE`; none where the nuclei model did not run."""
    if result.nuclei is None:
        return TargetNuclei.none()
    names, index = qupath_classes(result.nuclei)
    return TargetNuclei(np.asarray(result.nuclei.xy, np.float64).reshape(-1, 2), np.asarray(index), tuple(names))


def whole_image_row(job: _Job, result: SlideResult, entry_id: str | None) -> TargetRow:
    """The one row of ``targets.csv`` of an image analysed whole (under its ``PD-L1 analysis`` annotation)."""
    return analysed_row(job.name, entry_id, PDL1_ANALYSIS.name, WHOLE_IMAGE, result)


def with_targets(summary: dict[str, Any], results: list[SlideResult], rows: list[TargetRow]) -> dict[str, Any]:
    """An image's summary with its targets' rows (``targets``, each target's own TPS, for ``targets.csv``) and, where
    several targets were analysed, the image's scores as its entry metadata has them.

    :func:`summary_of` describes the first target; an image of several (TMA cores, annotations) gave the closing
    table and the report the first one's TPS while QuPath's metadata held the image's, and recorded the first one's
    run id while the metadata held the last one's, so ``--resume`` took the image for unsaved and ran it again. The
    TPS, its category, the CPS and the flag (set where any target's is) are the image's here, and so are what adds
    up over the targets (the analysed and positive area, the SUA candidates and regions, the nuclei per class), a
    target within another's outline left out of these sums, since that one holds its cells (:func:`nested_targets`). So
    are ``details.review_reasons``: every target's, each with its name (``target``, as the report's table names it;
    :func:`bridge.project.review_reason_text` leads with it), so they say why the image is flagged (the first
    target's alone said nothing of a core C-4 out of domain); and ``details.domain``: the target's furthest from the
    training domain, named (:func:`bridge.targets.furthest_domain`; the first core's reading said "within" beside
    an out-of-domain C-4). ``parent_measurements`` is None: each target's are on its own annotation or core in
    QuPath, and none of them is the image's (the first target's stood there unnamed). The other details stay the
    first target's, each target's own numbers being in ``targets``.
    """
    return merged_targets(summary, [target_part(r) for r in results], rows)


def target_part(result: SlideResult) -> dict[str, Any]:
    """What :func:`merged_targets` needs of one analysed target: its summed numbers, entry metadata,
    ``metadata_counts``, ``details.review_reasons`` and ``uncertainty_flag``, keyed as a summary keys them."""
    return {
        **summed_numbers([result]),
        "metadata": entry_metadata(result),
        "metadata_counts": metadata_counts(result),
        "details": {"review_reasons": result.summary.get("review_reasons", []), "domain": result.summary.get("domain")},
        "uncertainty_flag": result.uncertainty_flag,
    }


def merged_targets(
    summary: dict[str, Any], parts: Sequence[Mapping[str, Any]], rows: list[TargetRow]
) -> dict[str, Any]:
    """:func:`with_targets` from each analysed target's part (:func:`target_part`; a record of
    ``pdl1_analyze.groovy`` keeps the same keys: ``bridge.record_summary``), in the order of ``rows``' analysed ones."""
    out = {**summary, "targets": rows_to_json(rows)}
    if len(parts) < 2:
        return out
    out["parent_measurements"] = None
    analysed = [label for _, label in analysed_targets(rows)]
    out["details"] = {
        **summary["details"],
        "review_reasons": [
            {**reason, "target": label}
            for label, part in zip(analysed, parts, strict=True)
            for reason in (part.get("details") or {}).get("review_reasons", [])
        ],
    }
    furthest = furthest_domain(
        [(label, (part.get("details") or {}).get("domain")) for label, part in zip(analysed, parts, strict=True)]
    )
    if furthest is not None:
        out["details"]["domain"] = furthest
    counts = [part.get("metadata_counts") or {} for part in parts]
    # TMA cores lie side by side (pdl1_analyze.groovy tests no core either).
    nested = nested_targets([None if row.target_type == TMA_CORE else row.outline for row, _ in analysed_targets(rows)])
    metadata = merge_entry_metadata(
        [(part["metadata"], c) for part, c in zip(parts, counts, strict=True)], nested=nested
    )
    out["metadata"] = metadata
    out["run_id"] = metadata["PD-L1 run"]
    out["uncertainty_flag"] = any(part.get("uncertainty_flag") for part in parts)
    out.update(added_numbers([part for part, inside in zip(parts, nested, strict=True) if not inside]))
    merged = summed_scores([c for c, inside in zip(counts, nested, strict=True) if not inside])
    if merged is not None:
        tps, cps = merged
        out["tps_percent"], out["tps_category"] = tps.percent, tps.category
        out["cps"] = None if cps is None else cps.percent
    return out


# A summary's provenance key for the export its targets were read from (bridge.exported_targets.export_stamp), where
# they were: pdl1_import_results.groovy then imports each target's file of target_objects/ under its annotation or core.
TARGETS_EXPORT = "targets_export"


def target_stand_in(target: Any, result: SlideResult) -> QuPathObject:
    """What stands for an exported target (an annotation or TMA core) at the head of its results for the import: its
    ID, outline and name as exported (the import checks the object of that ID still has that outline), and the
    measurements the analysis puts on it. No class: the import keeps the object's own (a lab's class, whose colour
    the export may not hold, would not read back)."""
    return QuPathObject(
        geometry=target.roi,
        object_type="annotation",
        measurements=parent_measurements(result),
        name=target.name,
        id=target.object_id,
    )


def write_result_files(
    result: SlideResult,
    geojson: Path,
    summary_path: Path,
    summary: dict[str, Any],
    *,
    include_tiles: bool = True,
    targets: Sequence[tuple[str, SlideResult]] = (),
    target_objects: Sequence[tuple[QuPathObject, SlideResult]] = (),
) -> None:
    """The QuPath GeoJSON (parent + children) and the summary JSON, each written atomically.

    ``target_objects``: targets read from an export (each one's stand-in, :func:`target_stand_in`, and its result),
    each written to ``target_objects/<ID>.geojson`` beside the GeoJSON (its stand-in, then its objects), which
    ``pdl1_import_results.groovy`` puts under the annotation or core of that ID; such files of an earlier run that
    this one does not write are removed after the summary.

    ``result`` is the first (or only) target's: the GeoJSON holds its results, as ``pdl1_import_results.groovy``
    imports them. Where several targets were analysed (``targets``: each one's name and result), every one's
    regions, SUA candidates, tiles and nuclei go to :data:`TARGET_REGIONS_FILE` beside it (for ``pdl1 review-queue``,
    the report and ``pdl1 train --from-review``), before the summary; with one target an earlier run's such file is
    removed after the summary. A project entry's summary (``entry_id`` set) lists under ``provenance`` the records of
    ``pdl1_analyze.groovy`` in the entry's folder as it is written (``after_analyses``:
    :func:`bridge.analysis_record.records_found`): those are older than this output whatever the clocks say.

    A file that cannot be written is a :class:`ProjectError` naming it and the fix: a full drive failed each image
    left with "OSError: [Errno 28] No space left on device", naming no file, drive or way on.
    """
    path = geojson
    regions = target_regions_path(geojson)
    try:
        # Replaced together, the summary last (it says which run the others are of): a re-run stopped part-way
        # replaced the GeoJSON and left the earlier summary beside it, and the report showed the earlier numbers
        # over the new objects. Now the earlier files stay until every new one is written.
        with replaced_together(summary_path) as open_new:
            write_features_to(open_new(geojson), result_features(result, include_tiles=include_tiles))
            for stand_in, target_result in target_objects:
                path = target_objects_path(geojson.parent, str(stand_in.id))
                features = result_features(target_result, include_tiles=include_tiles, parent=stand_in)
                write_features_to(open_new(path), features)
            if len(targets) > 1:
                path = regions
                record = target_regions_record(
                    run_id=summary.get("run_id"),
                    targets=[(name, region_children(r, include_tiles=include_tiles)) for name, r in targets],
                    nuclei=[written_nuclei(r) for _, r in targets],
                )
                json.dump(record, open_new(regions), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            path = summary_path
            if summary.get("entry_id") is not None:  # as late as can be: each record listed was saved before it
                provenance = {**(summary.get("provenance") or {}), AFTER_ANALYSES: records_found(path.parent)}
                summary = {**summary, "provenance": provenance}
            json.dump(summary, open_new(summary_path), indent=2, allow_nan=False)
        if len(targets) < 2:
            path = regions
            regions.unlink(missing_ok=True)
        path = geojson.parent / TARGET_OBJECTS_FOLDER
        kept = {target_objects_path(geojson.parent, str(o.id)).name for o, _ in target_objects}
        # A project entry's own folder only (plain slides share --out, and have no exported targets).
        for old in path.glob("*.geojson") if summary.get("entry_id") is not None and path.is_dir() else ():
            if old.name not in kept:  # an earlier run's target, not analysed now: the import must not put it back
                old.unlink(missing_ok=True)
    except OSError as err:
        if isinstance(err, Pdl1Error):
            raise
        raise ProjectError(
            f"{path}: the results cannot be written ({err.strerror or err}); {unwritable_fix(err)}, then run again "
            "with --resume (it keeps the images already done)"
        ) from err


def _jobs(inputs: list[Path], config: RunConfig) -> tuple[list[_Job], Path | None, Path]:
    """Images to run, the project (if any) and the folder that keeps the run status.

    A slide or project named twice (a glob and one of its files, a symlink, a project's folder and its
    project.qpproj) is run once, as ``pdl1 init-project`` adds a slide named twice once.
    """
    inputs, repeats = distinct_inputs(inputs)
    for again, first in repeats.items():
        log.warning("%s", repeat_note(again, first, "analysed once"))
    if len(inputs) == 1 and (inputs[0].is_dir() or inputs[0].suffix == ".qpproj"):
        info = read_project(inputs[0], unreadable_entries="keep")
        if config.out is not None:  # it was ignored: the results went into the project, not where asked
            raise ProjectError(
                f"--out {config.out}: a project's results are written into the project ({info.folder / PDL1_DIR} and "
                "its images' data), so --out is for plain slides only; leave it out, or give the slide files "
                "themselves with --out (`pdl1 report PROJECT --out DIR` puts the report elsewhere)"
            )
        if not info.entries and not info.unreadable:
            # An error, as for `pdl1 report` and `pdl1 review-queue` with nothing to do: a run that analyses
            # nothing is most often the wrong project, and a script should not take it for a finished run.
            raise ProjectError(
                f"{info.path}: the project has no images, so there is nothing to analyse; add images in QuPath "
                "(File > Project > Add images), or give the project that holds them"
            )
        jobs = []
        search = ImageSearch(config.search_dirs)
        for entry in info.entries:
            try:
                if entry.not_analysable:
                    raise ProjectError(
                        f"{entry.image_name}: {entry.not_analysable}, so results would land in the wrong place; add "
                        "the file to the project as it is, or export the image from QuPath as OME-TIFF and add that"
                    )
                found = find_image(entry, project_folder=info.folder, saved_folder=info.saved_folder, search=search)
                # What QuPath's Check project URIs does, done by a run through QuPath (it saves an entry's objects
                # only while its image is at its URI): where the user named folders to look in, or where the image
                # lies as it did relative to the project (the two moved together). A file found beside the project
                # by its name alone is not taken for the entry's without --search-dir saying where to look.
                away = str(found.path) != str(entry.path)
                repoint = away and (bool(config.search_dirs) or found.how == WITH_PROJECT)
                jobs.append(_Job(entry.entry_id, entry.image_name, found.path, entry, repoint=repoint))
            except Pdl1Error as err:
                jobs.append(_Job(entry.entry_id, entry.image_name, None, entry, err))
        twice = claimed_twice([(j.entry, j.image) for j in jobs if j.image is not None])
        jobs = [
            _Job(j.key, j.name, None, j.entry, ImageMovedError(twice[j.key])) if j.key in twice else j for j in jobs
        ]
        for broken in info.unreadable:  # each fails alone, in its place in the project's order
            key = broken.entry_id if broken.entry_id is not None else f"#{broken.index + 1}"
            jobs.insert(broken.index, _Job(key, broken.image_name, None, None, broken.error))
        elsewhere = [j for j in jobs if j.image is not None and j.entry and str(j.image) != str(j.entry.path)]
        if elsewhere:
            log.warning(
                "%d of %d images are not where the project says and were found elsewhere (first: %s at %s; each "
                "summary.json names the file analysed); QuPath's File > Project... > Check project URIs fixes "
                "the project (a run through QuPath does it for each entry it writes, where it was given "
                "--search-dir or the image moved with the project)",
                len(elsewhere),
                len(jobs),
                elsewhere[0].name,
                elsewhere[0].image,
            )
        return jobs, info.path, info.folder
    projects = [p for p in inputs if p.suffix == ".qpproj" or p.is_dir()]
    if len(projects) > 1:
        raise ProjectError(
            f"{len(projects)} projects given ({', '.join(map(str, projects))}); give one project per run: run "
            "`pdl1 run PROJECT` once for each"
        )
    if projects:
        raise ProjectError(f"{projects[0]}: give one project, or slide files, not both")
    if config.out is None:
        missing = [p for p in inputs if not p.exists()]
        if missing:  # a mistyped project path reads as a slide: say what is wrong with it
            raise ProjectError(
                f"{', '.join(map(str, missing))}: no such file or folder; check the path (a QuPath project folder "
                "or its project.qpproj, or slide files with --out DIR)"
            )
        raise ProjectError("plain slides need --out DIR for their GeoJSON and summaries")
    problem = not_a_folder(config.out)
    if problem is not None:
        raise ProjectError(
            f"--out {config.out} {problem}; expected a folder for the GeoJSON and summaries (a new one, or an "
            "earlier run's): give a folder path"
        )
    _refuse_shared_stems(inputs, config.out)
    _refuse_replacing_others(inputs, config.out)
    # Absolute: summaries and pairs.json name them, and are read from other folders (pdl1 report, a --resume).
    return [_Job(p.stem, p.name, p.absolute(), None, _name_too_long(p, config.out)) for p in inputs], None, config.out


# What a plain slide's longest output name adds to its stem: its registered IHC area when it is a case's H&E,
# OUT/pdl1/pairs/<stem>.ihc_positive.geojson, written as <name>.<12 hex>.part first (bridge.atomic).
_LONGEST_OUTPUT_SUFFIX = ".ihc_positive.geojson.0123456789ab.part"


def _name_too_long(slide: Path, out: Path) -> ProjectError | None:
    """Why a plain slide's results cannot be written under its name (None where they can): a stem the file system
    takes as a slide's name can be too long with the results' suffixes. The image failed after its whole analysis,
    told to free some space; now it fails before, told to rename it."""
    try:
        limit = os.pathconf(out if out.is_dir() else out.parent if out.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # Windows has no pathconf; NTFS allows 255 characters too
        limit = 255
    # NTFS counts UTF-16 units, the others bytes (a CJK name is three bytes a character, one unit).
    units, unit = (lambda name: len(name.encode("utf-16-le")) // 2, "characters") if os.name == "nt" else (
        lambda name: len(os.fsencode(name)), "bytes")  # fmt: skip
    longest = units(slide.stem + _LONGEST_OUTPUT_SUFFIX)
    if longest <= limit:
        return None
    return ProjectError(
        f"{slide.name}: the file name is too long for its results' names ({longest} {unit} with "
        f"{_LONGEST_OUTPUT_SUFFIX!r}; the file system allows {limit}): rename the slide to a shorter name (at most "
        f"{limit - len(_LONGEST_OUTPUT_SUFFIX)} {unit} before its extension) and run it again"
    )


def _refuse_shared_stems(slides: list[Path], out: Path) -> None:
    """Plain slides' outputs are named after their stems (``OUT/<stem>.geojson``): two with one stem would
    overwrite each other's."""
    for same in sharing_a_stem(slides):  # a slide named twice is one by now (distinct_inputs)
        stem = same[0].stem
        raise ProjectError(
            f"{', '.join(map(str, same))} share the file name {stem!r}, so their outputs ({out / stem}.geojson and "
            f".summary.json) would overwrite each other; rename one, or run them into different --out folders"
        )


def _refuse_replacing_others(slides: list[Path], out: Path) -> None:
    """A ``OUT/<stem>.geojson`` no pdl1 run wrote (a user's export beside the slide, ``--labels slide.geojson`` as
    the README trains from) was replaced by the run's results in silence. One of pdl1's has its summary beside it,
    or begins with its ``PD-L1 analysis`` parent (a summary lost to a kill)."""
    for slide in slides:
        geojson, summary = output_paths(slide.stem, None, out)
        if not geojson.is_file() or summary.is_file():
            continue
        try:
            with geojson.open("rb") as fh:
                head = fh.read(2048)
        except OSError:  # cannot tell: writing the results there says why, if it cannot
            continue
        if f'"name":"{PDL1_ANALYSIS.name}"'.encode() not in head:
            raise ProjectError(
                f"{geojson} is there and no pdl1 run wrote it (no {summary.name} beside it), and {slide}'s "
                "results would replace it; move that file, or give another --out folder"
            )


def _use_qupath(config: RunConfig, project: Path | None) -> bool:
    """Whether the run goes through QuPath (paquo). Without it a project's targets (annotations of the target classes
    or names, TMA cores) are read from each entry's export by ``pdl1_export_labels.groovy``
    (:func:`exported_targets_of`), and its results go to GeoJSON sidecars for ``pdl1_import_results.groovy``."""
    if project is None:
        if config.target_classes or config.target_names:
            raise ProjectError(
                "annotation targets (--class/--name, or target_classes/target_names in pdl1-config.toml) need a QuPath "
                "project; for whole images leave them out (or run with --no-config)"
            )
        return False
    if config.qupath == "never":
        return False
    from bridge.qupath import qupath_available

    ok, why = qupath_available()
    if config.qupath == "always" and not ok:
        raise ProjectError(why)
    if not ok:
        log.warning(
            "QuPath not found: writing GeoJSON sidecars under %s/ for qupath_scripts/pdl1_import_results.groovy; "
            "each image's annotation targets and TMA cores are read from its export by %s (%s/labels/<entry ID>"
            ".geojson), and an image without one is analysed whole",
            PDL1_DIR,
            exported_targets.EXPORT_SCRIPT,
            PDL1_DIR,
        )
    return ok


def run_batch(
    inputs: list[Path],
    config: RunConfig,
    *,
    on_image: Callable[[int, int, str], None] | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
    models: Models | None = None,
) -> list[ImageOutcome]:
    """Analyse every image; never stops at a failed one. Returns one outcome per image.

    ``on_image(i, n, name)`` is called before each image analysed (the ``i``-th of ``n``, counted from 0), not for
    one ``config.resume`` skips: a run that skips them all calls it never, and a progress bar drawn from it stays
    undrawn rather than empty. ``on_tiles(done, total)`` reports the tiles of the image being analysed.
    """
    jobs, project, status_folder = _jobs(inputs, config)
    use_qupath = _use_qupath(config, project)
    with run_lock(status_folder):
        remove_orphan_parts(status_folder, plain_slides=project is None)
        status = status_for_run(status_folder, resume=config.resume, settings=analysis_settings(config))
        qp_session = _QuPathSession(project) if use_qupath else None
        try:
            outcomes = _run_jobs(
                jobs, config, models or run_models(config), project, status, qp_session, on_image, on_tiles
            )
        finally:
            if qp_session is not None:
                qp_session.close()
        write_targets(jobs, outcomes, project, status.folder)
        if config.compare_pairs:
            _compare_pairs(jobs, outcomes, project, status.folder, config)
        return outcomes


def write_targets(jobs: list[_Job], outcomes: list[ImageOutcome], project: Path | None, folder: Path) -> Path:
    """Write ``pdl1/targets.csv`` beside the run status: a row per analysed target of every image this run analysed
    or ``--resume`` kept (each TMA core, annotation or whole image; the cores marked missing too), read from their
    summaries. A failed image has no rows (what QuPath holds of it is an earlier run's, or nothing)."""
    rows: list[TargetRow] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.state not in ("done", "skipped"):
            continue
        _, summary_path = output_paths(job.key, project, folder)
        try:
            found = rows_from_summary(json.loads(summary_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:  # changed since the run wrote or checked it
            log.warning("%s: not in %s: its summary %s does not read (%s)", job.name, TARGETS_FILE, summary_path, err)
            continue
        if not found:  # written before summaries listed their targets, and kept by --resume
            log.warning(
                "%s: not in %s: its summary %s lists no targets (an earlier version wrote it); %s to have its rows",
                job.name,
                TARGETS_FILE,
                summary_path,
                RUN_IMAGE_AGAIN,
            )
        rows.extend(found)
    path = write_target_table(folder / PDL1_DIR / TARGETS_FILE, rows)
    log.info("per-target results: %s", path)
    return path


def _compare_pairs(
    jobs: list[_Job], outcomes: list[ImageOutcome], project: Path | None, folder: Path, config: RunConfig
) -> None:
    """Pair the run's analysed images by case and compare each H&E with its PD-L1 IHC (bridge.pairs)."""
    from bridge.pairs import CaseImage, FailedImage, case_in_metadata, case_of, stain_doubt, write_pair_comparisons

    key = config.case_key
    _warn_of_case_key_spelt_otherwise(jobs, key)
    images, failed = [], []
    for job, outcome in zip(jobs, outcomes, strict=True):
        geojson, summary_path = output_paths(job.key, project, folder)
        metadata = None if job.entry is None else job.entry.metadata
        if outcome.state == "failed":  # its case is incomplete: said in pairs.json, not compared without it
            failed.append(FailedImage(job.name, case_of(job.name, metadata, key=key)))
            continue
        if outcome.state not in ("done", "skipped") or not summary_path.is_file() or not geojson.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        images.append(
            CaseImage(
                key=job.key,
                name=job.name,
                image=job.image if job.image is not None else Path(summary["image"]),  # where this run found it
                case=case_of(job.name, metadata, key=key),
                stain=summary.get("stain", "H&E"),
                summary_path=summary_path,
                geojson_path=geojson,
                mpp=summary["mpp"],
                case_in_metadata=case_in_metadata(metadata, key=key) is not None,  # stated by a person: unpaired, said
                stain_doubt=stain_doubt(job.name, summary),
            )
        )
    path = write_pair_comparisons(
        images, folder, failed=failed, openslide_only=config.pipeline.openslide_only, case_key=key
    )
    if path is not None:
        log.info("pair comparisons: %s", path)


def _warn_of_case_key_spelt_otherwise(jobs: list[_Job], key: str) -> None:
    """Warn where entries lack the metadata ``key`` but have one that differs from it only in capitals or blanks
    (``Case`` for ``case``): QuPath's metadata keys are exact, so those cases were not read, and entries a person
    paired fell back on their file names. Where no entry has ``key``, the fix may be the key given; where some do,
    it is the others' spelling."""
    entries = [job.entry for job in jobs if job.entry is not None]
    wanted = key.strip().casefold()
    near: Counter[str] = Counter()  # a spelling other than the key's, by the entries lacking the key that have it
    for entry in entries:
        metadata = entry.metadata or {}
        if key not in metadata:
            near.update({k for k in metadata if k.strip().casefold() == wanted and k != key})
    if not near:
        return
    spelt = " and ".join(f"{n} {'has' if n == 1 else 'have'} {k!r}" for k, n in sorted(near.items()))
    if not any(key in (entry.metadata or {}) for entry in entries):
        log.warning(
            "no entry has the metadata key %r, which names each image's case for pairing; %s: give that key instead "
            "(--case-key or pdl1-config.toml's [pairs] case_key), or rename it in QuPath (Project > Edit metadata)",
            key,
            spelt,
        )
        return
    log.warning(
        "some entries name their case under another spelling of the metadata key %r (%s), so their cases are read "
        "from file names; rename that key to %r in QuPath (Project > Edit metadata)",
        key,
        spelt,
        key,
    )


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run (a KeyboardInterrupt, so what stops on one stops on it): ``outcomes``, the images finished
    or skipped before it (their files written and recorded), and ``stopped``, the image in progress (None between
    images, or with several in progress on Ray), whose files are left as they were; ``total``, the images of the run.
    ``pdl1 run`` shows their table."""

    def __init__(self, outcomes: Sequence[ImageOutcome], stopped: str | None, total: int) -> None:
        super().__init__()
        self.outcomes = tuple(outcomes)
        self.stopped = stopped
        self.total = total


def _run_jobs(jobs, config, models, project, status, qp_session, on_image, on_tiles) -> list[ImageOutcome]:
    outcomes: list[ImageOutcome] = []
    current: str | None = None
    try:
        for i, job in enumerate(jobs):
            current = job.name
            outcome = _run_job(i, len(jobs), job, config, models, project, status, qp_session, on_image, on_tiles)
            outcomes.append(outcome)
            current = None
    except KeyboardInterrupt:
        raise RunInterrupted(outcomes, current, len(jobs)) from None
    return outcomes


def _run_job(i, total, job, config, models, project, status, qp_session, on_image, on_tiles) -> ImageOutcome:
    """The ``i``-th image of :func:`_run_jobs`' ``total``: skipped by ``--resume``, analysed, or failed."""
    if config.resume and resume_skips(
        job, status, project, written_by_qupath=qp_session is not None, stain_given=config.stain, config=config
    ):
        return skipped_outcome(job, project, status.folder)
    if on_image is not None:  # after the skip: a run with nothing left to do draws no empty bar
        on_image(i, total, job.name)
    t0 = time.perf_counter()
    try:
        if job.error is not None:
            raise job.error
        status.replacing(job.key, image=job.name)
        outcome = _run_one(job, config, models, project, status.folder, qp_session, on_tiles, t0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one image's failure must not stop the batch; it is recorded and reported
        log.debug("image %s failed:\n%s", job.name, traceback.format_exc())
        message = failure_message(err)
        outcome = ImageOutcome(job.key, job.name, "failed", time.perf_counter() - t0, error=message)
        status.record(job.key, state="failed", error=message, image=job.name)
    else:
        status.record(
            job.key, state="done", image=job.name, run_id=outcome.run_id, seconds=outcome.seconds, **written(outcome)
        )
    return outcome


def written(outcome: ImageOutcome) -> dict[str, int]:
    """What status.json keeps of an image's GeoJSON as the run wrote it, its size, so that ``--resume`` knows it
    whole without parsing it again (seconds and hundreds of MB for a slide's nuclei, before anything new was
    analysed); nothing where it cannot be seen from here."""
    size = _file_bytes(outcome.outputs[0]) if outcome.outputs else None
    return {} if size is None else {"geojson_bytes": size}


def failure_message(err: BaseException) -> str:
    """What a user reads about a failed image: our errors say what and how to fix it in their message;
    a foreign error needs its class to mean anything (``KeyError: 'x'``).

    >>> failure_message(Pdl1Error("slide.svs: not found"))
    'slide.svs: not found'
    >>> failure_message(KeyError("x"))
    "KeyError: 'x'"
    """
    return str(err) if isinstance(err, Pdl1Error) else f"{type(err).__name__}: {err}"


def _run_one(job, config, models, project, status_folder, qp_session, on_tiles, t0) -> ImageOutcome:
    if qp_session is not None:
        results, rows = qp_session.analyse_and_write(job, config, models, on_tiles)
        repointed = qp_session.repointed.get(job.key)
        return write_image_files(job, config, project, status_folder, results, rows, t0, repointed=repointed)
    found = None if project is None else exported_targets_of(job, config, project.parent)
    if found is None:
        results = [job.analyse(models, config, on_tiles)]
        rows = [whole_image_row(job, results[0], job.key if project is not None else None)]
        return write_image_files(job, config, project, status_folder, results, rows, t0)
    results = []
    for target in found.choice.targets:
        log.info("%s: analysing %s %s", job.name, target.target_type, target.label)
        results.append(job.analyse(models, config, on_tiles, roi=target.obj.roi))
    return write_exported(job, config, project, status_folder, found, results, t0)


def write_exported(
    job: _Job,
    config: RunConfig,
    project: Path,
    status_folder: Path,
    found: ExportedTargets,
    results: list[SlideResult],
    t0: float,
) -> ImageOutcome:
    """Write the results of targets read from an export (``results``: one per target of ``found``, in their order):
    the rows of ``targets.csv`` in the grid's order (the TMA cores marked missing among them), each analysed one with
    its object's ID, and each target's objects in a file of their own for the import (:func:`write_image_files`)."""
    # Every row with its object's ID, the missing cores' too: pdl1_import_results.groovy tells by it that the targets
    # came from an export (it would take a row without one for a target written into the image through QuPath).
    rows = target_rows(job, found.choice, results, with_ids=True)
    analysed = list(zip(found.choice.targets, results, strict=True))
    return write_image_files(job, config, project, status_folder, results, rows, t0, exported=(found.entry, analysed))


def target_rows(
    job: _Job, choice: TargetChoice[Target], results: list[SlideResult], *, with_ids: bool = False
) -> list[TargetRow]:
    """The ``targets.csv`` rows of an entry's targets (``results``: one per target of ``choice``, in their order) in
    the grid's order, the TMA cores marked missing in their places; each with its outline, so the report can draw
    and name it on the thumbnail (the GeoJSON keeps none), and with ``with_ids`` its object's ID (read from an
    export)."""

    def placed(target: Target, row: TargetRow) -> tuple[int, TargetRow]:
        return target.position, replace(row, object_id=target.obj.object_id) if with_ids else row

    rows = [placed(t, missing_row(job.name, job.key, t.label, outline=t.obj.roi)) for t in choice.missing]
    for t, result in zip(choice.targets, results, strict=True):
        rows.append(placed(t, analysed_row(job.name, job.key, t.label, t.target_type, result, outline=t.obj.roi)))
    return [row for _, row in sorted(rows, key=lambda p: p[0])]


@dataclass(frozen=True)
class ExportedTargets:
    """An entry's export and the targets chosen from it (:func:`entry_targets`, the rule QuPath's are chosen by)."""

    entry: ExportedEntry
    choice: TargetChoice[Target]

    @property
    def rois(self) -> list[BaseGeometry]:
        """Each target's outline, in their order (none: the whole image)."""
        return [t.obj.roi for t in self.choice.targets]


def exported_targets_of(job: _Job, config: RunConfig, project_folder: Path) -> ExportedTargets | None:
    """The targets of a project entry where QuPath is not here: read from its export by ``pdl1_export_labels.groovy``
    (its annotations of the target classes or names, else its TMA cores, by :func:`entry_targets`' rule). None where
    the whole image is analysed: the entry has no export and no targets were asked for (as before there were
    exports), or its export holds neither asked-for annotations nor a grid; asked-for targets without an export fail
    the image, naming the script that writes it."""
    found = read_exported_entry(project_folder, job.key, job.name)
    if found is None:
        if config.target_classes or config.target_names:
            raise ProjectError(
                f"{job.name}: its annotations of class {list(config.target_classes)} or name "
                f"{list(config.target_names)} are in QuPath's data, which only QuPath reads, and this run does not go "
                "through QuPath (none here, or --qupath never); "
                f"they are read from the export of its objects, {exported_targets.export_path(project_folder, job.key)}"
                f", which is not there: {export_again(job.name)}"
            )
        return None
    choice = entry_targets(job.name, found, config, exported_targets)
    return ExportedTargets(found, choice) if choice.targets else None


# A summary's provenance key for the entry's URI as the run changed it ({"from": URI, "to": URI}): the image was found
# elsewhere and the entry pointed at it (bridge.qupath.point_entry_at); absent where the run changed none.
ENTRY_URI_CHANGED = "entry_uri_changed"


def write_image_files(
    job: _Job,
    config: RunConfig,
    project: Path | None,
    status_folder: Path,
    results: list[SlideResult],
    rows: list[TargetRow],
    t0: float,
    *,
    exported: tuple[ExportedEntry, list[tuple[Target, SlideResult]]] | None = None,
    repointed: Any = None,
) -> ImageOutcome:
    """Write an analysed image's GeoJSON and summary (``results``: each analysed target's, in the order of ``rows``'
    analysed ones); its outcome, timed from ``t0`` (``time.perf_counter()``). ``exported``: the export the targets
    were read from and each target with its result, whose objects go to a file of their own for the import
    (:func:`write_result_files`' ``target_objects``), the export recorded in the summary's provenance.
    ``repointed``: the entry's URI as this run changed it (:class:`bridge.qupath.UriChange`), recorded in the
    summary's provenance as :data:`ENTRY_URI_CHANGED`."""
    entry_id = job.key if project is not None else None
    result = results[0]
    geojson, summary = output_paths(job.key, project, status_folder)
    summary_data = with_targets(summary_of(result, entry_id=entry_id, run_config=config), results, rows)
    if repointed is not None:
        summary_data["provenance"][ENTRY_URI_CHANGED] = {"from": repointed.before, "to": repointed.after}
    target_objects: list[tuple[QuPathObject, SlideResult]] = []
    if exported is not None:
        entry, analysed = exported
        summary_data["provenance"][TARGETS_EXPORT] = export_stamp(entry, project.parent)
        target_objects = [(target_stand_in(t.obj, r), r) for t, r in analysed]
    write_result_files(
        result,
        geojson,
        summary,
        summary_data,
        include_tiles=config.include_tiles,
        targets=[(label, r) for (_, label), r in zip(analysed_targets(rows), results, strict=True)],
        target_objects=target_objects,
    )
    return outcome_from_summary(job.key, job.name, summary_data, time.perf_counter() - t0, (geojson, summary))


# What makes a run no faster or slower but changes nothing it writes (beyond rounding): left out of the settings
# --resume compares, so a resume on another machine, device or batch size goes on where the run stopped.
_SPEED_ONLY = {
    "pipeline": ("device", "openslide_only", "openvino_cache_dir"),
    "segment": (
        "batch_size", "read_workers", "read_block_tiles", "reduce_on_device", "read_on_device", "decode_backend",
        "precision", "max_in_memory_mb", "max_device_mb", "scratch_dir", "compile", "accumulate_on", "runtime",
    ),
    "nuclei": ("batch_size", "read_workers", "read_block_tiles", "precision", "runtime"),
}  # fmt: skip


def analysis_settings(config: RunConfig) -> dict[str, Any]:
    """What decides a run's results, flat (``segment.overlap_fraction``, ``target_classes``, ...): recorded with
    each image done (:class:`RunStatus`), so that ``--resume`` analyses again an image done with other settings.

    >>> a = analysis_settings(RunConfig(pipeline=PipelineConfig(device="cpu")))
    >>> a == analysis_settings(RunConfig(pipeline=PipelineConfig(device="cuda")))  # speed only
    True
    >>> a == analysis_settings(RunConfig(pipeline=PipelineConfig(run_nuclei=False)))
    False
    """
    pipeline = asdict(config.pipeline)
    flat = {}
    for key, value in pipeline.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items() if k not in _SPEED_ONLY[key]}
        elif key not in _SPEED_ONLY["pipeline"]:
            flat[key] = value
    flat |= {
        "target_classes": list(config.target_classes),
        "target_names": list(config.target_names),
        "stain": config.stain,
        "include_tiles": config.include_tiles,
    }
    return json.loads(json.dumps(flat, default=str))  # as status.json holds it: lists, strings


def resume_skips(
    job: _Job,
    status: RunStatus,
    project: Path | None,
    *,
    written_by_qupath: bool,
    stain_given: str | None = None,
    config: RunConfig | None = None,
) -> bool:
    """Whether ``--resume`` may skip this image: recorded done, and what the run wrote is there and reads (its
    GeoJSON known whole by the size the run recorded, else parsed).

    ``status.json`` says an image was done; a kill or a full disk afterwards can still have damaged what
    it wrote, so that is checked here, and an image whose results are not whole is analysed again with a
    warning that says why. ``config`` (the run's): an image analysed whole whose objects were exported since with
    targets for it (asked-for annotations, a TMA grid) is analysed again.
    """
    if not status.is_done(job.key):
        return False
    differ = status.other_settings(job.key)
    if differ is not None:  # it was skipped, its results of other models or sizes kept under this run's
        said = ", ".join(differ)
        # Once a run for each set of settings: a batch of 320 done with other settings said it 320 times.
        first = said not in status.said
        status.said.add(said)
        log.log(
            logging.WARNING if first else logging.INFO,
            "%s: done by an earlier run with other settings (%s); analysing it again with this run's"
            + (", as every image done with them (said once)" if first else ""),
            job.name,
            said,
        )
        return False
    why = _results_problem(
        job, status, project, written_by_qupath=written_by_qupath, stain_given=stain_given, config=config
    )
    if why is None:
        return True
    log.warning("%s: recorded as done by an earlier run, but %s; analysing it again", job.name, why)
    return False


def _not_as_stated(job: _Job, summary: dict[str, Any], *, stain_given: str | None) -> str | None:
    """Why results were made under another stain or pixel size than the project now states for the image (an image
    type or calibration corrected in QuPath after the run); None where they agree, or where the project states none
    (QuPath's UNSET: the colour told the stain, and tells it alike). ``stain_given``: the run's --stain, which the
    image type then does not decide (the run's settings record it)."""
    if job.entry is None:
        return None
    stain = job.entry.stain
    if stain_given is None and stain is not None and summary.get("stain") != stain:
        return (
            f"its project now states the image type {job.entry.image_type} ({stain}), and its results are of "
            f"{summary.get('stain')}"
        )
    mpp, then = job.entry.mpp, summary.get("mpp")
    if mpp is not None and is_finite_number(then) and not math.isclose(mpp, then, rel_tol=1e-6):
        return f"its project now states {mpp:g} µm/px, and its results were made at {then:g} µm/px"
    return None


def _of_another_image(job: _Job, summary: dict[str, Any]) -> str | None:
    """Why the results ``summary`` describes are of another image than the one this run analyses as ``job``: an entry
    pointed at another file in QuPath since (its name, file size or pixel size), or a slide of the same name from
    another folder into the same --out (its file size). A slide moved, copied or reached by another path (another
    drive letter, a share mounted elsewhere) keeps its name and file size, and stays done."""
    then = Path(summary["image"])
    if job.image is None:
        return None
    if then.name != job.image.name:
        return f"its results are of {then}, not of {job.image}"
    recorded = summary.get(IMAGE_FILE_BYTES)  # a slide's file keeps its size when moved, copied or reached elsewhere
    now_bytes = _file_bytes(job.image)  # None: not there to compare (its analysis says why)
    if is_finite_number(recorded) and now_bytes is not None and now_bytes != recorded:
        return f"its results are of {then} ({recorded} bytes), not of {job.image} ({now_bytes} bytes)"
    size, now = summary.get("image_size_px"), job.size_px
    if now is not None and isinstance(size, list) and tuple(size) != tuple(now):
        return f"its results are of an image of {size[0]} x {size[1]} px, the project's is {now[0]} x {now[1]} px"
    return None


# Blocks of a GeoJSON checked for NUL bytes between its ends, evenly spaced: a zeroed hole of a sixteenth of the
# file or more falls on one. JSON text holds no NUL byte (json.dumps escapes it), so one means damage.
_SAMPLED_BLOCKS = 15
_SAMPLED_BLOCK_BYTES = 4096


def _ends_whole(path: Path) -> bool:
    """Whether a GeoJSON begins and ends as a FeatureCollection does, without NUL bytes there or in blocks sampled
    between: a copy that sets the file's full size first (Windows' CopyFile, rsync --preallocate) and stops leaves
    its end zeroed (helper-137); one that copies parts in parallel (rclone's multi-thread streams, robocopy /MT on one
    large file) leaves zeroed holes anywhere. Reads about 60 kB whatever the file's size: --resume stays quick."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
            size = fh.seek(0, 2)
            fh.seek(max(0, size - 64))
            tail = fh.read()
            middle = []
            for k in range(1, _SAMPLED_BLOCKS + 1):
                fh.seek(size * k // (_SAMPLED_BLOCKS + 1))
                middle.append(fh.read(_SAMPLED_BLOCK_BYTES))
    except OSError:
        return False
    if any(b"\0" in block for block in (head, tail, *middle)):
        return False
    return head.lstrip().startswith(b"{") and re.search(rb"\]\s*\}\s*$", tail) is not None


def skipped_outcome(job: _Job, project: Path | None, status_folder: Path) -> ImageOutcome:
    """The outcome of an image ``--resume`` skipped: state ``skipped``, with the results the earlier run recorded
    in its summary (which :func:`resume_skips` has just read whole), so the closing table shows them rather than a
    blank row. ``seconds`` is 0: this run spent none on it."""
    geojson, summary_path = output_paths(job.key, project, status_folder)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # changed since resume_skips read it: a blank row, the warning says why
        log.warning("%s: skipped as done earlier, but its summary %s no longer reads (%s)", job.name, summary_path, err)
        return ImageOutcome(job.key, job.name, "skipped", outputs=(str(geojson), str(summary_path)))
    done = outcome_from_summary(job.key, job.name, summary, 0.0, (geojson, summary_path))
    return replace(done, state="skipped")


def _results_problem(
    job: _Job,
    status: RunStatus,
    project: Path | None,
    *,
    written_by_qupath: bool,
    stain_given: str | None = None,
    config: RunConfig | None = None,
) -> str | None:
    geojson, summary = output_paths(job.key, project, status.folder)
    recorded = status.images[job.key].get("geojson_bytes")
    for path in (geojson, summary):
        if path == geojson and isinstance(recorded, int) and _file_bytes(path) == recorded and _ends_whole(path):
            continue  # as the run wrote it: not parsed again (a copy cut short has another size or zeroed bytes)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{path} is missing"
        except (OSError, ValueError) as err:  # cut short, empty or unreadable
            return f"{path} does not read ({err})"
        if path == geojson and not (isinstance(data, dict) and data.get("features")):
            return f"{path} holds no features"
        if path == summary:
            problem = summary_problem(data)
            if problem is not None:
                return f"{path} {problem}"
            other = _of_another_image(job, data) or _not_as_stated(job, data, stain_given=stain_given)
            if other is not None:
                return other
    # Every target's output of an image of several: the report, review-queue and --from-review read it. Missing is a
    # run of an earlier version (its results stand); damaged or another run's is not whole.
    rows = data.get("targets")
    if isinstance(rows, list) and sum(isinstance(r, dict) and r.get("state") != MISSING for r in rows) > 1:
        regions = run_target_regions(target_regions_path(geojson), data)
        if regions.state in (UNREADABLE, OF_ANOTHER_RUN):
            return regions.why
    export = (data.get("provenance") or {}).get(TARGETS_EXPORT) if isinstance(data, dict) else None
    if export is None and project is not None and not written_by_qupath and config is not None:
        # Analysed whole, and its objects exported since: the export may name targets (asked-for annotations, cores).
        try:
            found = exported_targets_of(job, config, project.parent)
        except Pdl1Error as err:  # the run says so, with the fix
            return f"its export does not serve ({err})"
        if found is not None:
            return f"its objects were exported since, with {len(found.choice.targets)} targets to analyse"
    if export is not None and project is not None:
        if not stamp_matches(export, project.parent, job.key):
            return "the export its targets were read from has changed or gone since (exported again)"
        for row in rows if isinstance(rows, list) else ():
            object_id = row.get("object_id") if isinstance(row, dict) else None
            part = None if object_id is None else target_objects_path(geojson.parent, str(object_id))
            if part is not None and not (part.is_file() and _ends_whole(part)):
                return f"{part}, the results of its target {row.get('target')}, is missing or not whole"
    if written_by_qupath and project is not None:
        data_file = project.parent / "data" / job.key / "data.qpdata"
        problem = qpdata_problem(data_file)
        if problem is not None:
            return f"its QuPath data {data_file} is not whole: {problem}"
        saved_run = None if job.entry is None else job.entry.metadata.get("PD-L1 run")
        if saved_run != status.images[job.key].get("run_id"):
            return "project.qpproj was not saved after it (the run was stopped), so its PD-L1 metadata is missing"
    return None


def output_paths(key: str, project: Path | None, status_folder: Path) -> tuple[Path, Path]:
    """Where an image's GeoJSON and summary go: sidecars of a project entry, or ``OUT/<stem>.*``."""
    if project is not None:
        folder = sidecar_dir(status_folder, key)
        return folder / "objects.geojson", folder / "summary.json"
    return status_folder / f"{key}.geojson", status_folder / f"{key}.summary.json"


def outcome_from_summary(
    key: str, name: str, summary: dict[str, Any], seconds: float, outputs: tuple[Path, Path]
) -> ImageOutcome:
    return ImageOutcome(
        key=key,
        name=name,
        state="done",
        seconds=seconds,
        tps_percent=summary["tps_percent"],
        tps_category=summary["tps_category"],
        cps_percent=summary.get("cps"),
        positive_area_pct=summary["positive_area_pct"],
        uncertainty_flag=summary["uncertainty_flag"],
        candidates=summary["sua_candidates"],
        run_id=summary["run_id"],
        outputs=tuple(str(p) for p in outputs),
        stain=summary.get("stain"),
        stain_source=summary.get("stain_source"),
        review_reasons=closing_reasons(summary),
    )


def closing_reasons(summary: dict[str, Any]) -> tuple[str, ...]:
    """Why an image needs review, for the closing lines, each with its value and limit as the report shows it: the
    summary's (``details.review_reasons``); where several targets were analysed, each flagged target's own reasons
    led by its name (:func:`bridge.targets.targets_review_reasons`, as the report and ``pdl1 review-queue`` say
    them), also of a summary written when ``details`` held the first target's only (a TMA whose first core was fine
    said "needs review" and no reason)."""
    targets = [t for t in summary.get("targets") or [] if isinstance(t, dict)]
    labels = numbered([str(t.get("target")) for t in targets])
    analysed = [(t, label) for t, label in zip(targets, labels, strict=True) if t.get("state") != MISSING]
    if len(analysed) > 1:
        return tuple(
            f"{label}: {reason}"
            for t, label in analysed
            if t.get("needs_review")
            for reason in (t.get("review_reasons") or ["flagged"])
        )
    return tuple(review_reason_text(r) for r in (summary.get("details") or {}).get("review_reasons", []))


class _QuPathSession:
    """Writes into a project through paquo: only the driver process does this (one JVM, no threads)."""

    SAVE_PROJECT_EVERY = 25  # images between saves of project.qpproj (entries' data is saved per image)

    def __init__(self, project: Path):
        from bridge import qupath

        self.qp = qupath
        self._cm = qupath.open_project(project, mode="r+")
        self.project = self._cm.__enter__()
        self._unsaved = 0  # entries written since project.qpproj was last saved
        # Entry ID -> its URI as this run changed it (point_entry_at), for the entries written: each summary records it
        self.repointed: dict[str, Any] = {}
        qupath.ensure_classes(self.project)

    def _entry(self, entry_id: str):
        for entry in self.project.images:
            if str(entry.entry_id) == str(entry_id):
                return entry
        raise ProjectError(f"entry {entry_id} not in the project any more")

    def read_targets(self, job: _Job, config: RunConfig) -> EntryTargets:
        """The entry's targets (:func:`entry_targets`), read after its ``data.qpdata`` is backed up.

        An entry whose image the run found elsewhere (``job.repoint``) is first pointed at it
        (:func:`bridge.qupath.point_entry_at`), before QuPath reads its data: QuPath saves an entry's objects only while
        its image is at its URI. Put back where the image then fails, so a failed image leaves the project as it was.
        """
        entry = self._entry(job.key)
        moved = None
        try:
            if job.repoint and job.image is not None:
                moved = self.qp.point_entry_at(entry, job.image)
            # Before QuPath reads the hierarchy: it would read a damaged data.qpdata as an empty one.
            backup = self.qp.backup_data(entry)
            return EntryTargets(entry, backup, entry_targets(job.name, entry, config, self.qp), moved)
        except BaseException:
            if moved is not None:
                self.qp.put_back_uri(entry, moved)
            self.qp.let_go(entry)
            raise

    def let_go(self, found: EntryTargets) -> None:
        """Drop what QuPath read of an entry whose targets will not be written (its image failed):
        :func:`bridge.qupath.let_go`; and its URI as it was, where this run had pointed it elsewhere."""
        if found.moved is not None:
            self.qp.put_back_uri(found.entry, found.moved)
        self.qp.let_go(found.entry)

    def analyse_and_write(
        self, job: _Job, config: RunConfig, models: Models, on_tiles
    ) -> tuple[list[SlideResult], list[TargetRow]]:
        """Analyse the entry's targets and write each one's results under it (:meth:`write`)."""
        found = self.read_targets(job, config)
        analysed = []
        try:
            for target in found.choice.targets:
                if target.target_type == "TMA core":
                    log.info("%s: analysing TMA core %s", job.name, target.label)
                analysed.append(job.analyse(models, config, on_tiles, roi=target.obj.roi))
            if not analysed:
                analysed.append(job.analyse(models, config, on_tiles))
        except BaseException:
            self.let_go(found)
            raise
        return self.write(job, config, found, analysed)

    def write(
        self, job: _Job, config: RunConfig, found: EntryTargets, analysed: list[SlideResult]
    ) -> tuple[list[SlideResult], list[TargetRow]]:
        """Write each target's result under it (``analysed``: one per target of ``found``, in their order, or the whole
        image's alone where it has none; restoring the entry's backup if writing fails); the results, and the rows of
        ``targets.csv`` in the grid's order (the TMA cores marked missing among them)."""
        from bridge.objects import result_objects as children

        entry, targets = found.entry, found.choice.targets
        if targets:
            results: list[tuple[Any, SlideResult]] = [(t.obj, r) for t, r in zip(targets, analysed, strict=True)]
            rows = target_rows(job, found.choice, analysed)
        else:
            (whole,) = analysed
            results = [(None, whole)]
            rows = [*target_rows(job, found.choice, []), whole_image_row(job, whole, job.key)]
        metadata_before = dict(entry.metadata)
        try:
            if found.choice.source == TMA_CORES:
                # An earlier whole-image analysis kept its objects over the cores' (its results are its own).
                gone = self.qp.remove_whole_image_analysis(entry)
                if gone:
                    log.warning(
                        "%s: removed its earlier whole-image analysis ('%s' and what this tool put under it: %d "
                        "objects), which scored all TMA cores as one; each core's analysis replaces it",
                        job.name,
                        PDL1_ANALYSIS.name,
                        gone,
                    )
            for ann, result in results:
                parent = ann or self.qp.find_or_create_analysis_parent(
                    entry, box(0, 0, result.image_width_px, result.image_height_px)
                )
                self.qp.write_children(
                    entry, parent, children(result, include_tiles=config.include_tiles), parent_measurements(result)
                )
            cores = found.choice.source == TMA_CORES  # side by side, never within one another
            set_entry_metadata(entry.metadata, _merge_metadata([(None if cores else a, r) for a, r in results]))
            self.qp.save_entries([entry])
        except BaseException:
            # The metadata too: paquo sets it on QuPath's entry at once, and the next project save wrote the failed
            # image's TPS into project.qpproj beside its restored objects. So does its URI, where the run changed it.
            _put_back(entry.metadata, metadata_before)
            self.qp.restore_data(entry, found.backup)
            if found.moved is not None:
                self.qp.put_back_uri(entry, found.moved)
            raise
        finally:
            # Saved or put back: what QuPath read of it (all its objects, in the JVM) need not last the batch.
            self.qp.let_go(entry)
        if found.moved is not None:
            self.repointed[job.key] = found.moved
            log.warning(
                "%s (entry %s): pointed at its image where this run found it, %s (the project said %s), as QuPath's "
                "File > Project... > Check project URIs does; project.qpproj has it once the run saves it (every %d "
                "images and at its end)",
                job.name,
                job.key,
                found.moved.after,
                found.moved.before,
                self.SAVE_PROJECT_EVERY,
            )
        self._written()
        return [r for _, r in results], rows

    def _written(self) -> None:
        """An entry's data is saved; its metadata reaches project.qpproj every SAVE_PROJECT_EVERY images
        and at the end (``--resume`` runs again the images whose metadata a kill kept from it)."""
        self._unsaved += 1
        if self._unsaved >= self.SAVE_PROJECT_EVERY:
            self.save_project()

    def save_project(self) -> None:
        if self._unsaved:
            self.qp.save_project(self.project)
            self._unsaved = 0

    def close(self) -> None:
        try:
            self.save_project()  # also after Ctrl-C: the images finished before it keep their metadata
        finally:
            self._cm.__exit__(None, None, None)


@dataclass(frozen=True)
class EntryTargets:
    """What :meth:`_QuPathSession.read_targets` found of an entry: the paquo entry, the backup of its data to restore
    if writing fails (None where it had none), and its targets."""

    entry: Any
    backup: Path | None
    choice: TargetChoice[Target]
    moved: Any = None  # the entry's URI as pointed at its image here (bridge.qupath.UriChange), to put back on failure

    @property
    def rois(self) -> list[BaseGeometry]:
        """Each target's outline, in their order: what an analysis needs of them (none: the whole image)."""
        return [t.obj.roi for t in self.choice.targets]


@dataclass(frozen=True)
class Target:
    """One thing of an entry ``pdl1 run`` analyses: a paquo object (annotation or TMA core), as the log and
    ``targets.csv`` name it."""

    label: str  # a core's name ("A-1"), an annotation's name or class
    target_type: str  # "annotation" or "TMA core"
    obj: Any
    position: int = 0  # its place among the entry's annotations of the targets, or in the grid's list of cores


def entry_targets(image: str, entry: Any, config: RunConfig, qp: Any) -> TargetChoice[Target]:
    """What of a project entry ``pdl1 run`` analyses (``qp``: :mod:`bridge.qupath`, or a stand-in): the annotations
    of the target classes or names (those without an area named and left out), else the cores of its TMA grid that
    are not marked missing (each on its own: one TPS over all cores means nothing), else the whole image
    (``targets`` empty). ``pdl1_analyze.groovy`` chooses by the same rule, after the selected objects.

    Targets asked for that the entry lacks fail it, unless it has a TMA grid: its cores are what a TMA is scored by
    (the target classes of a project's pdl1-config.toml name the annotations of its other images). A grid whose
    every core is missing fails it too: the whole image would score them all as one.
    """
    asked = bool(config.target_classes or config.target_names)
    found = _with_area(image, qp.annotation_targets(entry, classes=config.target_classes, names=config.target_names))
    annotations = [Target(_annotation_label(a), "annotation", a, i) for i, a in enumerate(found)]
    grid = [] if annotations else qp.tma_cores(entry)
    cores = [Target(core_label(c.name, i), "TMA core", c, i) for i, c in enumerate(grid)]
    choice = choose_targets(annotations=annotations, cores=cores, is_missing=lambda t: qp.core_is_missing(t.obj))
    if choice.source == WHOLE_IMAGE and asked:
        raise ProjectError(f"{image}: no annotation of class {config.target_classes} or name {config.target_names}")
    if choice.source != TMA_CORES:
        return choice
    if asked:
        log.info(
            "%s: no annotation of class %s or name %s; its TMA cores are analysed instead",
            image,
            config.target_classes,
            config.target_names,
        )
    if choice.missing:
        names = ", ".join(t.label for t in choice.missing)
        log.warning("%s: skipped %d TMA cores marked missing: %s", image, len(choice.missing), names)
        kept = [t.label for t in choice.missing if qp.core_is_analysed(t.obj)]
        if kept:
            # Export TMA data writes a missing core's stored measurements on every version (its text comes from
            # getStringValue, which reads them: ObservableMeasurementTableData.java v0.4.4:1904-1919, v0.6.0:338-355
            # with MeasurementListValue.java v0.6.0:28-35); the table shows NaN for them since 0.6 (v0.6.0:270-285),
            # 0.4.4 and 0.5 show them there too (v0.4.4:486-496).
            log.warning(
                "%s: TMA cores marked missing keep an earlier run's results (objects and 'PD-L1: ' measurements, "
                "which QuPath's Export TMA data still writes): %s; delete them in QuPath, or mark the core not missing "
                "and run again",
                image,
                ", ".join(kept),
            )
    if not choice.targets:
        raise ProjectError(
            f"{image}: every one of its {len(cores)} TMA cores is marked missing, so nothing is analysed (the whole "
            "image would score all cores as one); in QuPath mark the cores that hold tissue as not missing, or "
            "delete the TMA grid to analyse the whole image"
        )
    return choice


def _annotation_label(annotation: Any) -> str:
    return annotation.name or (annotation.path_class.id if annotation.path_class is not None else "annotation")


def _is_area(roi: BaseGeometry) -> bool:
    """Whether an annotation's ROI is an area (QuPath's ``ROI.isArea()``): a polygon is, also one whose area sums to 0
    (a bow-tie's two halves, wound opposite ways, cancel), which the ROI check then names as invalid; before, it was
    said to be no area, to a user who had drawn a polygon."""
    return roi.area > 0 or (roi.geom_type in ("Polygon", "MultiPolygon") and not roi.is_empty)


def _with_area(image: str, targets: list[Any]) -> list[Any]:
    """The target annotations an analysis can use; those without an area (a Points annotation of a target class, a
    line) are named in the log and left out, as pdl1_analyze.groovy leaves them out: their ROI was refused, and
    that failed the image's other targets too. None with an area is a :class:`ProjectError`."""
    kept = [t for t in targets if _is_area(t.roi)]
    for t in targets:
        if not _is_area(t.roi):
            what = t.name or (t.path_class.id if t.path_class is not None else "an annotation")
            log.warning(
                "%s: skipped %s: a %s annotation has no area to analyse; draw an area annotation (rectangle, "
                "ellipse, polygon, brush) around the tissue",
                image,
                what,
                t.roi.geom_type,
            )
    if targets and not kept:
        raise ProjectError(
            f"{image}: nothing analysed: none of the {len(targets)} target annotations has an area; draw an area "
            "annotation (rectangle, ellipse, polygon, brush) around the tissue"
        )
    return kept


def metadata_counts(result: SlideResult) -> dict[str, int]:
    """The cell counts an image's entry metadata scores come from (empty without nuclei), so the scores of
    several analysed annotations can be merged: tumour cells positive and negative, and PD-L1 positive immune
    cells where there is a CPS."""
    if result.tps is None:
        return {}
    counts = {"tumour_positive": int(result.tps.positive), "tumour_negative": int(result.tps.negative)}
    if result.cps is not None:
        counts["immune_positive"] = int(result.cps.positive_immune)
    return counts


def merge_entry_metadata(
    parts: list[tuple[dict[str, str], dict[str, int]]], *, nested: Sequence[bool] | None = None
) -> dict[str, str]:
    """The entry metadata over every analysed annotation of an image, from each one's ``(entry_metadata,
    metadata_counts)`` in the order analysed: the last one's, with the TPS, its category and the CPS computed
    from the summed counts where every part has them (``pdl1_analyze.groovy`` does the same, a test keeps them
    equal). ``nested``: which parts lie within another (:func:`bridge.targets.nested_targets`), whose cells that one
    counts: left out of the sums.

    >>> he = {"PD-L1 Predicted TPS % (H&E)": "40.0", "PD-L1 Predicted TPS category (H&E)": "insufficient tumour cells"}
    >>> merged = merge_entry_metadata([(he, {"tumour_positive": 40, "tumour_negative": 60}),
    ...                                (he | {"PD-L1 Predicted TPS % (H&E)": "20.0"},
    ...                                 {"tumour_positive": 10, "tumour_negative": 40})])
    >>> merged["PD-L1 Predicted TPS % (H&E)"], merged["PD-L1 Predicted TPS category (H&E)"]
    ('33.3', '1-49%')
    """
    meta = dict(parts[-1][0])
    counted = [c for (_, c), inside in zip(parts, nested or [False] * len(parts), strict=True) if not inside]
    merged = summed_scores(counted) if len(parts) > 1 else None
    if merged is None:
        return meta
    tps, cps = merged
    # The measured TPS's keys, either of them (its number is left out without a tumour cell), tell an IHC.
    stain = "H-DAB" if any(key in meta for key in tps_metadata_keys("H-DAB")) else "H&E"
    for key in tps_metadata_keys(stain):  # the last part's: the summed cells may have a number where it had none
        meta.pop(key, None)
    meta |= _tps_metadata(tps, stain)
    if cps is not None:
        meta.pop("PD-L1 CPS", None)  # the last part's, as the TPS's
        meta.pop(CPS_CATEGORY_KEY, None)  # the last part's: the summed cells may be enough
        meta |= _cps_metadata(cps)
    return meta


def summed_scores(counts: list[dict[str, int]]) -> tuple[Any, Any] | None:
    """The TPS (and the CPS where every part has immune cells) from the summed :func:`metadata_counts` of several
    analysed targets; None where a part has none (no nuclei)."""
    from inference import combined_positive_score, tumour_proportion_score

    if not all(counts):
        return None
    positive = sum(c["tumour_positive"] for c in counts)
    negative = sum(c["tumour_negative"] for c in counts)
    tps = tumour_proportion_score(positive, negative)
    cps = None
    if all("immune_positive" in c for c in counts):
        cps = combined_positive_score(positive, sum(c["immune_positive"] for c in counts), positive + negative)
    return tps, cps


def _merge_metadata(results: list[tuple[Any, SlideResult]]) -> dict[str, str]:
    """Entry metadata over all analysed parents (each ``(annotation or None, result)``): TPS and CPS from the summed
    nuclei counts of those not nested in another."""
    nested = nested_targets([None if ann is None else ann.roi for ann, _ in results])
    return merge_entry_metadata([(entry_metadata(r), metadata_counts(r)) for _, r in results], nested=nested)


def iter_failed(outcomes: list[ImageOutcome]) -> Iterator[ImageOutcome]:
    return (o for o in outcomes if o.state == "failed")
