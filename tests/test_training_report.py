"""The training report: curves from the kept history (also across --resume), labels per class, example tiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.labels import LabelRules, read_geojson_labels
from inference import (
    SegTrainConfig,
    SlideLabels,
    label_statistics,
    load_truth,
    read_training_curves,
    train_segmentation,
)
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec

runner = CliRunner()
TINY = ["--cycles", "2", "--epochs-per-cycle", "2", "--iterations", "2", "--batch-size", "2", "--patch-px", "32"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "s.svs"
    write_phantom(path, PhantomSpec(1024, 1024, seed=21, tps_percent=50))
    return path


def test_after_pdl1_train_seg_the_report_holds_the_curves_the_truth_per_class_and_examples(phantom, tmp_path):
    out = tmp_path / "seg"
    result = runner.invoke(
        app, ["train", "seg", str(phantom), "--out", str(out), *TINY, "--features", "4,8", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert f"training report: {out / 'training_report.html'}" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())

    # 2 cycles x 2 epochs x 2 iterations: 8 points per iteration, 4 per epoch; the member is epoch 3
    (curves,) = read_training_curves(out, manifest["members"])
    assert curves.step.tolist() == list(range(1, 9))
    assert curves.epoch.tolist() == [0, 1, 2, 3] and curves.epoch_end_step.tolist() == [2, 4, 6, 8]
    assert curves.member_epochs == (3,) and curves.missing_epochs == ()
    assert curves.learning_rate[0] == pytest.approx(3e-3)  # adamw's peak, at the start of each cycle
    assert curves.learning_rate[4] == pytest.approx(3e-3)
    assert curves.epoch_loss.tolist() == pytest.approx(curves.loss.reshape(4, 2).mean(1).tolist())
    assert manifest["training"]["final_losses"] == pytest.approx([curves.epoch_loss[3]])

    # the phantom's truth per class: the positive mask's area and the nuclei by class
    truth = load_truth(phantom)
    (slide,) = json.loads((out / "training_report" / "labels.json").read_text())["slides"]
    assert slide["positive_px2"] == pytest.approx(truth.positive_mask.astype(bool).sum() * truth.mask_downsample**2)
    assert slide["positive_px2"] + slide["negative_px2"] == 1024 * 1024
    assert slide["points"] == {name: int((truth.nuclei_class == i).sum()) for i, name in enumerate(truth.class_names)}

    page = (out / "training_report.html").read_text()
    for section in ("Loss and learning rate", "Labels per slide", "Example tiles", "member_00.safetensors"):
        assert section in page
    pictures = sorted(p.name for p in (out / "training_report").glob("*.png"))
    assert pictures[0] == "curves.png" and "example_0.png" in pictures
    with np.load(out / "training_report" / "examples.npz", allow_pickle=False) as data:
        mask, prob = data["label_mask_0"], data["prob_0"]
    assert mask.shape == prob.shape and set(np.unique(mask)) <= {0, 1} and 0 < mask.mean() < 1
    assert np.nanmin(prob) >= 0 and np.nanmax(prob) <= 1

    # drawn again from the folder alone
    shutil.rmtree(out / "checkpoint")
    for p in (out / "training_report").glob("*.png"):
        p.unlink()
    (out / "training_report.html").unlink()
    again = runner.invoke(app, ["train", "report", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "training_report.html").read_text() == page
    assert sorted(p.name for p in (out / "training_report").glob("*.png")) == pictures


def test_the_report_takes_the_manifest_for_its_folder(tmp_path):
    # "m/manifest.json: no manifest.json, so no trained model", of the manifest itself.
    import shutil

    from inference import demo_model_dir

    model = tmp_path / "m"
    shutil.copytree(demo_model_dir("seg"), model)
    result = runner.invoke(app, ["train", "report", str(model / "manifest.json")])
    assert result.exit_code == 0, result.output
    assert (model / "training_report.html").is_file() and not (model / "manifest.json" / "training_report").exists()


def test_report_of_a_folder_without_a_model_is_refused(tmp_path):
    result = runner.invoke(app, ["train", "report", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.json, so no trained model" in " ".join(result.output.split())


def test_the_report_of_an_imported_nnunet_model_says_where_its_curves_are(tmp_path):
    import shutil

    from bridge.training_report import write_training_report
    from inference import demo_model_dir

    model = tmp_path / "imported"
    shutil.copytree(demo_model_dir("seg"), model)
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps({**manifest, "training": {"source": "nnU-Net v2"}}))
    page = write_training_report(model).read_text()
    assert "trained by nnU-Net and imported" in page and "before the history was kept" not in page


def test_a_model_folders_text_is_written_into_the_report_as_text_not_markup(tmp_path):
    # A model folder from elsewhere put its manifest's input_mpp and its validation's threshold fit into the page
    # unescaped: <img src=x onerror=...> ran when the report was opened.
    import shutil

    from bridge.training_report import write_training_report
    from inference import demo_model_dir

    model = tmp_path / "m"
    shutil.copytree(demo_model_dir("seg"), model)
    payload = "<img src=x onerror=alert(1)>"
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps({**manifest, "input_mpp": payload}))
    fit = {
        "metric": payload,
        "before": 0.5,
        "after": 0.45,
        "score_before": payload,
        "score_after": 0.8,
        "adopted": True,
    }
    validation = {"task": "segmentation", "slides": [], "threshold_fit": fit}
    (model / "validation.json").write_text(json.dumps(validation))
    page = write_training_report(model).read_text()
    assert "<img src=x" not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 3


def test_resume_keeps_the_history_of_the_epochs_before_the_interrupt(phantom, tmp_path):
    def config(out):
        return SegTrainConfig(
            slides=(str(phantom),),
            out_dir=str(out),
            cycles=2,
            epochs_per_cycle=2,
            iterations_per_epoch=2,
            batch_size=2,
            patch_px=32,
            tile_size_px=64,
            features=(4, 8),
            seed=3,
        )

    whole = train_segmentation(config(tmp_path / "whole"))

    def stop_in_epoch_2(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(config(tmp_path / "cut"), on_progress=stop_in_epoch_2)
    kept = json.loads((tmp_path / "cut" / "training_history.json").read_text())["epochs"]
    assert [e["epoch"] for e in kept] == [0, 1]
    resumed = train_segmentation(config(tmp_path / "cut"), resume=True)
    assert [m.sha256 for m in resumed.members] == [m.sha256 for m in whole.members]
    (a,) = read_training_curves(tmp_path / "whole", [{"epoch": 3}])
    (b,) = read_training_curves(tmp_path / "cut", [{"epoch": 3}])
    assert b.step.tolist() == a.step.tolist() and b.missing_epochs == ()
    assert b.loss.tolist() == a.loss.tolist() and b.learning_rate.tolist() == a.learning_rate.tolist()


def test_label_statistics_count_each_class_as_the_losses_see_it():
    labels = SlideLabels(
        slide="s.svs",
        image_size_px=(100, 100),
        training_regions=(shapely.box(0, 0, 50, 100),),
        exhaustive=(True,),
        positive=shapely.box(0, 0, 20, 20),  # 400 px^2, 100 of them under Ignore
        negative=shapely.box(60, 0, 70, 10),  # 100 px^2 outside the region: negative where drawn
        ignore=shapely.box(10, 10, 30, 30),  # 400 px^2
        points_xy=np.array([[1.0, 1.0], [2.0, 2.0], [40.0, 40.0]]),
        points_class=np.array([0, 0, 2]),
        class_names=("Tumor: Positive", "Tumor: Negative", "Other"),
    )
    stats = label_statistics(labels, mpp=0.5)
    assert stats.positive_px2 == 300
    # region 5000 + drawn negative 100, less ignore inside them (400 in the region), less positive 300
    assert stats.negative_px2 == 5000 + 100 - 400 - 300
    assert stats.ignore_px2 == 400 and stats.um2(stats.positive_px2) == 75
    assert stats.points == {"Tumor: Positive": 2, "Other": 1}  # a class without points is left out


@pytest.mark.slow
def test_own_labels_with_validation_show_the_held_out_scores_and_tiles(fixtures_dir, tmp_path):
    labelled = fixtures_dir / "qupath-0.4.4-labels"
    geojson = labelled / "objects-labelled-by-pathologist-0.4.4.geojson"
    for name in ("he-a.svs", "he-b.svs"):
        shutil.copyfile(labelled / "he-1357.svs", tmp_path / name)  # copies: a held-out file trained on is refused
    out = tmp_path / "model"
    args = ["train", "nuclei", str(tmp_path / "he-a.svs"), str(tmp_path / "he-b.svs")]
    args += ["--labels", str(geojson), "--labels", str(geojson), "--val-entries", "he-b.svs", "--init", "none"]
    tiny = ["--cycles", "2", "--epochs-per-cycle", "1", "--iterations", "1", "--batch-size", "2", "--patch-px", "32"]
    result = runner.invoke(app, [*args, "--out", str(out), *tiny, "--no-progress"])
    assert result.exit_code == 0, result.output
    slides = json.loads((out / "training_report" / "labels.json").read_text())["slides"]
    assert [(Path(s["slide"]).name, s["role"]) for s in slides] == [
        ("he-a.svs", "training"),
        ("he-b.svs", "validation"),
    ]
    rules = LabelRules(class_names=("Tumor: Positive", "Tumor: Negative", "Other"))
    lab = read_geojson_labels(geojson, slide=tmp_path / "he-a.svs", image_size_px=(2048, 2048), rules=rules)
    expected = {k.removeprefix("points: "): v for k, v in lab.counts.items() if k.startswith("points: ")}
    assert slides[0]["points"] == expected and sum(expected.values()) > 0
    page = (out / "training_report.html").read_text()
    assert "Validation (held-out slides)" in page and (out / "training_report" / "validation.png").is_file()
    assert "members&#x27; F1" in page or "members' F1" in page  # each member's held-out F1 beside the ensemble's
    with np.load(out / "training_report" / "examples.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        assert {m["role"] for m in meta} == {"validation"}
        assert all(len(data[f"label_xy_{i}"]) > 0 for i in range(len(meta)))


def test_held_out_counts_are_shown_whole(tmp_path):
    """The validation table showed pixel and nucleus counts as floats: 'labelled px 65536.000'."""
    import shutil

    from inference import demo_model_dir

    model = tmp_path / "m"
    shutil.copytree(demo_model_dir("seg"), model)
    row = {"slide": "/s/a.svs", "labelled_px": 65536, "positive_px": 5920, "predicted_px": 19403, "dice": 0.4676}
    validation = {"task": "segmentation", "slides": [{**row, "dice_members": [], "rank": 0}]}
    (model / "validation.json").write_text(json.dumps(validation))
    result = runner.invoke(app, ["train", "report", str(model)])
    assert result.exit_code == 0, result.output
    page = (model / "training_report.html").read_text()
    assert "<td>a.svs</td><td>65,536</td><td>5,920</td><td>19,403</td><td>0.468</td><td>-</td><td>-</td>" in page


def test_a_nuclei_validation_shows_the_classes_and_an_ihc_s_tps_where_measured(tmp_path):
    import shutil

    from inference import demo_model_dir

    model = tmp_path / "m"
    shutil.copytree(demo_model_dir("nuclei-ihc"), model)
    row = {"slide": "/s/a.tif", "n_labelled": 136, "n_predicted": 129, "n_matched": 116, "precision": 0.899,
           "recall": 0.853, "f1": 0.875, "f1_members": [], "rank": 0}  # fmt: skip
    measured = {"class_agreement": 0.991, "tps_marked_percent": 7.35, "tps_found_percent": 8.53}
    for rows, shown in (([{**row, **measured}], True), ([row], False)):  # an earlier version's validation: no columns
        (model / "validation.json").write_text(json.dumps({"task": "nuclei", "slides": rows}))
        result = runner.invoke(app, ["train", "report", str(model)])
        assert result.exit_code == 0, result.output
        page = (model / "training_report.html").read_text()
        assert ("classes right" in page and "TPS marked %" in page and "8.530" in page) is shown
        assert ("classes right" in page) is shown
