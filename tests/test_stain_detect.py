"""Stain detection from colour: real H&E and DAB images, shifted phantoms, synthetic immunostains, others."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

import inference
from inference.models.manifest import STAINS
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide, open_slide
from inference.slides.stain_detect import DETECTED_STAINS, HAEMATOXYLIN_OD, StainEstimate, detect_stain
from tests import stain_images as si

REAL_HE = ["real-he-hgsc-stroma/hgsc_stroma.svs", "qupath-0.4.4-labels/he-1357.svs", "cmu"]


def test_the_stain_names_are_the_models():
    assert DETECTED_STAINS[:2] == STAINS and DETECTED_STAINS[2] == "other"


def test_public_names_load_lazily():
    assert inference.StainEstimate is StainEstimate
    assert inference.detect_slide_stain.__module__ == "inference.slides.stain_detect"


def test_real_immunostain_is_h_dab():
    estimate = detect_stain(data.immunohistochemistry())
    assert estimate.stain == "H-DAB", estimate.reason
    assert estimate.margin_deg > 20
    assert estimate.dab_fraction > 0.3 and estimate.eosin_fraction < 0.05


# he-1357.svs: QuPath's entry 2 of the labels fixture types it H-DAB; its pixels are H&E.
@pytest.mark.parametrize("name", REAL_HE)
def test_real_he_slides_are_he(name, request):
    path = request.getfixturevalue("cmu_svs") if name == "cmu" else request.getfixturevalue("fixtures_dir") / name
    with open_slide(path) as slide:
        estimate = inference.detect_slide_stain(slide)
    assert estimate.stain == "H&E", estimate.reason
    assert estimate.margin_deg > 10


# Shift 1.0 is left out: seed 201 rendered at 8 µm/px (blue-heavy haematoxylin [0.79, 0.27, 0.55] under an
# additive cast of [-29, 35, 26]) reads as H-DAB, though its written slide reads H&E (benchmarks/stain_detect.py).
@pytest.mark.parametrize("shift", [0.0, 0.2, 0.4, 0.6, 0.8])
@pytest.mark.parametrize("seed", [201, 202, 203])
def test_shifted_he_phantoms_are_he(seed, shift):
    estimate = detect_stain(si.phantom_he(seed, shift))
    assert estimate.stain == "H&E", estimate.reason


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", [201, 202, 203])
def test_phantoms_recoloured_as_immunostains_are_h_dab(seed, shift):
    estimate = detect_stain(si.phantom_ihc(seed, shift))
    assert estimate.stain == "H-DAB", estimate.reason


@pytest.mark.parametrize("seed", [201, 202])
def test_a_dab_negative_phantom_immunostain_is_h_dab(seed):
    # Haematoxylin only, as the phantom colours it unshifted: one stain, of haematoxylin's colour.
    estimate = detect_stain(si.phantom_ihc(seed, 0.0, dab=0))
    assert estimate.stain == "H-DAB", estimate.reason
    assert "one stain only" in estimate.reason


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.15])
@pytest.mark.parametrize("seed", [10, 11, 12])
def test_drawn_immunostains_with_perturbed_vectors_are_h_dab(seed, sigma):
    estimate = detect_stain(si.drawn_ihc(np.random.default_rng(seed), sigma=sigma))
    assert estimate.stain == "H-DAB", estimate.reason


def test_slide_detection_reads_the_whole_image_coarse():
    rgb = si.phantom_he(7, 0.0, downsample=4)  # 2 µm/px, read back at 8
    slide = Slide(ArrayReader(rgb), mpp=Mpp(2.0, 2.0, "test"))
    estimate = inference.detect_slide_stain(slide, mpp=8.0)
    assert estimate.stain == "H&E"
    assert estimate.tissue_px < rgb.shape[0] * rgb.shape[1] / 10  # a 4x smaller image was judged


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (si.blank(), "no tissue"),
        (si.grey(np.random.default_rng(1)), "no colour"),
        (si.dark_fluorescence(np.random.default_rng(1)), "dark background"),
        (np.full((32, 32), 128, np.uint8), "single-channel"),
    ],
    ids=["blank", "grey", "dark", "2-d"],
)
def test_images_without_a_brightfield_stain_are_other(image, reason):
    estimate = detect_stain(image)
    assert estimate.stain == "other"
    assert reason in estimate.reason
    assert estimate.margin_deg == 0.0


def test_a_tissue_mask_limits_the_pixels_judged():
    rgb = si.phantom_he(201, 0.0)
    mask = np.zeros(rgb.shape[:2], bool)
    assert detect_stain(rgb, tissue=mask).reason.startswith("no tissue: 0 pixels")
    mask[:, : rgb.shape[1] // 2] = True
    estimate = detect_stain(rgb, tissue=mask)
    assert estimate.stain == "H&E" and estimate.tissue_px <= mask.sum()


def test_hand_built_haematoxylin_and_eosin_stripes():
    od = np.zeros((40, 40, 3))
    od[:, :20] = 0.6 * HAEMATOXYLIN_OD
    od[:, 20:] = 0.5 * np.array([0.07, 0.99, 0.11])
    od[::2] += 0.3 * HAEMATOXYLIN_OD
    rgb = np.clip(250 * np.exp(-od), 0, 255).astype(np.uint8)
    rgb[:4] = 250
    estimate = detect_stain(rgb)
    assert estimate.stain == "H&E"
    assert estimate.second_hue_deg < 0  # eosin leaves haematoxylin toward green


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64])
def test_non_uint8_pixels_are_refused(dtype):
    with pytest.raises(ValueError, match="expected 8-bit RGB \\(uint8\\) pixels, got"):
        detect_stain(np.zeros((8, 8, 3), dtype))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected RGB \\(height, width, 3\\)"):
        detect_stain(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="tissue mask shape"):
        detect_stain(np.zeros((8, 8, 3), np.uint8), tissue=np.ones((4, 4), bool))


# Held-out IHC phantoms as the product writes them (pdl1 phantom --ihc), small: seeds 260-299 are never tuned on.
# Only the domain the detector is known to hold in (shift <= 0.3, TPS 30); low TPS under strong shift or a
# colour cast hidden by clipped glass still reads as H&E (see the module docstring and benchmarks/stain_detect.py).
@pytest.mark.parametrize("shift", [0.0, 0.3])
@pytest.mark.parametrize("seed", [260, 263, 268])
def test_written_ihc_phantoms_are_h_dab(seed, shift, tmp_path):
    from inference.phantom.pyramid import write_ihc_phantom
    from inference.phantom.scene import PhantomSpec

    path = tmp_path / f"ihc_{seed}.svs"
    write_ihc_phantom(path, PhantomSpec(1024, 1024, seed=seed, tps_percent=30.0, shift=shift))
    with open_slide(path) as slide:
        estimate = inference.detect_slide_stain(slide)
    assert estimate.stain == "H-DAB", estimate.reason
    assert estimate.margin_deg > 10


# Written IHC phantoms with few brown cells whose JPEG noise in pale tissue made the 1 % extremes and read as
# H&E before the one-pixel smoothing (found by searching seeds 500-529 for such failures: a regression check,
# not an evaluation). The smoothing is what turns them; without it each reads H&E. Searched again on 2026-12-07,
# when the IHC phantom took a background DAB over tumour nests (the first seeds found, 510 at TPS 2 and 517, no
# longer need the smoothing): the calls it turns are now weak (margin under 5°), so they are flagged for review.
@pytest.mark.parametrize(("seed", "tps", "shift"), [(510, 1.0, 0.5), (513, 1.0, 0.3), (513, 1.0, 0.5)])
def test_jpeg_noise_in_pale_tissue_does_not_hide_sparse_dab(seed, tps, shift, tmp_path, monkeypatch):
    from inference.phantom.pyramid import write_ihc_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.slides import stain_detect

    path = tmp_path / f"ihc_{seed}.svs"
    write_ihc_phantom(path, PhantomSpec(1024, 1024, seed=seed, tps_percent=tps, shift=shift))
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail(mpp=8.0)
    estimate = detect_stain(thumbnail)
    assert estimate.stain == "H-DAB", estimate.reason
    assert estimate.margin_deg < 5 and "weak" in estimate.reason
    monkeypatch.setattr(stain_detect, "DENOISE_SIGMA_PX", 1e-9)
    assert detect_stain(thumbnail).stain == "H&E"


# A shifted haematoxylin can absorb red as little as its eosin (blue-heavy) or DAB (green-heavy): the phantoms'
# --shift draws both (c2008, ihc_1811 of the review sets). Which extreme is haematoxylin is then a coin toss, and
# the swapped pair reads as the other stain: these two were read wrong by 52° and 99°. Now flagged weak.
@pytest.mark.parametrize(
    ("h_od", "second_od", "eosin"),
    [([0.40, 0.40, 0.82], [0.43, 0.90, 0.05], True), ([0.24, 0.89, 0.38], si.DAB_OD, False)],
)
def test_haematoxylin_as_red_as_the_second_stain_makes_a_weak_call(h_od, second_od, eosin):
    from inference.slides import stain_detect

    rgb = si.drawn_two_stains(np.random.default_rng(0), np.array(h_od), np.array(second_od), eosin=eosin)
    estimate = detect_stain(rgb)
    assert estimate.stain in ("H&E", "H-DAB"), estimate.reason
    assert estimate.red_gap_deg < stain_detect.RED_TIE_DEG and "weak" in estimate.reason
    assert estimate.margin_deg <= estimate.red_gap_deg < 5  # the pipeline's weak-margin review reason


# Beside a red-heavy haematoxylin (ihc_1900, ihc_1908 of the review sets) DAB's residual hue falls from 89° to
# about 57°, below the fixed boundary's reach: a DAB 5° off Ruifrok's read H&E by 7.5° (not flagged). Turned with
# DAB's place the boundary says H-DAB; the two disagree, so the call is weak.
def test_dab_beside_a_red_heavy_haematoxylin_is_a_weak_call():
    rgb = si.drawn_two_stains(
        np.random.default_rng(0), np.array([0.93, 0.27, 0.25]), np.array([0.32, 0.65, 0.68]), eosin=False
    )
    estimate = detect_stain(rgb)
    assert estimate.stain == "H-DAB", estimate.reason
    assert estimate.margin_deg == 0.0 and "weak" in estimate.reason
    assert estimate.dab_hue_deg < 60


def _review_thumbnails(seed: int) -> dict[str, np.ndarray]:
    """The 8 µm/px thumbnails of review phantom pair ``seed`` (benchmarks.review_phantoms --ihc), rendered."""
    from benchmarks.stain_structure import rendered_thumbnails

    return {name: thumb for name, _truth, thumb, _shift, _tps in rendered_thumbnails([seed])}


def test_spread_of_a_stain_that_fills_what_haematoxylin_leaves():
    from inference.slides.stain_detect import EOSIN_OD, _spread

    # Stroma (haematoxylin 0.1, eosin 0.5) and tumour (0.6, 0.2), a pixel each in turn: eosin falls as
    # haematoxylin rises (r = -1); the third with least haematoxylin is stroma, eosin OD 0.5 there.
    conc = np.array([[0.1, 0.5], [0.6, 0.2]] * 30)
    od = (conc @ np.stack([HAEMATOXYLIN_OD, EOSIN_OD])).astype(np.float32)
    correlation, low_od = _spread(od, HAEMATOXYLIN_OD, EOSIN_OD)
    assert correlation == pytest.approx(-1.0, abs=1e-5)
    assert low_od == pytest.approx(0.5, abs=1e-5)
    assert all(np.isnan(_spread(od[:1].repeat(5, axis=0), HAEMATOXYLIN_OD, EOSIN_OD)))


# Development failures (issue #31): H&E review phantoms whose shifted eosin is as blue as DAB, read H-DAB by
# 6-11° (not flagged). Their second stain lies as eosin does (falls as haematoxylin rises, dense where
# haematoxylin is least): H&E, weak. Without the structural cue (its colour margin limit at 0) they read H-DAB.
@pytest.mark.parametrize("seed", [3005, 3018, 2623])
def test_an_eosin_as_blue_as_dab_is_told_by_where_it_lies(seed, monkeypatch):
    from inference.slides import stain_detect

    thumbnail = _review_thumbnails(seed)[f"c{seed}"]
    estimate = detect_stain(thumbnail)
    assert estimate.stain == "H&E", estimate.reason
    assert estimate.margin_deg == 0.0 and "lies as eosin does" in estimate.reason
    assert estimate.spread_correlation < stain_detect.SPREAD_CORRELATION_MAX
    monkeypatch.setattr(stain_detect, "SPREAD_COLOUR_MARGIN_DEG", 0.0)
    before = detect_stain(thumbnail)
    assert before.stain == "H-DAB" and before.margin_deg >= 5


# IHC review phantoms read H&E by colour (ihc_2698 by 13°, unflagged, before the IHC phantom's background DAB over
# tumour nests of 2026-12-07, which made ihc_2698 eosin-like beyond the cue's reach): their DAB is faint where
# haematoxylin is least, where an H&E's eosin fills the stroma: H-DAB, weak.
@pytest.mark.parametrize("seed", [3034])
def test_a_second_stain_faint_where_haematoxylin_is_least_is_not_eosin(seed, monkeypatch):
    from inference.slides import stain_detect

    thumbnail = _review_thumbnails(seed)[f"ihc_{seed}"]
    estimate = detect_stain(thumbnail)
    assert estimate.stain == "H-DAB", estimate.reason
    assert estimate.margin_deg == 0.0 and "faint where haematoxylin is least" in estimate.reason
    monkeypatch.setattr(stain_detect, "SPREAD_COLOUR_MARGIN_DEG", 0.0)
    assert detect_stain(thumbnail).stain == "H&E"


def test_the_real_immunostain_does_not_lie_as_eosin():
    from inference.slides import stain_detect

    # Real images do not look like the phantoms here: scikit-image's DAB rises with haematoxylin a little.
    estimate = detect_stain(data.immunohistochemistry())
    assert estimate.spread_correlation > 0 > stain_detect.SPREAD_CORRELATION_MAX
