"""``pdl1 train``'s reading of an image's labels from its GeoJSON export where the image holds QuPath's cell detection:
the cells classified ``Tumor: Positive`` and ``Tumor: Negative`` (QuPath's positive cell detection, reviewed by a
person) are nucleus labels at their centroids, so every cell is parsed.

The same objects in two layouts: as QuPath's File > Export objects writes them (compact, one line), parsed whole (as
they were before 2026-12-07: the baseline) and read a feature at a time, and as ``pdl1_export_labels.groovy`` writes
them (``[``, one compact object a line, ``]``), read a line at a time. Each case runs in a fresh Python process so its
peak RSS is its own (``ru_maxrss``); the time is the reading alone (``bridge.labels.read_geojson_labels``: parse,
validate, build the labels).
"""

from __future__ import annotations

from benchmarks.export_targets import ReadInChild, write_export

_CHILD = r"""
import json, resource, sys, time
from bridge import qupath_geojson
from bridge.labels import LabelRules, read_geojson_labels
from inference.phantom.truth import NUCLEUS_CLASSES

if sys.argv[2] == "whole":  # the reading a feature at a time turned off: parsed whole, as before 2026-12-07
    def _off(fh, unparsed=()):
        raise qupath_geojson._OtherLayoutError
        yield
    qupath_geojson._features_streamed = _off

t0 = time.perf_counter()
labels = read_geojson_labels(sys.argv[1], slide="bench.svs", image_size_px=(20_000, 20_000),
                             rules=LabelRules(class_names=NUCLEUS_CLASSES))
print(json.dumps({"seconds": time.perf_counter() - t0, "points": len(labels.points_xy),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
CLASSES = ("Tumor: Positive", "Tumor: Negative")


class TrainLabels(ReadInChild):
    """``pdl1 train``'s reading of an image's labels beside QuPath's cells: k cells/s and peak RSS."""

    child = _CHILD
    modes = (
        ("QuPath's File > Export objects (one line): parsed whole", "whole"),
        ("ours: QuPath's File > Export objects (one line), read a feature at a time", "streamed"),
        ("ours: pdl1_export_labels.groovy's layout, read a line at a time", "lines"),
    )

    def write_inputs(self) -> None:
        one_line = self.tmp / "export-objects.geojson"
        self.paths = {"lines": self.tmp / "script.geojson", "whole": one_line, "streamed": one_line}
        self.bytes = write_export(self.paths["lines"], self.cells, cell_classes=CLASSES, offset_px=10.0)
        write_export(one_line, self.cells, cell_classes=CLASSES, offset_px=10.0, one_line=True)

    def child_args(self, mode: str) -> list[str]:
        return [str(self.paths[mode]), mode]

    def check(self, label: str, said: dict) -> None:
        if said["points"] != self.cells:
            raise RuntimeError(f"{label}: {said['points']} nucleus labels, expected one per cell ({self.cells})")

    def conditions(self) -> dict[str, str]:
        return {
            "export": f"{self.cells} cells ({', '.join(CLASSES)} in turn; 16-vertex polygons, 5 measurements), "
            f"2 annotations, 4 TMA cores: {self.bytes / 2**20:.0f} MiB",
            **super().conditions(),
        }


_REGIONS_CHILD = r"""
import json, resource, sys, time
from bridge.labels import LabelRules, labels_from_objects, read_geojson_labels
from bridge.qupath_geojson import read_features

rules, given = LabelRules((), points=False), dict(slide="bench.svs", image_size_px=(20_000, 20_000))
t0 = time.perf_counter()
if sys.argv[2] == "held":  # every object held, then labelled: as read_label_objects read before 2026-12-07
    labels = labels_from_objects(list(read_features(sys.argv[1])), rules=rules, **given)
else:
    labels = read_geojson_labels(sys.argv[1], rules=rules, **given)
print(json.dumps({"seconds": time.perf_counter() - t0, "skipped": sum(labels.counts.values()),
                  "regions": len(labels.training_regions),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
POSITIVE_CELL_DETECTION = ("Positive", "Negative")


class TrainRegions(ReadInChild):
    """``pdl1 train seg``'s reading of an image's labels beside QuPath's positive cell detection, whose cells label
    nothing: k cells/s and peak RSS."""

    child = _REGIONS_CHILD
    modes = (
        ("every object held, then labelled (as before)", "held"),
        ("ours: the cells that label nothing counted and let go as read", "passed"),
    )

    def write_inputs(self) -> None:
        self.path = self.tmp / "export-objects.geojson"
        self.bytes = write_export(
            self.path, self.cells, cell_classes=POSITIVE_CELL_DETECTION, one_line=True, first_class="Training region"
        )

    def child_args(self, mode: str) -> list[str]:
        return [str(self.path), mode]

    def check(self, label: str, said: dict) -> None:
        # Every object counted (2 annotations, 4 TMA cores, the cells), the training region read.
        if said["regions"] != 1 or said["skipped"] != self.cells + 6:
            raise RuntimeError(f"{label}: {said['regions']} regions and {said['skipped']} objects counted")

    def conditions(self) -> dict[str, str]:
        return {
            "export": f"QuPath's File > Export objects (one line): {self.cells} cells classed "
            f"{' and '.join(POSITIVE_CELL_DETECTION)} in turn (QuPath's positive cell detection; 16-vertex polygons, "
            "5 measurements), a Training region, an unclassified annotation, 4 TMA cores: "
            f"{self.bytes / 2**20:.0f} MiB",
            "labels": "a segmentation run (`pdl1 train seg`): no cell labels anything",
            **super().conditions(),
        }
