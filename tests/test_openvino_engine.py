"""The members' runtime: torch or OpenVINO (issue #35).

The first half needs no OpenVINO (config checks, the missing-package error, the cache's key and
checksums); the second converts two tiny one-member models (the demo networks cut to one member and
64 px tiles) and skips without OpenVINO installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import inference.models.openvino_engine as ove
from bridge.cli.app import app
from bridge.options import option_setting
from bridge.project_config import RUNTIMES as CONFIG_RUNTIMES
from bridge.project_config import problem_with
from inference.analysis.nuclei import NucleiConfig, _member_heatmaps
from inference.analysis.segment import SegmentConfig
from inference.errors import EngineExportError, Pdl1Error, RuntimeUnavailableError
from inference.models.ensemble import Ensemble, Precision, demo_model_dir
from inference.models.manifest import read_manifest, write_manifest
from tests.helpers import pointwise_ensemble

CPU = torch.device("cpu")
FP32 = Precision(None)


# ---- without OpenVINO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SegmentConfig, NucleiConfig])
def test_configs_refuse_an_unknown_runtime(config):
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, openvino, got 'onnx'"):
        config(runtime="onnx")


def test_compile_and_openvino_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        SegmentConfig(compile=True, runtime="openvino")


def test_openvino_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(ove, "openvino_available", lambda: False)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'pdl1-bridge\[openvino\]'") as err:
        ove.resolve_runtime("openvino", CPU)
    assert isinstance(err.value, Pdl1Error) and isinstance(err.value, ImportError)
    # The library's advice names its config fields, not pdl1's options (a Python caller has no --runtime).
    assert str(err.value).endswith("or use runtime='torch'")
    assert ove.resolve_runtime("auto", CPU) == "torch"


@pytest.mark.parametrize(
    ("device", "compile_members", "library", "cli"),
    [
        (
            "cuda:0",
            False,
            "use runtime='torch' (or runtime='auto') on a GPU, or device='cpu'",
            "use --runtime torch (or --runtime auto) on a GPU, or --device cpu",
        ),
        (
            "cpu",
            True,
            "torch.compile (compile=True) and runtime 'openvino' exclude each other",
            "torch.compile (--compile) and runtime 'openvino' exclude each other",
        ),
    ],
)
def test_a_runtime_refused_is_advised_in_the_callers_words(monkeypatch, device, compile_members, library, cli):
    monkeypatch.setattr(ove, "openvino_available", lambda: True)
    with pytest.raises(ValueError, match=re.escape(library)):
        ove.check_runtime("openvino", device, compile_members=compile_members)
    with pytest.raises(ValueError, match=re.escape(cli)):
        ove.check_runtime("openvino", device, compile_members=compile_members, setting=option_setting)


def test_openvino_is_refused_on_cuda_and_auto_is_torch_there(monkeypatch):
    monkeypatch.setattr(ove, "openvino_available", lambda: True)
    with pytest.raises(ValueError, match="runs the members on the CPU, but the device is cuda:0"):
        ove.resolve_runtime("openvino", torch.device("cuda:0"))
    assert ove.resolve_runtime("auto", torch.device("cuda:0")) == "torch"


@pytest.mark.parametrize(("auto", "compile_members", "expected"), [("openvino", False, "openvino"),
                                                                  ("openvino", True, "torch"),
                                                                  ("torch", False, "torch")])  # fmt: skip
def test_auto_on_the_cpu_follows_the_measured_choice(monkeypatch, auto, compile_members, expected):
    monkeypatch.setattr(ove, "openvino_available", lambda: True)
    monkeypatch.setattr(ove, "AUTO_CPU_RUNTIME", auto)
    assert ove.resolve_runtime("auto", CPU, compile_members=compile_members) == expected


def test_torch_runtime_is_the_ensemble_itself(monkeypatch):
    ens = pointwise_ensemble(2)
    assert ens.on_runtime("torch", precision=FP32) is ens
    assert ens.on_runtime("auto", precision=FP32, compile_members=True) is ens
    # Members from memory (training, tests) stay on torch under auto: their weights change too often to convert.
    monkeypatch.setattr(ove, "openvino_available", lambda: True)
    monkeypatch.setattr(ove, "AUTO_CPU_RUNTIME", "openvino")
    assert ens.on_runtime("auto", precision=FP32) is ens


def test_cache_key_changes_with_each_input():
    base = {"member_sha256": "a" * 64, "architecture": "PlainConvUNet", "architecture_kwargs": {"features": [8, 16]},
            "bn_folded": True, "ov_version": "2026.4.1"}  # fmt: skip
    key = ove.cache_key(**base)
    assert key == ove.cache_key(**base) and key.startswith("a" * 12 + "-")
    changes = {"member_sha256": "b" * 64, "architecture": "DilatedResFCN", "architecture_kwargs": {"features": [8]},
               "bn_folded": False, "ov_version": "2026.5.0"}  # fmt: skip
    for name, value in changes.items():
        assert ove.cache_key(**{**base, name: value}) != key, name


def _fake_ir(folder):
    folder.mkdir(parents=True)
    (folder / "model.xml").write_text("<net/>")
    (folder / "model.bin").write_bytes(bytes(range(16)))
    sums = {n: ove.file_sha256(folder / n) for n in ("model.xml", "model.bin")}
    (folder / "meta.json").write_text(json.dumps({"sha256": sums}))


def test_cached_ir_checksums(tmp_path):
    folder = tmp_path / "k"
    _fake_ir(folder)
    assert ove.cached_ir_problem(folder) is None
    (folder / "model.bin").write_bytes(bytes(range(1, 17)))
    assert "model.bin does not match the sha256 recorded in meta.json" in ove.cached_ir_problem(folder)
    (folder / "model.xml").unlink()
    assert "model.xml is missing" in ove.cached_ir_problem(folder)
    (folder / "meta.json").write_text("{")
    assert "meta.json is unreadable" in ove.cached_ir_problem(folder)
    (folder / "meta.json").unlink()
    assert "meta.json is missing" in ove.cached_ir_problem(folder)


def test_cache_roots_beside_the_model_then_the_user_cache(tmp_path, monkeypatch):
    # The inference library read XDG_CACHE_HOME itself; the user cache folder is now passed in (bridge reads it).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    cache = tmp_path / "cache"
    assert ove.cache_roots(tmp_path / "model", user_cache_dir=cache) == [tmp_path / "model" / ".openvino", cache]
    assert ove.cache_roots(None, user_cache_dir=cache) == [cache]
    assert ove.cache_roots(tmp_path / "model", user_cache_dir=None) == [tmp_path / "model" / ".openvino"]
    assert not hasattr(ove, "user_cache_dir")


def test_the_user_cache_folder_is_read_from_the_environment_in_bridge(tmp_path, monkeypatch):
    from bridge.cli.common import pipeline_config
    from bridge.user_dirs import openvino_cache_dir
    from inference import Models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert openvino_cache_dir() == tmp_path / "xdg" / "pdl1-bridge" / "openvino"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset, as the XDG specification says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert openvino_cache_dir() == tmp_path / "home" / ".cache" / "pdl1-bridge" / "openvino"
    # The CLI's (and the service's) config carries it to the loaded ensembles, outside the config's digest.
    config = pipeline_config("cpu", None, None, None)
    assert config.openvino_cache_dir == str(tmp_path / "home" / ".cache" / "pdl1-bridge" / "openvino")
    assert config.digest() == dataclasses.replace(config, openvino_cache_dir=None).digest()
    assert Models(config).seg.openvino_cache_dir == tmp_path / "home" / ".cache" / "pdl1-bridge" / "openvino"
    assert Models(config).seg.member(0).openvino_cache_dir == Models(config).seg.openvino_cache_dir


def test_project_config_knows_the_same_runtimes():
    assert CONFIG_RUNTIMES == ove.RUNTIMES
    assert problem_with("runtime", "openvino") is None
    assert problem_with("runtime", "onnx") == "expected auto, torch, openvino, got 'onnx'"


def _project(tmp_path):
    (tmp_path / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": []}))
    return tmp_path


@pytest.fixture
def captured_run(monkeypatch):
    import bridge.cli.run

    seen = []
    monkeypatch.setattr(bridge.cli.run, "run_with_progress", lambda inputs, run_config, *, progress: seen.append(
        run_config) or [])  # fmt: skip
    return seen


def test_cli_runtime_reaches_both_configs(tmp_path, captured_run):
    args = ["run", str(_project(tmp_path)), "--no-progress", "--no-config", "--runtime", "torch", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.pipeline.segment.runtime == "torch" and config.pipeline.nuclei.runtime == "torch"


def test_cli_refuses_an_unknown_runtime(tmp_path, captured_run):
    result = CliRunner().invoke(app, ["run", str(_project(tmp_path)), "--no-progress", "--no-config", "--runtime", "x"])
    assert result.exit_code == 2 and "expected auto, torch, openvino, got 'x'" in result.output
    assert not captured_run


def test_cli_openvino_without_the_package_fails_before_any_image(tmp_path, captured_run, monkeypatch):
    monkeypatch.setattr(ove, "openvino_available", lambda: False)
    args = ["run", str(_project(tmp_path)), "--no-progress", "--no-config", "--runtime", "openvino", "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "pip install 'pdl1-bridge[openvino]', or use --runtime torch" in said, said
    assert not captured_run


@pytest.fixture
def captured_serve(monkeypatch):
    """What `pdl1 serve` would start (its settings), without binding a port or serving."""
    import bridge.service
    import bridge.service.server

    seen = []
    monkeypatch.setattr(bridge.service, "create_app", lambda settings, **kwargs: seen.append(settings) or object())
    monkeypatch.setattr(bridge.service.server, "run_service", lambda *args, **kwargs: None)
    return seen


def _serve(tmp_path, *args):
    from tests.service_helpers import free_port

    cli = ["serve", "--allow-root", str(tmp_path), "--port", str(free_port()), "--device", "cpu", *args]
    result = CliRunner().invoke(app, cli, env={"COLUMNS": "300"})
    return result, " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize("runtime", ["torch", "openvino", "auto"])
def test_serve_runtime_reaches_both_configs(tmp_path, captured_serve, monkeypatch, runtime):
    # pdl1 serve had no --runtime: its jobs always ran on auto, whatever pdl1 run was given.
    monkeypatch.setattr(ove, "openvino_available", lambda: True)
    result, _ = _serve(tmp_path, "--runtime", runtime)
    assert result.exit_code == 0, result.output
    (settings,) = captured_serve
    assert settings.pipeline.segment.runtime == runtime and settings.pipeline.nuclei.runtime == runtime


def test_serve_refuses_an_unknown_runtime(tmp_path, captured_serve):
    result, text = _serve(tmp_path, "--runtime", "onnx")
    assert result.exit_code == 2 and "--runtime': expected auto, torch, openvino, got 'onnx'" in text, text
    assert not captured_serve


def test_serve_openvino_without_the_package_fails_before_the_service_starts(tmp_path, captured_serve, monkeypatch):
    monkeypatch.setattr(ove, "openvino_available", lambda: False)
    result, text = _serve(tmp_path, "--runtime", "openvino")
    assert result.exit_code == 1 and "pip install 'pdl1-bridge[openvino]', or use --runtime torch" in text, text
    assert "pdl1 serve on http://" not in text and not captured_serve


# ---- with OpenVINO -----------------------------------------------------------------------------------------------


def _one_member_model(src_kind: str, dest, *, tile_px: int = 64):
    """A copy of a demo model with its first member only and ``tile_px`` tiles (fast to convert and run)."""
    shutil.copytree(demo_model_dir(src_kind), dest, ignore=shutil.ignore_patterns(".openvino", "member_0[1-9]*"))
    manifest = read_manifest(dest, verify=False)
    write_manifest(dest, dataclasses.replace(manifest, members=manifest.members[:1], tile_size_px=tile_px))
    return dest


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino", reason="needs OpenVINO (pip install 'pdl1-bridge[openvino]')")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """The user cache folder the tests that need one pass; the environment's must not be used."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-this"))
    yield tmp_path / "xdg" / "pdl1-bridge" / "openvino"
    assert not (tmp_path / "not-this").exists()


def _count_conversions(monkeypatch, ov):
    calls = []
    real = ov.convert_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", counting)
    return calls


def _batch(seed: int = 0, n: int = 2, px: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def test_seg_member_matches_torch_and_the_cache_is_reused(ov, tmp_path, isolated_cache, monkeypatch):
    folder = _one_member_model("seg", tmp_path / "seg")
    calls = _count_conversions(monkeypatch, ov)
    ens = Ensemble.load(folder, task="segmentation", device="cpu")
    on_ov = ens.on_runtime("openvino", precision=FP32)
    assert on_ov.runtime == "openvino" and len(calls) == 1
    assert ens.on_runtime("openvino", precision=FP32) is on_ov  # kept on the ensemble
    x = _batch()
    expected = ens.member_logits(x, precision=FP32)
    got = on_ov.member_logits(x, precision=FP32)
    assert got.shape == expected.shape == (1, 2, 2, 64, 64) and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 1e-4
    # One member alone (per-member evaluation) finds its own file's conversion.
    assert ens.member(0).on_runtime("openvino", precision=FP32).runtime == "openvino" and len(calls) == 1
    # A larger tile and batch than converted with: dynamic shapes.
    x = _batch(1, n=3, px=128)
    assert float((on_ov.member_logits(x, precision=FP32) - ens.member_logits(x, precision=FP32)).abs().max()) <= 1e-4
    (cached,) = (folder / ".openvino").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == ["meta.json", "model.bin", "model.xml"]
    assert not isolated_cache.exists()
    # A new process (a new Ensemble) reads the cache: no second conversion; bf16 compiles the same IR.
    again = Ensemble.load(folder, task="segmentation", device="cpu").on_runtime(
        "openvino", precision=Precision(torch.bfloat16)
    )
    assert len(calls) == 1
    bf16 = again.member_logits(x, precision=Precision(torch.bfloat16))
    assert float((bf16 - ens.member_logits(x, precision=FP32)).abs().max()) < 0.5


def test_nuclei_member_matches_torch(ov, tmp_path, isolated_cache):
    folder = _one_member_model("nuclei", tmp_path / "nuclei")
    ens = Ensemble.load(folder, task="nuclei", device="cpu")
    on_ov = ens.on_runtime("openvino", precision=FP32)
    x = _batch(2)
    for tta in (False, True):
        expected = _member_heatmaps(ens, x, FP32, tta=tta)
        got = _member_heatmaps(on_ov, x, FP32, tta=tta)
        assert float((got - expected).abs().max()) <= 1e-4


def test_a_tampered_cache_is_converted_again(ov, tmp_path, isolated_cache, monkeypatch, caplog):
    folder = _one_member_model("seg", tmp_path / "seg")
    Ensemble.load(folder, task="segmentation", device="cpu").on_runtime("openvino", precision=FP32)
    (cached,) = (folder / ".openvino").iterdir()
    data = bytearray((cached / "model.bin").read_bytes())
    data[100] ^= 0xFF
    (cached / "model.bin").write_bytes(bytes(data))
    calls = _count_conversions(monkeypatch, ov)
    with caplog.at_level(logging.WARNING, logger="inference.models.openvino_engine"):
        ens = Ensemble.load(folder, task="segmentation", device="cpu")
        on_ov = ens.on_runtime("openvino", precision=FP32)
    assert len(calls) == 1
    assert "model.bin does not match the sha256 recorded in meta.json" in caplog.text
    assert "converting it again" in caplog.text
    assert ove.cached_ir_problem(cached) is None
    x = _batch(3)
    assert float((on_ov.member_logits(x, precision=FP32) - ens.member_logits(x, precision=FP32)).abs().max()) <= 1e-4


def test_an_unwritable_model_folder_falls_back_to_the_user_cache(ov, tmp_path, isolated_cache, monkeypatch):
    folder = _one_member_model("seg", tmp_path / "seg")
    # A file where the cache folder would go: nothing can be written beside the model, whoever runs the test
    # (chmod does not stop root).
    (folder / ".openvino").write_text("not a folder")
    ens = Ensemble.load(folder, task="segmentation", device="cpu", openvino_cache_dir=isolated_cache)
    ens.on_runtime("openvino", precision=FP32)
    (cached,) = isolated_cache.iterdir()
    assert ove.cached_ir_problem(cached) is None
    calls = _count_conversions(monkeypatch, ov)
    again = Ensemble.load(folder, task="segmentation", device="cpu", openvino_cache_dir=isolated_cache)
    again.on_runtime("openvino", precision=FP32)
    assert not calls
    # Without a user cache folder there is nowhere to write: the error says what to do, in the caller's words.
    with pytest.raises(OSError, match=r"no writable folder .* give a writable user cache folder") as err:
        Ensemble.load(folder, task="segmentation", device="cpu").on_runtime("openvino", precision=FP32)
    assert str(err.value).endswith("or run with runtime='torch'"), err.value
    with pytest.raises(OSError, match=r"no writable folder .* or run with --runtime torch$"):
        Ensemble.load(folder, task="segmentation", device="cpu", setting=option_setting).on_runtime(
            "openvino", precision=FP32
        )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_model_folder_falls_back_to_the_user_cache(ov, tmp_path, isolated_cache):
    folder = _one_member_model("seg", tmp_path / "seg")
    folder.chmod(0o555)
    try:
        ens = Ensemble.load(folder, task="segmentation", device="cpu", openvino_cache_dir=isolated_cache)
        ens.on_runtime("openvino", precision=FP32)
    finally:
        folder.chmod(0o755)
    assert not (folder / ".openvino").exists() and len(list(isolated_cache.iterdir())) == 1


def test_a_conversion_that_differs_is_refused_and_not_cached(ov, tmp_path, isolated_cache, monkeypatch):
    folder = _one_member_model("seg", tmp_path / "seg")
    monkeypatch.setattr(ove, "_max_difference", lambda *a, **k: 0.5)
    ens = Ensemble.load(folder, task="segmentation", device="cpu")
    # The library's advice names its config field (a Python caller has no --runtime; it said --runtime torch).
    with pytest.raises(
        EngineExportError, match=r"member_00.safetensors .* differs .* by 0.5 .*: run with runtime='torch'$"
    ):
        ens.on_runtime("openvino", precision=FP32)
    assert list((folder / ".openvino").iterdir()) == []
    # pdl1's loads pass its options; one member alone keeps them (per-member evaluation).
    ens = Ensemble.load(folder, task="segmentation", device="cpu", setting=option_setting)
    with pytest.raises(EngineExportError, match=r"differs .* by 0.5 .*: run with --runtime torch$"):
        ens.member(0).on_runtime("openvino", precision=FP32)


def _two_member_model(dest):
    """A copy of the demo segmentation model with its first two members and 64 px tiles: member 1 is converted
    while the domain guard keeps member 0 on torch for its features."""
    shutil.copytree(demo_model_dir("seg"), dest, ignore=shutil.ignore_patterns(".openvino", "member_0[2-9]*"))
    manifest = read_manifest(dest, verify=False)
    write_manifest(dest, dataclasses.replace(manifest, members=manifest.members[:2], tile_size_px=64))
    return dest


def test_a_conversion_refused_during_a_run_is_advised_in_each_callers_words(
    ov, tmp_path, isolated_cache, monkeypatch, finetune_phantom
):
    """A conversion fails deep in a run, far from where the runtime was chosen: analyse_slide's caller is told of
    the config field, `pdl1 run`'s of its option (both were told of --runtime, an option only pdl1 has)."""
    from bridge.run import RunConfig, run_models
    from inference import Models, PipelineConfig, analyse_slide

    folder = _two_member_model(tmp_path / "seg")
    monkeypatch.setattr(ove, "_max_difference", lambda *a, **k: 0.5)
    config = PipelineConfig(device="cpu", seg_model_dir=str(folder), segment=SegmentConfig(runtime="openvino"))
    with pytest.raises(EngineExportError) as err:
        analyse_slide(finetune_phantom, models=Models(config), config=config)
    assert "--runtime" not in str(err.value) and str(err.value).endswith(": run with runtime='torch'"), err.value
    assert run_models(RunConfig(pipeline=config)).seg.setting is option_setting  # pdl1 run's, on Ray too

    args = ["run", finetune_phantom, "--out", str(tmp_path / "out"), "--seg-model", str(folder), "--runtime"]
    args += ["openvino", "--device", "cpu", "--no-progress", "--no-config"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 1 and "differs from the PyTorch member by 0.5" in said, said
    assert "run with --runtime torch" in said and "runtime='torch'" not in said, said


def test_serve_loads_its_models_with_its_options_words(tmp_path, monkeypatch):
    """A job's conversion refused is advised as pdl1 serve's option, as its start-up check is."""
    import bridge.service
    import bridge.service.server

    loaded = []
    monkeypatch.setattr(bridge.service, "create_app", lambda settings, *, models: loaded.append(models) or object())
    monkeypatch.setattr(bridge.service.server, "run_service", lambda *args, **kwargs: None)
    result, _ = _serve(tmp_path, "--runtime", "torch")
    assert result.exit_code == 0, result.output
    assert loaded[0].seg.setting is option_setting


def test_members_in_memory_convert_into_the_user_cache(ov, isolated_cache):
    ens = pointwise_ensemble(2, tile_size_px=16)
    ens = Ensemble.from_members(ens.manifest, ens.members, openvino_cache_dir=isolated_cache)
    on_ov = ens.on_runtime("openvino", precision=FP32)
    x = _batch(4, px=16)
    assert float((on_ov.member_probs(x, precision=FP32) - ens.member_probs(x, precision=FP32)).abs().max()) <= 1e-5
    assert len(list(isolated_cache.iterdir())) == 2


def test_auto_falls_back_to_torch_where_the_conversion_fails(ov, tmp_path, isolated_cache, monkeypatch, caplog):
    folder = _one_member_model("seg", tmp_path / "seg")
    monkeypatch.setattr(ove, "AUTO_CPU_RUNTIME", "openvino")
    monkeypatch.setattr(ove, "_max_difference", lambda *a, **k: 0.5)
    ens = Ensemble.load(folder, task="segmentation", device="cpu")
    with caplog.at_level(logging.WARNING, logger="inference.models.ensemble"):
        assert ens.on_runtime("auto", precision=FP32) is ens
    assert "runtime auto: pdl1-seg 1 stays on torch, OpenVINO failed on it" in caplog.text
    assert "differs from the PyTorch member by 0.5" in caplog.text


def test_a_member_with_forward_hooks_stays_on_torch(ov, tmp_path, isolated_cache):
    """The domain guard listens to member 0's layers (inference.models.features): OpenVINO would run no hooks."""
    from inference.models.features import capture_tile_features

    folder = _one_member_model("seg", tmp_path / "seg")
    ens = Ensemble.load(folder, task="segmentation", device="cpu")
    x = _batch(5)
    with capture_tile_features(ens) as captured:
        on_ov = ens.on_runtime("openvino", precision=FP32)
        assert on_ov.members[0] is ens.members[0]
        on_ov.member_logits(x, precision=FP32)
    assert captured.array().shape[0] == 2
    assert isinstance(ens.on_runtime("openvino", precision=FP32).members[0], ove.OpenVinoMember)  # hooks gone
