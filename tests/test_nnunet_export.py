"""nnU-Net v2 raw datasets from phantom truth (``pdl1 export nnunet``)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.nnunet_export import UNLABELLED, ExportImage, PhantomTruthLabels, export_nnunet_dataset
from inference import PhantomSpec, TruthFormatError, TruthNotFoundError, load_truth, open_slide, write_phantom
from tests.helpers import exported_labelled_project


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("phantoms")
    a, b = folder / "a.svs", folder / "b.svs"
    write_phantom(a, PhantomSpec(1280, 1024, seed=11, tps_percent=60.0))
    write_phantom(b, PhantomSpec(1024, 1024, seed=12))
    return a, b


def test_dataset_layout_labels_and_mapping(phantoms, tmp_path):
    a, b = phantoms
    out = tmp_path / "Dataset777_Test"
    summary = export_nnunet_dataset([a], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128, test_slides=[b])
    # a: 1280 x 1024 level-0 px at 0.5 µm/px = 320 x 256 px at 2 µm/px: 2 x 2 whole cases of 128 px
    # (the last 64 px columns make no whole case); b: 2 x 2.
    assert (summary.training_cases, summary.test_cases) == (4, 4)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "PD-L1 positive": 1, "ignore": 2}
    assert dataset["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"}
    assert dataset["numTraining"] == 4 and dataset["file_ending"] == ".png"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"a_{i:04d}_0000.png" for i in range(4)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"a_{i:04d}.png" for i in range(4)]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"b_{i:04d}_0000.png" for i in range(4)]
    cases = json.loads((out / "cases.json").read_text())
    assert cases["a_0001"]["region_xywh"] == [512, 0, 512, 512]
    assert cases["a_0002"]["region_xywh"] == [0, 512, 512, 512]
    assert cases["b_0000"]["split"] == "test"
    provenance = json.loads((out / "pdl1_export.json").read_text())
    assert provenance["label_source"] == {
        "kind": "PhantomTruthLabels",
        "purity": 0.99,
        "margin_px": 0,
        "class_names": ["background", "PD-L1 positive"],
    }
    assert (provenance["mpp"], provenance["case_size_px"], provenance["ignore_label"]) == (2.0, 128, 2)

    # The truth mask is at 8 level-0 px (4 µm/px): every exported 2 µm pixel lies inside one truth pixel,
    # so the labels are the mask, each pixel doubled, and no pixel is undecided.
    truth = load_truth(a)
    assert truth.mask_downsample == 8
    labels = np.asarray(Image.open(out / "labelsTr" / "a_0001.png"))
    expect = truth.positive_mask[:64, 64:128].repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(labels, expect)
    assert 0 < labels.mean() < 1
    image = np.asarray(Image.open(out / "imagesTr" / "a_0001_0000.png"))
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8


def test_truth_labels_of_a_case_off_the_masks_grid_are_the_truth_cut_exactly(phantoms):
    # helper-130: a case not starting on the truth mask's 8 px grid took the whole mask pixels around it, stretched
    # onto the case: 245 of 249 497 labels of a 1.3 µm/px export had the wrong class.
    from bridge.nnunet_export import _truth_mask, whole_image_regions

    slide = phantoms[0]
    mask, ds = _truth_mask(slide)
    level0 = np.kron(mask, np.ones((int(ds), int(ds)), np.uint8)).astype(np.float32)
    wrong = decided = 0
    for x, y, w, h in whole_image_regions(slide, case_size_um=130, mpp=None):  # 260 px cases: off the grid
        got = PhantomTruthLabels().labels(slide, (x, y, w, h), size_wh=(100, 100))
        share = np.asarray(Image.fromarray(level0[y : y + h, x : x + w]).resize((100, 100), Image.Resampling.BOX))
        truth = np.where(share >= 0.99, 1, np.where(share <= 0.01, 0, UNLABELLED))
        both = (got != UNLABELLED) & (truth != UNLABELLED)
        wrong, decided = wrong + int((got[both] != truth[both]).sum()), decided + int(both.sum())
    assert decided > 100_000 and wrong == 0


def test_slides_of_two_stains_are_refused_and_the_stain_is_recorded(phantoms, tmp_path):
    # helper-130: an H&E and an IHC phantom went into one dataset, and its stain was recorded nowhere.
    from inference import write_ihc_phantom

    ihc = tmp_path / "ihc.svs"
    write_ihc_phantom(ihc, PhantomSpec(1024, 1024, seed=12))
    args = ["export", "nnunet", "--case-px", "128"]
    mixed = CliRunner().invoke(app, [*args, str(phantoms[0]), str(ihc), "--out", str(tmp_path / "raw/Dataset550_M")])
    said = " ".join(mixed.output.split())
    assert mixed.exit_code == 1 and "the slides are of more than one stain (H&E: a.svs; H-DAB: ihc.svs)" in said
    assert not (tmp_path / "raw" / "Dataset550_M").exists()
    for slide, stain, number in ((phantoms[0], "H&E", 551), (ihc, "H-DAB", 552)):
        out = tmp_path / "raw" / f"Dataset{number}_One"
        result = CliRunner().invoke(app, [*args, str(slide), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "dataset.json").read_text())["pdl1_stain"] == stain
        assert json.loads((out / "pdl1_export.json").read_text())["stain"] == stain


def test_margin_leaves_boundaries_to_the_ignore_label(phantoms, tmp_path):
    a, _ = phantoms
    source = PhantomTruthLabels(margin_px=2)
    region = (0, 0, 512, 512)
    sparse = source.labels(a, region, size_wh=(128, 128))
    dense = PhantomTruthLabels().labels(a, region, size_wh=(128, 128))
    unlabelled = sparse == UNLABELLED
    assert unlabelled.any() and not (dense == UNLABELLED).any()
    np.testing.assert_array_equal(sparse[~unlabelled], dense[~unlabelled])
    # Every pixel next to a class change in the dense labels is unlabelled.
    edges = np.zeros_like(unlabelled)
    edges[:, 1:] |= dense[:, 1:] != dense[:, :-1]
    edges[1:, :] |= dense[1:, :] != dense[:-1, :]
    assert unlabelled[edges].all()


def test_refuses_a_name_nnunet_would_not_read(phantoms, tmp_path):
    with pytest.raises(ValueError, match="DatasetNNN_NAME"):
        export_nnunet_dataset([phantoms[0]], tmp_path / "PDL1", source=PhantomTruthLabels(), mpp=2.0)


def test_refuses_to_overwrite_a_dataset(phantoms, tmp_path):
    out = tmp_path / "Dataset778_Test"
    export_nnunet_dataset([phantoms[1]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128)
    with pytest.raises(FileExistsError, match=r"already holds a dataset\.json"):
        export_nnunet_dataset([phantoms[1]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128)


@pytest.fixture(scope="module")
def without_labels(phantoms, tmp_path_factory) -> dict[str, Path]:
    """A plain slide (no truth beside it) and a phantom whose truth lacks its positive mask."""
    folder = tmp_path_factory.mktemp("unlabelled")
    plain = folder / "plain.svs"
    shutil.copyfile(phantoms[1], plain)
    maskless = folder / "maskless.svs"
    shutil.copyfile(phantoms[1], maskless)
    shutil.copytree(phantoms[1].with_name("b.truth"), folder / "maskless.truth")
    (folder / "maskless.truth" / "positive_mask.tif").unlink()
    return {"plain": plain, "maskless": maskless}


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        # No truth at all: what the export needs, not what evaluation needs.
        (
            "plain",
            TruthNotFoundError,
            r"no phantom truth to take labels from \(.*plain\.truth[/\\]truth\.json is missing",
        ),
        # Truth that lost its mask: named by load_truth, with the fix.
        ("maskless", TruthFormatError, r"positive_mask\.tif: missing .*pdl1 phantom \.\.\. --overwrite"),
    ],
)
def test_a_slide_without_labels_is_refused_before_anything_is_written(
    phantoms, without_labels, tmp_path, bad, error, message
):
    out = tmp_path / "nnraw" / "Dataset506_A"
    with pytest.raises(error, match=message) as err:
        export_nnunet_dataset(
            [phantoms[1], without_labels[bad]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128
        )
    assert "evaluation" not in str(err.value)
    assert not (tmp_path / "nnraw").exists()
    # The good slide alone then exports into the same folder, with its own cases only.
    summary = export_nnunet_dataset([phantoms[1]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"b_{i:04d}_0000.png" for i in range(4)]
    assert summary.training_cases == 4


class _FailsOnTheThirdCall:
    """Phantom truth labels that break on the second case written (the first call is the check before writing)."""

    def __init__(self):
        self.truth, self.calls = PhantomTruthLabels(), 0
        self.class_names = self.truth.class_names

    def regions(self, slide_path, *, case_size_um, mpp):
        return self.truth.regions(slide_path, case_size_um=case_size_um, mpp=mpp)

    def labels(self, slide_path, region_xywh, *, size_wh):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("label source broke")
        return self.truth.labels(slide_path, region_xywh, size_wh=size_wh)


def test_an_error_while_writing_leaves_no_half_written_dataset(phantoms, tmp_path):
    out = tmp_path / "Dataset507_A"
    out.mkdir()  # an empty folder is taken, and stays as it was after the error
    with pytest.raises(ValueError, match="label source broke"):
        export_nnunet_dataset([phantoms[1]], out, source=_FailsOnTheThirdCall(), mpp=2.0, case_size_px=128)
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset507_A"] and list(out.iterdir()) == []


def test_refuses_a_folder_that_is_not_empty(phantoms, tmp_path):
    out = tmp_path / "Dataset508_A"
    (out / "imagesTr").mkdir(parents=True)
    (out / "imagesTr" / "old_0000_0000.png").write_bytes(b"")
    with pytest.raises(
        FileExistsError, match=r"Dataset508_A: exists and is not an empty folder \(holds \['imagesTr'\]\)"
    ):
        export_nnunet_dataset([phantoms[1]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128)
    assert [p.name for p in (out / "imagesTr").iterdir()] == ["old_0000_0000.png"]


def test_cli_export_of_a_slide_without_truth_says_what_the_export_needs(phantoms, without_labels, tmp_path):
    out = tmp_path / "Dataset509_A"
    args = ["export", "nnunet", str(phantoms[1]), str(without_labels["plain"]), "--out", str(out), "--case-px", "128"]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "no phantom truth to take labels from" in text, result.output
    assert "evaluation" not in text and not out.exists()


def test_cli_refuses_a_slide_smaller_than_one_case(phantoms, tmp_path):
    out = tmp_path / "Dataset510_A"
    # b: 1024 x 1024 level-0 px at 0.5 µm/px = 256 x 256 px at 2 µm/px, under one case of 512 px.
    result = CliRunner().invoke(app, ["export", "nnunet", str(phantoms[1]), "--out", str(out), "--case-px", "512"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "1024 x 1024 px at 0.5 µm/px is 256 x 256 px at 2 µm/px, smaller than one case of 512 px (--case-px)" in text
    assert not out.exists()


def test_cli_refuses_an_out_under_a_file_and_an_image_both_trained_on_and_predicted(phantoms, tmp_path):
    # Each failed with a bare "[Errno 17] File exists" / "two images share a file name (['b', 'b'])".
    (tmp_path / "notes").write_text("")
    base = ["export", "nnunet", str(phantoms[1]), "--case-px", "128"]
    under_file = CliRunner().invoke(
        app, [*base, "--out", str(tmp_path / "notes" / "Dataset511_A")], env={"COLUMNS": "400"}
    )
    text = " ".join(under_file.output.replace("│", " ").split())
    assert under_file.exit_code == 2, under_file.output
    notes = tmp_path / "notes"
    assert f"{notes / 'Dataset511_A'} lies under {notes}, which is a file; --out must be a folder" in text
    same = CliRunner().invoke(
        app, [*base, "--out", str(tmp_path / "Dataset512_A"), "--test", str(phantoms[1])], env={"COLUMNS": "400"}
    )
    text = " ".join(same.output.replace("│", " ").split())
    assert same.exit_code == 2, same.output
    assert f"{phantoms[1]} is given to train on and to predict (--test): an image is one or the other" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_an_image_given_twice_and_two_images_of_one_name_are_told_apart(phantoms, tmp_path):
    # Both were "two images share a file name (['a', 'a']); their cases would overwrite each other".
    a = phantoms[0]
    (tmp_path / "other").mkdir()
    namesake = shutil.copyfile(a, tmp_path / "other" / "a.svs")
    entry_1, entry_2 = (
        ExportImage(a, entry_id="1", image_name="a.svs"),
        ExportImage(a, entry_id="2", image_name="a.svs"),
    )
    for slides, said in (
        ([a, a], f"{a} is given 2 times ({a} and {a}): give each image once"),
        ([entry_1, entry_2], f"entry 1 (a.svs) and entry 2 (a.svs) are one image ({a}): remove all but one of them"),
        ([a, namesake], f"{a} and {namesake} share the file name 'a', which names their cases"),
    ):
        with pytest.raises(ValueError, match="^" + re.escape(said)):
            export_nnunet_dataset(slides, tmp_path / "Dataset613_Twice", source=PhantomTruthLabels(), mpp=2.0)
        assert not (tmp_path / "Dataset613_Twice").exists()


def test_cli_export(phantoms, tmp_path):
    out = tmp_path / "Dataset779_Cli"
    args = ["export", "nnunet", str(phantoms[1]), "--out", str(out), "--mpp", "2", "--case-px", "64"]
    result = CliRunner().invoke(app, [*args, "--ignore-margin-px", "1"])
    assert result.exit_code == 0, result.output
    assert "16 training cases, 0 test cases" in " ".join(result.output.split())  # the console wraps
    # Each case read from its slide and written said nothing till the end: minutes for a project of whole slides.
    assert re.search(r"^cases: 0/16 .*^cases: 16/16 ", result.output, re.M | re.S), result.output
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (out / "labelsTr").iterdir()])
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_cli_export_without_progress_says_only_what_it_wrote(phantoms, tmp_path):
    args = ["export", "nnunet", str(phantoms[1]), "--out", str(tmp_path / "Dataset781_Quiet"), "--case-px", "64"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cases:" not in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None, reason="nnU-Net v2 not installed (benchmarks/README)")
def test_nnunets_integrity_check_accepts_the_dataset(phantoms, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = tmp_path / "Dataset780_Check"
    export_nnunet_dataset(
        [phantoms[0]], out, source=PhantomTruthLabels(margin_px=2), mpp=2.0, case_size_px=64, test_slides=[phantoms[1]]
    )
    verify_dataset_integrity(str(out), num_processes=1)  # raises on what nnU-Net would reject


def test_cli_export_of_a_project_maps_cases_to_entries(phantoms, tmp_path):
    from bridge.init_project import init_project_files

    project = init_project_files(tmp_path / "project", list(phantoms))
    out = tmp_path / "Dataset781_Project"
    args = ["export", "nnunet", str(project.parent), "--out", str(out), "--case-px", "128", "--labels", "truth"]
    args += ["--test", "b.svs"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cases = json.loads((out / "cases.json").read_text())
    assert {c["image_name"] for c in cases.values() if c["split"] == "train"} == {"a.svs"}
    assert {c["image_name"] for c in cases.values() if c["split"] == "test"} == {"b.svs"}
    assert all(c["entry_id"] for c in cases.values())
    unknown = CliRunner().invoke(app, [*args[:-1], "c.svs"])
    assert unknown.exit_code == 1 and "no image named 'c.svs'" in unknown.output


@pytest.fixture(scope="module")
def labelled(fixtures_dir) -> Path:
    return fixtures_dir / "qupath-0.4.4-labels"


@pytest.fixture(scope="module")
def he_png(labelled, tmp_path_factory) -> Path:
    """The labelled fixture slide's level-0 pixels (2048 x 2048) as a PNG, which states no pixel size (as a
    microscope camera's image)."""
    png = tmp_path_factory.mktemp("png") / "he.png"
    with open_slide(labelled / "he-1357.svs") as slide:
        Image.fromarray(slide.read_region((0, 0), 0, slide.dimensions)).save(png)
    return png


def _project_of(labelled: Path, image: Path, tmp_path: Path, *, calibration_um: tuple[float | None, ...]) -> Path:
    """The labelled fixture project with its entries' images copies of ``image`` (entry 1 he-a, its
    pathologist's labels exported; entry 2 he-b), each with QuPath's pixel size ``calibration_um`` (None:
    uncalibrated, as QuPath saves an image that states none)."""
    from bridge.labels import export_path

    project = tmp_path / "project"
    shutil.copytree(labelled / "project", project)
    qpproj = json.loads((project / "project.qpproj").read_text())
    for entry, stem, um in zip(qpproj["images"], ("he-a", "he-b"), calibration_um, strict=True):
        name = stem + image.suffix
        shutil.copy(image, tmp_path / name)
        builder = entry["serverBuilder"]
        builder["uri"] = (tmp_path / name).as_uri()
        meta = builder["metadata"]
        meta["levels"] = meta["levels"][:1]
        for key in ("pixelWidth", "pixelHeight"):
            meta["pixelCalibration"][key] = {"value": 1.0, "unit": "px"} if um is None else {"value": um, "unit": "µm"}
    (project / "project.qpproj").write_text(json.dumps(qpproj))
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True)
    features = json.loads((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())["features"]
    exported.write_text(json.dumps(features))
    return project


@pytest.mark.parametrize("qupath", ["never", "always"])
@pytest.mark.parametrize("suffix", [".png", ".svs"])
def test_a_project_exports_its_images_at_the_pixel_size_set_in_qupath(
    labelled, he_png, tmp_path, monkeypatch, qupath, suffix
):
    """As `pdl1 run` and `pdl1 train` read an entry: the pixel size set in QuPath (1 µm/px) replaces the file's
    own (a PNG states none, the SVS 0.5), through QuPath (paquo, faked: QuPath cannot start in this test) and
    from the exports alike. The export read each file's own, so the PNGs were refused, and the SVS cut at the
    file's scale."""
    from bridge import qupath as qupath_module
    from bridge.qupath_geojson import read_features

    objects = list(read_features(labelled / "objects-labelled-by-pathologist-0.4.4.geojson"))
    monkeypatch.setattr(
        qupath_module, "read_entry_objects", lambda path, ids, keep: {"1": [o for o in objects if keep("1", o)]}
    )
    image = he_png if suffix == ".png" else labelled / "he-1357.svs"
    project = _project_of(labelled, image, tmp_path, calibration_um=(1.0, 1.0))
    out = tmp_path / "Dataset790_Calibrated"
    args = ["export", "nnunet", str(project), "--out", str(out), "--mpp", "2", "--case-px", "128", "--test", "2"]
    result = CliRunner().invoke(app, [*args, "--qupath", qupath])
    assert result.exit_code == 0, result.output
    cases = json.loads((out / "cases.json").read_text())
    train = [c for c in cases.values() if c["split"] == "train"]
    test = [c for c in cases.values() if c["split"] == "test"]
    # 128 px at 2 µm/px is 256 µm: 256 level-0 px at QuPath's 1 µm/px (a file's 0.5 would make it 512).
    assert train and max(c["region_xywh"][2] for c in train) == 256
    assert {c["slide"] for c in train} == {str(tmp_path / f"he-a{suffix}")}
    # The test entry cut whole at the same scale: 2048 px at 1 µm/px into 8 x 8 cases of 256 px.
    assert len(test) == 64 and {tuple(c["region_xywh"][2:]) for c in test} == {(256, 256)}
    tile = np.asarray(Image.open(out / "imagesTs" / "he-b_0000_0000.png"))
    assert tile.shape == (128, 128, 3)
    with open_slide(image, mpp=1.0) as slide:  # the first test case: the image's top left 256 px, read at 2 µm/px
        assert np.abs(tile.astype(int) - slide.read_region_at_mpp((0, 0), (128, 128), mpp=2.0)).max() <= 1
    source = json.loads((out / "pdl1_export.json").read_text())["label_source"]
    (slide,) = source["slides"].values()
    assert slide["source"].endswith(" through QuPath") == (qupath == "always")


@pytest.mark.parametrize(
    ("calibration_um", "extra", "refused"),
    [((None, 1.0), ["--entries", "1"], "he-a.png"), ((1.0, None), ["--test", "2"], "he-b.png")],
    ids=["labelled entry", "test entry"],
)
def test_a_project_image_without_a_pixel_size_anywhere_is_refused_saying_to_set_it_in_qupath(
    labelled, he_png, tmp_path, calibration_um, extra, refused
):
    """The library's advice, 'pass ... as mpp', read as the export's --mpp, which sets the exported tiles' µm/px,
    not the image's."""
    project = _project_of(labelled, he_png, tmp_path, calibration_um=calibration_um)
    out = tmp_path / "Dataset791_Uncalibrated"
    args = ["export", "nnunet", str(project), "--out", str(out), "--qupath", "never", *extra]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        f"{refused}: a plain PNG file states no microns per pixel. `pdl1 export nnunet` reads an entry at the pixel "
        "size its QuPath project states (as `pdl1 run` does), else at its file's: set it in QuPath (Image tab: "
        "Pixel width/height) to the µm/px of the scanner or camera it came from" in text
    )
    assert "or re-save the file where the entry finds it with resolution tags stating it (a TIFF" in text
    assert "--mpp" not in text and "as mpp" not in text and not out.exists()


def test_a_slide_file_without_a_pixel_size_is_refused_saying_how_its_file_can_state_one(phantoms, tmp_path):
    png = tmp_path / "camera.png"
    Image.fromarray(np.full((1024, 1024, 3), 200, np.uint8)).save(png)
    out = tmp_path / "Dataset792_Camera"
    args = ["export", "nnunet", str(phantoms[1]), "--out", str(out), "--case-px", "128", "--test", str(png)]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        "camera.png: a plain PNG file states no microns per pixel. `pdl1 export nnunet` reads a slide file at its "
        "own pixel size: re-save it with resolution tags stating the µm/px" in text
    )
    assert "or export it from a QuPath project with the pixel size set there" in text
    assert "--mpp" not in text and "as mpp" not in text and not out.exists()


def test_cli_refuses_a_project_with_slides(phantoms, tmp_path):
    result = CliRunner().invoke(
        app, ["export", "nnunet", str(tmp_path), str(phantoms[0]), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "one project, or slide files" in " ".join(result.output.split())


@pytest.mark.qupath
def test_through_qupath_a_project_exports_its_drawn_regions_and_its_test_image_whole(phantoms, phantom_svs, tmp_path):
    """`pdl1 export nnunet PROJECT --test ENTRY --qupath always`: a project made and labelled through paquo;
    the labelled entries' regions become the training cases, the test entry is cut whole into imagesTs/,
    and the project is only read."""
    from paquo.projects import QuPathProject
    from shapely.geometry import box

    from bridge.classes import PDL1_NEGATIVE, PDL1_POSITIVE, TRAINING_REGION
    from bridge.init_project import init_project_qupath
    from bridge.qupath import path_class

    a, b = phantoms  # a: 1280 x 1024 px, b: 1024 x 1024 px, both at 0.5 µm/px
    project = tmp_path / "qp"
    init_project_qupath(project, [phantom_svs, a, b])  # p1.svs: 2048 x 2048 px
    with QuPathProject(project, mode="r+") as qp:  # leaving the block saves every entry
        p1_entry, a_entry, b_entry = qp.images  # in the order added
        ids = {"p1": str(p1_entry.entry_id), "a": str(a_entry.entry_id), "b": str(b_entry.entry_id)}
        p1_entry.hierarchy.add_annotation(roi=box(0, 0, 1024, 1024), path_class=path_class(TRAINING_REGION))
        p1_entry.hierarchy.add_annotation(roi=box(100, 100, 400, 400), path_class=path_class(PDL1_POSITIVE))
        # No training region: the drawn area bounds the cases.
        a_entry.hierarchy.add_annotation(roi=box(0, 0, 512, 512), path_class=path_class(PDL1_NEGATIVE))
    data_before = {p: p.read_bytes() for p in sorted(project.glob("data/*/data.qpdata"))}
    assert len(data_before) >= 2

    out = tmp_path / "Dataset782_QuPath"
    args = ["export", "nnunet", str(project), "--out", str(out), "--qupath", "always", "--mpp", "2"]
    result = CliRunner().invoke(app, [*args, "--case-px", "128", "--test", ids["b"]])  # by entry ID
    assert result.exit_code == 0, result.output
    # 128 px at 2 µm/px = 512 level-0 px: p1's training region gives 2 x 2 cases, a's negative area one.
    assert "5 training cases, 4 test cases" in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["a_0000_0000.png"] + [
        f"p1_{i:04d}_0000.png" for i in range(4)
    ]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a_0000.png"] + [
        f"p1_{i:04d}.png" for i in range(4)
    ]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5
    cases = json.loads((out / "cases.json").read_text())
    assert {c["entry_id"] for c in cases.values() if c["split"] == "train"} == {ids["p1"], ids["a"]}
    assert cases["p1_0000"]["slide"] == str(phantom_svs.resolve()) and cases["a_0000"]["slide"] == str(a.resolve())
    assert cases["p1_0000"]["region_xywh"] == [0, 0, 512, 512] and cases["a_0000"]["region_xywh"] == [0, 0, 512, 512]

    # The labels as drawn: positive under the PD-L1 positive area (level-0 100-400 = 25-100 px at 2 µm/px),
    # negative in the rest of the training region and in the negative area; no pixel left to nnU-Net's ignore.
    first = np.asarray(Image.open(out / "labelsTr" / "p1_0000.png"))
    assert first.shape == (128, 128)
    assert (first[26:99, 26:99] == 1).all() and (first[:24] == 0).all() and (first[101:] == 0).all()
    for name in ("p1_0001", "p1_0002", "p1_0003", "a_0000"):
        assert (np.asarray(Image.open(out / "labelsTr" / f"{name}.png")) == 0).all(), name

    # The test image whole: b's 1024 x 1024 px cut into 2 x 2 cases that cover it, without labels.
    test_cases = {n: c for n, c in cases.items() if c["split"] == "test"}
    assert {(c["entry_id"], c["slide"]) for c in test_cases.values()} == {(ids["b"], str(b.resolve()))}
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"b_{i:04d}_0000.png" for i in range(4)]
    assert sorted(tuple(c["region_xywh"]) for c in test_cases.values()) == [
        (0, 0, 512, 512),
        (0, 512, 512, 512),
        (512, 0, 512, 512),
        (512, 512, 512, 512),
    ]
    tile = np.asarray(Image.open(out / "imagesTs" / "b_0000_0000.png"))
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    assert not any(n.startswith("b_") for n in (p.stem for p in (out / "labelsTr").iterdir()))
    # Read-only: exporting changed no entry's data.
    assert {p: p.read_bytes() for p in sorted(project.glob("data/*/data.qpdata"))} == data_before


def test_cli_entries_are_checked_not_ignored(phantoms, tmp_path):
    # --entries with slide files was ignored (every slide exported); with a project, a misspelt entry beside a
    # right one was left out silently.
    out = tmp_path / "Dataset782_Entries"
    slides = CliRunner().invoke(
        app,
        ["export", "nnunet", str(phantoms[1]), "--out", str(out), "--entries", "x"],
        env={"COLUMNS": "400"},
    )
    assert slides.exit_code == 2, slides.output
    assert "--entries chooses entries of a QuPath project; the images are slide files" in slides.output
    from bridge.init_project import init_project_files

    project = init_project_files(tmp_path / "project", list(phantoms))
    args = ["export", "nnunet", str(project.parent), "--out", str(out), "--labels", "truth", "--case-px", "128"]
    typo = CliRunner().invoke(app, [*args, "--entries", "a.svs", "--entries", "bb.svs"], env={"COLUMNS": "400"})
    text = " ".join(typo.output.replace("│", " ").split())
    assert typo.exit_code == 2, typo.output
    assert "no entry of the project is 'bb.svs'; its entries (ID and image name) are 1 (a.svs), 2 (b.svs)" in text
    assert not out.exists()


def test_refuses_a_number_another_dataset_beside_it_has(phantoms, tmp_path):
    # nnU-Net finds a dataset by its number and stops at two of one number ("More then one dataset name found for
    # dataset id 509"): the export made the earlier dataset unusable too.
    (tmp_path / "Dataset509_Earlier").mkdir()
    out = tmp_path / "Dataset509_PDL1"
    with pytest.raises(FileExistsError, match=r"already holds Dataset509_Earlier, of the same number 509: nnU-Net"):
        export_nnunet_dataset([phantoms[1]], out, source=PhantomTruthLabels(), mpp=2.0, case_size_px=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset509_Earlier"]


def test_cli_export_of_a_project_finds_a_moved_image_under_search_dir(labelled, tmp_path):
    """The refusal of a moved image said to pass --search-dir, which `pdl1 export nnunet` did not have."""
    from bridge.labels import export_path

    project = tmp_path / "project"
    shutil.copytree(labelled / "project", project)
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True)
    exported.write_text((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())
    (tmp_path / "archive").mkdir()
    shutil.copy(labelled / "he-1357.svs", tmp_path / "archive")  # a copy: the export records resolved paths
    args = ["export", "nnunet", str(project), "--entries", "1", "--mpp", "2", "--qupath", "never"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "raw" / "Dataset501_A")])
    assert result.exit_code == 1 and "pass --search-dir" in " ".join(result.output.split())
    out = tmp_path / "raw" / "Dataset501_A"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--search-dir", str(tmp_path / "archive")])
    assert result.exit_code == 0, result.output
    cases = json.loads((out / "cases.json").read_text())
    assert {c["slide"] for c in cases.values()} == {str(tmp_path / "archive" / "he-1357.svs")}


def test_regions_not_a_whole_number_of_cases_give_no_sliver_cases(labelled, tmp_path):
    # helper-130: the fixture's two training regions, cut into 204 px cases from their corners, gave 8 cases of
    # 204 x 204, 1 x 204, 204 x 1, 1 x 1, ... px: nnU-Net trains on the slivers and plans its patch from them.
    project = exported_labelled_project(labelled, tmp_path)
    out = tmp_path / "raw" / "Dataset543_S"
    args = ["export", "nnunet", str(project), "--entries", "1", "--qupath", "never", "--case-px", "204"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    sizes = [Image.open(p).size for p in sorted((out / "imagesTr").iterdir())]
    assert sizes == [(204, 204), (204, 204)]
    regions = [c["region_xywh"] for c in json.loads((out / "cases.json").read_text()).values()]
    assert all(w == h == 816 for _, _, w, h in regions)  # 204 px at 2 µm/px of a 0.5 µm/px slide


def test_a_projects_reviewed_results_are_labels_with_from_review_and_the_margin_is_truths_only(labelled, tmp_path):
    # helper-130: pdl1_export.json said "skipped: reviewed pdl1 results (use --from-review)", an option the export
    # did not have; --ignore-margin-px was ignored for a project's labels without a word.
    project = exported_labelled_project(labelled, tmp_path)
    args = ["export", "nnunet", str(project), "--entries", "1", "--qupath", "never"]
    margin = CliRunner().invoke(app, [*args, "--ignore-margin-px", "4", "--out", str(tmp_path / "raw/Dataset571_M")])
    said = re.sub(r"[│\s]+", " ", margin.output)
    assert margin.exit_code == 2 and "--ignore-margin-px applies to phantom truth" in said
    counts = {}
    for number, review in ((572, []), (573, ["--from-review"])):
        out = tmp_path / "raw" / f"Dataset{number}_R"
        result = CliRunner().invoke(app, [*args, *review, "--out", str(out)])
        assert result.exit_code == 0, result.output
        said_573 = " ".join(result.output.split())
        (slide,) = json.loads((out / "pdl1_export.json").read_text())["label_source"]["slides"].values()
        counts[number] = slide["counts"]
    assert counts[572]["skipped: reviewed pdl1 results (use --from-review)"] == 2
    assert counts[573]["reviewed: PD-L1 positive"] == 1 and counts[573]["reviewed: PD-L1 negative"] == 1
    # No run output or record beside the fixture: deleted candidates cannot be told, and the export says so.
    assert "(3): FN candidates or regions pdl1-bridge wrote that no record of an analysis holds" in said_573


def test_a_project_a_run_is_writing_is_not_exported_and_the_run_is_named(labelled, tmp_path):
    # `pdl1 export nnunet PROJECT` reads the project's labels as `pdl1 train` does, and under the same run lock: a
    # read while `pdl1 run` replaced the objects saw the run half-way.
    import socket
    import subprocess
    import sys

    project = _project_of(labelled, labelled / "he-1357.svs", tmp_path, calibration_um=(0.5, 0.5))
    lock = project / "pdl1" / "run.lock"
    out = tmp_path / "Dataset793_Busy"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as run:
        try:
            lock.write_text(json.dumps({"pid": run.pid, "host": socket.gethostname(), "started": "2026-11-23 09:00"}))
            args = ["export", "nnunet", str(project), "--out", str(out), "--qupath", "never", "--test", "2"]
            result = CliRunner().invoke(app, args)
        finally:
            run.kill()
    assert result.exit_code == 1, result.output
    assert (
        f"a pdl1 run is writing here (pid {run.pid} on {socket.gethostname()} since 2026-11-23 09:00), and pdl1 export "
        "nnunet reads the project only while no run writes it" in " ".join(result.output.split())
    )
    assert not out.exists()


def test_a_ctrl_c_says_nothing_was_written(phantoms, tmp_path, monkeypatch):
    # helper-130: Ctrl-C of the export exited 130 without a word, leaving the user to wonder about a half dataset.
    import bridge.nnunet_export

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge.nnunet_export, "export_nnunet_dataset", stopped)
    out = tmp_path / "raw" / "Dataset560_C"
    result = CliRunner().invoke(app, ["export", "nnunet", str(phantoms[0]), "--out", str(out)])
    assert result.exit_code == 130
    assert "interrupted: nothing was written: the dataset is written beside" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("nan", "nan is not a number; give one from 0.05 to 64"),
        ("inf", "inf is outside the range; give a number from 0.05 to 64"),
        ("0", "0 is outside the range; give a number from 0.05 to 64"),
    ],
)
def test_an_mpp_of_nan_is_said_to_be_no_number_and_one_out_of_range_out_of_range(tmp_path, value, said):
    # `--mpp nan` was "less than or equal to 64", as if it were too large: NaN fails every comparison.
    args = ["export", "nnunet", str(tmp_path / "s.svs"), "--out", str(tmp_path / "Dataset501_X"), f"--mpp={value}"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--mpp': {said}" in " ".join(result.output.split())
    assert not (tmp_path / "Dataset501_X").exists()
