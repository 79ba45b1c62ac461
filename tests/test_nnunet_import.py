"""Importing nnU-Net v2 trained-model folders (``pdl1 import nnunet``).

The refusals need no nnU-Net package: checkpoints and plans are written here as nnU-Net v2
writes them. Building the networks needs ``dynamic_network_architectures`` (the ``nnunet``
extra); those tests skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bridge.cli.app import app
from inference.errors import ModelFileError
from inference.models.ensemble import Ensemble, Precision
from inference.models.manifest import read_manifest
from inference.models.nnunet_import import import_nnunet, load_nnunet_checkpoint

HAS_DNA = importlib.util.find_spec("dynamic_network_architectures") is not None
needs_dna = pytest.mark.skipif(
    not HAS_DNA, reason="needs dynamic_network_architectures: pip install 'pdl1-bridge[nnunet]'"
)

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _arch_kwargs(architecture: str, *, stages: int = 3) -> dict:
    kwargs = {
        "n_stages": stages,
        "features_per_stage": [4 * 2**i for i in range(stages)],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * stages,
        "strides": [[1, 1]] + [[2, 2]] * (stages - 1),
        "n_conv_per_stage_decoder": [1] * (stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if architecture == RESENC:
        kwargs["n_blocks_per_stage"] = [1, 2, 2][:stages]
    else:
        kwargs["n_conv_per_stage"] = [2] * stages
    return kwargs


def _plans(*, architecture: str = PLAIN, patch: list[int] | None = None, norm: str = "RGBTo01Normalization") -> dict:
    config = {
        "data_identifier": "nnUNetPlans_2d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch or [64, 64],
        "spacing": [1.0, 1.0],
        "normalization_schemes": [norm] * 3,
        "use_mask_for_norm": [False] * 3,
        "architecture": {
            "network_class_name": architecture,
            "arch_kwargs": _arch_kwargs(architecture if architecture in (PLAIN, RESENC) else PLAIN),
            "_kw_requires_import": IMPORTS,
        },
    }
    return {
        "dataset_name": "Dataset501_PDL1",
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "configurations": {"2d": config, "3d_fullres": {**config, "patch_size": [8, 64, 64]}},
    }


DATASET = {
    "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
    "labels": {"background": 0, "PD-L1 positive": 1, "ignore": 2},
    "numTraining": 4,
    "file_ending": ".png",
}


def _network(architecture: str = PLAIN) -> torch.nn.Module:
    from inference.models.nnunet_network import build_nnunet_network

    kwargs = {
        "input_channels": 3,
        "num_classes": 2,
        "arch_kwargs": _arch_kwargs(architecture),
        "arch_kwargs_requires_import": IMPORTS,
    }
    torch.manual_seed(3)
    return build_nnunet_network(architecture, kwargs)


def _checkpoint(weights: dict, *, epoch: int, configuration: str = "2d", **extra) -> dict:
    """What nnUNetTrainer.save_checkpoint writes (numpy floats in the logs, a torch.device in init_args)."""
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
        "grad_scaler_state": None,
        "logging": {"lrs": [0.01, 0.005, 0.001][:epoch], "mean_fg_dice": [np.float64(0.5)] * epoch},
        "_best_ema": np.float64(0.5),
        "current_epoch": epoch,
        "init_args": {"plans": {}, "configuration": configuration, "fold": 0, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1),
        **extra,
    }


def _results(tmp_path: Path, *, plans: dict | None = None, config_name: str = "2d", checkpoints=None) -> Path:
    folder = tmp_path / "Dataset501_PDL1" / f"nnUNetTrainer__nnUNetPlans__{config_name}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans or _plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET))
    dummy = {"encoder.w": torch.zeros(2)}
    for name, ckpt in (checkpoints or {"checkpoint_final.pth": _checkpoint(dummy, epoch=3)}).items():
        torch.save(ckpt, folder / "fold_0" / name)
    return folder


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_checkpoint({"w": torch.zeros(1)}, epoch=1, payload=_RunsCode(marker)), path)
    with pytest.raises(
        ModelFileError, match=r"checkpoint_final\.pth: refused: the checkpoint holds more than"
    ) as refused:
        load_nnunet_checkpoint(path)
    assert not marker.exists()
    # What it would call is named; torch's advice to load it with weights_only=False (and run it) is not quoted
    assert "could run code (it needs getattr, which is neither)" in str(refused.value)
    assert "weights_only" not in str(refused.value)


def test_a_pickle_of_an_old_protocol_is_refused_unread_as_unsafe(tmp_path):
    # helper-130: a protocol-0 pickle (cposix\nsystem...) was refused safely, but as "damaged ... copy it again".
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=0))
    with pytest.raises(ModelFileError, match=r"a pickle of protocol 0 or 1, which torch never writes; it is refused"):
        load_nnunet_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_with_a_foreign_class_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(_checkpoint({"w": torch.zeros(1)}, epoch=1, extra_obj=Fraction(1, 3)), path)
    with pytest.raises(ModelFileError, match=r"c\.pth: refused.*Fraction"):
        load_nnunet_checkpoint(path)


def _damaged(kind: str, good: bytes) -> bytes:
    """A checkpoint file as it arrives broken: empty, random bytes, cut short, a bit flipped, another zip."""
    if kind == "empty":
        return b""
    if kind == "random":
        return b"\x17" + np.random.default_rng(5).bytes(4095)  # not a pickle's 0x80, not a zip's "PK"
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "bit flipped":
        middle = len(good) // 2  # inside the tensor's bytes, which torch does not check
        return good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :]
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("empty", r"it is empty \(0 bytes\)"),
        ("random", r"it is not a zip archive, as torch saves checkpoints \(its first bytes are b'\\x17"),
        ("truncated", r"its zip archive has no end \(\d+ bytes\): the file was cut short"),
        ("bit flipped", r"its member c/data/0 fails its CRC check"),
        ("other zip", r"it is a zip archive without the data\.pkl torch writes"),
    ],
)
def test_a_damaged_checkpoint_is_told_from_a_refused_one(tmp_path, kind, why):
    path = tmp_path / "c.pth"
    torch.save(_checkpoint({"w": torch.arange(4096, dtype=torch.float32)}, epoch=1), path)
    path.write_bytes(_damaged(kind, path.read_bytes()))
    with pytest.raises(
        ModelFileError, match=rf"c\.pth: damaged or not a torch checkpoint: {why}.*; copy it again"
    ) as err:
        load_nnunet_checkpoint(path)
    assert "refused" not in str(err.value) and "run code" not in str(err.value)


def test_a_checkpoint_with_a_compressed_member_is_refused_before_torch_unpacks_it(tmp_path):
    # torch.load unpacks a deflated member into the size its header claims: a 1 MB re-packed checkpoint of zeros
    # loaded as a 1 GB tensor. torch.save stores every member as it is.
    import zipfile

    stored, packed = tmp_path / "stored.pth", tmp_path / "packed.pth"
    torch.save(_checkpoint({"w": torch.zeros(256, 1024)}, epoch=1), stored)
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            assert info.compress_type == zipfile.ZIP_STORED  # as torch writes it
            dst.writestr(info.filename, src.read(info.filename))
    assert packed.stat().st_size < stored.stat().st_size // 50
    assert load_nnunet_checkpoint(stored).weights["w"].shape == (256, 1024)
    with pytest.raises(
        ModelFileError,
        match=r"packed\.pth: damaged or not a torch checkpoint: its member stored/data\.pkl is compressed \(\d+ bytes "
        r"said to unpack to \d+\), which torch\.save never writes.*refused unread",
    ):
        load_nnunet_checkpoint(packed)


def test_a_legacy_checkpoint_cut_short_is_damaged_not_a_traceback(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(_checkpoint({"w": torch.zeros(3)}, epoch=1), path, _use_new_zipfile_serialization=False)
    assert load_nnunet_checkpoint(path).epoch == 1  # torch's pickle format before 1.6 still loads
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=r"c\.pth: damaged or not a torch checkpoint: torch cannot read it \("):
        load_nnunet_checkpoint(path)


def test_checkpoint_keeps_only_network_weights(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(_checkpoint({"module.a": torch.ones(2)}, epoch=2), path)
    ckpt = load_nnunet_checkpoint(path)
    assert list(ckpt.weights) == ["a"]
    assert (ckpt.epoch, ckpt.fold, ckpt.configuration, ckpt.trainer) == (2, "0", "2d", "nnUNetTrainer")
    assert ckpt.learning_rate == pytest.approx(0.005)


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"network_weights": {"a": [1, 2]}}, path)
    with pytest.raises(ModelFileError, match="no network_weights of tensors"):
        load_nnunet_checkpoint(path)


def test_unknown_architecture_is_refused_by_name(tmp_path):
    folder = _results(tmp_path, plans=_plans(architecture="my_lab.nets.FancyUNet"))
    with pytest.raises(ModelFileError, match=r"'my_lab\.nets\.FancyUNet' is not one this product runs"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


def test_3d_configuration_is_refused(tmp_path):
    folder = _results(tmp_path, config_name="3d_fullres")
    with pytest.raises(ModelFileError, match=r"'3d_fullres' is 3D .*only 2D"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)


def test_3d_configuration_told_by_the_checkpoint_is_refused(tmp_path):
    ckpt = _checkpoint({"w": torch.zeros(1)}, epoch=1, configuration="3d_fullres")
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": ckpt})
    renamed = folder.rename(folder.with_name("renamed"))
    with pytest.raises(ModelFileError, match="is 3D"):
        import_nnunet(renamed, tmp_path / "model", mpp=2.0)


def test_per_image_normalisation_is_refused(tmp_path):
    folder = _results(tmp_path, plans=_plans(norm="ZScoreNormalization"))
    with pytest.raises(ModelFileError, match=r"ZScoreNormalization.*rgb_to_0_1"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)


@pytest.mark.parametrize("mpp", [0.0, -1.0, float("nan")])
def test_bad_mpp_is_refused(tmp_path, mpp):
    # The library names its argument (it said --mpp, `pdl1 import nnunet`'s option, to a Python caller).
    with pytest.raises(ModelFileError, match=r"^mpp must be the training images' µm per pixel"):
        import_nnunet(_results(tmp_path), tmp_path / "model", mpp=mpp)


def test_an_mpp_other_than_the_one_pdl1_exported_the_dataset_at_is_refused(tmp_path):
    # `pdl1 export nnunet` records its µm/px in dataset.json, which nnU-Net copies into the results folder; it was
    # never read, so a model trained at 2 µm/px imported with --mpp 0.5 ran at a quarter of its training scale.
    folder = _results(tmp_path)
    (folder / "dataset.json").write_text(json.dumps({**DATASET, "pdl1_mpp": 2.0}))
    with pytest.raises(
        ModelFileError,
        match=r"dataset\.json: the dataset was exported by pdl1 at 2 µm/px, but mpp=0\.5 was given; the model would "
        r"run at 0\.25x its training scale: give mpp=2\.0$",
    ):
        import_nnunet(folder, tmp_path / "model", mpp=0.5)
    assert not (tmp_path / "model").exists()


def test_a_file_given_as_the_results_folder_is_named_a_file(tmp_path):
    # "no such folder" for a file that is there (a checkpoint or a slide given instead of its folder).
    given = tmp_path / "checkpoint_final.pth"
    given.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"checkpoint_final\.pth: a file, not a folder; pass nnUNet_results/"):
        import_nnunet(given, tmp_path / "model", mpp=2.0)
    with pytest.raises(ModelFileError, match="no such folder"):
        import_nnunet(tmp_path / "absent", tmp_path / "model", mpp=2.0)


def test_cli_requires_mpp(tmp_path):
    folder = _results(tmp_path)
    result = CliRunner().invoke(app, ["import", "nnunet", str(folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--mpp" in result.output and "Missing option" in result.output


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("nan", "nan is not a number; give one from 0.05 to 64"),
        ("NaN", "NaN is not a number; give one from 0.05 to 64"),
        ("inf", "inf is outside the range; give a number from 0.05 to 64"),
        ("100", "100 is outside the range; give a number from 0.05 to 64"),
        ("-inf", "-inf is outside the range; give a number from 0.05 to 64"),
        ("-1", "-1 is outside the range; give a number from 0.05 to 64"),
        ("0", "0 is outside the range; give a number from 0.05 to 64"),
        ("two", "two is not a number; give one from 0.05 to 64"),
    ],
)
def test_cli_says_an_mpp_of_nan_is_not_a_number_and_one_out_of_range_is(tmp_path, value, said):
    # `--mpp nan` was "less than or equal to 64", as if it were too large: NaN fails every comparison.
    args = ["import", "nnunet", str(tmp_path), "--out", str(tmp_path / "m"), f"--mpp={value}"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--mpp': {said}" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()


def test_missing_checkpoint_names_what_the_fold_has(tmp_path):
    folder = _results(tmp_path)
    with pytest.raises(ModelFileError, match=r"checkpoint_best\.pth: checkpoint not found.*checkpoint_final\.pth"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0, checkpoints=["checkpoint_best.pth"])


def test_a_stain_the_exported_dataset_contradicts_is_refused(tmp_path):
    # helper-130: an IHC dataset imported as H&E (the default) without a word: pdl1 export records its stain now.
    folder = _results(tmp_path)
    (folder / "dataset.json").write_text(json.dumps({**DATASET, "pdl1_stain": "H-DAB"}))
    with pytest.raises(ModelFileError, match=r"exported by pdl1 from H-DAB images, but stain='H&E' was given"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0, stain="H&E")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(("given", "typed"), [("he", "he"), ("H&E", "he"), ("h&e", "he")])
def test_pdl1_import_nnunet_names_the_stain_as_its_option_takes_it(tmp_path, given, typed):
    # Was "--stain H&E was given; ...: give --stain H-DAB": pasted into a shell, `--stain H-DAB` passes, but
    # `--stain H&E` runs `pdl1 ... --stain H` in the background; the option's own words are he and ihc.
    folder = _results(tmp_path)
    (folder / "dataset.json").write_text(json.dumps({**DATASET, "pdl1_stain": "H-DAB"}))
    args = ["import", "nnunet", str(folder), "--mpp", "2", "--out", str(tmp_path / "m"), "--stain", given]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 1, text
    assert text.endswith(
        f"but --stain {typed} was given; the model would be run on the other stain: give --stain ihc, or leave it out"
    ), text
    assert not (tmp_path / "m").exists()


def test_the_stain_defaults_to_the_one_pdl1_export_recorded_else_h_and_e():
    # The import's default stain (no --stain): the tests that import a whole model need the nnunet extra, which CI
    # lacks, so the default was tested nowhere.
    from inference.models.nnunet_import import imported_stain

    path = Path("dataset.json")
    assert imported_stain(None, {**DATASET, "pdl1_stain": "H-DAB"}, dataset_path=path) == "H-DAB"
    assert imported_stain(None, {**DATASET, "pdl1_stain": "H&E"}, dataset_path=path) == "H&E"
    assert imported_stain(None, DATASET, dataset_path=path) == "H&E"  # an nnU-Net dataset pdl1 did not export
    assert imported_stain("H-DAB", DATASET, dataset_path=path) == "H-DAB"  # stated, nothing recorded to contradict
    assert imported_stain("H-DAB", {**DATASET, "pdl1_stain": "H-DAB"}, dataset_path=path) == "H-DAB"
    with pytest.raises(ModelFileError, match=r"dataset\.json: the dataset was exported by pdl1 from H&E images"):
        imported_stain("H-DAB", {**DATASET, "pdl1_stain": "H&E"}, dataset_path=path)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"folds": ["0", "0"]}, r"folds names 0 more than once; each becomes a member"),
        ({"checkpoints": ["checkpoint_final.pth"] * 2}, r"checkpoints names checkpoint_final\.pth more than once"),
    ],
)
def test_a_fold_or_checkpoint_named_twice_is_refused(tmp_path, given, says):
    # helper-130: --folds 0 --folds 0 gave two identical members, which understate the ensemble's disagreement.
    with pytest.raises(ModelFileError, match=says):
        import_nnunet(_results(tmp_path), tmp_path / "model", mpp=2.0, **given)
    assert not (tmp_path / "model").exists()


@needs_dna
@pytest.mark.parametrize("architecture", [PLAIN, RESENC])
def test_imported_members_run_as_the_networks_do(tmp_path, architecture):
    nets = []
    ckpts = {}
    for i, epoch in enumerate((2, 3)):
        net = _network(architecture)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p))
        nets.append(net.eval())
        ckpts[f"checkpoint_epoch_{epoch}.pth"] = _checkpoint(net.state_dict(), epoch=epoch)
    folder = _results(tmp_path, plans=_plans(architecture=architecture), checkpoints=ckpts)
    out = tmp_path / "model"
    manifest = import_nnunet(folder, out, mpp=1.5, checkpoints=list(ckpts))
    assert read_manifest(out).members == manifest.members
    assert [m.epoch for m in manifest.members] == [2, 3]
    assert (manifest.input_mpp, manifest.tile_size_px, manifest.class_names) == (
        1.5,
        64,
        ["background", "PD-L1 positive"],
    )
    assert manifest.normalization == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert manifest.training["members"][1]["checkpoint"] == "fold_0/checkpoint_epoch_3.pth"
    assert manifest.training["plans_identifier"] == "nnUNetPlans"

    ensemble = Ensemble.load(out, task="segmentation")
    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ours = ensemble.member_probs(rgb, precision=Precision(None))
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0  # RGBTo01Normalization
    with torch.no_grad():
        theirs = torch.stack([torch.softmax(net(x), dim=1) for net in nets])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_dataset_json_of_other_classes_than_the_checkpoints_is_named_as_such(tmp_path):
    # Four labels on a two-class model was "weights do not fit ...: size mismatch for decoder.seg_layers.0.weight",
    # naming neither dataset.json nor the classes.
    heads = {
        "decoder.seg_layers.0.weight": torch.zeros(2, 8, 1, 1),
        "decoder.seg_layers.1.weight": torch.zeros(2, 4, 1, 1),
    }
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(heads, epoch=1)})
    labels = {"background": 0, "tumor": 1, "stroma": 2, "ignore": 3}
    (folder / "dataset.json").write_text(json.dumps({**DATASET, "labels": labels}))
    with pytest.raises(
        ModelFileError,
        match=r"dataset\.json: names 3 classes \(background, tumor, stroma\), but .*checkpoint_final\.pth outputs 2; "
        r"is dataset\.json another dataset's\? Copy it again",
    ):
        import_nnunet(folder, tmp_path / "model", mpp=2.0, positive_label="tumor")
    assert not (tmp_path / "model").exists()


@needs_dna
def test_weights_of_another_network_are_refused(tmp_path):
    net = _network(PLAIN)
    state = {k: v for k, v in net.state_dict().items() if "seg_layers" not in k}
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(state, epoch=1)})
    with pytest.raises(ModelFileError, match=r"checkpoint_final\.pth: weights do not fit .*PlainConvUNet"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


@needs_dna
def test_an_existing_model_folder_is_not_overwritten(tmp_path):
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(_network().state_dict(), epoch=1)})
    import_nnunet(folder, tmp_path / "model", mpp=2.0)
    with pytest.raises(ModelFileError, match=r"already holds a model \(manifest.json\); choose another out_dir or"):
        import_nnunet(folder, tmp_path / "model", mpp=1.0)
    assert read_manifest(tmp_path / "model").input_mpp == 2.0


def test_layer_outside_torch_nn_is_refused():
    from inference.models.nnunet_network import build_nnunet_network

    kwargs = {
        "input_channels": 3,
        "num_classes": 2,
        "arch_kwargs": {**_arch_kwargs(PLAIN), "nonlin": "os.system"},
        "arch_kwargs_requires_import": IMPORTS,
    }
    with pytest.raises(ModelFileError, match=r"nonlin='os\.system': only torch\.nn layer classes"):
        build_nnunet_network(PLAIN, kwargs)


@needs_dna
def test_cli_imports_folds_and_says_what_it_took(tmp_path):
    net = _network(PLAIN)
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(net.state_dict(), epoch=7)})
    fold_1 = folder / "fold_1"
    fold_1.mkdir()
    torch.save(_checkpoint(net.state_dict(), epoch=9), fold_1 / "checkpoint_final.pth")
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["import", "nnunet", str(folder), "--out", str(out), "--mpp", "0.5"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "2 members (PlainConvUNet, 64 px tiles at 0.5 µm/px" in text
    assert "fold_1/checkpoint_final.pth (fold 1, epoch 9)" in text
    manifest = read_manifest(out)
    assert [m.chain for m in manifest.members] == [0, 1] and manifest.blend == "nnunet"
    only = CliRunner().invoke(
        app, ["import", "nnunet", str(folder), "--out", str(tmp_path / "m1"), "--mpp", "1", "--folds", "1"]
    )
    assert only.exit_code == 0, only.output
    assert [m.epoch for m in read_manifest(tmp_path / "m1").members] == [9]


@needs_dna
def test_cli_takes_pdl1_run_s_stain_words_and_refuses_others_by_name(tmp_path):
    # "--stain ihc", as pdl1 run takes it, was refused as "stain 'ihc' is not one of ('H&E', 'H-DAB')".
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(_network().state_dict(), epoch=1)})
    args = ["import", "nnunet", str(folder), "--mpp", "0.5", "--out"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "ihc"), "--stain", "ihc"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "ihc").stain == "H-DAB"
    result = CliRunner().invoke(app, [*args, str(tmp_path / "x"), "--stain", "DAB"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "expected H&E (or he) or H-DAB (or ihc), got 'DAB'" in text, result.output
    assert not (tmp_path / "x").exists()


def test_cli_reports_a_refusal(tmp_path):
    folder = _results(tmp_path, plans=_plans(architecture="my_lab.nets.FancyUNet"))
    result = CliRunner().invoke(app, ["import", "nnunet", str(folder), "--out", str(tmp_path / "m"), "--mpp", "2"])
    assert result.exit_code == 1
    assert "FancyUNet" in result.output and "error" in result.output


CT_PROPERTIES = {
    str(c): {"mean": 150.0 + c, "std": 30.0, "percentile_00_5": 40.0 + c, "percentile_99_5": 230.0 - c}
    for c in range(3)
}


def _nnunet_normalised(rgb: np.ndarray, scheme: str) -> np.ndarray:
    """(B, 3, H, W) float32 as nnU-Net's preprocessing normalises each channel (its classes when installed)."""
    x = rgb.transpose(0, 3, 1, 2).astype(np.float32)
    if importlib.util.find_spec("nnunetv2") is not None:
        from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

        cls = getattr(schemes, scheme)
        return np.stack(
            [np.stack([cls(False, CT_PROPERTIES[str(c)]).run(x[b, c].copy()) for c in range(3)]) for b in range(len(x))]
        )
    if scheme == "RGBTo01Normalization":
        return x / 255.0
    if scheme == "NoNormalization":
        return x
    out = np.empty_like(x)
    for c in range(3):
        p = CT_PROPERTIES[str(c)]
        out[:, c] = (np.clip(x[:, c], p["percentile_00_5"], p["percentile_99_5"]) - p["mean"]) / p["std"]
    return out


@needs_dna
@pytest.mark.parametrize("scheme", ["RGBTo01Normalization", "NoNormalization", "CTNormalization"])
def test_normalisation_is_nnunets(tmp_path, scheme):
    plans = _plans(norm=scheme)
    plans["foreground_intensity_properties_per_channel"] = CT_PROPERTIES
    folder = _results(
        tmp_path, plans=plans, checkpoints={"checkpoint_final.pth": _checkpoint(_network().state_dict(), epoch=1)}
    )
    import_nnunet(folder, tmp_path / "model", mpp=2.0)
    ensemble = Ensemble.load(tmp_path / "model", task="segmentation")
    rgb = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ours = ensemble.normalize(torch.from_numpy(rgb)).numpy()
    np.testing.assert_allclose(ours, _nnunet_normalised(rgb, scheme), rtol=1e-5, atol=1e-5)


def test_without_the_extra_the_error_names_it(monkeypatch):
    import importlib

    from inference.models import nnunet_network

    original = importlib.import_module

    def no_dna(name, *args):
        if name.startswith("dynamic_network_architectures"):
            raise ImportError(f"No module named {name!r}")
        return original(name, *args)

    monkeypatch.setattr(nnunet_network.importlib, "import_module", no_dna)
    kwargs = {"input_channels": 3, "num_classes": 2, "arch_kwargs": {}, "arch_kwargs_requires_import": []}
    with pytest.raises(ModelFileError, match=r"needs the nnunet extra: pip install 'pdl1-bridge\[nnunet\]'"):
        nnunet_network.build_nnunet_network(PLAIN, kwargs)


def _set(plans: dict, path: str, value) -> dict:
    """``plans`` with the entry at a dotted path (within the 2d configuration for ``2d.``) replaced."""
    *parents, last = path.split(".")
    node = plans
    for key in parents:
        node = node["configurations"]["2d"] if key == "2d" else node[key]
    node[last] = value
    return plans


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("configurations", [], r"'configurations' must be an object .*got a list"),
        ("configurations.2d", 3, r"configuration '2d' must be an object .*got 3"),
        ("transpose_forward", "xyz", r"'transpose_forward' must be a list"),
        ("2d.patch_size", ["a", "a"], r"patch_size \['a', 'a'\] of configuration '2d' is not two positive integers"),
        (
            "2d.architecture.arch_kwargs",
            [],
            r"configuration '2d': architecture\.arch_kwargs must be an object .*got a list",
        ),
        (
            "2d.architecture.network_class_name",
            7,
            r"configuration '2d': architecture\.network_class_name must be a string .*got 7",
        ),
        ("2d.normalization_schemes", "RGBTo01Normalization", r"normalization_schemes of configuration '2d' must be"),
    ],
)
def test_plans_of_the_wrong_shape_are_refused_naming_the_entry(tmp_path, path, value, message):
    folder = _results(tmp_path, plans=_set(_plans(), path, value))
    with pytest.raises(ModelFileError, match=rf"plans\.json: {message}.*plan the dataset again"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("transpose_forward", [1, 0, 2], r"transpose_forward \[1, 0, 2\] is not the identity.*pdl1 export nnunet"),
        ("2d.architecture", {}, r"names no architecture.*plan and train with nnU-Net v2\.4 or later"),
        ("2d.inherits_from", "nope", r"inherits from unknown or circular 'nope'; plan the dataset again"),
        ("2d.normalization_schemes", ["RGBTo01Normalization"], r"1 normalization_schemes for 3 .*from one results"),
        ("2d.normalization_schemes", ["CTNormalization"] * 3, r"CTNormalization of channel 0 .*plan the dataset again"),
        # imported, it failed every command with a 75 GiB allocation
        ("2d.patch_size", [100000, 100000], r"patch size \[100000, 100000\] is larger than the 4096 px .*plan the"),
    ],
)
def test_plans_the_sliding_window_cannot_run_are_refused_with_the_fix(tmp_path, path, value, message):
    # Each of these named the problem and no fix.
    folder = _results(tmp_path, plans=_set(_plans(), path, value))
    with pytest.raises(ModelFileError, match=rf"plans\.json: .*{message}"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


def test_plans_without_the_checkpoints_configuration_say_where_to_copy_them_from(tmp_path):
    checkpoints = {"checkpoint_final.pth": _checkpoint({"w": torch.zeros(1)}, epoch=1, configuration="2d_big")}
    folder = _results(tmp_path, config_name="2d_big", checkpoints=checkpoints)
    with pytest.raises(ModelFileError, match=r"no configuration '2d_big'.*copy plans\.json from the results folder"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)


@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_a_json_file_that_is_no_object_is_refused(tmp_path, name):
    folder = _results(tmp_path)
    (folder / name).write_text("[]")
    result = CliRunner().invoke(app, ["import", "nnunet", str(folder), "--out", str(tmp_path / "m"), "--mpp", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), text
    assert f"{name}: expected a JSON object as nnU-Net v2 writes it, got a list" in text


def test_a_layer_name_that_is_no_string_is_refused(tmp_path):
    plans = _set(_plans(), "2d.architecture.arch_kwargs.conv_op", 3)
    folder = _results(tmp_path, plans=plans)
    with pytest.raises(ModelFileError, match=r"plans\.json \(configuration '2d'\): architecture argument conv_op=3"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)


@needs_dna
@pytest.mark.parametrize(
    ("key", "value", "error"),
    [("n_stages", "three", "AssertionError: n_conv_per_stage must have"), ("kernel_sizes", [[3, 3]], "AssertionError")],
)
def test_arguments_the_network_refuses_are_a_model_file_error(tmp_path, key, value, error):
    folder = _results(tmp_path, plans=_set(_plans(), f"2d.architecture.arch_kwargs.{key}", value))
    args = ["import", "nnunet", str(folder), "--out", str(tmp_path / "m"), "--mpp", "2"]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), text
    assert f"plans.json (configuration '2d'): its arch_kwargs do not build a PlainConvUNet ({error}" in text
    assert "plan the dataset again (nnUNetv2_plan_and_preprocess)" in text and not (tmp_path / "m").exists()


def test_cli_reports_a_value_error(tmp_path, monkeypatch):
    import inference

    def refuses(*args, **kwargs):
        raise ValueError("a value the import refuses")

    monkeypatch.setattr(inference, "import_nnunet", refuses)
    result = CliRunner().invoke(app, ["import", "nnunet", str(tmp_path), "--out", str(tmp_path / "m"), "--mpp", "2"])
    assert result.exit_code == 1 and "error: a value the import refuses" in result.output


@needs_dna
@pytest.mark.parametrize(
    "stop", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_cli_import_stopped_while_writing_leaves_no_model_and_no_leftovers(tmp_path, monkeypatch, stop):
    from inference.models import nnunet_import

    net = _network(PLAIN)
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(net.state_dict(), epoch=7)})
    (folder / "fold_1").mkdir()
    torch.save(_checkpoint(net.state_dict(), epoch=9), folder / "fold_1" / "checkpoint_final.pth")
    saved = nnunet_import._save_network

    def second_fails(network, path):
        if path.name != "member_00.safetensors":
            path.write_bytes(b"half a member")
            raise stop
        saved(network, path)

    monkeypatch.setattr(nnunet_import, "_save_network", second_fails)
    models = tmp_path / "models"
    models.mkdir()
    result = CliRunner().invoke(app, ["import", "nnunet", str(folder), "--out", str(models / "m"), "--mpp", "2"])
    assert result.exit_code != 0
    if isinstance(stop, OSError):
        assert "error: No space left on device; the drive is full: free some space" in result.output
    assert list(models.iterdir()) == []


def test_cli_import_refuses_an_out_under_a_file_as_a_usage_error(tmp_path):
    # It said only "[Errno 17] File exists: ..." (the folder beside --out could not be made).
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "model"
    args = ["import", "nnunet", str(tmp_path), "--mpp", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert f"{out}: its folder {tmp_path / 'notes.txt'} is a file; --out names the model folder to write" in text
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@needs_dna
def test_cli_import_refuses_a_non_empty_folder_or_a_file_before_any_work(tmp_path):
    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(_network().state_dict(), epoch=1)})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    args = ["import", "nnunet", str(folder), "--mpp", "2", "--out"]
    result = CliRunner().invoke(app, [*args, str(busy)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{busy}: is not empty;" in text and "choose another --out or empty it" in text
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".busy.*"))
    result = CliRunner().invoke(app, [*args, str(busy / "notes.txt")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "notes.txt: is a file; --out names the model folder" in text
    # An empty folder (made for it beforehand) is filled.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(app, [*args, str(empty)]).exit_code == 0
    assert len(read_manifest(empty).members) == 1


@needs_dna
def test_imported_members_get_the_permissions_of_any_new_file(tmp_path):
    import os

    folder = _results(tmp_path, checkpoints={"checkpoint_final.pth": _checkpoint(_network().state_dict(), epoch=1)})
    import_nnunet(folder, tmp_path / "model", mpp=2.0)
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert set(modes) == {"manifest.json", "member_00.safetensors"}
    assert modes["member_00.safetensors"] == modes["manifest.json"]


@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_a_json_file_cut_short_is_refused_with_the_fix(tmp_path, name):
    """Said only "not valid JSON (Expecting ...)", without what to do."""
    folder = _results(tmp_path)
    (folder / name).write_text("{")
    with pytest.raises(ModelFileError, match=rf"{re.escape(name)}: not valid JSON .*copy it again from the nnU-Net"):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"labels": None}, r"dataset\.json: no 'labels'; nnU-Net v2's dataset\.json names the input channels"),
        ({"channel_names": None}, r"dataset\.json: no 'channel_names'; nnU-Net v2's"),
        ({"labels": {}}, r"dataset\.json: 'labels' is an empty object; nnU-Net v2's"),
        ({"labels": ["background", "positive"]}, r"dataset\.json: 'labels' is a list; nnU-Net v2's"),
        ({"labels": {"0": "background", "1": "positive"}}, r"dataset\.json: nnU-Net v1's format"),
        ({"channel_names": None, "modality": {"0": "RGB"}}, r"dataset\.json: nnU-Net v1's format"),
        # two names of one value: the last one was the positive class, unsaid
        (
            {"labels": {"background": 0, "PD-L1 positive": 1, "x": 1}},
            r"dataset\.json: labels 'PD-L1 positive', 'x' share the value 1; each class has a value of its own",
        ),
    ],
    ids=["no-labels", "no-channel-names", "empty-labels", "labels-a-list", "v1-labels", "v1-modality", "shared-value"],
)
def test_a_dataset_json_without_labels_or_of_nnunet_v1_is_said_as_such(tmp_path, change, said):
    # Was "no 'labels'" with no fix, "0 input channels; the slides give RGB", or, for v1's {"0": "background"},
    # "region-based labels cannot be imported".
    folder = _results(tmp_path)
    dataset = {**DATASET, **change}
    dataset = {k: v for k, v in dataset.items() if v is not None}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelFileError, match=said):
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert not (tmp_path / "model").exists()


def test_a_fold_copied_in_part_is_said_with_the_fix(tmp_path):
    # A fold whose copy had not finished was "fold_1/checkpoint_final.pth: checkpoint not found; ... has []".
    folder = _results(tmp_path)
    shutil.copytree(folder / "fold_0", folder / "fold_2")
    (folder / "fold_1").mkdir()
    with pytest.raises(ModelFileError) as err:
        import_nnunet(folder, tmp_path / "model", mpp=2.0)
    assert str(err.value) == (
        f"{folder / 'fold_1' / 'checkpoint_final.pth'}: checkpoint not found; {folder / 'fold_1'} holds no "
        "checkpoint: its training saved none yet, or the copy of the fold is not finished: copy the fold again "
        "from nnUNet_results, or take the folds that have it with folds=['0', '2']"
    )
    assert not (tmp_path / "model").exists()
    # `pdl1 import nnunet` passes its options' names: --folds is repeated, one fold each ("--folds (0, 2)" read as
    # `--folds 0,2`, which names no fold).
    args = ["import", "nnunet", str(folder), "--mpp", "2", "--out", str(tmp_path / "model")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 1 and text.endswith("or take the folds that have it with --folds 0 --folds 2"), text
    assert not (tmp_path / "model").exists()
