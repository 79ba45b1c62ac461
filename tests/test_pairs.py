"""Pairing a case's H&E with its PD-L1 IHC, and comparing prediction with measurement on the H&E."""

from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from bridge.pairs import CaseImage, FailedImage, case_of, pair_cases
from inference.analysis.pairs import compare_pair


def _image(name: str, stain: str, case: str | None, *, stated: bool = False) -> CaseImage:
    return CaseImage(
        name, name, Path(name), case, stain, Path(f"{name}.json"), Path(f"{name}.geojson"), 0.5, case_in_metadata=stated
    )


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("B12_HE.svs", "B12"),
        ("B12-H&E.tif", "B12"),
        ("B12 PD-L1.ndpi", "B12"),
        ("b12_pdl1.svs", "b12"),
        ("B12_22C3.svs", "B12"),
        ("B12.ihc.svs", "B12"),
        ("ihc_231.svs", "231"),
        ("HE_B12.svs", "B12"),
        ("HE.svs", None),
        ("slide_7.svs", None),
        ("theory.svs", None),
    ],
)
def test_the_case_comes_from_the_file_name_without_its_stain_word(name, case):
    assert case_of(name, None) == case


def test_the_case_metadata_wins_over_the_file_name():
    assert case_of("B12_HE.svs", {"case": "patient 4"}) == "patient 4"
    assert case_of("B12_HE.svs", {"case": ""}) == "B12"
    assert case_of("B12_HE.svs", {"block": "X"}, key="block") == "X"


def test_a_case_pairs_one_he_with_one_ihc_and_says_why_it_cannot_otherwise():
    images = [
        _image("A_HE.svs", "H&E", "A"),
        _image("A_PDL1.svs", "H-DAB", "A"),
        _image("B_HE.svs", "H&E", "B"),
        _image("B2_HE.svs", "H&E", "B"),
        _image("B_PDL1.svs", "H-DAB", "B"),
        _image("C_HE.svs", "H&E", "C"),
        _image("loose.svs", "H&E", None),
    ]
    pairs, problems = pair_cases(images)
    assert list(pairs) == ["A"]
    assert [p.name for p in pairs["A"]] == ["A_HE.svs", "A_PDL1.svs"]
    assert "case 'B' has 2 H&E and 1 PD-L1 IHC images" in problems["B"]
    assert "C" not in problems and None not in problems  # one stain only: no pair was meant


def test_compare_pair_measures_agreement_and_where_the_uncertainty_is():
    area = box(0, 0, 1000, 1000)
    he_positive = box(0, 0, 500, 1000)  # left half predicted positive
    # IHC positive cells fill the left half up to x = 700: the strip 500-700 is where they disagree.
    xs, ys = np.meshgrid(np.arange(10, 700, 10.0), np.arange(10, 1000, 10.0))
    cells = np.column_stack([xs.ravel(), ys.ravel()])
    boxes = np.array([[x, y, x + 100, y + 100] for y in range(0, 1000, 100) for x in range(0, 1000, 100)], float)
    centre_x = boxes[:, 0] + 50
    entropy = np.where((centre_x > 500) & (centre_x < 700), 0.6, 0.1)
    c = compare_pair(
        he_positive=he_positive,
        ihc_positive_xy_on_he=cells,
        compared_area=area,
        mpp_he=0.5,
        tile_boxes=boxes,
        tile_entropy=entropy,
        tps_he_predicted=50.0,
        tps_ihc=70.0,
        cell_radius_um=8.0,
    )
    assert c.positive_area_he_um2 == pytest.approx(500 * 1000 * 0.25)
    assert c.positive_area_ihc_um2 == pytest.approx(716 * 1000 * 0.25, rel=0.02)  # up to x = 700 + 16 px
    assert c.dice == pytest.approx(2 * 500 / (500 + 716), rel=0.02)
    assert c.tps_difference == -20.0
    assert c.tiles_disagree == 20 and c.tiles_agree == 80
    assert c.entropy_disagree == pytest.approx(0.6) and c.entropy_agree == pytest.approx(0.1)
    assert c.uncertainty_higher_where_they_disagree


def test_compare_pair_counts_only_the_compared_area_and_handles_an_empty_ihc():
    c = compare_pair(
        he_positive=Polygon(),
        ihc_positive_xy_on_he=np.zeros((0, 2)),
        compared_area=box(0, 0, 10, 10),
        mpp_he=1.0,
        tile_boxes=np.zeros((0, 4)),
        tile_entropy=np.zeros(0),
        tps_he_predicted=None,
        tps_ihc=0.0,
    )
    assert c.dice is None and c.tps_difference is None and c.uncertainty_higher_where_they_disagree is None
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        compare_pair(
            he_positive=Polygon(),
            ihc_positive_xy_on_he=np.zeros(4),
            compared_area=box(0, 0, 10, 10),
            mpp_he=1.0,
            tile_boxes=np.zeros((0, 4)),
            tile_entropy=np.zeros(0),
            tps_he_predicted=None,
            tps_ihc=None,
        )


@pytest.mark.parametrize(
    ("predicted", "measured", "cutoff"),
    [(45.0, 0.5, 1.0), (0.2, 3.0, 1.0), (60.0, 30.0, 50.0), (0.5, 80.0, 1.0)],
)
def test_a_case_whose_prediction_is_in_another_tps_category_than_its_ihc_needs_review(predicted, measured, cutoff):
    from inference.analysis.pairs import PairComparison

    c = PairComparison(predicted, measured, 0.0, 0.0, None, None, None, 0, 0)
    (reason,) = c.review_reasons()
    assert reason["value"] == pytest.approx(predicted - measured) and reason["limit"] == cutoff
    assert reason["reason"].startswith("H&E-predicted TPS category")


@pytest.mark.parametrize(("predicted", "measured"), [(40.0, 2.0), (0.1, 0.9), (55.0, 99.0), (None, 20.0), (3.0, None)])
def test_a_case_in_the_same_tps_category_or_without_a_tps_has_no_reason(predicted, measured):
    from inference.analysis.pairs import PairComparison

    assert PairComparison(predicted, measured, 0.0, 0.0, None, None, None, 0, 0).review_reasons() == []


def test_a_case_whose_ihc_was_flagged_in_its_run_names_why_its_reference_is_in_doubt():
    from bridge.pairs import ihc_review_reasons

    flagged = {
        "uncertainty_flag": True,
        "details": {"review_reasons": [{"reason": "nuclei uncertainty", "value": 0.7, "limit": 0.61}]},
    }
    (reason,) = ihc_review_reasons(flagged)
    assert reason["reason"] == "the IHC's own analysis needs review, so it is no sure reference (nuclei uncertainty)"
    assert reason["value"] is None and reason["limit"] is None
    assert ihc_review_reasons({"uncertainty_flag": False, "details": {"review_reasons": []}}) == []
    assert ihc_review_reasons({"uncertainty_flag": True})[0]["reason"].endswith("(flagged)")


def test_a_case_spelt_with_other_capitals_or_blanks_is_one_case():
    # 'B12' on the H&E and 'b12 ' typed into the IHC's metadata were two cases of one stain each: no pair and
    # no word about it.
    assert case_of("x.svs", {"case": " B12 "}) == "B12"
    assert case_of("B12_HE.svs", {"case": "  "}) == "B12"
    pairs, problems = pair_cases(
        [_image("x_PDL1.svs", "H-DAB", "b12 "), _image("x_HE.svs", "H&E", "B12"), _image("y_HE.svs", "H&E", "C")]
    )
    assert list(pairs) == ["B12"]  # named as its first image by name (x_HE.svs) spells it
    assert [p.name for p in pairs["B12"]] == ["x_HE.svs", "x_PDL1.svs"]
    assert problems == {}


def test_a_case_one_of_whose_images_failed_says_so_instead_of_vanishing():
    # A corrupt IHC in the batch: its H&E was analysed, and the case was left out of pairs.json without a word
    # (one stain only), as an H&E-only study is. A failed image's stain is unknown, so no pair of the case is
    # sure either: a case of H&E, IHC and a failed third image is not compared as if the third were not there.
    images = [
        _image("G7_HE.svs", "H&E", "G7"),
        _image("H8_HE.svs", "H&E", "H8"),
        _image("H8_IHC.svs", "H-DAB", "H8"),
        _image("K9_HE.svs", "H&E", "K9"),
        _image("K9_IHC.svs", "H-DAB", "K9"),
    ]
    failed = [FailedImage("G7_IHC.svs", "g7"), FailedImage("H8_IHC2.svs", "H8"), FailedImage("solo.svs", "Z1")]
    pairs, problems = pair_cases(images, failed)
    assert list(pairs) == ["K9"]
    assert problems["G7"] == (
        "case 'G7' is not compared: the run failed on G7_IHC.svs (its error is in the run's table and status.json), "
        "so the case is incomplete (analysed: G7_HE.svs (H&E)); fix it and run again (--resume analyses only the "
        "images not done)"
    )
    assert "the run failed on H8_IHC2.svs" in problems["H8"]
    assert set(problems) == {"G7", "H8"}  # a case with nothing analysed has nothing to compare
    assert list(pair_cases(images)[0]) == ["H8", "K9"]  # as before when nothing failed


@pytest.mark.parametrize("stated", [True, False])
def test_a_case_stated_in_the_metadata_without_a_partner_is_named_and_one_from_a_file_name_is_not(stated):
    # A user trial: the H&E F6_HE carries case=F6 in QuPath, its IHC's case was misspelt (F6x) or not set (so it
    # fell back to its file name, or to none); the pathologist's pairing found no partner and nothing said so.
    # ``stated=False`` is a project where no entry carries the key: one-stain cases of file names stay silent.
    images = [
        _image("F6_HE.svs", "H&E", "F6", stated=stated),
        _image("F6_PDL1.svs", "H-DAB", "F6x", stated=stated),
        _image("G7_HE.svs", "H&E", "G7"),  # named by its file name only: an H&E-only case, silent
        _image("slide7.svs", "H-DAB", None),
        _image("A_HE.svs", "H&E", "A", stated=stated),
        _image("A_PDL1.svs", "H-DAB", "A", stated=stated),
    ]
    pairs, problems = pair_cases(images)
    assert list(pairs) == ["A"]
    if not stated:
        assert problems == {}
        return
    assert problems == {
        "F6": "case 'F6' is not compared: only an H&E (F6_HE.svs) carries case=F6 (entry metadata); no PD-L1 IHC "
        "entry does: check the IHC's `case` value in QuPath (Project > Edit metadata)",
        "F6x": "case 'F6x' is not compared: only a PD-L1 IHC (F6_PDL1.svs) carries case=F6x (entry metadata); no "
        "H&E entry does: check the H&E's `case` value in QuPath (Project > Edit metadata)",
    }


def test_a_stated_case_of_one_stain_is_named_once_with_all_its_images_and_not_in_a_run_of_one_stain():
    images = [_image("F6_HE.svs", "H&E", "F6", stated=True), _image("F6_HE2.svs", "H&E", "f6")]
    assert pair_cases(images) == ({}, {})  # an H&E-only run: no IHC whose case could be wrong
    pairs, problems = pair_cases([*images, _image("slide7.svs", "H-DAB", None)])
    assert pairs == {} and list(problems) == ["F6"]
    assert "only H&E images (F6_HE.svs, F6_HE2.svs) carry case=F6 (entry metadata)" in problems["F6"]
