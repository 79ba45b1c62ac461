"""The domain guard: training-domain statistics, the out-of-domain score, its limit and reasons."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil

import numpy as np
import pytest
import torch

from bridge.objects import OUT_OF_DOMAIN_SCORE, STAIN_DISTANCE, parent_measurements
from bridge.report import _domain_text
from inference.analysis.domain import (
    DomainStats,
    FeatureModel,
    SlideStain,
    assess_domain,
    calibrate_limits,
    feature_distance,
    feature_score,
    fit_domain_stats,
    fit_feature_model,
    stain_distance_deg,
    stats_of_manifest,
    tissue_od_median,
)
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.models.features import capture_tile_features, feature_layers
from inference.models.manifest import read_manifest, write_manifest
from inference.models.nuclei_model import DilatedResFCN
from inference.models.unet import PlainConvUNet
from inference.pipeline import Models, PipelineConfig, analyse_slide
from inference.results import SlideResult

H = (0.65, 0.70, 0.29)
E = (0.07, 0.99, 0.11)


def _stats(*, limit: float | None = 2.0, stain_limit: float | None = 10.0) -> DomainStats:
    """Training tiles: 2-d features N(0, 1) in the first direction only; stains H and E."""
    model = FeatureModel(np.zeros(2), np.ones(2), np.array([[1.0, 0.0]]), np.array([1.0]), 0.01)
    return DomainStats(model, 1.0, 100, H, E, (1.5, 2.5), feature_limit=limit, stain_limit_deg=stain_limit)


def test_a_direction_the_training_tiles_never_varied_in_lies_far_away():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(0, 1, 500), rng.normal(0, 1, 500), np.full(500, 3.0)])
    model = fit_feature_model(train, n_components=2)
    d = feature_distance(np.array([[1.0, 0.0, 3.0], [0.0, 0.0, 3.1]]), model)
    # One sd along a trained direction is about 1; a tenth off in the constant channel is hundreds.
    assert d[0] == pytest.approx(1.0, abs=0.1)
    assert d[1] > 50


def test_the_score_is_about_one_in_the_training_domain_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    cov = np.diag(np.linspace(0.2, 3.0, 12))
    slides = [rng.multivariate_normal(np.zeros(12), cov, 40) for _ in range(5)]
    stains = [SlideStain(H, E, 2.0)] * 5
    stats = fit_domain_stats(slides, stains, n_components=6)
    assert stats.train_tiles == 200 and len(stats.features.components) == 6
    same = feature_score(rng.multivariate_normal(np.zeros(12), cov, 40), stats)
    shifted = feature_score(rng.multivariate_normal(np.full(12, 2.0), cov, 40), stats)
    assert 0.8 < same < 1.3 < 2 < shifted
    assert feature_score(np.zeros((0, 12)), stats) is None


def test_stain_distance_is_the_larger_angle_and_unmeasured_without_tissue():
    stats = _stats()
    assert stain_distance_deg(SlideStain(H, E, 2.0), stats) == pytest.approx(0.0, abs=1e-6)
    dab = (0.27, 0.57, 0.78)
    # cos = (0.0189 + 0.5643 + 0.0858) / (0.9986 * 1.0030) = 0.668: 48.1°
    assert stain_distance_deg(SlideStain(H, dab, 2.0), stats) == pytest.approx(48.1, abs=0.05)
    assert stain_distance_deg(SlideStain((math.nan,) * 3, (math.nan,) * 3, math.nan), stats) is None


def test_the_limits_are_the_margin_over_the_highest_held_out_slide():
    stats = calibrate_limits(
        _stats(limit=None, stain_limit=None), [1.1, None, 1.6], [4.0, 3.0, None], slide_names=["a", "b", "c"], how="x"
    )
    assert stats.feature_limit == pytest.approx(1.25 * 1.6) and stats.stain_limit_deg == pytest.approx(1.25 * 4.0)
    assert stats.calibration["slides"][1] == {"slide": "b", "score": None, "stain_distance_deg": 3.0}
    with pytest.raises(ValueError, match="at least one in-domain slide"):
        calibrate_limits(_stats(), [None], [None], slide_names=["a"], how="x")
    with pytest.raises(ValueError, match="margin must be >= 1"):
        calibrate_limits(_stats(), [1.0], [1.0], slide_names=["a"], how="x", margin=0.5)


@pytest.mark.parametrize(
    ("features", "stain", "reasons"),
    [
        (np.array([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0]]), SlideStain(H, E, 2.0), []),
        (np.array([[0.5, 0.1], [1.0, 0.3], [1.5, 0.5]]), SlideStain(H, E, 2.0), ["network features"]),
        (np.array([[1.0, 0.0]]), SlideStain(H, (0.27, 0.57, 0.78), 2.0), ["stain vectors (degrees)"]),
    ],
)
def test_a_review_reason_with_value_and_limit_appears_only_over_a_limit(features, stain, reasons):
    a = assess_domain(features, stain, _stats(), model="m")
    assert [r["reason"].split(": ")[-1] for r in a.reasons] == reasons
    for r in a.reasons:
        assert r["value"] >= r["limit"] and r["reason"].startswith("out of the training domain of m")
    assert a.summary()["measured"] and a.tiles == len(features)


def test_without_statistics_or_with_another_models_nothing_is_measured():
    a = assess_domain(np.ones((3, 2)), SlideStain(H, E, 2.0), None, model="m")
    assert a.score is None and a.reasons == () and "no domain statistics" in a.why_not
    b = assess_domain(np.ones((3, 5)), SlideStain(H, E, 2.0), _stats(), model="m")
    assert b.score is None and "the statistics hold 2" in b.why_not


def test_statistics_survive_the_manifest_and_an_old_version_is_not_used():
    stats = calibrate_limits(_stats(), [1.0], [2.0], slide_names=["a"], how="x")
    raw = json.loads(json.dumps(stats.to_dict()))
    back, why = stats_of_manifest({"domain": raw})
    assert why == "" and back.feature_limit == stats.feature_limit and back.haematoxylin_od == H
    np.testing.assert_allclose(back.features.components, stats.features.components)
    assert stats_of_manifest({})[0] is None and "pdl1 domain-stats" in stats_of_manifest({})[1]
    none, why = stats_of_manifest({"domain": {**raw, "version": 99}})
    assert none is None and "version 99" in why


def test_tissue_od_is_measured_on_tissue_only():
    rgb = np.full((20, 20, 3), 240, np.uint8)
    assert math.isnan(tissue_od_median(rgb))
    rgb[:10] = (120, 60, 150)
    assert tissue_od_median(rgb) == pytest.approx(-sum(math.log((c + 1) / 241) for c in (120, 60, 150)))


@pytest.mark.parametrize(
    ("model", "dim"),
    [
        (PlainConvUNet(features=(4, 8, 16)), 2 * (4 + 8 + 16)),
        (DilatedResFCN(width=8, dilations=(1, 2)), 2 * (4 + 8 + 8)),
    ],
)
def test_features_are_captured_per_tile_from_member_zero_and_the_hooks_go_away(model, dim):
    from inference.models.manifest import Manifest

    manifest = Manifest("t", "0", "segmentation", "x", {}, 1.0, 32, {"mean": [0.5] * 3, "std": [0.2] * 3}, [], [])
    ens = Ensemble.from_members(manifest, [model, PlainConvUNet(features=(2, 4))], device="cpu")
    batch = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    with capture_tile_features(ens) as captured, torch.inference_mode():
        ens.members[0](ens.normalize(batch))
        ens.members[0](ens.normalize(batch[:2]))
    assert captured.array().shape == (5, dim)
    assert all(not m._forward_hooks for _, m in feature_layers(model))
    with pytest.raises(ValueError, match="no known feature layers"):
        feature_layers(torch.nn.Conv2d(3, 3, 1))


def _result(domain: dict | None) -> SlideResult:
    summary = {} if domain is None else {"domain": domain}
    return SlideResult("x", 10, 10, 1.0, "r", "c", None, None, (), (), 0.0, 100.0, summary=summary)


def test_the_parent_gets_the_score_only_when_measured():
    measured = {"out_of_domain_score": 3.5, "limit": 2.6, "stain_distance_deg": 12.0, "stain_limit_deg": 24.0}
    out = parent_measurements(_result({**measured, "model": "seg"}))
    assert out[OUT_OF_DOMAIN_SCORE] == 3.5 and out[STAIN_DISTANCE] == 12.0
    unmeasured = {"out_of_domain_score": None, "stain_distance_deg": None, "why_not": "no statistics"}
    assert OUT_OF_DOMAIN_SCORE not in parent_measurements(_result(unmeasured))
    assert OUT_OF_DOMAIN_SCORE not in parent_measurements(_result(None))
    assert _domain_text({**measured, "model": "seg"}).startswith("OUT of the training domain of seg")
    assert _domain_text(unmeasured) == "not measured: no statistics"
    # The stain measured alone (the network's features not captured) is a reading the guard flags by: the report
    # said "not measured" beside that flag.
    stain_only = {**unmeasured, "stain_distance_deg": 30.0, "stain_limit_deg": 24.0, "model": "seg"}
    stain_only["why_not"] = "the network's features were not captured"
    assert _domain_text(stain_only) == (
        "OUT of the training domain of seg: out-of-domain score not measured (the network's features were not "
        "captured) (limit n/a; 1 = like the training tiles), stain distance 30.00° (limit 24.00°)"
    )


@pytest.fixture(scope="module")
def seg_without_stats(tmp_path_factory):
    """A copy of the demo segmentation model whose manifest predates the guard (no domain statistics)."""
    folder = tmp_path_factory.mktemp("seg-old") / "seg"
    shutil.copytree(demo_model_dir("seg"), folder)
    manifest = read_manifest(folder)
    extra = {k: v for k, v in manifest.extra.items() if k != "domain"}
    write_manifest(folder, dataclasses.replace(manifest, extra=extra))
    return folder


def test_the_shipped_models_carry_calibrated_statistics():
    for kind in ("seg", "nuclei-ihc"):
        stats, why = stats_of_manifest(read_manifest(demo_model_dir(kind)).extra)
        assert why == "" and stats.feature_limit > 1 and stats.stain_limit_deg > 0
        assert stats.calibration["how"] == "held-out in-domain slides"


def test_an_analysis_scores_the_image_and_an_old_manifest_gives_not_measured(phantom_svs, seg_without_stats):
    config = PipelineConfig(device="cpu", run_nuclei=False, run_sua=False)
    result = analyse_slide(phantom_svs, models=Models(config), config=config)
    domain = result.summary["domain"]
    assert domain["measured"] and domain["tiles"] > 0 and math.isfinite(domain["out_of_domain_score"])
    assert parent_measurements(result)[OUT_OF_DOMAIN_SCORE] == domain["out_of_domain_score"]

    old = dataclasses.replace(config, seg_model_dir=str(seg_without_stats))
    result = analyse_slide(phantom_svs, models=Models(old), config=old)
    assert result.summary["domain"]["measured"] is False
    assert "no domain statistics" in result.summary["domain"]["why_not"]
    assert OUT_OF_DOMAIN_SCORE not in parent_measurements(result)

    off = dataclasses.replace(config, domain_guard=False)
    assert "domain" not in analyse_slide(phantom_svs, models=Models(off), config=off).summary


def test_an_image_over_the_limit_is_flagged_with_the_reason(phantom_svs, seg_without_stats, tmp_path):
    # The demo's statistics with limits below anything: this phantom is "out of the domain" on both.
    folder = tmp_path / "seg"
    shutil.copytree(seg_without_stats, folder)
    shipped = read_manifest(demo_model_dir("seg")).extra["domain"]
    manifest = read_manifest(folder)
    domain = {**shipped, "feature_limit": 0.01, "stain_limit_deg": 0.0}
    write_manifest(folder, dataclasses.replace(manifest, extra={**manifest.extra, "domain": domain}))
    config = PipelineConfig(device="cpu", run_nuclei=False, run_sua=False, seg_model_dir=str(folder))
    result = analyse_slide(phantom_svs, models=Models(config), config=config)
    reasons = [r for r in result.summary["review_reasons"] if r["reason"].startswith("out of the training domain")]
    assert [r["limit"] for r in reasons] == [0.01, 0.0]
    assert reasons[0]["value"] == result.summary["domain"]["out_of_domain_score"]
    assert result.uncertainty_flag and parent_measurements(result)["PD-L1: Uncertainty flag"] == 1.0


def test_pdl1_domain_stats_writes_calibrated_statistics_and_leaves_the_weights(phantom_svs, tmp_path):
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    held = tmp_path / "held" / "h2.svs"
    held.parent.mkdir()
    write_phantom(held, PhantomSpec(1024, 1024, seed=2, tps_percent=40))
    before = read_manifest(demo_model_dir("seg"))
    runner = CliRunner()
    out = tmp_path / "seg"
    args = ["domain-stats", str(demo_model_dir("seg")), str(phantom_svs), "--out", str(out), "--no-progress"]
    result = runner.invoke(app, [*args, "--held-out", str(tmp_path / "held" / "*.svs")])
    assert result.exit_code == 0, result.output
    assert "h2.svs: out-of-domain score" in result.output
    # A few tiles of one small slide: written, but said to rest on too little (helper-129: 3 tiles, 2 of 240
    # directions, a limit of 22410, without a word).
    flat = " ".join(result.output.split())
    assert "feature directions, fewer than the guard keeps, so its limits rest on too little" in flat, flat
    manifest = read_manifest(out)  # verifies every member's sha256
    assert manifest.checksum == before.checksum
    stats, why = stats_of_manifest(manifest.extra)
    assert why == "" and stats.slides[0]["slide"] == "p1.svs"
    assert stats.calibration["slides"][0]["slide"] == "h2.svs" and stats.feature_limit is not None
    # A model is never written over: the copy goes to a new folder, renamed into place whole.
    again = runner.invoke(app, [*args, "--held-out", str(held)])
    assert again.exit_code == 2 and "already holds a model" in re.sub(r"[│\s]+", " ", again.output)
    assert read_manifest(out).extra == manifest.extra and not list(tmp_path.glob(".seg.*.part"))
    args[4] = str(tmp_path / "seg2")
    same = runner.invoke(app, [*args, "--held-out", str(phantom_svs)])
    flat = " ".join(same.output.split())  # the console wraps long lines
    assert same.exit_code == 1 and "are both training and held-out slides" in flat
    assert not (tmp_path / "seg2").exists() and not list(tmp_path.glob(".seg2.*.part"))
    nothing = runner.invoke(app, [*args, "--held-out", str(tmp_path / "none*.svs")])
    assert nothing.exit_code == 2 and "matches no file" in " ".join(nothing.output.split())
    # The shipped demo is never rewritten in place (every later run called it the shipped demo, with these limits).
    shipped = runner.invoke(app, ["domain-stats", str(demo_model_dir("seg")), str(phantom_svs), "--no-progress"])
    flat = re.sub(r"[│\s]+", " ", shipped.output)
    assert shipped.exit_code == 2 and "is a shipped demo model, which is read-only: pass --out DIR" in flat, flat
    assert read_manifest(demo_model_dir("seg")).extra == before.extra


def test_domain_statistics_refuse_slides_of_another_stain_and_say_when_too_few_tiles(ihc_pair, tmp_path):
    from inference import StainError, compute_domain_stats
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    he, ihc = ihc_pair
    with pytest.raises(StainError, match=r"ihc_271.svs: its truth .* says H-DAB, but .* is a model of H&E slides"):
        compute_domain_stats(demo_model_dir("seg"), [he, ihc])
    tiny = tmp_path / "tiny.svs"
    write_phantom(tiny, PhantomSpec(1024, 1024, seed=5, tps_percent=40))
    with pytest.raises(ValueError, match=r"too few tiles for domain statistics \(tiny.svs: 1 .*give larger slides"):
        compute_domain_stats(demo_model_dir("seg"), [tiny])


def test_training_that_cannot_compute_domain_statistics_keeps_its_model_and_says_to_mend_the_cause(tmp_path, caplog):
    # Training never fails for its statistics; the warning's advice must not send the user to `pdl1 domain-stats`
    # on the same slides, which refuses them for the same reason.
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.training.domain_stats import write_training_domain_stats

    model = tmp_path / "seg"
    shutil.copytree(demo_model_dir("seg"), model)
    before = read_manifest(model).extra
    tiny = tmp_path / "tiny.svs"
    write_phantom(tiny, PhantomSpec(1024, 1024, seed=5, tps_percent=40))
    with caplog.at_level(logging.WARNING, logger="inference.training.domain_stats"):
        manifest = write_training_domain_stats(model, [tiny])
    assert manifest.extra == before == read_manifest(model).extra
    text = caplog.text
    assert "no domain statistics (too few tiles" in text and "mend that, then compute them with" in text, text
    assert "on the same slides it refuses them again" in text, text


def test_domain_statistics_are_refused_for_a_model_the_guard_never_reads(phantom_svs, tmp_path):
    # H&E images are judged against the segmentation ensemble's domain: statistics in the H&E nuclei model
    # would be written, and never read.
    nuclei = demo_model_dir("nuclei")
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference import compute_domain_stats

    with pytest.raises(ValueError, match=r"H&E nuclei model, and the domain guard judges H&E images against its "):
        compute_domain_stats(nuclei, [phantom_svs])
    out = tmp_path / "copy"
    args = ["domain-stats", str(nuclei), str(phantom_svs), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "compute them for the segmentation model" in " ".join(result.output.split())
    assert not out.exists()


def test_a_network_the_guard_cannot_read_runs_unmeasured(phantom_svs):
    # An ensemble without domain statistics whose network has no layers the guard knows (as an imported
    # nnU-Net's): the analysis runs, the domain is "not measured", no hooks are needed.
    from tests.helpers import pointwise_ensemble

    config = PipelineConfig(device="cpu", run_nuclei=False, run_sua=False)
    models = Models(config)
    models.seg = pointwise_ensemble(2, input_mpp=2.0)
    result = analyse_slide(phantom_svs, models=models, config=config)
    assert result.summary["domain"]["measured"] is False
    assert "no domain statistics" in result.summary["domain"]["why_not"]


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_statistics_equal_torch_s_on_either_memory_layout(channels_last):
    import torch

    from inference.models.features import channel_std_mean

    a = torch.randn(3, 16, 24, 20, generator=torch.Generator().manual_seed(0)) * 3 + 1
    if channels_last:
        a = a.to(memory_format=torch.channels_last)
    std, mean = channel_std_mean(a)
    ref_std, ref_mean = torch.std_mean(a.contiguous(), dim=(2, 3))
    assert std.shape == mean.shape == (3, 16)
    assert torch.allclose(std, ref_std, rtol=1e-5) and torch.allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)


def test_pdl1_domain_stats_says_what_was_kept_on_ctrl_c(phantom_svs, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    import inference
    from bridge.cli.app import app

    model = tmp_path / "seg"
    shutil.copytree(demo_model_dir("seg"), model)
    before = (model / "manifest.json").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "compute_domain_stats", interrupted)
    result = CliRunner().invoke(app, ["domain-stats", str(model), str(phantom_svs), "--no-progress"])
    assert result.exit_code == 130, result.output
    assert f"interrupted: nothing was written; {model} is as it was" in " ".join(result.output.split())
    assert (model / "manifest.json").read_bytes() == before


def _seg_copy_recording(tmp_path, slide_mpp: dict[str, float]):
    """A copy of the shipped segmentation ensemble whose manifest records ``slide_mpp`` as training does."""
    model = tmp_path / "seg"
    shutil.copytree(demo_model_dir("seg"), model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["training"]["config"]["slide_mpp"] = slide_mpp
    (model / "manifest.json").write_text(json.dumps(manifest))
    return model


def test_pdl1_domain_stats_reads_a_slide_at_the_pixel_size_its_training_recorded(phantom_svs, tmp_path, monkeypatch):
    """A model trained on a QuPath project's PNG (no pixel size in the file, 0.5 µm/px set in QuPath) records it
    in training.config.slide_mpp; `pdl1 domain-stats` read the file's own, so the statistics could not be redone.
    A slide given by another path to the recorded file counts; one not recorded is read at its file's own."""
    from PIL import Image
    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference import open_slide

    png = tmp_path / "camera" / "p1.png"
    png.parent.mkdir()
    with open_slide(phantom_svs) as slide:  # the phantom's pixels, at 0.5 µm/px
        Image.fromarray(slide.read_region((0, 0), 0, slide.dimensions)).save(png)
    model = _seg_copy_recording(tmp_path, {str(png): 0.5})
    monkeypatch.chdir(png.parent)
    out = tmp_path / "copy"
    args = ["domain-stats", str(model), "p1.png", str(phantom_svs), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "p1.png: read at 0.5 µm/px, as its training recorded (training.config.slide_mpp)" in result.output
    stats, why = stats_of_manifest(read_manifest(out).extra)
    assert why == ""
    png_row, svs_row = stats.slides
    # The same pixels at the same pixel size: as many tiles (at 1 µm/px a quarter as many).
    assert (png_row["slide"], svs_row["slide"]) == ("p1.png", "p1.svs") and png_row["tiles"] == svs_row["tiles"] > 1


def test_pdl1_domain_stats_says_how_a_slide_gets_a_pixel_size_without_naming_options_it_lacks(phantom_svs, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from bridge.cli.app import app

    png = tmp_path / "camera.png"
    Image.fromarray(np.full((1024, 1024, 3), 200, np.uint8)).save(png)
    model = _seg_copy_recording(tmp_path, {str(tmp_path / "other.png"): 0.5})
    before = (model / "manifest.json").read_bytes()
    result = CliRunner().invoke(app, ["domain-stats", str(model), str(phantom_svs), str(png), "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (
        "camera.png: a plain PNG file states no microns per pixel. `pdl1 domain-stats` reads a slide at the pixel "
        "size the model's training recorded for it (the manifest's training.config.slide_mpp, by slide file), else "
        "at its file's own" in text
    )
    assert "--mpp" not in text and "as mpp" not in text
    assert (model / "manifest.json").read_bytes() == before


def test_pdl1_domain_stats_names_every_slide_of_implausible_pixel_size_before_reading_any(tmp_path, monkeypatch):
    """A phantom (its stain from its truth, so not opened for its colour) whose file states an implausible pixel
    size was found when its turn came, after the slides before it were read; the next such slide on the run after."""
    from typer.testing import CliRunner

    import inference.training.domain_stats as domain_stats
    from bridge.cli.app import app
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.phantom.truth import truth_dir_for

    good = tmp_path / "good.svs"
    write_phantom(good, PhantomSpec(1024, 1024, seed=1, tps_percent=30))
    bad = []
    for name in ("bad1", "bad2"):
        bad.append(tmp_path / f"{name}.svs")
        bad[-1].write_bytes(good.read_bytes().replace(b"MPP = 0.5", b"MPP = 900"))  # same length: offsets stay
        shutil.copytree(truth_dir_for(good), truth_dir_for(bad[-1]))
    read = []
    real = domain_stats.domain_sample
    monkeypatch.setattr(domain_stats, "domain_sample", lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    out = tmp_path / "copy"
    args = ["domain-stats", str(demo_model_dir("seg")), str(good), str(bad[0]), "--held-out", str(bad[1])]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "2 of 3 slides have no usable pixel size, so none was read:" in text, text
    for path in bad:
        assert (
            f"{path}: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range (0.05, 50.0); "
            "`pdl1 domain-stats` reads a slide at the pixel size the model's training recorded for it"
        ) in text
    assert read == [] and not out.exists() and "as mpp" not in text


def test_pdl1_domain_stats_names_every_slide_too_coarse_for_the_model_before_reading_any(tmp_path, monkeypatch):
    """A slide whose pixels are coarser than the model reads by more than twice was read enlarged, into detail the
    model never saw (`pdl1 run` refuses it), after the slides before it; now named, with a slide of implausible
    pixel size, before any is read."""
    from typer.testing import CliRunner

    import inference.training.domain_stats as domain_stats
    from bridge.cli.app import app
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.phantom.truth import truth_dir_for

    model = tmp_path / "model"
    shutil.copytree(demo_model_dir("seg"), model)
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps(manifest | {"input_mpp": 0.25}))
    good, coarse, bad = tmp_path / "good.svs", tmp_path / "coarse.svs", tmp_path / "bad.svs"
    write_phantom(good, PhantomSpec(1024, 1024, seed=1, tps_percent=30))  # 0.5 µm/px: twice, allowed
    write_phantom(coarse, PhantomSpec(1024, 1024, seed=2, tps_percent=30, mpp=1.0))
    bad.write_bytes(good.read_bytes().replace(b"MPP = 0.5", b"MPP = 900"))  # same length: offsets stay
    shutil.copytree(truth_dir_for(good), truth_dir_for(bad))
    read = []
    real = domain_stats.domain_sample
    monkeypatch.setattr(domain_stats, "domain_sample", lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    out = tmp_path / "copy"
    args = ["domain-stats", str(model), str(good), str(coarse), "--held-out", str(bad)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-progress"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "2 of 3 slides have no usable pixel size or one too coarse for the model, so none was read:" in text, text
    assert (
        f"{coarse}: its pixels are 1 µm (from openslide.mpp-x/y), but the model 'pdl1-seg' reads 0.25 µm/px: it "
        "would enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, `pdl1 "
        "domain-stats` reads a slide at the pixel size the model's training recorded for it"
    ) in text
    assert f"{bad}: microns per pixel 900 (from openslide.mpp-x/y) is outside the plausible range" in text
    assert read == [] and not out.exists()


def test_a_damaged_slide_mpp_record_is_refused_saying_what_was_expected():
    from inference import recorded_slide_mpp

    manifest = read_manifest(demo_model_dir("seg"), verify=False)
    broken = dataclasses.replace(manifest, training={"config": {"slide_mpp": {"a.png": "0.5"}}})
    with pytest.raises(ValueError, match=r"slide_mpp is \{'a.png': '0.5'\}; expected a mapping of slide path to µm/px"):
        recorded_slide_mpp(broken, ["a.png"])
    assert recorded_slide_mpp(manifest, ["a.png"]) == {}  # the shipped model records none


def test_too_few_slides_to_calibrate_on_are_advised_in_each_callers_words(phantom_svs, tmp_path, caplog):
    """Two slides set the limits: the library's warning said "give at least 3 --held-out slides" to every caller,
    `pdl1 train`'s users too, whose held-out slides are --val-entries or --val-fraction."""
    import logging

    from typer.testing import CliRunner

    from bridge.cli.app import app
    from inference import compute_domain_stats
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from tests.helpers import TINY_TRAINING_ARGS

    slides = [str(phantom_svs), str(tmp_path / "b.svs")]  # 2048² px: 4 tiles each at the models' 2 µm/px
    write_phantom(slides[1], PhantomSpec(2048, 2048, seed=30, tps_percent=40))
    too_few = "the domain limits rest on 2 slides: one odd slide sets them"
    with caplog.at_level(logging.WARNING, logger="inference.training.domain_stats"):
        compute_domain_stats(demo_model_dir("seg"), slides)
    assert f"{too_few} (limits of 100 and more were seen with two); give at least 3 held-out slides (held_out)" in (
        caplog.text
    )
    caplog.clear()
    # One held-out slide sets the limits alone: it was not warned of at all.
    with caplog.at_level(logging.WARNING, logger="inference.training.domain_stats"):
        compute_domain_stats(demo_model_dir("seg"), slides[:1], held_out=slides[1:])
    assert "the domain limits rest on 1 slide: one odd slide sets them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference.training.domain_stats"):
        args = ["domain-stats", str(demo_model_dir("seg")), *slides, "--out", str(tmp_path / "copy"), "--no-progress"]
        assert CliRunner().invoke(app, args).exit_code == 0
    assert "give at least 3 held-out slides (--held-out)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference.training.domain_stats"):
        args = ["train", "seg", *slides, "--out", str(tmp_path / "m"), *TINY_TRAINING_ARGS, "--no-progress"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert "give at least 3 held-out slides (--val-entries or --val-fraction)" in caplog.text


def test_one_slide_without_held_out_ones_warns_that_the_guard_will_never_flag_and_how_to_calibrate(
    phantom_svs, seg_without_stats, caplog
):
    """`pdl1 train seg PROJECT` on a project of one labelled slide warned only "the domain limits are not
    calibrated": not what that does (the guard never flags an image) nor the fix, in the caller's words."""
    from inference import compute_domain_stats
    from inference.advice import library_setting, renamed

    words = renamed(library_setting, held_out="validation_slides")
    with caplog.at_level("WARNING", logger="inference.training.domain_stats"):
        stats = compute_domain_stats(seg_without_stats, [phantom_svs], setting=words)
    assert stats.feature_limit is None and stats.stain_limit_deg is None
    assert (
        "one training slide and no held-out slides: the domain limits are not calibrated, so the domain guard will "
        "measure images against this slide but never flag one as out of domain; give held-out in-domain slides "
        "(validation_slides), or train on two slides or more"
    ) in caplog.text


def test_domain_stats_advice_for_a_folder_that_is_no_model_names_no_default(tmp_path, phantom_svs):
    # Its MODEL has no default, so "leave the model option out to use the shipped demo" was advice it cannot take.
    from typer.testing import CliRunner

    from bridge.cli.app import app

    (tmp_path / "empty").mkdir()
    for model, said in [
        (tmp_path / "missing", "no such model folder; give the folder that holds manifest.json and its members"),
        (tmp_path / "empty", "no model manifest; a model folder holds manifest.json and its members' .safetensors"),
    ]:
        result = CliRunner().invoke(app, ["domain-stats", str(model), str(phantom_svs), "--no-progress"])
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and said in text, result.output
        assert "leave the model option out" not in text
    # Where the model has a default, the advice stays.
    result = CliRunner().invoke(app, ["calibrate", str(phantom_svs), "--model", str(tmp_path / "missing")])
    assert "leave the model option out to use the shipped demo" in " ".join(result.output.split()), result.output
