"""`pdl1 train seg --unlabeled`: the pseudo-label rule on arrays, its weighted loss, the run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bridge.cli.app import app
from inference import IGNORE_LABEL, PseudoLabelRule, pseudo_label_target
from inference.analysis.regions import resample_nearest
from inference.phantom.pyramid import write_ihc_phantom, write_phantom
from inference.phantom.scene import PhantomSpec
from inference.training.train_seg import (
    PSEUDO_OFFSET,
    ce_loss,
    seg_loss,
    weighted_ce_loss,
    weighted_seg_loss,
)

runner = CliRunner()
TINY = ["--cycles", "2", "--epochs-per-cycle", "1", "--iterations", "1", "--batch-size", "2", "--patch-px", "32"]
N = IGNORE_LABEL  # no target


# prob, mutual information and tissue of a 2 x 4 map: the answers below are read off by hand.
PROB = np.array([[0.95, 0.90, 0.89, 0.50], [0.05, 0.10, 0.11, 0.99]])
MI = np.array([[0.00, 0.02, 0.00, 0.00], [0.01, 0.03, 0.00, 0.04]])
TISSUE = np.array([[True, True, True, True], [True, True, True, False]])


@pytest.mark.parametrize(
    ("margin", "mi_limit", "target", "counts"),
    [
        # p >= 0.9 positive, p <= 0.1 negative (both limits included); MI under 0.05 everywhere
        (0.1, 0.05, [[1, 1, N, N], [0, 0, N, N]], (7, 2, 2, 3, 0)),
        # a narrower margin: only p >= 0.95 and p <= 0.05
        (0.05, 0.05, [[1, N, N, N], [0, N, N, N]], (7, 1, 1, 5, 0)),
        # a stricter MI limit: (0, 1) MI 0.02 and (1, 1) MI 0.03 are confident by p but left out; 0.01 stays
        (0.1, 0.015, [[1, N, N, N], [0, N, N, N]], (7, 1, 1, 3, 2)),
        # the limit is exclusive: MI equal to it is left out
        (0.1, 0.02, [[1, N, N, N], [0, N, N, N]], (7, 1, 1, 3, 2)),
    ],
)
def test_pseudo_label_target_keeps_confident_agreeing_tissue_pixels(margin, mi_limit, target, counts):
    t = pseudo_label_target(PROB, MI, tissue=TISSUE, margin=margin, mi_limit=mi_limit)
    assert t.target.dtype == np.uint8
    assert t.target.tolist() == target
    assert (t.tissue_px, t.positive_px, t.negative_px, t.uncertain_px, t.disagreement_px) == counts
    assert t.left_out_px == t.uncertain_px + t.disagreement_px
    assert t.positive_px + t.negative_px + t.left_out_px == t.tissue_px
    # (1, 3) has p 0.99 but is not tissue: never a target, never counted
    assert t.target[1, 3] == IGNORE_LABEL


def test_pseudo_label_target_outside_tissue_is_never_a_target():
    rng = np.random.default_rng(0)
    prob = rng.random((16, 16))
    mi = rng.random((16, 16)) * 0.01
    tissue = np.zeros((16, 16), bool)
    tissue[4:12, 2:9] = True
    t = pseudo_label_target(prob, mi, tissue=tissue, margin=0.2, mi_limit=0.05)
    assert (t.target[~tissue] == IGNORE_LABEL).all()
    assert t.tissue_px == 56
    assert t.positive_px == int((prob[tissue] >= 0.8).sum())
    assert t.negative_px == int((prob[tissue] <= 0.2).sum())
    assert t.positive_px + t.negative_px + t.left_out_px == 56
    nothing = pseudo_label_target(prob, mi, tissue=np.zeros_like(tissue), margin=0.2, mi_limit=0.05)
    assert (nothing.target == IGNORE_LABEL).all() and nothing.tissue_px == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 0.5, "mi_limit": 0.05}, r"margin must lie in \(0, 0.5\), got 0.5"),
        ({"margin": 0.0, "mi_limit": 0.05}, r"margin must lie in \(0, 0.5\), got 0.0"),
        ({"margin": 0.1, "mi_limit": 0.0}, "mi_limit must be positive, got 0.0"),
    ],
)
def test_pseudo_label_target_refuses_impossible_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pseudo_label_target(PROB, MI, tissue=TISSUE, **kwargs)


def test_pseudo_label_target_refuses_maps_of_other_shapes():
    with pytest.raises(ValueError, match=r"one shape, got \(2, 4\), \(2, 4\) and \(2, 3\)"):
        pseudo_label_target(PROB, MI, tissue=TISSUE[:, :3], margin=0.1, mi_limit=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": 0.0}, r"weight must lie in \(0, 1\], got 0.0"),
        ({"weight": 1.5}, r"weight must lie in \(0, 1\], got 1.5"),
        ({"margin": 0.6}, r"margin must lie in \(0, 0.5\)"),
        ({"mi_limit": -1.0}, "limit must be positive"),
    ],
)
def test_pseudo_label_rule_checks_its_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PseudoLabelRule(**kwargs)


def test_resample_nearest_places_a_map_with_an_origin_on_a_finer_grid():
    values = np.array([[1, 2], [3, 4]], np.uint8)
    out = resample_nearest(
        values, downsample=4, origin_xy=(4.0, 0.0), shape_hw=(5, 7), out_downsample=2, fill=IGNORE_LABEL
    )
    # columns: centres at x = 1, 3 (left of the map), 5, 7 (map col 0), 9, 11 (col 1), 13 (right of it)
    assert out.tolist() == [
        [N, N, 1, 1, 2, 2, N],
        [N, N, 1, 1, 2, 2, N],
        [N, N, 3, 3, 4, 4, N],
        [N, N, 3, 3, 4, 4, N],
        [N, N, N, N, N, N, N],
    ]


def test_weighted_losses_equal_the_plain_ones_on_labels_and_weigh_pseudo_labels():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 6, 6, generator=gen)
    labels = torch.randint(0, 2, (2, 6, 6), generator=gen)
    labels[:, :2] = IGNORE_LABEL
    for plain, weighted in ((ce_loss, weighted_ce_loss), (seg_loss, weighted_seg_loss)):
        # labels alone: the plain loss
        assert torch.isclose(weighted(logits, labels, pseudo_weight=0.3), plain(logits, labels))
        # the same targets as pseudo-labels of weight 1: the same loss
        as_pseudo = torch.where(labels == IGNORE_LABEL, labels, labels + PSEUDO_OFFSET)
        assert torch.isclose(weighted(logits, as_pseudo, pseudo_weight=1.0), plain(logits, labels))
        # pseudo-labels alone of a lower weight: a lower loss (the cross-entropy exactly w times, below)
        assert weighted(logits, as_pseudo, pseudo_weight=0.3) < plain(logits, labels)
        assert weighted(logits, torch.full_like(labels, IGNORE_LABEL), pseudo_weight=0.3).item() == 0.0
    assert torch.isclose(weighted_ce_loss(logits, as_pseudo, pseudo_weight=0.3), 0.3 * ce_loss(logits, labels))
    # a mixed batch: labels count 1, pseudo-labels 0.3 (per-pixel cross-entropy, summed by hand)
    mixed = labels.clone()
    mixed[1] = torch.where(labels[1] == IGNORE_LABEL, labels[1], labels[1] + PSEUDO_OFFSET)
    ce = torch.nn.functional.cross_entropy(logits, labels.masked_fill(labels == IGNORE_LABEL, 0), reduction="none")
    known = labels != IGNORE_LABEL
    expected = (ce[0][known[0]].sum() + 0.3 * ce[1][known[1]].sum()) / known.sum()
    assert torch.isclose(weighted_ce_loss(logits, mixed, pseudo_weight=0.3), expected)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pseudo")
    write_phantom(folder / "labelled.svs", PhantomSpec(1024, 1024, seed=23, tps_percent=50))
    write_phantom(folder / "unlabelled.svs", PhantomSpec(1024, 1024, seed=24, tps_percent=40, shift=0.5))
    return folder


@pytest.mark.slow
def test_pdl1_train_seg_with_unlabeled_records_the_pseudo_labels_it_used(phantoms, tmp_path):
    out = tmp_path / "model"
    args = ["train", "seg", str(phantoms / "labelled.svs"), "--unlabeled", str(phantoms / "unlabelled.svs")]
    args += ["--pseudo-margin", "0.05", "--pseudo-mi-limit", "0.03", "--pseudo-weight", "0.5"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    pseudo = training["pseudo_labels"]
    assert (pseudo["margin"], pseudo["mi_limit"], pseudo["weight"]) == (0.05, 0.03, 0.5)
    assert pseudo["teacher"]["name"] == "pdl1-seg"  # phantoms train from scratch: the demo ensemble teaches
    (row,) = pseudo["slides"]
    assert row["slide"] == str(phantoms / "unlabelled.svs") and row["stain"] == "H&E"
    # 1024² px at 0.5 µm/px is 256² px at the teacher's 2 µm/px; the phantom is mostly tissue
    assert 0.3 * 256**2 < row["tissue_px"] <= 256**2
    assert row["positive_px"] > 0 and row["negative_px"] > 0 and row["left_out_uncertain_px"] > 0
    used = row["positive_px"] + row["negative_px"]
    assert used + row["left_out_uncertain_px"] + row["left_out_disagreement_px"] == row["tissue_px"]
    assert training["config"]["unlabeled"][0]["path"] == str(phantoms / "unlabelled.svs")
    assert training["config"]["pseudo_weight"] == 0.5
    share = row["tissue_px"] / 256**2
    assert f"{row['tissue_px']} tissue px ({share:.0%} of the image" in " ".join(result.output.split())
    text = " ".join(result.output.split())
    assert f"used {row['positive_px']} positive and {row['negative_px']} negative" in text
    assert f"left out {row['left_out_uncertain_px'] + row['left_out_disagreement_px']} not confident" in text
    # the labelled data are the phantom's truth alone
    assert [d["slide"] for d in training["data"]] == ["labelled.svs"]


@pytest.mark.slow
def test_pdl1_train_seg_refuses_unlabeled_slides_it_cannot_pseudo_label(phantoms, tmp_path):
    base = ["train", "seg", str(phantoms / "labelled.svs"), "--out", str(tmp_path / "m"), *TINY, "--no-progress"]

    def fails(*extra: str) -> str:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1, result.output
        assert not (tmp_path / "m" / "manifest.json").exists()
        return " ".join(result.output.split())

    assert "--unlabeled nope.svs: no such file" in fails("--unlabeled", "nope.svs")
    assert "is also a labelled training slide" in fails("--unlabeled", str(phantoms / "labelled.svs"))
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not an image")
    text = fails("--unlabeled", str(broken))
    assert f"unlabelled slide {broken}:" in text and "leave it out of --unlabeled" in text
    png = tmp_path / "no_mpp.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    text = fails("--unlabeled", str(png))
    assert "unlabelled slide" in text and "states no microns per pixel" in text and "Pseudo-labels need" in text
    assert "--mpp" not in text  # pdl1 train seg has no such option
    ihc = tmp_path / "ihc.svs"
    write_ihc_phantom(ihc, PhantomSpec(1024, 1024, seed=25, tps_percent=40))
    text = fails("--unlabeled", str(ihc))
    assert f"unlabelled slide {ihc} is H-DAB" in text and "was trained on H&E" in text


def test_the_rest_of_a_labelled_slide_it_cannot_pseudo_label_is_told_to_leave_out_pseudo_label_rest(tmp_path):
    # --pseudo-label-rest adds the labelled slides themselves, never given with --unlabeled: "Leave it out of
    # --unlabeled" named an option the user had not used.
    ihc = tmp_path / "ihc.svs"
    write_ihc_phantom(ihc, PhantomSpec(1024, 1024, seed=25, tps_percent=40))
    box = [[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]
    region = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [box]},
        "properties": {"objectType": "annotation", "classification": {"name": "Training region"}},
    }
    labels = tmp_path / "ihc.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "features": [region]}))
    args = ["train", "seg", str(ihc), "--labels", str(labels), "--pseudo-label-rest", "--out", str(tmp_path / "m")]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"], env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert f"unlabelled slide {ihc} (the rest of its labels) is H-DAB" in text
    assert (
        "only slides of that stain: leave out --pseudo-label-rest (or the slide and its labels); if it is H&E" in text
    )
    assert "out of --unlabeled" not in text and not (tmp_path / "m" / "manifest.json").exists()


def test_unlabeled_names_files_or_entries_of_the_project_trained_on(fixtures_dir, tmp_path):
    import shutil

    from bridge.labels import LabelError, unlabeled_slides

    labelled = fixtures_dir / "qupath-0.4.4-labels"
    shutil.copytree(labelled / "project", tmp_path / "project")
    (tmp_path / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    project = tmp_path / "project"
    (entry,) = unlabeled_slides(["2"], project=project)
    assert entry.path == str(tmp_path / "he-1357.svs")  # found beside the moved project
    assert entry.name.endswith("entry 2 (he-1357.svs)")
    assert entry.mpp is not None and abs(entry.mpp - 0.5) < 0.01  # QuPath's calibration comes along
    (plain,) = unlabeled_slides([str(tmp_path / "he-1357.svs")])
    assert (plain.path, plain.mpp, plain.stain) == (str(tmp_path / "he-1357.svs"), None, None)
    with pytest.raises(LabelError, match=r"--unlabeled 9: no such file, and .* has no such entry; it has 1 \(he-"):
        unlabeled_slides(["9"], project=project)
    with pytest.raises(LabelError, match=r"--unlabeled 9: no such file\. Give slide files, or entries"):
        unlabeled_slides(["9"])
    with pytest.raises(LabelError, match=r"entry 2 .* is also a labelled training slide"):
        unlabeled_slides(["2"], project=project, labelled=[str(labelled / "he-1357.svs")])


def test_a_pseudo_labelled_slide_carries_its_targets_offset_and_draws_patches_on_them(phantoms):
    from inference import PseudoTarget, UnlabeledSlide
    from inference.training.pseudo import PseudoLabels
    from inference.training.train_seg import load_pseudo_slide

    slide = UnlabeledSlide(str(phantoms / "unlabelled.svs"))
    target = np.full((256, 256), IGNORE_LABEL, np.uint8)  # 1024² px at 0.5 µm/px, read at 2 µm/px
    target[100:120, 100:140] = 1
    target[2:12, 2:12] = 0  # within half a patch of the edge: a target, never a patch centre
    counts = PseudoTarget(target, 900, 800, 100, 0, 0)
    data = load_pseudo_slide(PseudoLabels(slide, target, 2.0, counts, 2.0, "H&E", "test"), input_mpp=2.0, patch_px=32)
    assert data.rgb.shape == (256, 256, 3)
    assert np.unique(data.mask).tolist() == [PSEUDO_OFFSET, PSEUDO_OFFSET + 1, IGNORE_LABEL]
    assert (data.mask[100:120, 100:140] == PSEUDO_OFFSET + 1).all()
    assert data.positive_idx.size == 800 and data.tissue_idx.size == 800  # the negatives lie at the edge
    with pytest.raises(ValueError, match=r"pseudo-labels of \(128, 128\) px for an image read as \(256, 256\) px"):
        load_pseudo_slide(
            PseudoLabels(slide, target[:128, :128], 2.0, counts, 2.0, "H&E", "test"), input_mpp=2.0, patch_px=32
        )


def test_a_labelled_slide_takes_pseudo_labels_on_its_rest_and_its_labels_win():
    from inference.training.train_seg import _SlideData, with_pseudo_rest

    rgb = np.zeros((64, 64, 3), np.uint8)
    labels = np.full((64, 64), IGNORE_LABEL, np.uint8)
    labels[20:30, 20:30] = 1  # a reviewed positive area
    labels[40:44, 40:44] = 0
    pseudo = np.full((64, 64), IGNORE_LABEL, np.uint8)
    pseudo[:, :32] = PSEUDO_OFFSET  # the teacher: confidently negative on the left half...
    pseudo[50:60, 50:60] = PSEUDO_OFFSET + 1  # ...and positive here

    def item(mask: np.ndarray, positive: int) -> _SlideData:
        return _SlideData("s", rgb, mask, np.flatnonzero(mask == positive), np.flatnonzero(mask != N), {})

    merged = with_pseudo_rest(item(labels, 1), item(pseudo, PSEUDO_OFFSET + 1), patch_px=8)
    assert (merged.mask[20:30, 20:30] == 1).all()  # the label wins over the teacher's negative
    assert (merged.mask[40:44, 40:44] == 0).all() and (merged.mask[50:60, 50:60] == PSEUDO_OFFSET + 1).all()
    assert (merged.mask[0:20, 0:20] == PSEUDO_OFFSET).all() and (merged.mask[0:20, 40:64] == N).all()
    # Positive patches stay on what a person labelled; other patches on any target pixel away from the edge.
    assert set(merged.positive_idx.tolist()) == set(np.flatnonzero(labels == 1).tolist())
    assert merged.tissue_idx.size == ((merged.mask != N)[4:60, 4:60]).sum()
    # Without labelled positives the teacher's positives take the positive share.
    no_positive = with_pseudo_rest(
        item(np.where(labels == 1, N, labels), 1), item(pseudo, PSEUDO_OFFSET + 1), patch_px=8
    )
    assert set(no_positive.positive_idx.tolist()) <= set(np.flatnonzero(pseudo == PSEUDO_OFFSET + 1).tolist())
    assert no_positive.positive_idx.size > 0
    with pytest.raises(ValueError, match="labels on a"):
        with_pseudo_rest(item(labels, 1), item(pseudo[:32], PSEUDO_OFFSET + 1), patch_px=8)


def test_pseudo_label_slides_advises_in_the_library_arguments_words(tmp_path):
    """Called from Python, an unlabelled slide refused is left out of ``slides`` and given its ``mpp``: the library
    named `pdl1 train seg`'s --unlabeled and QuPath's calibration (pdl1's words stay pdl1's: the test above)."""
    from inference import MissingMppError, SlideFormatError, UnlabeledSlide, demo_model_dir, pseudo_label_slides

    rule = PseudoLabelRule(margin=0.1, mi_limit=0.05, weight=1.0)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not an image")
    with pytest.raises(SlideFormatError) as err:
        pseudo_label_slides(demo_model_dir("seg"), [UnlabeledSlide(path=str(broken))], rule=rule, input_mpp=2.0)
    assert str(err.value).endswith("; leave it out of slides or fix the file"), err.value
    png = tmp_path / "no_mpp.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    with pytest.raises(MissingMppError) as err:
        pseudo_label_slides(demo_model_dir("seg"), [UnlabeledSlide(path=str(png))], rule=rule, input_mpp=2.0)
    assert "--" not in str(err.value) and "QuPath" not in str(err.value) and str(err.value).endswith(" as mpp")


def test_pdl1_train_seg_names_a_training_slide_too_coarse_before_pseudo_labelling_any(phantoms, tmp_path, monkeypatch):
    """A training slide too coarse for --input-mpp was found as the training slides were read, after every
    unlabelled slide had been segmented for its pseudo-labels (minutes each) and the slides before it read."""
    import inference.analysis.segment as segment
    import inference.training.train_seg as train_seg

    coarse = tmp_path / "coarse.svs"
    write_phantom(coarse, PhantomSpec(1024, 1024, seed=26, tps_percent=40, mpp=2.0))
    work = []
    for module, name in ((segment, "segment_slide"), (train_seg, "load_training_slide")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: work.append(_name) or _real(*a, **k))
    args = [
        "train",
        "seg",
        str(phantoms / "labelled.svs"),
        str(coarse),
        "--unlabeled",
        str(phantoms / "unlabelled.svs"),
    ]
    result = runner.invoke(app, [*args, "--input-mpp", "0.5", "--out", str(tmp_path / "m"), *TINY, "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert (
        f"{coarse}: its pixels are 2 µm (from openslide.mpp-x/y), but segmentation training reads 0.5 µm/px: it would "
        "enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, `pdl1 train seg` "
        "(whose --input-mpp is the model's resolution, not the slides') reads each phantom at the pixel size"
    ) in text
    assert work == [] and not (tmp_path / "m").exists()


def test_pseudo_label_slides_names_every_unlabelled_slide_it_refuses_together(tmp_path):
    """The first refused unlabelled slide ended the check, and the next was found on the run after."""
    from inference import Pdl1Error, UnlabeledSlide, demo_model_dir, pseudo_label_slides

    broken, coarse = tmp_path / "broken.svs", tmp_path / "coarse.png"
    broken.write_bytes(b"not an image")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(coarse, dpi=(5080, 5080))  # 5 µm/px
    items = [UnlabeledSlide(path=str(broken)), UnlabeledSlide(path=str(coarse))]
    rule = PseudoLabelRule(margin=0.1, mi_limit=0.05, weight=1.0)
    with pytest.raises(Pdl1Error) as err:  # two kinds: their common base
        pseudo_label_slides(demo_model_dir("seg"), items, rule=rule, input_mpp=2.0)
    text = str(err.value)
    assert type(err.value) is Pdl1Error
    assert text.startswith("2 of 2 unlabelled slides cannot be pseudo-labelled, so none was:\n"), text
    assert f"unlabelled slide {broken}:" in text
    assert (
        f"{coarse}: its pixels are 5 µm (from image dpi), but the pseudo-labelling ensemble 'pdl1-seg' reads 2 µm/px"
    ) in text
