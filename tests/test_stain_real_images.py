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
