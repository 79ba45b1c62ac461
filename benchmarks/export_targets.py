"""Reading `pdl1 run`'s targets from an export of `pdl1_export_labels.groovy` whose image holds QuPath's cells: the
line-by-line reader that passes over the cells unparsed, against parsing the whole file (``read_features``) after the
staleness check parsed it too (QuPath saved the image after the export), as the reader was first written.

The export is written as the script writes it (``[``, one compact object a line, ``]``): two annotations, a TMA grid
of 4 cores and N cell detections with a polygon of 16 vertices and 5 measurements each (QuPath's cell detection).
Each case runs in a fresh Python process so its peak RSS is its own (``ru_maxrss``); the time is the reading alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import Benchmark, Case

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from bridge.exported_targets import read_exported_entry
from bridge.labels import refuse_stale_export
from bridge.project import ProjectError
from bridge.qupath_geojson import not_detections, read_features

folder, mode = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if mode == "whole":  # as read_exported_entry read it first: the check counting the file's annotations, then the file
    export = folder / "pdl1" / "labels" / "1.geojson"
    refuse_stale_export(export, folder / "data" / "1", "bench", "export again", error=ProjectError)
    kept = list(read_features(export, keep=not_detections))
    n = len(kept)
else:
    entry = read_exported_entry(folder, "1", "bench.svs")
    n = len(entry.annotations) + len(entry.cores)
print(json.dumps({"seconds": time.perf_counter() - t0, "kept": n,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_export(path: Path, cells: int) -> int:
    """An export in the script's layout; its size in bytes."""
    import math
    import uuid

    def square(x: float, y: float, size: float) -> list:
        return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]

    def feature(kind: str, coords: list, props: dict) -> str:
        body = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {"objectType": kind, **props}}  # fmt: skip
        return json.dumps(body, separators=(",", ":"))

    lines = [feature("annotation", square(0, 0, 5000), {"classification": {"name": "Tumor", "color": [200, 0, 0]}})]
    lines.append(feature("annotation", square(6000, 0, 5000), {"name": "nest 2"}))
    lines += [
        feature("tmaCore", square(i * 2000, 9000, 1800), {"name": f"A-{i + 1}", "isMissing": False}) for i in range(4)
    ]
    ring = [[math.cos(2 * math.pi * k / 16) * 6, math.sin(2 * math.pi * k / 16) * 6] for k in range(16)]
    measurements = {"Nucleus: Area µm^2": 30.5, "Nucleus: Hematoxylin OD mean": 0.41, "Cell: Area µm^2": 88.0,
                    "Cell: DAB OD mean": 0.12, "Detection probability": 0.93}  # fmt: skip
    props = {"classification": {"name": "Tumor", "color": [200, 0, 0]}, "measurements": measurements}
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n" + ",\n".join(lines))
        for i in range(cells):
            x, y = (i % 1000) * 20.0, (i // 1000) * 20.0
            fh.write(",\n" + feature("cell", [[[x + dx, y + dy] for dx, dy in [*ring, ring[0]]]], props))
        fh.write("\n]\n")
    return path.stat().st_size


class ExportTargets(Benchmark):
    """Reading an image's targets from its export by pdl1_export_labels.groovy beside QuPath's cells: k cells/s and
    peak RSS."""

    unit = "k cells/s"
    extra_columns = ("read s", "peak RSS MB")
    repeats = 2
    warmup = False

    def setup(self, *, quick: bool) -> None:
        self.cells = 20_000 if quick else 300_000
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        export = self.tmp / "pdl1" / "labels" / "1.geojson"
        export.parent.mkdir(parents=True)
        self.bytes = write_export(export, self.cells)
        # QuPath's save after the export (headless `QuPath script -s` saves each image after the script): its
        # summary.json newer than the export, with the same annotations, so the staleness check counts the export's.
        saved = self.tmp / "data" / "1" / "summary.json"
        saved.parent.mkdir(parents=True)
        saved.write_text(json.dumps({"hierarchy": {"annotationClassificationCounts": {"Tumor": 1, "Unclassified": 1}}}))
        os.utime(export, ns=(saved.stat().st_mtime_ns - 10**9,) * 2)
        self.peaks: dict[str, float] = {}
        self.read_s: dict[str, float] = {}

    def _child(self, label: str, mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(self.tmp), mode], capture_output=True, text=True, check=True
        )
        said = json.loads(out.stdout.strip().splitlines()[-1])
        if said["kept"] != 6:
            raise RuntimeError(f"{label}: read {said['kept']} annotations and cores, expected 6")
        self.peaks[label] = max(self.peaks.get(label, 0.0), said["peak_mb"])
        self.read_s[label] = min(self.read_s.get(label, float("inf")), said["seconds"])
        return self.cells / 1000

    def rate(self, result) -> float:
        # Timed inside the child (the reading alone, not Python's start-up and imports): its best over the repeats.
        return self.cells / 1000 / self.read_s[result.label]

    def cases(self) -> list[Case]:
        cases = (
            ("as first written: the staleness check and read_features each parse the whole file", "whole"),
            ("ours: line by line, cells passed over unparsed", "lines"),
        )
        return [
            Case(label, lambda label=label, mode=mode: self._child(label, mode), baseline=mode == "whole")
            for label, mode in cases
        ]

    def extra(self, label: str) -> dict[str, str]:
        return {
            "read s": f"{self.read_s.get(label, float('nan')):.2f}",
            "peak RSS MB": f"{self.peaks.get(label, float('nan')):.0f}",
        }

    def conditions(self) -> dict[str, str]:
        return {
            "export": f"{self.cells} cells (16-vertex polygons, 5 measurements), 2 annotations, 4 TMA cores: "
            f"{self.bytes / 2**20:.0f} MiB",
            "memory": "peak RSS of the reading process (Python, shapely and bridge's imports included)",
        }

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
