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
