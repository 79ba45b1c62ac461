"""The benchmark harness: interleaved rounds, FLOP counting and tile counting (not the timings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import Benchmark, Case, run_cases


class _Recorder(Benchmark):
    repeats = 2

    def __init__(self, interleave: bool):
        self.interleave = interleave
        self.calls: list[str] = []

    def cases(self) -> list[Case]:
        def run(name: str):
            return lambda: self.calls.append(name) or 1.0

        return [Case("a", run("a"), baseline=True), Case("b", run("b"))]


def test_interleaved_cases_run_in_rounds_after_all_warmups():
    bench = _Recorder(interleave=True)
    results = run_cases(bench)
    assert bench.calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then one round per repeat
    assert [r.label for r in results] == ["a", "b"] and all(len(r.seconds) == 2 for r in results)


def test_cases_run_one_after_another_by_default():
    bench = _Recorder(interleave=False)
    run_cases(bench)
    assert bench.calls == ["a", "a", "a", "b", "b", "b"]


def test_conv_flops_count_every_multiply_add_of_a_known_network():
    from benchmarks.peers import conv_flops_per_tile

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16x16 out, 8 ch, 3*9 MACs each
        nn.Conv2d(8, 4, 1, stride=2),  # 8x8 out, 4 ch, 8 MACs each
        nn.ConvTranspose2d(4, 2, 2, stride=2),  # 8x8 in, every input px to 2 ch x 4 px, 4 MACs each
    )
    expected = 2 * (16 * 16 * 8 * 3 * 9 + 8 * 8 * 4 * 8 + 8 * 8 * 4 * 2 * 4)
    assert conv_flops_per_tile(net, 16) == expected


def test_tile_counter_counts_batch_elements_per_network_call():
    from benchmarks.peers import TileCounter

    a, b = nn.Identity(), nn.Identity()
    counter = TileCounter([a, b, a])  # a network listed twice is hooked once
    a(torch.zeros(3, 1))
    b(torch.zeros(2, 1))
    a(torch.zeros(1, 1))
    assert counter.take() == 6
    assert counter.take() == 0


def test_the_review_phantoms_draw_their_tps_shift_and_weak_fraction_from_the_seed():
    from benchmarks.review_phantoms import SHIFT_RANGE, TPS_RANGE, WEAK_RANGE, draw

    assert draw(1600) == (2.83, 1.0, 0.11) == draw(1600)  # the README's validation set starts so
    draws = [draw(seed) for seed in range(1600, 1660)]
    assert all(TPS_RANGE[0] <= t <= TPS_RANGE[1] and 0 <= s <= 1 and 0 <= w <= 0.4 for t, s, w in draws)
    assert SHIFT_RANGE == (0.0, 1.0) and WEAK_RANGE == (0.0, 0.4)
    assert sum(t < 1 for t, _, _ in draws) >= 5  # log-uniform: low TPS, near the 1 % cut-off, is well represented


def test_nuclei_arch_speed_rows_put_each_model_against_the_baseline_of_the_same_rounds():
    import pytest

    from benchmarks.nuclei_arch import speed_rows

    rows = speed_rows({"shipped": [2.0, 2.4, 2.2], "w16": [1.0, 0.8, 1.2]}, tissue_mpx=4.0, baseline="shipped")
    assert [(r.name, r.best_s, r.median_s) for r in rows] == [("shipped", 2.0, 2.2), ("w16", 0.8, 1.0)]
    assert [r.ms_per_tissue_mpx for r in rows] == [500.0, 200.0]
    assert [r.x_baseline for r in rows] == [1.0, 2.5]
    with pytest.raises(ValueError, match="baseline 'w32' is not among"):
        speed_rows({"w16": [1.0]}, tissue_mpx=4.0, baseline="w32")
    with pytest.raises(ValueError, match="tissue_mpx must be > 0"):
        speed_rows({"w16": [1.0]}, tissue_mpx=0.0, baseline="w16")


def test_every_benchmark_module_imports():
    """A benchmark is run by hand, not by the tests: an import of a name the product no longer has (as
    nuclei_inference's of a removed private helper) would otherwise go unnoticed until someone runs it."""
    import importlib
    import pkgutil

    import benchmarks

    optional = {"nnunetv2", "monai", "openvino", "onnxruntime", "onnx", "nvidia", "pynvml"}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        try:
            importlib.import_module(f"benchmarks.{info.name}")
        except ModuleNotFoundError as err:  # a benchmark-only dependency (benchmarks/README.md)
            assert (err.name or "").split(".")[0] in optional, f"benchmarks.{info.name}: {err}"


def test_the_phase_timers_wrap_functions_the_product_has():
    """run_profile, runtimes and int8 time phases by replacing functions by name (benchmarks.time_calls); each must
    still exist under that name."""
    import re
    from pathlib import Path

    import bridge.run
    import inference.analysis.nuclei as nuclei
    import inference.analysis.segment as segment
    import inference.pipeline as pipeline
    from inference.models.ensemble import Ensemble

    owners = {
        "pipeline": pipeline,
        "segment": segment,
        "nuclei": nuclei,
        "nuclei_module": nuclei,
        "Ensemble": Ensemble,
        "bridge.run": bridge.run,
    }
    wrapped = []
    for name, least in (("run_profile", 10), ("runtimes", 2), ("int8", 2)):  # int8 times its phases by runtimes
        source = (Path(__file__).parents[1] / "benchmarks" / f"{name}.py").read_text()
        found = re.findall(r'time_calls\(([\w.]+), "(\w+)"', source)
        assert len(found) >= least, name
        wrapped += found
    missing = [f"{owner}.{name}" for owner, name in wrapped if not hasattr(owners[owner], name)]
    assert not missing, missing


@pytest.mark.parametrize("levels", ["rendered", "averaged"])
def test_stain_structure_renders_the_thumbnails_the_written_review_phantoms_give(tmp_path, levels):
    """benchmarks.stain_structure renders review phantoms' 8 µm/px thumbnails without writing slides: the same
    pixels as the slides benchmarks.review_phantoms writes (or pdl1 phantom --reduced-levels averaged), read as
    detect_slide_stain reads them."""
    import numpy as np

    from benchmarks.review_phantoms import draw
    from benchmarks.stain_structure import rendered_thumbnails
    from inference.phantom.ihc import IhcSpec
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.slides.slide import open_slide

    seed = 3005
    tps, shift, weak = draw(seed)
    spec = PhantomSpec(1024, 1024, seed=seed, tps_percent=tps, shift=shift, weak_fraction=weak, reduced_levels=levels)
    write_phantom(tmp_path / f"c{seed}.svs", spec)
    write_ihc_phantom(tmp_path / f"ihc_{seed}.svs", spec, IhcSpec(immune_positive_fraction=0.3))
    for name, truth, thumb, drawn_shift, _tps in rendered_thumbnails([seed], size_px=1024, reduced_levels=levels):
        with open_slide(tmp_path / f"{name}.svs") as slide:
            written = slide.thumbnail(mpp=8.0)
        assert truth == ("H&E" if name.startswith("c") else "H-DAB") and drawn_shift == shift
        np.testing.assert_array_equal(thumb, written)


def test_the_real_tile_bootstrap_pairs_squares_and_counts_each_detector_alone():
    import numpy as np

    from benchmarks.real_tile_labels import block_counts, paired_block_bootstrap

    truth = np.array([[10.0, 10.0], [60.0, 10.0], [10.0, 60.0], [60.0, 60.0]])
    box = (0, 0, 100, 100)
    exact = block_counts(truth, truth, box=box, block_px=50, radius_px=3)
    assert exact.tolist() == [[1, 0, 0]] * 4  # one nucleus found in each of the four squares
    shifted = block_counts(truth + 20, truth, box=box, block_px=50, radius_px=3)
    assert shifted.sum(0).tolist() == [0, 4, 4]  # 20 px off: every detection false, every nucleus missed
    d, lo, hi, share = paired_block_bootstrap(exact, exact, n_boot=200)
    assert (d, lo, hi, share) == (0.0, 0.0, 0.0, 0.0)  # the same detector never leads itself
    d, lo, hi, share = paired_block_bootstrap(exact, shifted, n_boot=200)
    assert d == 1.0 and lo == hi == 1.0 and share == 1.0


def test_int8_calibration_is_held_apart_and_ratios_are_against_the_baseline():
    """benchmarks.int8 calibrates on phantoms none of its held-out slides share a seed with, and its speed table's
    ratio is the baseline's median over the case's."""
    from benchmarks.int8 import CALIBRATION, E2E_SLIDE, HELD_OUT, speed_table

    calibration = {seed for _, seed, _, _ in CALIBRATION}
    assert calibration.isdisjoint(seed for _, seed, _, _ in (*HELD_OUT, E2E_SLIDE))
    base, fast = "torch bf16 autocast", "openvino int8 performance"
    seconds = {f"{base}|member 0": [0.02, 0.03, 0.04], f"{base}|ensemble": [0.1, 0.2, 0.3]}
    seconds |= {f"{fast}|member 0": [0.01, 0.01, 0.01], f"{fast}|ensemble": [0.05, 0.05, 0.5]}
    text = speed_table(
        {"torch_threads": 2, "rounds": 3, "kinds": {"seg": {"batch": 4, "tile_px": 256, "seconds": seconds}}}
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows[fast].endswith("| 4.00 |") and rows[base].endswith("| 1.00 |")
    assert "30.0 (20.0-40.0)" in rows[base]


def test_int8_speed_input_is_what_the_sliding_windows_feed_and_e2e_reports_the_load():
    """benchmarks.int8's speed stage times the members on the tensor segment_slide hands them (Ensemble.normalize's
    channels-last strides, on which eager PyTorch runs twice as fast as on a contiguous NCHW copy), and its e2e
    table carries the load each case met."""
    import torch

    from benchmarks.int8 import e2e_table, load, pipeline_input

    ens = load("seg")
    normalised = ens.normalize(torch.zeros(2, 256, 256, 3, dtype=torch.uint8))
    x = pipeline_input(normalised.numpy())
    assert tuple(x.shape) == (2, 3, 256, 256)
    assert x.stride() == normalised.stride() and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()

    def run(s: float, load: float) -> dict:
        keys = ("analysis_s", "segmentation_s", "seg_forward_s", "nuclei_s", "nuclei_forward_s")
        return {**dict.fromkeys(keys, s), "tps": 30.0, "nuclei": 10, "load1_before": load}

    text = e2e_table(
        {
            "rounds": 2,
            "cases": {
                "torch bf16 autocast": {"runs": [run(6.0, 0.9), run(8.0, 1.5)], "same_class": [1.0, 1.0]},
                "openvino bf16 (--runtime openvino)": {"runs": [run(5.0, 1.2), run(5.0, 1.1)], "same_class": [1, 1]},
            },
        }
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["torch bf16 autocast"].endswith("| 0.9-1.5 |")
    assert "| 1.40 |" in rows["openvino bf16 (--runtime openvino)"]  # 7.0 / 5.0


def test_int8_accuracy_control_validates_on_calibration_phantoms_it_does_not_calibrate_on():
    """benchmarks.int8's quantise-ac stage splits the calibration phantoms (none held out) into calibration and
    validation, and its metric weighs the low-positive tiles apart: three false positives on a tile with one
    positive pixel cost far more than they would pooled with a fully positive tile."""
    import numpy as np

    from benchmarks.int8 import AC_CALIBRATION, AC_VALIDATION, CALIBRATION, HELD_OUT, e2e_cases, positive_agreement

    calibrate, validate = ({seed for _, seed, _, _ in part} for part in (AC_CALIBRATION, AC_VALIDATION))
    assert calibrate.isdisjoint(validate) and calibrate | validate == {seed for _, seed, _, _ in CALIBRATION}
    assert validate and min(tps for *_, tps, _ in AC_VALIDATION) <= 20
    assert (calibrate | validate).isdisjoint(seed for _, seed, _, _ in HELD_OUT)
    ref = np.zeros((3, 4, 10), bool)
    ref[0], ref[1, 0, 0] = True, True
    assert positive_agreement(ref, ref) == (1.0, [1.0, 1.0, 1.0])
    worse = ref.copy()
    worse[1, 1, :3] = True
    metric, per_tile = positive_agreement(ref, worse)
    assert metric == 0.4 and per_tile == [1.0, 0.5, 1.0]  # pooled over all tiles: 82 / 85
    cases = e2e_cases(["performance", "ac-performance"], nuclei_preset="performance")
    assert cases["int8 ac-performance segmentation and nuclei"] == ("int8-ac-performance", "int8-performance")
    assert cases["torch bf16 autocast"] == ("torch", "torch")


def test_the_real_tile_pool_loads_every_seeds_members_as_one_ensemble(tmp_path):
    """benchmarks.real_tile_labels.pool_members: a model pooled with itself is the product's ensemble of twice its
    members, each as its folder had it; models of another setting are refused."""
    import json
    import shutil

    import numpy as np
    import pytest

    from benchmarks.real_tile_labels import pool_members
    from inference.models.ensemble import Ensemble, Precision, demo_model_dir

    demo = demo_model_dir("nuclei")
    pooled = Ensemble.load(pool_members([demo, demo], out=tmp_path / "pooled"), task="nuclei")
    single = Ensemble.load(demo, task="nuclei")
    n = len(single.members)
    assert [(m.file.split("/")[0], m.chain) for m in pooled.member_files] == [("chain_0", 0)] * n + [("chain_1", 1)] * n
    batch = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    precision = Precision(None)  # fp32
    once = single.member_logits(batch, precision=precision)
    assert torch.equal(pooled.member_logits(batch, precision=precision), torch.cat([once, once]))
    assert pooled.manifest.thresholds == single.manifest.thresholds

    other = tmp_path / "other"
    shutil.copytree(demo, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["extra"]["sigma_um"] = 9.0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="sigma_um differ"):
        pool_members([demo, other], out=tmp_path / "refused")


def test_the_colorectal_points_are_read_as_qupath_places_typed_and_kept_inside(tmp_path):
    """benchmarks.real_crc_points reads the dataset's MATLAB files: 1-based (column, row) marks become QuPath x, y
    of the pixel's centre, each typed by the type file's mark at the same place, a mark just past the border is
    moved onto it, and the training sets are the first images holding N points."""
    import numpy as np
    import scipy.io
    from PIL import Image

    from benchmarks.real_crc_points import UNTYPED, first_images, per_image_counts, read_dataset

    folder = tmp_path / "train" / "img7"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(folder / "img7.bmp")
    # (column, row), 1-based; the last 0.3 px below the image
    marks = np.array([[1.0, 1.0], [30.0, 20.0], [10.0, 40.8]])
    scipy.io.savemat(folder / "img7_detection.mat", {"detection": marks})
    scipy.io.savemat(folder / "img7_epithelial.mat", {"detection": marks[1:2]})
    (tmp_path / "test").mkdir()
    (image,) = read_dataset(tmp_path)
    assert (image.name, image.split, image.rgb.shape) == ("img7", "train", (40, 50, 3))
    assert image.xy[:2].tolist() == [[0.5, 0.5], [29.5, 19.5]]
    assert image.xy[2, 0] == 9.5 and 39.99 < image.xy[2, 1] < 40.0  # kept inside the 40 px tall image
    assert image.types == (UNTYPED, "epithelial", UNTYPED)

    sized = [replace_xy(image, n) for n in (3, 5, 4)]
    assert [len(im.xy) for im in first_images(sized, 7)] == [3, 5]
    assert len(first_images(sized, 8)) == 2 and len(first_images(sized, 9)) == 3 and len(first_images(sized, None)) == 3
    counts = per_image_counts([image.xy, image.xy + 20], [image.xy, image.xy], radius_px=2)
    assert counts.tolist() == [[3, 0, 0], [0, 3, 3]]


def replace_xy(image, n: int):
    import dataclasses

    import numpy as np

    return dataclasses.replace(image, xy=np.zeros((n, 2)), types=("untyped",) * n)


def test_a_stroma_setting_names_the_model_it_starts_from_and_earlier_cache_keys_stay(tmp_path):
    """benchmarks.real_tile_labels --init: each candidate is fine-tuned from the given model, named in its cache key,
    its models' folder name and its row; a setting without it keeps the key the earlier runs cached under."""
    from benchmarks.real_tile_labels import Setting, _config, _slug
    from inference.models.ensemble import demo_model_dir

    shipped = Setting(iterations=160, stain_jitter="strong", sigma_um=3.5, lr_max=1e-3)
    assert shipped.key() == {"iterations": 160, "stain_jitter": "strong", "sigma_um": 3.5, "lr_max": 1e-3}
    assert _slug(shipped) == "it160_strong_s3.5_lr0.001"
    assert _config(shipped, out=tmp_path, seed=0).init_model == str(demo_model_dir("nuclei"))
    init = str(tmp_path / "crc_nall_seed0")
    other = Setting(iterations=160, stain_jitter="strong", sigma_um=3.5, lr_max=1e-3, init=init)
    assert other.key() == {**shipped.key(), "init": init}
    assert _slug(other) == "it160_strong_s3.5_lr0.001_from-crc_nall_seed0"
    assert str(other).endswith(", from crc_nall_seed0")
    assert _config(other, out=tmp_path, seed=0).init_model == init


def test_a_benchmark_whose_setup_fails_leaves_no_temporary_folder(tmp_path, monkeypatch):
    # helper-130: `pdl1 bench peers --quick` without nnunetv2 left its 4.2 MB phantom in /tmp/pdl1-bench-*: the
    # setup wrote it, then stopped, and the teardown (after a whole setup only) never ran.
    import benchmarks

    made = tmp_path / "pdl1-bench-x"

    class HalfSetUp(benchmarks.Benchmark):
        def setup(self, *, quick: bool = False) -> None:
            self.tmp = made
            made.mkdir()
            (made / "bench.svs").write_bytes(b"slide")
            raise ModuleNotFoundError("nnunetv2")

    monkeypatch.setattr(benchmarks, "benchmark_class", lambda name: HalfSetUp)
    with pytest.raises(ModuleNotFoundError):
        benchmarks.run_benchmark("peers", quick=True)
    assert not made.exists()


def test_real_ihc_points_reads_a_deepliif_mask_and_scores_the_calls_over_matched_nuclei():
    """benchmarks.real_ihc_points: each red or blue nucleus of a mask is a point at its centroid (specks under 30 px
    left out), red positive; the calls are counted over the nuclei matched within 3 µm."""
    import numpy as np

    from benchmarks.real_ihc_points import Tile, mask_points, score_tile

    mask = np.zeros((64, 64, 3), np.uint8)
    mask[10:16, 10:16] = (255, 0, 0)  # 36 px, Ki67 positive
    mask[40:46, 20:26] = (0, 0, 255)  # 36 px, negative
    mask[50:52, 50:52] = (0, 0, 255)  # a 4 px speck
    mask[30:36, 30:36] = (0, 255, 0)  # an outline colour, no nucleus
    xy, positive = mask_points(mask)
    assert xy.tolist() == [[13.0, 13.0], [23.0, 43.0]] and positive.tolist() == [True, False]
    tile = Tile("t", "test", np.zeros((64, 64, 3), np.uint8), xy, positive)
    pred = np.array([[13.5, 13.0], [23.0, 44.0], [60.0, 60.0]])  # two within 3 µm (12 px at 0.25 µm/px), one not
    names = np.array(["Tumor: Positive", "Immune cells: PD-L1 positive", "Other"], dtype=object)
    s = score_tile(tile, pred, names)
    assert (s.detection.tp, s.detection.fp, s.detection.fn) == (2, 1, 0)
    assert s.truth_positive_called_positive == (1, 1) and s.truth_negative_called_negative == (0, 1)
    assert s.called_positive_share == (2, 2)  # "Other" is no tumour or immune cell


def test_real_ihc_points_takes_the_dab_out_and_measures_the_ring_as_the_pipeline_does():
    """benchmarks.real_ihc_points --diagnose: a brown ring around a nucleus reads as membrane DAB, and not once the
    DAB is taken out (the haematoxylin stays)."""
    import numpy as np

    from benchmarks.real_ihc_points import MPP, Tile, ring_dab_od, without_dab
    from inference.analysis.ihc import dab_density

    yy, xx = np.mgrid[0:64, 0:64]
    r_um = np.hypot(xx + 0.5 - 32, yy + 0.5 - 32) * MPP
    od = np.zeros((64, 64, 3))
    od += (r_um < 3.0)[..., None] * 0.6 * np.array([0.65, 0.70, 0.29])  # a haematoxylin nucleus
    od += ((r_um > 4.0) & (r_um < 5.0))[..., None] * 0.8 * np.array([0.27, 0.57, 0.78])  # a DAB membrane
    rgb = np.clip(255 * 10.0 ** (-od) + 0.5, 0, 255).astype(np.uint8)
    tile = Tile("t", "train", rgb, np.array([[32.0, 32.0]]), np.array([True]))
    assert ring_dab_od(tile)[0] > 0.3
    cleaned = without_dab(rgb)
    assert ring_dab_od(Tile("t", "train", cleaned, tile.xy, tile.positive))[0] < 0.02
    assert dab_density(cleaned).max() < 0.05
    assert cleaned[32, 32].astype(int).sum() < 0.8 * 3 * 255  # the nucleus is still there


def test_membrane_gate_turns_positive_calls_under_the_limit_into_their_negative_class():
    """benchmarks.membrane_gate: a positive call (tumour or immune) whose ring DAB lies under the limit becomes the
    matching negative class; calls at or above it, negative calls and other classes stay."""
    import numpy as np

    from benchmarks.membrane_gate import gated
    from inference import IHC_NUCLEUS_CLASSES
    from inference.results import Nuclei

    names = tuple(IHC_NUCLEUS_CLASSES)
    calls = ("Tumor: Positive", "Tumor: Positive", "Immune cells: PD-L1 positive", "Tumor: Negative", "Other")
    order = [names.index(n) for n in calls]
    nuclei = Nuclei(
        xy=np.zeros((5, 2)),
        cls=np.array(order),
        score=np.ones(5),
        class_prob=np.ones(5),
        positive_prob=np.ones(5),
        entropy=None,
        class_names=names,
        membrane_dab_od=np.array([0.05, 0.10, 0.09, 0.01, 0.0]),
    )
    out = [names[c] for c in gated(nuclei, 0.10).cls]
    assert out == ["Tumor: Negative", "Tumor: Positive", "Immune cells: PD-L1 negative", "Tumor: Negative", "Other"]
    assert [names[c] for c in gated(nuclei, 0.0).cls] == [names[c] for c in order]  # no limit: the calls as they were
    assert nuclei.cls.tolist() == order  # the input is left as it was


def test_the_export_benchmark_writes_the_scripts_layout_whose_targets_the_reader_finds(tmp_path):
    from benchmarks.export_targets import write_export
    from bridge.exported_targets import read_exported_entry

    path = tmp_path / "pdl1" / "labels" / "1.geojson"
    path.parent.mkdir(parents=True)
    write_export(path, 25)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 2 + 6 + 25  # one object a line, as the script
    entry = read_exported_entry(tmp_path, "1", "bench.svs")
    assert (len(entry.annotations), len(entry.cores)) == (2, 4)


def test_the_train_regions_benchmark_labels_with_its_training_region_and_none_of_its_cells(tmp_path):
    from benchmarks.export_targets import write_export
    from benchmarks.train_labels import POSITIVE_CELL_DETECTION
    from bridge.labels import LabelRules, labels_from_objects, read_geojson_labels
    from bridge.qupath_geojson import read_features

    path = tmp_path / "export.geojson"
    write_export(path, 30, cell_classes=POSITIVE_CELL_DETECTION, one_line=True, first_class="Training region")
    given = dict(slide="bench.svs", image_size_px=(20_000, 20_000), rules=LabelRules((), points=False))
    held = labels_from_objects(list(read_features(path)), **given)
    passed = read_geojson_labels(path, **given)
    assert passed.counts == held.counts
    assert passed.counts["training regions"] == 1
    assert passed.counts["skipped: cell Polygon (Positive)"] == passed.counts["skipped: cell Polygon (Negative)"] == 15


def test_the_train_labels_benchmark_writes_both_layouts_whose_cells_are_each_a_nucleus_label(tmp_path):
    from benchmarks.export_targets import write_export
    from benchmarks.train_labels import CLASSES
    from bridge.labels import LabelRules, read_geojson_labels
    from inference.phantom.truth import NUCLEUS_CLASSES

    read = {}
    for layout, one_line in (("script", False), ("export objects", True)):
        path = tmp_path / f"{layout}.geojson"
        write_export(path, 25, cell_classes=CLASSES, offset_px=10.0, one_line=one_line)
        assert len(path.read_text(encoding="utf-8").splitlines()) == (1 if one_line else 2 + 6 + 25)
        labels = read_geojson_labels(
            path, slide="bench.svs", image_size_px=(20_000, 20_000), rules=LabelRules(class_names=NUCLEUS_CLASSES)
        )
        read[layout] = labels
        assert len(labels.points_xy) == 25
        assert [NUCLEUS_CLASSES[c] for c in labels.points_class[:2]] == list(CLASSES)
    assert (read["script"].points_xy == read["export objects"].points_xy).all()
