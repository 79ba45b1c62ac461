"""A PD-L1 IHC image end to end: told from its colour, scored by its cells with the shipped IHC ensemble,
written for QuPath, and compared with the H&E of the same block."""

import json
from pathlib import Path

import pytest

from bridge.qupath_geojson import read_features
from bridge.run import RunConfig, run_batch
from inference import Models, PipelineConfig, analyse_slide
from inference.errors import StainError
from inference.phantom.truth import load_truth
from inference.pipeline import _mpp_disagreement


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


def test_the_shipped_ihc_ensemble_scores_a_section_whose_haematoxylin_the_shift_turned_olive(models, tmp_path):
    """Validation section 2142 (TPS 0.7 %, shift 0.76, its haematoxylin 27° off Ruifrok's): the IHC ensemble
    shipped before read its olive nuclei as DAB (TPS 74 %); the one trained on 26 pairs is within 5 points."""
    from benchmarks.review_phantoms import draw
    from inference.phantom.ihc import IhcSpec
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec

    tps, shift, weak = draw(2142)
    spec = PhantomSpec(2048, 2048, seed=2142, tps_percent=tps, shift=shift, weak_fraction=weak)
    he = write_phantom(tmp_path / "c2142.svs", spec)
    ihc = tmp_path / "ihc_2142.svs"
    write_ihc_phantom(ihc, spec, IhcSpec(immune_positive_fraction=0.3), paired_with=he.slide_path)
    truth = load_truth(ihc).summary
    assert shift <= 0.8  # inside issue #31's range
    result = analyse_slide(ihc, models=models, config=PipelineConfig(device="cpu"), image_stain="H-DAB")
    assert abs(result.tps.percent - truth["tps_percent"]) <= 5
    assert abs(result.cps.percent - truth["cps"]) <= 5


def test_an_ihc_phantom_is_told_from_its_colour_and_scored_close_to_its_truth(models, ihc_pair):
    _, ihc = ihc_pair
    truth = load_truth(ihc).summary
    result = analyse_slide(ihc, models=models, config=PipelineConfig(device="cpu"))
    assert result.stain == "H-DAB" and result.stain_source.startswith("its colour")
    assert result.seg_model is None and result.maps is None and result.tiles == ()
    assert result.nuclei_model.name == "pdl1-nuclei-ihc"
    assert abs(result.tps.percent - truth["tps_percent"]) <= 5
    assert abs(result.cps.percent - truth["cps"]) <= 5
    nuclei = result.nuclei
    positive = nuclei.cls == nuclei.class_names.index("Tumor: Positive")
    assert set(nuclei.intensity[positive]) <= {1, 2, 3} and not nuclei.intensity[~positive].any()
    # Brighter membranes grade higher: the DAB of 3+ cells lies above that of 1+ cells.
    assert nuclei.membrane_dab_od[nuclei.intensity == 3].mean() > nuclei.membrane_dab_od[nuclei.intensity == 1].mean()
    assert result.summary["h_score"] > 0 and result.summary["stain_from_colour"]["stain"] == "H-DAB"


def test_the_h_and_e_of_the_pair_is_told_from_its_colour_too(models, ihc_pair):
    he, _ = ihc_pair
    result = analyse_slide(he, models=models, config=PipelineConfig(device="cpu", run_nuclei=False))
    assert result.stain == "H&E" and result.maps is not None and result.cps is None


def test_a_stated_stain_is_obeyed_but_a_colour_that_contradicts_it_is_a_review_reason(models, ihc_pair):
    # Stated stains are obeyed (the pathologist may know better), but a clear contradiction is a review reason.
    he, _ = ihc_pair
    result = analyse_slide(
        he, models=models, config=PipelineConfig(device="cpu"), image_stain="H-DAB", image_stain_source="--stain"
    )
    assert result.stain == "H-DAB" and result.uncertainty_flag
    assert any(r["reason"].startswith("stain: --stain says H-DAB") for r in result.summary["review_reasons"])
    with pytest.raises(StainError, match="pdl1-bridge analyses H&E"):
        analyse_slide(he, models=models, config=PipelineConfig(device="cpu"), image_stain="other")


def test_a_pixel_size_from_qupath_unlike_the_files_is_a_review_reason(models, ihc_pair):
    # QuPath's calibration is obeyed (it may correct a wrong header), but one 4x the file's found 8 times the tumour
    # cells, TPS 22.9 % for 40, without a word (a service client's mpp of 2.0 for a 0.5 µm/px file).
    from inference.slides.slide import open_slide

    _, ihc = ihc_pair
    config = PipelineConfig(device="cpu")
    result = analyse_slide(ihc, models=models, config=config, image_mpp=1.0, image_stain="H-DAB")
    (said,) = [r for r in result.summary["review_reasons"] if r["reason"].startswith("pixel size: ")]
    assert said["reason"].startswith("pixel size: QuPath project says 1 µm/px, the file says 0.5 (openslide.mpp-x/y)")
    assert said["value"] == pytest.approx(2.0) and result.uncertainty_flag
    # Within a tenth either way (scanners' own statements of one objective differ by a few per cent): no reason.
    with open_slide(ihc, mpp=0.53, mpp_source="QuPath project") as slide:
        assert _mpp_disagreement(slide) == [] and slide.file_mpp.mean == pytest.approx(0.5)
    # An explicit --mpp (config.mpp) and a file stating none are not compared.
    with open_slide(ihc) as slide:
        assert slide.file_mpp is None and _mpp_disagreement(slide) == []


def test_a_run_over_a_case_analyses_each_image_on_its_path_and_compares_the_pair(models, ihc_pair, tmp_path):
    he, ihc = ihc_pair
    outcomes = run_batch([he, ihc], RunConfig(out=tmp_path / "out", qupath="never"), models=models)
    assert [o.state for o in outcomes] == ["done", "done"]
    summaries = [json.loads((tmp_path / "out" / f"{p.stem}.summary.json").read_text()) for p in (he, ihc)]
    assert [s["stain"] for s in summaries] == ["H&E", "H-DAB"]
    # No segmentation runs on the IHC: it has no SUA candidates or regions to count, not zero of them.
    assert [(s["sua_candidates"] is None, s["regions"] is None) for s in summaries] == [(False, False), (True, True)]
    geojson = (tmp_path / "out" / "ihc_271.geojson").read_text()
    assert '"names":["Tumor","2+"]' in geojson and '"names":["Immune cells","PD-L1 positive"]' in geojson
    pairs = json.loads((tmp_path / "out" / "pdl1" / "pairs.json").read_text())
    case = pairs["cases"]["271"]
    assert case["he"]["image"] == "he_271.svs" and case["ihc"]["image"] == "ihc_271.svs"
    assert case["registration"]["ok"], case["registration"]["reason"]
    assert case["registration"]["error_um"] < 30
    comparison = case["comparison"]
    assert comparison["tps_ihc"] == pytest.approx(summaries[1]["tps_percent"])
    assert comparison["tps_he_predicted"] == pytest.approx(summaries[0]["tps_percent"])
    # The H&E ensemble and the IHC cells find the same positive nests (the IHC truth's are the H&E's).
    assert comparison["dice"] > 0.6
    # Both TPS of this case (truth 40 %) fall in 1-49 %: no case reason.
    assert case["review_reasons"] == []
    # The IHC's positive area on the H&E, for QuPath and as a training label.
    (label,) = read_features(case["ihc_positive_on_he"])
    assert label.classification == "PD-L1 IHC positive (registered)" and label.object_type == "annotation"
    assert label.geometry.area * 0.25 == pytest.approx(comparison["positive_area_ihc_um2"], rel=1e-6)


def test_a_resumed_run_from_another_folder_compares_its_case_again_and_an_earlier_cases_labels_go(
    models, ihc_pair, tmp_path, monkeypatch
):
    # Slides given relative to the folder of the first run: a --resume from another folder found the slides, then
    # replaced the case's comparison with "slide not found" (pairs read the path the summary recorded). And the
    # registered labels of a case no longer compared stayed for pdl1 train --ihc-band-um to read.
    (tmp_path / "slides").mkdir()
    for slide in ihc_pair:
        (tmp_path / "slides" / slide.name).symlink_to(slide)
    monkeypatch.chdir(tmp_path / "slides")
    names = [Path(p.name) for p in ihc_pair]
    assert [o.state for o in run_batch(names, RunConfig(out=Path("../out"), qupath="never"), models=models)] == [
        "done",
        "done",
    ]
    stale = tmp_path / "out" / "pdl1" / "pairs" / "B7_HE.ihc_positive.geojson"  # an earlier run's case
    stale.write_text('{"type": "FeatureCollection", "features": []}')
    monkeypatch.chdir(tmp_path)
    again = run_batch(
        [Path("slides") / n for n in names], RunConfig(out=Path("out"), qupath="never", resume=True), models=models
    )
    assert [o.state for o in again] == ["skipped", "skipped"]
    case = json.loads((tmp_path / "out" / "pdl1" / "pairs.json").read_text())["cases"]["271"]
    assert case["registration"]["ok"], case.get("why_not_compared")
    labels = Path(case["ihc_positive_on_he"])
    assert labels.is_absolute() and labels.is_file()  # pairs.json is read from other folders
    assert sorted(p.name for p in labels.parent.iterdir()) == [labels.name]
    summary = json.loads((tmp_path / "out" / "he_271.summary.json").read_text())
    assert summary["image"] == str(tmp_path / "slides" / "he_271.svs")  # as given, made absolute


def test_a_project_made_without_qupath_with_a_case_of_both_stains_is_run_and_compared(models, ihc_pair, tmp_path):
    from bridge.init_project import init_project_files

    he, ihc = ihc_pair
    project = tmp_path / "project"
    init_project_files(project, [he, ihc])
    # No image types in a project QuPath never opened: the colour tells the stains, the file names the case.
    outcomes = run_batch([project], RunConfig(qupath="never"), models=models)
    assert [o.state for o in outcomes] == ["done", "done"]
    stains = [json.loads((project / "pdl1" / o.key / "summary.json").read_text())["stain"] for o in outcomes]
    assert stains == ["H&E", "H-DAB"]
    pairs = json.loads((project / "pdl1" / "pairs.json").read_text())["cases"]
    assert list(pairs) == ["271"] and pairs["271"]["comparison"]["dice"] > 0.6


def test_a_case_whose_ihc_is_flagged_says_its_reference_is_in_doubt(models, fixtures_dir, tmp_path):
    # The labels fixture: one H&E file in two entries of case phantom-1357, the second typed H-DAB in QuPath.
    # Analysed as stated, that "IHC" is flagged (its colour says H&E), so the case is no sure comparison and
    # its registered area no sure label.
    import shutil

    from bridge.pairs import IHC_NEEDS_REVIEW
    from bridge.report import write_report

    folder = tmp_path / "labels"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-labels", folder)
    project = folder / "project"
    outcomes = run_batch([project], RunConfig(qupath="never"), models=models)
    assert [o.state for o in outcomes] == ["done", "done"]
    ihc = json.loads((project / "pdl1" / "2" / "summary.json").read_text())
    assert ihc["stain"] == "H-DAB" and ihc["uncertainty_flag"]
    case = json.loads((project / "pdl1" / "pairs.json").read_text())["cases"]["phantom-1357"]
    (reason,) = [r for r in case["review_reasons"] if r["reason"].startswith("the IHC's own analysis needs review")]
    assert "stain: QuPath's image type BRIGHTFIELD_H_DAB says H-DAB, the colour says H&E" in reason["reason"]
    (label,) = read_features(case["ihc_positive_on_he"])
    assert label.measurements[IHC_NEEDS_REVIEW] == 1.0 and label.name.endswith("its IHC analysis needs review")
    html_path, _ = write_report(project)
    report = html_path.read_text()
    assert "the IHC&#x27;s own analysis needs review" in report
    # Only the H&E counts SUA candidates: the IHC's section said "0 SUA false-negative candidates", as if SUA had run.
    assert report.count("SUA false-negative candidates</td>") == 1 and "no SUA on a PD-L1 IHC" in report


def test_a_stain_told_from_the_colour_by_a_weak_margin_is_a_review_reason(models, ihc_pair, monkeypatch):
    import dataclasses

    from inference import pipeline
    from inference.slides.stain_detect import detect_slide_stain

    he, _ = ihc_pair

    def weak(slide, *, mpp):
        return dataclasses.replace(detect_slide_stain(slide, mpp=mpp), margin_deg=2.0)

    monkeypatch.setattr(pipeline, "detect_slide_stain", weak)
    result = analyse_slide(he, models=models, config=PipelineConfig(device="cpu", run_nuclei=False))
    reasons = {r["reason"]: r for r in result.summary["review_reasons"]}
    weak_reason = reasons["stain told from the colour (H&E) by a weak margin: state it in QuPath"]
    assert weak_reason["value"] == 2.0 and weak_reason["limit"] == pipeline.WEAK_STAIN_MARGIN_DEG
    assert result.uncertainty_flag
    # Stated, the stain is not questioned for a weak colour call.
    stated = analyse_slide(he, models=models, config=PipelineConfig(device="cpu", run_nuclei=False), image_stain="H&E")
    assert not any("weak margin" in r["reason"] for r in stated.summary["review_reasons"])


def test_ihc_tissue_is_found_by_optical_density_and_keeps_what_saturation_loses(ihc_pair):
    import numpy as np

    from inference import PhantomSpec, open_slide
    from inference.phantom.ihc import IhcScene, IhcSpec
    from inference.slides.tissue import tissue_mask_for_slide

    _, ihc = ihc_pair
    truth = load_truth(ihc).summary
    scene = IhcScene(PhantomSpec(**truth["spec"]), IhcSpec(**truth["ihc_spec"]))
    with open_slide(ihc) as slide:
        by_od = tissue_mask_for_slide(slide, method="od")
        by_saturation = tissue_mask_for_slide(slide, method="saturation")
        with pytest.raises(ValueError, match="tissue method must be one of"):
            tissue_mask_for_slide(slide, method="colour")
    ds = by_od.downsample
    h, w = by_od.mask.shape
    tissue = scene.zones(((np.arange(w) + 0.5) * ds)[None, :], ((np.arange(h) + 0.5) * ds)[:, None])[0]

    def recall(mask):
        return (mask & tissue).sum() / tissue.sum()

    assert recall(by_od.mask) > 0.99 > recall(by_saturation.mask)
    assert (by_od.mask & tissue).sum() / by_od.mask.sum() > 0.9


@pytest.fixture(scope="module")
def real_immunostain(tmp_path_factory):
    """scikit-image's real DAB immunostain (512², IHC of colon) as a TIFF stating 0.5 µm/px."""
    import tifffile
    from skimage import data

    path = tmp_path_factory.mktemp("real") / "skimage_ihc.tif"
    tifffile.imwrite(path, data.immunohistochemistry(), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def test_a_real_immunostain_goes_the_ihc_path_and_is_flagged_out_of_the_phantom_models_domain(models, real_immunostain):
    result = analyse_slide(real_immunostain, models=models, config=PipelineConfig(device="cpu"))
    assert result.stain == "H-DAB" and result.stain_source.startswith("its colour")
    assert result.nuclei_model.name == "pdl1-nuclei-ihc" and result.maps is None
    assert result.tps is not None and len(result.nuclei) > 100
    # The shipped IHC model was trained on phantoms only: a real stain is out of its domain, and says so.
    domain = result.summary["domain"]
    assert domain["measured"] and domain["out_of_domain_score"] >= domain["limit"]
    assert any(r["reason"].startswith("out of the training domain") for r in result.summary["review_reasons"])
    assert result.uncertainty_flag


def test_a_real_immunostain_stated_as_h_and_e_runs_as_stated_and_is_flagged_for_the_contradiction(
    models, real_immunostain
):
    result = analyse_slide(real_immunostain, models=models, config=PipelineConfig(device="cpu"), image_stain="H&E")
    assert result.stain == "H&E" and result.maps is not None  # the H&E models, as the person said
    reasons = [r["reason"] for r in result.summary["review_reasons"]]
    assert any("colour" in r for r in reasons), reasons
    assert result.uncertainty_flag


@pytest.mark.slow
def test_the_real_aperio_h_and_e_goes_the_h_and_e_path_and_is_out_of_the_phantom_models_domain(models, cmu_svs):
    result = analyse_slide(cmu_svs, models=models, config=PipelineConfig(device="cpu"))
    assert result.stain == "H&E" and result.stain_source.startswith("its colour") and result.maps is not None
    domain = result.summary["domain"]
    assert domain["measured"] and domain["out_of_domain_score"] >= domain["limit"]
    assert result.uncertainty_flag


def test_ihc_members_that_disagree_on_the_tps_category_are_a_review_reason(ihc_pair, tmp_path):
    import dataclasses
    import shutil

    from inference import demo_model_dir
    from inference.analysis.points import tps_member_disagreement
    from inference.models.manifest import read_manifest, write_manifest

    _, ihc = ihc_pair
    plain = analyse_slide(ihc, models=Models(PipelineConfig(device="cpu")), config=PipelineConfig(device="cpu"))
    members = plain.summary["tps_members"]
    assert len(members) == len(read_manifest(demo_model_dir("nuclei-ihc")).members) > 1
    # Each member classes the cells alone; the ensemble (mean probabilities) need not lie inside their range.
    assert plain.summary["tps_low"] == min(members) <= max(members) == plain.summary["tps_high"]
    assert abs(plain.tps.percent - sum(members) / len(members)) < 5
    # TPS 40 with members close together: one category, so no reason at the default limit (two of five).
    assert tps_member_disagreement(plain.tps.percent, members) == 0.0
    assert not [r for r in plain.summary["review_reasons"] if "disagree on the TPS category" in r["reason"]]
    # With the limit at 0 the same slide is flagged, value and limit stated (a copy: the demo is read-only).
    model = tmp_path / "ihc"
    shutil.copytree(demo_model_dir("nuclei-ihc"), model)
    write_manifest(model, read_manifest(model).with_thresholds(review_tps_member_disagreement=0.0))
    config = dataclasses.replace(PipelineConfig(device="cpu"), ihc_model_dir=str(model))
    result = analyse_slide(ihc, models=Models(config), config=config)
    (reason,) = [r for r in result.summary["review_reasons"] if "disagree on the TPS category" in r["reason"]]
    assert reason["value"] == 0.0 == reason["limit"] and result.uncertainty_flag


def test_the_report_shows_the_ihc_members_tps_range_as_for_h_and_e():
    from bridge.report import _tps_row

    row = {"stain": "H-DAB", "tps_percent": 12.0, "tps_category": "1-49%", "cps": 14.0}
    assert "members 10.0-13.5%" in _tps_row(row | {"tps_low": 10.0, "tps_high": 13.5})
    assert "members" not in _tps_row(row | {"tps_low": None, "tps_high": None})
    he = _tps_row(row | {"stain": "H&E", "tps_low": 9.0, "tps_high": 15.0})
    assert "Predicted TPS (H&amp;E)" in he and "members 9.0-15.0%" in he


def test_eval_ihc_scores_the_slide_and_counts_the_review_flag_against_failures(ihc_pair):
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference.analysis.points import tumour_proportion_score
    from inference.evaluation.evaluate import NucleiEvaluation

    _, ihc = ihc_pair
    result = CliRunner().invoke(app, ["eval", "ihc", str(ihc), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "review" in result.output
    # This in-domain slide is scored right (TPS 40) and not flagged: no failure to catch, no false alarm.
    assert "caught 0 of 0 failed slides" in result.output and "false alarms on 0 of 1 others" in result.output
    plain = CliRunner().invoke(app, ["eval", "ihc", str(ihc), "--no-review", "--device", "cpu", "--no-progress"])
    assert plain.exit_code == 0 and "review flag" not in plain.output

    # With the review the pipeline's run detects the cells once and its nuclei are scored: the same cells and
    # scores as evaluate_nuclei's own detection (every column but the review).
    def cells(output: str) -> list[str]:
        (row,) = [line for line in output.splitlines() if ihc.name in line]
        return [c.strip() for c in row.split("│")[1:12]]

    assert cells(result.output) == cells(plain.output)

    # What counts as a failed IHC slide: the TPS category wrong, or the TPS more than 5 points off.
    def scored(pred: tuple[int, int], truth: tuple[int, int]) -> NucleiEvaluation:
        return NucleiEvaluation(
            slide="s",
            radius_um=3.0,
            overall=None,
            per_class=(),
            class_names=(),
            tps_pred=tumour_proportion_score(*pred),
            tps_truth=tumour_proportion_score(*truth),
        )

    assert not scored((40, 60), (44, 56)).failed()  # 40 % for 44 %
    assert scored((39, 61), (45, 55)).failed()  # 6 points off, same category
    assert scored((1, 199), (1, 99)).failed()  # 0.5 % for 1 %: the category


def test_eval_suite_scores_each_stain_and_counts_the_review_flag_over_both(ihc_pair, tmp_path):
    import csv

    from typer.testing import CliRunner

    from bridge.cli.app import app

    he, ihc = ihc_pair
    out = tmp_path / "suite"
    result = CliRunner().invoke(
        app, ["eval", "suite", str(he), str(ihc), "--out", str(out), "--device", "cpu", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    # The H&E goes the segmentation suite, the IHC its own table; then the flag over both stains.
    (he_row,) = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    (ihc_row,) = list(csv.DictReader((out / "ihc_metrics.csv").read_text().splitlines()))
    assert he_row["slide"] == he.name and ihc_row["slide"] == ihc.name
    assert abs(float(ihc_row["tps_predicted"]) - float(ihc_row["tps_truth"])) <= 5 and ihc_row["failed"] == "0"
    assert "review flag on PD-L1 IHC: caught 0 of 0 failed slides" in result.output
    # The printed TPS as everywhere else (inference.tps_text: never rounded across a cut-off), not to 3 decimals.
    from inference import tps_text

    row_printed = next(line for line in result.output.splitlines() if ihc.name in line and "│" in line)
    assert row_printed.split("│")[2].strip() == tps_text(float(ihc_row["tps_predicted"]))
    failed = [row["failed"] == "1" for row in (he_row, ihc_row)]
    flagged = [row["needs_review"] == "1" for row in (he_row, ihc_row)]
    caught = sum(f and g for f, g in zip(failed, flagged, strict=True))
    alarms = sum(g and not f for f, g in zip(failed, flagged, strict=True))
    both = f"review flag, both stains: caught {caught} of {sum(failed)} failed slides"
    assert both in result.output
    assert f"false alarms on {alarms} of {2 - sum(failed)} others" in result.output.split(both)[1]
