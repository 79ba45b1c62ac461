"""nnU-Net v2 trained-model folders -> model folders of this product (manifest + safetensors).

An nnU-Net v2 results folder (``nnUNet_results/DatasetNNN_NAME/TRAINER__PLANS__CONFIGURATION``)
holds ``plans.json``, ``dataset.json`` and ``fold_K/checkpoint_*.pth``. Each chosen checkpoint
becomes one member: several checkpoints of one cyclic run (nnUNet-B), or one per fold (nnU-Net's
own ensemble). Checkpoints are pickles; they are read with torch's restricted unpickler
(``weights_only=True``), which builds tensors and plain data only, and only their network weights
are kept. What the restricted unpickler refuses is refused, with the file named.

What the manifest records and why:

* ``input_mpp``: nnU-Net stores no unit for 2D RGB images (their spacing is 1 per pixel), so
  the caller states the µm/px the training tiles were cut at.
* ``normalization``: nnU-Net's scheme per channel, as a per-channel ``(x / 255 - mean) / std``
  that the ensemble applies (``RGBTo01Normalization``: mean 0, std 1; ``NoNormalization``: std
  1/255; ``CTNormalization``: clipped to the plans' foreground percentiles, then their mean and
  std). nnU-Net's ``ZScoreNormalization`` and ``RescaleTo01Normalization`` use each image's own
  statistics, which a slide analysed in tiles does not have; they are refused.
* ``tile_size_px``: the configuration's patch size (square; the sliding window's tiles).
* ``class_names`` in label order (the ``ignore`` label is no output) and ``extra.positive_class``.
* ``extra.blend = "nnunet"``: the sliding window blends these members as nnU-Net's predictor does
  (see :mod:`inference.analysis.segment`).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.advice import SettingWords, library_setting
from inference.errors import ModelFileError
from inference.models.manifest import (
    MANIFEST_NAME,
    MAX_TILE_SIZE_PX,
    STAINS,
    Manifest,
    Member,
    give_new_file_mode,
    sha256_file,
    write_manifest,
)
from inference.models.nnunet_network import build_nnunet_network, check_nnunet_architecture
from inference.values import is_finite_number

log = logging.getLogger(__name__)

# nnU-Net's normalisation schemes that are a fixed per-pixel map, as (mean, std) on x / 255.
_FIXED_NORMALIZATION = {
    "RGBTo01Normalization": (0.0, 1.0),
    "NoNormalization": (0.0, 1.0 / 255.0),
}
_CONFIG_DIR = re.compile(r"^(?P<trainer>.+)__(?P<plans>.+)__(?P<configuration>.+)$")
_MEMBER_FILE = "member_{:02d}.safetensors"


def _numpy_scalar_globals() -> list[Any]:
    """What a numpy float or int in a checkpoint's logs unpickles through: a scalar from dtype and bytes.

    nnU-Net's logs hold numpy floats (Dice per class); these are plain numbers, so they are let
    through beside torch's own allow-list. Anything else (a class, a function) is still refused.
    """
    scalar = np.float64(0.0).__reduce__()[0]  # numpy's scalar reconstructor, whatever module holds it
    # numpy 2 names it numpy._core.multiarray.scalar, numpy 1 numpy.core...: checkpoints hold either.
    allowed: list[Any] = [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
    ]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            allowed.append(dtype_cls)
    return allowed


@dataclass(frozen=True)
class NnunetCheckpoint:
    """What is kept of one nnU-Net checkpoint: its network weights and where they came from."""

    path: Path
    weights: dict[str, torch.Tensor]
    trainer: str
    configuration: str
    fold: str
    epoch: int
    learning_rate: float


def load_nnunet_checkpoint(path: str | Path) -> NnunetCheckpoint:
    """Read a ``checkpoint_*.pth`` with torch's restricted unpickler; keep its ``network_weights`` only.

    Raises :class:`ModelFileError` naming the file when it is damaged or no torch file (empty, cut
    short, a zip member failing its CRC: told before anything is unpickled), when the restricted
    unpickler refuses it (a pickle that would build anything but tensors and plain data), or when
    it holds no tensor weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found")
    damaged = _why_not_a_torch_file(path)
    if damaged is not None:
        raise ModelFileError(f"{path}: damaged or not a torch checkpoint: {damaged}; {_COPY_AGAIN}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = _refusal_reason(str(err))
        raise ModelFileError(
            f"{path}: refused: the checkpoint holds more than tensors and plain data, and unpickling it "
            f"could run code ({first}); a checkpoint written by nnU-Net v2's trainer holds only those. "
            "If you trust it, load it in nnU-Net and save its network_weights again"
        ) from err
    # What is left is damage the checks above cannot see (an intact archive of wrong contents, a legacy
    # pickle cut short): torch fails inside its reader with whatever error that part raises.
    except (
        RuntimeError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        ValueError,
        TypeError,
        struct.error,
    ) as err:
        raise ModelFileError(
            f"{path}: damaged or not a torch checkpoint: torch cannot read it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); {_COPY_AGAIN}"
        ) from err
    weights = raw.get("network_weights") if isinstance(raw, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelFileError(
            f"{path}: no network_weights of tensors; expected an nnU-Net v2 checkpoint "
            "(a dict with 'network_weights', 'init_args', 'current_epoch', ...)"
        )
    init_args = raw.get("init_args") if isinstance(raw.get("init_args"), dict) else {}
    lrs = (raw.get("logging") or {}).get("lrs") if isinstance(raw.get("logging"), dict) else None
    epoch = int(raw.get("current_epoch", 0))
    lr = float(lrs[min(epoch, len(lrs)) - 1]) if lrs and epoch > 0 else math.nan
    # DDP training saves the module's own keys, but older checkpoints may carry its prefix.
    clean = {k.removeprefix("module."): v for k, v in weights.items()}
    return NnunetCheckpoint(
        path=path,
        weights=clean,
        trainer=str(raw.get("trainer_name", "")),
        configuration=str(init_args.get("configuration", "")),
        fold=str(init_args.get("fold", "")),
        epoch=epoch,
        learning_rate=lr,
    )


_COPY_AGAIN = "copy it again from the nnU-Net results folder (fold_K/ holds the checkpoints its trainer wrote)"


def _why_not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint at all (empty, cut short, not a zip archive), or None.

    torch saves checkpoints as zip archives whose members carry CRCs: checking them tells a damaged
    file from one the restricted unpickler refuses, and unpickles nothing. A pickle (torch's legacy
    format, before torch 1.6) has no such check and is left to the restricted unpickler.
    """
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":  # the PROTO opcode a pickle starts with
        return None
    if head[:1] in (b"(", b"c", b"]", b"}", b"I", b"N") and _ends_with_stop(path):  # a pickle of protocol 0 or 1
        return (
            "it is a pickle of protocol 0 or 1, which torch never writes; it is refused unread, since unpickling "
            "it could run code"
        )
    if head != b"PK\x03\x04":
        return f"it is not a zip archive, as torch saves checkpoints (its first bytes are {head!r})"
    if not zipfile.is_zipfile(path):
        return f"its zip archive has no end ({size} bytes): the file was cut short"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # torch.save stores every member as it is, to be read in place; torch.load also unpacks a compressed one
            # into what its header claims (a 1 MB re-packed file loaded 1 GB), so one is refused before it is read.
            packed = next((i for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
            bad = None if packed is not None else archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"its zip archive is damaged ({err})"
    if packed is not None:
        return (
            f"its member {packed.filename} is compressed ({packed.compress_size} bytes said to unpack to "
            f"{packed.file_size}), which torch.save never writes: a checkpoint re-packed by another tool, or one made "
            "to fill the memory, refused unread; use the file nnU-Net's trainer wrote"
        )
    if bad is not None:
        return f"its member {bad} fails its CRC check"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "it is a zip archive without the data.pkl torch writes"
    return None


def _ends_with_stop(path: Path) -> bool:
    """Whether the file's last byte is a pickle's STOP opcode (a text file, an HTTP error page saved as the
    checkpoint, starting with the same letters, is not called a pickle)."""
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"."


def _state_dict_mismatch(message: str) -> str:
    """What torch's load_state_dict error says is wrong, short: its first detail line (missing keys, unexpected
    keys, a size mismatch), which its heading line ("Error(s) in loading state_dict for PlainConvUNet:") lacks.

    >>> _state_dict_mismatch('Error(s) in loading state_dict for Net:\\n\\tMissing key(s) in state_dict: "a.w". ')
    'Missing key(s) in state_dict: "a.w".'
    """
    details = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    text = details[0] if details else message.strip()
    return text if len(text) <= 300 else text[:297] + "..."


def _refusal_reason(message: str) -> str:
    """What torch's restricted unpickler would not load, from its long message (``it needs posix.system``).

    Its advice to load with ``weights_only=False`` is left out: that would run what it refused.
    """
    named = re.search(r"GLOBAL ([\w.]+)", message)  # "unsupported GLOBAL posix.system", "GLOBAL __main__.Foo"
    if named:
        return f"it needs {named.group(1)}, which is neither"
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:")[-1].strip().split(". ")[0].rstrip(".")
            if reason:
                return reason
    return "torch's restricted unpickler refused it"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(
            f"{path}: missing; an nnU-Net v2 trained-model folder holds plans.json, dataset.json and fold_*/ "
            "(pass the TRAINER__PLANS__CONFIGURATION folder under nnUNet_results/DatasetNNN_NAME)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{path}: not valid JSON ({err}); the file was damaged (an interrupted copy?): copy it again from the "
            "nnU-Net results folder"
        ) from err
    if not isinstance(data, dict):
        raise ModelFileError(
            f"{path}: expected a JSON object as nnU-Net v2 writes it, got {_json_kind(data)}; "
            "copy the file again from the nnU-Net results folder"
        )
    return data


def _json_kind(value: Any) -> str:
    """What a JSON value is, for messages: ``a list``, ``the string 'three'``."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _expect(value: Any, kind: type, what: str, *, plans_path: Path) -> Any:
    """``value`` if it is a ``kind``; else a :class:`ModelFileError` naming ``what`` in plans.json and the fix."""
    if not isinstance(value, kind):
        expected = {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
        raise ModelFileError(
            f"{plans_path}: {what} must be {expected} (as nnU-Net v2 writes it), got {_json_kind(value)}; "
            "plan the dataset again (nnUNetv2_plan_and_preprocess) or copy plans.json again from the results folder"
        )
    return value


def resolve_configuration(plans: dict[str, Any], name: str, *, plans_path: Path) -> dict[str, Any]:
    """A configuration of ``plans`` with what it ``inherits_from`` merged in, as nnU-Net's PlansManager does."""
    configurations = _expect(plans.get("configurations", {}), dict, "'configurations'", plans_path=plans_path)
    if name not in configurations:
        raise ModelFileError(
            f"{plans_path}: no configuration {name!r}, which the folder or its checkpoints name; it has "
            f"{sorted(configurations)}: copy plans.json from the results folder the checkpoints come from"
        )
    config = dict(_expect(configurations[name], dict, f"configuration {name!r}", plans_path=plans_path))
    seen = {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if not isinstance(parent, str) or parent in seen or parent not in configurations:
            raise ModelFileError(
                f"{plans_path}: configuration {name!r} inherits from unknown or circular {parent!r}; plan the "
                "dataset again (nnUNetv2_plan_and_preprocess) or copy plans.json again from the results folder"
            )
        seen.add(parent)
        config = {**_expect(configurations[parent], dict, f"configuration {parent!r}", plans_path=plans_path), **config}
    return config


def _check_configuration(config: dict[str, Any], name: str, plans: dict[str, Any], *, plans_path: Path) -> None:
    """Refuse what the sliding window cannot run: 3D, non-square patches, transposed axes, unknown networks."""
    patch = _expect(config.get("patch_size", []), list, f"patch_size of configuration {name!r}", plans_path=plans_path)
    if len(patch) == 2 and not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in patch):
        raise ModelFileError(
            f"{plans_path}: patch_size {patch} of configuration {name!r} is not two positive integers; "
            "plan the dataset again (nnUNetv2_plan_and_preprocess)"
        )
    if len(patch) != 2:
        raise ModelFileError(
            f"{plans_path}: configuration {name!r} is {len(patch)}D (patch size {patch}); only 2D "
            "configurations run on slides here: train nnU-Net's '2d' configuration"
        )
    if patch[0] != patch[1]:
        raise ModelFileError(
            f"{plans_path}: patch size {patch} is not square; the sliding window runs square tiles "
            "(set a square patch_size in the plans and train again)"
        )
    if patch[0] > MAX_TILE_SIZE_PX:
        raise ModelFileError(
            f"{plans_path}: patch size {patch} is larger than the {MAX_TILE_SIZE_PX} px a side the sliding window "
            "runs; is plans.json damaged? Copy it again from the results folder, or plan the dataset again"
        )
    transpose = _expect(plans.get("transpose_forward", [0, 1, 2]), list, "'transpose_forward'", plans_path=plans_path)
    if transpose != [0, 1, 2]:
        raise ModelFileError(
            f"{plans_path}: transpose_forward {transpose} is not the identity; tiles are run in the slide's own axis "
            "order: export the dataset with `pdl1 export nnunet` (its spacing keeps the identity), plan and train again"
        )
    arch = config.get("architecture")
    if not isinstance(arch, dict) or "network_class_name" not in arch:
        raise ModelFileError(
            f"{plans_path}: configuration {name!r} names no architecture, which plans of nnU-Net v2.4 and later "
            "do: plan and train with nnU-Net v2.4 or later"
        )
    what = f"configuration {name!r}: architecture"
    check_nnunet_architecture(
        _expect(arch["network_class_name"], str, f"{what}.network_class_name", plans_path=plans_path)
    )
    _expect(arch.get("arch_kwargs", {}), dict, f"{what}.arch_kwargs", plans_path=plans_path)
    imports = _expect(arch.get("_kw_requires_import", []), list, f"{what}._kw_requires_import", plans_path=plans_path)
    for key in imports:
        _expect(key, str, f"each entry of {what}._kw_requires_import", plans_path=plans_path)
    schemes = _expect(
        config.get("normalization_schemes", []),
        list,
        f"normalization_schemes of configuration {name!r}",
        plans_path=plans_path,
    )
    for scheme in schemes:
        _expect(scheme, str, f"each of normalization_schemes of configuration {name!r}", plans_path=plans_path)
    _expect(
        plans.get("foreground_intensity_properties_per_channel", {}),
        dict,
        "'foreground_intensity_properties_per_channel'",
        plans_path=plans_path,
    )


def _normalization(
    schemes: list[str], intensities: dict[str, Any], *, channels: int, plans_path: Path
) -> dict[str, list[float]]:
    """nnU-Net's per-channel schemes as the ensemble's ``(clip(x / 255) - mean) / std``, all on x / 255."""
    if len(schemes) != channels:
        raise ModelFileError(
            f"{plans_path}: {len(schemes)} normalization_schemes for {channels} input channels (dataset.json's "
            "channel_names); the two files are of different datasets: copy both from one results folder"
        )
    mean, std, low, high = [], [], [], []
    for channel, scheme in enumerate(schemes):
        if scheme == "CTNormalization":
            # Clip to the training foreground's 0.5 and 99.5 percentiles, then its mean and std (global numbers).
            props = intensities.get(str(channel))
            if not props:
                raise ModelFileError(
                    f"{plans_path}: CTNormalization of channel {channel} without its "
                    "foreground_intensity_properties_per_channel; plan the dataset again (nnUNetv2_plan_and_preprocess)"
                )
            try:
                numbers = [float(props[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")]
            except (KeyError, TypeError, ValueError) as err:
                raise ModelFileError(
                    f"{plans_path}: foreground_intensity_properties_per_channel[{str(channel)!r}] needs the numbers "
                    f"mean, std, percentile_00_5 and percentile_99_5, got {props!r}; plan the dataset again "
                    "(nnUNetv2_plan_and_preprocess)"
                ) from err
            mean.append(numbers[0] / 255.0)
            std.append(max(numbers[1], 1e-8) / 255.0)
            low.append(numbers[2] / 255.0)
            high.append(numbers[3] / 255.0)
            continue
        low.append(0.0)  # x / 255 of uint8 pixels lies in [0, 1]: no clip
        high.append(1.0)
        if scheme not in _FIXED_NORMALIZATION:
            raise ModelFileError(
                f"{plans_path}: normalization {scheme!r} cannot be imported: it normalises each image by its own "
                "statistics, which a slide analysed tile by tile does not have; name the channels 'rgb_to_0_1' "
                "in dataset.json (RGBTo01Normalization, what `pdl1 export nnunet` writes) and train again"
            )
        m, s = _FIXED_NORMALIZATION[scheme]
        mean.append(m)
        std.append(s)
    if "CTNormalization" in schemes:
        return {"mean": mean, "std": std, "clip_min": low, "clip_max": high}
    return {"mean": mean, "std": std}


_V2_DATASET = (
    'nnU-Net v2\'s dataset.json names the input channels ("channel_names": {"0": "R", ...}) and maps each '
    'class name to its label ("labels": {"background": 0, "PD-L1 positive": 1})'
)


def _check_dataset_format(dataset: dict[str, Any], *, dataset_path: Path) -> None:
    """Refuse a dataset.json of nnU-Net v1, or one without the keys read here, by what it is: it was said as
    "0 input channels" (no channel_names), "no 'labels'", or "region-based labels" (v1's {"0": "background"})."""
    labels = dataset.get("labels")
    v1_labels = isinstance(labels, dict) and labels and all(isinstance(v, str) for v in labels.values())
    if ("modality" in dataset and "channel_names" not in dataset) or v1_labels:
        raise ModelFileError(
            f'{dataset_path}: nnU-Net v1\'s format ("modality", labels as value → name); this imports nnU-Net v2 '
            f"trained models, and {_V2_DATASET}: give the results folder of a model trained with nnU-Net v2 (it "
            "holds the dataset.json v2 wrote)"
        )
    for key in ("channel_names", "labels"):
        if key not in dataset:
            raise ModelFileError(
                f"{dataset_path}: no {key!r}; {_V2_DATASET}: the file is not the one nnU-Net v2 wrote, or was "
                "damaged: copy it again from the nnU-Net results folder"
            )
    if not isinstance(labels, dict) or not labels:
        kind = "an empty object" if labels == {} else _json_kind(labels)
        raise ModelFileError(
            f"{dataset_path}: 'labels' is {kind}; {_V2_DATASET}: copy the file again from the nnU-Net results folder"
        )


def _labels(dataset: dict[str, Any], *, dataset_path: Path) -> list[str]:
    """Output class names in label order; nnU-Net's ``ignore`` label is not an output."""
    _check_dataset_format(dataset, dataset_path=dataset_path)
    labels = dataset["labels"]
    if dataset.get("regions_class_order") is not None or any(not isinstance(v, int) for v in labels.values()):
        raise ModelFileError(
            f"{dataset_path}: region-based labels cannot be imported; the ensemble needs one softmax over classes"
        )
    by_value = {v: k for k, v in labels.items() if k != "ignore"}
    if len(by_value) != sum(k != "ignore" for k in labels):  # two names of one value: the last one won unsaid
        shared = sorted({v for k, v in labels.items() if k != "ignore" and list(labels.values()).count(v) > 1})
        names = [k for k, v in labels.items() if v == shared[0]]
        raise ModelFileError(
            f"{dataset_path}: labels {', '.join(map(repr, names))} share the value {shared[0]}; each class has a "
            "value of its own: copy dataset.json again from the results folder"
        )
    if sorted(by_value) != list(range(len(by_value))):
        raise ModelFileError(f"{dataset_path}: labels {labels} are not consecutive from 0")
    return [by_value[i] for i in range(len(by_value))]


def _choose_checkpoints(
    folder: Path, *, folds: list[str] | None, checkpoints: list[str], setting: SettingWords
) -> list[Path]:
    for given, what in ((folds or [], "folds"), (checkpoints, "checkpoints")):
        twice = sorted({g for g in given if given.count(g) > 1})
        if twice:  # each would be a member: identical members understate the ensemble's disagreement
            raise ModelFileError(
                f"{setting(what)} names {', '.join(twice)} more than once; each becomes a member, and identical "
                f"members understate the ensemble's uncertainty: name each once"
            )
    fold_dirs = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    if folds:
        wanted = [folder / f"fold_{f}" for f in folds]
        missing = [p for p in wanted if not p.is_dir()]
        if missing:
            raise ModelFileError(f"{missing[0]}: no such fold; {folder} has {[p.name for p in fold_dirs]}")
        fold_dirs = wanted
    if not fold_dirs:
        raise ModelFileError(f"{folder}: no fold_* folders; is this an nnU-Net v2 trained-model folder?")
    paths = []
    for fold_dir in fold_dirs:
        for name in checkpoints:
            path = fold_dir / name
            if not path.is_file():
                raise ModelFileError(
                    f"{path}: checkpoint not found; {_missing_checkpoint_fix(fold_dir, fold_dirs, name, setting)}"
                )
            paths.append(path)
    return paths


def _missing_checkpoint_fix(fold_dir: Path, fold_dirs: list[Path], name: str, setting: SettingWords) -> str:
    """What a fold without checkpoint ``name`` holds, and the fix (the settings in ``setting``'s words): it was
    "has []" for a fold copied in part."""
    have = sorted(p.name for p in fold_dir.glob("*.pth"))
    complete = [f.name.removeprefix("fold_") for f in fold_dirs if (f / name).is_file()]
    others = f"take the folds that have it with {setting('folds', complete)}" if complete else ""
    if not have:
        return (
            f"{fold_dir} holds no checkpoint: its training saved none yet, or the copy of the fold is not finished: "
            f"copy the fold again from nnUNet_results{', or ' + others if others else ''}"
        )
    return (
        f"{fold_dir} has {have}: name one of those with {setting('checkpoints')}, or let its training finish "
        f"(nnU-Net writes checkpoint_final.pth at the end){', or ' + others if others else ''}"
    )


def imported_stain(
    given: str | None, dataset: dict, *, dataset_path: Path, setting: SettingWords = library_setting
) -> str:
    """The stain an imported model states: ``given``, else the one ``pdl1 export nnunet`` recorded in the dataset
    (``pdl1_stain``), else H&E; a given stain the recorded one contradicts is refused (the model would run on the
    other stain).

    >>> imported_stain(None, {"pdl1_stain": "H-DAB"}, dataset_path=Path("dataset.json"))
    'H-DAB'
    >>> imported_stain(None, {}, dataset_path=Path("dataset.json")), imported_stain("H-DAB", {}, dataset_path=Path("d"))
    ('H&E', 'H-DAB')
    """
    exported = dataset.get("pdl1_stain")  # `pdl1 export nnunet` records the stain of its images
    if exported in STAINS and given not in (None, exported):
        raise ModelFileError(
            f"{dataset_path}: the dataset was exported by pdl1 from {exported} images, but "
            f"{setting('stain', given)} was given; the model would be run on the other stain: give "
            f"{setting('stain', exported)}, or leave it out"
        )
    return given or (exported if exported in STAINS else "H&E")


def import_nnunet(
    results_folder: str | Path,
    out_dir: str | Path,
    *,
    mpp: float,
    checkpoints: list[str] | None = None,
    folds: list[str] | None = None,
    positive_label: str | None = None,
    name: str | None = None,
    stain: str | None = None,
    write_into: str | Path | None = None,
    setting: SettingWords = library_setting,
) -> Manifest:
    """Import an nnU-Net v2 2D trained-model folder as a segmentation model folder; return its manifest.

    Parameters
    ----------
    results_folder
        ``nnUNet_results/DatasetNNN_NAME/TRAINER__PLANS__CONFIGURATION``.
    out_dir
        The model folder to write (manifest + one safetensors file per member).
    mpp
        µm per pixel of the images the model was trained on (nnU-Net keeps no unit for 2D images).
    checkpoints
        Checkpoint file names taken from every chosen fold (default ``checkpoint_final.pth``).
    folds
        Folds to take (default all ``fold_*``).
    positive_label
        The label of the PD-L1 positive class (default: the one label besides ``background`` when
        there are two classes).
    name
        The model's name in its manifest (default: the dataset's name).
    stain
        The stain of the images it was trained on, one of :data:`STAINS` (else :class:`ModelFileError`): it runs
        on no other. None: the one ``pdl1 export nnunet`` recorded in the dataset (``pdl1_stain``), else H&E; one
        given that the dataset contradicts is refused.
    write_into
        An empty folder to write the model into instead of ``out_dir`` itself, which the caller then renames
        onto ``out_dir`` (``pdl1 import nnunet`` does, so that an interrupted import leaves no half a model);
        ``out_dir`` must then be new or empty. Checked and named as ``out_dir`` all the same.
    setting
        How the caller's user names these arguments, for the advice of the messages (default: their names here;
        ``pdl1 import nnunet`` passes its options, ``--out`` for ``out_dir``).
    """
    folder = Path(results_folder)
    out = Path(out_dir)
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ModelFileError(
            f"{setting('mpp')} must be the training images' µm per pixel (a positive number), got {mpp!r}; "
            "nnU-Net keeps no unit for 2D images"
        )
    if stain is not None and stain not in STAINS:
        raise ModelFileError(f"stain {stain!r} is not one of {STAINS}")
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise ModelFileError(f"{folder}: {what}; pass nnUNet_results/DatasetNNN_NAME/TRAINER__PLANS__CONFIG")
    if out.exists() and not out.is_dir():
        raise ModelFileError(
            f"{out}: is a file; {setting('out_dir')} names the model folder to write: choose a new folder"
        )
    if (out / MANIFEST_NAME).exists():
        raise ModelFileError(
            f"{out}: already holds a model ({MANIFEST_NAME}); choose another {setting('out_dir')} or remove it"
        )
    if write_into is not None and out.is_dir() and any(out.iterdir()):
        raise ModelFileError(
            f"{out}: is not empty; the model is written beside it and renamed onto it whole, which needs a new or "
            f"empty folder: choose another {setting('out_dir')} or empty it"
        )
    plans_path, dataset_path = folder / "plans.json", folder / "dataset.json"
    plans, dataset = _read_json(plans_path), _read_json(dataset_path)
    _check_dataset_format(dataset, dataset_path=dataset_path)  # before minutes of loading checkpoints
    stain = imported_stain(stain, dataset, dataset_path=dataset_path, setting=setting)
    exported_mpp = dataset.get("pdl1_mpp")  # `pdl1 export nnunet` records the µm/px its cases are at
    if is_finite_number(exported_mpp) and not math.isclose(float(exported_mpp), float(mpp), rel_tol=1e-6):
        raise ModelFileError(
            f"{dataset_path}: the dataset was exported by pdl1 at {exported_mpp:g} µm/px, but "
            f"{setting('mpp', mpp)} was given; the model would run at {mpp / exported_mpp:g}x its training scale: "
            f"give {setting('mpp', exported_mpp)}"
        )
    paths = _choose_checkpoints(
        folder, folds=folds, checkpoints=checkpoints or ["checkpoint_final.pth"], setting=setting
    )
    # nnU-Net names the folder TRAINER__PLANS__CONFIGURATION; a renamed folder is told by its checkpoints.
    parsed = _CONFIG_DIR.match(folder.name)
    configurations = _expect(plans.get("configurations", {}), dict, "'configurations'", plans_path=plans_path)
    if parsed and parsed["configuration"] in configurations:
        configuration = parsed["configuration"]
        config = resolve_configuration(plans, configuration, plans_path=plans_path)
        _check_configuration(config, configuration, plans, plans_path=plans_path)
        loaded = [load_nnunet_checkpoint(p) for p in paths]
    else:
        loaded = [load_nnunet_checkpoint(p) for p in paths]
        configuration = loaded[0].configuration
        config = resolve_configuration(plans, configuration, plans_path=plans_path)
        _check_configuration(config, configuration, plans, plans_path=plans_path)
    if any(c.configuration and c.configuration != configuration for c in loaded):
        raise ModelFileError(
            f"{folder}: checkpoints of configuration {sorted({c.configuration for c in loaded})}, the folder is "
            f"{configuration!r}; one ensemble is of one configuration"
        )
    patch = list(config["patch_size"])
    arch = config["architecture"]
    architecture = arch["network_class_name"]
    channels = len(dataset.get("channel_names", {}))
    if channels != 3:
        raise ModelFileError(f"{dataset_path}: {channels} input channels; the slides give RGB (3 channels)")
    normalization = _normalization(
        config.get("normalization_schemes", []),
        plans.get("foreground_intensity_properties_per_channel", {}),
        channels=channels,
        plans_path=plans_path,
    )
    class_names = _labels(dataset, dataset_path=dataset_path)
    if positive_label is None:
        others = [c for c in class_names if c != "background"]
        if len(class_names) != 2 or len(others) != 1:
            raise ModelFileError(
                f"{dataset_path}: classes {class_names}: name the positive one with {setting('positive_label')}"
            )
        positive_label = others[0]
    if positive_label not in class_names:
        raise ModelFileError(f"positive label {positive_label!r} is not one of {dataset_path}'s classes {class_names}")

    kwargs = {
        "input_channels": channels,
        "num_classes": len(class_names),
        "arch_kwargs": arch.get("arch_kwargs", {}),
        "arch_kwargs_requires_import": list(arch.get("_kw_requires_import", [])),
    }
    # Every member is checked before anything is written: a refusal leaves no half-written model folder.
    networks = []
    for ckpt in loaded:
        # nnU-Net's segmentation heads (decoder.seg_layers.N) output one channel per class: another count means a
        # dataset.json of another dataset, which torch's size mismatch of a seg layer did not say.
        heads = {int(v.shape[0]) for k, v in ckpt.weights.items() if ".seg_layers." in k and k.endswith(".weight")}
        if heads and heads != {len(class_names)}:
            raise ModelFileError(
                f"{dataset_path}: names {len(class_names)} classes ({', '.join(class_names)}), but {ckpt.path} "
                f"outputs {', '.join(map(str, sorted(heads)))}; is dataset.json another dataset's? Copy it again from "
                "the results folder the checkpoints came from"
            )
        network = build_nnunet_network(architecture, kwargs, given_in=f"{plans_path} (configuration {configuration!r})")
        try:
            network.load_state_dict(ckpt.weights, strict=True)
        except RuntimeError as err:
            raise ModelFileError(
                f"{ckpt.path}: weights do not fit {plans_path}'s {architecture.rsplit('.', 1)[-1]}: "
                f"{_state_dict_mismatch(str(err))}"
            ) from err
        networks.append(network)
    target = out if write_into is None else Path(write_into)
    target.mkdir(parents=True, exist_ok=True)
    members, provenance = [], []
    for i, (ckpt, network) in enumerate(zip(loaded, networks, strict=True)):
        file = _MEMBER_FILE.format(i)
        _save_network(network, target / file)
        # The fold is the folder's (what folds chose; nnU-Net names them fold_K, K a number or "all").
        fold_name = ckpt.path.parent.name.removeprefix("fold_")
        fold = int(fold_name) if fold_name.isdigit() else 0
        members.append(
            Member(
                file=file,
                sha256=sha256_file(target / file),
                cycle=0,
                epoch=ckpt.epoch,
                learning_rate=ckpt.learning_rate if math.isfinite(ckpt.learning_rate) else 0.0,
                chain=fold,
            )
        )
        provenance.append(
            {
                "file": file,
                "checkpoint": str(ckpt.path.relative_to(folder)),
                "checkpoint_sha256": sha256_file(ckpt.path),
                "fold": fold_name,
                "epoch": ckpt.epoch,
                "learning_rate": ckpt.learning_rate if math.isfinite(ckpt.learning_rate) else None,
                "trainer": ckpt.trainer,
            }
        )
    manifest = Manifest(
        name=name or str(dataset.get("name") or plans.get("dataset_name") or folder.parent.name),
        version=f"nnunet-{configuration}",
        task="segmentation",
        architecture=architecture,
        architecture_kwargs=kwargs,
        input_mpp=float(mpp),
        tile_size_px=int(patch[0]),
        normalization=normalization,
        class_names=class_names,
        members=members,
        # Uncalibrated: argmax for two classes; `pdl1 calibrate` sets SUA's numbers on validation slides.
        thresholds={"segmentation": 0.5},
        training={
            "source": "nnU-Net v2",
            "nnunetv2_version": _installed_version("nnunetv2"),
            "results_folder": str(folder.resolve()),
            "dataset_name": plans.get("dataset_name"),
            "plans_identifier": plans.get("plans_name"),
            "configuration": configuration,
            "trainer": loaded[0].trainer or (parsed["trainer"] if parsed else ""),
            "normalization_schemes": config.get("normalization_schemes"),
            "patch_size": patch,
            "spacing": config.get("spacing"),
            "members": provenance,
        },
        # Tiles are blended as nnU-Net's predictor blends them (each member's logits, its Gaussian).
        extra={
            "positive_class": class_names.index(positive_label),
            "positive_label": positive_label,
            "blend": "nnunet",
        },
        stain=stain,
    )
    write_manifest(target, manifest)
    log.info("imported %d nnU-Net checkpoints from %s into %s", len(members), folder, out)
    return manifest


def _installed_version(package: str) -> str:
    """nnU-Net writes no version into its results; record the one installed where the import ran."""
    try:
        return f"{metadata.version(package)} (installed where imported)"
    except metadata.PackageNotFoundError:
        return "not recorded by nnU-Net; not installed where imported"


def _save_network(network: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    # save_model keeps one name of tensors nnU-Net's blocks hold twice (``conv`` and ``all_modules.0``).
    tmp = path.with_suffix(".safetensors.part")
    save_model(network, str(tmp))
    give_new_file_mode(tmp)
    tmp.replace(path)
