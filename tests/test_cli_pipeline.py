"""The pipeline commands end to end on small phantoms with the shipped demo models."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "c.svs"
    write_phantom(path, PhantomSpec(1536, 1536, seed=61, tps_percent=45))
    return path


def test_eval_seg_prints_ensemble_and_members(small):
    result = runner.invoke(app, ["eval", "seg", str(small), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Dice, ensemble" in result.output and "Dice, member 4" in result.output
    assert "ensemble Dice >= every member's" in result.output
    assert "AUROC predictive entropy -> error" in result.output


def test_eval_commands_score_a_slide_given_twice_once(small, tmp_path):
    # helper-130: `pdl1 eval tps a.svs a.svs` counted a.svs twice in its means ("4 of 4" for two slides given twice).
    link = tmp_path / "same.svs"
    link.symlink_to(small)
    (tmp_path / "same.truth").symlink_to(small.with_suffix(".truth"))
    result = runner.invoke(app, ["eval", "seg", str(small), str(link), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"note: {small} is given twice (as {link}); it is scored once" in said, said
    assert said.count("c.svs") == 2 and "same.svs" in said  # the note's name and the one row, not two


def test_eval_seg_of_a_one_member_model_sets_no_member_beside_it(small, tmp_path):
    """A one-member model printed 'ensemble Dice >= every member's: yes (0.4312 vs best member 0.4312)'."""
    model = tmp_path / "one"
    shutil.copytree(Path(__file__).parents[1] / "inference" / "demo_models" / "seg", model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["members"] = manifest["members"][:1]
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["eval", "seg", str(small), "--model", str(model), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Dice, ensemble" in result.output and "ensemble Dice >= every member's" not in result.output


def test_eval_seg_sums_up_several_slides(small, tmp_path):
    other = tmp_path / "d.svs"  # a copy: one slide given twice is scored once
    shutil.copy(small, other)
    shutil.copytree(small.with_suffix(".truth"), other.with_suffix(".truth"))
    result = runner.invoke(app, ["eval", "seg", str(small), str(other), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Dice over 2 slides" in result.output
    assert "mean of slides" in result.output and "pooled pixels" in result.output
    assert "of 2 slides; mean of slides" in result.output


def test_eval_nuclei_prints_f1_and_tps(small):
    result = runner.invoke(app, ["eval", "nuclei", str(small), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Tumor: Positive" in result.output and "TPS" in result.output


def test_eval_suite_writes_a_report(small, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", str(small), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[0]["slide"] == "c.svs" and 0 <= float(rows[0]["dice"]) <= 1
    for name in ("reliability.png", "npr_uncertainty_hist.png", "c_overlay.png", "provenance.json"):
        assert (out / name).is_file(), name
    assert "SUA F0.5" in result.output
    # It names the nuclei model that made tps_predicted (it named the segmentation and IHC models alone).
    from inference import demo_model_dir, read_manifest

    demo = read_manifest(demo_model_dir("nuclei"), task="nuclei")
    said = json.loads((out / "provenance.json").read_text())["nuclei_model"]
    assert (said["sha256"], said["folder"]) == (demo.checksum, str(demo_model_dir("nuclei"))), said


def test_eval_suite_refuses_two_slides_of_one_name_before_scoring_and_scores_a_repeat_once(small, tmp_path):
    # Both were scored whole, then refused as "opened twice among the files replaced together"; the same slide
    # named twice was refused so too.
    import shutil

    other = tmp_path / "other" / small.name
    other.parent.mkdir()
    shutil.copy(small, other)
    shutil.copytree(small.with_name(small.stem + ".truth"), other.with_name(other.stem + ".truth"))
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["eval", str(small), str(other), "--out", str(out), "--no-progress"], env={"COLUMNS": "1000"}
    )
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert f"{small}, {other} share the file name 'c', so their overlays" in text and not out.exists()
    result = runner.invoke(app, ["eval", str(small), str(small), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "scored once" in " ".join(result.output.split())
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 1


def test_calibrate_writes_thresholds_into_a_copy(small, tmp_path):
    result = runner.invoke(app, ["calibrate", str(small), "--out", str(tmp_path / "cal"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # A bar per slide and pass (lines here: the runner's stderr is no terminal); the tiles of every slide shared one
    # bar naming none, and the predicted TPS of every slide ran after it in silence.
    passes = r"^segmentation c\.svs \(slide 1 of 1\): (\d+)/\1 .*^nuclei c\.svs \(slide 1 of 1\): (\d+)/\2 "
    assert re.search(passes, result.output, re.M | re.S), result.output
    manifest = json.loads((tmp_path / "cal" / "manifest.json").read_text())
    for key in ("sua_lower", "sua_upper", "sua_threshold", "pixel_baseline_threshold", "review_entropy"):
        assert key in manifest["thresholds"], key
    assert manifest["extra"]["sua"]["calibrated_on"] == ["c.svs"]
    # Fitted on one slide, SUA's thresholds are written with a warning that so little can set them.
    said = " ".join(result.output.split())
    assert ("SUA: NPR" in said) == ("warning: SUA's thresholds rest on" in said), said
    assert "of 1 slide: one odd region can set them" in said or "SUA kept" in said
    refused = runner.invoke(app, ["calibrate", str(small)])
    assert refused.exit_code == 2 and "read-only" in refused.output


def test_calibrate_names_a_failure_on_the_tps_category(small, tmp_path, monkeypatch):
    # With the nuclei model (the default) a slide also fails on its predicted TPS category, but the printout
    # said "failed (positive area off by more than 25%)" and showed only the area's error beside "(failed)".
    import inference.evaluation.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_truth_tps", lambda scored: 0.5)  # the truth under 1 %: the category is wrong
    args = ["calibrate", str(small), "--out", str(tmp_path / "cal"), "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "1 of 1 validation slides failed (TPS category wrong or positive area off by more than 25%)" in said, said
    assert "vs truth 0.5% (category wrong), positive area off by" in said, said


def test_calibrate_on_a_slide_without_tumour_nuclei(small, tmp_path, monkeypatch):
    # No tumour nucleus found: the predicted TPS is None, which tps_category() met as a TypeError.
    import inference.evaluation.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_predicted_tps", lambda *args, **kwargs: (None, 0.0, None))
    args = ["calibrate", str(small), "--out", str(tmp_path / "cal"), "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "predicted TPS no tumour nuclei vs truth" in " ".join(result.output.split()), result.output


def test_calibrate_where_the_rules_it_does_not_fit_alone_exceed_the_false_alarm_budget(tmp_path):
    # helper-129: two of four correct slides flagged by the domain guard and the members' disagreement, which the fit
    # cannot unflag: no limits kept the 20 % budget and calibrate stopped with "max() arg is an empty sequence".
    slides = []
    for i, (tps, shift, weak) in enumerate([(40, 0, 0), (2, 0.9, 0.4), (0.8, 0.5, 0.3), (60, 0.95, 0), (10, 0, 0)]):
        slides.append(str(tmp_path / f"v{i + 1}.svs"))
        args = ["phantom", slides[-1], "--size", "1024", "--seed", str(301 + i), "--tps", str(tps)]
        assert runner.invoke(app, [*args, "--shift", str(shift), "--weak-fraction", str(weak)]).exit_code == 0
    result = runner.invoke(app, ["calibrate", *slides, "--out", str(tmp_path / "cal"), "--no-progress"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "with false alarms on 50% of 4 others (target: at least 90% at most 20%: NOT met)" in said, said
    assert "flag 2 of the 4 correct slides whatever these limits say, above the 20% allowed" in said, said
    review = json.loads((tmp_path / "cal" / "manifest.json").read_text())["extra"]["review"]
    assert review["calibrated_on"] == [f"v{i}.svs" for i in range(1, 6)]


def test_calibrate_on_a_slide_named_twice_counts_it_once(small, tmp_path):
    # A glob and one of its files (or a symlink to it) counted the slide twice in the fit and in the review
    # limits' "0 of 2 validation slides", and recorded it twice as calibrated on.
    link = tmp_path / "same.svs"
    link.symlink_to(small)
    (tmp_path / "same.truth").symlink_to(small.with_suffix(".truth"))
    result = runner.invoke(
        app,
        ["calibrate", str(small), str(link), "--out", str(tmp_path / "cal"), "--device", "cpu", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"note: {small} is given twice (as {link}); it is calibrated on once" in said, said
    assert "of 1 validation slides" in said, said
    manifest = json.loads((tmp_path / "cal" / "manifest.json").read_text())
    assert manifest["extra"]["sua"]["calibrated_on"] == ["c.svs"]
    assert manifest["extra"]["review"]["calibrated_on"] == ["c.svs"]


def test_run_plain_slides_with_a_failure_exits_1_and_reports(small, tmp_path):
    missing = tmp_path / "gone.svs"
    result = runner.invoke(
        app,
        [
            "run",
            str(small),
            str(missing),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-progress",
            "--report",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "failed" in result.output and "gone.svs" in result.output
    assert (tmp_path / "out" / "c.geojson").is_file()
    assert (tmp_path / "out" / "pdl1" / "report" / "report.html").is_file()


def test_run_says_why_an_image_needs_review_under_its_table(small, tmp_path):
    # An H&E stated to be an immunostain is analysed as stated; why it is flagged is printed, not only "needs review".
    result = runner.invoke(
        app, ["run", str(small), "--stain", "ihc", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "c.svs: needs review: stain: --stain says H-DAB, the colour says H&E" in said
    # and what to do about it, once, under the reasons: the stain first (the image is out of the IHC model's domain too)
    assert "What to check: - stated stain contradicted by the colour: check the stain stated against the slide" in said
    assert said.count("stated stain contradicted by the colour") == 1


def test_run_usage_errors(small, tmp_path):
    result = runner.invoke(app, ["run", str(small), "--address", "auto", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--engine ray" in result.output
    result = runner.invoke(app, ["run", str(small), "--qupath", "maybe", "--out", str(tmp_path)])
    assert result.exit_code == 2
    result = runner.invoke(app, ["run", str(small), "--stain", "dab", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "expected he or ihc (or H&E, H-DAB), got 'dab'" in " ".join(result.output.split())


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--size", "1536", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "project" / "project.qpproj").is_file()
    assert (out / "project" / "pdl1" / "1" / "objects.geojson").is_file()
    report = (out / "project" / "pdl1" / "report" / "report.html").read_text()
    # The shipped demo models are named as such, with their checksums, MPP and date of analysis.
    assert "Demo models." in report and "shipped demo, phantom-trained" in report
    assert "pdl1-seg 1, 5 members, sha256" in report and "µm/px; analysed 20" in report
    assert "predicted TPS (H&E)" in result.output and "TPS (PD-L1 IHC)" in result.output
    # The two sections are one case, compared after the run.
    pairs = json.loads((out / "project" / "pdl1" / "pairs.json").read_text())["cases"]
    assert list(pairs) == ["phantom"] and pairs["phantom"]["comparison"] is not None


def test_serve_refuses_a_public_bind_without_token(tmp_path):
    pytest.importorskip("uvicorn", reason="needs the 'serve' extra (without it serve says so and exits 1)")
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--allow-root", str(tmp_path)])
    assert result.exit_code == 2 and "--token" in result.output


def test_run_speed_options_reach_the_model_configs():
    from bridge.cli.common import pipeline_config

    default = pipeline_config("cpu", None, None, None).segment
    assert (default.batch_size, default.read_workers, default.compile) == (None, None, False)  # the device's
    config = pipeline_config("cpu", None, None, None, batch_size=32, read_workers=0, compile_members=True)
    assert (config.segment.batch_size, config.segment.read_workers, config.segment.compile) == (32, 0, True)
    # --read-workers reaches the nuclei models too (every IHC image read with 2 threads whatever it said).
    assert (config.nuclei.read_workers, pipeline_config("cpu", None, None, None).nuclei.read_workers) == (0, 2)
    result = runner.invoke(app, ["run", "nowhere.svs", "--batch-size", "0"])
    assert result.exit_code == 2 and "batch-size" in result.output
    assert pipeline_config("cpu", None, None, None).nuclei.batch_size is None  # the device's
    assert pipeline_config("cpu", None, None, None, nuclei_batch_size=4).nuclei.batch_size == 4
    result = runner.invoke(app, ["run", "nowhere.svs", "--nuclei-batch-size", "0"])
    assert result.exit_code == 2 and "nuclei-batch-size" in result.output


def test_nuclei_batch_size_follows_the_device_unless_given():
    import torch

    from inference.analysis.nuclei import NucleiConfig

    assert NucleiConfig().batch_for(torch.device("cpu")) == 2
    assert NucleiConfig().batch_for(torch.device("cuda")) == 8
    assert NucleiConfig(batch_size=5).batch_for(torch.device("cpu")) == 5
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        NucleiConfig(batch_size=0)


def test_segmentation_batch_size_follows_the_device_unless_given():
    import torch

    from inference.analysis.segment import CPU_BATCH, CUDA_BATCH, SegmentConfig

    assert SegmentConfig().batch_for(torch.device("cpu")) == CPU_BATCH == 4
    assert SegmentConfig().batch_for(torch.device("cuda")) == CUDA_BATCH == 8
    assert SegmentConfig(batch_size=5).batch_for(torch.device("cpu")) == 5
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SegmentConfig(batch_size=0)


def test_an_interrupted_run_keeps_what_it_finished_and_resumes(small, tmp_path, monkeypatch):
    import bridge.run

    real = bridge.run.analyse_slide
    calls = []

    def stopped_at_the_second_image(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge.run, "analyse_slide", stopped_at_the_second_image)
    second = tmp_path / "d.svs"
    shutil.copyfile(small, second)  # a second slide: a symlink to the first is the same slide, analysed once
    out = tmp_path / "out"
    args = ["run", str(small), str(second), "--out", str(out), "--no-nuclei", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "--resume" in result.output, result.output
    assert (out / "c.geojson").is_file() and not (out / "d.geojson").exists()
    # What it had done is shown: the table of the finished image, then where it stopped (it said neither).
    said = " ".join(result.output.split())
    assert re.search(r"│ c\.svs +│ done +│", result.output), result.output
    assert (
        "stopped while analysing d.svs, which is left as it was; 1 of 2 images finished before it and is written"
        in said
    )

    monkeypatch.setattr(bridge.run, "analyse_slide", real)
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and (out / "d.geojson").is_file()


def test_a_resume_with_nothing_left_says_so_and_draws_no_empty_bar(small, tmp_path):
    # It drew 'images 1/1' and an empty 'tiles 0/?' bar, then a table of "skipped" rows.
    out = tmp_path / "out"
    args = ["run", str(small), "--out", str(out), "--no-nuclei", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--no-progress"]).exit_code == 0
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "nothing left to do: an earlier run finished the 1 image, so --resume skipped it: c.svs" in said, said
    assert "tiles" not in said and "━" not in said and "skipped │" not in said


def test_demo_replaces_only_its_own_project(tmp_path, monkeypatch):
    # --out naming a folder whose project/ is someone's QuPath project deleted it ("a fresh project every time").
    from bridge.cli.demo import _is_demo_project
    from bridge.init_project import init_project_files

    monkeypatch.chdir(tmp_path)
    out = Path("work")  # relative, as the default pdl1-demo is
    he, ihc = out / "slides" / "phantom_HE.svs", out / "slides" / "phantom_IHC.svs"
    write_phantom(he, PhantomSpec(1024, 1024, seed=3))
    init_project_files(out / "project", [he])
    assert _is_demo_project(out / "project", (he, ihc))
    theirs = tmp_path / "theirs.svs"
    write_phantom(theirs, PhantomSpec(1024, 1024, seed=4))
    shutil.rmtree(out / "project")
    init_project_files(out / "project", [he, theirs])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = runner.invoke(app, ["demo", "--out", str(out), "--size", "1024", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"error: {out / 'project'} exists and is not a project `pdl1 demo` made" in text, text
    assert text.endswith("give --out a new folder (or move that one away)")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    result = runner.invoke(app, ["demo", "--out", str(theirs), "--no-progress"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "is a file; --out must be a folder" in result.output, result.output


def test_demo_writes_its_phantoms_anew_for_other_options(tmp_path):
    # A second demo into the same --out with another --seed (or --size, --tps) ran on the first demo's phantoms and
    # scored against their truth: the slides were kept whenever a truth.json was there.
    from bridge.cli.demo import _written_as
    from inference import write_ihc_phantom

    out = tmp_path / "demo"
    he, ihc = out / "slides" / "phantom_HE.svs", out / "slides" / "phantom_IHC.svs"
    first = PhantomSpec(1024, 1024, seed=3, tps_percent=40)
    write_phantom(he, first)
    write_ihc_phantom(ihc, first, paired_with=he)
    args = ["demo", "--out", str(out), "--size", "1024", "--seed", "5", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    asked = PhantomSpec(1024, 1024, seed=5, tps_percent=40)
    assert _written_as(he, asked) and _written_as(ihc, asked)
    truth = json.loads((he.with_suffix(".truth") / "truth.json").read_text())
    assert f"vs truth {truth['tps_percent']:.1f}%" in result.output
    # The same options again keep the slides as they are.
    before = he.stat().st_mtime_ns, ihc.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert (he.stat().st_mtime_ns, ihc.stat().st_mtime_ns) == before


def test_calibrate_warns_when_sua_is_fitted_on_too_little(tmp_path):
    # On one small slide SUA's thresholds were fitted (here on a handful of false-negative regions) and written
    # without a word about how little they rest on.
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    write_phantom(tmp_path / "p.svs", PhantomSpec(1024, 1024, seed=3, tps_percent=100))
    args = ["calibrate", str(tmp_path / "p.svs"), "--out", str(tmp_path / "cal"), "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "SUA: NPR" in said  # fitted: the case the warning is for
    assert "warning: SUA's thresholds rest on" in said and "of 1 slide: one odd region can set them" in said


def test_the_run_table_shows_a_pd_l1_ihcs_cps_beside_its_tps(tmp_path):
    # helper-156: the closing table had no CPS, which a PD-L1 IHC is scored by beside its TPS; an H&E has none.
    import json
    import re

    from inference import cps_text, write_ihc_phantom

    he, ihc = tmp_path / "he.svs", tmp_path / "ihc.svs"
    spec = PhantomSpec(1024, 1024, seed=5, tps_percent=30)
    write_phantom(he, spec)
    write_ihc_phantom(ihc, spec, paired_with=he)
    out = tmp_path / "o"
    args = ["run", str(he), str(ihc), "--out", str(out), "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    cps = json.loads((out / "ihc.summary.json").read_text())["cps"]
    assert re.search(r"┃ category +┃ +CPS ┃ positive area %", result.output), result.output
    assert re.search(rf"│ ihc\.svs .*│ 1-49% +│ +{re.escape(cps_text(cps))} │", result.output), result.output
    assert re.search(r"│ he\.svs .*│ 1-49% +│ +│", result.output), result.output
    h_and_e_only = runner.invoke(
        app, ["run", str(he), "--out", str(tmp_path / "o2"), "--device", "cpu", "--no-progress"]
    )
    assert "CPS" not in h_and_e_only.output
