"""PD-L1 IHC scoring: DAB unmixing, membrane rings, grades, CPS, H-score, and the QuPath classes they become."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bridge.classes import ALL_CLASSES, argb_to_rgb
from bridge.objects import OWN_DETECTION_CLASSES, parent_measurements, qupath_classes, result_features
from inference.analysis.ihc import (
    DAB_OD,
    HAEMATOXYLIN_OD,
    IMMUNE_POSITIVE,
    annulus_means,
    combined_positive_score,
    dab_density,
    h_score,
    intensity_grades,
)
from inference.analysis.points import tumour_proportion_score
from inference.results import ModelInfo, Nuclei, SlideResult

IHC_CLASSES = ("Tumor: Positive", "Tumor: Negative", IMMUNE_POSITIVE, "Immune cells: PD-L1 negative", "Other")


def _beer_lambert(haem: np.ndarray, dab: np.ndarray) -> np.ndarray:
    """uint8 RGB of haematoxylin and DAB densities (base-10 OD per unit vector)."""
    h = np.asarray(HAEMATOXYLIN_OD) / np.linalg.norm(HAEMATOXYLIN_OD)
    d = np.asarray(DAB_OD) / np.linalg.norm(DAB_OD)
    od = haem[..., None] * h + dab[..., None] * d
    return np.clip(np.round(255 * 10**-od), 0, 255).astype(np.uint8)


def test_dab_density_recovers_dab_and_ignores_haematoxylin():
    haem = np.tile(np.linspace(0, 0.8, 32, dtype=np.float32), (32, 1))
    dab = np.tile(np.linspace(0, 0.9, 32, dtype=np.float32)[:, None], (1, 32))
    got = dab_density(_beer_lambert(haem, dab))
    # uint8 rounding costs a little OD where the pixel is dark.
    assert np.abs(got - dab).max() < 0.03
    assert dab_density(_beer_lambert(haem, np.zeros_like(dab))).max() < 0.02


def test_dab_density_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8 RGB"):
        dab_density(np.zeros((4, 4, 3), np.float32))


def test_annulus_means_read_the_membrane_ring_not_the_nucleus():
    yy, xx = np.mgrid[0:40, 0:40]
    r = np.hypot(xx + 0.5 - 20, yy + 0.5 - 20)
    image = np.where((r > 4) & (r < 6), 1.0, 0.0) + np.where(r < 3, 5.0, 0.0)
    ring, inner = annulus_means(image, np.array([[20.0, 20.0], [20.0, 20.0]]), inner_px=4.2, outer_px=5.8)[0], None
    assert ring == pytest.approx(1.0)
    inner = annulus_means(image, np.array([[20.0, 20.0]]), inner_px=0, outer_px=2.5)[0]
    assert inner == pytest.approx(5.0)
    # A centre off the image has no ring pixels.
    assert np.isnan(annulus_means(image, np.array([[-20.0, -20.0]]), inner_px=1, outer_px=2)[0])
    assert annulus_means(image, np.zeros((0, 2)), inner_px=1, outer_px=2).shape == (0,)


def test_grades_follow_the_limits_and_refuse_falling_ones():
    assert intensity_grades(np.array([0.0, 0.3, 0.5, 0.7, np.nan]), (0.2, 0.4, 0.6)).tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="must rise"):
        intensity_grades(np.array([0.1]), (0.5, 0.4, 0.6))


def test_cps_counts_positive_tumour_and_immune_cells_per_100_tumour_cells_capped_at_100():
    assert combined_positive_score(10, 5, 200).percent == pytest.approx(7.5)
    assert combined_positive_score(150, 100, 200).percent == 100.0
    assert combined_positive_score(0, 0, 0).percent is None
    assert h_score(np.array([1, 1, 3, 3])) == pytest.approx(200.0)
    assert h_score(np.zeros(0)) is None


def _ihc_result() -> SlideResult:
    # 3 positive tumour cells at 1+, 2+, 3+; 1 negative; 2 immune positive; 1 other.
    cls = np.array([0, 0, 0, 1, 2, 2, 4])
    nuclei = Nuclei(
        xy=np.arange(14, dtype=np.float64).reshape(7, 2) * 10,
        cls=cls,
        score=np.ones(7),
        class_prob=np.full(7, 0.9),
        positive_prob=np.array([0.9, 0.9, 0.9, 0.1, 0, 0, 0]),
        entropy=np.full(7, 0.2),
        class_names=IHC_CLASSES,
        membrane_dab_od=np.array([0.25, 0.45, 0.8, 0.05, 0.5, 0.5, 0.0]),
        intensity=np.array([1, 2, 3, 0, 0, 0, 0]),
    )
    return SlideResult(
        image_path="ihc.svs",
        image_width_px=1000,
        image_height_px=1000,
        mpp=0.5,
        run_id="r",
        config_hash="c",
        seg_model=None,
        maps=None,
        regions=(),
        tiles=(),
        positive_area_um2=10.0,
        analysed_area_um2=100.0,
        nuclei=nuclei,
        nuclei_model=ModelInfo("pdl1-nuclei-ihc", "1", "0" * 64, 2),
        tps=tumour_proportion_score(3, 1),
        cps=combined_positive_score(3, 2, 4),
        summary={"h_score": h_score(np.array([1, 2, 3, 0])), "nuclei_entropy_mean": 0.2},
        stain="H-DAB",
    )


def test_positive_tumour_cells_take_qupaths_graded_classes_so_its_positive_percent_is_the_tps():
    result = _ihc_result()
    names, cls = qupath_classes(result.nuclei)
    written = [names[c] for c in cls]
    assert written == [
        "Tumor: 1+",
        "Tumor: 2+",
        "Tumor: 3+",
        "Tumor: Negative",
        IMMUNE_POSITIVE,
        IMMUNE_POSITIVE,
        "Other",
    ]
    # QuPath's Positive % counts Positive/1+/2+/3+ over those and Negative, by the last part of the class.
    last = [w.split(": ")[-1] for w in written]
    positive = sum(p in ("Positive", "1+", "2+", "3+") for p in last)
    negative = sum(p == "Negative" for p in last)
    assert 100 * positive / (positive + negative) == pytest.approx(result.tps.percent)


def test_the_parent_of_an_ihc_result_carries_tps_cps_h_score_and_grade_counts_but_no_segmentation():
    m = parent_measurements(_ihc_result())
    assert m["PD-L1: TPS %"] == pytest.approx(75.0)
    assert m["PD-L1: CPS"] == pytest.approx(100.0)
    assert m["PD-L1: H-score"] == pytest.approx(150.0)
    assert (m["PD-L1: Num Tumor: 1+"], m["PD-L1: Num Tumor: 2+"], m["PD-L1: Num Tumor: 3+"]) == (1, 1, 1)
    assert m[f"PD-L1: Num {IMMUNE_POSITIVE}"] == 2
    assert m["PD-L1: Nuclei entropy mean"] == pytest.approx(0.2)
    assert "PD-L1: SUA candidates" not in m


def test_the_geojson_of_an_ihc_result_has_graded_cells_with_their_membrane_dab():
    features = list(result_features(_ihc_result()))
    cells = [f for f in features if f["properties"]["objectType"] == "detection"]
    classes = [c["properties"]["classification"] for c in cells]
    names = [": ".join(c["names"]) if "names" in c else c["name"] for c in classes]
    assert names[:3] == ["Tumor: 1+", "Tumor: 2+", "Tumor: 3+"]
    assert cells[2]["properties"]["measurements"]["DAB membrane OD 75th percentile"] == pytest.approx(0.8)


def test_the_project_template_and_the_setup_script_hold_every_class_the_product_writes():
    root = Path(__file__).resolve().parents[1]
    template = json.loads((root / "project_templates/pdl1/classes.json").read_text())["pathClasses"]
    assert [(c["name"], argb_to_rgb(c["color"])) for c in template] == [(c.name, c.rgb) for c in ALL_CLASSES]
    groovy = (root / "qupath_scripts/pdl1_setup_classes.groovy").read_text()
    rows = re.findall(r'\["([^"]+)", (\d+), (\d+), (\d+)\]', groovy)
    assert [(n, (int(r), int(g), int(b))) for n, r, g, b in rows] == [(c.name, c.rgb) for c in ALL_CLASSES]


@pytest.mark.parametrize("script", ["pdl1_analyze.groovy", "pdl1_import_results.groovy"])
def test_the_groovy_scripts_replace_every_detection_class_the_product_writes(script):
    text = (Path(__file__).resolve().parents[1] / "qupath_scripts" / script).read_text()
    listed = re.search(r"def OWN_DETECTION_CLASSES = \[(.*?)\]", text, re.S).group(1)
    assert set(re.findall(r'"([^"]+)"', listed)) == OWN_DETECTION_CLASSES


def test_the_ring_percentile_is_numpys_nanpercentile_of_the_ring_pixels():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    centres = np.vstack([rng.uniform(-4, 68, (200, 2)), [[-50.0, -50.0]]])
    got = annulus_means(image, centres, inner_px=3.5, outer_px=5.5, percentile=75)
    offs = np.arange(-6, 7)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    cols = np.floor(centres[:, 0]).astype(int)[:, None, None] + dx
    rows = np.floor(centres[:, 1]).astype(int)[:, None, None] + dy
    dist = np.hypot(cols + 0.5 - centres[:, 0, None, None], rows + 0.5 - centres[:, 1, None, None])
    use = (dist >= 3.5) & (dist <= 5.5) & (rows >= 0) & (rows < 64) & (cols >= 0) & (cols < 64)
    ring = np.where(use, image[np.clip(rows, 0, 63), np.clip(cols, 0, 63)], np.nan).reshape(len(centres), -1)
    expected = np.full(len(centres), np.nan)
    some = use.reshape(len(centres), -1).any(axis=1)
    expected[some] = np.nanpercentile(ring[some], 75, axis=1)
    assert np.isnan(got[-1]) and np.isnan(expected[-1])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_tissue_area_counts_the_tissue_pixels_whose_centre_lies_in_the_area():
    from shapely.geometry import Polygon, box

    from inference.pipeline import tissue_area_px
    from inference.slides.tissue import TissueMask

    mask = np.zeros((30, 40), bool)
    mask[10:20, 5:25] = True  # 200 pixels of 8 x 8 level-0 px
    tissue = TissueMask(mask, 8.0)
    assert tissue_area_px(tissue, box(0, 0, 320, 240)) == 200 * 64
    assert tissue_area_px(tissue, box(0, 0, 15 * 8, 240)) == 10 * 10 * 64  # columns 5-14
    assert tissue_area_px(tissue, box(-100, -100, 8, 8)) == 0
    triangle = Polygon([(40, 80), (200, 80), (40, 160)])  # half of a 20 x 10 block, by pixel centres
    rows, cols = np.nonzero(mask)
    expected = sum(
        Polygon(triangle).contains(Polygon(box(c * 8 + 3.9, r * 8 + 3.9, c * 8 + 4.1, r * 8 + 4.1)))
        for r, c in zip(rows, cols, strict=True)
    )
    assert tissue_area_px(tissue, triangle) == expected * 64
