"""Truth of a phantom: nucleus classes, the truth folder beside the slide, writing and reading it.

``<stem>.truth/`` holds ``truth.json`` (summary), ``positive_mask.tif`` (uint8 0/1 at the mask
downsample) and ``nuclei.csv`` (``x_px,y_px,class``, level-0 pixel centres). An IHC phantom's
``nuclei.csv`` adds ``intensity`` (0 to 3) and ``pattern`` (complete, partial, cytoplasmic, none);
its classes are :data:`IHC_NUCLEUS_CLASSES` and its ``truth.json`` names them (``"classes"``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.atomic import write_text_whole
from inference.errors import TruthFormatError, TruthNotFoundError
from inference.values import is_finite_number

NUCLEUS_CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")
POSITIVE, NEGATIVE, OTHER = 0, 1, 2

# PD-L1 IHC (haematoxylin-DAB) phantoms: tumour and immune cells scored apart (TPS, CPS).
IHC_NUCLEUS_CLASSES = (
    "Tumor: Positive",
    "Tumor: Negative",
    "Immune cells: PD-L1 positive",
    "Immune cells: PD-L1 negative",
    "Other",
)
IHC_TUMOUR_POSITIVE, IHC_TUMOUR_NEGATIVE, IHC_IMMUNE_POSITIVE, IHC_IMMUNE_NEGATIVE, IHC_OTHER = range(5)
# Staining pattern of an IHC nucleus's cell: index into this tuple.
IHC_PATTERNS = ("none", "complete", "partial", "cytoplasmic")
PATTERN_NONE, PATTERN_COMPLETE, PATTERN_PARTIAL, PATTERN_CYTOPLASMIC = range(4)


@dataclass(frozen=True)
class PhantomTruth:
    """Where the truth of a written phantom lies, and its summary numbers."""

    slide_path: Path
    truth_dir: Path
    mask_path: Path
    nuclei_csv_path: Path
    summary: dict = field(default_factory=dict)


def truth_dir_for(slide_path: str | Path) -> Path:
    """The truth folder beside a phantom slide: ``dir/stem.truth``."""
    slide_path = Path(slide_path)
    return slide_path.with_name(slide_path.stem + ".truth")


class TruthWriter:
    """Writes a phantom's truth while its level 0 is drawn: nuclei rows, mask tiles, class counts.

    Use as a context manager around the drawing, then :meth:`finish`.
    """

    def __init__(
        self,
        slide_path: Path,
        *,
        width_px: int,
        height_px: int,
        mask_downsample: int,
        classes: tuple[str, ...] = NUCLEUS_CLASSES,
        ihc: bool = False,
    ) -> None:
        self.slide_path = slide_path
        self.classes = classes
        self.ihc = ihc
        self.truth_dir = truth_dir_for(slide_path)
        self.truth_dir.mkdir(parents=True, exist_ok=True)
        # truth.json is written last and says the phantom is whole: an earlier phantom's must not stay beside
        # this one while it is drawn (an interrupted --overwrite left it describing a half-written slide).
        (self.truth_dir / "truth.json").unlink(missing_ok=True)
        self.mask_downsample = mask_downsample
        self.mask = np.zeros((-(-height_px // mask_downsample), -(-width_px // mask_downsample)), np.uint8)
        self.counts = np.zeros(len(classes), np.int64)
        self.intensity_counts = np.zeros(4, np.int64)  # IHC: cells scored 0, 1+, 2+, 3+
        self.nuclei_csv = self.truth_dir / "nuclei.csv"
        self._fh = self.nuclei_csv.open("w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(["x_px", "y_px", "class", "intensity", "pattern"] if ihc else ["x_px", "y_px", "class"])

    def add_nuclei(
        self,
        xs: np.ndarray,
        ys: np.ndarray,
        classes: np.ndarray,
        intensity: np.ndarray | None = None,
        pattern: np.ndarray | None = None,
    ) -> None:
        """Nuclei with level-0 centres ``xs``, ``ys`` and class indices into the writer's classes.

        An IHC writer also takes each nucleus's ``intensity`` (0 to 3) and ``pattern`` (index into
        :data:`IHC_PATTERNS`).
        """
        for cls in range(len(self.classes)):
            self.counts[cls] += int((classes == cls).sum())
        names = [self.classes[c] for c in classes]
        if not self.ihc:
            self._writer.writerows(zip(np.round(xs, 2), np.round(ys, 2), names, strict=True))
            return
        if intensity is None or pattern is None:
            raise ValueError("an IHC truth needs each nucleus's intensity and pattern, got None")
        self.intensity_counts += np.bincount(intensity, minlength=4)[:4]
        patterns = [IHC_PATTERNS[p] for p in pattern]
        self._writer.writerows(zip(np.round(xs, 2), np.round(ys, 2), names, intensity.tolist(), patterns, strict=True))

    def add_mask(self, x0_px: int, y0_px: int, mask: np.ndarray) -> None:
        """A positive-mask tile whose top-left lies at level-0 (``x0_px``, ``y0_px``); cut at the image edge."""
        r0, c0 = y0_px // self.mask_downsample, x0_px // self.mask_downsample
        sub = self.mask[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        sub[...] = mask[: sub.shape[0], : sub.shape[1]]

    def __enter__(self) -> TruthWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def finish(
        self, *, generator: str, spec: dict, levels: list[int], jpeg_quality: int, extra: dict | None = None
    ) -> PhantomTruth:
        """Write the mask and ``truth.json`` once every tile is in; the arguments describe the slide.

        ``extra`` adds entries to ``truth.json`` (an IHC slide's pairing and transform).
        """
        import tifffile

        self._fh.close()
        mask_path = self.truth_dir / "positive_mask.tif"
        tifffile.imwrite(mask_path, self.mask, compression="zlib", metadata=None)
        counts = self.counts
        tumour = counts[POSITIVE] + counts[NEGATIVE]  # the first two classes of both kinds
        summary = {
            "generator": generator,
            "spec": spec,
            "slide": self.slide_path.name,
            "stain": "H-DAB" if self.ihc else "H&E",
            "classes": list(self.classes),
            "levels": levels,
            "mask_downsample": self.mask_downsample,
            "mask_positive_fraction": float(self.mask.mean()),
            "nuclei_counts": {name: int(counts[i]) for i, name in enumerate(self.classes)},
            "tps_percent": float(100 * counts[POSITIVE] / tumour) if tumour else None,
            "jpeg_quality": jpeg_quality,
        }
        if self.ihc:
            summary["cps"] = combined_positive_score(
                int(counts[IHC_TUMOUR_POSITIVE]), int(counts[IHC_IMMUNE_POSITIVE]), int(tumour)
            )
            summary["intensity_counts"] = {f"{i}+": int(self.intensity_counts[i]) for i in (1, 2, 3)}
        summary.update(extra or {})
        # Renamed into place whole: its presence means a whole phantom.
        write_text_whole(self.truth_dir / "truth.json", json.dumps(summary, indent=2))
        return PhantomTruth(self.slide_path, self.truth_dir, mask_path, self.nuclei_csv, summary)


def combined_positive_score(tumour_positive: int, immune_positive: int, tumour: int) -> float | None:
    """CPS: PD-L1 positive tumour and immune cells per 100 tumour cells, capped at 100; None without tumour.

    >>> combined_positive_score(30, 15, 100)
    45.0
    >>> combined_positive_score(80, 40, 100)
    100.0
    """
    if tumour <= 0:
        return None
    return float(min(100.0, 100.0 * (tumour_positive + immune_positive) / tumour))


def phantom_mpp_advice(command: str) -> Callable[[str], str]:
    """How a user of ``command`` gives a phantom a pixel size, for the messages of one whose file states none or an
    implausible one (:data:`inference.slides.slide.MppAdvice`): the command reads each phantom at the pixel size its
    file states and takes none, so the library's advice, "pass ... as mpp", names an argument it does not take. A
    phantom's pixel size is the one it was written at, which its truth records, not a scanner's (the ``value`` the
    library offers).

    >>> phantom_mpp_advice("`pdl1 eval`")("0.5")[:60]
    '`pdl1 eval` reads each phantom at the pixel size its file st'
    """

    def advice(value: str) -> str:
        return (
            f"{command} reads each phantom at the pixel size its file states, and takes none: write the phantom "
            "again with `pdl1 phantom ... --overwrite` at the --mpp its truth.json records (spec.mpp), which the "
            "file then states; or leave the slide out"
        )

    return advice


@dataclass(frozen=True)
class PhantomTruthData:
    """Truth of a phantom loaded for evaluation."""

    positive_mask: np.ndarray  # uint8 (h, w) at mask_downsample
    mask_downsample: float
    nuclei_xy: np.ndarray  # float64 (N, 2), level-0 px
    nuclei_class: np.ndarray  # int64 (N,), index into class_names
    summary: dict
    class_names: tuple[str, ...] = NUCLEUS_CLASSES  # truth.json's "classes"; H&E's for older truth
    nuclei_intensity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 (N,), 0-3 (IHC)


# What to do about truth that is there but damaged: the phantom writer makes all of it again.
_REWRITE = "write the phantom again with `pdl1 phantom ... --overwrite`"


def load_truth(slide_path: str | Path) -> PhantomTruthData:
    """Read the truth written beside a phantom slide by :func:`write_phantom`.

    Raises :class:`TruthNotFoundError` without ``truth.json`` and :class:`TruthFormatError` naming the file
    when a file is missing, unreadable, cut short or holds fewer nuclei than ``truth.json`` counts.
    """
    truth_dir = truth_dir_for(slide_path)
    summary_path = truth_dir / "truth.json"
    if not summary_path.is_file():
        slide = Path(slide_path)
        # "no truth beside" a slide that is not there, or a project folder, put the blame on the truth.
        if slide.is_dir():
            raise TruthNotFoundError(
                f"{slide} is a folder; give phantom slide files with their truth beside them (written by `pdl1 "
                f"phantom`): the slides themselves, e.g. {slide / '*.svs'}"
            )
        if not slide.exists():
            raise TruthNotFoundError(
                f"{slide}: no such slide; give phantom slides written by `pdl1 phantom`, with their truth beside "
                f"them ({summary_path})"
            )
        # A lab's slide given to `pdl1 eval` was told only that phantoms are wanted: its labels score a model too.
        raise TruthNotFoundError(
            f"no truth beside {slide_path}: expected {summary_path} (written by `pdl1 phantom`); "
            "this command takes phantom slides (or slides with truth in that layout). A slide a lab labelled in "
            "QuPath scores a model as a held-out slide of `pdl1 train` (--val-entries; OUT/validation.json)"
        )
    summary = _read_summary(summary_path)
    mask = _read_mask(truth_dir / "positive_mask.tif")
    class_names = tuple(summary.get("classes", NUCLEUS_CLASSES))
    xy, cls, intensity = _read_nuclei(truth_dir / "nuclei.csv", class_names)
    counts = summary.get("nuclei_counts")
    # A csv cut at a line end still parses: only truth.json's counts show that nuclei are missing.
    if isinstance(counts, dict) and all(isinstance(v, int) for v in counts.values()):
        expected = sum(counts.values())
        if len(cls) != expected:
            raise TruthFormatError(
                f"{truth_dir / 'nuclei.csv'}: {len(cls)} nuclei, but {summary_path} counts {expected} "
                f"(nuclei_counts); the file is cut short or altered: {_REWRITE}"
            )
    _check_mask(truth_dir, summary, mask)
    _check_truth_is_the_slides(Path(slide_path), summary_path, summary)
    return PhantomTruthData(
        positive_mask=mask,
        mask_downsample=float(summary["mask_downsample"]),
        nuclei_xy=np.array(xy, np.float64).reshape(-1, 2),
        nuclei_class=np.array(cls, np.int64),
        summary=summary,
        class_names=class_names,
        nuclei_intensity=np.array(intensity, np.int64),
    )


def _spec_size(summary: dict) -> tuple[int, int] | None:
    """The phantom's (width, height) px that truth.json's spec states; None where it states none."""
    spec = summary.get("spec")
    size = (spec.get("width_px"), spec.get("height_px")) if isinstance(spec, dict) else (None, None)
    return size if all(isinstance(v, int) and not isinstance(v, bool) for v in size) else None


def _check_mask(truth_dir: Path, summary: dict, mask: np.ndarray) -> None:
    """The mask is the one truth.json describes: its shape that of the slide at ``mask_downsample``, and its positive
    share the one recorded. A mask of another phantom, or an edited one, was scored (Dice 0.0000) or cropped and
    padded into training labels without a word."""
    path = truth_dir / "positive_mask.tif"
    size, ds = _spec_size(summary), summary["mask_downsample"]
    if size is not None and float(ds) == int(ds):
        expected = (-(-size[1] // int(ds)), -(-size[0] // int(ds)))
        if mask.shape != expected:
            raise TruthFormatError(
                f"{path}: {mask.shape[1]} x {mask.shape[0]} px, but the {size[0]} x {size[1]} px phantom of "
                f"{truth_dir / 'truth.json'} at downsample {ds:g} needs {expected[1]} x {expected[0]}: the mask is "
                f"another phantom's or altered; {_REWRITE}"
            )
    recorded = summary.get("mask_positive_fraction")
    positive = np.count_nonzero(mask) / max(mask.size, 1)
    if is_finite_number(recorded) and abs(positive - recorded) > 1e-6:
        raise TruthFormatError(
            f"{path}: {positive:.4%} positive, but {truth_dir / 'truth.json'} "
            f"records {recorded:.4%} (mask_positive_fraction): the mask is another phantom's or altered; {_REWRITE}"
        )


_SEED_IN_DESCRIPTION = re.compile(r"pdl1-bridge phantom seed ?= ?(\d+)")


def _check_truth_is_the_slides(slide: Path, summary_path: Path, summary: dict) -> None:
    """The truth beside ``slide`` is its own: the slide's size, and the phantom seed its TIFF description states,
    are truth.json's. Another phantom's truth beside a slide (a copy renamed, a folder mixed up) was scored and
    exported without a word. A slide that is no TIFF, or does not read, is left to the slide's own reader."""
    import tifffile

    try:
        with tifffile.TiffFile(slide) as tif:
            page = tif.pages[0]
            width, height, description = page.imagewidth, page.imagelength, page.description or ""
    except Exception:  # any reader error: the slide's own reader says what is wrong with it
        return
    size = _spec_size(summary)
    another = (
        f"the truth beside it ({summary_path.parent}) is another slide's: give each slide its own truth, or {_REWRITE}"
    )
    if size is not None and (width, height) != size:
        raise TruthFormatError(
            f"{slide}: {width} x {height} px, but {summary_path} describes a {size[0]} x {size[1]} px phantom; "
            f"{another}"
        )
    spec = summary.get("spec") if isinstance(summary.get("spec"), dict) else {}
    found = _SEED_IN_DESCRIPTION.search(description)
    if found and isinstance(spec.get("seed"), int) and int(found.group(1)) != spec["seed"]:
        raise TruthFormatError(
            f"{slide}: phantom seed {found.group(1)} (its TIFF description), but {summary_path} is seed "
            f"{spec['seed']}'s; {another}"
        )


# The truth.json fields an evaluation reads beyond those every load checks, with what each is.
SUMMARY_FIELDS = {
    "spec": "the phantom's spec, from which its true tissue is redrawn",
    "tps_percent": "the true TPS",
    "nuclei_counts": "the true nuclei per class",
}


def require_summary(slide_path: str | Path, truth: PhantomTruthData, fields: Sequence[str]) -> None:
    """Raise :class:`TruthFormatError` naming ``truth.json`` if it lacks one of ``fields`` (keys of
    :data:`SUMMARY_FIELDS`) or holds it in another form, before any model runs (a KeyError traceback otherwise,
    after the slide was analysed)."""
    path = truth_dir_for(slide_path) / "truth.json"
    summary = truth.summary
    for name in fields:
        value = summary.get(name)
        if name == "spec":
            ok = isinstance(value, dict) and is_finite_number(value.get("shift"))
        elif name == "tps_percent":
            ok = is_finite_number(value)
        else:
            ok = isinstance(value, dict) and all(
                isinstance(value.get(c), int) and not isinstance(value.get(c), bool)
                for c in ("Tumor: Positive", "Tumor: Negative")
            )
        if not ok:
            came = "none" if name not in summary else repr(value)[:80]
            raise TruthFormatError(
                f"{path}: {name!r} ({SUMMARY_FIELDS[name]}) is missing or malformed, got {came}; {_REWRITE}"
            )


def _read_summary(path: Path) -> dict:
    """``truth.json`` as a dict with the keys evaluation reads."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TruthFormatError(f"{path}: not readable as JSON ({err}); {_REWRITE}") from err
    if not isinstance(summary, dict):
        raise TruthFormatError(
            f"{path}: expected a JSON object with the phantom's summary, got a {type(summary).__name__}; {_REWRITE}"
        )
    if "mask_downsample" not in summary:
        raise TruthFormatError(f"{path}: no 'mask_downsample' (the positive mask's scale); {_REWRITE}")
    try:
        if float(summary["mask_downsample"]) <= 0:
            raise ValueError(summary["mask_downsample"])
    except (TypeError, ValueError) as err:
        raise TruthFormatError(
            f"{path}: 'mask_downsample' must be a positive number, got {summary['mask_downsample']!r}; {_REWRITE}"
        ) from err
    classes = summary.get("classes", NUCLEUS_CLASSES)
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise TruthFormatError(f"{path}: 'classes' must be a list of class names, got {classes!r}; {_REWRITE}")
    return summary


def _read_mask(path: Path) -> np.ndarray:
    """``positive_mask.tif`` as a 2-D array."""
    import tifffile

    if not path.is_file():
        raise TruthFormatError(f"{path}: missing (the truth's positive mask); {_REWRITE}")
    try:
        mask = tifffile.imread(path)
    except Exception as err:  # tifffile raises many kinds (TiffFileError, ValueError, struct.error ...)
        raise TruthFormatError(f"{path}: not a readable TIFF ({err}); {_REWRITE}") from err
    if mask.ndim != 2:
        raise TruthFormatError(f"{path}: expected a 2-D 0/1 mask, got shape {mask.shape}; {_REWRITE}")
    return mask


def _read_nuclei(path: Path, class_names: tuple[str, ...]) -> tuple[list, list, list]:
    """``nuclei.csv``'s centres, class indices into ``class_names`` and intensities (0 without the column)."""
    if not path.is_file():
        raise TruthFormatError(f"{path}: missing (the truth's nuclei); {_REWRITE}")
    names = {name: i for i, name in enumerate(class_names)}
    xy, cls, intensity = [], [], []
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("x_px", "y_px", "class") if c not in header]
            if missing:
                raise TruthFormatError(f"{path}: expected the columns x_px, y_px, class, got {header}; {_REWRITE}")
            for line, row in enumerate(reader, start=2):
                try:
                    xy.append((float(row["x_px"]), float(row["y_px"])))
                    intensity.append(int(row.get("intensity") or 0))
                except (TypeError, ValueError) as err:
                    raise TruthFormatError(f"{path}, line {line}: {row} is not a nucleus ({err}); {_REWRITE}") from err
                if row["class"] not in names:
                    raise TruthFormatError(
                        f"{path}, line {line}: class {row['class']!r} is not one of truth.json's "
                        f"classes {class_names}; {_REWRITE}"
                    )
                cls.append(names[row["class"]])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TruthFormatError(f"{path}: not readable as CSV ({err}); {_REWRITE}") from err
    return xy, cls, intensity
