"""A project's ``pdl1-config.toml``: the defaults ``pdl1 run`` and the Groovy scripts share.

``pdl1 init-project`` copies ``project_templates/pdl1/config.toml`` beside ``project.qpproj``.
``pdl1 run PROJECT`` reads it (command-line options go over it, built-in defaults under it) and
records in each summary which file and which values it used; ``pdl1_analyze.groovy`` reads the
service keys, the outputs and the targets from the same file with its own small reader. Every
key is checked: a file that is not TOML, an unknown table or key, or a value of the wrong type
is refused with the file, the line and what was expected.

>>> config = ProjectConfig().with_overrides(device="cpu")
>>> config.device, config.source_of("device")
('cpu', 'command line')
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bridge.project import ProjectError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "pdl1-config.toml"
OUTPUTS = ("regions", "uncertainty_tiles", "sua", "nuclei")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# What runs the models' members (SegmentConfig.runtime); checked here too, so a wrong word fails before a run.
RUNTIMES = ("auto", "torch", "openvino")

_STRING, _STRINGS, _NUMBER = "a string", "an array of strings", "a number"
# Every key a config may hold: its table, its name, what its value must be, and the ProjectConfig field.
SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "service": {
        "url": (_STRING, "service_url"),
        "token": (_STRING, "service_token"),
        "model": (_STRING, "service_model"),
    },
    "analysis": {
        "device": (_STRING, "device"),
        "runtime": (_STRING, "runtime"),
        "outputs": (_STRINGS, "outputs"),
        "target_classes": (_STRINGS, "target_classes"),
        "target_names": (_STRINGS, "target_names"),
        "uncertainty_tile_um": (_NUMBER, "uncertainty_tile_um"),
        "min_region_area_um2": (_NUMBER, "min_region_area_um2"),
    },
    "models": {
        "segmentation": (_STRING, "seg_model"),
        "nuclei": (_STRING, "nuclei_model"),
        "ihc_nuclei": (_STRING, "ihc_model"),
    },
    "pairs": {
        "case_key": (_STRING, "case_key"),
    },
}
_KEY_OF = {attr: f"{table}.{key}" for table, keys in SCHEMA.items() for key, (_, attr) in keys.items()}
# What `pdl1 run` uses (and records); the service keys are the Groovy scripts' (the token is never recorded).
RUN_KEYS = tuple(attr for attr in _KEY_OF if not attr.startswith("service_"))
FROM_DEFAULT, FROM_COMMAND_LINE = "built-in default", "command line"


_CHECKED = ("device", "runtime", "outputs", "uncertainty_tile_um", "min_region_area_um2", "case_key")
# The numbers' ranges, the same for the file and the command line (both are checked by problem_with).
# Below 16 µm an uncertainty tile holds a cell or two and a few pixels of the model's maps (at 2 µm/px), and
# there are 16 times the default's number of them; above 4 mm one tile covers a whole biopsy. Positive regions
# of more than 1 mm² are whole tumours: a smaller size limit than that is what anyone means.
RANGES: dict[str, tuple[float, float, str]] = {
    "uncertainty_tile_um": (16.0, 4096.0, "µm"),
    "min_region_area_um2": (0.0, 1_000_000.0, "µm²"),
}


def problem_with(name: str, value: Any) -> str | None:
    """What is wrong with a run setting's value (ProjectConfig field name), or None; for the file and the CLI."""
    if name == "device" and not _DEVICE.fullmatch(value):
        return f"expected auto, cpu, cuda or cuda:N, got {value!r}"
    if name == "case_key" and not value.strip():
        return "expected the entry metadata key that names each slide's case (case, Case ID, ...), got an empty one"
    if name == "runtime" and value not in RUNTIMES:
        return f"expected {', '.join(RUNTIMES)}, got {value!r}"
    if name == "outputs":
        if not value:  # the service would return no objects, and pdl1_analyze.groovy put none for the earlier ones
            return (
                f"expected some of {', '.join(OUTPUTS)}, got an empty list; name those to compute, or leave "
                "outputs out for all of them"
            )
        unknown = [o for o in value if o not in OUTPUTS]
        if unknown:
            return f"expected some of {', '.join(OUTPUTS)}, got {', '.join(map(repr, unknown))}"
    if name in RANGES:
        low, high, unit = RANGES[name]
        allowed = f"{_number(low)} to {_number(high)} {unit}"
        if low > 0 and not value > 0:  # NaN too: TOML has nan and inf
            return f"expected a number above 0 (a size from {allowed}), got {_number(value)}"
        if not low <= value <= high:
            return f"expected a number from {allowed}, got {_number(value)}"
    return None


def _number(value: float) -> str:
    """A number as a person writes it: 1,000,000 and 0.001, not 1e+06.

    >>> _number(1e6), _number(0.001), _number(float("inf"))
    ('1,000,000', '0.001', 'inf')
    """
    return f"{int(value):,}" if math.isfinite(value) and value == int(value) else f"{value:g}"


class ConfigError(ProjectError):
    """A ``pdl1-config.toml`` that is not TOML, or holds an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class ProjectConfig:
    """The settings of a project's ``pdl1-config.toml``; the defaults are those of the template.

    ``path`` is the file read (None: built-in defaults only); ``from_file`` and ``from_command_line``
    name the fields set there, so a run can record where each value came from. Model folders are
    absolute (a relative path in the file is taken from the file's folder); None means the shipped
    demo models.
    """

    path: Path | None = None
    service_url: str = "http://127.0.0.1:8765"
    service_token: str = ""
    service_model: str = "default"
    device: str = "auto"
    runtime: str = "auto"
    outputs: tuple[str, ...] = OUTPUTS
    target_classes: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    uncertainty_tile_um: float = 64.0
    min_region_area_um2: float = 200.0
    seg_model: Path | None = None
    nuclei_model: Path | None = None
    ihc_model: Path | None = None
    case_key: str = "case"
    from_file: frozenset[str] = field(default=frozenset(), compare=False)
    from_command_line: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        for name in _CHECKED:
            problem = problem_with(name, getattr(self, name))
            if problem is not None:
                where = "" if self.path is None else f"{self.path}: "
                raise ConfigError(f"{where}{_KEY_OF[name]}: {problem}")

    def with_overrides(self, **given: Any) -> ProjectConfig:
        """This config with the command line's values put over it; None means the option was not given."""
        unknown = set(given) - set(RUN_KEYS)
        if unknown:
            raise TypeError(f"not run settings: {sorted(unknown)}")
        chosen = {name: value for name, value in given.items() if value is not None}
        for name in ("outputs", "target_classes", "target_names"):
            if name in chosen:
                chosen[name] = tuple(dict.fromkeys(chosen[name]))
        return replace(self, **chosen, from_command_line=self.from_command_line | set(chosen))

    def source_of(self, name: str) -> str:
        """Where a field's value came from: the command line, this file, or the built-in default."""
        if name in self.from_command_line:
            return FROM_COMMAND_LINE
        if name in self.from_file and self.path is not None:
            return str(self.path)
        return FROM_DEFAULT

    def where(self, name: str) -> str:
        """A field's key as a message names it: in the file it came from, with the line (``FILE, line 16:
        [analysis] device``), else the bare key (``analysis.device``)."""
        if self.source_of(name) != str(self.path):
            return _KEY_OF[name]
        table, key = _KEY_OF[name].split(".", 1)
        try:
            line = _line_of(self.path.read_text(encoding="utf-8-sig"), table, key)
        except (OSError, UnicodeDecodeError):
            line = "?"
        return f"{self.path}, line {line}: [{table}] {key}"

    def run_record(self) -> dict[str, Any]:
        """For a run's summary: the file read, the values of the keys `pdl1 run` uses, and where each came from."""
        values = {}
        for name in RUN_KEYS:
            value = getattr(self, name)
            values[_KEY_OF[name]] = (
                list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
            )
        return {
            "config_file": None if self.path is None else str(self.path),
            "values": values,
            "from": {_KEY_OF[name]: self.source_of(name) for name in RUN_KEYS},
        }


def config_path_for(inputs: list[Path]) -> Path | None:
    """The ``pdl1-config.toml`` beside a project given as its folder or its ``project.qpproj``, if there is one."""
    if len(inputs) != 1:
        return None
    folder = inputs[0] if inputs[0].is_dir() else inputs[0].parent if inputs[0].suffix == ".qpproj" else None
    if folder is None or not (folder / CONFIG_NAME).exists():
        return None
    return folder / CONFIG_NAME  # a folder of that name is read, and refused, not left out without a word


def read_project_config(path: str | Path) -> ProjectConfig:
    """Read and check a ``pdl1-config.toml``; keys it leaves out keep the built-in defaults."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows Notepad saves UTF-8 with a BOM, which TOML rejects
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such config file; give an existing pdl1-config.toml") from err
    except IsADirectoryError as err:
        raise ConfigError(
            f"{path} is a folder, not the project's config file; remove or rename it (`pdl1 init-project` writes the "
            "file from project_templates/pdl1/config.toml), or run with --no-config for the built-in defaults"
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        lines = text.splitlines()
        line = _line_number(err) or (len(lines) if "end of document" in str(err) else None)
        shown = f": {lines[line - 1].strip()!r}" if line and line <= len(lines) else ""
        if "Cannot overwrite a value" in str(err) or "Cannot declare" in str(err):  # not a quoting mistake
            raise ConfigError(
                f"{path}, line {line or '?'}{shown}: a key or table given a second time ({err}); give each once: "
                "remove or merge the repeat"
            ) from err
        raise ConfigError(
            f'{path}, line {line or "?"}{shown}: not valid TOML ({err}); strings need quotes (device = "cpu"), '
            'arrays of strings brackets and commas (outputs = ["regions", "nuclei"])'
        ) from err
    values: dict[str, Any] = {}
    for table, content in data.items():
        if isinstance(content, list) and content and all(isinstance(c, dict) for c in content):
            # [[table]] parses as an array of tables, which nothing here takes: say so, not 'outside a table'.
            raise ConfigError(
                f"{path}, line {_line_of(text, table, None, array=True)}: [[{table}]] is an array of tables; "
                f"write [{table}] (one pair of brackets): each table appears once"
            )
        if not isinstance(content, dict):
            raise ConfigError(
                f"{path}, line {_line_of(text, None, table)}: {table} is outside a table; every key belongs under "
                f"{', '.join(f'[{t}]' for t in SCHEMA)} (see pdl1's project_templates/pdl1/config.toml)"
            )
        if table not in SCHEMA:
            raise ConfigError(
                f"{path}, line {_line_of(text, table, None)}: unknown table [{table}]; expected "
                f"{', '.join(f'[{t}]' for t in SCHEMA)}"
            )
        for key, value in content.items():
            where = f"{path}, line {_line_of(text, table, key)}: [{table}] {key}"
            if key not in SCHEMA[table]:
                raise ConfigError(f"{where}: unknown key; [{table}] holds {', '.join(SCHEMA[table])}")
            kind, attr = SCHEMA[table][key]
            values[attr] = _checked(value, kind, where)
            problem = problem_with(attr, values[attr])
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
    for attr in ("seg_model", "nuclei_model", "ihc_model"):
        if attr in values:
            values[attr] = None if values[attr] == "" else path.parent / Path(values[attr]).expanduser()
    return ProjectConfig(path=path, **values, from_file=frozenset(values))


def _checked(value: Any, kind: str, where: str) -> Any:
    def wrong() -> ConfigError:
        return ConfigError(f"{where}: expected {kind}, got {value!r} ({_toml_type(value)})")

    if kind == _STRING:
        if not isinstance(value, str):
            raise wrong()
        return value
    if kind == _STRINGS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong()
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong()
    return float(value)


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _line_number(err: tomllib.TOMLDecodeError) -> int | None:
    lineno = getattr(err, "lineno", None)  # Python 3.14+
    if lineno:
        return int(lineno)
    found = re.search(r"line (\d+)", str(err))
    return int(found.group(1)) if found else None


def _line_of(text: str, table: str | None, key: str | None, *, array: bool = False) -> int | str:
    """The line that defines ``[table]`` (``[[table]]`` with ``array``; key None) or ``key`` inside it (table None:
    before any table)."""
    current: str | None = None
    pattern = r"\[\[\s*([^\]\s]+)\s*\]\]\s*(#.*)?" if array else r"\[\s*([^\]\s]+)\s*\]\s*(#.*)?"
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(pattern, stripped)
        if header:
            current = header.group(1).strip("\"'")
            if key is None and current == table:
                return number
            continue
        if key is not None and current == table and re.match(rf"[\"']?{re.escape(key)}[\"']?\s*=", stripped):
            return number
    return "?"
