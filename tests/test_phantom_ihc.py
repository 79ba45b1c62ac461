"""The PD-L1 IHC phantom (#31): a haematoxylin-DAB consecutive section of the H&E phantom's tissue."""

import hashlib
import json
import re

import numpy as np
import openslide
import pytest
from typer.testing import CliRunner

from bridge.cli.app import app
from inference import ihc_to_he_points
from inference.phantom.ihc import IhcScene, IhcSpec, SectionTransform
from inference.phantom.pyramid import write_ihc_phantom, write_phantom
from inference.phantom.render import render_ihc
from inference.phantom.scene import PhantomSpec
from inference.phantom.truth import (
    IHC_NUCLEUS_CLASSES,
    IHC_PATTERNS,
    NUCLEUS_CLASSES,
    combined_positive_score,
    load_truth,
)

runner = CliRunner()
POS, NEG, IMM_POS, IMM_NEG, OTHER = range(5)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An H&E phantom and its IHC section, 2048², TPS 50 %."""
    folder = tmp_path_factory.mktemp("pair")
    spec = PhantomSpec(2048, 2048, seed=11, tps_percent=50)  # a section rotated 3.4° and moved ~70 µm
    he = write_phantom(folder / "he.svs", spec)
    ihc = write_ihc_phantom(folder / "ihc.svs", spec, paired_with=he.slide_path)
    return he, ihc


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_ihc_phantom(tmp_path / "a" / "i.svs", PhantomSpec(1024, 1024, seed=5, shift=0.4))
    b = write_ihc_phantom(tmp_path / "b" / "i.svs", PhantomSpec(1024, 1024, seed=5, shift=0.4))
    c = write_ihc_phantom(tmp_path / "c" / "i.svs", PhantomSpec(1024, 1024, seed=6, shift=0.4))
    for name in ("slide_path", "nuclei_csv_path", "mask_path"):
        assert _sha(getattr(a, name)) == _sha(getattr(b, name))
    assert _sha(a.slide_path) != _sha(c.slide_path)


def test_adding_ihc_leaves_the_he_bytes_alone(tmp_path):
    args = ["--size", "1024", "--seed", "3", "--tps", "40", "--shift", "0.2", "--no-progress"]
    alone = runner.invoke(app, ["phantom", str(tmp_path / "a" / "he.svs"), *args])
    paired = runner.invoke(
        app, ["phantom", str(tmp_path / "b" / "he.svs"), "--ihc", str(tmp_path / "b" / "ihc.svs"), *args]
    )
    assert alone.exit_code == 0 and paired.exit_code == 0, paired.output
    assert _sha(tmp_path / "a" / "he.svs") == _sha(tmp_path / "b" / "he.svs")
    assert _sha(tmp_path / "a" / "he.truth" / "nuclei.csv") == _sha(tmp_path / "b" / "he.truth" / "nuclei.csv")
    assert "CPS" in paired.output and paired.output.count("TPS") == 2
    summary = json.loads((tmp_path / "b" / "ihc.truth" / "truth.json").read_text())
    assert summary["stain"] == "H-DAB" and summary["paired_with"] == "he.svs"
    assert summary["classes"] == list(IHC_NUCLEUS_CLASSES)


def test_immune_positive_needs_ihc(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "x.svs"), "--immune-positive", "0.5", "--no-progress"])
    assert result.exit_code == 2
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "--immune-positive sets the IHC section's immune cells: add --ihc" in words


@pytest.mark.parametrize("tps", [5, 30, 60])
def test_ihc_truth_tps_is_as_asked(tps):
    # The IHC's own cells in the H&E's zones: the section's TPS is the asked one up to sampling.
    scene = IhcScene(PhantomSpec(4096, 4096, seed=11, tps_percent=tps))
    cls = scene.nuclei(0, 0, 4096, 4096)["cls"]
    tumour = (cls == POS).sum() + (cls == NEG).sum()
    assert tumour > 8_000
    assert 100 * (cls == POS).sum() / tumour == pytest.approx(tps, abs=2.0)


def test_cps_counts_positive_tumour_and_immune_cells_per_tumour_cell(pair):
    _, ihc = pair
    s = ihc.summary
    counts = [s["nuclei_counts"][name] for name in IHC_NUCLEUS_CLASSES]
    assert counts[IMM_POS] > 0 and counts[IMM_NEG] > counts[IMM_POS]  # default share 0.3
    tumour = counts[POS] + counts[NEG]
    assert s["cps"] == pytest.approx(min(100, 100 * (counts[POS] + counts[IMM_POS]) / tumour))
    assert s["tps_percent"] == pytest.approx(100 * counts[POS] / tumour)
    assert sum(s["intensity_counts"].values()) == counts[POS] + counts[IMM_POS]
    assert combined_positive_score(80, 40, 100) == 100.0
    assert combined_positive_score(3, 1, 0) is None


def test_immune_positive_fraction_sets_the_immune_share():
    spec = PhantomSpec(2048, 2048, seed=8, tps_percent=30)
    for fraction in (0.1, 0.6):
        cls = IhcScene(spec, IhcSpec(immune_positive_fraction=fraction)).nuclei(0, 0, 2048, 2048)["cls"]
        share = (cls == IMM_POS).sum() / ((cls == IMM_POS).sum() + (cls == IMM_NEG).sum())
        assert share == pytest.approx(fraction, abs=0.1)


def test_cytoplasmic_blush_is_negative_and_positives_have_membranes():
    nuc = IhcScene(PhantomSpec(2048, 2048, seed=2, tps_percent=50)).nuclei(0, 0, 2048, 2048)
    pattern = np.array(IHC_PATTERNS)[nuc["pattern"]]
    blush = pattern == "cytoplasmic"
    assert (nuc["cls"][blush] == NEG).all() and (nuc["intensity"][blush] == 0).all()
    assert 0.08 < blush[nuc["cls"] == NEG].mean() < 0.25
    pos = nuc["cls"] == POS
    assert set(pattern[pos]) == {"complete", "partial"}
    assert 0.1 < (pattern[pos] == "partial").mean() < 0.4
    shares = np.bincount(nuc["intensity"][pos], minlength=4)[1:] / pos.sum()
    assert (shares > 0.15).all()  # 1+, 2+ and 3+ all present (about 30/40/30)
    assert (nuc["intensity"][nuc["cls"] == NEG] == 0).all() and (nuc["intensity"][nuc["cls"] == OTHER] == 0).all()


def _dab_od(scene: IhcScene, rgb: np.ndarray) -> np.ndarray:
    """DAB concentration per pixel: Beer-Lambert unmixing with the slide's own stain vectors."""
    st = scene.stains
    od = -np.log(np.clip(rgb.astype(float) - st.cast_rgb, 1, 250) / 250.0)
    basis = np.stack([st.h_scale * 1.45 * st.h_od, st.dab_scale * st.dab_od], axis=1)  # (3, 2)
    conc = od.reshape(-1, 3) @ np.linalg.pinv(basis).T
    return conc[:, 1].reshape(rgb.shape[:2])


def test_membrane_rings_are_brown_and_ordered_by_intensity():
    scene = IhcScene(PhantomSpec(2048, 2048, seed=2, tps_percent=50))
    rgb = render_ihc(scene, 0, 0, 2048, 2048)
    dab = _dab_od(scene, rgb)
    nuc = scene.nuclei(40, 40, 1968, 1968)
    ring_dab = []
    for x, y, radius in zip(nuc["x"], nuc["y"], nuc["cell_um"] / scene.spec.mpp, strict=True):
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        cols = np.round(x + radius * np.cos(angles) - 0.5).astype(int)
        rows = np.round(y + radius * np.sin(angles) - 0.5).astype(int)
        ring_dab.append(dab[rows, cols].mean())
    ring_dab = np.array(ring_dab)
    full = nuc["pattern"] == IHC_PATTERNS.index("complete")
    plain_negative = (nuc["cls"] == NEG) & (nuc["pattern"] == IHC_PATTERNS.index("none"))
    means = [ring_dab[full & (nuc["cls"] == POS) & (nuc["intensity"] == i)].mean() for i in (1, 2, 3)]
    assert means[0] > ring_dab[plain_negative].mean() + 0.1  # 1+ is faint but there
    assert means[0] < means[1] < means[2]
    # Brown: the ring pixels of 3+ cells absorb blue most and red least.
    i3 = np.flatnonzero(full & (nuc["intensity"] == 3))[:50]
    samples = rgb[np.round(nuc["y"][i3]).astype(int), np.round(nuc["x"][i3] + nuc["cell_um"][i3] / 0.5).astype(int)]
    r, g, b = samples.astype(float).mean(0)
    assert r > g > b


def test_ihc_nuclear_morphology_does_not_tell_the_class():
    # The H&E ties larger, oval, vesicular nuclei to PD-L1; the IHC's counterstain must not, or a model learns
    # the nucleus instead of the DAB (it then called real DAB-free vesicular nuclei positive).
    spec = PhantomSpec(2048, 2048, seed=2, tps_percent=50)
    nuc = IhcScene(spec).nuclei(0, 0, 2048, 2048)
    pos, neg = nuc["cls"] == POS, nuc["cls"] == NEG
    for key in ("a", "s"):
        assert nuc[key][pos].mean() == pytest.approx(nuc[key][neg].mean(), rel=0.05)
    assert (nuc["s"][neg] > 0.8).mean() > 0.15 and (nuc["s"][pos] < 0.2).mean() > 0.15  # both looks in both
    he = IhcScene(spec).he.nuclei(0, 0, 2048, 2048)
    assert he["a"][he["cls"] == 0].mean() > 1.1 * he["a"][he["cls"] == 1].mean()  # the H&E keeps its link


def test_tumour_nests_carry_a_non_specific_dab_drawn_per_slide():
    levels, measured = [], []
    for seed in range(30, 36):
        scene = IhcScene(PhantomSpec(1024, 1024, seed=seed, tps_percent=0.1))
        dab = _dab_od(scene, render_ihc(scene, 0, 0, 1024, 1024))
        nuc = scene.nuclei(20, 20, 984, 984)
        # Between the cells of negative tumour: 2.0-2.4 µm beyond the nucleus, inside the cell, off any ring.
        neg = np.flatnonzero((nuc["cls"] == NEG) & (nuc["pattern"] == IHC_PATTERNS.index("none")))[:200]
        if len(neg) < 50:
            continue
        r_px = (nuc["a"][neg] + 0.8) / scene.spec.mpp
        cols = np.round(nuc["x"][neg] + r_px - 0.5).astype(int)
        rows = np.round(nuc["y"][neg] - 0.5).astype(int)
        levels.append(scene.stains.tumour_background_dab)
        measured.append(float(np.median(dab[rows, cols])))
    assert len(levels) >= 4 and max(levels) - min(levels) > 0.05 and max(levels) <= 0.2
    assert np.corrcoef(levels, measured)[0, 1] > 0.9
    # The cells stay negative whatever the background: the truth's classes are the zones', not the colour's.
    assert np.allclose(measured, levels, atol=0.05)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_transform_maps_ihc_zones_onto_he_zones(pair):
    he, ihc = pair
    he_truth, ihc_truth = load_truth(he.slide_path), load_truth(ihc.slide_path)
    ds = ihc_truth.mask_downsample
    rows, cols = np.mgrid[0 : ihc_truth.positive_mask.shape[0], 0 : ihc_truth.positive_mask.shape[1]]
    xy = np.stack([(cols.ravel() + 0.5) * ds, (rows.ravel() + 0.5) * ds], axis=1)
    ihc_mask = ihc_truth.positive_mask.ravel() == 1
    assert ihc_mask.mean() > 0.05

    def he_mask_at(points):
        c = np.clip((points[:, 0] // ds).astype(int), 0, he_truth.positive_mask.shape[1] - 1)
        r = np.clip((points[:, 1] // ds).astype(int), 0, he_truth.positive_mask.shape[0] - 1)
        return he_truth.positive_mask[r, c] == 1

    mapped = ihc_to_he_points(ihc.truth_dir, xy)
    assert _dice(ihc_mask, he_mask_at(mapped)) >= 0.9
    assert _dice(ihc_mask, he_mask_at(xy)) < 0.85  # the section really moved
    # The slide path, the truth folder and the summary give the same mapping.
    np.testing.assert_array_equal(ihc_to_he_points(ihc.slide_path, xy[:5]), mapped[:5])
    np.testing.assert_array_equal(ihc_to_he_points(ihc.summary, xy[:5]), mapped[:5])
    with pytest.raises(ValueError, match="no 'transform'"):
        ihc_to_he_points(he.truth_dir, xy[:5])


def test_section_transform_is_small_and_round_trips():
    scene = IhcScene(PhantomSpec(4096, 4096, seed=3))
    t = scene.transform
    angle = np.degrees(np.arctan2(t.matrix[1, 0], t.matrix[0, 0]))
    assert abs(angle) <= 4.0
    again = SectionTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    xs, ys = np.meshgrid(np.linspace(0, 4096, 9), np.linspace(0, 4096, 9))
    np.testing.assert_array_equal(np.stack(again.apply(xs, ys)), np.stack(t.apply(xs, ys)))
    # The deformation is smooth and of 5-15 µm RMS: remove the affine part, look at what is left.
    tx, _ = t.apply(xs, ys)
    affine_x = t.matrix[0, 0] * xs + t.matrix[0, 1] * ys + t.matrix[0, 2]
    assert 0 < np.abs(tx - affine_x).max() * 0.5 < 40


def test_rendering_is_seamless_across_tiles():
    scene = IhcScene(PhantomSpec(1024, 1024, seed=3, shift=0.6, tps_percent=60))
    whole = render_ihc(scene, 256, 256, 256, 256)
    halves = np.concatenate([render_ihc(scene, 256, 256 + y, 256, 128) for y in (0, 128)], axis=0)
    assert np.abs(whole.astype(int) - halves.astype(int)).max() <= 1


def test_levels_agree_with_level_zero(pair):
    _, ihc = pair
    osr = openslide.OpenSlide(ihc.slide_path)
    assert float(osr.properties["openslide.mpp-x"]) == 0.5 and osr.level_count == 2
    l0 = np.asarray(osr.read_region((0, 0), 0, (2048, 2048)).convert("RGB"), np.float64)
    l1 = np.asarray(osr.read_region((0, 0), 1, (512, 512)).convert("RGB"), np.float64)
    box = l0.reshape(512, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(box - l1).mean() < 8


def test_load_truth_reads_both_kinds(pair):
    he, ihc = pair
    h, i = load_truth(he.slide_path), load_truth(ihc.slide_path)
    assert h.class_names == NUCLEUS_CLASSES and i.class_names == IHC_NUCLEUS_CLASSES
    assert h.summary["stain"] == "H&E" and i.summary["stain"] == "H-DAB"
    assert (h.nuclei_intensity == 0).all() and len(h.nuclei_intensity) == len(h.nuclei_class)
    assert set(np.unique(i.nuclei_intensity)) == {0, 1, 2, 3}
    assert ((i.nuclei_intensity > 0) == np.isin(i.nuclei_class, [POS, IMM_POS])).all()
    counts = np.bincount(i.nuclei_class, minlength=5)
    assert counts.tolist() == [i.summary["nuclei_counts"][n] for n in IHC_NUCLEUS_CLASSES]


def test_load_truth_of_an_old_he_folder(pair, tmp_path):
    # Truth written before "classes" existed: the H&E classes, zero intensities.
    he, _ = pair
    old = tmp_path / "old.truth"
    old.mkdir()
    summary = dict(he.summary)
    del summary["classes"], summary["stain"]
    (old / "truth.json").write_text(json.dumps(summary))
    for name in ("nuclei.csv", "positive_mask.tif"):
        (old / name).write_bytes((he.truth_dir / name).read_bytes())
    truth = load_truth(tmp_path / "old.svs")
    assert truth.class_names == NUCLEUS_CLASSES and (truth.nuclei_intensity == 0).all()


def test_ihc_spec_validation():
    with pytest.raises(ValueError, match="immune_positive_fraction"):
        IhcSpec(immune_positive_fraction=1.5)


def test_an_ihc_phantom_written_alone_is_refused_for_registration_saying_how_to_pair_it(tmp_path):
    # It said "written with --ihc", an option of no call that reaches it (`pdl1 phantom`'s, named as such now).
    from inference import TruthNotFoundError, evaluate_registration

    alone = write_ihc_phantom(tmp_path / "i.svs", PhantomSpec(1024, 1024, seed=5))
    with pytest.raises(TruthNotFoundError) as err:
        evaluate_registration(alone.slide_path)
    assert str(err.value) == (
        f"{alone.slide_path}: its truth names no paired H&E; pass an IHC phantom written with its H&E "
        "(`pdl1 phantom --ihc`, or write_ihc_phantom's paired_with)"
    )
