"""Bad input to ``pdl1 eval`` and ``pdl1 calibrate``: damaged truth, mismatched stains, bad --out folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.errors import Pdl1Error, TruthFormatError
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.phantom.truth import load_truth, truth_dir_for


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    """A 1024² H&E phantom with truth, copied by :func:`phantom_copy` before a test damages it."""
    path = tmp_path_factory.mktemp("small") / "small.svs"
    write_phantom(path, PhantomSpec(1024, 1024, seed=1, tps_percent=30))
    return path


@pytest.fixture
def phantom_copy(small_phantom, tmp_path) -> Path:
    slide = tmp_path / small_phantom.name
    shutil.copy(small_phantom, slide)
    shutil.copytree(truth_dir_for(small_phantom), truth_dir_for(slide))
    return slide


def _damage_json(text: str) -> str:
    summary = json.loads(text)
    del summary["mask_downsample"]
    return json.dumps(summary)


def _rename_header(text: str) -> str:
    return text.replace("x_px", "x", 1)


def _cut_at_line_end(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[: len(lines) // 2])


@pytest.mark.parametrize(
    ("name", "damage", "match"),
    [
        ("truth.json", _damage_json, r"truth\.json: no 'mask_downsample'"),
        ("truth.json", lambda text: "[1, 2]", r"truth\.json: expected a JSON object .* got a list"),
        ("truth.json", lambda text: text[:94], r"truth\.json: not readable as JSON"),
        ("truth.json", lambda text: "", r"truth\.json: not readable as JSON"),
        ("nuclei.csv", _rename_header, r"nuclei\.csv: expected the columns x_px, y_px, class"),
        ("nuclei.csv", _cut_at_line_end, r"nuclei\.csv: \d+ nuclei, but .*truth\.json counts \d+"),
        ("nuclei.csv", lambda text: text[: len(text) // 2], r"nuclei\.csv(, line \d+:|: \d+ nuclei)"),
    ],
)
def test_damaged_truth_is_a_truth_error_naming_the_file_and_the_fix(phantom_copy, name, damage, match):
    path = truth_dir_for(phantom_copy) / name
    path.write_text(damage(path.read_text()))
    with pytest.raises(TruthFormatError, match=match) as info:
        load_truth(phantom_copy)
    assert "pdl1 phantom ... --overwrite" in str(info.value)
    assert isinstance(info.value, Pdl1Error) and isinstance(info.value, ValueError)


def test_a_damaged_mask_is_a_truth_error(phantom_copy):
    path = truth_dir_for(phantom_copy) / "positive_mask.tif"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(TruthFormatError, match=r"positive_mask\.tif: not a readable TIFF"):
        load_truth(phantom_copy)


def test_a_missing_slide_or_a_folder_is_named_as_such_not_as_missing_truth(tmp_path):
    # Training reads truth too: the message is not evaluation's alone.
    (tmp_path / "plain.svs").write_bytes(b"II*\x00")
    with pytest.raises(Pdl1Error, match=r"no truth beside .*plain\.svs: .*; this command takes phantom slides") as err:
        load_truth(tmp_path / "plain.svs")
    assert str(err.value).endswith(
        "A slide a lab labelled in QuPath scores a model as a held-out slide of `pdl1 train` (--val-entries; "
        "OUT/validation.json)"
    )
    # Both said "no truth beside X", as if the slide were there.
    with pytest.raises(Pdl1Error) as err:
        load_truth(tmp_path / "nope.svs")
    assert str(err.value) == (
        f"{tmp_path / 'nope.svs'}: no such slide; give phantom slides written by `pdl1 phantom`, with their truth "
        f"beside them ({tmp_path / 'nope.truth' / 'truth.json'})"
    )
    with pytest.raises(Pdl1Error) as err:
        load_truth(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is a folder; give phantom slide files with their truth beside them (written by `pdl1 phantom`): "
        f"the slides themselves, e.g. {tmp_path / '*.svs'}"
    )


def test_eval_with_the_suites_out_before_the_slides_runs_the_suite(tmp_path):
    # `pdl1 eval --out DIR SLIDE...` said "No such option: --out": only a slide first went to the suite.
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "rep"), str(tmp_path / "nope.svs")])
    assert result.exit_code == 1, result.output
    assert "nope.svs: no such slide; give phantom slides written by `pdl1 phantom`" in _said(result)
    assert "Usage: pdl1 eval" in CliRunner().invoke(app, ["eval", "--help"]).output


@pytest.mark.parametrize("name", ["positive_mask.tif", "nuclei.csv"])
def test_a_missing_truth_file_is_a_truth_error(phantom_copy, name):
    (truth_dir_for(phantom_copy) / name).unlink()
    with pytest.raises(TruthFormatError, match=rf"{name.replace('.', '[.]')}: missing .*--overwrite"):
        load_truth(phantom_copy)


def test_undamaged_truth_loads_with_every_nucleus_counted(phantom_copy):
    truth = load_truth(phantom_copy)
    assert len(truth.nuclei_class) == sum(truth.summary["nuclei_counts"].values())


# --- stains and batches: refused before any model runs --------------------------------------------------------

runner = CliRunner()
MODELS = Path(__file__).resolve().parents[1] / "inference" / "demo_models"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 1024² H&E phantom and its PD-L1 IHC section."""
    from inference.phantom.pyramid import write_ihc_phantom

    folder = tmp_path_factory.mktemp("pair")
    spec = PhantomSpec(1024, 1024, seed=1, tps_percent=30)
    he = write_phantom(folder / "he.svs", spec)
    write_ihc_phantom(folder / "ihc.svs", spec, paired_with=he.slide_path)
    return folder / "he.svs", folder / "ihc.svs"


def _said(result) -> str:
    """The output on one line, without the borders of a usage error's box."""
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["eval", "ihc", "{he}", "--no-review"], "he.svs: the phantom is H&E (its truth.json's stain), but the PD-L1"),
        (["eval", "ihc", "{he}"], "he.svs: the phantom is H&E (its truth.json's stain), but the PD-L1 IHC nuclei"),
        (["eval", "nuclei", "{he}", "--model", str(MODELS / "nuclei-ihc")], "trained on H-DAB: score that model"),
        (["eval", "seg", "{ihc}"], "ihc.svs: the phantom is H-DAB (its truth.json's stain), but the segmentation"),
        (["eval", "tps", "{ihc}"], "ihc.svs: the phantom is H-DAB"),
        (["eval", "registration", "{he}"], "but this evaluation takes H-DAB phantoms"),
        (["calibrate", "{ihc}", "--out", "{tmp}/cal"], "ihc.svs: the phantom is H-DAB"),
        (
            ["eval", "{he}", "--out", "{tmp}/rep", "--nuclei-model", str(MODELS / "nuclei-ihc")],
            "is an H-DAB (PD-L1 IHC) nuclei model, but an H&E nuclei model is needed for scoring the H&E slides",
        ),
        (
            ["eval", "ihc", "{ihc}", "--model", str(MODELS / "nuclei")],
            "is an H&E nuclei model, but an H-DAB (PD-L1 IHC) nuclei model is needed for `pdl1 eval ihc`; give one, "
            "or leave --model out",
        ),
        (
            ["eval", "{he}", "{ihc}", "--out", "{tmp}/rep", "--ihc-model", str(MODELS / "nuclei")],
            "is an H&E nuclei model, but an H-DAB (PD-L1 IHC) nuclei model is needed for scoring the PD-L1 IHC slides",
        ),
        (
            ["eval", "tps", "{he}", "--nuclei-model", str(MODELS / "nuclei-ihc")],
            "is an H-DAB (PD-L1 IHC) nuclei model, but an H&E nuclei model is needed for `pdl1 eval tps`",
        ),
    ],
)
def test_a_model_of_another_stain_than_the_phantom_is_refused(pair, tmp_path, args, said):
    he, ihc = pair
    args = [a.format(he=he, ihc=ihc, tmp=tmp_path) for a in args]
    options = [] if "registration" in args else ["--device", "cpu", "--no-progress"]
    result = runner.invoke(app, [*args, *options])
    assert result.exit_code == 1, result.output
    assert said in _said(result)
    assert "QuPath" not in result.output and "--stain" not in result.output
    assert not (tmp_path / "cal").exists() and not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    ("command", "slide", "said"),
    [
        (
            ["ihc"],
            "he",
            "he.svs: the phantom is H&E (its truth.json's stain), but the PD-L1 IHC nuclei model 'pdl1-nuclei-ihc' was "
            "trained on H-DAB: give H-DAB phantoms (`pdl1 phantom --ihc` writes PD-L1 IHC ones)",
        ),
        (
            ["nuclei", "--model", str(MODELS / "nuclei-ihc")],
            "he",
            "he.svs: the phantom is H&E (its truth.json's stain), but the nuclei model 'pdl1-nuclei-ihc' was trained "
            "on H-DAB: score that model on H-DAB phantoms, or give a nuclei model trained on H&E",
        ),
    ],
)
def test_a_phantom_of_a_stain_the_evaluation_does_not_take_asks_for_the_right_phantoms(pair, command, slide, said):
    # It advised "give a PD-L1 IHC nuclei model trained on H&E", a model that does not exist.
    path = pair[0] if slide == "he" else pair[1]
    result = runner.invoke(app, ["eval", *command, str(path), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert _said(result).endswith(said), _said(result)


@pytest.mark.parametrize("command", [["seg"], ["nuclei"], ["tps"], []])
def test_a_batch_with_bad_slides_fails_at_once_naming_each(pair, tmp_path, command):
    he, _ = pair
    plain = tmp_path / "plain.svs"
    shutil.copy(he, plain)  # a slide without truth
    out = ["--out", str(tmp_path / "rep")] if not command else []
    slides = [str(he), str(plain), str(he), str(tmp_path / "other.svs")]
    result = runner.invoke(app, ["eval", *command, *slides, *out, "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    said = _said(result)
    # Every eval scores a slide named twice once (with a note saying so).
    assert "2 of 3 slides cannot be evaluated, so none was" in said and "is given twice; it is scored once" in said
    assert "no truth beside" in said and "plain.svs" in said and "other.svs" in said
    assert "Dice" not in said and "F1" not in said  # nothing was scored


# --- --out and the model calibrate writes -----------------------------------------------------------------------


def test_an_out_that_is_a_file_is_refused_before_any_computing(small_phantom, tmp_path):
    file = tmp_path / "report.txt"
    file.write_text("kept")
    for command in (["eval"], ["calibrate"]):
        result = runner.invoke(app, [*command, str(small_phantom), "--out", str(file), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert "--out must be a folder" in _said(result)
    assert file.read_text() == "kept"


@pytest.fixture
def model_copy(tmp_path) -> Path:
    folder = tmp_path / "seg"
    shutil.copytree(MODELS / "seg", folder)
    return folder


def test_calibrate_refuses_an_out_that_holds_a_model(small_phantom, model_copy, tmp_path):
    before = (model_copy / "manifest.json").read_bytes()
    result = runner.invoke(app, ["calibrate", str(small_phantom), "--out", str(model_copy), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "already holds a model" in _said(result) and "give a new folder" in _said(result)
    assert (model_copy / "manifest.json").read_bytes() == before


def test_calibrate_refuses_a_model_it_cannot_write_before_computing(small_phantom, model_copy, monkeypatch):
    import os

    readable = os.access
    # As a read-only model folder (root could write to a real one).
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK and readable(path, mode))
    result = runner.invoke(app, ["calibrate", str(small_phantom), "--model", str(model_copy), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "is not writable" in _said(result) and "pass --out DIR" in _said(result)


def test_a_failed_calibrated_copy_leaves_no_half_written_folder(small_phantom, tmp_path, monkeypatch):
    import inference

    def broken(folder, manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inference, "write_manifest", broken)
    out = tmp_path / "cal"
    args = ["calibrate", str(small_phantom), "--out", str(out), "--nuclei-model", "none", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_calibrate_says_what_was_kept_on_ctrl_c(small_phantom, model_copy, monkeypatch):
    import inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "calibrate_ensemble", interrupted)
    before = (model_copy / "manifest.json").read_bytes()
    result = runner.invoke(app, ["calibrate", str(small_phantom), "--model", str(model_copy), "--device", "cpu"])
    assert result.exit_code == 130, result.output
    assert "interrupted: nothing was written" in _said(result)
    assert (model_copy / "manifest.json").read_bytes() == before


def test_calibrate_keeps_the_sua_thresholds_when_no_npr_is_a_false_negative(small_phantom, model_copy, monkeypatch):
    import dataclasses

    import inference

    real = inference.calibrate_ensemble

    def without_false_negatives(*args, **kwargs):
        cal, review = real(*args, **kwargs)
        return dataclasses.replace(cal, n_false_negative=0, f05=0.0), review

    monkeypatch.setattr(inference, "calibrate_ensemble", without_false_negatives)
    before = json.loads((model_copy / "manifest.json").read_text())
    args = ["calibrate", str(small_phantom), "--model", str(model_copy), "--nuclei-model", "none", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "SUA kept:" in _said(result) and "0 false negative), so the model's SUA thresholds stay" in _said(result)
    after = json.loads((model_copy / "manifest.json").read_text())
    for key in ("sua_lower", "sua_upper", "sua_threshold", "pixel_baseline_threshold"):
        assert after["thresholds"].get(key) == before["thresholds"].get(key), key
    assert after["extra"]["sua"]["false_negative_nprs"] == 0 and "stay" in after["extra"]["sua"]["thresholds_kept"]
    assert after["extra"]["sua"]["kept_from"] == before["extra"]["sua"]


def test_eval_tps_shows_its_progress_or_not(pair):
    he, _ = pair
    result = runner.invoke(app, ["eval", "tps", str(he), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "predicted TPS (H&E) vs truth" in result.output


@pytest.mark.parametrize(
    ("command", "field", "value"),
    [
        ("tps", "tps_percent", None),
        ("tps", "nuclei_counts", None),
        ("tps", "spec", None),
        ("tps", "tps_percent", "30"),
        ("seg", "spec", None),
    ],
)
def test_a_truth_without_a_field_the_evaluation_reads_is_named_before_any_slide_is_analysed(
    phantom_copy, command, field, value
):
    """`pdl1 eval tps` on a truth.json without tps_percent, nuclei_counts or spec ended in a KeyError traceback
    after the slide was analysed; `eval seg` without spec said only "truth.json has no 'spec'", also after."""
    path = truth_dir_for(phantom_copy) / "truth.json"
    summary = json.loads(path.read_text())
    if value is None:
        del summary[field]
    else:
        summary[field] = value
    path.write_text(json.dumps(summary))
    result = runner.invoke(app, ["eval", command, str(phantom_copy), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = _said(result)
    assert f"'{field}' (" in said and "missing or malformed" in said and "pdl1 phantom" in said


def test_a_refused_eval_leaves_no_out_folder_behind(tmp_path):
    # --out is made (and locked) before the computing; an eval refused on its slides removes it again.
    out = tmp_path / "new" / "rep"
    result = CliRunner().invoke(app, ["eval", "--out", str(out), str(tmp_path / "nope.svs")])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "new").exists()


def test_the_staged_files_a_killed_eval_left_are_removed_by_the_next_and_no_others(tmp_path):
    # A suite killed while writing its report left metrics.csv.<hex>.part, provenance.json.<hex>.part and its plots'
    # .part files in --out for good; the next eval into the folder removes them (its lock held: no other eval
    # writes there), even one refused on its slides, and leaves any other file alone.
    import socket
    import subprocess
    import sys

    from bridge.run_lock import OUTPUT_LOCK_FILE

    out = tmp_path / "rep"
    out.mkdir()
    ours = [
        out / f"{n}.0123456789ab.part" for n in ("metrics.csv", "ihc_metrics.csv", "provenance.json", "c_overlay.png")
    ]
    others = [out / "slides.txt.0123456789ab.part", out / "metrics.csv.part", out / "metrics.csv"]
    for path in ours + others:
        path.write_text("staged")
    # An earlier eval's folder (a folder of other files and no eval is refused whole, before any of this).
    (out / "provenance.json").write_text(json.dumps({"command": "pdl1 eval"}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}
    (out / OUTPUT_LOCK_FILE).write_text(json.dumps(holder))  # the killed eval's lock
    result = CliRunner().invoke(app, ["eval", "--out", str(out), str(tmp_path / "nope.svs")])
    assert result.exit_code == 1 and "no such slide" in _said(result), result.output
    assert not any(p.exists() for p in ours) and all(p.read_text() == "staged" for p in others)
    assert not (out / OUTPUT_LOCK_FILE).exists()


def test_an_eval_into_a_folder_another_eval_is_writing_is_refused_before_its_computing(phantom_copy, tmp_path):
    import os
    import socket

    from bridge.run_lock import OUTPUT_LOCK_FILE

    out = tmp_path / "rep"
    out.mkdir()
    staged = out / "metrics.csv.0123456789ab.part"
    staged.write_text("being written")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}
    (out / OUTPUT_LOCK_FILE).write_text(json.dumps(holder))
    result = CliRunner().invoke(app, ["eval", "--out", str(out), str(phantom_copy), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert f"another pdl1 eval is writing here (pid {os.getpid()} on" in _said(result)
    assert staged.read_text() == "being written" and sorted(p.name for p in out.iterdir()) == sorted(
        [OUTPUT_LOCK_FILE, staged.name]
    )


def test_eval_out_that_holds_other_files_is_refused_and_an_earlier_evals_is_replaced(small_phantom, tmp_path):
    # helper-130: a user's own metrics.csv and provenance.json in --out were replaced without a word.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my,own\n1,2\n")
    result = runner.invoke(app, ["eval", str(small_phantom), "--out", str(mine), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert (
        f"--out {mine} holds other files (metrics.csv) and no earlier pdl1 eval; it writes metrics.csv, "
        "ihc_metrics.csv, provenance.json and PNG plots there, and would replace files of those names: give a new or "
        "empty folder"
    ) in _said(result)
    assert (mine / "metrics.csv").read_text() == "my,own\n1,2\n" and sorted(p.name for p in mine.iterdir()) == [
        "metrics.csv"
    ]
    ours = tmp_path / "ours"
    for _ in range(2):  # a new folder, then the same one again
        result = runner.invoke(app, ["eval", str(small_phantom), "--out", str(ours), "--no-progress"])
        assert result.exit_code == 0, result.output


def test_the_truth_of_another_phantom_or_an_altered_mask_is_refused(small_phantom, tmp_path):
    # helper-130: another phantom's truth beside a slide, or a changed positive_mask.tif, was scored (Dice 0.1997,
    # 0.0000) and exported as nnU-Net labels without a word.
    import numpy as np
    import tifffile

    other = tmp_path / "other.svs"
    write_phantom(other, PhantomSpec(1024, 1024, seed=99, tps_percent=70))
    larger = tmp_path / "larger.svs"
    write_phantom(larger, PhantomSpec(1536, 1536, seed=1, tps_percent=30))
    for truth_of, says in [
        (other, r"phantom seed 1 \(its TIFF description\), but .*truth\.json is seed 99's; the truth beside it"),
        (larger, r"1024 x 1024 px, but .*truth\.json describes a 1536 x 1536 px phantom; the truth beside it"),
    ]:
        slide = tmp_path / f"with_{truth_of.stem}" / "x.svs"
        slide.parent.mkdir()
        shutil.copy(small_phantom, slide)
        shutil.copytree(truth_dir_for(truth_of), truth_dir_for(slide))
        with pytest.raises(TruthFormatError, match=says):
            load_truth(slide)
    slide = tmp_path / "edited" / "x.svs"
    slide.parent.mkdir()
    shutil.copy(small_phantom, slide)
    shutil.copytree(truth_dir_for(small_phantom), truth_dir_for(slide))
    mask_path = truth_dir_for(slide) / "positive_mask.tif"
    mask = tifffile.imread(mask_path)
    mask[:4, :4] = 1 - mask[:4, :4]
    tifffile.imwrite(mask_path, mask)
    with pytest.raises(TruthFormatError, match=r"positive, but .*records .* \(mask_positive_fraction\): the mask is"):
        load_truth(slide)
    tifffile.imwrite(mask_path, np.zeros((192, 192), np.uint8))
    with pytest.raises(TruthFormatError, match=r"192 x 192 px, but the 1024 x 1024 px phantom .* needs 128 x 128"):
        load_truth(slide)
    result = runner.invoke(app, ["eval", "seg", str(slide), "--no-progress"])
    assert result.exit_code == 1 and "needs 128 x 128: the mask is another phantom's or altered" in _said(result)


def test_calibration_fits_the_review_limits_on_the_candidates_of_the_sua_pdl1_run_will_use(small_phantom):
    # helper-134: with nothing to fit (no NPR a false negative), the model's SUA thresholds are kept, but the review
    # limits were fitted on the candidate areas of the first threshold tried, which pdl1 run never uses.
    import dataclasses

    import inference.evaluation.evaluate as evaluate
    from inference import Ensemble
    from inference.pipeline import PipelineConfig, sua_params_for

    real_calibrate, real_find = evaluate.calibrate, evaluate.find_candidates
    used = []

    def unfitted(*args, **kwargs):
        cal = real_calibrate(*args, **kwargs)
        odd = dataclasses.replace(cal.params, threshold=0.0123)  # what a fit scoring F0.5 0 may leave
        return dataclasses.replace(cal, params=odd, n_false_negative=0, f05=0.0)

    def recording(maps, params, **kwargs):
        used.append(params)
        return real_find(maps, params, **kwargs)

    ensemble = Ensemble.load(MODELS / "seg", task="segmentation", device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "calibrate", unfitted)
        mp.setattr(evaluate, "find_candidates", recording)
        cal, _ = evaluate.calibrate_ensemble([small_phantom], ensemble)
    kept = sua_params_for(ensemble.manifest, PipelineConfig(), upper=cal.params.upper)
    assert used == [kept] and kept.threshold != 0.0123


# --- pixel sizes: checked for every slide before any is scored, in the words of the command -----------------------


def _stating_mpp(slide: Path, copy: Path, mpp: bytes) -> Path:
    """``slide`` (an SVS phantom at 0.5 µm/px) copied to ``copy`` with its truth, its header stating ``mpp`` (three
    characters, as "0.5": the TIFF's offsets stay right)."""
    data = slide.read_bytes()
    if data.count(b"MPP = 0.5") != 1 or len(mpp) != 3:
        raise ValueError(f"{slide}: not an SVS phantom at 0.5 µm/px, or {mpp!r} not of three characters")
    copy.write_bytes(data.replace(b"MPP = 0.5", b"MPP = " + mpp))
    shutil.copytree(truth_dir_for(slide), truth_dir_for(copy))
    return copy


@pytest.mark.parametrize(
    ("command", "stain", "words"),
    [
        (["eval", "seg"], "he", "`pdl1 eval`"),
        (["eval", "nuclei"], "he", "`pdl1 eval`"),
        (["eval", "tps"], "he", "`pdl1 eval`"),
        (["eval", "ihc"], "ihc", "`pdl1 eval`"),
        (["eval", "ihc", "--no-review"], "ihc", "`pdl1 eval`"),
        (["eval", "--out", "{tmp}/rep"], "he", "`pdl1 eval`"),
        (
            ["eval", "registration"],
            "ihc",
            "`pdl1 eval registration` (whose --mpp is the resolution it registers at, not the slides')",
        ),
        (["calibrate", "--out", "{tmp}/cal"], "he", "`pdl1 calibrate`"),
    ],
)
def test_slides_of_implausible_pixel_size_are_all_named_before_any_is_scored(pair, tmp_path, command, stain, words):
    """A slide whose file states an implausible pixel size was found when its turn came, after the slides before it
    were scored (minutes each), and the advice, the library's "pass ... as mpp", named an argument none of these
    commands takes."""
    he, ihc = pair
    for slide in pair:  # the IHC's H&E beside it, for the registration
        shutil.copy(slide, tmp_path / slide.name)
        shutil.copytree(truth_dir_for(slide), truth_dir_for(tmp_path / slide.name))
    good = tmp_path / (he if stain == "he" else ihc).name
    bad = [_stating_mpp(good, tmp_path / f"{name}.svs", b"900") for name in ("bad1", "bad2")]
    args = [a.format(tmp=tmp_path) for a in command]
    options = [] if "registration" in args else ["--device", "cpu", "--no-progress"]
    result = runner.invoke(app, [*args, str(good), *map(str, bad), *options])
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert "2 of 3 slides cannot be evaluated, so none was:" in said, said
    for path in bad:
        assert (
            f"{path.name}: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range (0.05, 50.0); "
            f"{words} reads each phantom at the pixel size its file states, and takes none: write the phantom again "
            "with `pdl1 phantom ... --overwrite` at the --mpp its truth.json records (spec.mpp)"
        ) in said
    assert "as mpp" not in said and "Dice" not in said and "F1" not in said and "median" not in said
    assert not (tmp_path / "rep").exists() and not (tmp_path / "cal").exists()


def test_an_h_and_e_partner_without_a_plausible_pixel_size_is_told_in_the_registrations_words(pair, tmp_path):
    # The IHC's H&E is opened when its pair is registered: the library's advice reached the user there.
    he, ihc = pair
    _stating_mpp(he, tmp_path / he.name, b"900")
    shutil.copy(ihc, tmp_path / ihc.name)
    shutil.copytree(truth_dir_for(ihc), truth_dir_for(tmp_path / ihc.name))
    result = runner.invoke(app, ["eval", "registration", str(tmp_path / ihc.name)])
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert (
        "he.svs: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range (0.05, 50.0); "
        "`pdl1 eval registration` (whose --mpp is the resolution it registers at, not the slides') reads each "
        "phantom at the pixel size its file states, and takes none"
    ) in said, said
    assert "as mpp" not in said


def test_a_phantom_stating_another_pixel_size_than_its_truth_was_written_at_is_named(pair, tmp_path):
    # A header stating 9 µm/px over a 0.5 µm/px phantom failed on "the model's tile size 256 is not a multiple of
    # map_downsample 36", naming neither the slide's pixel size nor its truth; one stating 2.0 was scored at 4 times
    # its scale.
    he, _ = pair
    bad = _stating_mpp(he, tmp_path / "bad.svs", b"2.0")
    result = runner.invoke(app, ["eval", "seg", str(bad), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert (
        f"{bad}: its file states 2 µm/px, but its truth.json describes a phantom written at 0.5 µm/px, so its truth "
        "would be scored at another scale; write the phantom again with `pdl1 phantom ... --overwrite`"
    ) in _said(result), _said(result)


# --- resolutions: a slide too coarse for a model that scores it, named with the others before any is scored --------


@pytest.fixture(scope="module")
def coarse_pair(tmp_path_factory) -> tuple[Path, Path]:
    """An H&E phantom and its PD-L1 IHC written at 1 µm/px: too coarse for a model that reads 0.25 µm/px."""
    from inference.phantom.pyramid import write_ihc_phantom

    folder = tmp_path_factory.mktemp("coarse")
    spec = PhantomSpec(1024, 1024, seed=2, tps_percent=30, mpp=1.0)
    he = write_phantom(folder / "coarse_he.svs", spec)
    write_ihc_phantom(folder / "coarse_ihc.svs", spec, paired_with=he.slide_path)
    return folder / "coarse_he.svs", folder / "coarse_ihc.svs"


def _reading_at(kind: str, folder: Path, mpp: float) -> Path:
    """The shipped demo model of ``kind`` copied to ``folder``, its manifest stating it reads ``mpp`` µm/px."""
    shutil.copytree(MODELS / kind, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input_mpp"] = mpp
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("command", "kind", "stain", "role"),
    [
        (["eval", "seg", "--model", "{model}"], "seg", "he", "segmentation"),
        (["eval", "nuclei", "--model", "{model}"], "nuclei", "he", "nuclei"),
        (["eval", "tps", "--seg-model", "{model}"], "seg", "he", "segmentation"),
        (["eval", "tps", "--nuclei-model", "{model}"], "nuclei", "he", "nuclei"),
        (["eval", "ihc", "--model", "{model}"], "nuclei-ihc", "ihc", "PD-L1 IHC nuclei"),
        (["eval", "ihc", "--no-review", "--model", "{model}"], "nuclei-ihc", "ihc", "PD-L1 IHC nuclei"),
        (["eval", "--out", "{tmp}/rep", "--model", "{model}"], "seg", "he", "segmentation"),
        (["eval", "--out", "{tmp}/rep", "--ihc-model", "{model}"], "nuclei-ihc", "ihc", "PD-L1 IHC nuclei"),
        (["calibrate", "--out", "{tmp}/cal", "--model", "{model}"], "seg", "he", "segmentation"),
    ],
)
def test_slides_too_coarse_for_a_model_are_named_with_the_others_before_any_is_scored(
    pair, coarse_pair, tmp_path, monkeypatch, command, kind, stain, role
):
    """A slide whose pixels are coarser than a model reads by more than twice was enlarged and scored (eval seg,
    nuclei, calibrate, the suite's H&E), or refused when its turn came (eval tps, ihc), after the slides before it
    were scored; here one of implausible pixel size is named with it, in the words `pdl1 run` refuses it in."""
    from inference.slides.slide import Slide

    model = _reading_at(kind, tmp_path / "model", 0.25)
    good = (pair[0] if stain == "he" else pair[1]).name
    for slide in (*pair, *coarse_pair):  # the IHC's H&E beside it
        shutil.copy(slide, tmp_path / slide.name)
        shutil.copytree(truth_dir_for(slide), truth_dir_for(tmp_path / slide.name))
    coarse = tmp_path / (coarse_pair[0] if stain == "he" else coarse_pair[1]).name
    implausible = _stating_mpp(tmp_path / good, tmp_path / "bad.svs", b"900")
    opened = []
    real_init = Slide.__init__
    monkeypatch.setattr(
        Slide, "__init__", lambda self, *a, **k: opened.append(k.get("path")) or real_init(self, *a, **k)
    )
    args = [a.format(tmp=tmp_path, model=model) for a in command]
    slides = [str(tmp_path / good), str(coarse), str(implausible)]
    result = runner.invoke(app, [*args, *slides, "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert "2 of 3 slides cannot be evaluated, so none was:" in said, said
    assert (
        f"{coarse.name}: its pixels are 1 µm (from openslide.mpp-x/y), but the {role} model reads 0.25 µm/px: it "
        "would enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, `pdl1 "
    ) in said, said
    assert "bad.svs: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range" in said
    assert opened == [] and "Dice" not in said and "F1" not in said
    assert not (tmp_path / "rep").exists() and not (tmp_path / "cal").exists()
