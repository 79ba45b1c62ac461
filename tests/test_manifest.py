import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from inference.errors import ModelFileError
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.models.manifest import Manifest, Member, read_manifest, sha256_file, write_manifest
from inference.models.unet import PlainConvUNet
from inference.training.cyclic import save_member as _save_member
from inference.training.train_seg import NORMALIZATION

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"in_channels": 3, "n_classes": 2, "features": [4, 8], "n_conv_per_stage": 1}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    members = []
    for i in range(2):
        name, digest = _save_member(tmp_path, PlainConvUNet(features=(4, 8), n_conv_per_stage=1), i)
        members.append(Member(name, digest, cycle=i + 1, epoch=i, learning_rate=1e-5))
    write_manifest(
        tmp_path,
        Manifest(
            name="t",
            version="1",
            task="segmentation",
            architecture="PlainConvUNet",
            architecture_kwargs=KWARGS,
            input_mpp=2.0,
            tile_size_px=64,
            normalization=NORMALIZATION,
            class_names=["bg", "pos"],
            members=members,
            thresholds={"segmentation": 0.5},
        ),
    )
    return tmp_path


def _edit_manifest(folder: Path, **changes) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(changes)
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_loads_and_verifies(model_dir):
    ens = Ensemble.load(model_dir, task="segmentation")
    assert len(ens.members) == 2
    assert ens.manifest.members[1].cycle == 2
    assert all(p.dtype == torch.float32 for p in ens.members[0].parameters())


def test_checksum_mismatch_names_the_file(model_dir):
    member = model_dir / "member_01.safetensors"
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"member_01\.safetensors: sha256 .* does not match"):
        Ensemble.load(model_dir, task="segmentation")


def test_missing_member(model_dir):
    (model_dir / "member_00.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"member_00\.safetensors: member listed in .* is missing"):
        read_manifest(model_dir)


def test_wrong_architecture_names_the_file(model_dir):
    _edit_manifest(model_dir, architecture_kwargs={**KWARGS, "features": [8, 16]})
    with pytest.raises(ModelFileError, match=r"member_00\.safetensors: weights do not fit PlainConvUNet") as err:
        Ensemble.load(model_dir, task="segmentation")
    # torch's first concrete complaint (a key or a shape) is kept, not only its header line.
    assert "Error(s) in loading state_dict for PlainConvUNet: size mismatch for " in str(err.value)
    assert "copy the whole folder again, or retrain" in str(err.value)


def test_an_architecture_far_larger_than_its_weights_is_refused_before_it_is_built(model_dir, monkeypatch):
    # A crafted manifest's widths (features [8, 16, 32, 40000]) had 57.6 GB allocated before its weights were compared.
    import inference.models.ensemble as ensemble_module

    _edit_manifest(model_dir, architecture_kwargs={**KWARGS, "features": [8, 16, 32, 40000]})
    monkeypatch.setattr(ensemble_module, "_BUILT_BEFORE_COMPARED", 10_000)  # this fixture's models are tiny
    real_build = ensemble_module.build_model
    calls = []

    def counting_build(*args):
        calls.append(str(torch.get_default_device()))
        return real_build(*args)

    monkeypatch.setattr(ensemble_module, "build_model", counting_build)
    with pytest.raises(
        ModelFileError,
        match=r"member_00\.safetensors: weights do not fit PlainConvUNet .* the "
        r"architecture holds [\d,]+ values, the member file [\d,]+; .*copy the whole folder again",
    ):
        Ensemble.load(model_dir, task="segmentation")
    assert calls == ["meta"]  # counted on the meta device, never built for real


def test_unknown_architecture(model_dir):
    _edit_manifest(model_dir, architecture="ResNet9000")
    with pytest.raises(ModelFileError, match=r"ResNet9000.*cannot be built.*builds PlainConvUNet, DilatedResFCN"):
        Ensemble.load(model_dir, task="segmentation")


@pytest.mark.parametrize(
    "file",
    [
        "../member_00.safetensors",
        "/etc/passwd",
        "chain_0/../../x.safetensors",
        "",
        # out of the folder on Windows, one name here
        "..\\member_00.safetensors",
        "C:/x.safetensors",
        "C:x.safetensors",
        "\\\\server\\share\\x.safetensors",
    ],
)
def test_a_member_outside_the_model_folder_is_refused(model_dir, file):
    raw = json.loads((model_dir / "manifest.json").read_text())
    _edit_manifest(model_dir, members=[{**raw["members"][0], "file": file}, raw["members"][1]])
    with pytest.raises(ModelFileError, match="not a path inside the model folder"):
        read_manifest(model_dir, verify=False)


def test_a_manifest_from_before_chains_reads_as_chain_0(model_dir):
    raw = json.loads((model_dir / "manifest.json").read_text())
    _edit_manifest(model_dir, members=[{k: v for k, v in m.items() if k != "chain"} for m in raw["members"]])
    assert [m.chain for m in read_manifest(model_dir).members] == [0, 0]


def test_a_manifest_states_its_stain_and_one_from_before_was_h_and_e(model_dir):
    raw = json.loads((model_dir / "manifest.json").read_text())
    assert read_manifest(model_dir).stain == "H&E"
    raw.pop("stain", None)
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(model_dir).stain == "H&E"  # every model before the field was trained on H&E
    raw["stain"] = "IHC"
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match=r"stain 'IHC' is not one a model can be trained on here"):
        read_manifest(model_dir)


def test_the_shipped_demo_models_state_h_and_e():
    assert {read_manifest(demo_model_dir(k), verify=False).stain for k in ("seg", "nuclei")} == {"H&E"}


def test_wrong_task(model_dir):
    said = r"is an H&E segmentation model, but a nuclei model is needed here; give a nuclei model's folder, or"
    with pytest.raises(ModelFileError, match=said):
        read_manifest(model_dir, task="nuclei")


def test_no_manifest(tmp_path):
    with pytest.raises(ModelFileError, match="no model manifest"):
        read_manifest(tmp_path)
    # The command that trains one, by the task asked for: `pdl1 train` alone is refused (it needs seg or nuclei).
    for task, train in (
        ("segmentation", "`pdl1 train seg`,"),
        ("nuclei", "`pdl1 train nuclei`,"),
        (None, "`pdl1 train seg` or `pdl1 train nuclei`,"),
    ):
        with pytest.raises(ModelFileError, match=re.escape(f"(train one with {train} or leave the model option out")):
            read_manifest(tmp_path, task=task)
    with pytest.raises(ModelFileError, match="no such model folder"):
        read_manifest(tmp_path / "nope")


def test_a_file_given_for_the_model_folder_says_so(tmp_path, model_dir):
    # It said "slide.svs/manifest.json: no model manifest", a path that cannot exist.
    (tmp_path / "slide.svs").write_text("x")
    with pytest.raises(ModelFileError) as err:
        read_manifest(tmp_path / "slide.svs")
    assert str(err.value) == (
        f"{tmp_path / 'slide.svs'} is a file, not a model folder; give the folder that holds manifest.json and its "
        "members' .safetensors files, or leave the model option out to use the shipped demo"
    )
    member = next(model_dir.glob("*.safetensors"))
    with pytest.raises(ModelFileError, match=rf"is a file, not a model folder; give its folder {model_dir}, if that"):
        read_manifest(member)


def test_the_manifest_itself_may_be_named_for_its_folder(model_dir):
    assert read_manifest(model_dir / "manifest.json") == read_manifest(model_dir)


def test_malformed_manifest(model_dir):
    (model_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_manifest(model_dir)


def test_manifest_missing_keys(model_dir):
    raw = json.loads((model_dir / "manifest.json").read_text())
    del raw["input_mpp"]
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="lacks input_mpp"):
        read_manifest(model_dir)


def test_a_pickle_is_refused_even_with_the_right_checksum(model_dir):
    member = model_dir / "member_00.safetensors"
    torch.save(PlainConvUNet(features=(4, 8), n_conv_per_stage=1).state_dict(), member)
    _edit_manifest(
        model_dir,
        members=[
            {**m, "sha256": sha256_file(model_dir / m["file"])}
            for m in json.loads((model_dir / "manifest.json").read_text())["members"]
        ],
    )
    with pytest.raises(ModelFileError, match=r"member_00\.safetensors"):
        Ensemble.load(model_dir, task="segmentation")


# The one place a pickle is read: nnU-Net checkpoints, through torch's restricted unpickler (issue #34).
RESTRICTED_LOADER = ROOT / "inference" / "models" / "nnunet_import.py"


def test_no_pickle_loading_anywhere_in_the_code():
    for path in [*ROOT.joinpath("inference").rglob("*.py"), *ROOT.joinpath("bridge").rglob("*.py")]:
        text = path.read_text()
        if path == RESTRICTED_LOADER:
            calls = re.findall(r"torch\.load\(([^)]*)\)", text)
            assert calls and all("weights_only=True" in call for call in calls), path
            continue
        assert "torch.load(" not in text and "import pickle" not in text, path


def test_thresholds_are_updated_without_touching_members(model_dir):
    m = read_manifest(model_dir)
    m2 = m.with_thresholds(sua_threshold=0.3)
    assert m2.thresholds == {"segmentation": 0.5, "sua_threshold": 0.3}
    assert m2.members == m.members and dataclasses.is_dataclass(m2)


def test_shipped_demo_ensemble():
    folder = demo_model_dir("seg")
    manifest = read_manifest(folder, task="segmentation", verify=True)
    assert len(manifest.members) >= 4
    assert manifest.architecture == "PlainConvUNet"
    assert {m.cycle for m in manifest.members} == set(range(1, len(manifest.members) + 1))
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mb < 5
    assert manifest.training["data"], "the manifest summarises its training data"


def test_the_shipped_demo_models_are_known_by_checksum():
    from inference import demo_model_checksums, demo_model_dir
    from inference.models.manifest import read_manifest

    checksums = demo_model_checksums()
    assert set(checksums) == {"seg", "nuclei", "nuclei-ihc"}
    for kind, checksum in checksums.items():
        assert checksum == read_manifest(demo_model_dir(kind)).checksum


def test_model_members_get_the_permissions_of_any_new_file(tmp_path):
    # safetensors writes owner-only files; a model on a shared drive must be readable as the umask allows.
    import os

    import torch

    from inference.training.cyclic import save_member

    (tmp_path / "new").touch()
    expected = os.stat(tmp_path / "new").st_mode & 0o777
    os.chmod(tmp_path / "new", 0o600)
    name, _ = save_member(tmp_path, torch.nn.Linear(2, 1), 0)
    assert os.stat(tmp_path / name).st_mode & 0o777 == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member_00.safetensors", "new"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"thresholds": {"segmentation": "0.5"}}, r"threshold 'segmentation' must be a finite number, got '0\.5'"),
        ({"thresholds": {"sua_threshold": None}}, "threshold 'sua_threshold' must be a finite number, got None"),
        ({"thresholds": [0.5]}, "thresholds must be an object"),
        ({"input_mpp": "1.0"}, "input_mpp must be a positive number"),
        ({"input_mpp": 0}, "input_mpp must be a positive number"),
        ({"tile_size_px": 256.5}, "tile_size_px must be a whole number from 1 to 4096"),
        ({"tile_size_px": 100000}, r"tile_size_px must be a whole number from 1 to 4096, got 100000"),
        ({"class_names": "background, PD-L1 positive"}, "class_names must be a list of names"),
        ({"members": [{"file": "member_00.safetensors", "sha256": 12}]}, "each with 'file' and 'sha256' as text"),
        ({"format_version": "2"}, "format_version must be a whole number, got '2'"),
        ({"format_version": 99}, "format_version 99 is newer .*: update pdl1-bridge"),
    ],
)
def test_a_manifest_value_of_the_wrong_type_names_it(model_dir, changes, match):
    # A threshold edited to "0.5" (quoted) failed every image at analysis with numpy's "ufunc 'greater_equal' did
    # not contain a loop with signature matching types"; a format_version "2" with a TypeError traceback.
    _edit_manifest(model_dir, **changes)
    with pytest.raises(ModelFileError, match=match):
        read_manifest(model_dir, verify=False)


def test_a_manifest_that_is_not_an_object_says_so(model_dir):
    (model_dir / "manifest.json").write_text("7")
    with pytest.raises(ModelFileError, match="a manifest is a JSON object of name: value, got int"):
        read_manifest(model_dir)


def test_write_manifest_replaces_whole_and_leaves_nothing_after_an_interrupt(model_dir, monkeypatch):
    """Another writer's temporary file is not this one's, and Ctrl-C mid-write leaves the old manifest alone."""
    before = (model_dir / "manifest.json").read_bytes()
    theirs = model_dir / "manifest.json.part"  # the fixed name every writer shared
    theirs.write_text("another writer, half way")
    manifest = read_manifest(model_dir)
    write_manifest(model_dir, manifest.with_thresholds(segmentation=0.6))
    assert theirs.read_text() == "another writer, half way"
    assert read_manifest(model_dir).thresholds["segmentation"] == 0.6
    theirs.unlink()

    (model_dir / "manifest.json").write_bytes(before)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "to_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(model_dir, manifest.with_thresholds(segmentation=0.7))
    assert (model_dir / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir() if "manifest" in p.name) == ["manifest.json"]
