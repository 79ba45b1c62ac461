import json
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from bridge.init_project import init_project_files
from bridge.project import (
    QPDATA_HEADER,
    UNDER_SEARCH_DIR,
    WITH_PROJECT,
    ImageMovedError,
    ImageSearch,
    ProjectEntry,
    ProjectError,
    RunStatus,
    claimed_twice,
    find_image,
    find_project_file,
    locate_image,
    moved_with_project,
    path_to_uri,
    qpdata_problem,
    read_project,
    slide_files_in,
    uri_to_path,
)
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec


def test_reads_the_project_qupath_044_wrote(fixtures_dir):
    info = read_project(fixtures_dir / "qupath-0.4.4-project")
    assert info.version == "0.4.4"
    (entry,) = info.entries
    assert entry.entry_id == "1" and entry.image_name == "CMU-1-Small-Region.svs"
    assert entry.metadata == {"case": "CMU-1"}
    assert entry.path == PureWindowsPath("C:/Slides/CMU-1-Small-Region.svs")


def test_a_project_from_a_windows_pc_finds_its_slide_again(fixtures_dir, tmp_path, cmu_svs):
    project = tmp_path / "project"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-project", project)
    info = read_project(project)
    entry = info.entries[0]
    with pytest.raises(ImageMovedError, match=r"has moved: not at C:\\Slides.*--search-dir"):
        locate_image(entry, project_folder=project, saved_folder=info.saved_folder)
    slides = tmp_path / "archive" / "2026" / "CMU"
    slides.mkdir(parents=True)
    shutil.copy(cmu_svs, slides / "CMU-1-Small-Region.svs")
    # --search-dir looks in subfolders too, as QuPath's own search does
    search = ImageSearch((tmp_path / "archive",))
    assert locate_image(entry, project_folder=project, search=search) == slides / "CMU-1-Small-Region.svs"


def test_an_entry_whose_uri_is_not_a_file_is_named_with_the_fix(tmp_path):
    # Was "only file: image URIs can be analysed, got 'https://...'": no entry, no fix.
    entry = ProjectEntry("7", "b.svs", "https://example.org/b.svs")
    with pytest.raises(ProjectError) as err:
        locate_image(entry, project_folder=tmp_path)
    assert str(err.value) == (
        "image of entry 7 (b.svs): only file: image URIs can be analysed (a file on this machine or a mounted "
        "share), got 'https://example.org/b.svs'; for an image QuPath opens from a server (OMERO, a web address), "
        "export it from QuPath (File > Export images... > OME TIFF) and add that file to the project instead"
    )


def test_a_windows_drive_copied_whole_keeps_the_project_finding_its_slides(fixtures_dir, tmp_path, cmu_svs):
    # The fixture was saved as C:/Users/pathology/QuPath/pdl1-example with its slide in C:/Slides; the drive
    # is now mounted (or copied) at drive/: the slide is where QuPath's "Check project URIs" would look.
    drive = tmp_path / "drive"
    project = drive / "Users" / "pathology" / "QuPath" / "pdl1-example"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-project", project)
    (drive / "Slides").mkdir()
    shutil.copy(cmu_svs, drive / "Slides" / "CMU-1-Small-Region.svs")
    info = read_project(project)
    assert info.saved_folder == PureWindowsPath("C:/Users/pathology/QuPath/pdl1-example")
    found = locate_image(info.entries[0], project_folder=info.folder, saved_folder=info.saved_folder)
    assert found == drive / "Slides" / "CMU-1-Small-Region.svs"


def test_a_study_folder_moved_whole_finds_its_slides_by_their_place(tmp_path, phantom_svs):
    study = tmp_path / "study"
    (study / "slides" / "batch 1").mkdir(parents=True)
    shutil.copy(phantom_svs, study / "slides" / "batch 1" / "case.svs")
    init_project_files(study / "project", [study / "slides" / "batch 1" / "case.svs"])
    # a slide of the same name elsewhere must not be taken instead of the one beside the project
    (tmp_path / "other").mkdir()
    shutil.copy(phantom_svs, tmp_path / "other" / "case.svs")
    moved = tmp_path / "server" / "study"
    moved.parent.mkdir()
    study.rename(moved)
    info = read_project(moved / "project")
    assert info.saved_folder == PurePosixPath(study / "project")
    search = ImageSearch((tmp_path / "other",))
    found = locate_image(info.entries[0], project_folder=info.folder, saved_folder=info.saved_folder, search=search)
    assert found == moved / "slides" / "batch 1" / "case.svs"


def test_moved_with_project_follows_the_relative_place_and_needs_a_shared_root():
    saved = PureWindowsPath("C:/Users/p/QuPath/study")
    assert moved_with_project(
        PureWindowsPath("c:/users/P/slides/a.svs"), saved, Path("/mnt/c/Users/p/QuPath/study")
    ) == (Path("/mnt/c/Users/p/slides/a.svs"))
    assert moved_with_project(PureWindowsPath("D:/Slides/a.svs"), saved, Path("/x/study")) is None
    assert moved_with_project(PurePosixPath("/data/a.svs"), saved, Path("/x/study")) is None
    assert moved_with_project(PurePosixPath("/data/study/a.svs"), PurePosixPath("/data/study"), Path("/srv/s")) == (
        Path("/srv/s/a.svs")
    )


def test_search_dir_refuses_two_slides_of_one_name_and_skips_hidden_folders(tmp_path):
    entry = ProjectEntry("3", "case.svs", "file:/gone/case.svs")
    root = tmp_path / "slides"
    for folder in ("a", ".snapshot/a", "b/c"):
        (root / folder).mkdir(parents=True)
        (root / folder / "case.svs").write_bytes(b"x")
    with pytest.raises(
        ImageMovedError, match=r"2 files under --search-dir are called case.svs: \S+/a/case.svs, \S+/b/c/case"
    ):
        locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((root,)))
    assert locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((root / "b",))) == (
        root / "b" / "c" / "case.svs"
    )


def test_search_dir_goes_as_deep_as_qupath_and_no_deeper(tmp_path):
    entry = ProjectEntry("1", "deep.svs", "file:/gone/deep.svs")
    folder = tmp_path / "s"
    for _ in range(ImageSearch.MAX_DEPTH - 1):
        folder = folder / "d"
    folder.mkdir(parents=True)
    (folder / "deep.svs").write_bytes(b"x")
    assert (
        locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((tmp_path / "s",))) == folder / "deep.svs"
    )
    with pytest.raises(ImageMovedError, match=r"no deep.svs in \S+ \(and below\)"):
        locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((tmp_path,)))


def _builder(uri: str, *, args: tuple[str, ...] = (), size: tuple[int, int] = (2000, 1000)) -> dict:
    # What QuPath writes for a file read as it is (see the fixture), trimmed to what matters here.
    meta = {"width": size[0], "height": size[1], "levels": [{"downsample": 1.0, "width": size[0], "height": size[1]}]}
    return {"builderType": "uri", "providerClassName": "x", "uri": uri, "args": list(args), "metadata": meta}


def test_entries_qupath_shows_transformed_are_marked_not_analysable_and_the_rest_read(tmp_path):
    images = [
        _builder("file:/s/plain.svs"),
        {"builderType": "rotated", "rotation": "ROTATE_90", "builder": _builder("file:/s/turned.svs")},
        {"builderType": "rotated", "rotation": "ROTATE_NONE", "builder": _builder("file:/s/unturned.svs")},
        {"builderType": "pyramidize", "builder": _builder("file:/s/flat.tif")},
        {"builderType": "cropped", "region": {}, "builder": _builder("file:/s/part.svs")},
        {"builderType": "sparse", "regions": []},
        _builder("file:/s/scenes.czi", args=("--series", "2")),
        _builder("file:/s/first.czi", args=("--series", "0")),
    ]
    raw = {
        "version": "0.5.1",
        "images": [{"entryID": i + 1, "imageName": f"i{i}", "serverBuilder": b} for i, b in enumerate(images)],
    }
    (tmp_path / "project.qpproj").write_text(json.dumps(raw))
    entries = read_project(tmp_path).entries
    assert [e.not_analysable for e in entries] == [
        None,
        "QuPath shows it rotated (ROTATE_90); pdl1 reads the file unrotated",
        None,
        None,
        "QuPath shows it through a 'cropped' server (cropped, transformed or made of several files)",
        "QuPath shows it through a 'sparse' server (cropped, transformed or made of several files)",
        "it is series 2 of a multi-image file; pdl1 reads the first",
        None,
    ]
    uris = ["file:/s/plain.svs", "file:/s/turned.svs", "file:/s/unturned.svs", "file:/s/flat.tif"]
    assert [e.uri for e in entries][:4] == uris
    assert entries[0].size_px == (2000, 1000) and entries[5].uri == "" and entries[5].size_px is None


def test_the_fixture_states_its_image_size(fixtures_dir):
    (entry,) = read_project(fixtures_dir / "qupath-0.4.4-project").entries
    assert entry.size_px == (2220, 2967) and entry.not_analysable is None
    assert entry.mpp == pytest.approx(0.499)


def test_reading_is_read_only(fixtures_dir, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-project", project)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    read_project(project)
    assert before == {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{broken", "not valid JSON"),
        ('{"images": {}}', r"not a QuPath project: its 'images' is \{\}, not a list"),
        ("{}", r"not a QuPath project: it has no 'images' key .*re-create the project.*pdl1 init-project"),
        ("[1]", r"not a QuPath project: its JSON is \[1\], not an object"),
        ('{"images": [{"imageName": "x"}]}', r"image #1 \(x\) lacks 'serverBuilder'.*add the image again"),
        # Said "image #1 lacks 'int' object has no attribute 'get'".
        ('{"images": [{"serverBuilder": 5}]}', r"image #1 is malformed \('int' object .*add the image again"),
        ('{"images": [7]}', r"image #1 is malformed \(.*add the image again"),
    ],
)
def test_malformed_projects_say_what_is_wrong(tmp_path, content, match):
    (tmp_path / "project.qpproj").write_text(content)
    with pytest.raises(ProjectError, match=match):
        read_project(tmp_path)


def test_no_project_here(tmp_path):
    with pytest.raises(ProjectError, match="no QuPath project here"):
        read_project(tmp_path)


def test_uri_forms():
    assert uri_to_path("file:/home/u/a%20b.svs").as_posix() == "/home/u/a b.svs"
    assert str(uri_to_path("file://server/share/x.svs")) == "\\\\server\\share\\x.svs"
    with pytest.raises(ProjectError, match="only file: image URIs"):
        uri_to_path("https://example.org/x.svs")


def test_init_project_without_qupath_matches_what_qupath_writes(fixtures_dir, tmp_path, phantom_svs):
    qpproj = init_project_files(tmp_path / "new", [phantom_svs])
    ours = json.loads(qpproj.read_text())
    theirs = json.loads((fixtures_dir / "qupath-0.4.4-project" / "project.qpproj").read_text())
    assert ours.keys() == theirs.keys()
    assert ours["images"][0].keys() == theirs["images"][0].keys()
    ob, tb = ours["images"][0]["serverBuilder"], theirs["images"][0]["serverBuilder"]
    assert ob.keys() == tb.keys() and ob["providerClassName"] == tb["providerClassName"]
    assert ob["metadata"].keys() == tb["metadata"].keys()
    assert ob["metadata"]["pixelCalibration"]["pixelWidth"] == {"value": 0.5, "unit": "µm"}
    assert [lv["downsample"] for lv in ob["metadata"]["levels"]] == [1.0, 4.0]
    server = json.loads((tmp_path / "new" / "data" / "1" / "server.json").read_text())
    their_server = json.loads((fixtures_dir / "qupath-0.4.4-project" / "data" / "1" / "server.json").read_text())
    assert server.keys() == their_server.keys()
    entry = read_project(qpproj).entries[0]
    assert Path(entry.path) == phantom_svs.resolve()
    classes = json.loads((tmp_path / "new" / "classifiers" / "classes.json").read_text())
    assert "PD-L1 FN candidate" in {c["name"] for c in classes["pathClasses"]}
    assert (tmp_path / "new" / "scripts" / "pdl1_import_results.groovy").is_file()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_new_project_is_readable_by_colleagues_as_the_umask_allows(tmp_path, phantom_svs):
    # A lab's projects live on shared drives: files written by the bridge must get the usual
    # permissions, not the owner-only ones of a temporary file.
    old = os.umask(0o022)
    try:
        qpproj = init_project_files(tmp_path / "p", [phantom_svs])
    finally:
        os.umask(old)
    for path in (qpproj, tmp_path / "p/data/1/server.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_rewriting_the_run_status_keeps_its_permissions(tmp_path):
    status = RunStatus(tmp_path)
    status.record("1", state="failed", error="x")
    status.path.chmod(0o660)
    status.record("1", state="done", image="a")
    assert stat.S_IMODE(status.path.stat().st_mode) == 0o660
    assert RunStatus(tmp_path).is_done("1")


def test_init_project_refuses_to_overwrite(tmp_path, phantom_svs):
    init_project_files(tmp_path / "p", [phantom_svs])
    with pytest.raises(ProjectError, match="exists"):
        init_project_files(tmp_path / "p", [phantom_svs])


def test_init_project_with_a_missing_slide_writes_nothing(tmp_path):
    with pytest.raises(ProjectError, match=r"nope\.svs: slide not found"):
        init_project_files(tmp_path / "p", [tmp_path / "nope.svs"])
    assert not (tmp_path / "p").exists()


def test_a_folder_of_slides_given_for_a_project_is_told_apart_from_an_empty_folder(tmp_path):
    # Both said "no QuPath project here"; a folder of slides is the common mix-up (`pdl1 run slides/`).
    (tmp_path / "empty").mkdir()
    (tmp_path / "slides").mkdir()
    for name in ("b.svs", "a.ndpi", "c.tif", "d.svs", "notes.txt"):
        (tmp_path / "slides" / name).write_bytes(b"")
    with pytest.raises(
        ProjectError, match=r"empty: no QuPath project here \(expected a project folder or its project\.qpproj\)$"
    ):
        find_project_file(tmp_path / "empty")
    with pytest.raises(ProjectError) as err:
        read_project(tmp_path / "slides")
    assert str(err.value) == (
        f"{tmp_path / 'slides'}: no QuPath project here (expected a project folder or its project.qpproj), but slides "
        f"(a.ndpi, b.svs, c.tif and 1 more): a folder of slides is no project; make one with `pdl1 init-project "
        f"PROJECT {tmp_path / 'slides'}/*.ndpi`, or give the slide files themselves where the command takes them"
    )


def test_the_folder_a_project_sits_in_names_the_project(tmp_path):
    # A lab's folder: the slides, and QuPath's "project" folder beside them; given for the project, it was "a folder
    # of slides is no project; make one with pdl1 init-project", though the project was one level down.
    (tmp_path / "lab" / "project").mkdir(parents=True)
    (tmp_path / "lab" / "project" / "project.qpproj").write_text("{}")
    (tmp_path / "lab" / "a.svs").write_bytes(b"")
    with pytest.raises(ProjectError) as err:
        find_project_file(tmp_path / "lab")
    assert str(err.value) == (
        f"{tmp_path / 'lab'}: no QuPath project here, but in {tmp_path / 'lab' / 'project'}: give that folder (or its "
        "project.qpproj)"
    )


def test_the_slide_files_of_a_folder_are_told_by_suffix_in_any_case_by_name(tmp_path):
    # One helper for both messages above (a folder given for a project, a folder given for a slide).
    for name in ("b.SVS", "a.ndpi", "notes.txt", "c.tif", "d"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in slide_files_in(tmp_path)] == ["a.ndpi", "b.SVS", "c.tif"]
    with pytest.raises(FileNotFoundError):
        slide_files_in(tmp_path / "missing")


def test_init_project_given_a_folder_of_slides_says_to_give_the_files(tmp_path):
    # "slides: slide not found" for a folder that is there, full of slides; then "e.g. FOLDER/*.svs" literally.
    slides = tmp_path / "slides"
    slides.mkdir()
    with pytest.raises(ProjectError) as err:
        init_project_files(tmp_path / "p", [slides])
    assert f"{slides}: a folder, not a slide file: give the slide files in it (e.g. {slides}/*.svs)" in str(err.value)
    (slides / "a.ndpi").write_bytes(b"")  # the glob names the slides it holds
    with pytest.raises(ProjectError) as err:
        init_project_files(tmp_path / "p", [slides])
    assert f"give the slide files in it (e.g. {slides}/*.ndpi)" in str(err.value)
    assert not (tmp_path / "p").exists()


def test_init_project_with_a_slide_without_mpp_says_what_to_do_and_writes_nothing(tmp_path, phantom_svs):
    import numpy as np
    import tifffile

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((512, 512, 3), np.uint8), tile=(256, 256))
    with pytest.raises(ProjectError, match=r"no microns per pixel.*--qupath always.*--mpp") as err:
        init_project_files(tmp_path / "p", [phantom_svs, plain])
    assert not (tmp_path / "p").exists()
    # The slide is not in the project, so the advice is to analyse it on its own, not `pdl1 run PROJECT --mpp`.
    assert f"`pdl1 run '{plain}' --mpp 0.25 --out DIR`" in str(err.value) and "PROJECT --mpp" not in str(err.value)
    init_project_files(tmp_path / "p", [phantom_svs, plain], skip_unreadable=True)
    assert [e.image_name for e in read_project(tmp_path / "p").entries] == [phantom_svs.name]


def test_init_project_names_a_jpeg_renamed_as_a_slide_as_what_it_is(tmp_path, phantom_svs):
    # Was "fake.svs: states no microns per pixel ... with the scanner's value", as if it were a scanner's slide.
    import numpy as np
    from PIL import Image

    fake = tmp_path / "fake.svs"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(fake, format="JPEG")
    with pytest.raises(ProjectError) as err:
        init_project_files(tmp_path / "p", [phantom_svs, fake])
    assert (
        f"{fake}: is a JPEG image, though named .svs (check that it is the file you meant), and states no microns "
        "per pixel" in str(err.value)
    )
    assert not (tmp_path / "p").exists()


def test_init_project_counts_one_image_in_the_singular(tmp_path, phantom_svs):
    from typer.testing import CliRunner

    from bridge.cli.app import app

    args = ["init-project", str(tmp_path / "p"), str(phantom_svs), "--qupath", "never"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "with 1 image (written without QuPath)" in result.output


def test_init_project_adds_a_slide_named_twice_once_and_says_so(tmp_path, phantom_svs):
    # The same file named again, through a symlink or a '..' path, was a second entry of one image in QuPath.
    from typer.testing import CliRunner

    from bridge.cli.app import app

    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "again.svs"
    link.symlink_to(phantom_svs)
    dotdot = phantom_svs.parent / ".." / phantom_svs.parent.name / phantom_svs.name
    other = tmp_path / "other.svs"
    write_phantom(other, PhantomSpec(1024, 1024, seed=3, tps_percent=10))
    slides = [phantom_svs, other, phantom_svs, link, dotdot]
    args = ["init-project", str(tmp_path / "p"), *map(str, slides), "--qupath", "never"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert [e.image_name for e in read_project(tmp_path / "p").entries] == [phantom_svs.name, other.name]
    assert f"note: {phantom_svs} is given twice; it is added once" in result.output
    assert f"note: {phantom_svs} is given twice (as {link}); it is added once" in result.output
    assert f"note: {phantom_svs} is given twice (as {dotdot}); it is added once" in result.output
    assert "with 2 images (written without QuPath)" in result.output


def test_init_project_refuses_an_unknown_qupath_mode_before_making_anything(tmp_path, phantom_svs):
    # "--qupath alway" made a project without QuPath (anything but never and always counted as auto).
    from typer.testing import CliRunner

    from bridge.cli.app import app

    args = ["init-project", str(tmp_path / "p"), str(phantom_svs), "--qupath", "alway"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "expected auto, never or always, got 'alway'" in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "p").exists()


def test_run_status_round_trip(tmp_path):
    status = RunStatus(tmp_path)
    status.record("1", state="done", image="a")
    status.record("2", state="failed", error="x")
    again = RunStatus(tmp_path)
    assert again.is_done("1") and not again.is_done("2") and not again.is_done("3")


def test_a_project_file_lost_in_an_interrupted_save_is_named_with_how_to_restore_it(fixtures_dir, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-project", project)
    qpproj = project / "project.qpproj"
    whole = qpproj.read_text()
    (project / "project.qpproj.backup").write_text(whole)
    qpproj.rename(project / "project.qpproj.tmp")  # QuPath wrote .tmp, moved the old file to .backup, then died
    tmp = project / "project.qpproj.tmp"
    expected = (
        rf"project\.qpproj is missing, but {tmp} is a whole QuPath project file \(1 images\).*`mv '{tmp}' '{qpproj}'`"
    )
    for where in (project, qpproj):
        with pytest.raises(ProjectError, match=expected + r"; or the older project\.qpproj\.backup"):
            read_project(where)
    tmp.write_text(whole[: len(whole) // 2])  # killed while writing the .tmp: only the backup is whole
    with pytest.raises(ProjectError, match=rf"but {project / 'project.qpproj.backup'} is a whole"):
        read_project(project)
    (project / "project.qpproj.backup").unlink()
    with pytest.raises(ProjectError, match="no QuPath project here"):
        read_project(project)


def test_a_project_file_cut_short_names_a_whole_copy_beside_it(fixtures_dir, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-project", project)
    qpproj = project / "project.qpproj"
    whole = qpproj.read_text()
    (project / "project.qpproj.backup").write_text(whole)
    qpproj.write_text("")  # a kill or a full disk while something other than QuPath's save wrote it
    backup = project / "project.qpproj.backup"
    with pytest.raises(ProjectError, match=rf"not valid JSON .*{backup} is a whole copy \(1 images\).*`cp '{backup}'"):
        read_project(project)
    backup.unlink()
    with pytest.raises(
        ProjectError,
        match=r"not valid JSON .*half-written or corrupt, and no whole copy .*: restore it from your own "
        r"backups, or re-create the project: in QuPath .* or with `pdl1 init-project FOLDER SLIDES...`",
    ):
        read_project(project)


def test_qpdata_problems_are_the_damage_kills_and_full_disks_leave(fixtures_dir, tmp_path):
    real = next((fixtures_dir / "qupath-0.4.4-labels" / "project" / "data").glob("*/data.qpdata"))
    assert real.read_bytes()[:4] == QPDATA_HEADER and qpdata_problem(real) is None
    path = tmp_path / "data.qpdata"
    for content, problem in (
        (b"", "empty"),
        (QPDATA_HEADER, "cut short"),
        # a kill during QuPath's save, after the header: QuPath itself reads it as an empty image
        (real.read_bytes()[: real.stat().st_size // 2], "cut short"),
        (real.read_bytes()[:-1], "without the end marker QuPath writes last"),
        (b'{"not": "java"}', "does not start as QuPath data"),
    ):
        path.write_bytes(content)
        assert problem in qpdata_problem(path)
    assert "missing" in qpdata_problem(tmp_path / "none.qpdata")
    # Its last object a back-reference (TC_REFERENCE, handle 0x7E0005) to an "EOF" written before: whole.
    path.write_bytes(real.read_bytes()[:-6] + b"q\x00\x7e\x00\x05")
    assert qpdata_problem(path) is None


def test_init_project_through_qupath_takes_a_folder_whose_name_has_a_dot(tmp_path, phantom_svs, monkeypatch):
    """paquo's QuPathProject takes a path with a suffix for the project file and refuses any suffix but .qpproj
    (paquo projects.py QuPathProject.__init__, as stood in for here: no JVM runs)."""
    from contextlib import contextmanager

    from bridge import qupath
    from bridge.init_project import init_project_qupath

    opened = []

    class Project:
        def save(self):
            pass

    @contextmanager
    def open_project(path, *, mode):
        path = Path(path)
        if path.suffix and path.suffix != ".qpproj":
            raise ValueError("project file requires '.qpproj' suffix")
        folder = path if not path.suffix else path.parent
        folder.mkdir(parents=True, exist_ok=True)
        opened.append((folder, mode))
        yield Project()

    monkeypatch.setattr(qupath, "open_project", open_project)
    monkeypatch.setattr(qupath, "unaddable_images", lambda slides: {})
    monkeypatch.setattr(qupath, "ensure_classes", lambda project: None)
    monkeypatch.setattr(qupath, "add_image", lambda project, slide: None)
    folder = tmp_path / "PD-L1 study.v2"
    assert init_project_qupath(folder, [phantom_svs]) == folder / "project.qpproj"
    assert opened == [(folder, "x")]


def test_init_project_checks_every_slide_first_and_creates_nothing_unless_all_can_be_added(tmp_path, phantom_svs):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    missing = tmp_path / "missing.svs"
    refused = (
        r"2 of 3 slides cannot be added, so nothing was created: "
        r".*corrupt\.svs: cannot be read.*missing\.svs: slide not found.*--skip-unreadable"
    )
    with pytest.raises(ProjectError, match=refused):
        init_project_files(tmp_path / "p", [phantom_svs, corrupt, missing])
    assert not (tmp_path / "p").exists()
    qpproj = init_project_files(tmp_path / "p", [phantom_svs])  # the next init-project starts clean
    assert [e.image_name for e in read_project(qpproj).entries] == ["p1.svs"]


def test_init_project_says_a_reason_many_slides_share_once(tmp_path, phantom_svs):
    # helper-135: 60 slides without a pixel size repeated one 350-character reason 60 times, a line of 21 KB.
    missing = [tmp_path / f"gone{i}.svs" for i in range(5)]
    with pytest.raises(ProjectError) as err:
        init_project_files(tmp_path / "p", [phantom_svs, *missing])
    said = str(err.value)
    assert said.count("slide not found") == 1
    assert f"5 slides ({', '.join(map(str, missing))}): " in said  # every one named, the reason once


def test_init_project_can_add_the_readable_slides_and_name_the_others(tmp_path, phantom_svs, caplog):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide")
    with caplog.at_level("WARNING", logger="bridge.init_project"):
        qpproj = init_project_files(tmp_path / "p", [corrupt, phantom_svs], skip_unreadable=True)
    assert [e.image_name for e in read_project(qpproj).entries] == ["p1.svs"]
    assert read_project(qpproj).entries[0].entry_id == "1"
    assert "left out 1 of 2 slides" in caplog.text and "corrupt.svs" in caplog.text
    with pytest.raises(ProjectError, match="none of the 1 slides can be added"):
        init_project_files(tmp_path / "q", [corrupt], skip_unreadable=True)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "content",
    [b"[1]", b'{"images": {"1": "x"}}', b'{"images": [1]}', b'{"images": {"1": {"state": "done"}}', b"\xff\xfe{}"],
)
def test_a_damaged_run_status_is_refused_naming_the_file_and_the_fix(tmp_path, content):
    # Well-formed JSON of the wrong shape, cut short, or not UTF-8: the same error as any unreadable status.
    path = tmp_path / "pdl1" / "status.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(
        ProjectError,
        match=rf"{re.escape(str(path))}: (unreadable run status|not a pdl1 run status).*"
        r"run without --resume to start over .*or delete it",
    ):
        RunStatus(tmp_path)


def _image_record(name: str, entry_id) -> dict:
    """An image of project.qpproj as QuPath writes it (a file at /s/NAME), with ``entry_id`` as its entryID."""
    return {"serverBuilder": {"builderType": "uri", "uri": f"file:/s/{name}"}, "entryID": entry_id, "imageName": name}


def test_an_image_record_without_its_server_can_be_kept_apart_from_the_readable_ones(tmp_path):
    good = _image_record("a.svs", 1)
    broken = {"entryID": 2, "imageName": "b.svs"}  # no serverBuilder
    (tmp_path / "project.qpproj").write_text(json.dumps({"images": [broken, good]}))
    with pytest.raises(ProjectError, match=r"image #1 \(b\.svs\) lacks 'serverBuilder'"):
        read_project(tmp_path)
    info = read_project(tmp_path, unreadable_entries="keep")
    assert [e.image_name for e in info.entries] == ["a.svs"]
    (kept,) = info.unreadable
    assert (kept.index, kept.entry_id, kept.image_name) == (0, "2", "b.svs")
    assert "lacks 'serverBuilder'" in str(kept.error) and "add the image again" in str(kept.error)


@pytest.mark.parametrize(
    ("entry_id", "said"),
    [("../../escaped", '"../../escaped"'), (None, "null"), (-1, "-1"), (True, "true"), ("1e3", '"1e3"')],
)
def test_an_entry_id_that_is_no_whole_number_is_refused_not_taken_for_a_folder(tmp_path, entry_id, said):
    # "../../escaped" had pdl1 run write that entry's results two folders above the project, and review-queue its
    # metadata there too; a null one wrote pdl1/None/.
    good = _image_record("a.svs", 1)
    bad = _image_record("b.svs", entry_id)
    (tmp_path / "project.qpproj").write_text(json.dumps({"images": [good, bad]}))
    with pytest.raises(ProjectError, match=rf"image #2 \(b\.svs\) has entryID {re.escape(said)}, not the whole number"):
        read_project(tmp_path)
    info = read_project(tmp_path, unreadable_entries="keep")
    assert [e.entry_id for e in info.entries] == ["1"]
    (kept,) = info.unreadable
    assert (kept.index, kept.entry_id) == (1, None)  # no key that names a folder
    assert str(kept.error).endswith("remove it in QuPath and add the image again (File > Project > Add images)")


def test_entries_sharing_an_entry_id_are_each_refused_naming_the_other(tmp_path):
    # Both were analysed into pdl1/1/, and the second's results replaced the first's without a word.
    images = [_image_record("a.svs", 1), _image_record("b.svs", 2), _image_record("c.svs", "1")]
    (tmp_path / "project.qpproj").write_text(json.dumps({"images": images}))
    with pytest.raises(ProjectError, match=r"entry 1 \(a\.svs\) shares its entryID with c\.svs"):
        read_project(tmp_path)
    info = read_project(tmp_path, unreadable_entries="keep")
    assert [e.image_name for e in info.entries] == ["b.svs"]
    assert [(u.index, u.entry_id, u.image_name) for u in info.unreadable] == [(0, None, "a.svs"), (2, None, "c.svs")]
    assert "remove one of them in QuPath and add its image again" in str(info.unreadable[1].error)


def test_init_project_on_a_file_says_it_expected_a_folder(tmp_path, phantom_svs):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ProjectError, match=r"taken is a file; expected a folder for the new project"):
        init_project_files(tmp_path / "taken", [phantom_svs])
    with pytest.raises(ProjectError, match=r"taken/p lies under .*taken, which is a file; expected a folder"):
        init_project_files(tmp_path / "taken" / "p", [phantom_svs])
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_folder_written_whole_gets_the_umask_s_permissions_and_nothing_is_left_after_an_error(tmp_path):
    # A calibrated model or an nnU-Net dataset lands on a shared drive too; mkdtemp would make it owner-only.
    from bridge.atomic import folder_replaced_whole

    old = os.umask(0o022)
    try:
        with folder_replaced_whole(tmp_path / "model") as part:
            (part / "manifest.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    with pytest.raises(RuntimeError), folder_replaced_whole(tmp_path / "other") as part:
        (part / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # The folders made above it go too; one that existed stays.
    with pytest.raises(RuntimeError), folder_replaced_whole(tmp_path / "model" / "new" / "deeper" / "x"):
        raise RuntimeError("refused")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["manifest.json", "model"]


_KILLED_INIT = """
import os, shutil, signal, sys
from pathlib import Path
import bridge.init_project as init

real_copy = shutil.copy2
def copy_then_die(source, target, **kwargs):
    # the second template file copied, half of it: then SIGKILL, which no cleanup outlives
    if Path(target).name != "classes.json":
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_copy(source, target, **kwargs)
init.shutil.copy2 = copy_then_die
init.init_project_files(Path(sys.argv[1]), [Path(sys.argv[2])])
"""


def test_an_init_project_killed_part_way_is_made_again_by_the_next(tmp_path, phantom_svs, caplog):
    import signal
    import subprocess
    import sys

    project = tmp_path / "p"
    done = subprocess.run([sys.executable, "-c", _KILLED_INIT, str(project), str(phantom_svs)], timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert (project / "data" / "1" / "server.json").is_file() and not (project / "project.qpproj").exists()
    # was refused as "not empty", with nothing saying why or that it is no project: delete it by hand
    with caplog.at_level("WARNING", logger="bridge.init_project"):
        qpproj = init_project_files(project, [phantom_svs])
    assert "an interrupted init-project" in caplog.text
    assert [e.image_name for e in read_project(qpproj).entries] == ["p1.svs"]
    scripts = sorted(p.name for p in (project / "scripts").iterdir())
    assert all((project / "scripts" / s).stat().st_size > 100 for s in scripts)  # none cut short


def test_a_folder_holding_more_than_an_interrupted_init_project_is_still_refused(tmp_path, phantom_svs):
    project = tmp_path / "p"
    (project / "data" / "1").mkdir(parents=True)
    (project / "data" / "1" / "server.json").write_text("{}")
    (project / "notes.txt").write_text("a pathologist's")
    with pytest.raises(ProjectError, match="is not empty"):
        init_project_files(project, [phantom_svs])
    assert (project / "notes.txt").read_text() == "a pathologist's"


@pytest.mark.parametrize("own", ["pdl1-config.toml", "scripts/pdl1_analyze.groovy"])
def test_a_folder_holding_a_users_own_config_or_script_is_no_interrupted_init_project(tmp_path, phantom_svs, own):
    # The names were all that counted: a lab's own pdl1-config.toml (or its edited script) was taken for what an
    # interrupted init-project wrote, removed, and replaced by the template.
    project = tmp_path / "p"
    (project / "scripts").mkdir(parents=True)
    (project / own).write_text("# my lab's settings\n")
    with pytest.raises(ProjectError, match="is not empty"):
        init_project_files(project, [phantom_svs])
    assert (project / own).read_text() == "# my lab's settings\n"


def test_a_folder_init_project_refuses_is_named_with_what_it_holds_and_the_fix(tmp_path, phantom_svs):
    # Were "p is not empty; QuPath wants a new, empty folder" and "p/project.qpproj exists; init-project creates
    # new projects only": no fix, and nothing said what was in the way.
    project = tmp_path / "p"
    project.mkdir()
    for name in ("e.txt", "d.txt", "c.txt", "b.txt", "a.txt"):
        (project / name).write_text("a pathologist's")
    with pytest.raises(ProjectError) as err:
        init_project_files(project, [phantom_svs])
    assert str(err.value) == (
        f"{project} is not empty (it holds a.txt, b.txt, c.txt and 2 more); QuPath wants a new, empty folder for a "
        "project: give a new folder (init-project makes it), or one that is empty"
    )
    (project / "project.qpproj").write_text("{}")
    with pytest.raises(ProjectError) as err:
        init_project_files(project, [phantom_svs])
    assert str(err.value) == (
        f"{project / 'project.qpproj'} exists; init-project creates new projects only: give a new folder, or add the "
        "slides to this project in QuPath (File > Project > Add images)"
    )
    assert sorted(p.name for p in project.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "project.qpproj"]


@pytest.mark.parametrize("made_first", [False, True])
def test_an_init_project_failing_part_way_leaves_no_half_project(tmp_path, phantom_svs, monkeypatch, made_first):
    import errno

    import bridge.init_project as init

    project = tmp_path / "p"
    if made_first:  # QuPath asks for an empty folder: users make one first
        project.mkdir()
    real_copy = shutil.copy2

    def full_disk(source, target, **kwargs):
        if Path(target).parent.name == "scripts":
            Path(target).write_bytes(b"cut")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(init.shutil, "copy2", full_disk)
    with pytest.raises(OSError, match="No space left"):
        init_project_files(project, [phantom_svs])
    assert (list(project.iterdir()) == []) if made_first else not project.exists()
    monkeypatch.setattr(init.shutil, "copy2", real_copy)
    assert read_project(init_project_files(project, [phantom_svs])).entries  # space freed: made at once


def test_qupaths_image_type_is_read_and_a_summary_that_does_not_read_is_named(tmp_path, caplog):
    # A data/<id>/summary.json that does not read was passed over in silence, and the stain told from the colour
    # though a person may have set the type in QuPath.
    project = tmp_path / "p"
    project.mkdir()
    images = [
        {"serverBuilder": {"builderType": "uri", "uri": f"file:{tmp_path}/{n}.svs"}, "entryID": i, "imageName": n}
        for i, n in ((1, "a"), (2, "b"), (3, "c"))
    ]
    (project / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": images}))
    for entry, text in (("1", '{"imageType": "BRIGHTFIELD_H_DAB"}'), ("2", '{"imageType": "BRIGHT')):
        (project / "data" / entry).mkdir(parents=True)
        (project / "data" / entry / "summary.json").write_text(text)
    with caplog.at_level("WARNING", logger="bridge.project"):
        entries = read_project(project / "project.qpproj").entries
    assert [e.image_type for e in entries] == ["BRIGHTFIELD_H_DAB", None, None]
    damaged = project / "data" / "2" / "summary.json"
    assert f"{damaged} does not read (" in caplog.text and "its stain is told from its colour" in caplog.text
    # pdl1 train and pdl1 export nnunet read projects too, and have no --stain to give.
    assert caplog.text.rstrip().endswith(
        "nor whether QuPath saved it after its objects were exported; open the image in QuPath and save it (QuPath "
        "writes the file again; for pdl1 run, --stain also states the stain)"
    ), caplog.text
    assert "data/3" not in caplog.text  # never saved with data in QuPath: nothing to say


def test_a_unc_share_named_in_both_forms_qupath_writes_is_one_share(tmp_path):
    # helper-155: QuPath writes the project's URI by File.toURI (file:////server/share/...) and an image it located
    # again by Path.toUri (file://server/share/...); the two were a POSIX and a Windows path, and the study moved
    # whole was "moved".
    saved = uri_to_path("file:////server/share/Study/project/project.qpproj").parent
    image = uri_to_path("file://server/share/Study/slides/a.svs")
    assert moved_with_project(image, saved, tmp_path / "Study" / "project") == tmp_path / "Study" / "slides" / "a.svs"


def test_a_name_macos_wrote_decomposed_is_found_by_the_composed_name_of_its_uri(tmp_path):
    # helper-155: "no Müller é.svs in DIR", listing a file that looked the same (NFD on disk, NFC in the URI).
    import unicodedata

    composed = "M\u00fcller \u00e9.svs"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    entry = ProjectEntry("1", composed, "file:/Users/x/slides/M%C3%BCller%20%C3%A9.svs")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / decomposed).write_bytes(b"x")
    found = locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((tmp_path / "local",)))
    assert found == tmp_path / "local" / decomposed
    assert locate_image(entry, project_folder=tmp_path / "local" / "project") == tmp_path / "local" / decomposed
    here = ProjectEntry("2", composed, path_to_uri(tmp_path / "local" / composed))  # its own folder, named composed
    assert locate_image(here, project_folder=tmp_path / "p") == tmp_path / "local" / decomposed


def _ignores_case(folder: Path) -> bool:
    probe = folder / "CaseProbe"
    probe.write_bytes(b"")
    try:
        return (folder / "caseprobe").exists()
    finally:
        probe.unlink()


def test_a_windows_projects_name_is_found_in_another_case_and_two_such_files_are_refused(tmp_path):
    # A project made on Windows names Case1.SVS; the file copied here is case1.svs: it was "no Case1.SVS in ...".
    windows = ProjectEntry("1", "Case1.SVS", "file:/C:/Scans/Case1.SVS")
    local = tmp_path / "local"
    (local / "a").mkdir(parents=True)
    (local / "a" / "case1.svs").write_bytes(b"x")
    found = find_image(windows, project_folder=tmp_path / "p", search=ImageSearch((local,)))
    assert (found.path, found.how) == (local / "a" / "case1.svs", UNDER_SEARCH_DIR)
    # A Linux path names its file exactly: on a file system that tells case, case1.svs is another slide.
    linux = ProjectEntry("2", "Case1.SVS", "file:/gone/Case1.SVS")
    if not _ignores_case(local / "a"):
        with pytest.raises(ImageMovedError, match=r"no Case1.SVS in "):
            locate_image(linux, project_folder=tmp_path / "p", search=ImageSearch((local,)))
    # A file of the exact name is taken over one in another case, with no doubt between them.
    (local / "b").mkdir()
    (local / "b" / "Case1.SVS").write_bytes(b"y")
    assert (
        locate_image(windows, project_folder=tmp_path / "p", search=ImageSearch((local,))) == local / "b" / "Case1.SVS"
    )
    if _ignores_case(local / "a"):
        return  # two files that differ only in case cannot lie in one folder here
    # Two files that differ only in case, neither of the exact name: refused, naming both.
    (local / "b" / "Case1.SVS").unlink()
    (local / "a" / "CASE1.svs").write_bytes(b"z")
    refused = (
        rf"image of entry 1 \(Case1.SVS\) has moved, and 2 files under --search-dir are called Case1.SVS but for case: "
        rf"{re.escape(str(local / 'a' / 'CASE1.svs'))}, {re.escape(str(local / 'a' / 'case1.svs'))}, none under more"
    )
    with pytest.raises(ImageMovedError, match=refused):
        locate_image(windows, project_folder=tmp_path / "p", search=ImageSearch((local,)))


def test_a_windows_study_moved_with_its_slides_finds_a_slide_in_another_case_beside_it(tmp_path):
    entry = ProjectEntry("1", "Case1.SVS", "file:/C:/Study/slides/Case1.SVS")
    saved = PureWindowsPath("C:/Study/project")
    study = tmp_path / "Study"
    (study / "slides").mkdir(parents=True)
    (study / "slides" / "case1.svs").write_bytes(b"x")
    found = find_image(entry, project_folder=study / "project", saved_folder=saved)
    assert (found.path, found.how) == (study / "slides" / "case1.svs", WITH_PROJECT)
    if _ignores_case(study / "slides"):
        return
    (study / "slides" / "CASE1.SVS").write_bytes(b"y")
    with pytest.raises(ImageMovedError) as err:
        find_image(entry, project_folder=study / "project", saved_folder=saved)
    assert str(err.value) == (
        f"image of entry 1 (Case1.SVS): 2 files in {study / 'slides'} are called Case1.SVS but for case: "
        f"{study / 'slides' / 'CASE1.SVS'}, {study / 'slides' / 'case1.svs'}; its project's Windows path, which "
        "ignores case, cannot tell which one it is: rename or move the others"
    )


def test_one_file_reached_through_a_link_too_is_one_file(tmp_path):
    # helper-155: sd/latest -> 2024 made 2024/x.svs "2 files called x.svs", and the image was refused.
    (tmp_path / "sd" / "2024").mkdir(parents=True)
    (tmp_path / "sd" / "2024" / "x.svs").write_bytes(b"x")
    (tmp_path / "sd" / "latest").symlink_to("2024")
    entry = ProjectEntry("1", "x.svs", "file:/gone/x.svs")
    found = locate_image(entry, project_folder=tmp_path / "p", search=ImageSearch((tmp_path / "sd",)))
    assert found == tmp_path / "sd" / "2024" / "x.svs"


def test_an_image_that_is_a_folder_is_said_to_be_one_not_to_have_moved(tmp_path):
    # helper-155: an OME-Zarr folder where the URI says was "moved: not at ...; pass --search-dir".
    (tmp_path / "x.ome.zarr").mkdir()
    entry = ProjectEntry("4", "x.ome.zarr", path_to_uri(tmp_path / "x.ome.zarr"))
    with pytest.raises(ProjectError, match=r"image of entry 4 \(x.ome.zarr\) is a folder, \S+ \(an image QuPath "):
        locate_image(entry, project_folder=tmp_path / "p")


def test_slides_of_one_name_in_case_folders_are_told_apart_by_the_folders_their_uris_name(tmp_path):
    # helper-155: entries C:/scans/caseA/slide.svs and caseB/slide.svs; with both under --search-dir both were
    # refused, and with caseA's alone both were analysed from it and reported done.
    a = ProjectEntry("1", "slide.svs", "file:/C:/scans/caseA/slide.svs")
    b = ProjectEntry("2", "slide.svs", "file:/C:/scans/CASEB/slide.svs")
    local = tmp_path / "local"
    for case in ("caseA", "caseB"):
        (local / case).mkdir(parents=True)
        (local / case / "slide.svs").write_bytes(case.encode())
    search = ImageSearch((local,))
    assert locate_image(a, project_folder=tmp_path / "p", search=search) == local / "caseA" / "slide.svs"
    assert locate_image(b, project_folder=tmp_path / "p", search=search) == local / "caseB" / "slide.svs"
    (local / "caseB" / "slide.svs").unlink()
    search = ImageSearch((local,))
    located = [(e, locate_image(e, project_folder=tmp_path / "p", search=search)) for e in (a, b)]
    assert [path for _, path in located] == [local / "caseA" / "slide.svs"] * 2
    assert list(claimed_twice(located)) == ["2"]
    assert claimed_twice(located)["2"].startswith(
        f"image of entry 2 (slide.svs) has moved, and the only file found for it, {local / 'caseA' / 'slide.svs'}, "
        "is entry 1 (slide.svs)'s too: not analysed as two images"
    )
    twice = ProjectEntry("3", "slide again", a.uri)  # one image added twice: both analysed
    assert claimed_twice([located[0], (twice, located[0][1])]) == {}


def test_init_project_names_a_slide_by_the_path_given_keeping_its_links(tmp_path, phantom_svs):
    # helper-155: lab -> vol1 gave file:/.../vol1/x.svs: where the link leads on this machine, which QuPath (File.toURI
    # of the path it is given) does not write, and another machine mounting lab elsewhere would not find.
    (tmp_path / "vol1").mkdir()
    shutil.copy(phantom_svs, tmp_path / "vol1" / "x.svs")
    (tmp_path / "lab").symlink_to("vol1")
    init_project_files(tmp_path / "p", [tmp_path / "lab" / "x.svs"])
    (entry,) = read_project(tmp_path / "p").entries
    assert entry.uri == path_to_uri(tmp_path / "lab" / "x.svs") == "file:" + str(tmp_path / "lab" / "x.svs")
    assert read_project(tmp_path / "p").saved_folder == PurePosixPath(tmp_path / "p")
