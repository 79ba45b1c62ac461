from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from inference.analysis.nuclei import NucleiConfig, detect_nuclei, dihedral_mean, pdl1_from_maps
from inference.analysis.points import match_points
from inference.models.ensemble import Ensemble
from inference.models.manifest import Manifest, Member
from inference.phantom.truth import NUCLEUS_CLASSES
from inference.results import Nuclei, UncertaintyMaps
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide

COLOURS = [(0, 255, 255), (255, 0, 255), (255, 255, 0)]  # class c: channel c dark


class DotDetector(nn.Module):
    """Turns coloured dots into heatmap peaks: translation-equivariant, exact at any tiling."""

    def __init__(self):
        super().__init__()
        self.blur = nn.Conv2d(3, 3, 5, padding=2, groups=3, bias=False)
        g = torch.exp(-((torch.arange(5) - 2.0) ** 2) / 2)
        k = torch.outer(g, g)
        with torch.no_grad():
            self.blur.weight.copy_((k / k.max()).expand(3, 1, 5, 5))

    def forward(self, x):
        darkness = 1 - (x * 0.25 + 0.5)  # undo normalisation (mean 0.5, std 0.25)
        return 1.5 * self.blur(darkness) - 4.0  # unsaturated: the dot centre is the unique peak


def dot_ensemble(tile: int) -> Ensemble:
    manifest = Manifest(
        name="dots",
        version="0",
        task="nuclei",
        architecture="x",
        architecture_kwargs={},
        input_mpp=1.0,
        tile_size_px=tile,
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
        class_names=list(NUCLEUS_CLASSES),
        members=[Member("m", "0" * 64, 0, 0, 0.0)],
    )
    return Ensemble.from_members(manifest, [DotDetector()], device="cpu")


@pytest.fixture(scope="module")
def dotted_slide():
    rng = np.random.default_rng(0)
    w, h = 400, 300
    rgb = np.full((h, w, 3), 255, np.uint8)
    points, classes = [], []
    candidates = rng.uniform(4, [w - 4, h - 4], (4000, 2))
    # Dots right on the seams of a 64 px grid too.
    seams = np.array([[x, y] for x in (60, 61.5, 62, 63, 64, 112.5) for y in (30, 90, 150)], float)
    for p in np.concatenate([seams, candidates]):
        if all(np.hypot(*(p - q)) >= 9 for q in points):
            points.append(p)
            classes.append(int(rng.integers(3)))
    for (x, y), c in zip(points, classes, strict=True):
        rgb[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = COLOURS[c]
    centres = np.floor(np.array(points)) + 0.5
    return Slide(ArrayReader(rgb), mpp=Mpp(1.0, 1.0, "test")), centres, np.array(classes)


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (96, 32), (512, 16)])
def test_each_nucleus_found_once_across_tile_seams(dotted_slide, tile, overlap):
    slide, centres, classes = dotted_slide
    nuclei = detect_nuclei(
        slide,
        dot_ensemble(tile),
        config=NucleiConfig(overlap_px=overlap, read_workers=0, nms_radius_um=2.5, min_score=0.5),
    )
    assert len(nuclei) == len(centres), "no double counts, no lost nuclei"
    m = match_points(nuclei.xy, centres, radius=0.01)  # exactly at the dot centres
    assert len(m.pred_index) == len(centres)
    np.testing.assert_array_equal(nuclei.cls[m.pred_index], classes[m.truth_index])
    assert (nuclei.class_prob > 0.8).all()
    assert nuclei.entropy is None  # a single model, not an ensemble


def test_ensemble_gives_entropy_and_roi_limits(dotted_slide):
    from shapely.geometry import box

    slide, centres, _ = dotted_slide
    ens = dot_ensemble(64)
    ens2 = Ensemble(ens.manifest, [ens.members[0], DotDetector()], folder=ens.folder, device=ens.device)
    roi = box(0, 0, 200, 150)
    nuclei = detect_nuclei(slide, ens2, roi=roi, config=NucleiConfig(overlap_px=16, min_score=0.5))
    inside = (centres[:, 0] < 200) & (centres[:, 1] < 150)
    assert len(nuclei) == inside.sum()
    assert nuclei.entropy is not None and (nuclei.entropy >= 0).all()
    assert nuclei.count("Tumor: Positive") + nuclei.count("Tumor: Negative") + nuclei.count("Other") == len(nuclei)


class ShiftedDotDetector(DotDetector):
    """DotDetector whose peaks lie 1 px right of the dots: not equivariant under flips and rotations."""

    def forward(self, x):
        return torch.roll(super().forward(x), 1, dims=-1)


def test_dihedral_mean_of_an_equivariant_model_is_the_model_and_symmetrises_one_that_is_not():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32))
    model = DotDetector()
    with torch.no_grad():
        torch.testing.assert_close(dihedral_mean(model, x), model(x))  # its kernel is symmetric
        shifted = dihedral_mean(ShiftedDotDetector(), x)
    # Any model's TTA heatmap of a transformed input is the transformed TTA heatmap.
    with torch.no_grad():
        torch.testing.assert_close(dihedral_mean(ShiftedDotDetector(), x.flip(-2)), shifted.flip(-2))
        torch.testing.assert_close(
            dihedral_mean(ShiftedDotDetector(), torch.rot90(x, 1, (-2, -1))), torch.rot90(shifted, 1, (-2, -1))
        )


def test_dihedral_mean_hands_every_transform_in_the_input_s_channels_last_strides():
    # Ensemble.normalize's output (a permuted NHWC batch); rot90 alone gives NCHW or transposed strides, on which
    # eager PyTorch's CPU convolutions are much slower.
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 12, 10, 3)).astype(np.float32)).permute(0, 3, 1, 2)
    seen = []

    def predict(t):
        seen.append(t.is_contiguous(memory_format=torch.channels_last))
        return 2 * t

    torch.testing.assert_close(dihedral_mean(predict, x), 2 * x)
    assert seen == [True] * 8
    seen.clear()
    dihedral_mean(predict, x.contiguous())  # an NCHW input is left as it is
    assert len(seen) == 8 and not any(seen[:1])


def test_tta_finds_the_same_nuclei_with_an_equivariant_model_and_is_off_by_default(dotted_slide):
    slide, centres, _ = dotted_slide
    config = NucleiConfig(overlap_px=16, read_workers=0, min_score=0.5)
    assert not config.tta_for(dot_ensemble(64).manifest)  # a model that does not ask for it: off
    plain = detect_nuclei(slide, dot_ensemble(64), config=config)
    assert len(plain) == len(centres)
    tta = detect_nuclei(slide, dot_ensemble(64), config=replace(config, tta=True))
    np.testing.assert_array_equal(tta.xy, plain.xy)
    np.testing.assert_array_equal(tta.cls, plain.cls)
    np.testing.assert_allclose(tta.score, plain.score, rtol=1e-5)


def test_tta_averages_a_shifted_peak_back_onto_the_dot():
    rgb = np.full((64, 64, 3), 255, np.uint8)
    rgb[31:34, 31:34] = COLOURS[0]  # one dot, centre (32.5, 32.5)
    slide = Slide(ArrayReader(rgb), mpp=Mpp(1.0, 1.0, "test"))
    ens = dot_ensemble(64)
    ens = Ensemble(ens.manifest, [ShiftedDotDetector()], folder=ens.folder, device=ens.device)
    config = NucleiConfig(read_workers=0, min_score=0.2)
    plain = detect_nuclei(slide, ens, config=config)
    tta = detect_nuclei(slide, ens, config=replace(config, tta=True))
    np.testing.assert_array_equal(plain.xy, [[33.5, 32.5]])  # 1 px right: the model's bias
    np.testing.assert_array_equal(tta.xy, [[32.5, 32.5]])  # the 8 shifts cancel
    assert tta.score[0] < plain.score[0]  # the mean of the shifted maps is flatter


def test_a_model_trained_with_tta_runs_with_it_unless_the_config_says_otherwise():
    rgb = np.full((64, 64, 3), 255, np.uint8)
    rgb[31:34, 31:34] = COLOURS[0]
    slide = Slide(ArrayReader(rgb), mpp=Mpp(1.0, 1.0, "test"))
    ens = dot_ensemble(64)
    manifest = replace(ens.manifest, extra={**ens.manifest.extra, "tta": True})  # as `pdl1 train nuclei --tta`
    ens = Ensemble(manifest, [ShiftedDotDetector()], folder=ens.folder, device=ens.device)
    config = NucleiConfig(read_workers=0, min_score=0.2)
    assert config.tta_for(manifest) and not replace(config, tta=False).tta_for(manifest)
    np.testing.assert_array_equal(detect_nuclei(slide, ens, config=config).xy, [[32.5, 32.5]])
    np.testing.assert_array_equal(detect_nuclei(slide, ens, config=replace(config, tta=False)).xy, [[33.5, 32.5]])


def test_h_and_e_nuclei_take_their_pdl1_call_from_the_ensemble_maps_and_each_member_its_own():
    prob = np.zeros((4, 4), np.float32)
    prob[:, 2:] = 0.9  # right half positive
    member = np.stack([prob, np.where(prob > 0, 0.4, 0.0).astype(np.float32)])  # member 2 says negative
    zeros = np.zeros_like(prob)
    covered = np.ones((4, 4), bool)
    covered[3, :] = False
    maps = UncertaintyMaps(prob, zeros + 0.1, zeros, zeros, zeros, covered, (0.0, 0.0), 10.0, 1.0, member)
    names = ("Tumor: Positive", "Tumor: Negative", "Other")
    # Morphology said: positive, positive, negative, other, positive (off the covered maps).
    nuclei = Nuclei(
        xy=np.array([[5.0, 5.0], [25.0, 5.0], [35.0, 15.0], [35.0, 25.0], [5.0, 35.0]]),
        cls=np.array([0, 0, 1, 2, 0]),
        score=np.ones(5),
        class_prob=np.array([0.8, 0.8, 0.6, 0.9, 0.7]),
        positive_prob=np.array([0.8, 0.8, 0.4, 0.0, 0.7]),
        entropy=None,
        class_names=names,
    )
    out = pdl1_from_maps(nuclei, maps, threshold=0.5)
    assert out.cls.tolist() == [1, 0, 0, 2, 0]  # maps decide tumour nuclei; other and uncovered keep theirs
    assert out.positive_prob.tolist() == pytest.approx([0.0, 0.9, 0.9, 0.0, 0.7])
    assert out.member_cls[:, 0].tolist() == [1, 0, 0, 2, 0] and out.member_cls[:, 1].tolist() == [1, 1, 1, 2, 0]
    assert out.member_tps() == pytest.approx([75.0, 25.0])
    assert out.class_prob[1] == pytest.approx(1.0 * 0.9)  # P(tumour) 0.8/0.8, times the map's 0.9
    assert np.isnan(out.pdl1_entropy[3]) and out.pdl1_entropy[1] == pytest.approx(0.1)
