"""Pixels in, ``SlideResult`` out: slide reading, tiling, models and uncertainty.

Nothing here knows about QuPath, paquo, HTTP or GeoJSON (see DESIGN.md §1). ``bridge``
uses only the names below (``from inference import analyse_slide``); each is imported from
its module on first use, so ``import inference`` stays cheap and loads no torch.

Subpackages, by concern:

* :mod:`inference.slides`: reading images (reader protocol, OpenSlide, direct TIFF tiles,
  GPU decoding, read-ahead, tissue and stain detection);
* :mod:`inference.models`: manifests, safetensors members, networks, ensembles;
* :mod:`inference.analysis`: tiling, sliding-window ensembles, uncertainty, regions, SUA,
  nuclei and points, registration of an IHC section to its H&E;
* :mod:`inference.training`: cyclic (nnUNet-B) training of both models;
* :mod:`inference.evaluation`: scoring against truth, calibration, metrics;
* :mod:`inference.phantom`: phantom slides with known truth.

Beside them: :mod:`inference.pipeline` (the one call from a slide to a result),
:mod:`inference.results` (what crosses into ``bridge``) and :mod:`inference.errors`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    # the pipeline call and its configuration
    "Models": "inference.pipeline",
    "PipelineConfig": "inference.pipeline",
    "analyse_slide": "inference.pipeline",
    "analysis_grid_um": "inference.pipeline",
    "review_rule_for": "inference.pipeline",
    "sua_params_for": "inference.pipeline",
    "SegmentConfig": "inference.analysis.segment",
    "NucleiConfig": "inference.analysis.nuclei",
    "tumour_proportion_score": "inference.analysis.points",
    "tps_category": "inference.analysis.tps",
    "tps_text": "inference.analysis.tps",
    "tps_range_text": "inference.analysis.tps",
    "cps_text": "inference.analysis.tps",
    "cps_category": "inference.analysis.tps",
    "cps_shown": "inference.analysis.tps",
    "INSUFFICIENT": "inference.analysis.tps",
    "TPS_CUTOFFS_PERCENT": "inference.analysis.tps",
    "MIN_TUMOUR_NUCLEI": "inference.analysis.tps",
    "combined_positive_score": "inference.analysis.ihc",
    "Registration": "inference.analysis.registration",
    "register_pair": "inference.analysis.registration",
    "register_slides": "inference.analysis.registration",
    "PairComparison": "inference.analysis.pairs",
    "compare_pair": "inference.analysis.pairs",
    "cells_area": "inference.analysis.pairs",
    "IHC_CELL_RADIUS_UM": "inference.analysis.pairs",
    "Cps": "inference.results",
    "Tps": "inference.results",
    # results
    "SlideResult": "inference.results",
    "Nuclei": "inference.results",
    "RegionStats": "inference.results",
    "UncertaintyTile": "inference.results",
    # errors
    "Pdl1Error": "inference.errors",
    "cuda_device_problem": "inference.devices",
    "SlideNotFoundError": "inference.errors",
    "SlideFormatError": "inference.errors",
    "MissingMppError": "inference.errors",
    "RoiError": "inference.errors",
    "ResolutionError": "inference.errors",
    "StainError": "inference.errors",
    "ModelFileError": "inference.errors",
    "RuntimeUnavailableError": "inference.errors",
    "EngineExportError": "inference.errors",
    "TruthNotFoundError": "inference.errors",
    "TruthFormatError": "inference.errors",
    "Cancelled": "inference.errors",
    # the process
    "tune_allocator": "inference.allocator",
    "tune_openmp": "inference.openmp",
    # images
    "open_slide": "inference.slides.slide",
    "slide_size": "inference.slides.slide",
    "header_mpp": "inference.slides.slide",
    "require_resolution": "inference.slides.slide",
    "Slide": "inference.slides.slide",
    "Mpp": "inference.slides.slide",
    "MppAdvice": "inference.slides.slide",
    "MPP_PLAUSIBLE_RANGE": "inference.slides.slide",
    "unconvertible_samples": "inference.slides.slide",
    "has_alpha": "inference.slides.slide",
    "format_unlike_name": "inference.slides.slide",
    "ArrayReader": "inference.slides.reader",
    "StainEstimate": "inference.slides.stain_detect",
    "detect_stain": "inference.slides.stain_detect",
    "detect_slide_stain": "inference.slides.stain_detect",
    # models
    "Ensemble": "inference.models.ensemble",
    "demo_model_dir": "inference.models.ensemble",
    "RUNTIMES": "inference.models.openvino_engine",
    "check_runtime": "inference.models.openvino_engine",
    "SettingWords": "inference.advice",
    "library_setting": "inference.advice",
    "Manifest": "inference.models.manifest",
    "read_manifest": "inference.models.manifest",
    "wrong_model_message": "inference.models.manifest",
    "is_finite_number": "inference.values",
    "write_manifest": "inference.models.manifest",
    "demo_model_checksums": "inference.models.manifest",
    "import_nnunet": "inference.models.nnunet_import",
    # training
    "DEFAULT_LR_MAX": "inference.training.cyclic",
    "check_out_dir": "inference.training.cyclic",
    "run_checkpoints": "inference.training.cyclic",
    "SegTrainConfig": "inference.training.train_seg",
    "train_segmentation": "inference.training.train_seg",
    "check_training_slides": "inference.training.cyclic",
    "NucleiTrainConfig": "inference.training.train_nuclei",
    "train_nuclei": "inference.training.train_nuclei",
    "SlideLabels": "inference.training.labels",
    "IGNORE_LABEL": "inference.training.labels",
    "labels_digest": "inference.training.labels",
    "open_labelled_slide": "inference.training.labels",
    "region_target": "inference.training.labels",
    "nuclei_known_mask": "inference.training.labels",
    "PseudoLabelRule": "inference.training.pseudo",
    "PseudoLabels": "inference.training.pseudo",
    "PseudoTarget": "inference.training.pseudo",
    "UnlabeledSlide": "inference.training.pseudo",
    "pseudo_label_target": "inference.training.pseudo",
    "pseudo_label_slides": "inference.training.pseudo",
    "compute_domain_stats": "inference.training.domain_stats",
    "recorded_slide_mpp": "inference.training.domain_stats",
    "LabelStatistics": "inference.training.report",
    "label_statistics": "inference.training.report",
    "truth_statistics": "inference.training.report",
    "TrainingCurves": "inference.training.report",
    "training_curves": "inference.training.report",
    "read_training_curves": "inference.training.report",
    "ExampleTile": "inference.training.report",
    "example_tiles": "inference.training.report",
    "write_domain_stats": "inference.training.domain_stats",
    "with_domain_stats": "inference.training.domain_stats",
    # evaluation
    "SlideEvaluation": "inference.evaluation.evaluate",
    "evaluate_segmentation": "inference.evaluation.evaluate",
    "evaluate_nuclei": "inference.evaluation.evaluate",
    "score_nuclei_on_truth": "inference.evaluation.evaluate",
    "evaluate_registration": "inference.evaluation.evaluate",
    "evaluate_slide_suite": "inference.evaluation.evaluate",
    "calibrate_ensemble": "inference.evaluation.evaluate",
    "check_truths": "inference.evaluation.evaluate",
    "sua_fitted": "inference.evaluation.evaluate",
    "UNCERTAINTY_MAPS": "inference.analysis.sua",
    "mask_to_polygons": "inference.analysis.vectorize",
    "AGGREGATIONS": "inference.analysis.sua",
    "CALIBRATION_OBJECTIVES": "inference.analysis.sua",
    "REVIEW_NEVER": "inference.evaluation.evaluate",
    "IHC_FAILED_TPS_ERROR": "inference.evaluation.evaluate",
    "pooled_dice": "inference.evaluation.evaluate",
    "score_nuclei_on_labels": "inference.evaluation.labelled",
    "LabelledNucleiScore": "inference.evaluation.labelled",
    "score_regions_on_labels": "inference.evaluation.labelled",
    "LabelledRegionScore": "inference.evaluation.labelled",
    "LabelledPixels": "inference.evaluation.labelled",
    "labelled_region_pixels": "inference.evaluation.labelled",
    "score_labelled_pixels": "inference.evaluation.labelled",
    "fit_threshold": "inference.evaluation.labelled",
    "ThresholdFit": "inference.evaluation.labelled",
    "LabelledNuclei": "inference.evaluation.labelled",
    "labelled_nuclei": "inference.evaluation.labelled",
    "score_labelled_nuclei": "inference.evaluation.labelled",
    "fit_min_score": "inference.evaluation.labelled",
    "DEFAULT_MIN_SCORE": "inference.analysis.nuclei",
    "reliability": "inference.evaluation.metrics",
    "spearman": "inference.evaluation.metrics",
    "aurc": "inference.evaluation.metrics",
    "e_aurc": "inference.evaluation.metrics",
    "risk_coverage": "inference.evaluation.metrics",
    # phantoms
    "PhantomSpec": "inference.phantom.scene",
    "write_phantom": "inference.phantom.pyramid",
    "check_slide_path": "inference.phantom.pyramid",
    "truth_dir_for": "inference.phantom.truth",
    "IhcSpec": "inference.phantom.ihc",
    "write_ihc_phantom": "inference.phantom.pyramid",
    "ihc_to_he_points": "inference.phantom.ihc",
    "load_truth": "inference.phantom.truth",
    "phantom_mpp_advice": "inference.phantom.truth",
    "PhantomTruthData": "inference.phantom.truth",
    "NUCLEUS_CLASSES": "inference.phantom.truth",
    "IHC_NUCLEUS_CLASSES": "inference.phantom.truth",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
