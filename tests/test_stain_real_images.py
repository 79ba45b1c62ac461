"""benchmarks.stain_real_images: its table and summary counts, on hand-set calls and on a generated folder."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from PIL import Image

from benchmarks import stain_real_images as bench
from inference.slides.stain_detect import EOSIN_OD, HAEMATOXYLIN_OD, detect_stain
from tests import stain_images as si


def _judged(stated: str, call: str, margin: float, *, resolution: str = "native", held_out: bool = True):
    estimate = dataclasses.replace(detect_stain(si.blank()), stain=call, margin_deg=margin)
    return bench.Judged(f"{stated}-{call}-{margin}", resolution, stated, held_out, (8, 8), estimate)


def test_summary_counts_wrong_unflagged_and_weak_calls():
    judged = [
        _judged("H&E", "H&E", 30.0),  # right
        _judged("H&E", "H&E", 4.9),  # right but weak
        _judged("H&E", "H-DAB", 5.0),  # wrong, unflagged: the weak margin is under 5
        _judged("H-DAB", "H&E", 1.0),  # wrong, flagged
        _judged("H-DAB", "other", 0.0),  # wrong (neither stain), flagged
        _judged("H-DAB", "H-DAB", 12.0),
        bench.Judged("small.png", "8 µm/px", "H&E", True, None, None),  # not judged: counts nowhere
    ]
    assert bench.summarise(judged) == bench.Summary(judged=6, wrong=3, wrong_unflagged=1, right_weak=1)
    assert bench.summarise([j for j in judged if j.stated == "H-DAB"]) == bench.Summary(3, 2, 0, 0)


def test_summary_lines_keep_held_out_apart_from_seen_images():
    judged = [_judged("H&E", "H-DAB", 40.0, held_out=False), _judged("H&E", "H&E", 40.0)]
    lines = bench.format_summary(judged)
    assert "native     held out H&E  :   1 judged,  0 wrong (0 unflagged, margin >= 5°),  0 right but weak" in lines
    assert "native     all      H&E  :   2 judged,  1 wrong (1 unflagged, margin >= 5°),  0 right but weak" in lines


def test_stated_stains_are_read_in_any_spelling():
    assert [bench.stated_stain(s) for s in ("H&E", "he", " IHC", "h-dab")] == ["H&E", "H&E", "H-DAB", "H-DAB"]
    with pytest.raises(ValueError, match="neither"):
        bench.stated_stain("PAS")


def test_downsampling_is_skipped_where_it_would_enlarge_or_leave_too_few_pixels():
    rgb = np.full((256, 128, 3), 200, np.uint8)
    assert bench.downsampled(rgb, 2.0, 8.0, min_side=24).shape == (64, 32, 3)
    assert bench.downsampled(rgb, 2.0, 8.0, min_side=40) is None  # 32 px on the short side
    assert bench.downsampled(rgb, 8.0, 8.0, min_side=1) is None  # already that coarse
    assert bench.downsampled(rgb, float("nan"), 8.0, min_side=1) is None  # pixel size unknown


def test_table_and_summary_of_a_generated_folder(tmp_path, capsys):
    he = si.drawn_two_stains(np.random.default_rng(1), HAEMATOXYLIN_OD, EOSIN_OD, eosin=True)
    ihc = si.drawn_ihc(np.random.default_rng(2))
    images = [  # file, pixels, stated, µm/px: a 256 px image at 2 µm/px is 64 px at 8 (judged), at 0.5 it is 16 (not)
        ("he.png", he, "he", "2.0"),
        ("ihc.png", ihc, "IHC", "0.5"),
        ("ihc_said_he.png", ihc, "H&E", "2.0"),  # mislabelled: called H-DAB by a wide margin, so wrong and unflagged
        ("grey_said_ihc.png", si.grey(np.random.default_rng(3)), "H-DAB", ""),  # "other" at margin 0: wrong, flagged
    ]
    with open(tmp_path / "images.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "stated_stain", "mpp", "held_out"])
        for name, rgb, stated, mpp in images:
            Image.fromarray(rgb).save(tmp_path / name)
            writer.writerow([name, stated, mpp, "yes"])

    bench.main([str(tmp_path)])
    out = capsys.readouterr().out
    table = {
        (line.split()[0], line.split()[1]): line
        for line in out.splitlines()
        if line.endswith(".png") or ".png " in line
    }
    assert " ok " in table["he.png", "native"] and " ok " in table["he.png", "8"]
    assert "not judged" in table["ihc.png", "8"]
    assert "WRONG" in table["ihc_said_he.png", "native"] and "WRONG" in table["grey_said_ihc.png", "native"]
    assert "native     held out both :   4 judged,  2 wrong (1 unflagged, margin >= 5°),  0 right but weak" in out
    assert "8 µm/px    held out both :   2 judged,  1 wrong (1 unflagged, margin >= 5°),  0 right but weak" in out
    assert "8 µm/px    held out H-DAB:   0 judged,  0 wrong (0 unflagged, margin >= 5°),  0 right but weak" in out


def test_pipeline_option_runs_each_image_as_pdl1_run_does_and_reports_refusals(tmp_path, capsys):
    """``--pipeline``: an immunostain at 1 µm/px is told from its colour and analysed on the IHC path; the same
    pixels said to be 20 µm/px are refused (too coarse for the IHC model), with the colour's call beside."""
    ihc = np.tile(si.drawn_ihc(np.random.default_rng(2)), (2, 2, 1))  # 512 px: 64 px at 8 µm/px
    Image.fromarray(ihc).save(tmp_path / "ihc.png")
    Image.fromarray(si.blank(size_px=512)).save(tmp_path / "glass.png")
    with open(tmp_path / "images.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "stated_stain", "mpp", "held_out"])
        writer.writerow(["ihc.png", "ihc", "1.0", "yes"])
        writer.writerow(["glass.png", "ihc", "1.0", "yes"])  # no tissue: H&E by default, not by its colour
    with open(tmp_path / "coarse.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "stated_stain", "mpp"])
        writer.writerow(["ihc.png", "H&E", "20"])  # mislabelled and too coarse
    runs = bench.run_pipeline(tmp_path, bench.read_rows(tmp_path / "images.csv"), tmp_path)
    run, glass = runs
    assert run.stain == "H-DAB" and run.right and run.error == "" and run.margin_deg >= 5 and run.told_by == "colour"
    assert glass.stain == "H&E" and glass.told_by == "default" and not glass.right and glass.flagged
    assert (tmp_path / "ihc.tif").is_file()
    (refused,) = bench.run_pipeline(tmp_path, bench.read_rows(tmp_path / "coarse.csv"), tmp_path)
    assert refused.stain is None and "ResolutionError" in refused.error and "colour: H-DAB" in refused.error
    assert any("[no tissue to tell a stain by" in line for line in bench.format_pipeline([glass]))
    lines = bench.format_pipeline([run, refused])
    assert any(line.startswith("ihc.png") and " H-DAB " in line for line in lines)
    assert any("refused: (colour: H-DAB) ResolutionError" in line for line in lines)
    assert any(line.startswith("2 images, 1 refused, 1 analysed (0 as H&E by default") for line in lines)
    assert any(line.startswith("wrong stain: 0; flagged 0") for line in lines)


def test_pipeline_reasons_are_shortened_by_kind():
    short = bench._short_reason
    weak = {"reason": "stain told from the colour (H&E) by a weak margin: state it", "value": 2.0, "limit": 5.0}
    assert short(weak) == "weak stain margin 2/5"
    reason = {"reason": "out of the training domain of pdl1-nuclei-ihc: network features", "value": 6.3, "limit": 2.32}
    assert short(reason) == "domain pdl1-nuclei-ihc features 6.3/2.32"
    reason = {"reason": "out of the training domain of seg: stain vectors (degrees)", "value": 30, "limit": 22.4}
    assert short(reason) == "domain seg stain vectors 30/22.4"
    assert short({"reason": "nuclei uncertainty", "value": 0.5, "limit": 0.35}) == "nuclei uncertainty 0.5/0.35"
    assert bench._reason_kind("domain pdl1-seg features 2.9/2.63") == "domain pdl1-seg features"
