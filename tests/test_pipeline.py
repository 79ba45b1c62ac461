"""analyse_slide's checks before it reads pixels."""

import numpy as np
import pytest
import shapely

from inference.errors import ResolutionError, StainError
from inference.models.ensemble import demo_model_dir
from inference.pipeline import Models, PipelineConfig, analyse_slide
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide


class _RecordingReader(ArrayReader):
    def __init__(self, rgb):
        super().__init__(rgb)
        self.reads = 0
        self.largest_read_wh = (0, 0)

    def read_region(self, location_xy, level, size_wh):
        self.reads += 1
        self.largest_read_wh = max(self.largest_read_wh, tuple(size_wh))
        return super().read_region(location_xy, level, size_wh)


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


@pytest.mark.parametrize(
    ("mpp", "which"),
    [(50.0, "the segmentation model reads 2 µm/px"), (2.5, "the nuclei model reads 1 µm/px")],
)
def test_an_image_too_coarse_for_a_model_is_refused_before_any_pixel_is_read(models, mpp, which):
    # `--mpp 50` on a 2048 px image once had the tissue detector enlarge it to 12800 px square (GBs).
    reader = _RecordingReader(np.full((2048, 2048, 3), 230, np.uint8))
    slide = Slide(reader, mpp=Mpp(mpp, mpp, "--mpp"))
    with pytest.raises(ResolutionError, match=which):
        analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    assert reader.reads == 0
    # Unstated, the stain is told from a thumbnail first (never enlarged: at most the image's own pixels).
    with pytest.raises(ResolutionError, match=which):
        analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"))
    assert reader.reads == 1 and max(reader.largest_read_wh) <= 2048


def test_a_job_without_nuclei_neither_runs_nor_needs_the_nuclei_model(models):
    # The service loads both models once; a job that leaves nuclei out must not run them (nor be refused
    # for a pixel size only the nuclei model cannot use).
    assert models.nuclei is not None
    slide = Slide(ArrayReader(np.full((1024, 1024, 3), 230, np.uint8)), mpp=Mpp(2.5, 2.5, "--mpp"))
    result = analyse_slide(slide, models=models, config=PipelineConfig(device="cpu", run_nuclei=False))
    assert result.mpp == 2.5 and result.nuclei is None and result.nuclei_model is None


def test_an_image_of_no_stain_the_product_knows_is_refused_before_any_pixel_is_read(models):
    reader = _RecordingReader(np.full((1024, 1024, 3), 230, np.uint8))
    slide = Slide(reader, mpp=Mpp(0.5, 0.5, "test"))
    with pytest.raises(StainError, match=r"the image is other \(--stain\); pdl1-bridge analyses H&E .* and PD-L1 IHC"):
        analyse_slide(
            slide, models=models, config=PipelineConfig(device="cpu"), image_stain="other", image_stain_source="--stain"
        )
    assert reader.reads == 0


def test_an_ihc_image_never_runs_a_model_trained_on_h_and_e(models):
    reader = _RecordingReader(np.full((1024, 1024, 3), 230, np.uint8))
    slide = Slide(reader, mpp=Mpp(0.5, 0.5, "test"))
    config = PipelineConfig(device="cpu", ihc_model_dir=str(demo_model_dir("nuclei")))
    ihc_models = Models(config)
    with pytest.raises(StainError, match=r"the image is H-DAB \(--stain\), but the PD-L1 IHC nuclei model "):
        analyse_slide(slide, models=ihc_models, config=config, image_stain="H-DAB", image_stain_source="--stain")
    assert reader.reads == 0


def test_a_tissue_detection_that_lost_pale_tissue_is_a_review_reason(models, tmp_path, monkeypatch):
    # A stain-shifted H&E whose pale tissue the saturation detector loses (test_tissue.py): forced onto
    # that detector, the result says so with value and limit and is flagged.
    import inference.pipeline
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.slides.slide import open_slide
    from inference.slides.tissue import MAX_FAINT_SHARE, tissue_mask_for_slide

    path = tmp_path / "he.svs"
    write_phantom(path, PhantomSpec(2048, 2048, seed=207, tps_percent=40, shift=0.7))
    monkeypatch.setattr(
        inference.pipeline,
        "tissue_mask_for_slide",
        lambda slide, mpp, method: tissue_mask_for_slide(slide, mpp=mpp, method="saturation"),
    )
    config = PipelineConfig(device="cpu", run_nuclei=False)
    with open_slide(path) as slide:
        result = analyse_slide(slide, models=models, config=config, image_stain="H&E")
    (reason,) = [r for r in result.summary["review_reasons"] if r["reason"].startswith("suspect tissue detection")]
    assert reason["value"] >= MAX_FAINT_SHARE == reason["limit"]
    assert result.uncertainty_flag


def test_an_h_and_e_roi_with_too_few_tumour_cells_for_a_tps_is_a_review_reason(models, phantom_svs):
    from inference.slides.slide import open_slide

    with open_slide(phantom_svs) as slide:
        result = analyse_slide(
            slide,
            models=models,
            config=PipelineConfig(device="cpu"),
            image_stain="H&E",
            roi=shapely.box(0, 0, 160, 160),
        )
    (reason,) = [r for r in result.summary["review_reasons"] if r["reason"] == "fewer than 100 tumour cells"]
    assert reason["value"] == result.tps.tumour < 100 == reason["limit"]
    assert result.uncertainty_flag


def test_a_small_predicted_positive_area_is_a_review_reason_once_a_limit_is_calibrated(models, phantom_svs, tmp_path):
    from inference.pipeline import DEFAULT_REVIEW_RULE
    from inference.slides.slide import open_slide

    assert DEFAULT_REVIEW_RULE["review_positive_area_pct"] < 0  # off unless pdl1 calibrate sets it
    with open_slide(phantom_svs) as slide:
        plain = analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    assert not [r for r in plain.summary["review_reasons"] if r["reason"].startswith("small predicted positive")]
    # The demo segmentation model with a limit above this slide's positive share.
    result = _analyse_with_seg_thresholds(phantom_svs, tmp_path, review_positive_area_pct=100.0)
    (reason,) = [r for r in result.summary["review_reasons"] if r["reason"].startswith("small predicted positive")]
    assert 0 < reason["value"] <= reason["limit"] == 100.0 and result.uncertainty_flag


def test_positive_area_away_from_tumour_cells_is_measured_and_a_reason_over_its_limit(models, phantom_svs, tmp_path):
    from inference.slides.slide import open_slide

    with open_slide(phantom_svs) as slide:
        plain = analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    off = plain.summary["positive_off_tumour_pct"]
    assert 0 <= off < 50  # a phantom's positive areas are tumour: the default limit (50 %) is not reached
    assert not [r for r in plain.summary["review_reasons"] if "away from tumour" in r["reason"]]
    result = _analyse_with_seg_thresholds(phantom_svs, tmp_path, review_positive_off_tumour_pct=0.0)
    (reason,) = [r for r in result.summary["review_reasons"] if "away from tumour" in r["reason"]]
    assert reason["value"] == result.summary["positive_off_tumour_pct"] >= reason["limit"] == 0.0


def test_members_that_disagree_on_the_predicted_tps_category_are_a_review_reason(models, phantom_svs, tmp_path):
    from inference.analysis.points import tps_member_disagreement
    from inference.pipeline import DEFAULT_REVIEW_RULE
    from inference.slides.slide import open_slide

    assert DEFAULT_REVIEW_RULE["review_tps_member_disagreement"] == 0.4  # two of five members
    with open_slide(phantom_svs) as slide:
        plain = analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    disagreement = tps_member_disagreement(plain.tps.percent, plain.summary["tps_members"])
    assert disagreement is not None and disagreement < 0.4
    assert not [r for r in plain.summary["review_reasons"] if "disagree on the TPS category" in r["reason"]]
    result = _analyse_with_seg_thresholds(phantom_svs, tmp_path, review_tps_member_disagreement=0.0)
    (reason,) = [r for r in result.summary["review_reasons"] if "disagree on the TPS category" in r["reason"]]
    assert reason["value"] == disagreement and reason["limit"] == 0.0 and result.uncertainty_flag


def test_an_unsettled_positive_area_is_a_review_reason_at_its_limit(models, phantom_svs, tmp_path):
    from inference.pipeline import DEFAULT_REVIEW_RULE
    from inference.slides.slide import open_slide

    assert DEFAULT_REVIEW_RULE["review_unsettled_positive_area_pct"] == 50.0  # a quarter either way
    with open_slide(phantom_svs) as slide:
        plain = analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    unsettled = plain.summary["unsettled_positive_area_pct"]
    assert 0 < unsettled < 50  # this in-domain phantom's positive area is settled
    assert not [r for r in plain.summary["review_reasons"] if r["reason"].startswith("unsettled positive area")]
    result = _analyse_with_seg_thresholds(phantom_svs, tmp_path, review_unsettled_positive_area_pct=0.0)
    (reason,) = [r for r in result.summary["review_reasons"] if r["reason"].startswith("unsettled positive area")]
    assert reason["value"] == unsettled and reason["limit"] == 0.0 and result.uncertainty_flag


def _analyse_with_seg_thresholds(phantom_svs, tmp_path, **thresholds):
    """``phantom_svs`` analysed as H&E by a copy of the demo segmentation model (the demo is read-only) whose
    manifest states ``thresholds``."""
    import dataclasses
    import shutil

    from inference import Models, demo_model_dir
    from inference.models.manifest import read_manifest, write_manifest
    from inference.slides.slide import open_slide

    seg = tmp_path / "seg"
    shutil.copytree(demo_model_dir("seg"), seg)
    write_manifest(seg, read_manifest(seg).with_thresholds(**thresholds))
    config = dataclasses.replace(PipelineConfig(device="cpu"), seg_model_dir=str(seg))
    with open_slide(phantom_svs) as slide:
        return analyse_slide(slide, models=Models(config), config=config, image_stain="H&E")


def test_the_librarys_stain_refusal_names_no_programs_option(models):
    # inference knows no CLI: its words for stating a stain are its own argument; pdl1 run and the service pass theirs.
    slide = Slide(ArrayReader(np.full((1024, 1024, 3), 230, np.uint8)), mpp=Mpp(0.5, 0.5, "test"))
    with pytest.raises(StainError) as refused:
        analyse_slide(slide, models=models, config=PipelineConfig(device="cpu"), image_stain="other")
    assert str(refused.value).endswith("If the image is one of those, pass its stain (H&E or H-DAB) as image_stain")
    assert "--stain" not in str(refused.value) and "Image tab" not in str(refused.value)


def test_a_cuda_device_without_a_gpu_is_refused_in_the_librarys_words(monkeypatch):
    # It advised --device cpu, an option of pdl1's, to a Python caller; pdl1 checks its --device before this.
    import torch

    from inference.models.ensemble import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' asked for, but torch sees no CUDA GPU; use 'cpu' \(or 'auto'") as err:
        resolve_device("cuda")
    assert "--device" not in str(err.value)


@pytest.mark.parametrize(
    "roi",
    [
        pytest.param(shapely.Point(1000, 1100).buffer(600), id="a-circle"),
        pytest.param(shapely.box(130, 75, 1401, 1333), id="a-rectangle-off-the-grid"),
    ],
)
def test_the_uncertainty_tiles_of_an_roi_lie_within_it(models, phantom_svs, roi):
    # As QuPath's Create tiles with Trim to ROI: the tiles over the ROI's outline are cut at it, so QuPath's Resolve
    # hierarchy keeps them in it and none lies in a neighbouring analysed ROI.
    from bridge.objects import tile_object
    from inference.slides.slide import open_slide

    config = PipelineConfig(device="cpu", run_nuclei=False)
    with open_slide(phantom_svs) as slide:
        result = analyse_slide(slide, models=models, config=config, image_stain="H&E", roi=roi)
    geometries = [tile_object(t).geometry for t in result.tiles]
    trimmed = [t for t in result.tiles if t.outline is not None]
    assert trimmed and len(trimmed) < len(result.tiles)  # the edge's cells cut, the inner ones whole
    assert all(roi.buffer(1e-6).covers(g) for g in geometries)
    cells = shapely.union_all([shapely.box(t.x, t.y, t.x + t.width, t.y + t.height) for t in result.tiles])
    assert shapely.union_all(geometries).area == pytest.approx(roi.intersection(cells).area, abs=1e-6)
    assert sum(g.area for g in geometries) == pytest.approx(roi.intersection(cells).area, abs=1e-6)  # no overlap
    assert all(0 < t.tissue_fraction <= 1 for t in result.tiles)
    if roi.equals(roi.envelope):  # a rectangle's trimmed tiles are the rectangles of box ∩ ROI
        assert all(t.outline.equals(t.outline.envelope) for t in trimmed)


def test_an_h_and_e_analysis_counts_its_nuclei_tiles_from_its_first_progress_report(models, phantom_svs):
    # The segmentation reported its own total first: a bar (and a service job's progress) reached 100 % when it
    # ended, then fell back to 22 % as the nuclei began ('running 100% (9/9 tiles)' in QuPath's log).
    from inference.slides.slide import open_slide

    reports = []
    with open_slide(phantom_svs) as slide:
        analyse_slide(
            slide,
            models=models,
            config=PipelineConfig(device="cpu"),
            image_stain="H&E",
            roi=shapely.box(0, 0, 1024, 1024),
            on_progress=lambda done, total: reports.append((done, total)),
        )
    totals = {total for _, total in reports}
    assert len(totals) == 1, reports
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[0] == 0 and done[-1] == totals.pop()
    assert [d for d, t in reports if d == t] == [done[-1]] * done.count(done[-1])  # whole once, at the end
