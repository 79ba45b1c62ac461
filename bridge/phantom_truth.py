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
            cls = row["class"]
            # An IHC truth's cells carry their DAB intensity (0-3) and staining pattern.
            measurements = {"DAB intensity": float(row["intensity"])} if "intensity" in row else {}
            yield to_feature(
                QuPathObject(
                    point,
                    "detection",
                    classification=cls,
                    measurements=measurements,
                    name=row.get("pattern"),
                )
            )


def write_truth_geojson(truth_dir: str | Path) -> Path:
    """Write ``nuclei.geojson`` (QuPath point detections) from a phantom's ``nuclei.csv``; streams.

    The classes are the truth's own (H&E or IHC); an IHC truth's detections also carry a
    ``DAB intensity`` measurement and their staining pattern as name.
    """
    truth_dir = Path(truth_dir)
    out = truth_dir / "nuclei.geojson"
    write_features(out, _nucleus_features(truth_dir / "nuclei.csv"))
    return out
