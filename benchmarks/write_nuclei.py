"""Writing 1M nuclei as QuPath GeoJSON: our streaming writer vs building one FeatureCollection in memory.

The streaming writer is timed twice: fed one shapely point and QuPathObject per nucleus, and fed
features made straight from the arrays (:func:`bridge.qupath_geojson.point_features`), as
``pdl1 run`` writes nuclei.

Each case runs in a fresh Python process so its peak RSS is its own (``ru_maxrss``); the time
includes that process's start-up and imports (about a second).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import Benchmark, Case

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from shapely.geometry import Point
from bridge.qupath_geojson import QuPathObject, point_features, to_feature, write_features

n, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
classes = ("Tumor: Positive", "Tumor: Negative", "Other")
rng = np.random.default_rng(0)
xy, cls, p = rng.uniform(0, 100_000, (n, 2)), rng.integers(0, 3, n), rng.uniform(0.5, 1.0, n)

def objects():
    for (x, y), c, q in zip(xy, cls, p):
        yield QuPathObject(Point(float(x), float(y)), "detection", classes[c],
                           {"Class probability": float(q), "PD-L1 positive probability": float(q)})

t0 = time.perf_counter()
if mode == "objects":
    write_features(out, (to_feature(o) for o in objects()))
elif mode == "arrays":
    write_features(out, point_features(xy, classes, cls, {"Class probability": p, "PD-L1 positive probability": p}))
else:
    import geojson
    features = [geojson.Feature(id=f["id"], geometry=f["geometry"], properties=f["properties"])
                for f in (to_feature(o) for o in objects())]
    with open(out, "w") as fh:
        geojson.dump(geojson.FeatureCollection(features), fh)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


class WriteNuclei(Benchmark):
    """Objects/s and peak RSS writing nuclei as QuPath GeoJSON (paquo's path needs QuPath)."""

    unit = "k objects/s"
    extra_columns = ("peak RSS MB",)
    repeats = 1
    warmup = False

    def setup(self, *, quick: bool) -> None:
        self.n = 100_000 if quick else 1_000_000
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.peaks: dict[str, float] = {}

    def _child(self, label: str, mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(self.n), mode, str(self.tmp / f"{mode}.geojson")],
            capture_output=True,
            text=True,
            check=True,
        )
        self.peaks[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        return self.n / 1000

    def cases(self) -> list[Case]:
        cases = (
            ("geojson lib, whole FeatureCollection in memory", "baseline"),
            ("streaming, validated, atomic; one QuPathObject per nucleus", "objects"),
            ("ours: the same, features straight from the arrays", "arrays"),
        )
        return [
            Case(label, lambda label=label, mode=mode: self._child(label, mode), baseline=mode == "baseline")
            for label, mode in cases
        ]

    def extra(self, label: str) -> dict[str, str]:
        return {"peak RSS MB": f"{self.peaks.get(label, float('nan')):.0f}"}

    def conditions(self) -> dict[str, str]:
        return {
            "objects": f"{self.n} point detections with 2 measurements",
            "memory": "peak RSS of the process doing the write (numpy, shapely and the inputs included)",
            "paquo": "not measured here: needs QuPath (PAQUO_QUPATH_DIR)",
        }

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
