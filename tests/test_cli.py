import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.qupath_geojson import read_features

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "phantom", "bench"):
        assert command in result.output


def _readme_synopses() -> list[str]:
    """The `pdl1 ...` synopses in the README's headings (### `pdl1 run PROJECT_OR_SLIDES... [--out DIR] ...`)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return [syn for line in readme.splitlines() if line.startswith("#") for syn in re.findall(r"`(pdl1 [^`]*)`", line)]


def test_the_readmes_command_headings_name_real_options_with_their_defaults():
    # The headings are what a reader copies; an option renamed or a default changed in the code left them behind.
    import typer.main

    synopses = _readme_synopses()
    assert len(synopses) >= 20, synopses
    for synopsis in synopses:
        command = typer.main.get_command(app)
        for word in synopsis.split()[1:]:
            if not hasattr(command, "commands") or word not in command.commands:
                break
            command = command.commands[word]
        if hasattr(command, "commands"):  # `pdl1 eval SLIDES... --out DIR` runs the suite
            command = command.commands["suite"]
        params = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", synopsis):
            assert option in params, f"{synopsis}: {option} is no option of `{command.name}`"
        for option, shown in re.findall(r"\[(--[a-z][\w-]*) (\d[\d.]*)\]", synopsis):
            default = params[option].default  # None: settled later (pdl1-config.toml, or the help's "when not given")
            if default is not None:
                same = shown == str(default) or (shown.count(".") < 2 and float(shown) == float(default))
                assert same, f"{synopsis}: {option} defaults to {default}, not {shown}"
        # A lower-case word is a default too ([--device cpu], [--out pdl1-demo]); upper case is a placeholder (DIR).
        for option, shown in re.findall(r"\[(--[a-z][\w-]*) ([a-z][\w.-]*)\]", synopsis):
            default = params[option].default
            if default is not None:
                assert shown == str(default), f"{synopsis}: {option} defaults to {default}, not {shown}"


def test_the_readmes_command_headings_name_every_option():
    # A new option was in `--help` only. The README's Commands section says what the headings leave out:
    # --device and --no-progress (but for a few), and `pdl1 train`'s options, which its text gives.
    import typer.main

    left_out = {"--help", "--device", "--progress"}
    for synopsis in _readme_synopses():
        command = typer.main.get_command(app)
        for word in synopsis.split()[1:]:
            if not hasattr(command, "commands") or word not in command.commands:
                break
            command = command.commands[word]
        if hasattr(command, "commands"):
            command = command.commands["suite"]
        if synopsis.startswith("pdl1 train ") or synopsis.endswith(command.name):  # a name alone (nnU-Net v2: ...)
            continue
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", synopsis))
        missing = [
            param.opts[0]
            for param in command.params
            if param.opts[0].startswith("--")
            and param.opts[0] not in left_out
            and not named & {*param.opts, *param.secondary_opts}
        ]
        assert missing == [], f"{synopsis}: leaves out {missing}"


def test_every_option_and_argument_of_every_command_has_a_help_text():
    # `pdl1 serve --port`, `pdl1 demo --tps` and four of `pdl1 train`'s showed a default and a range but not what
    # they set (--seed: of what; --batch-size: patches, slides or tiles).
    import typer.main

    def leaves(command, path):
        subcommands = getattr(command, "commands", {})
        if not subcommands:
            yield path, command
        for name, sub in subcommands.items():
            yield from leaves(sub, f"{path} {name}")

    commands = list(leaves(typer.main.get_command(app), "pdl1"))
    assert len(commands) >= 20
    unexplained = [
        f"{path} {param.opts[0]}"
        for path, command in commands
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert unexplained == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["run", "x.svs", "--qupath", "bogus"], "--qupath: expected auto, never or always, got 'bogus'"),
        (["run", "x.svs", "--engine", "bogus"], "--engine: expected local or ray, got 'bogus'"),
        (["review-queue", ".", "--qupath", "bogus"], "--qupath: expected auto, never or always, got 'bogus'"),
        (["train", "seg", ".", "--out", "m", "--qupath", "bogus"], "--qupath: expected auto, always or never, got"),
        (["phantom", "x.svs", "--reduced-levels", "bogus"], "--reduced-levels: expected rendered or averaged, got"),
    ],
)
def test_a_word_option_given_another_word_is_a_usage_error_naming_the_option(tmp_path, args, said):
    # review-queue and phantom answered exit 1 after starting, phantom in the library's words
    # ("reduced_levels must be ..."); run's did not say what came.
    result = runner.invoke(app, [str(tmp_path / a) if a in (".", "x.svs", "m") else a for a in args])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and f"Invalid value for {said}" in text, result.output
    assert sorted(tmp_path.iterdir()) == []


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith("pdl1-bridge 0.1.0")
    # The libraries it runs on, torch among them (it listed numpy and OpenSlide only).
    import torch

    libraries = result.output.splitlines()[2]
    assert f"torch {torch.__version__}" in libraries and "paquo " in libraries and "shapely " in libraries


def test_version_with_openslide_broken_prints_the_rest_and_names_the_fix(monkeypatch):
    # A missing or broken OpenSlide library was a traceback, and no version was printed at all.
    import sys

    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ModuleNotFoundError
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.splitlines()
    assert lines[0] == "pdl1-bridge 0.1.0"
    assert lines[1].startswith("python ") and lines[1].endswith(", openslide (cannot be loaded)")
    assert lines[2].startswith("torch ") and "paquo " in lines[2]  # the others too (were left out), then the fix
    said = " ".join(" ".join(lines[3:]).split())
    assert said.startswith("error: OpenSlide cannot be loaded (ModuleNotFoundError: "), said
    assert said.endswith("reinstall it (pip install --force-reinstall openslide-python openslide-bin)"), said


def test_phantom_writes_slide_and_truth(tmp_path):
    out = tmp_path / "ph.svs"
    result = runner.invoke(app, ["phantom", str(out), "--size", "1024", "--seed", "3", "--tps", "60", "--no-progress"])
    assert result.exit_code == 0, result.output
    truth = tmp_path / "ph.truth"
    summary = json.loads((truth / "truth.json").read_text())
    assert summary["spec"]["tps_percent"] == 60
    objs = list(read_features(truth / "nuclei.geojson"))
    assert len(objs) == sum(summary["nuclei_counts"].values())
    assert {o.classification for o in objs} <= {"Tumor: Positive", "Tumor: Negative", "Other"}
    assert "TPS" in result.output
    # Written once; replaced only when asked (the slide may be in a project, its truth scoring a run).
    before = out.read_bytes()
    again = runner.invoke(app, ["phantom", str(out), "--size", "1024", "--seed", "4", "--no-progress"])
    assert again.exit_code == 2 and "exists already" in again.output and "--overwrite" in again.output
    assert out.read_bytes() == before
    replaced = runner.invoke(
        app, ["phantom", str(out), "--size", "1024", "--seed", "4", "--overwrite", "--no-progress"]
    )
    assert replaced.exit_code == 0 and out.read_bytes() != before


def test_phantom_rejects_out_of_range_options(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "x.svs"), "--size", "10"])
    assert result.exit_code == 2
    assert "1024" in result.output


def test_phantom_rejects_unknown_suffix(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "x.png"), "--size", "1024", "--no-progress"])
    assert result.exit_code == 1
    assert ".svs or .tif" in result.output


def test_phantom_refuses_a_folder_or_a_file_in_the_way_as_a_usage_error(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "notes").write_text("")
    for out, said in (
        (tmp_path / "slides", f"{tmp_path / 'slides'} is a folder; give the slide file to write, e.g. "),
        (tmp_path / "notes" / "x.svs", f"{tmp_path / 'notes' / 'x.svs'}: its folder {tmp_path / 'notes'} is a file;"),
        (tmp_path / "notes" / "a" / "x.svs", f"lies under {tmp_path / 'notes'}, which is a file; give a path in a"),
    ):
        args = ["phantom", str(out), "--size", "1024", "--overwrite", "--no-progress"]
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        text = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and said in text, result.output
        assert "Errno" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "slides"] and not any(
        (tmp_path / "slides").iterdir()
    )


@pytest.mark.parametrize("name", ["x" * 300 + ".svs", "loop.svs"], ids=["too-long", "symlink-loop"])
def test_phantom_to_a_name_the_file_system_refuses_says_so(tmp_path, name):
    # A 300-character name was a traceback (OSError: [Errno 36] File name too long) from the folder check.
    out = tmp_path / name
    if name == "loop.svs":
        out.symlink_to(tmp_path / "loop2.svs")
        (tmp_path / "loop2.svs").symlink_to(out)
    result = runner.invoke(app, ["phantom", str(out), "--size", "1024"], env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    said = "the name is too long" if name != "loop.svs" else "a symbolic link on the path leads back to itself"
    assert text.startswith(f"error: {out}: ") and said in text and "Traceback" not in text, text


def test_phantom_with_a_bad_ihc_name_writes_nothing(tmp_path):
    # The H&E was written before the --ihc name was refused, and stood in the way of the next try.
    args = ["phantom", str(tmp_path / "he.svs"), "--ihc", str(tmp_path / "ihc.png"), "--size", "1024", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "phantom slides are written as .svs or .tif/.tiff, got 'ihc.png'" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "device", "said"),
    [
        (["eval", "seg", "{slide}"], "gpu0", "expected auto, cpu, cuda or cuda:N, got 'gpu0'"),
        (["eval", "tps", "{slide}"], "cuda0", "expected auto, cpu, cuda or cuda:N, got 'cuda0'"),
        (["demo", "--out", "{out}", "--size", "1024"], "gpu", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["train", "seg", "{slide}", "--out", "{out}"], "auto", "expected cpu, cuda or cuda:N (training does not"),
        (["train", "nuclei", "{slide}", "--out", "{out}"], "gpu0", "expected auto, cpu, cuda or cuda:N, got 'gpu0'"),
    ],
    ids=["eval-seg", "eval-tps", "demo", "train-seg-auto", "train-nuclei"],
)
def test_a_device_torch_cannot_take_is_a_usage_error_before_any_work(tmp_path, command, device, said):
    # torch's "Expected one of cpu, cuda, ipu, xpu, ... device type" traceback, after the demo's phantoms were written.
    args = [a.format(slide=tmp_path / "x.svs", out=tmp_path / "out") for a in command]
    result = runner.invoke(app, [*args, "--device", device], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and said in text, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["run", "{slide}", "--out", "{out}"], ["eval", "seg", "{slide}"], ["demo", "--out", "{out}"], ["serve"]],
    ids=["run", "eval", "demo", "serve"],
)
def test_a_gpu_this_machine_lacks_is_a_usage_error_before_any_work(tmp_path, command):
    # pdl1 run failed every image with "ValueError: device 'cuda' asked for, ...", serve with uvicorn's traceback.
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one more than there are, on any machine
    args = [a.format(slide=tmp_path / "x.svs", out=tmp_path / "out") for a in command]
    result = runner.invoke(app, [*args, "--device", device], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert f"--device': {device!r} asked for, but " in text or f"--device: {device!r} asked for, but " in text, text
    assert ("torch sees no CUDA GPU" if device == "cuda:0" else "CUDA GPU") in text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.EROFS, "Read-only file system; the drive (or mount) is read-only: choose a folder on a writable one"),
        (errno.EACCES, "Permission denied; you may not write (or read) there: choose a folder you can write to"),
        (errno.ENOSPC, "No space left on device; the drive is full: free some space"),
    ],
    ids=["read-only", "no-permission", "full"],
)
def test_a_folder_the_command_cannot_write_is_explained(tmp_path, monkeypatch, code, said):
    # It was "error: [Errno 30] Read-only file system: '.../p'" (simulated: chmod does not stop root).
    from pathlib import Path

    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    slide = tmp_path / "s.svs"
    write_phantom(slide, PhantomSpec(1024, 1024, seed=2, tps_percent=10))

    def refused(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    args = ["init-project", str(tmp_path / "p"), str(slide), "--qupath", "never"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'p'}: {said}"), result.output
    assert "Errno" not in result.output


def test_bench_lists_benchmarks():
    result = runner.invoke(app, ["bench"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "tile_read" in result.output
    # Each one's summary whole: the docstring's first line alone stopped two mid-sentence ("k cells/s and").
    rows = result.output.splitlines()
    assert len(rows) >= 20 and all(row.endswith((".", ")")) for row in rows), rows
    assert any(row.startswith("export_targets ") and row.endswith("k cells/s and peak RSS.") for row in rows)


def test_an_unknown_benchmark_is_named_with_the_known_ones():
    result = runner.invoke(app, ["bench", "nosuch", "--quick"])
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown benchmark 'nosuch'; known: tile_read")  # not in quotes


def test_a_benchmark_whose_optional_dependency_is_missing_names_it_and_the_extra_to_install(monkeypatch):
    # service_roi imports uvicorn (the serve extra): without it, `pdl1 bench service_roi` was a traceback.
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "benchmarks.service_roi", raising=False)
    listed = runner.invoke(app, ["bench"])
    assert listed.exit_code == 0, listed.output
    result = runner.invoke(app, ["bench", "service_roi", "--quick"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = " ".join(result.output.split())
    assert said.startswith("error: benchmark 'service_roi' cannot be imported here (ModuleNotFoundError: "), said
    assert said.endswith("; pip install 'pdl1-bridge[serve]'"), said
    assert "service_roi (benchmark 'service_roi' cannot be imported here" in " ".join(listed.output.split())


@pytest.mark.parametrize(
    ("option", "word", "expected"),
    [
        ("--uncertainty", "entropy", "predictive_entropy, mutual_information, prob_std"),
        ("--aggregation", "max", "mean, p90"),
        ("--objective", "area", "pixels, regions"),
    ],
)
def test_calibrate_with_an_unknown_word_is_a_usage_error_before_any_slide_is_read(tmp_path, option, word, expected):
    # The word was checked only after every slide had been segmented: minutes to hours lost, then "error:
    # objective must be one of ..." without the option's name.
    slide = tmp_path / "never_read.svs"  # not there: a usage error must come first
    result = runner.invoke(app, ["calibrate", str(slide), "--out", str(tmp_path / "cal"), option, word])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert f"Invalid value for '{option}': got '{word}'; expected one of {expected}" in said, said
    assert not (tmp_path / "cal").exists()


def test_bad_log_level():
    result = runner.invoke(app, ["--log-level", "LOUD", "version"])
    assert result.exit_code == 2


# ---- pdl1 run: defaults from the project's pdl1-config.toml, options over them ------------------------------------


@pytest.fixture
def captured_run(monkeypatch):
    """`pdl1 run` up to the batch: the RunConfig it builds, without analysing anything."""
    import bridge.cli.run

    seen = []

    def fake_run(inputs, run_config, *, progress):
        seen.append(run_config)
        return []

    monkeypatch.setattr(bridge.cli.run, "run_with_progress", fake_run)
    # The run's settings are what is checked here, not whether this machine has the GPU they name.
    monkeypatch.setattr("bridge.cli.common._absent_device", lambda device: None)
    return seen


def _project(tmp_path, config_text=None):
    """A project of no images with ``config_text`` as its config: ``/abs/nuclei`` in it is ``tmp_path/abs/nuclei``,
    and the model folders it names are made (empty: read by the run, which these tests leave out)."""
    (tmp_path / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": []}))
    if config_text is not None:
        (tmp_path / "pdl1-config.toml").write_text(config_text.replace("/abs/nuclei", str(tmp_path / "abs" / "nuclei")))
        for folder in ("models/seg", "abs/nuclei"):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    ("given", "stain"), [("ihc", "H-DAB"), ("IHC", "H-DAB"), ("HE", "H&E"), ("H-DAB", "H-DAB"), ("H&E", "H&E")]
)
def test_stain_is_read_in_any_case(tmp_path, captured_run, given, stain):
    result = runner.invoke(app, ["run", str(_project(tmp_path)), "--no-progress", "--no-config", "--stain", given])
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.stain == stain


def test_help_reads_nuclei_or_no_nuclei():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "--nuclei" in result.output and "--no-nuclei" in result.output
    assert "--no-no-nuclei" not in result.output
    # It said "skip them" of every image, where a PD-L1 IHC is scored and written by its cells regardless.
    text = " ".join(result.output.replace("│", " ").split())
    assert "Find nuclei on H&E and score the predicted TPS, or skip them" in text
    assert "(a PD-L1 IHC is scored by its cells either way)" in text
    assert "and so are a PD-L1 IHC's cells, which are its score" in text


@pytest.mark.parametrize(
    ("args", "outputs", "run_nuclei"),
    [
        ([], ("regions", "uncertainty_tiles", "sua", "nuclei"), True),
        (["--no-nuclei"], ("regions", "uncertainty_tiles", "sua"), False),
        (["--output", "regions", "--nuclei"], ("regions", "nuclei"), True),
        (["--output", "regions"], ("regions",), False),
        # nuclei alone, less nuclei: the regions pdl1 run writes always, not outputs refused as empty
        (["--output", "nuclei", "--no-nuclei"], ("regions",), False),
    ],
)
def test_nuclei_puts_nuclei_into_the_outputs_and_no_nuclei_takes_it_out(
    tmp_path, captured_run, args, outputs, run_nuclei
):
    result = runner.invoke(app, ["run", str(_project(tmp_path)), "--no-progress", "--no-config", *args])
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.settings.outputs == outputs and config.pipeline.run_nuclei is run_nuclei


CONFIG = """
[analysis]
device = "cpu"
outputs = ["regions", "sua"]
target_classes = ["Tumor"]
target_names = ["core 1"]
uncertainty_tile_um = 32
min_region_area_um2 = 50
[models]
segmentation = "models/seg"
nuclei = "/abs/nuclei"
"""


def test_run_takes_its_defaults_from_the_projects_config(tmp_path, captured_run):
    project = _project(tmp_path, CONFIG)
    result = runner.invoke(app, ["run", str(project / "project.qpproj"), "--no-progress"])
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.pipeline.device == "cpu"
    assert config.pipeline.seg_model_dir == str(project / "models" / "seg")
    assert config.pipeline.nuclei_model_dir == str(project / "abs" / "nuclei")
    assert config.pipeline.run_nuclei is False and config.pipeline.run_sua is True
    assert config.pipeline.uncertainty_tile_um == 32.0 and config.pipeline.min_region_area_um2 == 50.0
    assert config.target_classes == ("Tumor",) and config.target_names == ("core 1",)
    assert config.include_tiles is False
    assert config.settings.path == project / "pdl1-config.toml"


def test_a_project_given_as_its_folder_and_its_project_file_is_one_project_with_its_config(tmp_path, monkeypatch):
    # `pdl1 run P/project.qpproj P` said "2 projects given"; it is one project, run once, as a slide named twice is.
    import bridge.cli.run

    seen = []

    def fake_run(inputs, run_config, *, progress):
        seen.append((inputs, run_config))
        return []

    monkeypatch.setattr(bridge.cli.run, "run_with_progress", fake_run)
    monkeypatch.setattr("bridge.cli.common._absent_device", lambda device: None)
    (tmp_path / "P").mkdir()
    project = _project(tmp_path / "P", CONFIG)
    qpproj = project / "project.qpproj"
    result = runner.invoke(app, ["run", str(qpproj), str(project), "--no-progress"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"note: {qpproj} is given twice (as {project}); it is analysed once" in result.output
    ((inputs, config),) = seen
    assert inputs == [qpproj]
    assert config.settings.path == project / "pdl1-config.toml"  # read as for the project given once


def test_a_model_folder_that_is_not_there_is_refused_before_any_image_naming_where_it_was_given(tmp_path, captured_run):
    # Each image failed with "no such model folder; ... or leave the model option out", also for the config's key.
    project = _project(tmp_path, CONFIG.replace('segmentation = "models/seg"', 'segmentation = "models/gone"'))
    result = runner.invoke(app, ["run", str(project), "--no-progress"], env={"COLUMNS": "1000"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and captured_run == [], result.output
    assert (
        f"{project / 'pdl1-config.toml'}, line 10: [models] segmentation = {project / 'models' / 'gone'}: no such "
        "model folder; give the folder that holds manifest.json and its members (a relative path is to the config "
        "file's folder), or remove the key for the shipped one" in text
    )
    (project / "pdl1-config.toml").write_text(CONFIG.replace("/abs/nuclei", str(project / "abs" / "nuclei")))
    result = runner.invoke(app, ["run", str(project), "--no-progress", "--ihc-model", str(project / "project.qpproj")],
                           env={"COLUMNS": "1000"})  # fmt: skip
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "project.qpproj: a file, not a model folder; give the folder" in text
    assert "or leave --ihc-model out for the shipped one" in text


def test_run_options_override_the_config(tmp_path, captured_run):
    project = _project(tmp_path, CONFIG)
    args = ["run", str(project), "--no-progress", "--device", "cuda:1", "--class", "Stroma", "--class", "Tumor"]
    (tmp_path / "elsewhere").mkdir()
    args += ["--output", "nuclei", "--output", "uncertainty_tiles", "--seg-model", str(tmp_path / "elsewhere")]
    args += ["--uncertainty-tile-um", "16", "--min-region-area-um2", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.pipeline.device == "cuda:1"
    assert config.target_classes == ("Stroma", "Tumor")
    assert config.target_names == ("core 1",)  # not given: the config's
    assert config.pipeline.run_nuclei is True and config.pipeline.run_sua is False and config.include_tiles
    assert config.pipeline.seg_model_dir == str(tmp_path / "elsewhere")
    assert config.pipeline.nuclei_model_dir == str(project / "abs" / "nuclei")
    assert config.pipeline.uncertainty_tile_um == 16.0 and config.pipeline.min_region_area_um2 == 0.0
    assert config.settings.source_of("device") == "command line"
    assert config.settings.source_of("target_names") == str(project / "pdl1-config.toml")


def test_run_without_a_config_uses_the_built_in_defaults(tmp_path, captured_run):
    project = _project(tmp_path)
    assert runner.invoke(app, ["run", str(project), "--no-progress", "--no-nuclei"]).exit_code == 0
    (tmp_path / "b").mkdir()
    result = runner.invoke(app, ["run", str(_project(tmp_path / "b", CONFIG)), "--no-progress", "--no-config"])
    assert result.exit_code == 0, result.output
    plain, ignored = captured_run
    for config in (plain, ignored):
        assert config.pipeline.device == "auto" and config.pipeline.seg_model_dir is None
        assert config.target_classes == () and config.include_tiles and config.pipeline.run_sua
        assert config.pipeline.uncertainty_tile_um == 64.0 and config.pipeline.min_region_area_um2 == 200.0
        assert config.settings.path is None
    assert plain.pipeline.run_nuclei is False and plain.settings.outputs == ("regions", "uncertainty_tiles", "sua")
    assert ignored.pipeline.run_nuclei is True


def test_run_reads_a_config_given_with_config_also_for_slides(tmp_path, captured_run):
    config_file = tmp_path / "lab.toml"
    config_file.write_text('[analysis]\ndevice = "cpu"\n')
    slide = tmp_path / "a.svs"
    result = runner.invoke(app, ["run", str(slide), "--out", str(tmp_path / "o"), "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert captured_run[0].pipeline.device == "cpu"
    assert captured_run[0].settings.path == config_file


def test_run_takes_the_case_key_from_the_config_and_the_option_over_it(tmp_path, captured_run):
    project = _project(tmp_path, '[pairs]\ncase_key = "Case ID"\n')
    assert runner.invoke(app, ["run", str(project), "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["run", str(project), "--no-progress", "--case-key", "block"]).exit_code == 0
    assert [c.case_key for c in captured_run] == ["Case ID", "block"]


@pytest.mark.parametrize(
    "args, code, match",
    [
        (["--output", "tiles"], 2, "expected some of regions, uncertainty_tiles, sua, nuclei, got 'tiles'"),
        (["--device", "gpu"], 2, "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--uncertainty-tile-um", "0"], 2, "expected a number above 0"),
        (["--config", "x.toml", "--no-config"], 2, "--config and --no-config exclude each other"),
        (["--output", "regions", "--refine"], 2, "--refine merges the SUA candidates in"),
        (["--case-key", " "], 2, "expected the entry metadata key that names each slide's case"),
    ],
)
def test_run_refuses_bad_settings_options(tmp_path, captured_run, args, code, match):
    result = runner.invoke(app, ["run", str(_project(tmp_path)), "--no-progress", *args])
    assert result.exit_code == code, result.output
    assert match in " ".join(result.output.replace("│", " ").split())
    assert captured_run == []


def test_run_stops_at_a_malformed_config_naming_file_line_and_key(tmp_path, captured_run):
    project = _project(tmp_path, '[analysis]\ndevice = "cpu"\nouputs = ["regions"]\n')
    result = runner.invoke(app, ["run", str(project), "--no-progress"])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "pdl1-config.toml, line 3: [analysis] ouputs: unknown key" in out
    assert captured_run == []


def test_run_help_says_where_defaults_come_from():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for option in ("--device", "--seg-model", "--nuclei-model", "--class", "--name", "--output"):
        assert option in text
    assert text.count("Default: from pdl1-config.toml") >= 8


def test_run_names_its_per_target_table_and_its_help_says_where_that_goes(tmp_path, monkeypatch):
    import bridge.cli.run

    project = _project(tmp_path)

    def fake_run(inputs, run_config, *, progress):  # a run writes pdl1/targets.csv beside its status
        (project / "pdl1").mkdir()
        (project / "pdl1" / "targets.csv").write_text("image,target\n")
        return []

    monkeypatch.setattr(bridge.cli.run, "run_with_progress", fake_run)
    monkeypatch.setattr("bridge.cli.common._absent_device", lambda device: None)
    result = runner.invoke(app, ["run", str(project), "--no-progress", "--no-config"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"per-target results: {project / 'pdl1' / 'targets.csv'}" in result.output
    help_text = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.replace("│", " ").split())
    assert "Through QuPath a dearrayed TMA is analysed core by core (cores marked missing are left alone)." in help_text
    assert "goes to pdl1/targets.csv" in help_text
    assert "each TMA core of an image with a TMA grid (through QuPath or its export)" in help_text
    assert "from each image's export by qupath_scripts/pdl1_export_labels.groovy" in help_text


def test_an_interrupted_phantom_overwrite_leaves_no_slide_or_truth_of_two_phantoms(tmp_path, monkeypatch):
    # Ctrl-C during `pdl1 phantom --overwrite` was "Aborted!", leaving a slide cut short under the name and the
    # earlier phantom's truth.json beside it, read by eval (and demo) as the truth of these pixels.
    import inference

    out = tmp_path / "he.svs"
    args = ["phantom", str(out), "--size", "1024", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    real = inference.write_phantom

    def interrupted_midway(path, spec, *, on_progress=None):
        def stop(done, total):
            if done:
                raise KeyboardInterrupt

        return real(path, spec, on_progress=stop)

    monkeypatch.setattr(inference, "write_phantom", interrupted_midway)
    result = runner.invoke(app, [*args, "--overwrite", "--seed", "2"], env={"COLUMNS": "400"})
    assert result.exit_code == 130, result.output
    assert f"interrupted: {out} was not finished: it and its truth are removed" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_demo_counts_its_reports_thumbnails_and_says_what_a_ctrl_c_kept(tmp_path, monkeypatch):
    # The report's thumbnails (each reads its slide) were drawn without a bar after the run's, and Ctrl-C anywhere in
    # the demo ended it with exit 130 and not a word.
    import inference

    args = ["demo", "--out", str(tmp_path / "demo"), "--size", "1024", "--no-ihc", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"^report: 0/1 .*^report: 1/1 ", result.output, re.M | re.S), result.output

    def stopped(path, spec, *, on_progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "write_phantom", stopped)
    result = runner.invoke(app, [*args, "--seed", "8"], env={"COLUMNS": "400"})  # a new phantom: drawn again
    assert result.exit_code == 130, result.output
    assert "interrupted: the demo was not finished; the phantoms written whole in" in result.output


def test_a_phantom_being_drawn_has_no_truth_json_of_the_one_it_replaces(tmp_path):
    # truth.json, written last, says a phantom is whole; the earlier one's stayed while its successor was drawn.
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec
    from inference.phantom.truth import truth_dir_for

    out = tmp_path / "he.svs"
    write_phantom(out, PhantomSpec(1024, 1024, seed=1))
    seen = []

    def look(done, total):
        seen.append((truth_dir_for(out) / "truth.json").exists())

    write_phantom(out, PhantomSpec(1024, 1024, seed=2), on_progress=look)
    assert seen and not any(seen)
    assert json.loads((truth_dir_for(out) / "truth.json").read_text())["spec"]["seed"] == 2
    assert sorted(p.name for p in truth_dir_for(out).iterdir()) == ["nuclei.csv", "positive_mask.tif", "truth.json"]


def test_a_run_refused_before_any_image_draws_no_empty_progress_bars(tmp_path):
    """`pdl1 run SLIDE` without --out drew 'images 0/?' and 'tiles 0/?' bars above its usage error."""
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"")
    result = runner.invoke(app, ["run", str(slide)])
    assert result.exit_code == 1
    assert result.output.startswith("error: plain slides need --out DIR"), result.output
    assert "images" not in result.output and "tiles" not in result.output


@pytest.mark.parametrize(
    ("option", "model", "said"),
    [
        (
            "--seg-model",
            "nuclei",
            "is an H&E nuclei model, but an H&E segmentation model is needed for --seg-model; give one (this one is "
            "for --nuclei-model), or leave --seg-model out for the shipped one",
        ),
        (
            "--nuclei-model",
            "seg",
            "is an H&E segmentation model, but an H&E nuclei model is needed for --nuclei-model; give one (this one is "
            "for --seg-model)",
        ),
        (
            "--ihc-model",
            "nuclei",
            "is an H&E nuclei model, but an H-DAB (PD-L1 IHC) nuclei model is needed for --ihc-model; give one (this "
            "one is for --nuclei-model)",
        ),
        (
            "--nuclei-model",
            "nuclei-ihc",
            "is an H-DAB (PD-L1 IHC) nuclei model, but an H&E nuclei model is needed for --nuclei-model; give one "
            "(this one is for --ihc-model)",
        ),
    ],
)
def test_a_model_of_another_kind_than_its_option_takes_is_refused_before_any_image(tmp_path, option, model, said):
    # Each image failed with "a 'nuclei' model, but a 'segmentation' model is needed here", naming no option.
    from inference import demo_model_dir

    slide = tmp_path / "s.svs"
    slide.write_bytes(b"x")
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(slide), "--out", str(out), option, str(demo_model_dir(model))])
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.replace("│", " ").split())
    assert not out.exists()


def test_a_model_of_another_kind_from_the_config_file_is_named_with_its_line(tmp_path):
    from inference import demo_model_dir

    project = tmp_path / "p"
    project.mkdir()
    (project / "project.qpproj").write_text('{"version": "0.4.4", "images": []}')
    (project / "pdl1-config.toml").write_text(f'[models]\nsegmentation = "{demo_model_dir("nuclei")}"\n')
    result = runner.invoke(app, ["run", str(project)])
    assert result.exit_code == 2, result.output
    said = "".join(result.output.replace("│", " ").split())  # without blanks: rich wraps long paths anywhere
    assert "pdl1-config.toml,line2:[models]segmentation=" in said
    assert "'pdl1-nuclei'isanH&Enucleimodel,butanH&Esegmentationmodelisneededfor--seg-model" in said
    assert "removethekeyfortheshippedone" in said


def test_the_closing_table_tells_apart_entries_sharing_a_name_and_prints_brackets_as_written(capsys):
    # QuPath lets two entries share an image name; the table showed two identical rows. An error holding "[/...]"
    # (a path, a config section) raised rich's MarkupError after the whole batch had run, and "[models]" vanished.
    from bridge.cli.common import outcome_table
    from bridge.run import ImageOutcome

    outcome_table(
        [
            ImageOutcome("1", "a[1].svs", "done", 1.0, 12.0, "1-49%", stain="H&E"),
            ImageOutcome("2", "a[1].svs", "failed", 0.5, error="bad [models] section in C:[/x]/pdl1-config.toml"),
            ImageOutcome("3", "b.svs", "done", 1.0, 2.0, "1-49%", stain="H-DAB"),
        ]
    )
    captured = capsys.readouterr()
    assert "a[1].svs (entry 1)" in captured.out and "a[1].svs (entry 2)" in captured.out
    assert "b.svs (entry" not in captured.out and "b.svs" in captured.out
    assert "a[1].svs (entry 2): bad [models] section in C:[/x]/pdl1-config.toml" in " ".join(captured.err.split())


# A slide name longer than any terminal, and a review reason of several clauses: a log cut them at 160 columns.
LONG_NAME = "LUNG-2024-000123_PD-L1_22C3_block-A3_level2_rescan_" + "x" * 110 + "_final.svs"
LONG_REASON = (
    "nuclei uncertainty: mean predictive entropy of tumour nuclei 0.61 (limit 0.45) across the whole analysed region "
    "of the slide, 4 of 5 members disagreeing on the category of more than a third of the tumour cells"
)


def _long_outcomes():
    from bridge.run import ImageOutcome

    return [
        ImageOutcome(
            "1", LONG_NAME, "done", 12.3, 45.6, "1-49%", 12.0, True, 3, stain="H-DAB", cps_percent=50.0,
            review_reasons=(LONG_REASON,),
        ),
        ImageOutcome("2", "short.svs", "done", 1.0, 2.0, "1-49%", 1.0, False, 0, stain="H&E"),
    ]  # fmt: skip


def test_the_closing_table_keeps_long_names_and_reasons_whole_where_the_output_is_not_a_terminal(capsys):
    # Piped to a log (CI, a batch run), the table was cut at a fixed width: "LUNG-2024-..._rescan_x…" and the review
    # reason broken over lines. Output that is not a terminal is never cut or wrapped.
    from bridge.cli.common import outcome_table

    outcome_table(_long_outcomes())
    lines = capsys.readouterr().out.splitlines()
    assert "…" not in "\n".join(lines)
    (row,) = [line for line in lines if line.startswith("│") and LONG_NAME in line]  # whole, on one line
    assert " ".join(row.replace("│", " ").split()).startswith(
        f"{LONG_NAME} done H-DAB 45.6 1-49% 50.0 12.0 needs review"
    )
    assert f"{LONG_NAME}: needs review: {LONG_REASON}" in lines
    assert not any("the terminal is" in line for line in lines)  # no note: nothing was folded


def test_the_closing_table_folds_cells_on_a_narrow_terminal_and_says_where_they_are_whole(monkeypatch):
    # On an 80-column terminal rich cut the image name and the scores with "…" (the numbers read "45…", "1-…").
    # Each cell is folded onto more lines instead, the table says so, and the reason lines wrap whole.
    import io
    import shutil

    from bridge.cli.common import outcome_table

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *args, **kwargs: os.terminal_size((80, 24)))
    monkeypatch.setenv("NO_COLOR", "1")
    outcome_table(_long_outcomes())
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in terminal.getvalue().splitlines()]
    table_and_reasons = lines[: lines.index("What to check:")]  # the advice's lines are soft-wrapped by the terminal
    assert max(len(line) for line in table_and_reasons) <= 80, lines
    assert "…" not in "\n".join(lines)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert LONG_NAME in "".join(row[0] for row in rows)  # folded, every character kept
    first = rows[0]
    assert (first[1], first[2], first[3], first[4], first[5]) == ("done", "H-DAB", "45.6", "1-49%", "50.0")
    text = " ".join(" ".join(lines).split())
    assert "the terminal is 80 columns, this table" in text and "none is cut" in text
    assert "every value is also in pdl1/targets.csv and each image's summary.json" in text
    # The name is longer than the terminal, so the reason's line folds it: every character kept, in order.
    reason = f"{LONG_NAME}: needs review: {LONG_REASON}"
    assert "".join(reason.split()) in "".join(text.split())


def test_the_closing_table_says_a_cps_of_under_100_tumour_cells_is_insufficient_as_its_tps(capsys):
    # The TPS's category column said "insufficient tumour cells"; the CPS of the same 40 cells was a plain number.
    from bridge.cli.common import outcome_table
    from bridge.run import ImageOutcome
    from inference import INSUFFICIENT

    outcome_table(
        [
            ImageOutcome("1", "few.svs", "done", 1.0, 10.0, INSUFFICIENT, cps_percent=15.0, stain="H-DAB"),
            ImageOutcome("2", "many.svs", "done", 1.0, 5.0, "1-49%", cps_percent=8.0, stain="H-DAB"),
        ]
    )
    said = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    few = " ".join(line for line in said if "few.svs" in line or "cells)" in line)
    assert "15.0 (insufficient" in few and few.count("insufficient") == 2, said
    assert any(line.startswith("many.svs done H-DAB 5.0 1-49% 8.0 ") for line in said), said


def test_an_image_without_a_pixel_size_is_told_of_mpp_in_each_callers_words(tmp_path):
    # The library's messages advised --mpp, an option of `pdl1 run`, to every caller of analyse_slide (a Python
    # user has none); `pdl1 run` passes its own advice, as the service passes its clients'.
    import numpy as np
    from PIL import Image

    from inference import MissingMppError, Models, PipelineConfig, analyse_slide

    path = tmp_path / "small.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(path)
    config = PipelineConfig(device="cpu")
    with pytest.raises(MissingMppError) as err:
        analyse_slide(path, models=Models(config), config=config)
    assert "--mpp" not in str(err.value) and str(err.value).endswith(" as mpp")
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert "states no microns per pixel. Give the µm/px of the scanner or camera" in said, said
    assert ", with --mpp, or set the pixel size in QuPath (Image tab: Pixel width/height) and analyse the" in said


def test_a_jpeg_renamed_as_a_slide_is_named_as_a_jpeg_not_a_plain_svs(tmp_path):
    # A JPEG renamed .svs was "a plain SVS file states no microns per pixel": a scanner's SVS never is one.
    import numpy as np
    from PIL import Image

    path = tmp_path / "case.svs"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(path, format="JPEG")
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert (
        "case.svs: a JPEG image, though named .svs (no whole-slide reader opens it: check that it is the file you "
        "meant), states no microns per pixel. Give the µm/px" in said
    ), said


def test_pdl1_report_draws_a_bar_of_the_images_unless_told_not_to(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "b"):
        summary = {"image": str(tmp_path / f"{name}.svs"), "mpp": 0.5, "tps_percent": 1.0, "run_id": "r1"}
        (out / f"{name}.summary.json").write_text(json.dumps(summary))
    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"report\b.*2/2", shown.output), shown.output
    quiet = runner.invoke(app, ["report", str(out), "--no-progress"])
    assert quiet.exit_code == 0 and "2/2" not in quiet.output, quiet.output


def test_a_report_stopped_by_ctrl_c_says_what_it_left(tmp_path, monkeypatch):
    # Ctrl-C among the thumbnails ended `pdl1 report` with exit 130 and not a word.
    import bridge.report

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge.report, "write_report", stopped)
    result = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 130, result.output
    assert "interrupted: the report was not finished: its report.html and report.csv are still the earlier" in (
        result.output
    )


def _cells(line: str) -> list[str]:
    """The cells of one line of a rich table, stripped: ``│ a │ b │`` -> ``["a", "b"]``."""
    return [c.strip() for c in line.split("│")[1:-1]]


def test_a_case_not_compared_says_why_in_the_review_column_of_the_run_table(tmp_path, capsys):
    # The why of a case with two IHCs sat under "TPS H&E (predicted)", where it read as the H&E's score.
    from bridge.cli.common import pairs_table

    why = (
        "case 'B1' has 1 H&E and 2 PD-L1 IHC images analysed (B1_HE.svs (H&E), B1_IHC.svs (H-DAB), ihc_B1.svs "
        "(H-DAB)); a pair is one of each: give each case its own 'case' metadata value"
    )
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"case_key": "case", "cases": {"B1": {"why_not_compared": why}}}))
    pairs_table(path)
    rows = [_cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert rows[0][0] == "B1" and rows[0][1:6] == ["", "", "", "", ""], rows
    assert " ".join(r[6] for r in rows) == why  # wrapped within the review column, whole


def test_the_case_table_says_what_to_check_for_its_cases_reasons_once(tmp_path, capsys):
    # A case's reasons said what disagreed, not what to do: the IHC is the measurement, and a flagged IHC first.
    from bridge.cli.common import pairs_table

    registration = {"error_um": 12.0}
    comparison = dict(tps_he_predicted=60.0, tps_ihc=35.0, dice=0.5, entropy_disagree=0.3, entropy_agree=0.1)
    differs = {"reason": "H&E-predicted TPS category (>=50%) differs from the IHC's (1-49%)", "value": 25, "limit": 50}
    flagged = {"reason": "the IHC's own analysis needs review, so it is no sure reference (nuclei uncertainty)"}
    cases = {
        "B1": {"registration": registration, "comparison": comparison, "review_reasons": [differs, flagged]},
        "B2": {"registration": registration, "comparison": comparison, "review_reasons": [differs]},
        "B3": {"registration": registration, "comparison": comparison, "review_reasons": []},
    }
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"case_key": "case", "cases": cases}))
    pairs_table(path)
    said = capsys.readouterr().out
    advice = [line.strip() for line in said.split("What to check (cases):")[1].splitlines() if line.strip()]
    assert [line.split(":")[0] for line in advice] == [
        "- nuclei uncertainty",  # the IHC's own reason, inside the case's
        "- the case's IHC needs review",
        "- H&E and IHC in other TPS categories",
    ]
    assert "the IHC's TPS is the measurement" in advice[2]
    path.write_text(json.dumps({"case_key": "case", "cases": {"B3": cases["B3"]}}))
    pairs_table(path)
    assert "What to check" not in capsys.readouterr().out  # no reason, nothing to check


def test_a_tma_case_shows_its_cores_agreement_in_a_column_of_its_own(tmp_path, capsys):
    # A TMA case's whole-image TPS mixes every core: the table showed only that. Its cores' agreement is in a
    # "TMA cores" column; a case without cores has that cell empty, and a run without TMAs has no such column.
    from bridge.cli.common import pairs_table

    registration = {"error_um": 12.0}
    comparison = dict(tps_he_predicted=30.0, tps_ihc=35.0, dice=0.7, entropy_disagree=0.3, entropy_agree=0.1)
    summary = {
        "cores": 24, "compared": 20, "not_compared": 4, "categories_agree": 17, "category_agreement": 0.85,
        "cohen_kappa": 0.72, "mean_abs_tps_difference": 6.25, "spearman_rho": 0.81, "compared_needing_review": 2,
        "notes": [],
    }  # fmt: skip
    whole = {"registration": registration, "comparison": comparison, "review_reasons": []}
    cases = {
        "TMA1": {**whole, "cores": [], "cores_summary": summary},
        "B2": whole,
        "TMA3": {"why_not_compared": "registration failed: tissue overlap", "why_cores_not_compared": "only the H&E"},
    }
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"case_key": "case", "cases": cases}))
    pairs_table(path)
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("┃")).split("┃")[1:-1]]
    assert header[0] == "case" and header[7] == "TMA cores"
    rows = [_cells(line) for line in lines if line.startswith("│")]
    by_case: dict[str, list[str]] = {}
    for row in rows:  # a wrapped cell goes on under an empty case cell
        by_case.setdefault(row[0] or list(by_case)[-1], []).append(row[7])
    assert " ".join(c for c in by_case["TMA1"] if c) == (
        "20 of 24 cores compared: 17 agree in category (85%), kappa 0.72, Spearman 0.81, mean |TPS diff| 6.2; 2 flagged"
    )
    assert by_case["B2"] == [""] and " ".join(c for c in by_case["TMA3"] if c) == "only the H&E"
    pairs_table_without_cores = tmp_path / "plain.json"
    pairs_table_without_cores.write_text(json.dumps({"case_key": "case", "cases": {"B2": whole}}))
    pairs_table(pairs_table_without_cores)
    assert "TMA cores" not in capsys.readouterr().out


def test_a_row_resume_skipped_shows_the_earlier_runs_results_and_says_so(capsys):
    # Its row was blank but for "skipped", as if the results were lost.
    from bridge.cli.common import outcome_table
    from bridge.run import ImageOutcome

    done = dict(tps_percent=30.6, tps_category="1-49%", positive_area_pct=14.8, uncertainty_flag=False, candidates=0)
    outcome_table(
        [
            ImageOutcome("a", "a.svs", "skipped", stain="H&E", **done),
            ImageOutcome("b", "b.svs", "done", seconds=1.5, stain="H&E", **done),
        ]
    )
    rows = [_cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert rows[0] == ["a.svs", "skipped (done earlier)", "H&E", "30.6 (pred.)", "1-49%", "14.8", "ok", "0", ""]
    assert rows[1] == ["b.svs", "done", "H&E", "30.6 (pred.)", "1-49%", "14.8", "ok", "0", "1.5"]


@pytest.mark.parametrize(
    ("images", "left"),
    [
        ([25, None], "tiles 0/25"),  # the last image failed before tiling: the one before's 0/25 stayed
        ([None], "tiles 0/?"),  # the only image failed before tiling
        ([25, 12], "tiles 7/12"),  # the last image failed half-way through its tiles
    ],
)
def test_no_unfinished_tiles_bar_is_left_at_the_end_of_a_run(monkeypatch, capsys, images, left):
    import bridge.run
    from bridge.cli.common import run_with_progress
    from bridge.run import ImageOutcome

    def run_batch(inputs, config, *, on_image, on_tiles):
        for i, total in enumerate(images):
            on_image(i, len(images), f"{i}.svs")
            if total is None:
                continue
            on_tiles(0, total)
            on_tiles(total if i < len(images) - 1 else 7, total)
        return [ImageOutcome(str(i), f"{i}.svs", "done") for i in range(len(images))]

    monkeypatch.setattr(bridge.run, "run_batch", run_batch)
    monkeypatch.setattr("bridge.progress.writes_to_terminal", lambda stream=None: True)  # the bars of a terminal
    run_with_progress([], None, progress=True)
    said = capsys.readouterr().err
    assert f"images ({len(images) - 1}.svs)" in said and f"{len(images)}/{len(images)}" in said, said
    assert "tiles" not in said and left not in said, said


def test_a_tiles_bar_finished_by_the_last_image_stays(monkeypatch, capsys):
    import bridge.run
    from bridge.cli.common import run_with_progress
    from bridge.run import ImageOutcome

    def run_batch(inputs, config, *, on_image, on_tiles):
        on_image(0, 1, "a.svs")
        on_tiles(25, 25)
        return [ImageOutcome("a", "a.svs", "done")]

    monkeypatch.setattr("bridge.progress.writes_to_terminal", lambda stream=None: True)  # the bars of a terminal

    monkeypatch.setattr(bridge.run, "run_batch", run_batch)
    run_with_progress([], None, progress=True)
    said = capsys.readouterr().err
    assert "tiles" in said and "25/25" in said, said


def test_a_progress_bar_whose_work_failed_is_taken_away(capsys):
    # `pdl1 eval` of a slide that does not open left 'eval x.svs 0/?' above the error.
    from bridge.progress import progress_bar

    with pytest.raises(OSError), progress_bar("eval x.svs"):
        raise OSError("x.svs: not found")
    with progress_bar("eval y.svs") as on_progress:
        on_progress(3, 3)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "x.svs" not in said and "eval y.svs" in said, said


@pytest.mark.parametrize("terminal", [True, False], ids=["bars", "lines"])
def test_a_progress_bars_next_stage_is_shown_below_the_one_before_and_taken_away_if_it_fails(
    capsys, monkeypatch, terminal
):
    # Training's domain statistics and report read every slide after the training bar had ended, in silence.
    from bridge.progress import progress_bar

    monkeypatch.setattr("bridge.progress.writes_to_terminal", lambda stream=None: terminal)
    with pytest.raises(OSError), progress_bar("training") as on_progress:
        on_progress(4, 4)
        on_progress(0, 2, stage="domain statistics")
        on_progress(2, 2, stage="domain statistics")
        on_progress(0, 3, stage="training report")
        raise OSError("a slide went away")
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert re.search(r"training\b.*4/4.*domain statistics\b.*2/2", said, re.S), said
    if terminal:  # the unfinished stage's bar is taken away; lines once written stay
        assert "training report" not in said, said


@pytest.mark.parametrize("task", ["nuclei", "segmentation"])
def test_trainings_review_entropy_and_validation_are_stages_of_its_progress(tmp_path, monkeypatch, task):
    # An IHC nuclei model's review entropy and the held-out slides' scoring read every slide after 'training: N/N',
    # and said nothing.
    from types import SimpleNamespace

    import bridge.cli.train as train_cli
    from bridge.progress import ProgressLines

    said = []
    monkeypatch.setattr(ProgressLines, "update", lambda self, done, total, stage=None: said.append((stage, done)))
    monkeypatch.setattr("bridge.progress.writes_to_terminal", lambda stream=None: False)

    def train(config, *, on_progress, on_domain_progress, **kwargs):
        on_progress(1, 1)
        if task == "nuclei":
            kwargs["on_review_progress"](1, 1)
        else:  # train_segmentation takes none
            assert "on_review_progress" not in kwargs
        on_domain_progress(1, 1)

    def validate(out, held_out, *, on_progress, **_):
        on_progress(1, 1)
        return [], None

    def report(out, *, on_drawing_progress, **_):
        on_drawing_progress(1, 1)
        return "training report: drawn"

    monkeypatch.setattr(train_cli, "_validate", validate)
    monkeypatch.setattr(train_cli, "_training_report", report)
    config = SimpleNamespace(out_dir=str(tmp_path), device="cpu", slides=())
    common = {"labels": [], "held_out": ["held.svs"], "recalibrate": False, "resume": False, "progress": True}
    train_cli._train_and_validate(train, config, task=task, **common)
    stages = [None, "review entropy"] if task == "nuclei" else [None]
    assert said == [(s, 1) for s in [*stages, "domain statistics", "validation", "drawing the training report"]]


def test_each_eval_slides_bar_says_which_slide_of_how_many_it_is(capsys, monkeypatch):
    # 'eval a.svs: 25/25', a bar per slide naming it alone: a log of 40 slides never said how far the evaluation was.
    import inference
    from bridge.cli.evaluate import _nuclei_evaluations

    monkeypatch.setattr(inference, "evaluate_nuclei", lambda slide, ensemble, *, on_progress, **_: on_progress(1, 1))
    list(_nuclei_evaluations([Path("a.svs"), Path("b.svs")], None, radius_um=3.0, progress=True))
    said = capsys.readouterr().err
    assert "eval a.svs (slide 1 of 2): 1/1" in said and "eval b.svs (slide 2 of 2): 1/1" in said, said


def test_pdl1_eval_registration_draws_a_bar_per_pair_saying_which_of_how_many(tmp_path, monkeypatch):
    # About a second a pair, and not a word until the table: minutes for a lab's 100 pairs.
    from types import SimpleNamespace

    import bridge.cli.evaluate
    import inference

    pairs = [tmp_path / "a_ihc.svs", tmp_path / "b_ihc.svs"]
    for path in pairs:
        path.write_bytes(b"")

    def registered(slide, **_):
        numbers = dict.fromkeys(("error_median_um", "error_p90_um", "error_max_um", "estimated_error_um"), 1.0)
        return SimpleNamespace(
            ihc_slide=Path(slide).name, he_slide="he.svs", registered_mpp=8.0, angle_deg=0.0, ok=True, **numbers
        )

    monkeypatch.setattr(bridge.cli.evaluate, "_check_truths", lambda *a, **k: None)
    monkeypatch.setattr(inference, "evaluate_registration", registered)
    result = runner.invoke(app, ["eval", "registration", *map(str, pairs)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    said = r"^eval a_ihc.svs \(pair 1 of 2\): 1/1 .*^eval b_ihc.svs \(pair 2 of 2\): 1/1 .*IHC -> H&E registration"
    assert re.search(said, result.output, re.M | re.S), result.output
    quiet = runner.invoke(app, ["eval", "registration", *map(str, pairs), "--no-progress"], env={"COLUMNS": "400"})
    assert quiet.exit_code == 0 and "(pair 1 of 2)" not in quiet.output, quiet.output


def test_a_project_file_another_program_holds_open_is_explained_with_that_fix(fixtures_dir, tmp_path, monkeypatch):
    """Windows refuses to read a file another program holds open (PermissionError, as a permission); `pdl1 train`
    then said only to choose a folder it can write to, for a file it was reading."""
    import shutil
    from pathlib import Path

    project = tmp_path / "project"
    shutil.copytree(fixtures_dir / "qupath-0.4.4-labels" / "project", project)
    read_text = Path.read_text

    def locked(self, *args, **kwargs):
        if self.name == "project.qpproj":
            raise PermissionError(
                errno.EACCES,
                "The process cannot access the file because it is being used by another process",
                str(self),
            )
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    result = runner.invoke(app, ["train", "nuclei", str(project), "--out", str(tmp_path / "m")], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert said.startswith(f"error: {project / 'project.qpproj'}: The process cannot access the file"), said
    assert said.endswith("a file another program holds open (Windows locks it) reads again once that program closes it")
    assert not (tmp_path / "m").exists()


def test_a_ctrl_c_while_pdl1_is_starting_says_so_and_exits_130(monkeypatch, capsys):
    # It printed Python's KeyboardInterrupt traceback through importlib's frames.
    import builtins
    import sys

    from bridge.cli import entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "bridge.cli.app":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "bridge.cli.app")
    monkeypatch.setattr(entry, "stop_on_termination", lambda: None)  # pytest's own SIGTERM handling stays
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "pdl1: interrupted while starting; nothing was done\n"


def test_a_ctrl_c_while_torch_imports_is_held_until_the_import_is_done(tmp_path):
    # A KeyboardInterrupt raised inside torch's import aborted pdl1 (exit 134, from torch's C++) or was dropped.
    # A stand-in package interrupts itself half-way: held, its code runs to the end and the Ctrl-C comes just after.
    (tmp_path / "slow_native").mkdir()
    (tmp_path / "slow_native" / "__init__.py").write_text(
        "import builtins, signal\nsignal.raise_signal(signal.SIGINT)\nbuiltins.SLOW_NATIVE_RAN_TO_THE_END = True\n",
        encoding="utf-8",
    )
    probe = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it, even in the background\n"
        "from bridge.cli.entry import HoldInterruptsWhileImporting\n"
        "if sys.argv[1] == 'held':\n"
        "    sys.meta_path.insert(0, HoldInterruptsWhileImporting(['slow_native']))\n"
        "try:\n"
        "    import slow_native\n"
        "    print('imported, no interrupt')\n"
        "except KeyboardInterrupt:\n"
        "    import builtins\n"
        "    print('interrupted; ran to the end:', getattr(builtins, 'SLOW_NATIVE_RAN_TO_THE_END', False))\n"
    )
    said = {}
    for how in ("held", "plain"):
        done = subprocess.run(
            [sys.executable, "-c", probe, how],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr
        said[how] = done.stdout.strip()
    assert said == {"held": "interrupted; ran to the end: True", "plain": "interrupted; ran to the end: False"}


def test_a_kill_or_a_closed_terminal_stops_a_command_as_a_ctrl_c_does_cleaning_up(tmp_path):
    # helper-130: SIGTERM or SIGHUP during `pdl1 export nnunet` left its hidden .DatasetNNN_NAME.<hex>.part folder
    # (GBs on real slides) for good: only a Ctrl-C removed it. pdl1 now takes both as a Ctrl-C.
    probe = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from bridge.atomic import folder_replaced_whole\n"
        "from bridge.cli.entry import stop_on_termination\n"
        # As in a terminal, whatever this test runs under (nohup ignores SIGHUP, a background job SIGINT).
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "for name in ('SIGTERM', 'SIGHUP'):\n"
        "    signal.signal(getattr(signal, name), signal.SIG_DFL)\n"
        "stop_on_termination()\n"
        "out = Path(sys.argv[1]) / 'Dataset501_A'\n"
        "try:\n"
        "    with folder_replaced_whole(out) as part:\n"
        "        (part / 'case.png').write_text('half')\n"
        "        os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n"
        "        time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped; left:', sorted(p.name for p in Path(sys.argv[1]).iterdir()))\n"
    )
    # A command started in the background by a script (SIGINT ignored) is stopped by a kill as by a Ctrl-C too
    # (helper-134: it was ended where it stood, its half-written folder left), and one started under nohup (SIGHUP
    # ignored) keeps ignoring it.
    background = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from bridge.atomic import folder_replaced_whole\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[2] == 'SIGHUP' else signal.SIG_DFL)\n"
        "from bridge.cli.entry import stop_on_termination\n"
        "stop_on_termination()\n"
        "try:\n"
        "    with folder_replaced_whole(Path(sys.argv[1]) / 'Dataset501_A') as part:\n"
        "        (part / 'case.png').write_text('half')\n"
        "        os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n"
        "        time.sleep(0.5)\n"
        "    print('still running')\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped; left:', sorted(p.name for p in Path(sys.argv[1]).iterdir()))\n"
    )
    for name, said in (("SIGTERM", "stopped; left: []"), ("SIGHUP", "still running")):
        folder = tmp_path / f"background-{name}"
        folder.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", background, str(folder), name], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout.strip()) == (0, said), done.stderr
    for name in ("SIGTERM", "SIGHUP"):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", probe, str(folder), name], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout.strip()) == (0, "stopped; left: []"), done.stderr


def test_a_ctrl_c_inside_openslides_ctypes_call_is_an_interrupt_not_a_traceback(monkeypatch, capsys):
    # A SIGTERM (taken as a Ctrl-C) while openslide's ctypes call converted its arguments came out as
    # "ctypes.ArgumentError: argument 1: KeyboardInterrupt:", a traceback and exit 1, past the command's handling.
    import ctypes

    import typer.main

    from bridge.cli import entry

    def reading(**kwargs):
        raise ctypes.ArgumentError("argument 1: KeyboardInterrupt: ")

    monkeypatch.setattr(entry, "stop_on_termination", lambda: None)  # pytest's own SIGTERM handling stays
    monkeypatch.setattr(typer.main, "get_command", lambda app: reading)
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err.startswith("pdl1: interrupted while reading a slide; what the command was writing")

    def failing(**kwargs):
        raise ctypes.ArgumentError("argument 1: TypeError: wrong type")

    monkeypatch.setattr(typer.main, "get_command", lambda app: failing)
    with pytest.raises(ctypes.ArgumentError):  # any other stays the error it is
        entry.main()


def test_a_kill_while_torch_imports_in_the_background_is_held_and_then_stops_the_command(tmp_path):
    # SIGINT ignored (started with `&` by a script): the kill taken as a Ctrl-C was recorded while torch imported, then
    # raised again as a SIGINT, which the process ignores, so the command ran on.
    (tmp_path / "slow_native").mkdir()
    (tmp_path / "slow_native" / "__init__.py").write_text(
        "import builtins, os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "builtins.SLOW_NATIVE_RAN_TO_THE_END = True\n",
        encoding="utf-8",
    )
    probe = (
        "import builtins, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "from bridge.cli.entry import HoldInterruptsWhileImporting, stop_on_termination\n"
        "stop_on_termination()\n"
        "sys.meta_path.insert(0, HoldInterruptsWhileImporting(['slow_native']))\n"
        "try:\n"
        "    import slow_native\n"
        "    print('imported, no interrupt')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted; ran to the end:', getattr(builtins, 'SLOW_NATIVE_RAN_TO_THE_END', False))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert (done.returncode, done.stdout.strip()) == (0, "interrupted; ran to the end: True"), done.stderr


def test_a_run_logged_without_a_terminal_writes_a_line_as_each_image_starts(monkeypatch, capsys):
    # helper-135: under nohup or a job scheduler rich draws its bar only when it stops: 40 s into a run of 160
    # images its log held nothing, for hours on real slides.
    import bridge.run
    from bridge.cli.common import run_with_progress
    from bridge.run import ImageOutcome

    def run_batch(inputs, config, *, on_image, on_tiles=None):
        for i in range(3):
            on_image(i, 3, f"{i}.svs")
        return [ImageOutcome(str(i), f"{i}.svs", "done") for i in range(3)]

    monkeypatch.setattr(bridge.run, "run_batch", run_batch)
    run_with_progress([], None, progress=True)
    said = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in said] == [
        "images: 0/3 next: 0.svs",
        "images: 1/3 next: 1.svs",
        "images: 2/3 next: 2.svs",
        "images: 3/3",
    ]
    assert "left)" in said[1] and "━" not in "".join(said)


def test_progress_lines_come_at_most_every_half_minute_besides_the_first_and_the_last(monkeypatch, capsys):
    from bridge import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "writes_to_terminal", lambda stream=None: False)
    with progress.progress_bar("training") as on_progress:
        for step in range(0, 101):
            now[0] = step * 1.0  # a step a second
            on_progress(step, 100)
    said = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert said == ["training: 0/100", "training: 30/100", "training: 60/100", "training: 90/100", "training: 100/100"]


def test_a_resume_of_a_long_batch_shows_the_images_it_analysed_not_those_done_earlier(capsys):
    # helper-135: --resume with 1 of 160 images left printed 159 "skipped (done earlier)" rows and 80 review lines.
    from bridge.cli.common import SKIPPED_ROWS_SHOWN, outcome_table
    from bridge.run import ImageOutcome

    done = [
        ImageOutcome(str(i), f"s{i}.svs", "skipped", uncertainty_flag=True, review_reasons=("stain",))
        for i in range(SKIPPED_ROWS_SHOWN)
    ]
    outcome_table([*done, ImageOutcome("new", "new.svs", "done", 3.0, tps_percent=12.0)])
    said = capsys.readouterr().out
    assert "new.svs" in said and "s0.svs" not in said and "skipped (done earlier)" not in said
    assert f"{SKIPPED_ROWS_SHOWN} images done by an earlier run are left out of this table" in " ".join(said.split())
    outcome_table([*done[:3], ImageOutcome("new", "new.svs", "done", 3.0)])  # a short batch keeps every row
    said = capsys.readouterr().out
    assert "s0.svs" in said and "left out of this table" not in said


def test_the_time_left_in_a_log_is_at_the_pace_of_this_run_not_of_the_work_done_before(monkeypatch, capsys):
    # helper-137: 26 of 28 images skipped by --resume in no time gave "about 0 s left" for two 10-minute slides.
    from bridge.progress import ProgressLines

    now = [100.0]
    monkeypatch.setattr("bridge.progress.time.monotonic", lambda: now[0])
    lines = ProgressLines("images")
    lines.update(26, 28, always=True)  # the first image this run analyses, after 26 done earlier
    now[0] += 600
    lines.update(27, 28, always=True)
    said = capsys.readouterr().err.splitlines()
    assert said[0] == "images: 26/28 (0 s)" and said[1] == "images: 27/28 (10 min 0 s, about 10 min 0 s left)"


def test_a_long_slide_in_a_log_gets_tile_lines_and_a_stopped_resume_of_skips_only_shows_them(monkeypatch, capsys):
    # helper-137: one long slide logged nothing between its start and its end; a Ctrl-C after 26 skipped images
    # pointed at a table it had left out.
    import bridge.run
    from bridge.cli.common import outcome_table, run_with_progress
    from bridge.run import ImageOutcome

    now = [0.0]
    monkeypatch.setattr("bridge.progress.time.monotonic", lambda: now[0])

    def run_batch(inputs, config, *, on_image, on_tiles):
        on_image(0, 1, "big.svs")
        for done in range(0, 101):
            now[0] = done * 1.0
            on_tiles(done, 100)
        return [ImageOutcome("big", "big.svs", "done")]

    monkeypatch.setattr(bridge.run, "run_batch", run_batch)
    run_with_progress([], None, progress=True)
    said = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert said == [
        "images: 0/1 next: big.svs",
        *(f"tiles of big.svs: {done}/100" for done in (0, 30, 60, 90, 100)),
        "images: 1/1",
    ]
    skipped = [ImageOutcome(str(i), f"s{i}.svs", "skipped") for i in range(26)]
    outcome_table(skipped, batch=40)
    said = capsys.readouterr().out
    assert "s0.svs" in said and "left out of this table" not in said


def test_errors_alike_but_for_the_image_are_said_once_with_the_others_named(capsys):
    # helper-135: a project whose slide folder moved printed 160 near-identical "has moved" lines after its table.
    from bridge.cli.common import outcome_table
    from bridge.run import ImageOutcome

    def moved(i: int) -> ImageOutcome:
        error = f"image of entry {i} (slide{i}.svs) has moved: not at /gone/slide{i}.svs; pass --search-dir"
        return ImageOutcome(str(i), f"slide{i}.svs", "failed", error=error)

    other = ImageOutcome("9", "odd.svs", "failed", error="odd.svs: not a readable TIFF")
    outcome_table([moved(1), moved(2), other, moved(3)])
    said = " ".join(capsys.readouterr().err.split())
    assert said.count("has moved") == 1 and "image of entry 1 (slide1.svs) has moved" in said
    assert "and 2 more failed alike: slide2.svs, slide3.svs" in said and "odd.svs: not a readable TIFF" in said


def _float_options():
    """(command words, option name, OptionInfo) of every float option of every ``pdl1`` command."""
    import typing

    import typer

    def commands(typer_app, path=()):
        for command in typer_app.registered_commands:
            yield (*path, command.name or command.callback.__name__.replace("_", "-")), command.callback
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance, (*path, group.name))

    for path, function in commands(app):
        for name, hint in typing.get_type_hints(function, include_extras=True).items():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, *extra = typing.get_args(hint)
            info = next((e for e in extra if isinstance(e, typer.models.OptionInfo)), None)
            if info is not None and float in {base, *typing.get_args(base)}:
                yield path, name, info


def test_every_float_option_refuses_nan_and_infinities_as_such():
    # Typer took `--radius-um inf` (every pair matched: F1 0.98) and said `--mpp nan` was below or above a bound:
    # every float option goes through number_range, which says what is wrong (helper-152).
    options = list(_float_options())
    assert len(options) > 30
    assert [(" ".join(p), n) for p, n, info in options if info.parser is None] == []
    for value, said in (("nan", "nan is not a number"), ("inf", "inf is outside the range"), ("-inf", "-inf is out")):
        for path, name, info in options:
            with pytest.raises(Exception, match=said):
                info.parser(value)
                pytest.fail(f"pdl1 {' '.join(path)} --{name.replace('_', '-')} {value} was taken")
    result = CliRunner().invoke(app, ["eval", "nuclei", "x.svs", "--radius-um", "inf"], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "Invalid value for '--radius-um': inf is outside the range; give a number of 0.1 or more" in result.output


@pytest.mark.parametrize(
    "command", [["run", "x.svs", "--out", "o"], ["train", "seg", "x.svs"], ["export", "nnunet", "p"]]
)
def test_a_search_dir_that_is_no_folder_is_refused_as_such(tmp_path, command):
    # helper-155: a --search-dir that did not exist, or was a file, was passed over: "no x.svs in DIR (and below)".
    a_file = tmp_path / "slide.svs"
    a_file.write_bytes(b"x")
    for given, said in ((tmp_path / "nowhere", "does not exist"), (a_file, "is a file")):
        result = runner.invoke(app, [*command, "--search-dir", str(given)], env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--search-dir': dir '{given}' {said}" in " ".join(result.output.split())


def test_every_commands_help_names_its_options_whole_in_an_80_column_terminal():
    # helper-157: Rich's help tables cut option names at 80 columns ("--min-region-are…", "--epochs-per-c…"): a user
    # could not read the option off the help. Click's plain help wraps the text instead.
    import typer

    def commands(typer_app, path=()):
        for command in typer_app.registered_commands:
            yield (*path, command.name or command.callback.__name__.replace("_", "-"))
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance, (*path, group.name))

    paths = list(commands(app))
    assert len(paths) > 20
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, (path, result.output)
        options = typer.main.get_command(app)
        for word in path:
            options = options.commands[word]
        for param in options.params:
            for name in getattr(param, "opts", []):
                if name.startswith("--"):
                    assert name in result.output, (path, name)


@pytest.mark.parametrize("command", ["seg", "nuclei", "ihc", "tps", "registration"])
def test_a_ctrl_c_in_an_eval_command_says_nothing_was_written(tmp_path, monkeypatch, command):
    """Five eval commands ended a Ctrl-C with exit 130 and not a word (only the suite and calibrate said anything)."""
    import bridge.cli.evaluate as evaluate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_check_truths", stop)
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"")
    result = runner.invoke(app, ["eval", command, str(slide), "--no-progress"])
    assert result.exit_code == 130, result.output
    assert "nothing was written (the scores are printed once every slide is scored); run it again" in result.output


def test_a_ctrl_c_before_a_command_began_its_work_is_said(tmp_path, monkeypatch):
    """A Ctrl-C while a command loaded its libraries (before its own Ctrl-C handling) reached Typer, which ended with
    exit 130 and not a word: pdl1 run, demo, train, eval and calibrate said nothing in their first second or two."""
    import bridge.cli.evaluate as evaluate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "distinct_paths", stop)  # eval tps's first step, before its try
    result = runner.invoke(app, ["eval", "tps", str(tmp_path / "a.svs"), "--no-progress"])
    assert result.exit_code == 130, result.output
    assert "interrupted: while starting, before the command began its work; nothing was written" in result.output
