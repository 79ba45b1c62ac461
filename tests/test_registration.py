"""Registration of an IHC-like section to its H&E: known transforms recovered, failures reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.analysis.registration import Registration, register_pair, register_slides
from inference.errors import TruthNotFoundError
from inference.evaluation.evaluate import evaluate_registration
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide, open_slide
from inference.slides.tissue import tissue_mask
from tests.registration_pairs import make_pair, render_he

SOURCE_MPP = 4.0  # the phantom is rendered at 4 µm/px, warped there, and reduced to 8 µm/px
MPP = 8.0
IHC = {"eosin_keep": 0.12, "haem_scale": 0.7, "dab_fraction": 0.4, "dab_strength": 0.2}


@pytest.fixture(scope="module")
def he5() -> np.ndarray:
    return render_he(5, size_um=4096, mpp=SOURCE_MPP)


@pytest.fixture(scope="module")
def he7() -> np.ndarray:
    return render_he(7, size_um=4096, mpp=SOURCE_MPP)


def test_identity_pair_has_no_error(he5):
    pair = make_pair(he5, source_mpp=SOURCE_MPP, mpp=MPP)
    reg = register_pair(pair.fixed, pair.moving, mpp=MPP)
    assert reg.ok, reg.reason
    np.testing.assert_allclose(reg.matrix, [[1, 0, 0], [0, 1, 0]], atol=0.02)
    assert np.percentile(pair.errors_um(reg), 90) < 1.0
    assert reg.dice > 0.99 and reg.structure_ncc > 0.99 and reg.error_um < 1.0


@pytest.mark.parametrize(("angle_deg", "shift_um"), [(4.0, (120.0, -80.0)), (-5.0, (-150.0, 100.0))])
def test_known_rigid_transform_of_a_restained_section_is_recovered(he5, angle_deg, shift_um):
    pair = make_pair(he5, source_mpp=SOURCE_MPP, mpp=MPP, angle_deg=angle_deg, shift_um=shift_um, ihc=IHC, seed=1)
    reg = register_pair(pair.fixed, pair.moving, mpp=MPP)
    errors = pair.errors_um(reg)
    assert reg.ok, reg.reason
    assert abs(reg.angle_deg - angle_deg) < 0.5
    assert np.median(errors) <= 10.0
    assert reg.scale_xy == pytest.approx((1.0, 1.0), abs=0.02)


def test_known_affine_with_deformation_is_recovered_within_20_um(he7):
    pair = make_pair(
        he7,
        source_mpp=SOURCE_MPP,
        mpp=MPP,
        angle_deg=3.0,
        shift_um=(60.0, 140.0),
        scale_xy=(1.03, 0.97),
        shear=0.02,
        deform_um=10.0,
        ihc=IHC,
        seed=2,
    )
    reg = register_pair(pair.fixed, pair.moving, mpp=MPP)
    errors = pair.errors_um(reg)
    assert reg.ok, reg.reason
    assert np.median(errors) <= 20.0
    assert reg.scale_xy == pytest.approx((1.03, 0.97), abs=0.02)
    assert reg.shear == pytest.approx(0.02, abs=0.02)
    assert reg.error_um < 30.0  # the measure without truth says it is close too


def test_images_of_different_sizes(he5):
    # The moving image is narrower and shorter than the fixed one, and shows less of the section.
    pair = make_pair(
        he5, source_mpp=SOURCE_MPP, mpp=MPP, angle_deg=2.0, shift_um=(150.0, 50.0), moving_size_um=(3600, 3200), ihc=IHC
    )
    assert pair.moving.shape[:2] != pair.fixed.shape[:2]
    reg = register_pair(pair.fixed, pair.moving, mpp=MPP)
    assert reg.ok, reg.reason
    assert np.median(pair.errors_um(reg)) <= 10.0
    # And the other way round: the larger image moving.
    back = register_pair(pair.moving, pair.fixed, mpp=MPP)
    assert back.ok, back.reason
    pts = pair.tissue_points()
    assert np.median(np.linalg.norm(back.inverse().apply(pts) - pair.truth(pts), axis=1)) * MPP <= 10.0


@pytest.mark.parametrize("laid", ["a quarter turn", "face down"])
def test_a_section_laid_turned_or_face_down_is_registered(he5, laid):
    # Only rotations within 15° were searched: such a pair was refused as "maybe not the same block".
    pair = make_pair(he5, source_mpp=SOURCE_MPP, mpp=MPP, angle_deg=4.0, shift_um=(120.0, -80.0), ihc=IHC, seed=1)
    width = pair.moving.shape[1]
    if laid == "a quarter turn":  # np.rot90: (x, y) -> (y, width - x)
        moving, laid_xy = np.rot90(pair.moving).copy(), lambda p: np.stack([p[:, 1], width - p[:, 0]], axis=1)
    else:
        moving, laid_xy = np.fliplr(pair.moving).copy(), lambda p: np.stack([width - p[:, 0], p[:, 1]], axis=1)
    upright_only = register_pair(pair.fixed, moving, mpp=MPP, any_orientation=False)
    assert not upright_only.ok
    reg = register_pair(pair.fixed, moving, mpp=MPP)
    assert reg.ok, reg.reason
    assert reg.mirrored == (laid == "face down")
    pts = pair.tissue_points()
    assert np.median(np.linalg.norm(reg.apply(laid_xy(pts)) - pair.truth(pts), axis=1)) * MPP <= 10.0


def test_unrelated_sections_are_not_ok(he5, he7):
    fixed = make_pair(he5, source_mpp=SOURCE_MPP, mpp=MPP).fixed
    moving = make_pair(he7, source_mpp=SOURCE_MPP, mpp=MPP, ihc=IHC).moving
    reg = register_pair(fixed, moving, mpp=MPP)
    assert not reg.ok
    assert "same block" in reg.reason


def test_tissue_mask_is_not_fooled_by_tinted_glass():
    # Yellowish glass beside blue tissue (a colour cast on a strongly shifted stain): each channel's
    # brightest value comes from other pixels (blue from the tissue), so taking those as the glass
    # colour put the glass itself above the density threshold, and the whole image was "tissue".
    rng = np.random.default_rng(0)
    rgb = np.full((120, 160, 3), (250.0, 246.0, 224.0)) + rng.normal(0, 1.5, (120, 160, 3))
    rgb[30:90, 40:120] = np.array([120.0, 150.0, 252.0]) + rng.normal(0, 12.0, (60, 80, 3))
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    mask = tissue_mask(rgb, mpp=MPP)
    assert mask[30:90, 40:120].all()
    assert not mask[:25].any() and not mask[95:].any()  # the glass is not tissue
    assert mask.sum() < 1.1 * 60 * 80  # a ring of a px or so, from the smoothing of the density


def test_no_tissue_is_not_ok_with_a_reason(he5):
    fixed = make_pair(he5, source_mpp=SOURCE_MPP, mpp=MPP).fixed
    glass = np.full((300, 200, 3), 244, np.uint8)
    reg = register_pair(fixed, glass, mpp=MPP)
    assert not reg.ok
    assert reg.reason.startswith("no tissue found in the moving image")
    reg = register_pair(glass, glass, mpp=MPP)
    assert reg.reason.startswith("no tissue found in the fixed image")


@pytest.mark.parametrize(
    ("fixed", "moving", "mpp", "match"),
    [
        (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.uint8), 8.0, r"fixed_rgb: expected an RGB uint8"),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.float32), 8.0, r"moving_rgb: .*float32"),
        (np.zeros((8, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), 8.0, r"at least 16 x 16 px, got 64 x 8"),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), 0.0, r"mpp must be a positive"),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), float("nan"), r"mpp must be a positive"),
    ],
)
def test_bad_arrays_raise_value_error(fixed, moving, mpp, match):
    with pytest.raises(ValueError, match=match):
        register_pair(fixed, moving, mpp=mpp)


def test_apply_and_inverse_round_trip():
    theta = math.radians(7.0)
    lin = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) @ [[1.05, 0.1], [0, 0.9]]
    reg = Registration(np.hstack([lin, [[30.0], [-12.0]]]), 0.5, 0.25, 5.0, 0.9, 0.8, True)
    pts = np.random.default_rng(0).uniform(0, 1000, (50, 2))
    np.testing.assert_allclose(reg.inverse().apply(reg.apply(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(reg.inverse().inverse().matrix, reg.matrix, atol=1e-12)
    # The physical measures do not depend on the pixel sizes: the linear part is in µm per µm.
    assert reg.angle_deg == pytest.approx(7.0)
    assert reg.scale_xy == pytest.approx((1.05 * 2, 0.9 * 2))
    assert reg.shear == pytest.approx(0.1 / 0.9)
    rigid = Registration(np.hstack([lin @ np.linalg.inv([[1.05, 0.1], [0, 0.9]]), [[1.0], [2.0]]]), 1, 1, 0, 1, 1, True)
    assert rigid.inverse().angle_deg == pytest.approx(-7.0)
    assert (reg.inverse().fixed_mpp, reg.inverse().moving_mpp) == (0.25, 0.5)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        reg.apply(np.zeros((3, 3)))


def _slide(rgb: np.ndarray, repeat: int, mpp: float) -> Slide:
    big = np.repeat(np.repeat(rgb, repeat, axis=0), repeat, axis=1)
    return Slide(ArrayReader(big), mpp=Mpp(mpp, mpp, "test"))


def test_register_slides_gives_level0_px_of_each_slide(he5):
    # Fixed at 2 µm/px, moving at 1 µm/px, different sizes: their pixels are the pair's 8 µm/px ones, repeated.
    pair = make_pair(
        he5, source_mpp=SOURCE_MPP, mpp=MPP, angle_deg=-3.0, shift_um=(90.0, 40.0), moving_size_um=(3600, 4096), ihc=IHC
    )
    fixed, moving = _slide(pair.fixed, 4, 2.0), _slide(pair.moving, 8, 1.0)
    reg = register_slides(fixed, moving, mpp=MPP)
    assert reg.ok, reg.reason
    assert (reg.fixed_mpp, reg.moving_mpp) == (2.0, 1.0)
    pts = pair.tissue_points()  # 8 µm/px of the pair
    true_fixed_level0 = pair.truth(pts) * 4
    errors_um = np.linalg.norm(reg.apply(pts * 8) - true_fixed_level0, axis=1) * 2.0
    assert np.median(errors_um) <= 10.0
    assert abs(reg.angle_deg + 3.0) < 0.5
    assert reg.scale_xy == pytest.approx((1.0, 1.0), abs=0.02)  # in µm, though level-0 px differ 2x
    assert np.linalg.det(reg.matrix[:, :2]) == pytest.approx(0.25, rel=0.03)


def test_register_slides_of_a_phantom_file_with_itself_is_the_identity(phantom_svs):
    with open_slide(phantom_svs) as slide:
        reg = register_slides(slide, slide, mpp=8.0)
    assert reg.ok, reg.reason
    np.testing.assert_allclose(reg.matrix[:, :2], np.eye(2), atol=0.01)
    np.testing.assert_allclose(reg.matrix[:, 2], 0.0, atol=2.0)  # level-0 px at 0.5 µm/px: 1 µm


def test_evaluating_the_registration_of_an_unpaired_phantom_names_the_fix(phantom_svs):
    # An H&E phantom's truth names no partner: an input error (Pdl1Error), not a bare ValueError.
    fix = r"pass an IHC phantom written with its H&E \(`pdl1 phantom --ihc`, or write_ihc_phantom's paired_with\)"
    with pytest.raises(TruthNotFoundError, match="names no paired H&E; " + fix):
        evaluate_registration(phantom_svs)


def test_evaluating_an_ihc_phantom_whose_h_and_e_is_not_beside_it_names_the_pair(tmp_path):
    # It said "slide not found: he.svs (...; or relink the image in QuPath if it moved)".
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec

    spec = PhantomSpec(1024, 1024, seed=5)
    write_phantom(tmp_path / "pair" / "he.svs", spec)
    write_ihc_phantom(tmp_path / "pair" / "ihc.svs", spec, paired_with=tmp_path / "pair" / "he.svs")
    (tmp_path / "pair" / "he.svs").rename(tmp_path / "he.svs")
    result = CliRunner().invoke(
        app, ["eval", "registration", str(tmp_path / "pair" / "ihc.svs"), "--no-progress"], env={"COLUMNS": "400"}
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert text.startswith(
        f"error: {tmp_path / 'pair' / 'he.svs'}: the H&E that ihc.svs was written with (its truth's paired_with) is "
        "not beside it; keep the pair in one folder"
    ), result.output


def test_a_small_pair_is_registered_finer_than_8_um_per_px(tmp_path, monkeypatch):
    # A 1 mm field is 128 px across at 8 µm/px: this 2048² pair registered there at 27.5 µm median error.
    import inference.analysis.registration as registration
    from inference.phantom.ihc import IhcSpec
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec

    spec = PhantomSpec(2048, 2048, seed=231, tps_percent=30)
    he = write_phantom(tmp_path / "he_231.svs", spec)
    write_ihc_phantom(tmp_path / "ihc_231.svs", spec, IhcSpec(immune_positive_fraction=0.3), paired_with=he.slide_path)
    finer = evaluate_registration(tmp_path / "ihc_231.svs")
    assert finer.error_median_um <= 20.0
    assert finer.registered_mpp == pytest.approx(2048 * 0.5 / registration.MIN_REGISTRATION_PX)  # what it ran at
    # The table says at what µm/px each pair was registered (its title said the asked 8 µm/px alone).
    result = CliRunner().invoke(app, ["eval", "registration", str(tmp_path / "ihc_231.svs")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "small pairs finer" in result.output and "at µm/px" in result.output and " 4 " in result.output
    monkeypatch.setattr(registration, "MIN_REGISTRATION_PX", 1)  # as before: at 8 µm/px whatever the size
    coarse = evaluate_registration(tmp_path / "ihc_231.svs")
    # Coarser is worse (27.5 µm before small images kept the tissue at their edges, 19.4 since).
    assert coarse.error_median_um > finer.error_median_um and coarse.registered_mpp == 8.0
