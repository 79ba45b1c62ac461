"""Truth of a phantom: nucleus classes, the truth folder beside the slide, writing and reading it.

``<stem>.truth/`` holds ``truth.json`` (summary), ``positive_mask.tif`` (uint8 0/1 at the mask
downsample) and ``nuclei.csv`` (``x_px,y_px,class``, level-0 pixel centres).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.errors import TruthNotFoundError

NUCLEUS_CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")
POSITIVE, NEGATIVE, OTHER = 0, 1, 2


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

    def __init__(self, slide_path: Path, *, width_px: int, height_px: int, mask_downsample: int) -> None:
        self.slide_path = slide_path
        self.truth_dir = truth_dir_for(slide_path)
        self.truth_dir.mkdir(parents=True, exist_ok=True)
        self.mask_downsample = mask_downsample
        self.mask = np.zeros((-(-height_px // mask_downsample), -(-width_px // mask_downsample)), np.uint8)
        self.counts = np.zeros(len(NUCLEUS_CLASSES), np.int64)
        self.nuclei_csv = self.truth_dir / "nuclei.csv"
        self._fh = self.nuclei_csv.open("w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(["x_px", "y_px", "class"])

    def add_nuclei(self, xs: np.ndarray, ys: np.ndarray, classes: np.ndarray) -> None:
        """Nuclei with level-0 centres ``xs``, ``ys`` and class indices into :data:`NUCLEUS_CLASSES`."""
        for cls in range(len(NUCLEUS_CLASSES)):
            self.counts[cls] += int((classes == cls).sum())
        self._writer.writerows(
            zip(np.round(xs, 2), np.round(ys, 2), [NUCLEUS_CLASSES[c] for c in classes], strict=True)
        )

    def add_mask(self, x0_px: int, y0_px: int, mask: np.ndarray) -> None:
        """A positive-mask tile whose top-left lies at level-0 (``x0_px``, ``y0_px``); cut at the image edge."""
        r0, c0 = y0_px // self.mask_downsample, x0_px // self.mask_downsample
        sub = self.mask[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        sub[...] = mask[: sub.shape[0], : sub.shape[1]]

    def __enter__(self) -> TruthWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def finish(self, *, generator: str, spec: dict, levels: list[int], jpeg_quality: int) -> PhantomTruth:
        """Write the mask and ``truth.json`` once every tile is in; the arguments describe the slide."""
        import tifffile

        self._fh.close()
        mask_path = self.truth_dir / "positive_mask.tif"
        tifffile.imwrite(mask_path, self.mask, compression="zlib", metadata=None)
        counts = self.counts
        tumour = counts[POSITIVE] + counts[NEGATIVE]
        summary = {
            "generator": generator,
            "spec": spec,
            "slide": self.slide_path.name,
            "levels": levels,
            "mask_downsample": self.mask_downsample,
            "mask_positive_fraction": float(self.mask.mean()),
            "nuclei_counts": {name: int(counts[i]) for i, name in enumerate(NUCLEUS_CLASSES)},
            "tps_percent": float(100 * counts[POSITIVE] / tumour) if tumour else None,
            "jpeg_quality": jpeg_quality,
        }
        (self.truth_dir / "truth.json").write_text(json.dumps(summary, indent=2))
        return PhantomTruth(self.slide_path, self.truth_dir, mask_path, self.nuclei_csv, summary)


@dataclass(frozen=True)
class PhantomTruthData:
    """Truth of a phantom loaded for evaluation."""

    positive_mask: np.ndarray  # uint8 (h, w) at mask_downsample
    mask_downsample: float
    nuclei_xy: np.ndarray  # float64 (N, 2), level-0 px
    nuclei_class: np.ndarray  # int64 (N,), index into NUCLEUS_CLASSES
    summary: dict


def load_truth(slide_path: str | Path) -> PhantomTruthData:
    """Read the truth written beside a phantom slide by :func:`write_phantom`."""
    import tifffile

    truth_dir = truth_dir_for(slide_path)
    summary_path = truth_dir / "truth.json"
    if not summary_path.is_file():
        raise TruthNotFoundError(
            f"no truth beside {slide_path}: expected {summary_path} (written by `pdl1 phantom`); "
            "evaluation needs a phantom slide or truth in that layout"
        )
    summary = json.loads(summary_path.read_text())
    mask = tifffile.imread(truth_dir / "positive_mask.tif")
    names = {name: i for i, name in enumerate(NUCLEUS_CLASSES)}
    xy, cls = [], []
    with (truth_dir / "nuclei.csv").open() as fh:
        for row in csv.DictReader(fh):
            xy.append((float(row["x_px"]), float(row["y_px"])))
            cls.append(names[row["class"]])
    return PhantomTruthData(
        positive_mask=mask,
        mask_downsample=float(summary["mask_downsample"]),
        nuclei_xy=np.array(xy, np.float64).reshape(-1, 2),
        nuclei_class=np.array(cls, np.int64),
        summary=summary,
    )
