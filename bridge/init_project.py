"""``pdl1 init-project``: a new QuPath project with the PD-L1 classes, scripts and config.

With QuPath, paquo creates it. Without, the project files are written as QuPath 0.4.4 writes
them (``project.qpproj``, ``classifiers/classes.json``, ``data/<id>/server.json``; checked
against a project saved by a real QuPath), which QuPath 0.4.4 to 0.6 open; QuPath creates each
``data.qpdata`` when the image is first saved.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import uuid
from pathlib import Path

from bridge.project import (
    ProjectError,
    alike,
    first_names,
    not_a_folder,
    path_to_uri,
    slide_file_problem,
    write_json_atomic,
)
from inference import MissingMppError, Pdl1Error, format_unlike_name, open_slide
from project_templates import PDL1_TEMPLATE
from qupath_scripts import script_paths

QUPATH_FORMAT_VERSION = "0.4.4"
_OPENSLIDE_BUILDER = "qupath.lib.images.servers.openslide.OpenslideServerBuilder"
log = logging.getLogger(__name__)


def server_metadata(slide_path: Path) -> dict:
    """The ``metadata`` block QuPath stores for an OpenSlide image (as in the 0.4.4 fixture)."""
    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        levels = [
            {"downsample": float(ds), "width": w, "height": h}
            for ds, (w, h) in zip(slide.level_downsamples, slide.level_dimensions, strict=True)
        ]
        mpp = slide.mpp
    return {
        "name": slide_path.name,
        "width": width,
        "height": height,
        "sizeZ": 1,
        "sizeT": 1,
        "channelType": "DEFAULT",
        "isRGB": True,
        "pixelType": "UINT8",
        "levels": levels,
        "channels": [
            {"name": "Red", "color": -65536},
            {"name": "Green", "color": -16711936},
            {"name": "Blue", "color": -16776961},
        ],
        "pixelCalibration": {
            "pixelWidth": {"value": mpp.x, "unit": "µm"},
            "pixelHeight": {"value": mpp.y, "unit": "µm"},
            "zSpacing": {"value": 1.0, "unit": "z-slice"},
            "timeUnit": "SECONDS",
            "timepoints": [],
        },
        "magnification": round(10 / mpp.mean, 1),
        "preferredTileWidth": 256,
        "preferredTileHeight": 256,
    }


def _copy_template(folder: Path) -> None:
    scripts = folder / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for script in script_paths():
        shutil.copy2(script, scripts / script.name)
    shutil.copy2(PDL1_TEMPLATE / "config.toml", folder / "pdl1-config.toml")


def settle_slides(slides: list[Path], problems: dict[Path, str], *, skip_unreadable: bool) -> list[Path]:
    """The slides to add, once every one has been checked: all of them, or with ``skip_unreadable`` the
    readable ones (the others named in a warning). Refuses, before anything is created, when any slide
    cannot be added and skipping was not asked for, or when none can."""
    if not problems:
        return list(slides)
    listed = _grouped(problems)
    kept = [s for s in slides if Path(s) not in problems]
    if not kept:
        raise ProjectError(f"none of the {len(slides)} slides can be added, so nothing was created: {listed}")
    if not skip_unreadable:
        raise ProjectError(
            f"{len(problems)} of {len(slides)} slides cannot be added, so nothing was created: {listed}; fix or "
            f"leave them out, or pass --skip-unreadable to create the project with the {len(kept)} that can"
        )
    log.warning("left out %d of %d slides that cannot be added: %s", len(problems), len(slides), listed)
    return kept


def _grouped(problems: dict[Path, str]) -> str:
    """Each slide's problem, a reason several share said once after their names: 60 slides without a pixel size
    repeated one 350-character reason 60 times in a line of 21 KB (helper-135)."""
    parts = []
    for generic, group in alike(problems, lambda slide: [str(slide)]).items():
        if len(group) == 1:
            parts.append(f"{group[0]}: {problems[group[0]]}")
        else:  # every one named: a project made without them must say which (helper-137)
            parts.append(f"{len(group)} slides ({', '.join(map(str, group))}): {generic.replace(chr(0), '<slide>')}")
    return "; ".join(parts)


def _check_slides(slides: list[Path]) -> tuple[dict[Path, dict], dict[Path, str]]:
    """Every slide opened before anything is written: the metadata of those that open, why the others do not."""
    metadata: dict[Path, dict] = {}
    problems: dict[Path, str] = {}
    for slide in map(Path, slides):
        problem = slide_file_problem(slide)
        if problem is not None:
            problems[slide] = problem
            continue
        try:
            metadata[slide] = server_metadata(slide)
        except MissingMppError:
            # Left out of the project (or nothing is created), so `pdl1 run PROJECT --mpp` would not reach it:
            # the advice is what does. A JPEG renamed .svs was told the scanner's value, as a slide.
            kind = format_unlike_name(slide)
            renamed = (
                ""
                if kind is None
                else f"is a {kind} image, though named {slide.suffix} (check that it is the file you meant), and "
            )
            problems[slide] = renamed + (
                "states no microns per pixel, which a project entry written without QuPath must carry; create the "
                "project with QuPath installed (`pdl1 init-project --qupath always`) or in QuPath and set the pixel "
                "size there (pdl1 run uses what the project saves), or analyse this slide on its own with the "
                f"scanner's value: `pdl1 run '{slide}' --mpp 0.25 --out DIR` (0.25 at 40x, 0.5 at 20x)"
            )
        except (Pdl1Error, OSError, ValueError) as err:  # collected: every slide is checked, then all are reported
            problems[slide] = f"cannot be read ({err})"
    return metadata, problems


def _refuse_existing(folder: Path) -> None:
    problem = not_a_folder(folder)
    if problem is not None:
        raise ProjectError(f"{folder} {problem}; expected a folder for the new project (a new or empty one)")
    qpproj = folder / "project.qpproj"
    if qpproj.exists():
        raise ProjectError(
            f"{qpproj} exists; init-project creates new projects only: give a new folder, or add the slides to this "
            "project in QuPath (File > Project > Add images)"
        )
    if folder.exists() and any(folder.iterdir()):
        if _left_by_interrupted_init(folder):
            log.warning(
                "%s holds what an interrupted init-project wrote (no project.qpproj yet): removed, and made again",
                folder,
            )
            _empty(folder)
            return
        held = sorted(child.name for child in folder.iterdir())
        shown = first_names(held)
        raise ProjectError(
            f"{folder} is not empty (it holds {shown}); QuPath wants a new, empty folder for a project: give a "
            "new folder (init-project makes it), or one that is empty"
        )


_PART = re.compile(r".+\.[0-9a-f]{12}\.part")  # bridge.atomic's temporary files


def _left_by_interrupted_init(folder: Path) -> bool:
    """Whether ``folder`` holds only what :func:`init_project_files` writes before ``project.qpproj``, its last
    file: a kill (or a power cut) part way left it, and the folder, no project, was refused as not empty.

    Only those names count (the template's files, ``data/<n>/server.json``, their temporary files), and the
    template's files only with the template's bytes (or the first of them: a copy cut short), so a folder holding
    anything of a user's is never taken for one: a lab's own pdl1-config.toml, or its edited copy of a script, was
    removed with the rest.
    """
    scripts = {p.name: p for p in script_paths()}
    templates = {
        ("pdl1-config.toml",): PDL1_TEMPLATE / "config.toml",
        ("classifiers", "classes.json"): PDL1_TEMPLATE / "classes.json",
        **{("scripts", name): path for name, path in scripts.items()},
    }
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            return False
        if path.is_dir():
            ours = parts in (("classifiers",), ("scripts",), ("data",)) or (parts[0] == "data" and _entry(parts[1:]))
        elif parts[0] == "data":
            ours = (
                len(parts) == 3
                and _entry(parts[1:2])
                and (parts[2] == "server.json" or _is_part(parts[2], "server.json"))
            )
        elif len(parts) == 1:
            ours = parts[0] == "pdl1-config.toml" or _is_part(parts[0], "project.qpproj")
        else:
            ours = parts == ("classifiers", "classes.json") or (
                len(parts) == 2 and parts[0] == "scripts" and parts[1] in scripts
            )
        if not ours:
            return False
        template = templates.get(parts)
        if template is not None and not template.read_bytes().startswith(path.read_bytes()):
            return False
    return True


def _entry(parts: tuple[str, ...]) -> bool:
    """``(<n>,)``: an entry's folder name under ``data/``."""
    return len(parts) == 1 and parts[0].isdigit()


def _is_part(name: str, of: str) -> bool:
    return name.startswith(f"{of}.") and _PART.fullmatch(name) is not None


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def init_project_files(folder: str | Path, slides: list[Path], *, skip_unreadable: bool = False) -> Path:
    """Write a new project without QuPath; refuses a folder that already holds one.

    Every slide is opened first; nothing is written unless all can be added (or, with
    ``skip_unreadable``, the readable ones are added and the others named in a warning).
    """
    folder = Path(folder)
    _refuse_existing(folder)
    metadata, problems = _check_slides(slides)
    slides = settle_slides(slides, problems, skip_unreadable=skip_unreadable)
    existed = folder.exists()
    try:
        return _write_project_files(folder, slides, metadata)
    except BaseException:  # a full disk, Ctrl-C: no half project that the next init-project refuses as not empty
        with contextlib.suppress(OSError):  # the error that stopped it is what to report
            if existed:  # it was empty (checked above): empty it again
                _empty(folder)
            else:
                shutil.rmtree(folder)
        raise


def _write_project_files(folder: Path, slides: list[Path], metadata: dict[Path, dict]) -> Path:
    """The project's files, ``project.qpproj`` last: until it is there, the folder is no project (a kill before
    leaves what :func:`_left_by_interrupted_init` recognises)."""
    qpproj = folder / "project.qpproj"
    images = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, slide in enumerate(slides, start=1):
        meta = metadata[Path(slide)]
        uri = path_to_uri(slide)
        builder = {"providerClassName": _OPENSLIDE_BUILDER, "uri": uri, "args": [], "metadata": meta}
        images.append(
            {
                "serverBuilder": {"builderType": "uri", **builder},
                "entryID": i,
                "randomizedName": str(uuid.uuid4()),
                "imageName": Path(slide).name,
                "metadata": {},
            }
        )
        write_json_atomic(folder / "data" / str(i) / "server.json", builder)
    now = int(time.time() * 1000)
    (folder / "classifiers").mkdir(exist_ok=True)
    shutil.copy2(PDL1_TEMPLATE / "classes.json", folder / "classifiers" / "classes.json")
    _copy_template(folder)
    write_json_atomic(
        qpproj,
        {
            "version": QUPATH_FORMAT_VERSION,
            "createTimestamp": now,
            "modifyTimestamp": now,
            "uri": path_to_uri(qpproj),
            "lastID": len(images),
            "images": images,
        },
    )
    return qpproj


def init_project_qupath(folder: str | Path, slides: list[Path], *, skip_unreadable: bool = False) -> Path:
    """Create the project through paquo (QuPath present).

    QuPath tries every slide first, in a throwaway project, so a slide it cannot open leaves no partial
    project behind (one the next init-project could not open); with ``skip_unreadable`` the readable
    ones are added and the others named in a warning. Should adding fail anyway, what was created is
    removed again.
    """
    from bridge import qupath

    folder = Path(folder)
    _refuse_existing(folder)
    slides = settle_slides(slides, qupath.unaddable_images(slides), skip_unreadable=skip_unreadable)
    existed = folder.exists()
    try:
        # The file, not the folder: paquo takes a path with a suffix for the file itself and refuses any but
        # .qpproj (projects.py QuPathProject.__init__), so a folder named "PD-L1 study.v2" was a ValueError.
        with qupath.open_project(folder / "project.qpproj", mode="x") as project:
            qupath.ensure_classes(project)
            for slide in slides:
                qupath.add_image(project, Path(slide))
            project.save()
        _copy_template(folder)
    except BaseException:
        if existed:  # it was empty (checked above): empty it again
            _empty(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder / "project.qpproj"
