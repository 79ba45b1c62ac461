"""Segmentation evaluation: per-slide and pooled Dice of the ensemble and its members."""

import json
from pathlib import Path

import numpy as np
import pytest

from inference.analysis.segment import SegmentConfig
from inference.analysis.sua import SuaParams
from inference.evaluation.evaluate import (
    evaluate_segmentation,
    evaluate_segmentation_maps,
    evaluate_slide_suite,
    pooled_dice,
    truth_map_downsample,
)
from inference.phantom.truth import load_truth
from inference.results import UncertaintyMaps
from tests.helpers import pointwise_ensemble


def _maps(prob: np.ndarray, members: list[np.ndarray]) -> UncertaintyMaps:
    z = np.zeros(prob.shape, np.float32)
    return UncertaintyMaps(
        prob=prob.astype(np.float32),
        predictive_entropy=z,
        expected_entropy=z,
        mutual_information=z,
        prob_std=z,
        covered=np.ones(prob.shape, bool),
        origin_xy=(0.0, 0.0),
        downsample=1.0,
        mpp=2.0,
        member_prob=np.stack(members).astype(np.float32),
    )


def test_pooled_dice_weighs_slides_by_pixels_and_differs_from_the_mean():
    region = np.ones((1, 10), bool)
    # Slide a: truth 4 px; the ensemble finds 4, member 0 finds 2, member 1 finds 4 plus 4 false ones.
    truth_a = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], bool)
    ens_a = truth_a.astype(float)
    m0_a = np.array([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], float)
    m1_a = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], float)
    # Slide b: truth 1 px, found by member 1 only.
    truth_b = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    ens_b = np.zeros((1, 10))
    m0_b = np.zeros((1, 10))
    m1_b = truth_b.astype(float)
    a = evaluate_segmentation_maps(_maps(ens_a, [m0_a, m1_a]), truth_a, region, threshold=0.5)
    b = evaluate_segmentation_maps(_maps(ens_b, [m0_b, m1_b]), truth_b, region, threshold=0.5)
    assert a.dice_ensemble == 1.0 and a.dice_members == pytest.approx((4 / 6, 8 / 12))
    assert b.dice_ensemble == 0.0 and b.dice_members == (0.0, 1.0)
    ens, members = pooled_dice([a, b])
    # Ensemble: 2*4 / (4 + 5); member 0: 2*2 / (2 + 5); member 1: 2*(4+1) / (8+1 + 5).
    assert ens == pytest.approx(8 / 9)
    assert members == pytest.approx((4 / 7, 10 / 14))
    assert (a.dice_ensemble + b.dice_ensemble) / 2 == 0.5  # the mean of slides tells another story


@pytest.mark.parametrize(
    ("truth_mpp", "input_mpp", "expected"),
    [(4.0, 2.0, 2), (4.0, 1.0, 4), (4.0, 0.5, 8), (4.0, 4.0, 1), (4.0, 3.0, 1), (1.0, 2.0, 1)],
)
def test_scoring_maps_sit_on_the_truth_grid_or_finer(truth_mpp, input_mpp, expected):
    assert truth_map_downsample(truth_mpp, input_mpp) == expected


def test_eval_seg_scores_a_phantom_on_its_truth_grid(phantom_svs):
    # A 2 µm/px model over a 0.5 µm/px phantom whose truth is at downsample 8 (4 µm): the maps
    # must come out at 4 µm with their pixels on the truth's pixels.
    result, maps = evaluate_segmentation(phantom_svs, pointwise_ensemble(2, input_mpp=2.0))
    truth = load_truth(phantom_svs)
    assert maps.downsample == truth.mask_downsample == 8
    assert maps.origin_xy[0] % 8 == 0 and maps.origin_xy[1] % 8 == 0
    assert len(result.dice_members) == 2


def test_the_suite_scores_sua_on_the_grid_pdl1_run_uses(phantom_svs):
    # SUA's thresholds are calibrated and applied on the pipeline's maps, not the truth's grid.
    suite = evaluate_slide_suite(
        phantom_svs,
        pointwise_ensemble(2, input_mpp=2.0),
        sua=SuaParams(),
        pixel_threshold=0.4,
        review={"review_entropy": 1.0, "review_candidate_area_pct": 100.0},
    )
    assert suite.maps.downsample == 2.0 / 0.5 * SegmentConfig().map_downsample


def test_uncertainty_is_scored_beside_a_probability_and_a_boundary_baseline():
    # The prediction is the left half; the truth reaches one pixel further: every error is on the boundary.
    prob = np.zeros((20, 20), np.float32)
    prob[:, :10] = 0.9
    prob[:, 10] = 0.45  # the missed column sits just under the threshold
    truth = np.zeros((20, 20), bool)
    truth[:, :11] = True
    region = np.ones((20, 20), bool)
    e = evaluate_segmentation_maps(_maps(prob, [prob, prob]), truth, region, threshold=0.5)
    assert e.auroc_boundary_distance_error == pytest.approx(1.0, abs=0.05)
    assert e.auroc_prob_margin_error == pytest.approx(1.0)
    # The maps' entropy is flat here: it finds nothing the baselines do not.
    assert e.auroc_entropy_error == pytest.approx(0.5)


def test_the_suite_scores_over_the_truths_tissue_and_measures_failure_detection(phantom_svs):
    import dataclasses

    from bridge.eval_report import ensemble_rank, ensemble_vs_members, failure_detection

    e = evaluate_slide_suite(
        phantom_svs,
        pointwise_ensemble(2, input_mpp=2.0),
        sua=SuaParams(),
        pixel_threshold=0.4,
        review={"review_entropy": 1.0, "review_candidate_area_pct": 100.0},
    )
    assert e.seg.tissue_recall > 0.98 and 0.8 < e.seg.tissue_precision <= 1.0
    assert e.truth_positive_area_um2 > 0 and not (e.truth & ~e.region).any()
    assert ensemble_rank(e) == 1 + sum(d > e.seg.dice_ensemble for d in e.seg.dice_members)
    # Four slides by hand: two failed (area off by 50 % and 100 %), caught by entropy but not by MI.
    truth_area = e.truth_positive_area_um2
    slides = [
        dataclasses.replace(e, positive_area_um2=truth_area * f, mean_entropy=h, mean_mi=m, needs_review=r)
        for f, h, m, r in [(1.0, 0.1, 0.9, False), (1.1, 0.2, 0.8, True), (1.5, 0.8, 0.1, True), (2.0, 0.9, 0.2, False)]
    ]
    assert [s.failed() for s in slides] == [False, False, True, True]
    rows = {d["score"]: d for d in failure_detection(slides)}
    assert rows["mean_entropy"]["e_aurc"] == pytest.approx(0.0)
    assert rows["mean_mi"]["aurc"] > rows["mean_mi"]["random_aurc"] > rows["mean_entropy"]["aurc"]
    flag = rows["needs_review"]
    assert (flag["caught"], flag["failures"], flag["false_alarms"], flag["successes"]) == (1, 2, 1, 2)
    versus = ensemble_vs_members(slides)
    assert versus["slides"] == 4 and len(versus["member_mean_dice"]) == 2


@pytest.mark.slow
def test_the_suite_s_review_flag_includes_the_domain_guard_s_reasons_as_pdl1_run_s_does(phantom_svs, tmp_path):
    import dataclasses
    import shutil

    from inference.analysis.domain import stats_of_manifest
    from inference.evaluation.evaluate import evaluate_slide_suite
    from inference.models.ensemble import Ensemble, demo_model_dir
    from inference.models.manifest import read_manifest, write_manifest
    from inference.training.domain_stats import with_domain_stats

    never = {"review_entropy": 1e9, "review_candidate_area_pct": 1e9}
    demo = Ensemble.load(demo_model_dir("seg"), task="segmentation")
    inside = evaluate_slide_suite(phantom_svs, demo, sua=SuaParams(), pixel_threshold=0.4, review=never)
    assert not inside.needs_review  # an in-domain phantom, no other limit reachable
    # The same model with an out-of-domain limit below any score: the slide is flagged for it alone.
    seg = tmp_path / "seg"
    shutil.copytree(demo_model_dir("seg"), seg)
    manifest = read_manifest(seg)
    stats, _ = stats_of_manifest(manifest.extra)
    write_manifest(seg, with_domain_stats(manifest, dataclasses.replace(stats, feature_limit=0.0)))
    strict = Ensemble.load(seg, task="segmentation")
    flagged = evaluate_slide_suite(phantom_svs, strict, sua=SuaParams(), pixel_threshold=0.4, review=never)
    assert flagged.needs_review and flagged.out_of_domain_score >= 0.0


@pytest.mark.slow
def test_with_the_nuclei_the_suite_counts_a_wrong_tps_category_as_a_failure(phantom_svs):
    import dataclasses

    from inference.evaluation.evaluate import evaluate_slide_suite
    from inference.models.ensemble import Ensemble, demo_model_dir

    seg = Ensemble.load(demo_model_dir("seg"), task="segmentation")
    nuclei = Ensemble.load(demo_model_dir("nuclei"), task="nuclei")
    never = {"review_entropy": 1e9, "review_candidate_area_pct": 1e9}
    e = evaluate_slide_suite(phantom_svs, seg, sua=SuaParams(), pixel_threshold=0.4, review=never, nuclei_model=nuclei)
    assert e.tps_truth is not None and e.tps_predicted is not None
    assert abs(e.tps_predicted - e.tps_truth) < 10  # an in-domain phantom: the demo's predicted TPS is close
    assert not e.tps_category_wrong
    # The same slide with its TPS in another category: a failure whatever its positive area.
    moved = dataclasses.replace(e, tps_predicted=0.5 if e.tps_truth >= 1 else 30.0)
    assert moved.tps_category_wrong and moved.failed() and moved.failed(max_area_error=1e9)
    unmeasured = dataclasses.replace(e, tps_predicted=None)
    assert not unmeasured.tps_category_wrong and unmeasured.failed(max_area_error=1e9) is False


class _Interrupt:
    """A provenance value whose writing is interrupted (json's ``default=str`` calls ``str``)."""

    def __str__(self) -> str:
        raise KeyboardInterrupt


def test_a_positive_area_under_a_percent_of_the_tissue_is_judged_against_that_floor(phantom_svs):
    # A TPS-0 slide with a speck called positive failed by an infinite relative error, and a slide whose truth is a
    # few cells by the error of a few more; below 1 % of the truth's tissue the error is now taken over that floor.
    import dataclasses

    review = {"review_entropy": 1.0, "review_candidate_area_pct": 100.0}
    e = evaluate_slide_suite(
        phantom_svs, pointwise_ensemble(2, input_mpp=2.0), sua=SuaParams(), pixel_threshold=0.4, review=review
    )
    assert e.tps_predicted is None  # no nuclei: the area alone decides
    floor_um2 = np.count_nonzero(e.region) * e.maps.mpp**2 / 100
    speck = dataclasses.replace(e, truth_positive_area_um2=0.0, positive_area_um2=0.2 * floor_um2)
    assert speck.positive_area_error == pytest.approx(0.2) and not speck.failed()
    assert dataclasses.replace(speck, positive_area_um2=0.3 * floor_um2).failed()
    few = dataclasses.replace(e, truth_positive_area_um2=0.1 * floor_um2, positive_area_um2=0.3 * floor_um2)
    assert few.positive_area_error == pytest.approx(0.2) and not few.failed()
    # Over the floor the truth's own area counts, as before.
    large = dataclasses.replace(e, truth_positive_area_um2=10 * floor_um2, positive_area_um2=13 * floor_um2)
    assert large.positive_area_error == pytest.approx(0.3) and large.failed()


@pytest.mark.parametrize("where", ["metrics", "provenance"])
def test_an_interrupted_eval_report_leaves_the_earlier_files_whole(phantom_svs, tmp_path, monkeypatch, where):
    # metrics.csv and provenance.json were written in place: an interrupt left a table cut short that still read
    # as complete, or a new table beside the earlier run's provenance.
    import csv
    import dataclasses

    from bridge.eval_report import write_report

    review = {"review_entropy": 1.0, "review_candidate_area_pct": 100.0}
    e = evaluate_slide_suite(
        phantom_svs, pointwise_ensemble(2, input_mpp=2.0), sua=SuaParams(), pixel_threshold=0.4, review=review
    )
    out = tmp_path / "report"
    written = write_report([e], out, provenance={"run": 1})
    before = {written[k]: written[k].read_bytes() for k in ("metrics", "provenance")}
    again = [dataclasses.replace(e, slide="first.svs"), dataclasses.replace(e, slide="second.svs")]
    if where == "metrics":

        def interrupted(self, row):
            if row["slide"] == "second.svs":
                raise KeyboardInterrupt
            return original(self, row)

        original = csv.DictWriter.writerow
        monkeypatch.setattr(csv.DictWriter, "writerow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(again, out, provenance={"run": 2, "late": _Interrupt()} if where == "provenance" else {"run": 2})
    assert {path: path.read_bytes() for path in before} == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_an_interrupted_ihc_table_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    import csv

    from bridge.eval_report import write_report

    written = write_report([], tmp_path, provenance={"run": 1}, ihc_rows=[{"slide": "a.svs", "tps_predicted": 12.0}])
    before = {path: path.read_bytes() for path in written.values()}

    def interrupted(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report([], tmp_path, provenance={"run": 2}, ihc_rows=[{"slide": "a.svs"}, {"slide": "b.svs"}])
    assert {path: path.read_bytes() for path in before} == before and b"a.svs,12.0" in before[written["ihc_metrics"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ihc_metrics.csv", "provenance.json"]


def test_the_eval_report_is_replaced_provenance_last_so_no_file_is_paired_with_a_stale_one(tmp_path, monkeypatch):
    # The new provenance.json was renamed before metrics.csv (an ExitStack's exits run last in, first out): for a
    # moment it stood beside the earlier run's table. ihc_metrics.csv was renamed before either, and a run of IHC
    # slides alone wrote no provenance: its table stood beside the earlier run's provenance for good.
    import json
    import os
    import warnings

    from bridge.eval_report import write_report

    out = tmp_path / "report"
    provenance = out / "provenance.json"
    real = os.replace
    renames = []  # (file renamed into place, the run of the provenance.json beside it then, or None)

    def replace(src, dst):
        renames.append((Path(dst).name, json.loads(provenance.read_text())["run"] if provenance.exists() else None))
        real(src, dst)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no slides: empty legends and histograms
        write_report([], out, provenance={"run": 1})
        monkeypatch.setattr(os, "replace", replace)
        write_report([], out, provenance={"run": 2})
    names = ["metrics.csv", "reliability.png", "risk_coverage.png", "npr_uncertainty_hist.png"]
    assert renames == [*((name, None) for name in names), ("provenance.json", None)]
    assert json.loads(provenance.read_text()) == {"run": 2, "files": sorted(names)}

    renames.clear()
    write_report([], out, provenance={"run": 3}, ihc_rows=[{"slide": "a.svs"}])  # IHC slides alone
    assert renames == [("ihc_metrics.csv", None), ("provenance.json", None)]
    kept = {"run": 2, "files": sorted(names)}  # run 2's metrics.csv and plots, left as they were
    assert json.loads(provenance.read_text()) == {"run": 3, "files": ["ihc_metrics.csv"], "kept_from_earlier_run": kept}


def test_a_run_writing_one_table_keeps_the_provenance_of_the_other_left_there(tmp_path):
    # A run of IHC slides alone (or H&E alone) left the earlier run's other table in the folder, and replaced the
    # provenance.json that said what made it: the table stood there described by nothing.
    import warnings

    from bridge.eval_report import write_report

    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no slides: empty legends and histograms
        write_report([], out, provenance={"run": 1})
    for slide in ("a", "b"):  # the overlays of run 1's slides a and b, as their evaluations would draw them
        (out / f"{slide}_overlay.png").write_bytes(b"\x89PNG")
    he_files = ["metrics.csv", "npr_uncertainty_hist.png", "reliability.png", "risk_coverage.png"]
    first = {"run": 1, "files": ["a_overlay.png", "b_overlay.png", *he_files]}
    (out / "provenance.json").write_text(json.dumps(first))
    (out / "b_overlay.png").unlink()  # a file gone since is not named
    write_report([], out, provenance={"run": 2}, ihc_rows=[{"slide": "c.svs"}])  # IHC slides alone
    assert json.loads((out / "provenance.json").read_text()) == {
        "run": 2,
        "files": ["ihc_metrics.csv"],
        "kept_from_earlier_run": {"run": 1, "files": ["a_overlay.png", *he_files]},
    }

    # H&E again: run 2's IHC table is kept; run 1 is carried on no more, and its a overlay, which no table would
    # describe, goes (it stayed, a picture of a slide the folder no longer reports). A PNG no run listed stays.
    (out / "my notes.png").write_bytes(b"\x89PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report([], out, provenance={"run": 3})
    assert not (out / "a_overlay.png").exists() and (out / "my notes.png").is_file()
    assert json.loads((out / "provenance.json").read_text()) == {
        "run": 3,
        "files": he_files,
        "kept_from_earlier_run": {"run": 2, "files": ["ihc_metrics.csv"]},
    }
    # IHC again: run 3's H&E files are kept, its own kept run (2, whose table is rewritten) is not carried on.
    write_report([], out, provenance={"run": 4}, ihc_rows=[{"slide": "c.svs"}])
    assert json.loads((out / "provenance.json").read_text()) == {
        "run": 4,
        "files": ["ihc_metrics.csv"],
        "kept_from_earlier_run": {"run": 3, "files": he_files},
    }
    # IHC yet again: run 3's H&E files are still described, through run 4's kept one.
    write_report([], out, provenance={"run": 5}, ihc_rows=[{"slide": "c.svs"}])
    assert json.loads((out / "provenance.json").read_text())["kept_from_earlier_run"] == {
        "run": 3,
        "files": he_files,
    }


@pytest.mark.parametrize("second", ["he", "both"])
def test_a_run_rewriting_every_table_there_keeps_no_earlier_provenance(phantom_svs, tmp_path, second):
    # H&E after H&E (no IHC table there), or both tables: nothing earlier is carried, not even for the overlay of
    # a slide the second run left out.
    from bridge.eval_report import write_report

    review = {"review_entropy": 1.0, "review_candidate_area_pct": 100.0}
    e = evaluate_slide_suite(
        phantom_svs, pointwise_ensemble(2, input_mpp=2.0), sua=SuaParams(), pixel_threshold=0.4, review=review
    )
    out = tmp_path / "report"
    write_report([e], out, provenance={"run": 1}, ihc_rows=[{"slide": "c.svs"}] if second == "both" else None)
    (out / "a_overlay.png").write_bytes(b"\x89PNG")  # as if run 1 had a slide a, which run 2 leaves out
    written = write_report([e], out, provenance={"run": 2}, ihc_rows=[{"slide": "c.svs"}] if second == "both" else None)
    files = sorted(p.name for key, p in written.items() if key != "provenance")
    assert json.loads(written["provenance"].read_text()) == {"run": 2, "files": files}
    assert ("ihc_metrics.csv" in files) == (second == "both") and "p1_overlay.png" in files


def test_a_table_left_there_without_an_earlier_provenance_is_warned_of(tmp_path, caplog):
    from bridge.eval_report import write_report

    (tmp_path / "metrics.csv").write_text("slide\n")  # e.g. a provenance.json deleted by hand
    with caplog.at_level("WARNING", logger="bridge.eval_report"):
        written = write_report([], tmp_path, provenance={"run": 1}, ihc_rows=[{"slide": "c.svs"}])
    assert json.loads(written["provenance"].read_text()) == {"run": 1, "files": ["ihc_metrics.csv"]}
    assert "metrics.csv, an earlier run's, is left as it is, but no provenance says what made it" in caplog.text


def test_an_interrupted_plot_leaves_the_earlier_png_whole(tmp_path, monkeypatch):
    # The PNGs of eval, train and run reports were saved straight under their names: an interrupt (or a full disk)
    # left a picture cut short in place of the earlier whole one.
    import warnings

    from matplotlib.figure import Figure

    from bridge.eval_report import write_report

    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no slides: empty legends and histograms
        written = write_report([], out)
        before = written["reliability"].read_bytes()
        assert before.startswith(b"\x89PNG")

        def cut_short(self, fname, **kwargs):
            if hasattr(fname, "write"):
                fname.write(before[:100])
            else:
                Path(fname).write_bytes(before[:100])
            raise KeyboardInterrupt

        monkeypatch.setattr(Figure, "savefig", cut_short)
        with pytest.raises(KeyboardInterrupt):
            write_report([], out)
    assert written["reliability"].read_bytes() == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_a_run_keeping_the_ihc_table_of_a_run_of_both_keeps_none_of_its_h_and_e_files(tmp_path):
    # helper-136: after a run of both stains, an H&E run kept the earlier run under the IHC table with its H&E
    # overlay of a slide no table reports, which stayed.
    import warnings

    from bridge.eval_report import write_report

    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no slides: empty legends and histograms
        write_report([], out, provenance={"run": 1}, ihc_rows=[{"slide": "c.svs"}])
    (out / "a_overlay.png").write_bytes(b"\x89PNG")
    first = json.loads((out / "provenance.json").read_text())
    first["files"] = sorted([*first["files"], "a_overlay.png"])  # as if run 1 had scored an H&E slide a
    (out / "provenance.json").write_text(json.dumps(first))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report([], out, provenance={"run": 2})  # H&E again, no slide a
    record = json.loads((out / "provenance.json").read_text())
    assert record["kept_from_earlier_run"] == {"run": 1, "files": ["ihc_metrics.csv"]}
    assert not (out / "a_overlay.png").exists()


def test_a_fitted_positive_area_limit_is_said_to_flag_every_slide_rightly_called_negative():
    # Fitted on phantoms of TPS 0.5-90 %, "predicted positive area <= 0.43 %" flagged 34 of 34 correct TPS-0
    # phantoms; the calibration said nothing of it.
    from inference.evaluation.evaluate import NEVER_BELOW, _negatives_note

    def row(name, failed, positive_pct):
        return (name, 0.05, 0.0, 0.1, failed, positive_pct, False, False, False, None, None, False)

    rows = [row("negative", False, 0.0), row("missed", True, 0.2), row("positive", False, 5.0)]
    note = _negatives_note(rows, 0.43)
    assert "(0.43 % of the tissue) flags every slide called negative, correct ones too" in note
    assert "1 of the 3 validation slides are such" in note and "--tps 0" in note
    assert _negatives_note(rows, NEVER_BELOW) == ""
