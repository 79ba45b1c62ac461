"""Pairing a case's H&E with its PD-L1 IHC, and comparing prediction with measurement on the H&E."""

from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from bridge.pairs import CaseImage, FailedImage, case_of, pair_cases
from inference.analysis.pairs import compare_pair


def _image(name: str, stain: str, case: str | None, *, stated: bool = False, doubt: str | None = None) -> CaseImage:
    return CaseImage(
        name,
        name,
        Path(name),
        case,
        stain,
        Path(f"{name}.json"),
        Path(f"{name}.geojson"),
        0.5,
        case_in_metadata=stated,
        stain_doubt=doubt,
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
        # A stain and its clone, as labs name them: both words go.
        ("S22-1234 A1 PD-L1 22C3.svs", "S22-1234 A1"),
        ("S22-1234 A1 H&E.svs", "S22-1234 A1"),
        ("B12_PD-L1_SP263.svs", "B12"),
        ("B12_pd_l1.svs", "B12"),
        ("B12_H_E.svs", "B12"),
        ("B12_HES.svs", "B12"),
        ("IHC_PD-L1_B12.svs", "B12"),
        # OME-TIFF, as QuPath exports a server's image (helper-134: 'B7_HE.ome' matched no stain word).
        ("B7_HE.ome.tif", "B7"),
        ("B7_PD-L1.OME.TIFF", "B7"),
        ("HE.svs", None),
        ("slide_7.svs", None),
        ("theory.svs", None),
    ],
)
def test_the_case_comes_from_the_file_name_without_its_stain_words(name, case):
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


def test_a_case_typed_in_other_unicode_spellings_of_one_letter_is_one_case():
    # 'Café-7' typed on one entry and 'café-7' with a combining accent (as macOS writes names) on the other read
    # as two cases, each "only an H&E" / "only a PD-L1 IHC", looking alike in the table.
    pairs, problems = pair_cases(
        [_image("a.svs", "H&E", "Café-7", stated=True), _image("b.svs", "H-DAB", "cafe\u0301-7\u00a0", stated=True)]
    )
    assert list(pairs) == ["Café-7"] and problems == {}


def test_a_case_of_file_names_with_two_images_says_to_rename_them_and_a_doubtful_stain_is_named():
    # Plain slides have no metadata: "give each case its own 'case' metadata value" was a fix they cannot follow.
    # An H&E typed H-DAB in QuPath beside its IHC made a case of two IHCs, which vanished without a word.
    doubt = "B12_HE.svs was analysed as H-DAB (QuPath's image type BRIGHTFIELD_H_DAB), but its colour says H&E"
    pairs, problems = pair_cases(
        [
            _image("A_HE.svs", "H&E", "A"),
            _image("A_IHC.svs", "H-DAB", "A"),
            _image("A_PD-L1.svs", "H-DAB", "A"),
            _image("B12_HE.svs", "H-DAB", "B12", doubt=doubt),
            _image("B12_PD-L1.svs", "H-DAB", "B12"),
            _image("C_HE.svs", "H&E", "C"),
        ]
    )
    assert pairs == {}
    assert problems["A"].endswith(
        "a pair is one of each: the case comes from the file names (without their stain words): rename the files so "
        "that each case has one H&E and one IHC, or, in a QuPath project, give each entry a 'case' metadata value"
    )
    assert problems["B12"] == (
        "case 'B12' has 2 PD-L1 IHC images analysed (B12_HE.svs, B12_PD-L1.svs) and no H&E; a pair is one of each: "
        # One image of a case: --stain would state its partner's stain too (it was offered as the fix).
        f"{doubt}: if a stain is wrong, set that image's type in QuPath (Image tab: Image type; plain slides have "
        "none: analyse them as entries of a QuPath project) and run again; --stain would state every image's stain, "
        "its partner's too"
    )
    assert "C" not in problems  # one image of one stain: an H&E-only case, silent as before


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


# TMA cores of a case, compared one by one. Rows as bridge.run writes them into each image's summary.json
# (``targets``): analysed_row from a result, missing_row for a core marked missing, through rows_to_json.


def _result(positive: int, negative: int, *, stain: str = "H&E", reasons: tuple[str, ...] = ()):
    from types import SimpleNamespace

    from inference import tumour_proportion_score

    return SimpleNamespace(
        tps=tumour_proportion_score(positive, negative),
        cps=None,
        stain=stain,
        uncertainty_flag=bool(reasons),
        summary={"review_reasons": [{"reason": r, "value": 1.0, "limit": 0.5} for r in reasons]},
    )


def _summary(image: str, cores: dict, *, stain: str = "H&E") -> dict:
    """A summary.json's ``targets`` of a TMA: ``cores`` maps a name to (positive, negative) tumour cells, with
    review reasons as a third item, or to None for a core marked missing."""
    from bridge.targets import analysed_row, missing_row, rows_to_json

    rows = [
        missing_row(image, "1", name)
        if cells is None
        else analysed_row(image, "1", name, "TMA core", _result(*cells[:2], stain=stain, reasons=cells[2:]))
        for name, cells in cores.items()
    ]
    return {"image": image, "stain": stain, "targets": rows_to_json(rows)}


def _row_as(summary: dict, target: str, target_type: str):
    """The summary's first target row, renamed and retyped (a whole image's row: "PD-L1 analysis", "whole image")."""
    from dataclasses import replace

    from bridge.targets import rows_from_summary

    return replace(rows_from_summary(summary)[0], target=target, target_type=target_type)


def _cores(he: dict, ihc: dict):
    from bridge.pairs import case_cores

    return case_cores(_summary("he.svs", he), _summary("ihc.svs", ihc, stain="H-DAB"), he_name="he.svs",
                      ihc_name="ihc.svs")  # fmt: skip


# 12 cores, H&E (rows) against IHC (columns) over <1 %, 1-49 %, >=50 %:
#   [[3, 1, 0], [1, 4, 1], [0, 0, 2]]; row sums 4, 6, 2; column sums 4, 5, 3.
# p_o = 9/12, p_e = (4*4 + 6*5 + 2*3)/144 = 52/144, kappa = (108 - 52) / (144 - 52) = 14/23.
_KAPPA_PAIRS = (
    [((0, 200), (1, 300))] * 3  # <1 % on both
    + [((0, 200), (20, 180))]  # <1 % against 1-49 %
    + [((10, 190), (0, 400))]  # 1-49 % against <1 %
    + [((60, 140), (80, 120))] * 4  # 1-49 % on both
    + [((60, 140), (150, 50))]  # 1-49 % against >=50 %
    + [((180, 20), (190, 10))] * 2  # >=50 % on both
)


def test_cohens_kappa_over_the_three_categories_is_the_hand_computed_one():
    from bridge.pairs import TPS_CATEGORIES, cohen_kappa, core_agreement

    assert TPS_CATEGORIES == ("<1%", "1-49%", ">=50%")
    he = {f"A-{i}": h for i, (h, _) in enumerate(_KAPPA_PAIRS, 1)}
    ihc = {f"A-{i}": i_ for i, (_, i_) in enumerate(_KAPPA_PAIRS, 1)}
    record, cores = _cores(he, ihc)
    agreement = core_agreement(cores)
    assert (agreement.compared, agreement.categories_agree) == (12, 9)
    assert agreement.category_agreement == pytest.approx(0.75)
    assert agreement.cohen_kappa == pytest.approx(14 / 23)
    assert record["cores_summary"]["cohen_kappa"] == pytest.approx(14 / 23) and record["cores_summary"]["notes"] == []
    # Symmetric in the two ratings, and perfect agreement is 1.
    assert cohen_kappa([c.category_ihc for c in cores], [c.category_he for c in cores], categories=TPS_CATEGORIES) == (
        pytest.approx(14 / 23)
    )
    assert cohen_kappa(["<1%", "1-49%", ">=50%"], ["<1%", "1-49%", ">=50%"], categories=TPS_CATEGORIES) == 1.0
    with pytest.raises(ValueError, match=r"expected two ratings of the same items, got 2 and 1"):
        cohen_kappa(["<1%", "<1%"], ["<1%"], categories=TPS_CATEGORIES)
    with pytest.raises(ValueError, match=r"expected categories among \['<1%', '1-49%', '>=50%'\], got \['50%'\]"):
        cohen_kappa(["<1%"], ["50%"], categories=TPS_CATEGORIES)


def test_tied_tps_take_their_mean_rank_and_the_differences_are_h_and_e_minus_ihc():
    from bridge.pairs import core_agreement

    # TPS H&E 0, 0, 10, 20, 30 (ranks 1.5, 1.5, 3, 4, 5); IHC 0, 5, 5, 40, 60 (ranks 1, 2.5, 2.5, 4, 5):
    # rho = 8.75 / sqrt(9.5 * 9.5). Each core has 1000 tumour cells.
    he = {"A-1": (0, 1000), "A-2": (0, 1000), "A-3": (100, 900), "A-4": (200, 800), "A-5": (300, 700)}
    ihc = {"A-1": (0, 1000), "A-2": (50, 950), "A-3": (50, 950), "A-4": (400, 600), "A-5": (600, 400)}
    _, cores = _cores(he, ihc)
    agreement = core_agreement(cores)
    assert agreement.spearman_rho == pytest.approx(8.75 / 9.5)
    x, y = np.array([0, 0, 10, 20, 30.0]), np.array([0, 5, 5, 40, 60.0])
    assert agreement.pearson_r == pytest.approx(
        np.sum((x - 12) * (y - 22)) / np.sqrt(np.sum((x - 12) ** 2) * np.sum((y - 22) ** 2))
    )
    assert agreement.mean_abs_tps_difference == pytest.approx((0 + 5 + 5 + 20 + 30) / 5)
    assert agreement.mean_tps_difference == pytest.approx((0 - 5 + 5 - 20 - 30) / 5)
    # <1 % / <1 %, <1 % / 1-49 %, 1-49 % on both (10 and 5), 1-49 % / 1-49 % (20, 40), 1-49 % / >=50 % (30, 60).
    assert [c.categories_agree for c in cores] == [True, False, True, True, False]


def test_cores_all_of_one_category_agree_wholly_but_give_no_kappa_and_say_why():
    from bridge.pairs import core_agreement

    he = {f"A-{i}": (10 * i, 200) for i in range(1, 6)}  # 4.8-20 %
    ihc = {f"A-{i}": (5 * i, 200) for i in range(1, 6)}  # 2.4-11 %
    _, cores = _cores(he, ihc)
    agreement = core_agreement(cores)
    assert (agreement.compared, agreement.categories_agree, agreement.category_agreement) == (5, 5, 1.0)
    assert agreement.cohen_kappa is None
    assert agreement.notes == (
        "kappa is undefined: every compared core is 1-49% on both images, so chance alone agrees on all of them",
    )
    assert agreement.spearman_rho == pytest.approx(1.0)
    # One category on the IHC only: kappa is defined (0, no better than chance), however the H&E varies.
    ihc_flat = {name: (50, 150) for name in ihc}
    he_varied = {"A-1": (0, 300), "A-2": (1, 299), "A-3": (50, 150), "A-4": (200, 100), "A-5": (280, 20)}
    agreement = core_agreement(_cores(he_varied, ihc_flat)[1])
    assert agreement.cohen_kappa == pytest.approx(0.0) and agreement.categories_agree == 1
    assert agreement.spearman_rho is None and agreement.notes == (
        "the correlations are undefined: the TPS is the same in every compared core of one image",
    )


def test_grids_with_no_name_in_common_compare_no_core_and_say_to_label_them_alike():
    from bridge.pairs import core_agreement

    record, cores = _cores({"A-1": (10, 200), "A-2": (30, 200)}, {"1": (10, 200), "2": (30, 200)})
    assert [(c.core, c.state_he, c.state_ihc, c.compared) for c in cores] == [
        ("A-1", "analysed", "absent", False),
        ("A-2", "analysed", "absent", False),
        ("1", "absent", "analysed", False),
        ("2", "absent", "analysed", False),
    ]
    assert cores[0].tps_he_predicted == pytest.approx(100 * 10 / 210) and cores[0].tps_ihc is None
    agreement = core_agreement(cores)
    assert (agreement.cores, agreement.compared, agreement.not_compared) == (4, 0, 4)
    assert agreement.category_agreement is None and agreement.mean_abs_tps_difference is None
    assert agreement.notes == (
        "no core compared: no core name is in both grids; dearray both sections with the same labels (QuPath: TMA > "
        "Relabel TMA grid)",
    )
    assert record["cores_summary"]["compared"] == 0 and len(record["cores"]) == 4


def test_missing_and_small_cores_are_listed_not_counted_and_a_flagged_one_is_counted_and_marked():
    record, cores = _cores(
        {"A-1": (30, 170), "A-2": (5, 300), "B-1": (2, 40), "B-2": (20, 180, "nuclei uncertainty"), "C-1": None},
        {"A-1": (40, 160), "A-2": None, "B-1": (10, 290), "B-2": (30, 170), "C-1": None},
    )
    by = {c.core: c for c in cores}
    assert by["A-2"].why_not_compared == "marked missing in the IHC's grid" and by["A-2"].state_ihc == "missing"
    assert by["A-2"].tps_he_predicted == pytest.approx(100 * 5 / 305) and by["A-2"].category_ihc is None
    assert by["C-1"].why_not_compared == "marked missing in the H&E's grid; marked missing in the IHC's grid"
    # Under 100 tumour cells the TPS is undefined: listed with its numbers, not counted.
    assert not by["B-1"].compared and by["B-1"].tumour_cells_he == 42 and by["B-1"].tps_ihc == pytest.approx(10 / 3)
    assert by["B-1"].why_not_compared == "42 tumour cells on the H&E, under 100: its TPS is undefined"
    assert (by["B-1"].category_he, by["B-1"].category_ihc) == ("insufficient tumour cells", "1-49%")
    # Flagged on one side: counted (its TPS is defined) and marked.
    assert by["B-2"].compared and by["B-2"].needs_review
    assert by["B-2"].review_reasons == ("H&E: nuclei uncertainty (1, limit 0.5)",)
    summary = record["cores_summary"]
    assert (summary["cores"], summary["compared"], summary["compared_needing_review"]) == (5, 2, 1)
    assert summary["notes"] == ["2 cores compared: kappa and the correlations need at least 5"]
    assert [c["core"] for c in record["cores"]] == ["A-1", "A-2", "B-1", "B-2", "C-1"]
    assert record["cores"][0]["tps_difference"] == pytest.approx(15.0 - 20.0)


def test_a_core_named_twice_in_one_grid_is_not_compared_and_the_others_are():
    from dataclasses import replace

    from bridge.pairs import match_cores
    from bridge.targets import rows_from_summary

    he = rows_from_summary(_summary("he.svs", {"A-1": (30, 170), "A-3": (50, 150), "A-2": (40, 160)}))
    he[1] = replace(he[1], target="A-1 ")  # relabelled by hand into a second A-1
    ihc = rows_from_summary(_summary("ihc.svs", {"A-1": (30, 170), "A-2": (40, 160)}, stain="H-DAB"))
    cores = match_cores(he, ihc)
    assert [(c.core, c.compared, c.tps_he_predicted) for c in cores] == [("A-1", False, None), ("A-2", True, 20.0)]
    assert cores[0].why_not_compared == (
        "2 cores of the H&E's grid are named 'A-1': which to compare is unknown; name each core of a grid once "
        "(QuPath: TMA > Relabel TMA grid)"
    )


def test_a_case_analysed_core_by_core_on_one_side_only_says_how_the_other_was_analysed():
    from bridge.pairs import case_cores
    from bridge.targets import rows_to_json

    tma = _summary("he.svs", {"A-1": (30, 170)})
    whole = {"targets": rows_to_json([_row_as(tma, "PD-L1 analysis", "whole image")])}
    record, cores = case_cores(tma, whole, he_name="he.svs", ihc_name="ihc.svs")
    assert cores == () and list(record) == ["why_cores_not_compared"]
    assert record["why_cores_not_compared"].startswith(
        "only the H&E (he.svs) was analysed core by core; ihc.svs was analysed whole: its TMA grid, if it has one, "
        "was not seen (`pdl1 run` without QuPath analyses whole images, and so did --engine ray through QuPath "
        "before 2026-12-06)"
    )
    record, _ = case_cores({"image": "old.svs"}, tma, he_name="old.svs", ihc_name="ihc.svs")
    assert record["why_cores_not_compared"] == (
        "only the IHC (ihc.svs) was analysed core by core; old.svs was analysed by an earlier version, whose summary "
        "lists no targets: run the image again (`pdl1 run PROJECT` without --resume)"
    )
    assert case_cores(whole, whole, he_name="a", ihc_name="b") == ({}, ())  # no TMA: the record is as it was


def test_cores_are_compared_where_the_whole_slides_cannot_be_and_an_earlier_runs_core_table_goes(tmp_path):
    # The cores need only the two summaries: a case whose slides cannot be registered (here: gone since the run)
    # still gets its cores, in pairs.json and pairs_cores.csv. A later run without TMA cases removes that table.
    import csv
    import json

    from bridge.pairs import CORES_FILE, write_pair_comparisons
    from bridge.targets import rows_to_json

    def image(name: str, stain: str, summary: dict) -> CaseImage:
        path = tmp_path / f"{name}.summary.json"
        path.write_text(json.dumps(summary))
        return CaseImage(name, name, tmp_path / name, "T1", stain, path, tmp_path / f"{name}.geojson", 0.5)

    he = image("T1_HE.svs", "H&E", _summary("T1_HE.svs", {"A-1": (30, 170), "A-2": (1, 300)}))
    ihc = image("T1_IHC.svs", "H-DAB", _summary("T1_IHC.svs", {"A-1": (40, 160), "A-2": None}, stain="H-DAB"))
    path = write_pair_comparisons([he, ihc], tmp_path)
    case = json.loads(path.read_text())["cases"]["T1"]
    assert "T1_HE.svs" in case["why_not_compared"]  # the slide is not there: no registration, no whole comparison
    assert [(c["core"], c["compared"]) for c in case["cores"]] == [("A-1", True), ("A-2", False)]
    assert case["cores_summary"]["categories_agree"] == 1
    with (tmp_path / "pdl1" / CORES_FILE).open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["case"], r["core"], r["tps_he_predicted"], r["tps_ihc"], r["tps_difference"]) for r in table] == [
        ("T1", "A-1", "15.0", "20.0", "-5.0"),
        ("T1", "A-2", f"{100 / 301:.1f}", "", ""),
    ]
    assert sorted(p.name for p in (tmp_path / "pdl1").iterdir()) == ["pairs.json", CORES_FILE]  # no .part left

    row = _row_as(_summary("x.svs", {"A-1": (30, 170)}), "PD-L1 analysis", "whole image")
    whole = {"targets": rows_to_json([row])}  # run again without QuPath: whole images
    he.summary_path.write_text(json.dumps(whole))
    ihc.summary_path.write_text(json.dumps(whole))
    write_pair_comparisons([he, ihc], tmp_path)
    assert not (tmp_path / "pdl1" / CORES_FILE).exists()
    assert "cores" not in json.loads(path.read_text())["cases"]["T1"]


def test_a_summary_whose_targets_do_not_read_says_so_in_its_case_instead_of_ending_the_run(tmp_path):
    # pdl1 run's targets.csv warns of such a summary and goes on; the pairs after it raised, and the run ended in a
    # traceback with no pairs.json.
    import json

    from bridge.pairs import write_pair_comparisons

    def image(name: str, stain: str, summary: dict) -> CaseImage:
        path = tmp_path / f"{name}.summary.json"
        path.write_text(json.dumps(summary))
        return CaseImage(name, name, tmp_path / name, "T1", stain, path, tmp_path / f"{name}.geojson", 0.5)

    damaged = _summary("T1_HE.svs", {"A-1": (30, 170)})
    damaged["targets"][0]["outline"] = {"type": "Polygon"}  # no coordinates
    he = image("T1_HE.svs", "H&E", damaged)
    ihc = image("T1_IHC.svs", "H-DAB", _summary("T1_IHC.svs", {"A-1": (40, 160)}, stain="H-DAB"))
    path = write_pair_comparisons([he, ihc], tmp_path)
    case = json.loads(path.read_text())["cases"]["T1"]
    assert case["why_cores_not_compared"].startswith(
        "a summary's targets do not read: the outline of target 'A-1' is not a GeoJSON geometry ("
    )
    assert "cores" not in case


def test_an_images_stain_is_in_doubt_where_its_colour_says_another_or_told_it_weakly():
    from bridge.pairs import stain_doubt

    def summary(stain, colour, source="", reasons=()):
        details = {"stain_from_colour": {"stain": colour, "margin_deg": 30.6}, "review_reasons": list(reasons)}
        return {"stain": stain, "stain_source": source, "details": details}

    typed = summary("H&E", "H-DAB", "QuPath's image type BRIGHTFIELD_H_E")
    assert stain_doubt("x2.svs", typed) == (
        "x2.svs was analysed as H&E (QuPath's image type BRIGHTFIELD_H_E), but its colour says H-DAB"
    )
    weak = summary("H-DAB", "H-DAB", reasons=[{"reason": "stain told from the colour (H-DAB) by a weak margin"}])
    assert stain_doubt("y.svs", weak) == "y.svs's stain (H-DAB) was told from its colour by a weak margin"
    assert stain_doubt("z.svs", summary("H&E", "H&E")) is None
    assert stain_doubt("old.svs", {"stain": "H&E", "details": {}}) is None  # no colour reading: no doubt
