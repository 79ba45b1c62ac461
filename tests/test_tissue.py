import numpy as np

from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.slides.slide import open_slide
from inference.slides.tissue import detect_tissue, tissue_mask_for_slide


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
