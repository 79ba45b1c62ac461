"""QuPath GeoJSON (0.4+ flavour): build, validate, write (streaming) and read features.

What QuPath's reader accepts (DESIGN.md §4): every Feature has a uuid4 ``id``, a geometry,
and ``properties.objectType``; a classification always carries a ``color``; derived classes
use ``names``; measurements are finite numbers (NaN/inf are left out, never written).
Geometry is shapely inside ``bridge``; dicts exist only here, at the file/HTTP edge.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import itertools
import json
import math
import re
import sys
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from bridge.atomic import replace_atomically
from bridge.classes import BY_NAME, PathClassSpec
from inference import Pdl1Error

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")
# What QuPath's "Export objects" also writes (all objects, with nothing selected) and this product reads but never
# writes: a TMA grid's cores, which carry no labels.
READ_ONLY_OBJECT_TYPES = ("tmaCore",)
_POINT_CHUNK = 4096
_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon")
_NUMBER_TYPES = frozenset({float, int})  # JSON's numbers; its true and false (bool) are not


class GeoJsonError(Pdl1Error, ValueError):
    """A feature QuPath's GeoJSON reader would reject."""


@dataclass(frozen=True)
class QuPathObject:
    """One QuPath object as read from or written to GeoJSON."""

    geometry: BaseGeometry
    object_type: str
    classification: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    locked: bool = False
    id: str | None = None
    color: tuple[int, int, int] | None = None
    plane_zt: tuple[int, int] = (0, 0)  # the z-slice and time point of a z-stack or time series (QuPath's ImagePlane)
    missing: bool = False  # a TMA core marked missing (QuPath writes "isMissing" for cores alone)


def classification_json(name: str, rgb: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """QuPath's classification object for a class name; derived classes get ``names``.

    >>> classification_json("Tumor: Positive")
    {'names': ['Tumor', 'Positive'], 'color': [200, 50, 50]}
    """
    spec = BY_NAME.get(name)
    if rgb is None:
        if spec is None:
            raise GeoJsonError(
                f"class {name!r} has no colour; QuPath's reader throws on a classification without "
                "one: pass rgb=(r, g, b)"
            )
        rgb = spec.rgb
    parts = PathClassSpec(name, rgb).names
    out: dict[str, Any] = {"names": parts} if len(parts) > 1 else {"name": name}
    out["color"] = [int(c) for c in rgb]
    return out


def finite_measurements(measurements: Mapping[str, float]) -> dict[str, float]:
    """Measurements as plain floats, leaving out NaN and infinities (QuPath shows missing as NaN)."""
    out = {}
    for key, value in measurements.items():
        number = float(value)
        if math.isfinite(number):
            out[str(key)] = number
    return out


def to_feature(obj: QuPathObject) -> dict[str, Any]:
    """Build a QuPath GeoJSON Feature dict from a :class:`QuPathObject`."""
    if obj.object_type not in OBJECT_TYPES:
        raise GeoJsonError(f"objectType must be one of {OBJECT_TYPES}, got {obj.object_type!r}")
    properties: dict[str, Any] = {"objectType": obj.object_type}
    if obj.name is not None:
        properties["name"] = obj.name
    if obj.classification is not None:
        properties["classification"] = classification_json(obj.classification, obj.color)
    if obj.locked:
        properties["isLocked"] = True
    measurements = finite_measurements(obj.measurements)
    if measurements:
        properties["measurements"] = measurements
    geometry = dict(shapely.geometry.mapping(obj.geometry))
    if obj.plane_zt != (0, 0):  # QuPath writes a plane only where it is not the default (ROITypeAdapters)
        geometry["plane"] = {"c": -1, "z": obj.plane_zt[0], "t": obj.plane_zt[1]}
    return {
        "type": "Feature",
        "id": obj.id or str(uuid.uuid4()),
        "geometry": geometry,
        "properties": properties,
    }


def point_features(
    xy: np.ndarray,
    classes: Sequence[str],
    cls: np.ndarray,
    measurements: Mapping[str, np.ndarray],
    *,
    object_type: str = "detection",
) -> Iterator[dict[str, Any]]:
    """Point objects straight from arrays: the features :func:`to_feature` builds one object at a time.

    For the hundreds of thousands of nuclei of a slide, where a shapely point and a
    :class:`QuPathObject` per nucleus cost more than the JSON itself. ``xy`` (N, 2) in
    level-0 px; ``cls`` (N,) indexes ``classes``; each measurement is an (N,) array, left out
    of a feature where it is not finite. Features of one class share one classification dict.
    """
    if object_type not in OBJECT_TYPES:
        raise GeoJsonError(f"objectType must be one of {OBJECT_TYPES}, got {object_type!r}")
    classifications = [classification_json(name) for name in classes]
    xy = np.asarray(xy, np.float64)
    cls = np.asarray(cls)
    columns = {str(name): np.asarray(values, np.float64) for name, values in measurements.items()}
    # Python floats in chunks: converting a whole slide's arrays at once would hold them all.
    for lo in range(0, len(xy), _POINT_CHUNK):
        hi = lo + _POINT_CHUNK
        chunk = [(name, values[lo:hi].tolist()) for name, values in columns.items()]
        for i, ((x, y), c) in enumerate(zip(xy[lo:hi].tolist(), cls[lo:hi].tolist(), strict=True)):
            properties: dict[str, Any] = {"objectType": object_type, "classification": classifications[c]}
            values = {name: column[i] for name, column in chunk if math.isfinite(column[i])}
            if values:
                properties["measurements"] = values
            yield {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Point", "coordinates": [x, y]},
                "properties": properties,
            }


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, a dict told first: an ABC's test costs more, millions of times per slide."""
    return type(value) is dict or isinstance(value, Mapping)


# The form QuPath writes an id in (java.util.UUID.toString): tested first, as uuid.UUID parses every id slowly.
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _is_uuid(fid: Any) -> bool:
    """Whether ``str(fid)`` is a UUID as ``uuid.UUID`` reads one (QuPath's form, or braces, a URN, no dashes)."""
    text = str(fid)
    if _CANONICAL_UUID.fullmatch(text):
        return True
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def validate_feature(feature: Mapping[str, Any], *, reading: bool = False) -> None:
    """Raise :class:`GeoJsonError` naming the problem if QuPath could not read ``feature``.

    ``reading``: a feature read from a file, held to what QuPath 0.4+ writes rather than to what this module writes:
    a TMA core, a classification without a colour, a cell without a nucleus (cell detection without "Include cell
    nucleus") pass."""
    if not _is_mapping(feature):
        raise GeoJsonError(f"expected a Feature object, got {type(feature).__name__} {feature!r:.80}")
    if feature.get("type") != "Feature":
        raise GeoJsonError(f"expected type 'Feature', got {feature.get('type')!r}")
    fid = feature.get("id")
    if not _is_uuid(fid):
        raise GeoJsonError(f"feature id must be a UUID string, got {fid!r}")
    geometry = feature.get("geometry")
    if not _is_mapping(geometry) or geometry.get("type") not in _GEOMETRY_TYPES:
        raise GeoJsonError(f"feature {fid}: geometry must be one of {_GEOMETRY_TYPES}, got {geometry!r:.80}")
    _check_coordinates(geometry.get("coordinates"), fid, geometry.get("type"))
    props = feature.get("properties")
    if not _is_mapping(props):
        raise GeoJsonError(f"feature {fid}: properties missing")
    types = (*OBJECT_TYPES, *READ_ONLY_OBJECT_TYPES) if reading else OBJECT_TYPES
    if props.get("objectType") not in types:
        raise GeoJsonError(f"feature {fid}: objectType must be one of {types}, got {props.get('objectType')!r}")
    cls = props.get("classification")
    if cls is not None:
        if not _is_mapping(cls) or not ("name" in cls or "names" in cls):
            raise GeoJsonError(f"feature {fid}: classification needs 'name' or 'names', got {cls!r}")
        names = cls["names"] if "names" in cls else [cls["name"]]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GeoJsonError(f"feature {fid}: a class name must be text (or 'names' a list of text), got {cls!r:.80}")
        color = cls.get("color")
        rgb_ok = isinstance(color, list) and len(color) == 3
        if (color is not None or not reading) and not (
            rgb_ok and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        ):
            raise GeoJsonError(
                f"feature {fid}: classification {cls!r} needs 'color': [r, g, b] (QuPath throws without it)"
            )
    measurements = props.get("measurements") or {}
    if not _is_mapping(measurements):
        raise GeoJsonError(f"feature {fid}: measurements must be an object of name: number, got {measurements!r:.80}")
    values = measurements.values()
    if not (set(map(type, values)) <= _NUMBER_TYPES and math.isfinite(sum(values))):  # else find which, and say
        for key, value in measurements.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GeoJsonError(f"feature {fid}: measurement {key!r} must be a finite number, got {value!r}")
    if props.get("objectType") == "cell" and "nucleusGeometry" not in feature and not reading:
        raise GeoJsonError(f"feature {fid}: a cell carries 'nucleusGeometry' at the top level of the Feature")


@dataclass(frozen=True)
class CoordinateScan:
    """What :func:`scan_coordinates` found in GeoJSON ``coordinates``."""

    depth: int  # how many lists deep: a Point 1, a Polygon 3, a MultiPolygon 4
    non_finite: Any = None  # the first NaN, infinity or JSON true/false among the numbers (shapely takes true as 1)
    stray: str | None = None  # repr of the first item neither a list of numbers nor of lists (a string, null, ...)


def scan_coordinates(coordinates: Any) -> CoordinateScan:
    """Walk nested GeoJSON ``coordinates`` once, without recursion: a request or file can nest lists
    thousands deep, past Python's recursion limit and shapely's (QuPath's reader and the service both ask).

    >>> scan_coordinates([[[0, 0], [1, 0], [1, 1], [0, 0]]])
    CoordinateScan(depth=3, non_finite=None, stray=None)
    >>> scan_coordinates([[0, float("nan")], [1, "a"]]).non_finite, scan_coordinates([[0, 1], [1, "a"]]).stray
    (nan, "[1, 'a']")
    """
    depth, non_finite, stray = 0, None, None
    stack: list[tuple[Any, int]] = [(coordinates, 1)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, list | tuple):
            stray = f"{item!r:.80}" if stray is None else stray
            continue
        depth = level if level > depth else depth
        numbers = [isinstance(v, int | float) for v in item]  # bool is an int here
        if item and all(numbers):  # a position
            if non_finite is None:
                non_finite = next((v for v in item if v is True or v is False or not math.isfinite(v)), None)
        elif any(numbers):  # numbers beside lists or strings
            stray = f"{item!r:.80}" if stray is None else stray
        else:
            stack.extend((child, level + 1) for child in reversed(item))
    return CoordinateScan(depth, non_finite, stray)


# How many lists hold a geometry type's positions: a Polygon's coordinates are a list of rings, each a list of them.
_POSITION_NESTING = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}


def _plain_positions(coordinates: Any, kind: Any) -> list[list] | None:
    """The positions of ``coordinates`` nested as GeoJSON nests a ``kind``, each 2 or 3 finite numbers; None for
    anything else, which :func:`scan_coordinates` then names. What passes here passes that scan too: this is its
    shortcut for the common case, type tests in C rather than a Python loop over every number (a slide's cells hold
    millions)."""
    nesting = _POSITION_NESTING.get(kind)
    if nesting is None:
        return None
    level = [coordinates]
    for _ in range(nesting):
        if set(map(type, level)) != {list}:
            return None
        level = list(itertools.chain.from_iterable(level))
    if not level or set(map(type, level)) != {list} or not set(map(len, level)) <= {2, 3}:
        return None
    numbers = list(itertools.chain.from_iterable(level))
    if not set(map(type, numbers)) <= _NUMBER_TYPES or not math.isfinite(sum(numbers)):  # a sum past 1e308: scanned
        return None
    return level


def _check_coordinates(coords: Any, fid: Any, kind: Any = None) -> None:
    if _plain_positions(coords, kind) is not None:
        return
    scan = scan_coordinates(coords)
    if scan.depth > 4:  # deeper than a MultiPolygon's: shapely would recurse past Python's limit
        raise GeoJsonError(f"feature {fid}: coordinates nested deeper than a MultiPolygon's (4 lists)")
    if scan.stray is not None:
        raise GeoJsonError(f"feature {fid}: malformed coordinates near {scan.stray}")
    if scan.non_finite is not None:
        raise GeoJsonError(f"feature {fid}: coordinates must be finite numbers, got {json.dumps(scan.non_finite)}")


def write_features(path: str | Path, features: Iterable[Mapping[str, Any]]) -> int:
    """Stream features into a FeatureCollection file, validating each; returns the count.

    Written to a temporary file beside ``path`` and renamed at the end, so a failure
    leaves no half-written file (an earlier one stays as it was).
    """
    with replace_atomically(Path(path)) as fh:
        return write_features_to(fh, features)


def write_features_to(fh: TextIO, features: Iterable[Mapping[str, Any]]) -> int:
    """Stream features into an open text file as one FeatureCollection, validating each; returns the count."""
    count = 0
    fh.write('{"type":"FeatureCollection","features":[\n')
    for feature in features:
        validate_feature(feature)
        if count:
            fh.write(",\n")
        fh.write(json.dumps(feature, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        count += 1
    fh.write("\n]}\n")
    return count


# How QuPath writes a measurement it has no number for (QuPathTypeAdapters' MeasurementListTypeAdapter, 0.5 on; 0.4
# writes a bare NaN, which Python's json reads as a float): missing values, as QuPath shows them.
QUPATH_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


def _without_missing_measurements(feature: Mapping[str, Any]) -> Mapping[str, Any]:
    """``feature`` with the measurements QuPath wrote as missing (NaN, infinities) left out, as this module writes
    them: QuPath's own objects carry them (a cell detection's measurement of a stain the image lacks), and reading
    them must not fail where writing them would be refused."""
    props = feature.get("properties") if _is_mapping(feature) else None
    measurements = props.get("measurements") if _is_mapping(props) else None
    if not _is_mapping(measurements):
        return feature
    kept = {
        key: value
        for key, value in measurements.items()
        if not (isinstance(value, str) and value in QUPATH_NON_FINITE)
        and not (isinstance(value, float) and not math.isfinite(value))
    }
    if len(kept) == len(measurements):
        return feature
    return {**feature, "properties": {**props, "measurements": kept}}


def class_name(classification: Any) -> str | None:
    """The class a GeoJSON ``classification`` names, as QuPath shows it (a derived class's ``names`` joined:
    ``Tumor: Positive``); None for no classification.

    >>> class_name({"names": ["Tumor", "Positive"], "color": [200, 50, 50]}), class_name(None)
    ('Tumor: Positive', None)
    """
    if not _is_mapping(classification):
        return None
    if "names" in classification:
        return ": ".join(str(n) for n in classification["names"])
    name = classification.get("name")
    return None if name is None else str(name)


# What QuPath 0.2 wrote as a feature's id: its object's Java class (0.3 wrote none, 0.4 on a UUID).
_QUPATH_02_IDS = frozenset(
    {"PathAnnotationObject", "PathDetectionObject", "PathCellObject", "PathTileObject", "TMACoreObject"}
)
# The namespace of the ids given to features read without one (uuid5 of the feature: the same file, the same ids).
_READ_ID_NAMESPACE = uuid.UUID("5d1e3a52-8c0e-4f7e-9b8e-6a1f2c3d4e5f")


def _written_before_04(feature: Mapping[str, Any]) -> str | None:
    """What marks ``feature`` as QuPath 0.2's or 0.3's GeoJSON (PathObjectTypeAdapters, GsonTools v0.3.2), or None."""
    props = feature.get("properties")
    if _is_mapping(props):
        if "object_type" in props:
            return "'object_type', not 'objectType'"
        cls = props.get("classification")
        if _is_mapping(cls) and "colorRGB" in cls and "color" not in cls:
            return "a classification's 'colorRGB', not 'color'"
        if isinstance(props.get("measurements"), list):
            return "measurements as a list of name and value, not an object"
    if isinstance(feature.get("id"), str) and feature["id"] in _QUPATH_02_IDS:
        return f"the id {feature['id']!r}, not a UUID"
    return None


def as_written_by_qupath(feature: Any) -> Any:
    """``feature`` in the form QuPath 0.4+ writes, from the other forms QuPath's reader takes (GsonTools,
    QuPathTypeAdapters v0.4.4 to v0.7.0): no ``objectType`` (an annotation), a classification given as its name
    alone, a class colour with alpha (``[r, g, b, a]``), no id or one that is not a UUID (a uuid5 of the feature is
    given, the same on every read). GeoJSON of QuPath 0.2 or 0.3 is refused, naming what marks it: its classes,
    object types and measurements are written otherwise. Anything else is returned as it is, for
    :func:`validate_feature` to name."""
    if not _is_mapping(feature) or feature.get("type") != "Feature":
        return feature
    old = _written_before_04(feature)
    if old is not None:
        who = "a feature" if feature.get("id") is None else f"feature {feature['id']}"
        raise GeoJsonError(
            f"{who}: GeoJSON of QuPath 0.3 or earlier ({old}); pdl1 reads what QuPath 0.4.4 "
            "and later write: open the project (or import these objects) in QuPath 0.4.4 or later and export again"
        )
    props = feature.get("properties", {})
    if props is None:  # QuPath reads a feature of no properties as an unclassified annotation
        props = {}
    if not _is_mapping(props):
        return feature
    props = {"objectType": "annotation", **props}  # QuPath's reader makes an object of no type an annotation
    cls = props.get("classification")
    if isinstance(cls, str):  # PathClass.fromString
        props["classification"] = {"name": cls}
    elif _is_mapping(cls) and isinstance(cls.get("color"), list) and len(cls["color"]) == 4:
        color = cls["color"]
        if all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            props["classification"] = {**cls, "color": color[:3]}  # its alpha: QuPath's class colour with alpha
    out = {**feature, "properties": props}
    fid = feature.get("id")
    if not _is_uuid(fid):
        text = json.dumps(feature, sort_keys=True, default=str)
        out["id"] = str(uuid.uuid5(_READ_ID_NAMESPACE, text))
    return out


def from_feature(feature: Mapping[str, Any]) -> QuPathObject:
    """Parse one QuPath GeoJSON feature (as QuPath 0.4+ writes them, and the other forms its reader takes:
    :func:`as_written_by_qupath`); measurements QuPath wrote as missing ("NaN", "Infinity", or a bare NaN) are left
    out. A TMA core (``objectType`` ``tmaCore``) is read as such: the caller passes over it."""
    feature = as_written_by_qupath(_without_missing_measurements(feature))
    validate_feature(feature, reading=True)
    props = feature["properties"]
    cls = props.get("classification")
    name = class_name(cls)
    name = None if name is None else sys.intern(name)
    color = None if cls is None or cls.get("color") is None else tuple(cls["color"])
    try:  # the nesting and counts shapely needs: a ring of 4+ points, a line of 2+, a point of 2-3 numbers
        geometry = _polygon(feature["geometry"]) or shapely.geometry.shape(feature["geometry"])
    except (ValueError, TypeError, IndexError, shapely.errors.ShapelyError) as err:
        kind, why = feature["geometry"]["type"], str(err).strip()
        raise GeoJsonError(
            f"feature {feature['id']}: not a valid {kind} ({why}); a Polygon is a list of rings, each a closed list "
            "of 4 or more [x, y] points, a LineString 2 or more points, a Point one [x, y]"
        ) from err
    plane = feature["geometry"].get("plane")
    plane_zt = (0, 0)
    if plane is not None:
        z, t = (plane.get("z", 0), plane.get("t", 0)) if _is_mapping(plane) else (None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (z, t)):
            raise GeoJsonError(
                f"feature {feature['id']}: its geometry's plane must be an object of whole numbers z and t from 0, "
                f'as QuPath writes it ({{"c": -1, "z": 0, "t": 0}}), got {plane!r:.80}'
            )
        plane_zt = (z, t)
    return QuPathObject(
        geometry=geometry,
        plane_zt=plane_zt,
        object_type=props["objectType"],
        classification=name,
        # Names and classes interned: a slide's cells repeat a few of each, which parsed a line at a time are new
        # strings per cell (a third of the memory of 300 000 cells held as objects).
        measurements={sys.intern(k): float(v) for k, v in (props.get("measurements") or {}).items()},
        name=props.get("name"),
        locked=bool(props.get("isLocked", False)),
        id=str(feature["id"]),
        color=color,
        missing=props["objectType"] == "tmaCore" and props.get("isMissing") is True,
    )


def _polygon(geometry: Mapping[str, Any]) -> BaseGeometry | None:
    """A Polygon's shapely geometry built from arrays (the bulk of a slide's objects: cells, nuclei), as
    ``shapely.geometry.shape`` builds it point by point in Python; None for any other geometry or one whose rings
    are not each 4 or more positions of one dimension, left to ``shape`` and its errors."""
    rings = geometry["coordinates"]
    if geometry["type"] != "Polygon" or not rings or any(len(ring) < 4 for ring in rings):
        return None
    try:
        arrays = [np.asarray(ring, dtype=np.float64) for ring in rings]
    except ValueError:  # positions of 2 and 3 numbers mixed
        return None
    if any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1 or arrays[0].shape[1] not in (2, 3):
        return None
    if len(arrays) == 1:
        return shapely.polygons(arrays[0])
    # Each hole a ring of its own: holes of different lengths do not stack into one array.
    return shapely.polygons(shapely.linearrings(arrays[0]), holes=[shapely.linearrings(a) for a in arrays[1:]])


def read_geojson_text(path: str | Path) -> str:
    """The text of a GeoJSON file as QuPath's *Export objects* writes it: plain, or compressed (a ``.zip`` holding
    one GeoJSON file, or a ``.gz``: what QuPath's PathIO writes for a name so ending and reads back, v0.4.4 to
    v0.7.0). Refused past :data:`MAX_FEATURE_CHARS` (:func:`read_features` reads a larger export a feature at a
    time)."""
    with _open_text(Path(path)) as fh:
        text = fh.read(MAX_FEATURE_CHARS + 1)
    if len(text) > MAX_FEATURE_CHARS:
        raise GeoJsonError(
            f"{Path(path).name} is over {MAX_FEATURE_CHARS / 2**20:g} Mi characters and not laid out as QuPath exports "
            "objects (a list of features or a FeatureCollection, which are read a feature at a time), so it would be "
            "read whole: it is no export of QuPath's, or a damaged one (is it valid JSON?); export the objects again"
        )
    return text


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """``path``'s text as a stream, decompressed where it is a ``.gz`` or a ``.zip`` (:func:`read_geojson_text`); a
    compressed file that is damaged or cut short, found so while it is read or by its checksums where what was read
    does not parse, raises :class:`GeoJsonError`."""
    kind = path.suffix.lower()
    if kind not in (".gz", ".zip"):
        with path.open(encoding="utf-8") as fh:
            yield fh
        return
    try:
        with contextlib.ExitStack() as stack:
            if kind == ".gz":
                fh = stack.enter_context(gzip.open(path, "rt", encoding="utf-8"))
                packed_bytes = path.stat().st_size
            else:
                archive = stack.enter_context(zipfile.ZipFile(path))
                inside = _geojson_inside(archive)
                member = stack.enter_context(archive.open(inside))
                fh = stack.enter_context(io.TextIOWrapper(member, encoding="utf-8"))
                packed_bytes = archive.getinfo(inside).compress_size
            yield _BoundedText(fh, path, packed_bytes)
    except (FileNotFoundError, ExpandsTooFarError):  # the latter: not to be decompressed again for its checksum
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # cut short, damaged, or not compressed
        raise GeoJsonError(f"not a readable {kind} file ({err})") from err
    except ValueError as err:
        # Text that does not decode or parse, or a feature that does not validate, read before the end of the file,
        # where its checksum is tested: damage the checksum finds is named as such (a stored, uncompressed, member
        # has no other check), else the error stands.
        damage = _compressed_damage(path, kind)
        if damage is not None:
            raise GeoJsonError(f"not a readable {kind} file ({damage})") from err
        raise


def _compressed_damage(path: Path, kind: str) -> str | None:
    """What is wrong with a ``.gz`` or ``.zip`` file read to its end, checksums tested; None where nothing is."""
    try:
        if kind == ".gz":
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"a bad checksum in {bad}"
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        return str(err)


# Past what a GeoJSON export is, a file is refused rather than read into memory (a small .gz or .zip can hold GBs of
# white space or one string: 1 MB of zip held 1 GiB of white space, read whole into 2.1 GB of memory).
MAX_FEATURE_CHARS = 1 << 28  # one feature (a line, or one object of the list), or a file read whole: 256 Mi characters
# QuPath's exports compress 5 to 8 times (pretty-printed 13 to 19); beyond this many times, plus the allowance, they
# are not what they claim.
MAX_EXPANSION = 64
_EXPANSION_ALLOWANCE_CHARS = 1 << 26


class ExpandsTooFarError(GeoJsonError):
    """A compressed GeoJSON file that decompresses to far more than any export does (a compression bomb)."""


class _BoundedText(io.TextIOBase):
    """A decompressed text stream that refuses to give more than :data:`MAX_EXPANSION` times its compressed size (and
    the allowance): what reads it reads no further than that, whatever it asks for."""

    def __init__(self, fh: TextIO, path: Path, packed_bytes: int) -> None:
        self._fh, self._path, self._packed_bytes = fh, path, packed_bytes
        self._limit = MAX_EXPANSION * packed_bytes + _EXPANSION_ALLOWANCE_CHARS
        self._given = 0

    def _counted(self, text: str) -> str:
        self._given += len(text)
        if self._given > self._limit:
            raise ExpandsTooFarError(
                f"{self._path.name} decompresses to more than {self._limit / 2**20:.0f} Mi characters from "
                f"{self._packed_bytes} bytes, over {MAX_EXPANSION} times its size (QuPath's GeoJSON exports compress 5 "
                "to 20 times): not an export, or one made to fill the memory. Decompress it yourself and give the "
                "GeoJSON file, if you know where it comes from"
            )
        return text

    def _room(self, size: int | None) -> int:
        room = self._limit - self._given + 1  # one past the limit, to tell reaching it from passing it
        return room if size is None or size < 0 else min(size, room)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        return self._counted(self._fh.read(self._room(size)))

    def readline(self, size: int | None = -1) -> str:
        return self._counted(self._fh.readline(self._room(size)))


def _geojson_inside(archive: zipfile.ZipFile) -> str:
    """The name of the one GeoJSON file a ``.zip`` export holds."""
    inside = [
        n
        for n in archive.namelist()
        if n.lower().endswith((".geojson", ".json"))
        and not n.startswith("__MACOSX/")  # what macOS's Finder adds to a zip it makes
        and not Path(n).name.startswith("._")
    ]
    if len(inside) != 1:
        raise GeoJsonError(
            f"a .zip export holds one GeoJSON file; this one holds {len(inside)} "
            f"({', '.join(inside[:3]) or 'none'}): export again, or give the GeoJSON file itself"
        )
    return inside[0]


def read_features(
    path: str | Path, *, keep: Callable[[Any], bool] | None = None, unparsed: Sequence[str] = ()
) -> Iterator[QuPathObject]:
    """Read a QuPath GeoJSON file (:func:`read_geojson_text`): a FeatureCollection, a list of features, or one
    feature. ``keep(feature)``, given, passes over the feature dicts it rejects before they are parsed: a slide's
    hundreds of thousands of nuclei cost a reader that wants its regions and tiles seconds per image
    (:func:`not_detections`).

    A slide's cells are hundreds of MB of JSON, which parsed whole took five times their size in memory, so a file
    is read a piece at a time where its layout allows, compressed or not: one feature a line (this module's
    :func:`write_features`, ``pdl1_export_labels.groovy``) a line at a time; a list of features or a
    FeatureCollection (QuPath's *Export objects*, compact or pretty-printed; GDAL's) a feature at a time. Lines
    holding one of the texts ``unparsed`` are passed over without parsing in the first; they must be features
    ``keep`` rejects (such as :data:`DETECTION_LINE_TYPES` with :func:`not_detections`), so the objects are the same
    whichever way the file is read. One Feature is read whole, and so is a file that turns out to be no JSON, for
    JSON's own error (a malformed feature before the fault is named first)."""
    path = Path(path)
    done = 0  # features already passed on: a layout broken further on is read another way after them
    for reader in (_features_by_line, _features_streamed):
        try:
            with _open_text(path) as fh:
                for k, item in enumerate(reader(fh, unparsed)):
                    if k < done:
                        continue
                    done += 1
                    if item is not _UNPARSED and (keep is None or keep(item)):
                        yield from_feature(item)
            return
        except _OtherLayoutError:
            continue
    items = _features_whole(path)
    for i in range(done, len(items)):
        item, items[i] = items[i], None  # let go of each as it is read: less to hold, and for the collector to walk
        if keep is None or keep(item):
            yield from_feature(item)


# How a feature line's object type reads where QuPath's Gson (compact: no spaces) or this module wrote it: inside a
# JSON string the quotes would be escaped, so a line holding one is a detection's or a cell's, whatever names say.
DETECTION_LINE_TYPES = ('"objectType":"detection"', '"objectType":"cell"')
# The first and last line of a file written one feature a line: pdl1_export_labels.groovy's, write_features_to's.
_LINE_LAYOUTS = {"[": "]", '{"type":"FeatureCollection","features":[': "]}"}
_UNPARSED = object()  # a line passed over unparsed (``unparsed``)
_FEATURE_START = '{"type":"Feature"'  # how QuPath's Gson and this module begin a feature
_JSON_SPACE = " \t\r\n"  # JSON's whitespace (str.strip's default takes more: no-break spaces, form feeds)


class _OtherLayoutError(Exception):
    """The file is not in the layout a reader reads (from where that shows): the next reader reads it."""


def _features_by_line(fh: TextIO, unparsed: Sequence[str]) -> Iterator[Any]:
    """The feature dicts of a file in a :data:`_LINE_LAYOUTS` layout, one line at a time (:data:`_UNPARSED` for a
    line holding one of ``unparsed``); raises :class:`_OtherLayoutError` where the file turns out to be laid out
    otherwise (pretty-printed, one line, two objects on a line, a comma missing or extra, text after the end), so that
    what this yields is what parsing the whole file gives, in order (a FeatureCollection that repeats its "features" key
    after the first list aside: JSON keeps the last). A line passed over unparsed is taken for one feature as QuPath's
    Gson and :func:`write_features` write them (it begins ``{"type":"Feature"``, ends ``}``, and names one Feature and
    one ``objectType``) and is not checked further: a malformed one goes unnoticed, and JSON laid out otherwise on such
    a line (two features, one spread over lines) could pass for one, which neither writer does. A file that ends
    without its closing line, every object of it parsed, cannot be JSON: it is refused here (:class:`GeoJsonError`),
    not parsed whole again."""
    count, passed_over = 0, False
    closing = _LINE_LAYOUTS.get(fh.readline(64).strip(_JSON_SPACE))  # 64: not a whole one-line export of 1 GB
    if closing is None:
        raise _OtherLayoutError
    comma = None  # whether the last feature line ended with a comma (None: no feature yet)
    while line := fh.readline(MAX_FEATURE_CHARS + 1):
        if len(line) > MAX_FEATURE_CHARS:
            raise _too_long(f"feature {count + 1}")
        text = line.strip(_JSON_SPACE)
        if not text:
            continue
        if text == closing:
            if comma or _rest(fh).strip(_JSON_SPACE):  # "[{...},]" or text after the end: JSON's parser names it
                raise _OtherLayoutError
            return
        if comma is False:
            raise _OtherLayoutError
        comma = text.endswith(",")
        text = text.removesuffix(",")
        count += 1
        if any(marker in text for marker in unparsed):
            # One compact feature, whole, on the line, whose own type the marker is: unescaped, '"Feature"' and
            # '"objectType":' are JSON's, not in a name's text.
            if not (
                text.startswith(_FEATURE_START)
                and text.endswith("}")
                and text.count('"Feature"') == 1
                and text.count('"objectType":') == 1
            ):
                raise _OtherLayoutError
            passed_over = True
            yield _UNPARSED
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError:
            raise _OtherLayoutError from None
        if not isinstance(item, dict):
            raise _OtherLayoutError
        yield item
    if passed_over:  # a line not parsed may hold the end itself ("{...}]"): JSON's parser decides
        raise _OtherLayoutError
    raise _cut_short(count, closing)


def _rest(fh: TextIO) -> str:
    """What follows the list of features, to its end: the end of a collection and its members after the features, a
    feature's worth at most."""
    rest = fh.read(MAX_FEATURE_CHARS + 1)
    if len(rest) > MAX_FEATURE_CHARS:
        raise _too_long("what follows the features")
    return rest


def _too_long(where: str) -> GeoJsonError:
    """A feature, or a file to be read whole, longer than :data:`MAX_FEATURE_CHARS`: refused before it fills memory."""
    return GeoJsonError(
        f"{where} runs past {MAX_FEATURE_CHARS / 2**20:g} Mi characters, more than one QuPath object takes (a whole "
        "slide's outline of millions of vertices is tens of MB): not an export of QuPath's; export the objects again, "
        "or split such an object in QuPath (Objects > Annotations > Split annotations)"
    )


def _cut_short(count: int, closing: str) -> GeoJsonError:
    """A file that ends after ``count`` objects without the ``closing`` of their list: no JSON, and not to be parsed
    again whole to be told so (a GB file took GBs to fail)."""
    return GeoJsonError(
        f"cut short: the file ends after {count} object{'' if count == 1 else 's'} without the closing {closing!r} of "
        "their list (an export or a copy interrupted, or the disk full?)"
    )


_SKIP_SPACE = re.compile(f"[{_JSON_SPACE}]*")
_STREAM_CHUNK_CHARS = 1 << 22  # 4 Mi characters read at a time


_RUNS_ON = object()  # what _collection_opening says of an opening that runs past the text read so far


def _collection_opening(buf: str) -> tuple[int, dict[str, Any] | None] | object | None:
    """Where the features in ``buf`` begin (after the "[" of a list of them, or of a FeatureCollection's "features")
    and the collection's members before them (None for a list): QuPath's Gson writes "type" then "features"
    (QuPathTypeAdapters v0.7.0:218-223), GDAL's GeoJSON (geopandas, QGIS) "type", "name" and "crs" first.
    :data:`_RUNS_ON` where the opening runs past ``buf`` (a large member before the features: read on); None where the
    text begins otherwise, or "type" is named twice or as anything but a FeatureCollection: parsed whole, JSON
    decides."""
    decode = json.JSONDecoder().raw_decode
    pos = _SKIP_SPACE.match(buf).end()
    if buf.startswith("[", pos):
        return pos + 1, None
    if not buf.startswith("{", pos):
        return _RUNS_ON if pos >= len(buf) else None
    before: dict[str, Any] = {}
    while True:  # at the "{", then at each ","
        try:
            name, pos = decode(buf, _SKIP_SPACE.match(buf, pos + 1).end())
            pos = _SKIP_SPACE.match(buf, pos).end()
            if not (isinstance(name, str) and buf.startswith(":", pos)):
                return _RUNS_ON if pos >= len(buf) else None
            pos = _SKIP_SPACE.match(buf, pos + 1).end()
            if name == "features":
                return (pos + 1, before) if buf.startswith("[", pos) else _RUNS_ON if pos >= len(buf) else None
            value, pos = decode(buf, pos)
        except json.JSONDecodeError as err:  # not JSON, or the opening longer than buf
            return _RUNS_ON if err.msg.startswith("Unterminated string") or err.pos >= len(buf) - 16 else None
        except ValueError:  # a number over int's digit limit: parsed whole, JSON names it
            return None
        if name == "type" and ("type" in before or value != "FeatureCollection"):
            return None
        before[name] = value
        pos = _SKIP_SPACE.match(buf, pos).end()
        if not buf.startswith(",", pos):
            return _RUNS_ON if pos >= len(buf) else None


def _features_streamed(fh: TextIO, _unparsed: Sequence[str] = ()) -> Iterator[Any]:
    """The feature dicts of a list of features, or of a FeatureCollection (:func:`_collection_opening`), one at a time,
    by the decoder ``json.loads`` uses: the same objects, holding a chunk of the text (and the feature being read) at
    a time rather than all of it and its whole tree. Raises :class:`_OtherLayoutError` where the file turns out to be
    laid out otherwise (an item that is no object) or not to be JSON (the whole-file parse names the problem as JSON
    does, unless a feature before it was malformed: that is named first). A file that ends between two objects, or
    after the last without the end of the list, is refused here (:class:`GeoJsonError`), and so is an object whose
    "type" is not FeatureCollection, or is named twice, or that names "features" twice, found after its features (JSON
    keeps the last of a repeated name without a word: names in an object SHOULD be unique, RFC 8259; no writer of
    GeoJSON repeats one). Other members (a "bbox", a "crs") are read and left, as QuPath leaves them."""
    decode = json.JSONDecoder().raw_decode
    buf = fh.read(max(_STREAM_CHUNK_CHARS, 4096))  # the opening whole, as any writer writes it
    while (opening := _collection_opening(buf)) is _RUNS_ON and len(buf) <= MAX_FEATURE_CHARS:
        more_text = fh.read(min(len(buf), MAX_FEATURE_CHARS + 1 - len(buf)))  # as much again: linear time
        if not more_text:
            break
        buf += more_text
    if not isinstance(opening, tuple):
        raise _OtherLayoutError
    (pos, before), count = opening, 0

    def more(at_least: int) -> bool:
        """Read on (at least ``at_least`` characters, so that an object longer than a chunk costs linear time)."""
        nonlocal buf, pos
        chunk = fh.read(max(at_least, _STREAM_CHUNK_CHARS))
        if not chunk:
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def next_char() -> str | None:
        """The next character that is not JSON's whitespace (None at the end of the file)."""
        nonlocal pos
        while True:
            pos = _SKIP_SPACE.match(buf, pos).end()
            if pos < len(buf):
                return buf[pos]
            if not more(0):
                return None

    while (c := next_char()) != "]":
        if c is not None and count:
            if c != ",":
                raise _OtherLayoutError
            pos += 1
            c = next_char()
        if c is None:
            raise _cut_short(count, "]")
        while True:
            try:
                item, pos = decode(buf, pos)
                break
            except ValueError as err:
                # The text read so far ends inside the object (a string running to its end, or an error within a
                # token of it; or a number cut at its digits, over int's 4300-digit limit as read so far): read on and
                # decode again. Anything else is not JSON: parsed whole, JSON names it.
                runs_on = not isinstance(err, json.JSONDecodeError) or (
                    err.msg.startswith("Unterminated string") or err.pos >= len(buf) - 16
                )
                if runs_on and len(buf) - pos > MAX_FEATURE_CHARS:
                    raise _too_long(f"feature {count + 1}") from None
                # Read on as much again (linear time for a long object), to one past the limit at most.
                if not (runs_on and more(min(len(buf) - pos, MAX_FEATURE_CHARS + 1 - (len(buf) - pos)))):
                    raise _OtherLayoutError from None
        if not isinstance(item, dict):
            raise _OtherLayoutError
        count += 1
        yield item
    rest = (buf[pos + 1 :] + _rest(fh)).strip(_JSON_SPACE)  # after the list: nothing, or the collection's end
    if before is None:
        if rest:  # text after the end: JSON names it
            raise _OtherLayoutError
        return
    after: list[tuple[str, Any]] = []  # the collection's members after its features
    if rest != "}":
        if not rest.startswith(","):  # the collection's end missing, or text after it: JSON names it
            raise _OtherLayoutError
        try:
            after, end = json.JSONDecoder(object_pairs_hook=list).raw_decode("{" + rest[1:])
        except ValueError:
            raise _OtherLayoutError from None
        if end != len(rest):
            raise _OtherLayoutError
    names = [*before, *(name for name, _ in after)]
    again = "features" if "features" in names else "type" if names.count("type") > 1 else None
    if again is not None:
        raise GeoJsonError(
            f"the FeatureCollection names {again!r} twice, the second time after its {count} features, so which "
            "holds is a reader's guess (JSON keeps the last); export the objects again from QuPath"
        )
    kind = before.get("type", next((value for name, value in after if name == "type"), None))
    if kind != "FeatureCollection":
        raise _not_geojson_objects(f"an object of type {kind!r}")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector paused: parsing a file of cells whole (lists and dicts by the million, none in a cycle)
    set it off again and again over the growing tree, 40 % of reading a 260 MiB export of QuPath's."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _features_whole(path: Path) -> list[Any]:
    """The feature dicts of a GeoJSON file parsed whole (any layout; compressed too)."""
    text = read_geojson_text(path)
    with _collector_paused():
        data = json.loads(text)
    del text
    if _is_mapping(data) and data.get("type") == "FeatureCollection":
        items = data.get("features", [])
        if not isinstance(items, list):
            raise GeoJsonError(f"a FeatureCollection's 'features' must be a list, got {type(items).__name__}")
        return items
    if isinstance(data, list):
        return data
    if _is_mapping(data) and data.get("type") == "Feature":
        return [data]
    # any other JSON (a run's summary, a config) said "expected type 'Feature', got None"
    raise _not_geojson_objects(f"an object of type {data.get('type')!r}" if _is_mapping(data) else type(data).__name__)


def _not_geojson_objects(kind: str) -> GeoJsonError:
    return GeoJsonError(
        f"not GeoJSON objects: the file holds {kind}; expected a FeatureCollection, a list of features or one "
        "Feature, as QuPath exports them"
    )


def not_detections(feature: Any) -> bool:
    """``keep`` for :func:`read_features`: everything but detections and cells (nuclei), told from the feature dict
    before it is parsed (a malformed one is kept, for the parse to name)."""
    props = feature.get("properties") if _is_mapping(feature) else None
    return not _is_mapping(props) or props.get("objectType") not in ("detection", "cell")


def keep_detections_of(wanted: Callable[[str | None], bool]) -> Callable[[Any], bool]:
    """``keep`` for :func:`read_features`: everything but the detections and cells whose class (as :func:`from_feature`
    reads it: a name alone too, as QuPath takes it) ``wanted`` rejects, told from the feature dict before it is parsed.
    A malformed classification is kept, for the parse to name (it raised a TypeError here, or passed unnoticed)."""

    def keep(feature: Any) -> bool:
        if not_detections(feature):
            return True
        cls = feature["properties"].get("classification")
        if cls is None or isinstance(cls, str):
            return wanted(cls)
        names = cls.get("names", [cls.get("name")]) if _is_mapping(cls) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return True
        return wanted(": ".join(names))

    return keep
