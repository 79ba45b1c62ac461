"""Writing 1M nuclei as QuPath GeoJSON: our streaming writer vs building one FeatureCollection in memory."""

from __future__ import annotations

import shutil
import tempfile
import tracemalloc
from pathlib import Path

import geojson
import numpy as np
from shapely.geometry import Point

from benchmarks import Benchmark, Case
from bridge.qupath_geojson import QuPathObject, to_feature, write_features

CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")


class WriteNuclei(Benchmark):
    """Objects/s and peak Python memory writing nuclei as QuPath GeoJSON (paquo's path needs QuPath)."""

    unit = "k objects/s"
    extra_columns = ("peak MB",)
    repeats = 1
    warmup = False

    def setup(self, *, quick: bool) -> None:
        self.n = 100_000 if quick else 1_000_000
        rng = np.random.default_rng(0)
        self.xy = rng.uniform(0, 100_000, (self.n, 2))
        self.cls = rng.integers(0, 3, self.n)
        self.p = rng.uniform(0.5, 1.0, self.n)
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.peaks: dict[str, float] = {}

    def _objects(self):
        for (x, y), c, p in zip(self.xy, self.cls, self.p, strict=True):
            yield QuPathObject(
                Point(float(x), float(y)),
                "detection",
                CLASSES[c],
                {"Class probability": float(p), "PD-L1 positive probability": float(p)},
            )

    def _measure(self, label: str, fn) -> float:
        tracemalloc.start()
        fn()
        self.peaks[label] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return self.n / 1000

    def _in_memory(self) -> None:
        features = [
            geojson.Feature(id=str(i), geometry=o.geometry.__geo_interface__, properties=to_feature(o)["properties"])
            for i, o in enumerate(self._objects())
        ]
        with (self.tmp / "baseline.geojson").open("w") as fh:
            geojson.dump(geojson.FeatureCollection(features), fh)

    def _streaming(self) -> None:
        write_features(self.tmp / "ours.geojson", (to_feature(o) for o in self._objects()))

    def cases(self) -> list[Case]:
        return [
            Case(
                "geojson lib, whole FeatureCollection in memory",
                lambda: self._measure("baseline", self._in_memory),
                baseline=True,
            ),
            Case("ours: streaming, validated", lambda: self._measure("ours", self._streaming)),
        ]

    def extra(self, label: str) -> dict[str, str]:
        key = "baseline" if label.startswith("geojson") else "ours"
        return {"peak MB": f"{self.peaks.get(key, float('nan')):.0f}"}

    def conditions(self) -> dict[str, str]:
        return {
            "objects": f"{self.n} point detections with 2 measurements",
            "memory": "peak of Python allocations (tracemalloc) during the write",
            "paquo": "not measured here: needs QuPath (PAQUO_QUPATH_DIR)",
        }

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
