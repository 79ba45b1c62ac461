"""Training on a lab's own labels: the masked loss, sparse batches, fine-tuning, and `pdl1 train nuclei` end to end."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.labels import LabelRules, export_path, labels_from_objects
from bridge.qupath_geojson import QuPathObject
from inference import ModelFileError, demo_model_dir
from inference.models.nuclei_model import DilatedResFCN
from inference.training.cyclic import init_weights
from inference.training.labels import SlideLabels
from inference.training.train_nuclei import (
    _NucleiData,
    focal_loss,
    masked_focal_loss,
    sample_nuclei_batch,
)
from tests.helpers import exported_labelled_project

runner = CliRunner()
TINY = ["--cycles", "2", "--epochs-per-cycle", "1", "--iterations", "1", "--batch-size", "2", "--patch-px", "32"]
TINY_2_MEMBERS = ["--cycles", "3", *TINY[2:]]  # the first cycle is dropped: two members to score one by one
HE_CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")


def test_the_masked_loss_ignores_unknown_pixels_and_equals_the_focal_loss_where_all_are_known():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=rng)
    heat = torch.zeros(2, 3, 8, 8)
    heat[0, 1, 2, 2] = 1.0
    heat[0, 1, 2, 3] = 0.6
    known = torch.ones(2, 1, 8, 8)
    everything = masked_focal_loss(logits, torch.cat([heat, known], 1))
    assert torch.isclose(everything, focal_loss(logits, heat))
    known[:, :, 5:, :] = 0  # the bottom rows are not labels: whatever is predicted there costs nothing
    before = masked_focal_loss(logits, torch.cat([heat, known], 1))
    changed = logits.clone()
    changed[:, :, 5:, :] = 9.0
    assert torch.isclose(masked_focal_loss(changed, torch.cat([heat, known], 1)), before)
    assert not torch.isclose(focal_loss(changed, heat), focal_loss(logits, heat))


def test_sparse_batches_carry_the_known_mask_as_their_last_channel():
    known = np.zeros((64, 64), bool)
    known[:, :32] = True
    d = _NucleiData(
        "s",
        np.full((64, 64, 3), 200, np.uint8),
        np.array([[10.0, 10.0]]),
        np.array([2]),
        {},
        HE_CLASSES,
        np.zeros(1, np.int64),
        known,
    )
    images, targets = sample_nuclei_batch([d], np.random.default_rng(0), batch_size=4, patch_px=32, sigma_px=1.5)
    assert images.shape == (4, 32, 32, 3) and targets.shape == (4, 32, 32, 4)
    for t in targets:
        # A crop of the mask (known where x < 32): every row alike, up to the rotations and flips.
        mask = t[..., 3]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (mask == mask[:1]).all() or (mask == mask[:, :1]).all()
    assert targets[..., 3].any() and not targets[..., 3].all()


def test_fine_tuning_refuses_a_model_of_other_classes():
    kwargs = {"in_channels": 3, "n_classes": 3, "width": 32, "dilations": [1, 2, 4, 8]}
    model = DilatedResFCN(**{**kwargs, "dilations": (1, 2, 4, 8)})
    common = {"task": "nuclei", "architecture": "DilatedResFCN", "stain": "H&E"}
    sha = init_weights(model, demo_model_dir("nuclei"), **common, arch_kwargs=kwargs, class_names=HE_CLASSES)
    assert sha == json.loads((demo_model_dir("nuclei") / "manifest.json").read_text())["members"][-1]["sha256"]
    # The library's advice names its arguments (a Python caller has no --init, no --class-map).
    said = r"init_model has the classes .*; map the label classes onto the model's \(class_names\) or train from "
    with pytest.raises(ModelFileError, match=said + r"scratch \(init_model=None\)$"):
        init_weights(model, demo_model_dir("nuclei"), **common, arch_kwargs=kwargs, class_names=("a", "b", "c"))
    with pytest.raises(
        ModelFileError, match=r"init_model needs a DilatedResFCN with .*'width': 16.*\(init_model=None\)$"
    ):
        init_weights(
            model, demo_model_dir("nuclei"), **common, arch_kwargs={**kwargs, "width": 16}, class_names=HE_CLASSES
        )
    # A model of another task or stain is named as such, not by its architecture or classes.
    ihc = demo_model_dir("nuclei-ihc")
    said = r"is an H-DAB \(PD-L1 IHC\) nuclei model, but an H&E nuclei model is needed to fine-tune from \(init_model\)"
    with pytest.raises(ModelFileError, match=said):
        init_weights(model, ihc, **common, arch_kwargs=kwargs, class_names=HE_CLASSES)
    said = r"is an H&E nuclei model, but an H&E segmentation model is needed to fine-tune from \(init_model\); give one"
    with pytest.raises(ModelFileError, match=said):
        init_weights(
            model,
            demo_model_dir("nuclei"),
            **{**common, "task": "segmentation"},
            arch_kwargs=kwargs,
            class_names=HE_CLASSES,
        )


def test_fine_tuning_refusals_name_pdl1_trains_options_in_its_words():
    from bridge.cli.train import NUCLEI_TRAIN_WORDS

    kwargs = {"in_channels": 3, "n_classes": 3, "width": 32, "dilations": [1, 2, 4, 8]}
    model = DilatedResFCN(**{**kwargs, "dilations": (1, 2, 4, 8)})
    common = {"task": "nuclei", "architecture": "DilatedResFCN", "stain": "H&E", "setting": NUCLEI_TRAIN_WORDS}
    said = r"--init has the classes .*; map the label classes onto the model's \(--class-map\) or train from scratch"
    with pytest.raises(ModelFileError, match=said + r" \(--init none\)$"):
        init_weights(model, demo_model_dir("nuclei"), **common, arch_kwargs=kwargs, class_names=("a", "b", "c"))
    with pytest.raises(ModelFileError, match=r"--init needs a DilatedResFCN with .*'width': 16.*\(--init none\)$"):
        init_weights(
            model, demo_model_dir("nuclei"), **common, arch_kwargs={**kwargs, "width": 16}, class_names=HE_CLASSES
        )


def test_fine_tuning_a_segmentation_model_of_other_classes_offers_no_class_map():
    # pdl1 train seg has no --class-map (a segmentation's classes are fixed), and was told to map its labels with it.
    from bridge.cli.train import SEG_TRAIN_WORDS
    from inference.models.manifest import read_manifest
    from inference.models.unet import PlainConvUNet

    demo = demo_model_dir("seg")
    kwargs = read_manifest(demo, verify=False).architecture_kwargs
    model = PlainConvUNet(**{**kwargs, "features": tuple(kwargs["features"])})
    with pytest.raises(ModelFileError) as err:
        init_weights(
            model,
            demo,
            task="segmentation",
            architecture="PlainConvUNet",
            arch_kwargs=kwargs,
            class_names=("background", "tumour"),
            stain="H&E",
            setting=SEG_TRAIN_WORDS,
        )
    said = str(err.value)
    assert said.endswith(
        "the labels ['background', 'tumour']; give a model of the classes ['background', 'tumour'] or train from "
        "scratch (--init none)"
    ), said
    assert "--class-map" not in said


def test_pdl1_train_nuclei_fine_tuning_a_model_of_another_stain_names_init(finetune_phantom, tmp_path):
    # Deep in the training library, after the slides are read: the CLI passes its words down (NUCLEI_TRAIN_WORDS).
    ihc = str(demo_model_dir("nuclei-ihc"))
    args = ["train", "nuclei", finetune_phantom, "--init", ihc, "--out", str(tmp_path / "m"), *TINY, "--no-progress"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "but an H&E nuclei model is needed to fine-tune from (--init); give one, or train from scratch" in text
    assert text.endswith("(--init none)") and "init_model" not in text, text


def test_pdl1_train_seg_refuses_an_init_model_of_another_kind_before_making_its_folder(finetune_phantom, tmp_path):
    # Checked as each chain loaded it, after the slides were read and the folder made: an empty folder was left.
    out = tmp_path / "m"
    nuclei = str(demo_model_dir("nuclei"))
    args = ["train", "seg", finetune_phantom, "--init", nuclei, "--out", str(out), *TINY, "--no-progress"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "but an H&E segmentation model is needed to fine-tune from (--init); give one, or train from" in text
    assert not out.exists()


def _points_of(*classes: int) -> SlideLabels:
    return SlideLabels(
        "s.svs",
        (100, 100),
        points_xy=np.full((len(classes), 2), 5.0),
        points_class=np.asarray(classes, np.int64),
        class_names=HE_CLASSES,
    )


def test_nuclei_labels_all_of_one_class_are_warned_of():
    # Points of one class trained without a word, where region labels 90 % one class are warned of.
    from bridge.cli.train import one_class_points_warning

    assert one_class_points_warning([_points_of(0, 0), _points_of(0)]) == (
        "warning: all 3 nucleus points are Tumor: Positive: a model trained on them is taught that every nucleus is "
        "Tumor: Positive. Mark nuclei of the other classes too (Tumor: Negative, Other)"
    )
    assert one_class_points_warning([_points_of(0, 0), _points_of(2)]) is None  # two classes over the slides
    assert one_class_points_warning([_points_of(1, *[0] * 99)]) is None  # lopsided, as a slide with TPS 99 %
    assert one_class_points_warning([_points_of()]) is None


def test_a_run_on_labels_says_what_it_starts_from():
    # With --features or --input-mpp other than the demo's, --init's default went from scratch without a word.
    from bridge.cli.train import starting_point

    words = {"demo": "features 8,16,32,64 at 2 µm/px", "options": "--features and --input-mpp"}
    assert starting_point(None, "demo/seg", run="x", **words) == (
        "starting from demo/seg (its last member; --init none trains from scratch)"
    )
    assert starting_point(None, None, run="features 4,8 at 2 µm/px", **words) == (
        "starting from scratch: the shipped demo model is features 8,16,32,64 at 2 µm/px, this run features 4,8 at "
        "2 µm/px; to fine-tune it, train at its architecture (the defaults of --features and --input-mpp), or give "
        "--init MODEL of this run's"
    )
    assert starting_point("none", None, run="x", **words) == "starting from scratch (--init none)"
    assert starting_point(None, "demo/seg", run="x", resuming=Path("m"), **words) == (
        "continuing the interrupted run in m from its checkpoint (it started from demo/seg)"
    )


@pytest.fixture(scope="module")
def labelled(fixtures_dir) -> Path:
    return fixtures_dir / "qupath-0.4.4-labels"


@pytest.mark.slow
def test_pdl1_train_nuclei_on_a_slide_and_its_geojson_records_the_labels(labelled, tmp_path):
    out = tmp_path / "model"
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    args = ["train", "nuclei", str(labelled / "he-1357.svs"), "--labels", str(geojson), "--out", str(out)]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "points: Tumor: Positive 440" in result.output
    assert f"wrote {out}: 1 member member_00.safetensors (cycle 1, epoch 1)" in result.output  # not '1 members'
    training = json.loads((out / "manifest.json").read_text())["training"]
    (record,) = training["data"]
    assert record["source"] == str(geojson)
    assert record["counts"]["points: Other"] == 91
    assert len(record["labels_sha256"]) == 64
    demo = json.loads((demo_model_dir("nuclei") / "manifest.json").read_text())
    assert training["init"]["member_sha256"] == demo["members"][-1]["sha256"]  # the demo by default


@pytest.mark.slow
def test_pdl1_train_nuclei_on_a_project_from_its_exports_from_scratch(labelled, tmp_path):
    shutil.copytree(labelled / "project", tmp_path / "project")
    (tmp_path / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    exported = export_path(tmp_path / "project", "1")
    exported.parent.mkdir(parents=True)
    features = json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())["features"]
    exported.write_text(json.dumps(features))
    out = tmp_path / "model"
    args = ["train", "nuclei", str(tmp_path / "project"), "--entries", "1", "--qupath", "never", "--init", "none"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["init"] is None
    assert "entry 1 (he-1357.svs)" in training["data"][0]["source"]
    assert training["config"]["slides"] == [str(tmp_path / "he-1357.svs")]


def _ihc_points_geojson(ihc: Path, path: Path, box: tuple[int, int, int, int]) -> Path:
    """A pathologist's labels of a PD-L1 IHC phantom as QuPath exports them: one 'Training region (all nuclei
    marked)' over ``box`` (level-0 px) and a point annotation of the IHC class of every true nucleus inside it."""
    from inference.phantom.truth import load_truth

    truth = load_truth(ihc)
    x0, y0, x1, y1 = box
    inside = (truth.nuclei_xy[:, 0] > x0) & (truth.nuclei_xy[:, 0] < x1)
    inside &= (truth.nuclei_xy[:, 1] > y0) & (truth.nuclei_xy[:, 1] < y1)
    region = {
        "type": "Feature",
        "geometry": json.loads(shapely.to_geojson(shapely.box(*box))),
        "properties": {
            "objectType": "annotation",
            "name": "Training region (all nuclei marked)",
            "classification": {"name": "Training region"},
        },
    }
    points = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
            "properties": {"objectType": "annotation", "classification": {"name": truth.class_names[c]}},
        }
        for (x, y), c in zip(truth.nuclei_xy[inside], truth.nuclei_class[inside], strict=True)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [region, *points]}))
    return path


@pytest.mark.slow
def test_pdl1_train_nuclei_stain_ihc_fine_tunes_the_ihc_model_on_points_marked_on_an_ihc(ihc_pair, tmp_path):
    _, ihc = ihc_pair
    geojson = _ihc_points_geojson(ihc, tmp_path / "ihc_271.geojson", (512, 512, 1536, 1536))
    out = tmp_path / "model"
    args = ["train", "nuclei", str(ihc), "--labels", str(geojson), "--out", str(out), *TINY, "--no-progress"]
    # As H&E labels (the default), the IHC classes are not the model's: refused, naming the way an IHC trains.
    refused = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert refused.exit_code != 0 and not out.exists()
    assert "points on IHC slides train it with --stain ihc" in " ".join(refused.output.split()), refused.output
    result = runner.invoke(app, [*args, "--stain", "ihc"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "points: Tumor: Positive" in result.output and "points: Immune cells: PD-L1 negative" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    shipped = json.loads((demo_model_dir("nuclei-ihc") / "manifest.json").read_text())
    assert manifest["stain"] == "H-DAB" and manifest["name"] == "pdl1-nuclei-ihc"
    assert manifest["class_names"] == shipped["class_names"]
    assert manifest["training"]["init"]["member_sha256"] == shipped["members"][-1]["sha256"]  # the IHC demo
    # Points say positive or negative, not 1+/2+/3+: the grades' limits are the shipped model's, not refitted.
    for key in ("intensity_1plus_od", "intensity_2plus_od", "intensity_3plus_od", "membrane_inner_um"):
        assert manifest["thresholds"][key] == shipped["thresholds"][key]
    # --stain is the labels': phantom truth states its own.
    phantom_args = ["train", "nuclei", str(ihc), "--stain", "ihc", "--out", str(tmp_path / "p"), *TINY]
    phantom = runner.invoke(app, phantom_args, env={"COLUMNS": "400"})
    assert phantom.exit_code == 2 and "phantom truth states its own" in phantom.output
    assert not (tmp_path / "p").exists()
    bad = runner.invoke(app, [*args, "--stain", "dab"], env={"COLUMNS": "400"})
    assert bad.exit_code == 2 and "expected he or ihc (or H&E, H-DAB), got 'dab'" in bad.output


def test_pdl1_train_nuclei_usage_errors(labelled, tmp_path):
    slide = str(labelled / "he-1357.svs")
    result = runner.invoke(app, ["train", "nuclei", slide, slide, "--labels", slide, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "one GeoJSON per slide" in result.output
    result = runner.invoke(app, ["train", "nuclei", slide, "--entries", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--entries chooses entries of a QuPath project" in result.output
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps([_point_feature(5000, 10)]))
    result = runner.invoke(app, ["train", "nuclei", slide, "--labels", str(bad), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "1 of 1 points lie outside the 2048 x 2048 px image" in " ".join(result.output.split())
    # Said before any label is read: a model folder is not trained over, one cycle leaves no member.
    demo = str(demo_model_dir("nuclei"))
    result = runner.invoke(app, ["train", "nuclei", slide, "--labels", str(bad), "--out", demo])
    assert result.exit_code == 1 and "already holds a model (manifest.json)" in " ".join(result.output.split())
    result = runner.invoke(app, ["train", "seg", slide, "--cycles", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--no-drop-first-cycle" in result.output


@pytest.mark.parametrize("task", ["seg", "nuclei"])
def test_a_slide_whose_geojson_holds_no_labels_is_told_to_leave_the_slide_out_not_an_entry(labelled, tmp_path, task):
    # `pdl1 train seg|nuclei SLIDE --labels X.geojson` was told "or leave the entry out (--entries)", an option
    # refused for slide files ("--entries chooses entries of a QuPath project").
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    args = ["train", task, str(labelled / "he-1357.svs"), "--labels", str(empty), "--out", str(tmp_path / "m")]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert f"{empty}: no labels (no objects); draw 'Training region'" in text
    assert "or leave the slide and its GeoJSON (--labels) out" in text and "--entries" not in text


@pytest.mark.parametrize(
    ("task", "offered"),
    [("seg", None), ("nuclei", "(or give `--stain ihc`)")],
)
def test_a_labelled_slide_of_the_other_stain_is_offered_stain_only_where_the_command_has_it(
    ihc_pair, tmp_path, caplog, task, offered
):
    # pdl1 train seg (and pdl1 export nnunet) have no --stain, and were told "leave it out (or give `--stain ihc`)".
    _, ihc = ihc_pair
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    args = ["train", task, str(ihc), "--labels", str(empty), "--out", str(tmp_path / "m")]
    with caplog.at_level("WARNING", logger="bridge.labels"):
        result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output  # no labels in the file: refused after the warning
    (said,) = [r.getMessage() for r in caplog.records if "its colour says H-DAB" in r.getMessage()]
    if offered is None:
        assert "--stain" not in said and "if it is another stain, leave it out; if it is an H&E" in said, said
    else:
        assert f"if it is another stain, leave it out {offered}; if it is an H&E" in said, said


@pytest.mark.parametrize(
    ("args", "named", "not_named"),
    [
        (["seg", "--from-review"], "--from-review applies", ["--class-map", "--ihc-band-um"]),
        (["seg", "--ihc-band-um", "20", "--from-review"], "--from-review and --ihc-band-um apply", ["--class-map"]),
        (["nuclei", "--class-map", "Lymphocyte=Other"], "--class-map applies", ["--from-review", "--ihc-band-um"]),
    ],
    ids=["seg-review", "seg-band-and-review", "nuclei-class-map"],
)
def test_label_options_on_phantom_truth_name_only_those_given(tmp_path, args, named, not_named):
    # Both commands said "--from-review, --class-map and --ihc-band-um apply to QuPath labels": seg has no
    # --class-map, nuclei no --ihc-band-um.
    task, *options = args
    result = runner.invoke(
        app,
        ["train", task, str(tmp_path / "phantom.svs"), *options, "--out", str(tmp_path / "m")],
        env={"COLUMNS": "400"},
    )
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, text
    assert f"{named} to QuPath labels (a project or --labels), not to phantom truth" in text, text
    for option in not_named:
        assert option not in text


def _point_feature(x: float, y: float) -> dict:
    return {
        "type": "Feature",
        "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": {"objectType": "annotation", "classification": {"name": "Other", "color": [255, 200, 0]}},
    }


def test_labels_for_training_keep_their_classes_in_the_model_s_order():
    labels = labels_from_objects(
        [QuPathObject(shapely.MultiPoint([(1, 1)]), "annotation", "Tumor: Negative")],
        slide="s",
        image_size_px=(10, 10),
        rules=LabelRules(HE_CLASSES),
    )
    assert labels.class_names == HE_CLASSES and labels.points_class.tolist() == [1]


def test_segmentation_losses_leave_unlabelled_pixels_out_and_are_unchanged_on_full_truth():
    from inference import IGNORE_LABEL
    from inference.training.train_seg import ce_loss, seg_loss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 6, 6, generator=gen)
    target = torch.randint(0, 2, (2, 6, 6), generator=gen)
    full = torch.nn.functional.cross_entropy(logits, target)
    assert torch.isclose(ce_loss(logits, target), full)
    sparse = target.clone()
    sparse[:, :3] = IGNORE_LABEL
    before = seg_loss(logits, sparse)
    changed = logits.clone()
    changed[:, :, :3] = -changed[:, :, :3] * 5  # anything where there are no labels
    assert torch.isclose(seg_loss(changed, sparse), before)
    assert ce_loss(logits, torch.full_like(target, IGNORE_LABEL)).item() == 0.0  # a batch with no labels


@pytest.mark.slow
def test_pdl1_train_seg_on_a_slide_and_its_geojson_with_reviewed_candidates(labelled, tmp_path):
    out = tmp_path / "seg"
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    args = ["train", "seg", str(labelled / "he-1357.svs"), "--labels", str(geojson), "--from-review"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "manifest.json").read_text())["training"]["data"]
    assert record["counts"]["reviewed: PD-L1 positive"] == 1
    assert record["counts"]["skipped: points (a segmentation run)"] == 1252
    # Labelled: the two regions and the drawn areas at 2 µm/px (the fixture is 0.5 µm/px: 4x), less Ignore*.
    assert 0.1 < record["labelled_px"] / 512**2 < 0.6
    assert 0 < record["positive_fraction_of_labelled"] < 0.5
    demo = json.loads((demo_model_dir("seg") / "manifest.json").read_text())
    assert (
        json.loads((out / "manifest.json").read_text())["training"]["init"]["member_sha256"]
        == (demo["members"][-1]["sha256"])
    )


@pytest.mark.slow
def test_pdl1_train_seg_pseudo_labels_the_rest_of_reviewed_slides_when_asked(labelled, tmp_path):
    out = tmp_path / "seg"
    slide = str(labelled / "he-1357.svs")
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    args = ["train", "seg", slide, "--labels", str(geojson), "--from-review", "--pseudo-label-rest"]
    result = runner.invoke(app, [*args, "--pseudo-weight", "1", "--out", str(out), *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    # The labelled slide is trained on once, and its unlabelled rest was pseudo-labelled by the demo.
    (record,) = training["data"]
    assert record["counts"]["reviewed: PD-L1 positive"] == 1
    (row,) = training["pseudo_labels"]["slides"]
    assert row["slide"] == slide and row["positive_px"] + row["negative_px"] > 0
    assert training["pseudo_labels"]["weight"] == 1.0 and training["pseudo_labels"]["teacher"]["name"] == "pdl1-seg"
    assert f"{slide} (the rest of its labels):" in " ".join(result.output.split())
    # Phantom truth labels every pixel: there is no rest to fill.
    phantom = runner.invoke(
        app, ["train", "seg", slide, "--pseudo-label-rest", "--out", str(tmp_path / "p"), *TINY, "--no-progress"]
    )
    assert phantom.exit_code != 0 and "phantom truth has none" in " ".join(phantom.output.split())


def _nuclei_with_he_b_held_out(labelled: Path, tmp_path: Path) -> list[str]:
    """`pdl1 train nuclei` arguments: the fixture's slide and labels twice, as he-a.svs and he-b.svs, he-b held out.
    Copies, not links: a held-out slide whose file is also trained on is refused."""
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    for name in ("he-a.svs", "he-b.svs"):
        shutil.copyfile(labelled / "he-1357.svs", tmp_path / name)
    args = ["train", "nuclei", str(tmp_path / "he-a.svs"), str(tmp_path / "he-b.svs")]
    return [*args, "--labels", str(geojson), "--labels", str(geojson), "--val-entries", "he-b.svs"]


@pytest.mark.slow
def test_pdl1_train_nuclei_holds_validation_slides_out_whole_and_scores_them(labelled, tmp_path):
    out = tmp_path / "model"
    args = [*_nuclei_with_he_b_held_out(labelled, tmp_path), "--init", "none"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY_2_MEMBERS, "--no-progress"])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["config"]["slides"] == [str(tmp_path / "he-a.svs")]  # the held-out slide is not trained on
    (row,) = json.loads((out / "validation.json").read_text())["slides"]
    assert row["slide"] == str(tmp_path / "he-b.svs")
    assert row["n_labelled"] == 1252  # every marked nucleus lies in the exhaustive region
    assert 0 <= row["f1"] <= 1
    n_members = len(json.loads((out / "manifest.json").read_text())["members"])
    # Each member alone too, and the ensemble's place among them.
    assert len(row["f1_members"]) == n_members == 2
    assert all(0 <= f <= 1 for f in row["f1_members"]) and 1 <= row["rank"] <= n_members + 1
    assert "validation " + str(tmp_path / "he-b.svs") + ": 1252 marked nuclei" in " ".join(result.output.split())
    # What the held-out slide's labels gave is printed before training, as the training slides' is.
    assert "(held out, scored after training): " in result.output
    assert f"(ensemble rank {row['rank']} of {n_members + 1})" in " ".join(result.output.split())
    # The peak threshold was fit on the held-out slide's marked nuclei and, where it gained, written to the manifest.
    fit = json.loads((out / "validation.json").read_text())["threshold_fit"]
    assert fit["metric"] == "F1" and fit["labelled"] == 1252 and fit["score_after"] >= fit["score_before"]
    min_score = json.loads((out / "manifest.json").read_text())["thresholds"]["min_score"]
    assert min_score == (fit["after"] if fit["adopted"] else fit["before"])
    assert f"peak threshold {fit['before']:g} -> {fit['after']:g}" in " ".join(result.output.split())
    bad = runner.invoke(app, [*args[:-4], "--val-entries", "nope.svs", "--out", str(tmp_path / "other"), *TINY])
    assert bad.exit_code == 1
    assert "--val-entries names nope.svs, which no labelled slide is" in " ".join(bad.output.split())


@pytest.mark.slow
def test_pdl1_train_nuclei_shows_the_held_out_slides_scored_and_the_report_drawn_as_stages(labelled, tmp_path):
    # After 'training: N/N' the held-out slides were scored (every member over each one) and the report's pictures
    # drawn in silence: minutes for a lab's slides.
    args = [*_nuclei_with_he_b_held_out(labelled, tmp_path), "--init", "none", "--no-recalibrate"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "model"), *TINY_2_MEMBERS, "--progress"])
    assert result.exit_code == 0, result.output  # lines: the runner's stderr is no terminal
    stages = r"^training: (\d+)/\1 .*^validation: 0/1 .*^validation: 1/1 .*"  # a nuclei model has no domain guard
    stages += r"^training report: 3/3 .*^drawing the training report: 0/(\d+) .*^drawing the training report: \2/\2 "
    assert re.search(stages, result.output, re.M | re.S), result.output


def test_the_review_entropy_limit_counts_the_slides_it_reads(finetune_phantom):
    # Of a PD-L1 IHC nuclei ensemble, after its last step: the ensemble over every training slide, in silence.
    from inference.training.train_nuclei import review_entropy_limit

    counted = []
    slides = (finetune_phantom, finetune_phantom)
    review_entropy_limit(demo_model_dir("nuclei-ihc"), slides, on_progress=lambda *report: counted.append(report))
    assert counted == [(0, 2), (1, 2), (2, 2)]


@pytest.mark.slow
def test_pdl1_train_nuclei_tta_is_recorded_and_what_follows_training_measures_with_it(labelled, tmp_path):
    from bridge.labels import read_geojson_labels
    from inference import NucleiConfig, labelled_nuclei, read_manifest, score_labelled_nuclei

    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    out = tmp_path / "model"
    # From the shipped model (the default init), which finds nuclei here: TTA changes how many.
    args = _nuclei_with_he_b_held_out(labelled, tmp_path)
    result = runner.invoke(app, [*args, "--out", str(out), "--tta", "--no-recalibrate", *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, task="nuclei")
    assert manifest.extra["tta"] is True and manifest.training["config"]["tta"] is True
    assert NucleiConfig().tta_for(manifest)  # pdl1 run, the service and eval run it so unless told otherwise
    (row,) = json.loads((out / "validation.json").read_text())["slides"]
    held_out = read_geojson_labels(
        geojson, slide=tmp_path / "he-b.svs", image_size_px=(2048, 2048), rules=LabelRules(HE_CLASSES)
    )
    min_score = float(manifest.thresholds["min_score"])

    def found(tta: bool) -> int:
        nuclei = labelled_nuclei(out, [held_out], config=NucleiConfig(tta=tta), floor=min_score)
        return score_labelled_nuclei(nuclei, min_score=min_score)[0].n_predicted

    assert row["n_predicted"] == found(True) != found(False)  # TTA changes what this model finds


@pytest.mark.slow
def test_pdl1_train_seg_scores_held_out_slides_over_their_labelled_pixels(labelled, tmp_path):
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    (tmp_path / "he-a.svs").symlink_to(labelled / "he-1357.svs")
    shutil.copy(labelled / "he-1357.svs", tmp_path / "he-b.svs")  # another file: the domain guard's held-out slide
    out = tmp_path / "seg"
    args = ["train", "seg", str(tmp_path / "he-a.svs"), str(tmp_path / "he-b.svs")]
    args += ["--labels", str(geojson), "--labels", str(geojson), "--val-entries", "he-b.svs"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY_2_MEMBERS, "--no-progress"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "validation.json").read_text())["slides"]
    assert row["slide"] == str(tmp_path / "he-b.svs")
    (trained,) = json.loads((out / "manifest.json").read_text())["training"]["data"]
    # The same labels on the same grid (2 µm/px), counted where the ensemble predicted: at most the trained px.
    assert 0.9 * trained["labelled_px"] < row["labelled_px"] <= trained["labelled_px"]
    assert row["dice"] is None or 0 <= row["dice"] <= 1
    assert f"validation {tmp_path / 'he-b.svs'}: {row['labelled_px']} labelled px" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(row["dice_members"]) == len(manifest["members"]) > 1
    # The threshold was fit on the held-out slide's labelled pixels and, where it gained, written to the manifest.
    fit = json.loads((out / "validation.json").read_text())["threshold_fit"]
    assert fit["labelled"] == row["labelled_px"] and fit["score_after"] >= fit["score_before"]
    assert fit["metric"] == "Dice"
    assert manifest["thresholds"].get("segmentation", 0.5) == (fit["after"] if fit["adopted"] else fit["before"])
    assert f"segmentation threshold {fit['before']:g} -> {fit['after']:g}" in " ".join(result.output.split())
    # The domain guard's limits were set on the validation slide, not by leaving training slides out.
    calibration = manifest["extra"]["domain"]["calibration"]
    assert calibration["how"] == "held-out in-domain slides"
    assert [s["slide"] for s in calibration["slides"]] == ["he-b.svs"]


def test_validation_scores_each_member_and_fits_the_threshold_on_pooled_labelled_pixels():
    from inference import LabelledPixels, fit_threshold, score_labelled_pixels

    truth = np.array([True] * 4 + [False] * 6)
    prob = np.array([0.9, 0.45, 0.42, 0.41, 0.3, 0.2, 0.1, 0.1, 0.05, 0.44], np.float32)
    members = np.stack([prob, np.where(truth, 0.8, 0.2), np.full_like(prob, 0.1)]).astype(np.float32)
    a = LabelledPixels("a", truth, prob, members)
    (s,) = score_labelled_pixels([a], threshold=0.5)
    assert s.predicted_px == 1 and s.dice == pytest.approx(2 / 5)
    assert s.dice_members == pytest.approx((2 / 5, 1.0, 0.0))
    assert s.rank == 2  # one member (the perfect one) is better than the ensemble
    fit = fit_threshold([a], current=0.5)
    # Every t in (0.3, 0.41] finds the 4 positives with one false positive (0.44): Dice 8/9, the best; of the
    # candidates there, the nearest to 0.5 (0.4) wins.
    assert fit.adopted and fit.after == pytest.approx(0.4) and fit.score_after == pytest.approx(8 / 9)
    # Pooled: a second slide whose pixels all lie above 0.4 and are negative pulls the threshold up.
    b = LabelledPixels("b", np.zeros(20, bool), np.full(20, 0.43, np.float32), np.zeros((0, 20), np.float32))
    pooled = fit_threshold([a, b], current=0.5)
    assert pooled.after > 0.43 and pooled.labelled == 30
    # Too small a gain keeps the threshold.
    kept = fit_threshold([a], current=0.4, min_gain=0.5)
    assert not kept.adopted and kept.after == 0.4 and kept.score_after == kept.score_before


def test_a_one_member_segmentation_model_has_no_members_to_rank_against():
    """A one-member model was scored as 'members 0.468 (ensemble rank 1 of 2)': its member set beside itself. The
    README, and the nuclei validation, say a one-member model has no members to set beside it: empty, rank 0."""
    from inference import LabelledPixels, score_labelled_pixels

    truth = np.array([True, True, False, False])
    prob = np.array([0.9, 0.4, 0.6, 0.1], np.float32)
    (s,) = score_labelled_pixels([LabelledPixels("a", truth, prob, prob[None])], threshold=0.5)
    assert s.dice == pytest.approx(0.5) and s.dice_members == () and s.rank == 0


@pytest.mark.slow
def test_region_labels_almost_all_one_class_are_trained_on_with_a_warning_naming_the_fix(labelled, tmp_path):
    from bridge.qupath_geojson import QuPathObject, to_feature

    positive_only = tmp_path / "positive.geojson"
    area = QuPathObject(shapely.box(200, 200, 600, 600), "annotation", "PD-L1 positive")
    positive_only.write_text(json.dumps({"type": "FeatureCollection", "features": [to_feature(area)]}))
    args = ["train", "seg", str(labelled / "he-1357.svs"), "--labels", str(positive_only), "--out", str(tmp_path / "m")]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: 100% of the labelled area is positive" in text and "PD-L1 negative areas" in text


def test_nuclei_validation_scores_any_peak_threshold_from_one_detection_and_fits_it():
    from inference import LabelledNuclei, fit_min_score, score_labelled_nuclei

    truth = np.array([[10.0, 10], [30, 10], [50, 10], [70, 10]])
    # Found: the four marked nuclei (scores 0.9, 0.6, 0.5, 0.25) and two spurious peaks (0.35, 0.2).
    xy = np.array([[10.5, 10], [30, 11], [50, 9], [70, 10], [90, 10], [110, 10]])
    score = np.array([0.9, 0.6, 0.5, 0.25, 0.35, 0.2])
    member = (xy[:4], np.full(4, 0.9))  # a member that finds exactly the marked nuclei
    n = LabelledNuclei("s", truth, xy, score, (member,), radius_px=3.0, floor=0.1)
    (at_03,) = score_labelled_nuclei([n], min_score=0.3)
    assert (at_03.n_predicted, at_03.n_matched) == (4, 3)  # 0.25 is missed, 0.35 is a false positive
    assert at_03.f1 == pytest.approx(0.75) and at_03.f1_members == (1.0,) and at_03.rank == 2
    (at_02,) = score_labelled_nuclei([n], min_score=0.2)
    assert (at_02.n_predicted, at_02.n_matched) == (6, 4) and at_02.f1 == pytest.approx(0.8)
    fit = fit_min_score([n], current=0.3)
    # t in (0.2, 0.25] keeps all 4 with one false positive (F1 8/9), the best: (0.35, 0.5] keeps 3 and none (6/7).
    assert fit.adopted and fit.after == pytest.approx(0.25) and fit.score_after == pytest.approx(8 / 9)
    assert fit.metric == "F1" and fit.labelled == 4
    with pytest.raises(ValueError, match=r"found at peak threshold 0\.1 and up"):
        score_labelled_nuclei([n], min_score=0.05)


def test_nuclei_validation_scores_the_classes_of_the_matched_nuclei_and_an_ihc_s_tps():
    from bridge.cli.train import _classes_text
    from inference import IHC_NUCLEUS_CLASSES, LabelledNuclei, score_labelled_nuclei

    names = tuple(IHC_NUCLEUS_CLASSES)  # Tumor: Positive 0, Tumor: Negative 1, immune 2 and 3, Other 4
    truth = np.array([[10.0, 10], [30, 10], [50, 10], [70, 10]])
    truth_cls = np.array([0, 1, 1, 4])  # marked: one positive and two negative tumour cells, TPS 33 %
    xy = np.array([[10.5, 10], [30, 11], [50, 9], [90, 10]])  # three matched, one found where nothing is marked
    pred_cls = np.array([0, 0, 1, 1])  # one marked negative called positive; the spurious one negative
    score = np.array([0.9, 0.8, 0.7, 0.6])
    n = LabelledNuclei("s", truth, xy, score, (), radius_px=3.0, floor=0.1, truth_cls=truth_cls, pred_cls=pred_cls,
                       class_names=names)  # fmt: skip
    (row,) = score_labelled_nuclei([n], min_score=0.3)
    assert row.n_matched == 3 and row.class_agreement == pytest.approx(2 / 3)
    assert row.tps_marked_percent == pytest.approx(100 / 3) and row.tps_found_percent == pytest.approx(50.0)
    (high,) = score_labelled_nuclei([n], min_score=0.75)  # only the two first found: both called positive
    assert high.tps_found_percent == pytest.approx(100.0) and high.class_agreement == pytest.approx(0.5)
    text = _classes_text({"class_agreement": 2 / 3, "tps_marked_percent": 100 / 3, "tps_found_percent": 50.0}, ihc=True)
    assert text == "; classes right on 67% of the matched nuclei; TPS of the marked cells 33.3%, of those found 50.0%"
    assert _classes_text({"class_agreement": 2 / 3, "tps_marked_percent": 100 / 3}, ihc=False).count("TPS") == 0
    assert _classes_text({"class_agreement": None}, ihc=True) == ""  # nothing matched
    # Without classes (an older caller's LabelledNuclei) detection is scored as before.
    (plain,) = score_labelled_nuclei([LabelledNuclei("s", truth, xy, score, (), 3.0, 0.1)], min_score=0.3)
    assert plain.f1 == row.f1 and plain.class_agreement != plain.class_agreement and plain.tps_marked_percent is None


def test_slides_whose_region_labels_hold_no_positive_area_are_named(capsys):
    from bridge.cli.train import _echo_counts
    from inference import SlideLabels

    def labels(name: str, positive) -> SlideLabels:
        return SlideLabels(name, (100, 100), (shapely.box(0, 0, 50, 50),), (False,), positive=positive)

    with_positive = labels("a.svs", shapely.box(0, 0, 20, 20))
    _echo_counts([with_positive, labels("b.svs", shapely.Polygon())], regions=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "the labels of 1 of 2 slides hold no PD-L1 positive area (b.svs)" in err
    # Every slide with positive area, or none at all (a negative case set): no note.
    _echo_counts([with_positive, labels("c.svs", shapely.box(10, 10, 30, 30))], regions=True)
    _echo_counts([labels("d.svs", shapely.Polygon())], regions=True)
    assert "hold no PD-L1 positive area" not in capsys.readouterr().err


def test_labels_from_a_paired_ihc_that_was_flagged_are_warned_of(capsys):
    from bridge.cli.train import _echo_counts
    from bridge.labels import DOUBTFUL_IHC_COUNT
    from inference import SlideLabels

    region = (shapely.box(0, 0, 100, 100),)
    doubtful = SlideLabels(
        "he_1.svs", (100, 100), region, (False,), positive=shapely.box(0, 0, 20, 20),
        counts={"paired IHC positive areas": 1, DOUBTFUL_IHC_COUNT: 1},
    )  # fmt: skip
    sure = SlideLabels(
        "he_2.svs", (100, 100), region, (False,), positive=shapely.box(0, 0, 20, 20),
        counts={"paired IHC positive areas": 1},
    )  # fmt: skip
    _echo_counts([doubtful, sure], regions=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "the paired IHC behind the labels of he_1.svs was flagged for review" in err and "he_2.svs" not in err


def test_slides_whose_candidates_no_record_holds_are_warned_of_with_the_fix(capsys):
    # The labelled fixture holds reviewed candidates and no record of the run that wrote them: deleted ones cannot be
    # told, and `pdl1 train --from-review` says so, with what works without a record.
    from bridge.cli.train import _echo_counts
    from bridge.labels import UNRECORDED_ANNOTATIONS_COUNT
    from inference import SlideLabels

    region = (shapely.box(0, 0, 100, 100),)
    unrecorded = SlideLabels("he_1.svs", (100, 100), region, (False,), counts={UNRECORDED_ANNOTATIONS_COUNT: 3})
    recorded = SlideLabels("he_2.svs", (100, 100), region, (False,), counts={"reviewed: PD-L1 negative": 1})
    _echo_counts([unrecorded], held_out=[recorded])
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("warning: he_1.svs (3): FN candidates or regions pdl1-bridge wrote that no record")
    assert err.endswith("set its class to PD-L1 negative instead of deleting it") and "he_2.svs" not in err


def test_slides_whose_other_targets_reviews_are_not_read_are_warned_of_with_the_fix(capsys):
    # A TMA run by an earlier version left the first core's output alone: the other cores' deleted candidates and
    # reclassified nuclei are no labels, which `pdl1 train` says, naming the slide and what to do.
    from bridge.cli.train import _echo_counts
    from bridge.labels import UNREAD_TARGETS_COUNT
    from inference import SlideLabels

    region = (shapely.box(0, 0, 100, 100),)
    old = SlideLabels("tma_1.svs", (100, 100), region, (False,), counts={UNREAD_TARGETS_COUNT: 3})
    new = SlideLabels("tma_3.svs", (100, 100), region, (False,), counts={"reviewed: nuclei reclassified": 2})
    _echo_counts([old, new])
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "warning: tma_1.svs: the FN candidates deleted and nuclei reclassified in targets other than the first are "
        "no labels: the last run kept the first target's output only (an earlier version); to train on such "
        "reviews, run the image again" in err
    )
    assert "tma_3.svs" not in err


def test_slides_whose_tool_nuclei_no_record_holds_are_warned_of_with_the_fix(capsys):
    # Analysed by an earlier pdl1_analyze.groovy, which kept no record: the nuclei a person reclassified there are no
    # labels, which `pdl1 train` says, naming the slide, how many, and what to do.
    from bridge.cli.train import _echo_counts
    from bridge.labels import UNRECORDED_NUCLEI_COUNT
    from inference import SlideLabels

    region = (shapely.box(0, 0, 100, 100),)
    old = SlideLabels("he_1.svs", (100, 100), region, (False,), counts={UNRECORDED_NUCLEI_COUNT: 12})
    new = SlideLabels("he_2.svs", (100, 100), region, (False,), counts={"reviewed: nuclei reclassified": 2})
    _echo_counts([old, new])
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "warning: he_1.svs (12): nuclei pdl1-bridge wrote that no record of an analysis holds (analysed by an earlier "
        "pdl1_analyze.groovy, or the record deleted): whether a person reclassified them cannot be told, so they are "
        "no labels; to train on reviews of them, analyse the image again with the current pdl1_analyze.groovy" in err
    )
    assert "he_2.svs" not in err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["PROJECT2"], "2 projects given"),
        (
            ["SLIDE"],
            "project alone (its entries are the slides, their objects the labels), not with slide files",
        ),
        (["--labels", "LABELS"], "not with --labels"),
    ],
)
def test_a_project_beside_other_sources_is_refused_saying_what_came(tmp_path, extra, says):
    """Two projects were told 'give one QuPath project alone ..., without --labels' though no --labels came."""
    for name in ("p1", "p2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "project.qpproj").write_text("{}")
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "a.geojson").write_text("{}")
    swap = {"PROJECT2": str(tmp_path / "p2"), "SLIDE": str(tmp_path / "a.svs"), "LABELS": str(tmp_path / "a.geojson")}
    args = ["train", "seg", str(tmp_path / "p1"), *(swap.get(a, a) for a in extra), "--out", str(tmp_path / "m")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert says in " ".join(result.output.replace("│", " ").split()), result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("task", ["seg", "nuclei"])
@pytest.mark.parametrize(
    ("given", "says"),
    [
        # A mistyped project folder was "no such slide; give phantom slides written by `pdl1 phantom`".
        (
            "labs/projct",
            "labs/projct: no such file or folder; training takes a QuPath project (its folder or project.qpproj)",
        ),
        # The folder the project sits in (beside its slides) was "is a folder; give phantom slide files".
        ("labs", "labs: no QuPath project here, but in labs/project: give that folder (or its project.qpproj)"),
        # A lab's slide without --labels was "no truth beside ...; this command takes phantom slides".
        (
            "labs/a.svs",
            "labs/a.svs: no labels given and no phantom truth beside it (labs/a.truth/truth.json); to train on your "
            "labels, give the slide's QuPath GeoJSON export with --labels (one per slide, in the slides' order), or "
            "give its QuPath project instead of the slide",
        ),
    ],
)
def test_a_mistyped_project_or_the_folder_around_it_is_told_as_a_project(tmp_path, monkeypatch, task, given, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labs" / "project").mkdir(parents=True)
    (tmp_path / "labs" / "project" / "project.qpproj").write_text("{}")
    (tmp_path / "labs" / "a.svs").write_bytes(b"")
    result = runner.invoke(app, ["train", task, given, "--out", "m", "--no-progress"], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()).startswith(f"error: {says}"), result.output
    assert "phantom slides written" not in result.output and not (tmp_path / "m").exists()


def test_a_labelled_slide_without_a_pixel_size_is_told_what_training_can_read(tmp_path):
    """The analysis' advice, 'with --mpp', sent users to an option `pdl1 train` lacks; a slide given with its
    GeoJSON has no QuPath calibration, so its file must state the pixel size."""
    from PIL import Image

    png = tmp_path / "camera.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    (tmp_path / "camera.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    args = ["train", "nuclei", str(png), "--labels", str(tmp_path / "camera.geojson"), "--out", str(tmp_path / "m")]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        "camera.png: a plain PNG file states no microns per pixel. A slide given with --labels is read at its "
        "file's own pixel size (a GeoJSON export carries no QuPath calibration): save the image as a TIFF" in text
    )
    assert "or train from its QuPath project, with the pixel size set there" in text
    assert "--mpp" not in text and not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def he_png(labelled, tmp_path_factory) -> Path:
    """The fixture slide's level-0 pixels as a PNG, which states no pixel size (as a microscope camera's image)."""
    from PIL import Image

    from inference import open_slide

    png = tmp_path_factory.mktemp("png") / "he-1357.png"
    with open_slide(labelled / "he-1357.svs") as slide:
        Image.fromarray(slide.read_region((0, 0), 0, slide.dimensions)).save(png)
    return png


def _png_project(labelled: Path, he_png: Path, tmp_path: Path, *, calibration_um: float | None) -> Path:
    """The fixture project with both entries' image a copy of ``he_png`` (he-a.png, he-b.png), entry 2 typed H&E,
    the pathologist's labels exported for both, and QuPath's pixel size ``calibration_um`` (None: uncalibrated, as
    QuPath saves an image that states none)."""
    project = tmp_path / "project"
    shutil.copytree(labelled / "project", project)
    qpproj = json.loads((project / "project.qpproj").read_text())
    summary = project / "data" / "2" / "summary.json"
    summary.write_text(summary.read_text().replace("BRIGHTFIELD_H_DAB", "BRIGHTFIELD_H_E"))
    features = json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())["features"]
    unit, value = ("px", 1.0) if calibration_um is None else ("µm", calibration_um)
    for image, name in zip(qpproj["images"], ("he-a.png", "he-b.png"), strict=True):
        shutil.copy(he_png, tmp_path / name)
        builder = image["serverBuilder"]
        builder["uri"] = (tmp_path / name).as_uri()
        meta = builder["metadata"]
        meta["levels"] = meta["levels"][:1]
        for key in ("pixelWidth", "pixelHeight"):
            meta["pixelCalibration"][key] = {"value": value, "unit": unit}
        exported = export_path(project, str(image["entryID"]))
        exported.parent.mkdir(parents=True, exist_ok=True)
        exported.write_text(json.dumps(features))
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    return project


def test_a_project_image_whose_file_states_no_pixel_size_trains_at_the_one_set_in_qupath(labelled, he_png, tmp_path):
    """`pdl1 run` analyses such an image with the pixel size set in QuPath; training read the file's own and
    refused it, telling the user to re-save the image as a TIFF."""
    project = _png_project(labelled, he_png, tmp_path, calibration_um=0.5)
    out = tmp_path / "m"
    args = ["train", "nuclei", str(project), "--entries", "1", "--qupath", "never", "--out", str(out)]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "points: Tumor: Positive 440" in result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["config"]["slides"] == [str(tmp_path / "he-a.png")]
    assert training["config"]["slide_mpp"] == {str(tmp_path / "he-a.png"): 0.5}
    assert "training report: " in result.output  # its label areas and example tiles read the PNG at 0.5 too


def test_a_project_image_that_states_no_pixel_size_in_file_or_project_is_refused_saying_to_set_it_in_qupath(
    labelled, he_png, tmp_path
):
    """The advice was to re-save the image as a TIFF since training read 'not the one set in QuPath'; setting it
    there is now the fix."""
    project = _png_project(labelled, he_png, tmp_path, calibration_um=None)
    args = ["train", "nuclei", str(project), "--entries", "1", "--qupath", "never", "--out", str(tmp_path / "m")]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        "he-a.png: a plain PNG file states no microns per pixel. Nor does the QuPath project, whose pixel size "
        "training reads as `pdl1 run` does: set it in QuPath (Image tab: Pixel width/height) to the µm/px of the "
        "scanner or camera it came from" in text
    )
    assert "or leave the entry out (--entries)" in text
    assert "--mpp" not in text and "TIFF" not in text and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "args",
    [["nuclei"], ["seg"], ["nuclei", "--entries", "1", "--val-entries", "2"], ["seg", "--val-entries", "2"]],
    ids=["nuclei", "seg", "nuclei-validated-on-2", "seg-validated-on-2"],
)
def test_one_image_file_two_entries_calibrate_differently_is_refused_naming_both(labelled, he_png, tmp_path, args):
    """Training reads a file at one pixel size (its slide_mpp, by path): two entries of one file set to two in
    QuPath stopped training with a bare ValueError that named neither entry, training or held out."""
    project = _png_project(labelled, he_png, tmp_path, calibration_um=0.5)
    qpproj = json.loads((project / "project.qpproj").read_text())
    builder = qpproj["images"][1]["serverBuilder"]
    builder["uri"] = (tmp_path / "he-a.png").as_uri()  # entry 2 is he-a.png too, set to 0.25 µm/px
    for key in ("pixelWidth", "pixelHeight"):
        builder["metadata"]["pixelCalibration"][key] = {"value": 0.25, "unit": "µm"}
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", *args[:1], str(project), *args[1:], "--qupath", "never", "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        f"{tmp_path / 'he-a.png'} is the image of two project entries with different pixel sizes: entry 1 "
        "(he-1357.svs) at 0.5 µm/px and entry 2 (he-1357.svs) at 0.25 µm/px; training reads one file at one "
        "pixel size. Set one pixel size for the image in QuPath (Image tab: Pixel width/height, the same in both "
        "entries) and save the project; or leave one of the two entries out, naming the others with --entries "
        "(and not that one with --val-entries)" in text
    )
    assert "Traceback" not in result.output and not out.exists()


def test_labels_of_one_file_at_two_pixel_sizes_are_refused_and_of_one_at_one_not():
    from bridge.labels import LabelError, refuse_files_calibrated_twice
    from inference import SlideLabels

    def lab(slide: str, entry: str, mpp: float | None) -> SlideLabels:
        return SlideLabels(slide, (10, 10), mpp=mpp, source=f"p.qpproj entry {entry} (name {entry}) from x.geojson")

    refuse_files_calibrated_twice([lab("/a.png", "1", 0.5), lab("/a.png", "2", 0.5), lab("/b.png", "3", 0.25)])
    refuse_files_calibrated_twice([lab("/a.png", "1", None), lab("/a.png", "2", None)])
    said = r"/a.png is the image of two project entries with different pixel sizes: entry 1 \(name 1\) at 0.5 µm/px "
    with pytest.raises(LabelError, match=said + r"and entry 3 \(name 3\) at 0.25 µm/px; training reads one file"):
        refuse_files_calibrated_twice([lab("/a.png", "1", 0.5), lab("/b.png", "2", 1.0), lab("/a.png", "3", 0.25)])
    with pytest.raises(LabelError, match=said + r"and entry 2 \(name 2\) at its file's own pixel size \(none set"):
        refuse_files_calibrated_twice([lab("/a.png", "1", 0.5), lab("/x/../a.png", "2", None)])


def test_training_from_a_project_opens_each_labelled_image_once_before_training(labelled, tmp_path, monkeypatch):
    """Reading a project's labels opened an image whose stain nobody stated for its colour, and `pdl1 train` then
    opened every labelled image once more just to check its pixel size."""
    import inference
    from bridge.cli.train import _read_labels

    shutil.copytree(labelled / "project", tmp_path / "project")
    (tmp_path / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    exported = export_path(tmp_path / "project", "1")
    exported.parent.mkdir(parents=True)
    exported.write_text(
        json.dumps(json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text()))
    )
    (tmp_path / "project" / "data" / "1" / "summary.json").unlink()  # no image type: its colour is checked
    opened: list[str] = []
    real = inference.open_slide

    def open_slide(path, **kwargs):
        opened.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(inference, "open_slide", open_slide)
    args = dict(geojson=[], entries=["1"], from_review=False, class_map=[], qupath="never", points=False)
    (labels,) = _read_labels([tmp_path / "project"], **args)
    assert opened == ["he-1357.svs"]
    assert labels.slide == str(tmp_path / "he-1357.svs")


@pytest.mark.slow
def test_pdl1_train_seg_reads_project_images_at_qupath_s_pixel_size_throughout(labelled, he_png, tmp_path):
    """Training, the held-out slide's scoring, the pseudo-labels of the rest, the training report and the domain
    statistics all read both PNGs (no pixel size in the file) at the pixel size set in QuPath."""
    project = _png_project(labelled, he_png, tmp_path, calibration_um=0.5)
    out = tmp_path / "seg"
    args = ["train", "seg", str(project), "--qupath", "never", "--val-entries", "2", "--pseudo-label-rest"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    a, b = str(tmp_path / "he-a.png"), str(tmp_path / "he-b.png")
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    assert training["config"]["slides"] == [a] and training["config"]["validation_slides"] == [b]
    assert training["config"]["slide_mpp"] == {a: 0.5, b: 0.5}
    # On the 512 x 512 px grid of 2048 px at 0.5 µm/px read at 2 µm/px: the labels and the pseudo-labelled rest.
    assert 0.1 < training["data"][0]["labelled_px"] / 512**2 <= 1
    (row,) = training["pseudo_labels"]["slides"]
    assert row["slide"] == a and row["positive_px"] + row["negative_px"] > 0
    (scored,) = json.loads((out / "validation.json").read_text())["slides"]
    assert scored["slide"] == b and scored["labelled_px"] > 0
    domain = manifest["extra"]["domain"]
    assert [row["slide"] for row in domain["slides"]] == ["he-a.png"]
    assert domain["calibration"]["how"] == "held-out in-domain slides"
    assert "training report: " in result.output


def test_a_training_s_slide_mpp_must_be_its_labels_pixel_sizes():
    """What the manifest records and the domain statistics read the slides at is what they are trained at."""
    from inference import SegTrainConfig, SlideLabels
    from inference.training.labels import check_slide_mpp

    lab = SlideLabels("a.png", (10, 10), mpp=0.5)
    check_slide_mpp([lab], {"a.png": 0.5})
    check_slide_mpp([lab], {"a.png": 0.5, "b.png": 1.0}, validation_slides=("b.png",))
    check_slide_mpp([SlideLabels("s.svs", (10, 10))], {})  # a slide read at its file's own is not in it
    with pytest.raises(ValueError, match=r"a.png: its labels state 0.5 µm/px, but the training's slide_mpp gives None"):
        check_slide_mpp([lab], {})
    with pytest.raises(ValueError, match=r"slide_mpp names c.png, neither a labelled training slide nor a validation"):
        check_slide_mpp([lab], {"a.png": 0.5, "c.png": 1.0})
    with pytest.raises(ValueError, match=r"slide_mpp must be positive µm/px, got \{'a.png': 0\}"):
        SegTrainConfig(slides=("a.png",), out_dir="m", slide_mpp={"a.png": 0})


def test_pdl1_train_finds_a_moved_project_image_under_search_dir(labelled, tmp_path):
    """A project made on the pathologist's PC: its image is neither at its URI nor beside the project. The refusal
    said to pass --search-dir, which `pdl1 train` did not have."""
    project = tmp_path / "project"
    shutil.copytree(labelled / "project", project)
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True)
    exported.write_text(
        json.dumps(json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_bytes()))
    )
    slides = tmp_path / "archive" / "2026"
    slides.mkdir(parents=True)
    (slides / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    args = ["train", "nuclei", str(project), "--entries", "1", "--qupath", "never", *TINY, "--no-progress"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "pass --search-dir with a folder that holds it" in " ".join(result.output.split())
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--search-dir", str(tmp_path / "archive")])
    assert result.exit_code == 0, result.output
    training = json.loads((tmp_path / "m" / "manifest.json").read_text())["training"]
    assert training["config"]["slides"] == [str(slides / "he-1357.svs")]


def test_a_projects_labels_are_read_under_its_run_lock_released_before_training(labelled, tmp_path, monkeypatch):
    # `pdl1 train PROJECT` read the project's objects while a `pdl1 run` could be replacing them, and a run started
    # during the read was not refused. The read holds the project's run lock; training, which takes hours, does not.
    import inference
    from bridge.cli.train import _read_labels

    project = exported_labelled_project(labelled, tmp_path)
    lock = project / "pdl1" / "run.lock"
    held = []
    real = inference.open_slide

    def open_slide(path, **kwargs):  # each labelled image is opened as its labels are read
        held.append(json.loads(lock.read_text()).get("doing") if lock.is_file() else None)
        return real(path, **kwargs)

    monkeypatch.setattr(inference, "open_slide", open_slide)
    args = dict(geojson=[], entries=["1"], from_review=True, class_map=[], qupath="never", points=True)
    (labels,) = _read_labels([project], **args)
    assert held == ["pdl1 train is reading the project's objects here"]
    assert labels.counts["points: Tumor: Positive"] == 440 and not lock.exists()


def test_pdl1_train_of_a_project_a_run_is_writing_is_refused_naming_the_run(labelled, tmp_path):
    import socket
    import subprocess
    import sys

    project = exported_labelled_project(labelled, tmp_path)
    lock = project / "pdl1" / "run.lock"
    out = tmp_path / "model"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as run:
        try:
            lock.write_text(json.dumps({"pid": run.pid, "host": socket.gethostname(), "started": "2026-11-23 09:00"}))
            args = ["train", "nuclei", str(project), "--entries", "1", "--qupath", "never", "--out", str(out)]
            result = runner.invoke(app, [*args, *TINY, "--no-progress"])
        finally:
            run.kill()
    assert result.exit_code == 1, result.output
    assert (
        f"{project}: a pdl1 run is writing here (pid {run.pid} on {socket.gethostname()} since 2026-11-23 09:00), "
        "and pdl1 train reads the project only while no run writes it (a run replaces the objects it reads); wait "
        f"for the run to finish and run pdl1 train again, or delete {lock} if that run is no longer going"
    ) in " ".join(result.output.split())
    assert not out.exists() and json.loads(lock.read_text())["pid"] == run.pid


def test_slides_given_as_files_are_read_without_a_lock(labelled, monkeypatch):
    from bridge import run_lock
    from bridge.cli.train import _read_labels

    def no_lock(*args, **kwargs):
        raise AssertionError("slide files took a lock")

    monkeypatch.setattr(run_lock, "_held", no_lock)
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    args = dict(entries=[], from_review=False, class_map=[], qupath="never", points=True)
    (labels,) = _read_labels([labelled / "he-1357.svs"], geojson=[geojson], **args)
    assert labels.counts["points: Tumor: Positive"] == 440


def test_a_project_image_whose_file_is_another_size_is_refused_before_training_held_out_too(labelled, he_png, tmp_path):
    """The trainers refused such a slide only after pseudo-labelling, one at a time, naming the file; a held-out
    one was never checked, and was scored against labels drawn on another image."""
    from PIL import Image

    project = _png_project(labelled, he_png, tmp_path, calibration_um=0.5)
    with Image.open(he_png) as full:  # he-b.png: another image, at the project's path
        full.crop((0, 0, full.width // 2, full.height)).save(tmp_path / "he-b.png")
        width, height = full.size
    out = tmp_path / "m"
    args = ["train", "nuclei", str(project), "--entries", "1", "--val-entries", "2", "--qupath", "never"]
    result = runner.invoke(app, [*args, "--out", str(out), *TINY, "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        f"QuPath's project says the image is {width} x {height} px, but {tmp_path / 'he-b.png'} is {width // 2} x "
        f"{height} px, so its labels were drawn on another image; point the entry at its image in QuPath (or with "
        "--search-dir), or leave it out with --entries" in text
    )
    assert "entry 2" in text and "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("hold_out", [["--val-entries", "2"], ["--val-fraction", "0.5", "--seed", "0"]])
def test_a_held_out_slide_validation_cannot_score_is_refused_before_training(labelled, he_png, tmp_path, hold_out):
    """A held-out nuclei slide without a Training region whose nuclei are all marked failed validation only after
    the whole training, and the run wrote no validation.json or report."""
    from bridge.labels import export_path

    project = _png_project(labelled, he_png, tmp_path, calibration_um=0.5)
    for entry in ("1", "2"):  # neither has an 'all nuclei marked' region now
        exported = export_path(project, entry)
        exported.write_text(exported.read_text().replace("(all nuclei marked)", "(some nuclei marked)"))
    out = tmp_path / "m"
    args = ["train", "nuclei", str(project), *hold_out, "--qupath", "never", "--out", str(out)]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    other = "name others with --val-entries" if "--val-fraction" in hold_out else "hold out others"
    assert (
        f"{hold_out[0]} holds out entry " in text
        and "for validation, which it cannot score: a nuclei model is scored only inside a Training region whose "
        "name says 'all nuclei marked' (every nucleus in it marked), and it has none; mark every nucleus of a "
        f"Training region in QuPath and name it so, or {other}; nothing was trained"
        in text
    ), text
    assert "Traceback" not in result.output and not out.exists()
    # The segmentation scores its labelled pixels, which these entries have: it trains.
    seg = ["train", "seg", str(project), *hold_out, "--qupath", "never", "--out", str(tmp_path / "s")]
    assert runner.invoke(app, [*seg, *TINY, "--no-progress"]).exit_code == 0


def test_pdl1_train_nuclei_names_every_slide_too_coarse_before_reading_any(tmp_path, monkeypatch):
    """A slide too coarse for --input-mpp was found when its turn came to be read whole, after those before it."""
    import inference.training.train_nuclei as train_nuclei
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    good, coarse = tmp_path / "good.svs", tmp_path / "coarse.svs"
    write_phantom(good, PhantomSpec(1024, 1024, seed=1, tps_percent=30))
    write_phantom(coarse, PhantomSpec(1024, 1024, seed=2, tps_percent=30, mpp=2.0))
    read = []
    real = train_nuclei.load_nuclei_slide
    monkeypatch.setattr(train_nuclei, "load_nuclei_slide", lambda *a, **k: read.append(a) or real(*a, **k))
    args = ["train", "nuclei", str(good), str(coarse), "--input-mpp", "0.5", "--out", str(tmp_path / "m")]
    result = runner.invoke(app, [*args, *TINY, "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert (
        f"{coarse}: its pixels are 2 µm (from openslide.mpp-x/y), but nuclei training reads 0.5 µm/px: it would "
        "enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, `pdl1 train nuclei`"
    ) in text
    assert read == [] and not (tmp_path / "m").exists()
    # Truly that coarse, it trains at a coarser --input-mpp: the phantom advice alone went in a circle (the phantom
    # is already at the --mpp its truth records).
    assert "An image truly this coarse is read at 1 µm/px or coarser (--input-mpp), or left out" in text


def test_training_checks_every_slide_at_its_projects_pixel_size_and_names_all_it_cannot_read(tmp_path):
    """A validation slide too coarse was scored enlarged after training (hours), a training slide refused when its
    turn came to be read; each is read at its project's pixel size where that is given (slide_mpp)."""
    from PIL import Image

    from inference import Pdl1Error
    from inference.training.cyclic import check_slide_resolution

    rgb = np.full((64, 64, 3), 200, np.uint8)
    fine, calibrated, none = tmp_path / "fine.png", tmp_path / "calibrated.png", tmp_path / "none.png"
    Image.fromarray(rgb).save(fine, dpi=(25400, 25400))  # 1 µm/px
    Image.fromarray(rgb).save(calibrated, dpi=(25400, 25400))  # 1 µm/px in its file, 4 in its project
    Image.fromarray(rgb).save(none)
    slides = [str(fine), str(calibrated), str(none)]
    check_slide_resolution(slides[:2], input_mpp=0.5, slide_mpp={}, reader="nuclei training")
    with pytest.raises(Pdl1Error) as err:
        check_slide_resolution(slides, input_mpp=0.5, slide_mpp={str(calibrated): 4.0}, reader="nuclei training")
    lines = str(err.value).splitlines()
    assert lines[0] == "2 of 3 slides cannot be read for nuclei training, so none was:"
    assert lines[1].startswith(
        f"  {calibrated}: its pixels are 4 µm (from QuPath project), but nuclei training reads 0.5 µm/px: it would "
        "enlarge the image 8 times"
    )
    assert lines[2].startswith(f"  {none}: ") and "microns per pixel" in lines[2] and len(lines) == 3


def test_a_labelled_slide_too_coarse_is_told_where_its_pixel_size_is_set(tmp_path):
    """A lab's slide too coarse for the model ended with the library's "pass ... as mpp", an argument training does not
    take: a project's entry is told to set its pixel size in QuPath, a slide given with a labels file to state it in
    its file."""
    from PIL import Image

    from inference import Pdl1Error
    from inference.training.cyclic import check_slide_resolution

    entry, file = tmp_path / "entry.png", tmp_path / "file.png"
    for path in (entry, file):
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path, dpi=(25400 / 4, 25400 / 4))  # 4 µm/px
    slides = [str(entry), str(file)]
    with pytest.raises(Pdl1Error) as err:
        check_slide_resolution(slides, input_mpp=0.5, slide_mpp={str(entry): 4.0}, reader="segmentation training")
    lines = str(err.value).splitlines()
    assert "as mpp" not in str(err.value)
    assert "set the image's pixel size in QuPath (Image tab: Pixel width/height)" in lines[1]
    assert lines[2].startswith(f"  {file}: ") and "save it as a TIFF whose resolution tags state" in lines[2]
