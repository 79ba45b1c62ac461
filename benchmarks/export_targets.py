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
from bridge.qupath_geojson import classification_json

_CHILD = r"""
import json, resource, sys, time
from collections import Counter
from pathlib import Path
from bridge.exported_targets import read_exported_entry
from bridge.labels import refuse_stale_export
from bridge.project import ProjectError
from bridge.qupath_geojson import class_name, from_feature, not_detections

folder, mode = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if mode == "whole":  # as read_exported_entry read it first: the check counting the file's annotations, then the file
    export = folder / "pdl1" / "labels" / "1.geojson"
    features = json.loads(export.read_text(encoding="utf-8"))
    counts = Counter(class_name(f["properties"].get("classification")) or "Unclassified"
                     for f in features if f["properties"]["objectType"] == "annotation")
    del features
    refuse_stale_export(export, folder / "data" / "1", "bench", "export again", error=ProjectError,
                        exported_counts=counts)
    kept = [from_feature(f) for f in json.loads(export.read_text(encoding="utf-8")) if not_detections(f)]
    n = len(kept)
else:
    entry = read_exported_entry(folder, "1", "bench.svs")
    n = len(entry.annotations) + len(entry.cores)
print(json.dumps({"seconds": time.perf_counter() - t0, "kept": n,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_export(
    path: Path,
    cells: int,
    *,
    cell_classes: tuple[str, ...] = ("Tumor",),
    offset_px: float = 0.0,
    one_line: bool = False,
    first_class: str = "Tumor",
) -> int:
    """An export in the script's layout (``one_line``: as QuPath's File > Export objects writes it, compact); its size
    in bytes. The cells take ``cell_classes`` in turn, each centred ``offset_px`` right of and below its grid point;
    the first of the two annotations is of ``first_class``."""
    import math
    import uuid

    def square(x: float, y: float, size: float) -> list:
        return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]

    def feature(kind: str, coords: list, props: dict) -> str:
        body = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {"objectType": kind, **props}}  # fmt: skip
        return json.dumps(body, separators=(",", ":"))

    lines = [feature("annotation", square(0, 0, 5000), {"classification": {"name": first_class, "color": [200, 0, 0]}})]
    lines.append(feature("annotation", square(6000, 0, 5000), {"name": "nest 2"}))
    lines += [
        feature("tmaCore", square(i * 2000, 9000, 1800), {"name": f"A-{i + 1}", "isMissing": False}) for i in range(4)
    ]
    ring = [[math.cos(2 * math.pi * k / 16) * 6, math.sin(2 * math.pi * k / 16) * 6] for k in range(16)]
    measurements = {"Nucleus: Area µm^2": 30.5, "Nucleus: Hematoxylin OD mean": 0.41, "Cell: Area µm^2": 88.0,
                    "Cell: DAB OD mean": 0.12, "Detection probability": 0.93}  # fmt: skip
    props = [
        {"classification": classification_json(name, (200, 0, 0)), "measurements": measurements}
        for name in cell_classes
    ]
    gap = "," if one_line else ",\n"
    with path.open("w", encoding="utf-8") as fh:
        fh.write(("[" if one_line else "[\n") + gap.join(lines))
        for i in range(cells):
            x, y = (i % 1000) * 20.0 + offset_px, (i // 1000) * 20.0 + offset_px
            outline = [[[x + dx, y + dy] for dx, dy in [*ring, ring[0]]]]
            fh.write(gap + feature("cell", outline, props[i % len(props)]))
        fh.write("]\n" if one_line else "\n]\n")
    return path.stat().st_size


class ReadInChild(Benchmark):
    """A file of cells read in a fresh Python process per case (its peak RSS its own; the reading timed inside it):
    k cells/s over the best reading time, and peak RSS. Subclasses set ``child`` (Python code that prints a JSON line
    with ``seconds`` and ``peak_mb``) and ``modes`` (case label, the child's argument; the first is the baseline),
    write their inputs in :meth:`write_inputs` (``self.cells`` cells, under ``self.tmp``), and check what the child
    said in :meth:`check`."""

    unit = "k cells/s"
    extra_columns = ("read s", "peak RSS MB")
    repeats = 2
    warmup = False
    child = ""
    modes: tuple[tuple[str, str], ...] = ()
    cells = 0
    tmp: Path | None = None

    def setup(self, *, quick: bool) -> None:
        self.cells = 20_000 if quick else 300_000
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.write_inputs()

    def write_inputs(self) -> None:
        """Write the files of ``self.cells`` cells under ``self.tmp`` that the cases read."""
        raise NotImplementedError

    def child_args(self, mode: str) -> list[str]:
        return [mode]

    def check(self, label: str, said: dict) -> None:
        """Raise where the child did not read what it should have (a benchmark of a broken reader means nothing)."""

    def _child(self, label: str, mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", self.child, *self.child_args(mode)], capture_output=True, text=True, check=True
        )
        said = json.loads(out.stdout.strip().splitlines()[-1])
        self.check(label, said)
        self.peaks[label] = max(self.peaks.get(label, 0.0), said["peak_mb"])
        self.read_s[label] = min(self.read_s.get(label, float("inf")), said["seconds"])
        return self.cells / 1000

    def rate(self, result) -> float:
        # Timed inside the child (the reading alone, not Python's start-up and imports): its best over the repeats.
        return self.cells / 1000 / self.read_s[result.label]

    def cases(self) -> list[Case]:
        self.peaks: dict[str, float] = {}
        self.read_s: dict[str, float] = {}
        return [
            Case(label, lambda label=label, mode=mode: self._child(label, mode), baseline=k == 0)
            for k, (label, mode) in enumerate(self.modes)
        ]

    def extra(self, label: str) -> dict[str, str]:
        return {
            "read s": f"{self.read_s.get(label, float('nan')):.2f}",
            "peak RSS MB": f"{self.peaks.get(label, float('nan')):.0f}",
        }

    def conditions(self) -> dict[str, str]:
        return {"memory": "peak RSS of the reading process (Python, shapely and bridge's imports included)"}

    def teardown(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ExportTargets(ReadInChild):
    """Reading an image's targets from its export by pdl1_export_labels.groovy beside QuPath's cells: k cells/s and
    peak RSS."""

    child = _CHILD
    modes = (
        ("as first written: the staleness check and read_features each parse the whole file", "whole"),
        ("ours: line by line, cells passed over unparsed", "lines"),
    )

    def write_inputs(self) -> None:
        export = self.tmp / "pdl1" / "labels" / "1.geojson"
        export.parent.mkdir(parents=True)
        self.bytes = write_export(export, self.cells)
        # QuPath's save after the export (headless `QuPath script -s` saves each image after the script): its
        # summary.json newer than the export, with the same annotations, so the staleness check counts the export's.
        saved = self.tmp / "data" / "1" / "summary.json"
        saved.parent.mkdir(parents=True)
        saved.write_text(json.dumps({"hierarchy": {"annotationClassificationCounts": {"Tumor": 1, "Unclassified": 1}}}))
        os.utime(export, ns=(saved.stat().st_mtime_ns - 10**9,) * 2)

    def child_args(self, mode: str) -> list[str]:
        return [str(self.tmp), mode]

    def check(self, label: str, said: dict) -> None:
        if said["kept"] != 6:
            raise RuntimeError(f"{label}: read {said['kept']} annotations and cores, expected 6")

    def conditions(self) -> dict[str, str]:
        return {
            "export": f"{self.cells} cells (16-vertex polygons, 5 measurements), 2 annotations, 4 TMA cores: "
            f"{self.bytes / 2**20:.0f} MiB",
            **super().conditions(),
        }
