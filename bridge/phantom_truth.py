"""QuPath GeoJSON for phantom truth: the true nuclei as point detections a pathologist can load."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shapely.geometry import Point

from bridge.qupath_geojson import QuPathObject, to_feature, write_features


def _nucleus_features(nuclei_csv: Path) -> Iterator[dict[str, Any]]:
    with nuclei_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            point = Point(float(row["x_px"]), float(row["y_px"]))
            yield to_feature(QuPathObject(point, "detection", classification=row["class"]))


def write_truth_geojson(truth_dir: str | Path) -> Path:
    """Write ``nuclei.geojson`` (QuPath point detections) from a phantom's ``nuclei.csv``; streams."""
    truth_dir = Path(truth_dir)
    out = truth_dir / "nuclei.geojson"
    write_features(out, _nucleus_features(truth_dir / "nuclei.csv"))
    return out
