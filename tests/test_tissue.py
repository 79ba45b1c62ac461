import numpy as np

from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.slides.slide import open_slide
from inference.slides.tissue import (
    MAX_FAINT_SHARE,
    MIN_TISSUE_FRACTION,
    TissueMask,
    detect_tissue,
    faint_tissue,
    tissue_mask,
    tissue_mask_for_slide,
    tissue_review_reasons,
)


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = (240 + rng.integers(-3, 4, (64, 64, 3))).astype(np.uint8)
    assert not detect_tissue(glass).any()


def test_tissue_matches_the_phantom_scene(phantom_svs):
    with open_slide(phantom_svs) as slide:
        tissue = tissue_mask_for_slide(slide, mpp=8.0)
    assert tissue.downsample == 16
    scene = PhantomScene(PhantomSpec(2048, 2048, seed=1, tps_percent=30))
    centres = (np.arange(tissue.mask.shape[0]) + 0.5) * tissue.downsample
    truth = scene.zones(centres[None, :], centres[:, None])[0]
    iou = (truth & tissue.mask).sum() / (truth | tissue.mask).sum()
    assert iou > 0.9


def test_shifted_he_keeps_its_pale_tissue(tmp_path):
    # A stain-shifted H&E (seed 207 at shift 0.7, as held-out h207): saturation kept about half its tissue;
    # optical density, which the H&E path uses, keeps it all.
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.truth import load_truth
    from inference.phantom.truth_tissue import truth_tissue_mask
    from inference.slides.tissue import TISSUE_METHOD_OF_STAIN

    path = tmp_path / "he.svs"
    write_phantom(path, PhantomSpec(2048, 2048, seed=207, tps_percent=40, shift=0.7))
    truth = load_truth(path)
    true_tissue = truth_tissue_mask(truth)

    def recall(method: str) -> float:
        with open_slide(path) as slide:
            tissue = tissue_mask_for_slide(slide, mpp=4.0, method=method)
        assert tissue.downsample == truth.mask_downsample
        return (tissue.mask & true_tissue).sum() / true_tissue.sum()

    assert TISSUE_METHOD_OF_STAIN["H&E"] == "od"
    assert recall("od") > 0.98
    assert recall("saturation") < 0.8
    # What the saturation mask lost is faintly absorbing area outside it: a suspect tissue detection.
    with open_slide(path) as slide:
        lost = tissue_review_reasons(tissue_mask_for_slide(slide, mpp=4.0, method="saturation"))
        kept = tissue_review_reasons(tissue_mask_for_slide(slide, mpp=4.0, method="od"))
    assert [r["reason"] for r in lost] == [
        "suspect tissue detection: faintly stained area left out (share of the tissue)"
    ]
    assert lost[0]["value"] >= MAX_FAINT_SHARE and kept == []


def _glass_with_tissue(pale_od: float) -> tuple[np.ndarray, np.ndarray]:
    """Glass (240) with a stained square on the left and a pale grey one of summed OD ``pale_od`` on the right."""
    rng = np.random.default_rng(1)
    rgb = (240 + rng.integers(-2, 3, (64, 96, 3))).astype(np.int16)
    rgb[16:48, 8:40] = (150, 80, 140)
    rgb[16:48, 56:88] = np.round(241 * np.exp(-pale_od / 3) - 1)
    rgb = rgb.clip(0, 255).astype(np.uint8)
    mask = np.zeros(rgb.shape[:2], bool)
    mask[16:48, 8:40] = True  # a detector that kept only the stained square
    return rgb, mask


def test_faint_tissue_is_the_pale_area_a_mask_left_out_and_not_glass_noise():
    rgb, mask = _glass_with_tissue(pale_od=0.09)
    faint = faint_tissue(rgb, mask)
    assert faint[20:44, 60:84].all() and not faint[:, :48].any()  # the pale square, not the stained one's edge
    rgb, mask = _glass_with_tissue(pale_od=0.0)  # no pale tissue: glass and its noise only
    assert not faint_tissue(rgb, mask).any()


def test_suspect_tissue_reasons_with_value_and_limit():
    rgb, mask = _glass_with_tissue(pale_od=0.09)
    tissue = TissueMask(mask=mask, downsample=16.0, faint=faint_tissue(rgb, mask))
    (reason,) = tissue_review_reasons(tissue)
    assert reason["reason"].startswith("suspect tissue detection: faintly stained area")
    assert reason["value"] > 0.8 and reason["limit"] == MAX_FAINT_SHARE  # the pale square is as large as the kept one
    # Limited to an ROI around the stained square only, nothing was left out there.
    roi = np.zeros(mask.shape, bool)
    roi[:, :48] = True
    assert tissue_review_reasons(tissue, within=roi) == []
    # An ROI on glass: almost no tissue.
    glass_only = np.zeros(mask.shape, bool)
    glass_only[:, 90:] = True
    (empty,) = tissue_review_reasons(tissue, within=glass_only)
    assert empty["reason"] == "suspect tissue detection: almost no tissue found"
    assert empty["value"] == 0.0 and empty["limit"] == MIN_TISSUE_FRACTION
    # Not looked for (no faint mask): only the fraction is checked.
    assert tissue_review_reasons(TissueMask(mask=mask, downsample=16.0)) == []


def test_truth_tissue_is_redrawn_from_the_spec_for_both_stains(tmp_path):
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.truth import load_truth
    from inference.phantom.truth_tissue import truth_tissue_mask

    spec = PhantomSpec(1024, 1024, seed=3, tps_percent=30)
    write_phantom(tmp_path / "he.svs", spec)
    write_ihc_phantom(tmp_path / "ihc.svs", spec)
    for name in ("he.svs", "ihc.svs"):
        truth = load_truth(tmp_path / name)
        tissue = truth_tissue_mask(truth)
        assert tissue.shape == truth.positive_mask.shape and tissue.dtype == bool
        positive = truth.positive_mask.astype(bool)
        assert positive.any() and not (positive & ~tissue).any()  # positive nests lie in tissue
        assert 0.2 < tissue.mean() < 0.98
    # The IHC is a moved section: its tissue is not the H&E's, pixel for pixel.
    assert (truth_tissue_mask(load_truth(tmp_path / "he.svs")) != tissue).mean() > 0.01


def test_a_region_smaller_than_a_speck_filled_with_tissue_is_tissue_and_specks_inside_an_image_still_go():
    # A 128 µm tile (16 px at 8 µm/px) of tissue edge to edge was one "speck" under 150 µm square, dropped whole:
    # "almost no tissue found", nothing analysed, for small images and uploaded regions.
    rng = np.random.default_rng(0)
    tile = np.clip(rng.normal((150, 110, 160), 12, (16, 16, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(tile, mpp=8.0).all()
    # Inside a larger image, a speck (here 40 µm square) that touches no edge still goes, and a hole is filled.
    image = np.full((64, 64, 3), 240, np.uint8)
    image[45:50, 45:50] = (150, 110, 160)
    image[2:30, 2:30] = (150, 110, 160)
    image[10:13, 10:13] = 240  # a 24 µm hole in the tissue
    mask = tissue_mask(image, mpp=8.0)
    assert not mask[45:50, 45:50].any() and mask[2:30, 2:30].all()
