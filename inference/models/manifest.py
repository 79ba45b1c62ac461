"""Model folders: a ``manifest.json`` plus one safetensors file per member, checked by sha256.

No pickle anywhere: ``torch.load`` of an untrusted file is code execution, safetensors is not.
The manifest carries what inference needs to use the weights correctly (architecture,
input MPP, tile size, normalisation, class names, thresholds) and where they came from.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from inference.atomic import write_text_whole
from inference.errors import ModelFileError
from inference.values import is_finite_number

MANIFEST_NAME = "manifest.json"
# The stains a model can be trained on, as QuPath names brightfield image types: H&E, and the
# haematoxylin-DAB of an immunostain (PD-L1 IHC).
STAINS = ("H&E", "H-DAB")
FORMAT_VERSION = 1
# How overlapping tiles are blended (Manifest.blend).
BLENDS = ("probabilities", "nnunet")


# The largest tile a model may run on (px a side): one 4096 px tile's Gaussian weights and three channels are 270 MB;
# a plans.json's patch_size of 100000 asked the sliding window for 75 GiB and failed every command with a traceback.
MAX_TILE_SIZE_PX = 4096


@dataclass(frozen=True)
class Member:
    """One ensemble member: its weight file, checksum and provenance.

    ``file`` is relative to the model folder (``chain_1/member_00.safetensors`` when several
    training chains were pooled); ``chain`` is the chain it came from (0 for a single run).
    """

    file: str
    sha256: str
    cycle: int
    epoch: int
    learning_rate: float
    chain: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a model folder holds.

    ``task`` is ``"segmentation"`` or ``"nuclei"``; ``thresholds`` holds the calibrated numbers
    (``segmentation``; SUA's ``sua_lower``, ``sua_upper``, ``sua_threshold``, ...). ``stain`` is the
    stain of the images it was trained on (:data:`STAINS`); a model runs on no other. Manifests
    written before the field existed were all trained on H&E phantoms, which is its default.
    """

    name: str
    version: str
    task: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    input_mpp: float
    tile_size_px: int
    normalization: dict[str, list[float]]
    class_names: list[str]
    members: list[Member]
    thresholds: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    stain: str = "H&E"
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def with_thresholds(self, **thresholds: float) -> Manifest:
        return replace(self, thresholds={**self.thresholds, **thresholds})

    @property
    def positive_class(self) -> int:
        """Index of the PD-L1 positive class among the outputs: ``extra["positive_class"]``, else 1.

        The product's own models put it at 1; an imported nnU-Net model records its label there.
        """
        return int(self.extra.get("positive_class", 1))

    @property
    def blend(self) -> str:
        """How the sliding window blends overlapping tiles: ``extra["blend"]``, else ``"probabilities"``.

        ``"probabilities"``: the ensemble statistics of each tile are blended (this product's
        models). ``"nnunet"``: each member's logits are blended with nnU-Net's Gaussian and the
        softmax taken after, as nnU-Net's predictor does (imported nnU-Net models).
        """
        return str(self.extra.get("blend", "probabilities"))

    @property
    def checksum(self) -> str:
        """sha256 over the members' checksums: one id for the whole ensemble."""
        return hashlib.sha256("".join(m.sha256 for m in self.members).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def give_new_file_mode(path: Path) -> None:
    """Give ``path`` the permissions a file made here gets (the umask's), as every other file this product writes.

    safetensors (0.8) writes its files readable by their owner only: a model trained or imported on a shared
    drive would lock colleagues (and a service running as another user) out of its members.
    """
    probe = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    with open(probe, "x"):
        pass
    try:
        shutil.copymode(probe, path)
    finally:
        probe.unlink()


_REQUIRED = (
    "name",
    "version",
    "task",
    "architecture",
    "architecture_kwargs",
    "input_mpp",
    "tile_size_px",
    "normalization",
    "class_names",
    "members",
)


# A stain as model messages name it: QuPath's word, and what the slides are.
_STAIN_WORDS = {"H&E": "H&E", "H-DAB": "H-DAB (PD-L1 IHC)"}


def model_kind(task: str, stain: str | None = None) -> str:
    """A model's task and stain as messages name them, with its article.

    >>> model_kind("segmentation", "H&E")
    'an H&E segmentation model'
    >>> model_kind("nuclei", "H-DAB")
    'an H-DAB (PD-L1 IHC) nuclei model'
    >>> model_kind("nuclei")
    'a nuclei model'
    """
    words = f"{_STAIN_WORDS.get(stain, stain)} {task}" if stain else task
    return f"{'an' if words[:1] in 'AEIOUaeiouH' else 'a'} {words} model"


def wrong_model_message(
    given: str, manifest: Manifest, *, task: str, stain: str | None = None, needed_for: str, fix: str
) -> str:
    """The one wording of a refused model of another task or stain than where it was given takes: what was given
    (``given``, the folder as the user named it, and the model's name and kind), what is needed and for what
    (``task`` and ``stain``, None where any stain does; ``needed_for``), and the fix.

    >>> m = Manifest(name="demo-nuclei", version="1", task="nuclei", architecture="", architecture_kwargs={},
    ...              input_mpp=0.5, tile_size_px=256, normalization={}, class_names=["a"], members=[])
    >>> wrong_model_message("models/n", m, task="segmentation", stain="H&E", needed_for="for --seg-model",
    ...                     fix="give one, or leave --seg-model out for the shipped one")
    "models/n: 'demo-nuclei' is an H&E nuclei model, but an H&E segmentation model is needed for --seg-model; \
give one, or leave --seg-model out for the shipped one"
    """
    return (
        f"{given}: {manifest.name!r} is {model_kind(manifest.task, manifest.stain)}, but "
        f"{model_kind(task, stain)} is needed {needed_for}; {fix}"
    )


def _check_values(path: Path, raw: dict[str, Any]) -> None:
    """Raise :class:`ModelFileError` for a value of the wrong type (a hand-edited threshold written "0.5").

    Without this, a threshold given as text failed every image at its first comparison with numpy's
    "ufunc 'greater_equal' did not contain a loop with signature matching types".
    """
    fix = "correct it in the manifest (numbers without quotes), or copy the model folder again"
    if not isinstance(raw.get("thresholds", {}), dict):
        raise ModelFileError(f"{path}: thresholds must be an object of name: number, got {raw['thresholds']!r:.60}")
    for name, value in raw.get("thresholds", {}).items():
        if not is_finite_number(value):
            raise ModelFileError(f"{path}: threshold {name!r} must be a finite number, got {value!r:.60}; {fix}")
    if not (is_finite_number(raw["input_mpp"]) and raw["input_mpp"] > 0):
        raise ModelFileError(
            f"{path}: input_mpp must be a positive number (µm/px), got {raw['input_mpp']!r:.60}; {fix}"
        )
    tile = raw["tile_size_px"]
    if isinstance(tile, bool) or not isinstance(tile, int) or not 1 <= tile <= MAX_TILE_SIZE_PX:
        raise ModelFileError(
            f"{path}: tile_size_px must be a whole number from 1 to {MAX_TILE_SIZE_PX}, got {tile!r:.60}; {fix}"
        )
    names = raw["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"{path}: class_names must be a list of names (text), got {names!r:.60}; {fix}")
    members = raw["members"]
    if not isinstance(members, list) or not all(
        isinstance(m, dict) and isinstance(m.get("file"), str) and isinstance(m.get("sha256"), str) for m in members
    ):
        raise ModelFileError(
            f"{path}: members must be a list of objects, each with 'file' and 'sha256' as text, got "
            f"{members!r:.80}; copy the model folder again, or retrain"
        )


# How to do without a model folder that does not read, where the command has a demo to fall back on.
USE_THE_DEMO = "leave the model option out to use the shipped demo"


def read_manifest(
    folder: str | Path, *, task: str | None = None, verify: bool = True, otherwise: str | None = USE_THE_DEMO
) -> Manifest:
    """Read and check a model folder's manifest; with ``verify``, check every member's sha256.

    Raises :class:`ModelFileError` naming the file for a missing folder or manifest, malformed
    JSON, missing keys, a task other than ``task``, a missing member or a checksum mismatch. ``otherwise`` ends
    the advice for a folder or manifest that is not there; None for a command whose model has no default.
    """
    folder = Path(folder)
    if folder.name == MANIFEST_NAME and folder.is_file():  # the manifest named instead of its folder
        folder = folder.parent
    path = folder / MANIFEST_NAME
    if not folder.exists():
        raise ModelFileError(
            f"{folder}: no such model folder; give the folder that holds {MANIFEST_NAME} and its members"
            + (f", or {otherwise}" if otherwise else "")
        )
    if folder.is_file():  # "text.svs/manifest.json: no model manifest" named a path that cannot exist
        hint = f"its folder {folder.parent}, if that is the model, or " if folder.suffix == ".safetensors" else ""
        raise ModelFileError(
            f"{folder} is a file, not a model folder; give {hint}the folder that holds {MANIFEST_NAME} and its "
            "members' .safetensors files" + (f", or {otherwise}" if otherwise else "")
        )
    if not path.is_file():
        # `pdl1 train` alone is refused: it needs the subcommand of the model's task.
        train = {"segmentation": "`pdl1 train seg`", "nuclei": "`pdl1 train nuclei`"}.get(
            task or "", "`pdl1 train seg` or `pdl1 train nuclei`"
        )
        raise ModelFileError(
            f"{path}: no model manifest; a model folder holds {MANIFEST_NAME} and its members' .safetensors "
            f"files (train one with {train}" + (f", or {otherwise})" if otherwise else ")")
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{path}: not valid JSON ({err}); the manifest was damaged (an interrupted copy?): copy the model "
            "folder again, or retrain"
        ) from err
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: a manifest is a JSON object of name: value, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ModelFileError(f"{path}: manifest lacks {', '.join(missing)}")
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{path}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version} is newer than this pdl1-bridge reads ({FORMAT_VERSION}); the model "
            "was written by a newer pdl1-bridge: update pdl1-bridge to use it"
        )
    _check_values(path, raw)
    try:
        members = [Member(**m) for m in raw.pop("members")]
        manifest = Manifest(members=members, **raw)
    except TypeError as err:
        raise ModelFileError(f"{path}: unexpected manifest fields ({err})") from err
    if manifest.stain not in STAINS:
        raise ModelFileError(
            f"{path}: stain {manifest.stain!r} is not one a model can be trained on here; expected one of {STAINS}"
        )
    if manifest.blend not in BLENDS:
        raise ModelFileError(f"{path}: blend {manifest.blend!r} is not one of {BLENDS}")
    if task is not None and manifest.task != task:
        raise ModelFileError(
            wrong_model_message(
                str(path),
                manifest,
                task=task,
                needed_for="here",
                fix=f"give {model_kind(task)}'s folder, or leave the model option out to use the shipped demo's",
            )
        )
    if not manifest.members:
        raise ModelFileError(f"{path}: lists no members")
    for member in manifest.members:
        # Read both ways: on Windows "..\\x" and "C:/x" lead out of the folder though they read as one name here.
        rel, as_windows = PurePosixPath(member.file), PureWindowsPath(member.file)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or as_windows.anchor or ".." in as_windows.parts:
            raise ModelFileError(
                f"{path}: member file {member.file!r} is not a path inside the model folder; "
                "members are named relative to it, e.g. member_00.safetensors"
            )
    if verify:
        for member in manifest.members:
            file = folder / member.file
            if not file.is_file():
                raise ModelFileError(
                    f"{file}: member listed in {path} is missing; copy the whole model folder again (every "
                    "member the manifest lists), or retrain"
                )
            actual = sha256_file(file)
            if actual != member.sha256:
                raise ModelFileError(
                    f"{file}: sha256 {actual[:12]}… does not match the manifest's {member.sha256[:12]}…; "
                    "the file is corrupt or was replaced: restore it or retrain"
                )
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``folder``'s manifest, replacing the one there in one step: readers see the old or the new one.

    Through :func:`inference.atomic.write_text_whole`: after an error or Ctrl-C the old manifest is untouched,
    and two writers of one model (calibrate and domain-stats) never rename each other's half-written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    write_text_whole(path, manifest.to_json())
    return path


# The shipped demo models (folders of inference/demo_models), trained on phantoms only.
DEMO_MODEL_KINDS = ("seg", "nuclei", "nuclei-ihc")


def demo_model_checksums() -> dict[str, str]:
    """:attr:`Manifest.checksum` of each shipped demo model, by kind: tells a result made with one.

    Reads only the manifests (no torch, no weights), so reports can say which models were demos.
    """
    from importlib import resources

    out = {}
    for kind in DEMO_MODEL_KINDS:
        folder = Path(str(resources.files("inference") / "demo_models" / kind))
        if (folder / MANIFEST_NAME).is_file():
            out[kind] = read_manifest(folder, verify=False).checksum
    return out
