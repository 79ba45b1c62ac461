"""A project's pdl1-config.toml: the template, reading, checking, overrides and the record a run keeps."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.init_project import init_project_files
from bridge.project_config import (
    CONFIG_NAME,
    OUTPUTS,
    SCHEMA,
    ConfigError,
    ProjectConfig,
    config_path_for,
    read_project_config,
)
from bridge.qupath_geojson import read_features
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from project_templates import PDL1_TEMPLATE

TEMPLATE = PDL1_TEMPLATE / "config.toml"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / CONFIG_NAME
    path.write_text(text)
    return path


def test_the_template_parses_and_states_the_built_in_defaults():
    config = read_project_config(TEMPLATE)
    assert replace(config, path=None) == ProjectConfig()
    assert config.path == TEMPLATE.absolute()
    # Every key the reader knows is in the template, so a new project shows all of them.
    data = tomllib.loads(TEMPLATE.read_text())
    assert {t: set(keys) for t, keys in data.items()} == {t: set(keys) for t, keys in SCHEMA.items()}
    assert config.from_file == {attr for keys in SCHEMA.values() for _, attr in keys.values()}


def test_keys_left_out_keep_the_defaults_and_model_paths_are_taken_from_the_files_folder(tmp_path):
    path = _config(
        tmp_path, '[analysis]\ndevice = "cpu"\ntarget_classes = ["Tumor"]\n[models]\nsegmentation = "m/seg"\n'
    )
    config = read_project_config(path)
    assert config.device == "cpu"
    assert config.target_classes == ("Tumor",)
    assert config.seg_model == tmp_path / "m" / "seg"
    assert config.nuclei_model is None
    assert config.outputs == OUTPUTS
    assert config.source_of("device") == str(path)
    assert config.source_of("outputs") == "built-in default"


def test_a_folder_named_as_the_config_is_refused_not_left_out_without_a_word(tmp_path):
    # pdl1 run of the project ran with the built-in defaults and said nothing.
    (tmp_path / "project.qpproj").write_text('{"images": []}')
    (tmp_path / CONFIG_NAME).mkdir()
    assert config_path_for([tmp_path]) == tmp_path / CONFIG_NAME
    with pytest.raises(ConfigError, match=r"pdl1-config.toml is a folder, not the project's config file; remove or"):
        read_project_config(tmp_path / CONFIG_NAME)


def test_an_empty_file_is_the_defaults(tmp_path):
    assert replace(read_project_config(_config(tmp_path, "# nothing set\n")), path=None) == ProjectConfig()


@pytest.mark.parametrize(
    "text, match",
    [
        # Not TOML: tomllib's line, the line's text.
        ('[service]\nurl = "http://x"\n\n[analysis]\ndevice = auto\n', r"line 5: 'device = auto': not valid TOML"),
        ('[analysis]\noutputs = ["regions",\n', r"line \d+.*not valid TOML"),
        # A repeat was told "strings need quotes".
        (
            '[analysis]\ndevice = "cpu"\ndevice = "cpu"\n',
            r"line 3: 'device = \"cpu\"': a key or table given a second time",
        ),
        (
            '[analysis]\ndevice = "cpu"\n[analysis]\n',
            r"line 3: '\[analysis\]': a key or table given a second time .*give each once",
        ),
        # Unknown table or key: the line, the key, what is allowed.
        (
            "[service]\nurl = 'x'\n[anaylsis]\ndevice = 'cpu'\n",
            r"line 3: unknown table \[anaylsis\]; expected \[service\]",
        ),
        ('[analysis]\ndevice = "cpu"\ntarget_class = ["Tumor"]\n', r"line 3: \[analysis\] target_class: unknown key; "),
        ('device = "cpu"\n', r"line 1: device is outside a table"),
        (
            '# settings\n[service]\n[[analysis]]\ndevice = "cpu"\n',
            r"line 3: \[\[analysis\]\] is an array of tables; write \[analysis\] \(one pair of brackets\)",
        ),
        # Wrong types and values: the line, the key, what was expected, what came.
        (
            '[analysis]\noutputs = "regions"\n',
            r"line 2: \[analysis\] outputs: expected an array of strings, got 'regions'",
        ),
        ("[analysis]\ntarget_classes = [1, 2]\n", r"line 2: \[analysis\] target_classes: expected an array of strings"),
        ('[analysis]\nuncertainty_tile_um = "64"\n', r"line 2: \[analysis\] uncertainty_tile_um: expected a number"),
        ("[analysis]\nmin_region_area_um2 = true\n", r"min_region_area_um2: expected a number, got True \(a boolean\)"),
        ("[service]\ntoken = 1234\n", r"line 2: \[service\] token: expected a string, got 1234 \(a number\)"),
        ('[analysis]\ndevice = "gpu"\n', r"line 2: \[analysis\] device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ('[analysis]\noutputs = ["regions", "tiles"]\n', r"outputs: expected some of regions, .*, got 'tiles'"),
        # An empty list: the service would return nothing, and pdl1_analyze.groovy put nothing for the earlier results.
        (
            '[analysis]\ndevice = "cpu"\noutputs = []\n',
            r"line 3: \[analysis\] outputs: expected some of regions, uncertainty_tiles, sua, nuclei, got an empty "
            r"list; name those to compute, or leave outputs out for all of them$",
        ),
        (
            "[analysis]\nuncertainty_tile_um = 0\n",
            r"line 2: \[analysis\] uncertainty_tile_um: expected a number above 0",
        ),
        (
            "[analysis]\nuncertainty_tile_um = 0.001\n",
            r"line 2: \[analysis\] uncertainty_tile_um: expected a number from 16 to 4,096 µm, got 0\.001$",
        ),
        (
            "[analysis]\nuncertainty_tile_um = inf\n",
            r"uncertainty_tile_um: expected a number from 16 to 4,096 µm, got inf",
        ),
        (
            "[analysis]\nuncertainty_tile_um = nan\n",
            r"uncertainty_tile_um: expected a number above 0 \(a size from 16 to 4,096 µm\), got nan",
        ),
        (
            "[analysis]\nmin_region_area_um2 = -1\n",
            r"min_region_area_um2: expected a number from 0 to 1,000,000 µm², got -1",
        ),
        (
            '[pairs]\ncase_key = " "\n',
            r"line 2: \[pairs\] case_key: expected the entry metadata key that names each slide's case \(case, Case "
            r"ID, \.\.\.\), got an empty one",
        ),
        (
            "[analysis]\nmin_region_area_um2 = 5e9\n",
            r"min_region_area_um2: expected a number from 0 to 1,000,000 µm², got 5,000,000,000",
        ),
    ],
)
def test_a_malformed_config_names_the_file_the_line_and_the_key(tmp_path, text, match):
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        read_project_config(path)
    assert str(info.value).startswith(f"{path}, line ")
    assert isinstance(info.value, ValueError)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        read_project_config(tmp_path / "nope.toml")


def test_command_line_values_go_over_the_file_and_the_record_says_where_each_came_from(tmp_path):
    path = _config(tmp_path, '[service]\ntoken = "secret"\n[analysis]\ndevice = "cpu"\noutputs = ["regions"]\n')
    config = read_project_config(path).with_overrides(outputs=["regions", "sua", "sua"], device=None)
    assert config.outputs == ("regions", "sua")
    assert config.device == "cpu"
    record = config.run_record()
    assert record["config_file"] == str(path)
    assert record["values"]["analysis.outputs"] == ["regions", "sua"]
    assert record["values"]["analysis.device"] == "cpu"
    assert record["values"]["models.segmentation"] is None
    assert record["from"] == {
        "analysis.device": str(path),
        "analysis.runtime": "built-in default",
        "analysis.outputs": "command line",
        "analysis.target_classes": "built-in default",
        "analysis.target_names": "built-in default",
        "analysis.uncertainty_tile_um": "built-in default",
        "analysis.min_region_area_um2": "built-in default",
        "models.segmentation": "built-in default",
        "models.nuclei": "built-in default",
        "models.ihc_nuclei": "built-in default",
        "pairs.case_key": "built-in default",
    }
    assert "secret" not in json.dumps(record)  # the service token is the scripts' business, never recorded


def test_the_config_is_found_beside_a_project_given_as_folder_or_qpproj(tmp_path):
    (tmp_path / "project.qpproj").write_text("{}")
    assert config_path_for([tmp_path]) is None
    _config(tmp_path, "")
    assert config_path_for([tmp_path]) == tmp_path / CONFIG_NAME
    assert config_path_for([tmp_path / "project.qpproj"]) == tmp_path / CONFIG_NAME
    assert config_path_for([tmp_path / "a.svs"]) is None
    assert config_path_for([tmp_path, tmp_path]) is None


def test_outputs_are_the_services():
    pytest.importorskip("fastapi")
    from bridge.service import OUTPUTS as SERVICE_OUTPUTS

    assert SERVICE_OUTPUTS == OUTPUTS


def test_a_run_takes_the_projects_config_and_its_summary_records_file_and_values(tmp_path):
    slide = tmp_path / "slides" / "c1.svs"
    slide.parent.mkdir()
    write_phantom(slide, PhantomSpec(1024, 1024, seed=5, tps_percent=40))
    project = tmp_path / "project"
    init_project_files(project, [slide])
    config = project / CONFIG_NAME
    text = TEMPLATE.read_text()
    text = text.replace('device = "auto"', 'device = "cpu"')
    text = text.replace('outputs = ["regions", "uncertainty_tiles", "sua", "nuclei"]', 'outputs = ["regions", "sua"]')
    config.write_text(text.replace("uncertainty_tile_um = 64.0", "uncertainty_tile_um = 32.0"))
    result = CliRunner().invoke(
        app, ["run", str(project), "--qupath", "never", "--no-progress", "--min-region-area-um2", "100"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
    settings = summary["provenance"]["settings"]
    assert settings["config_file"] == str(config.absolute())
    assert settings["values"]["analysis.device"] == "cpu"
    assert settings["values"]["analysis.outputs"] == ["regions", "sua"]
    assert settings["values"]["analysis.uncertainty_tile_um"] == 32.0
    assert settings["values"]["analysis.min_region_area_um2"] == 100.0
    assert settings["from"]["analysis.device"] == str(config.absolute())
    assert settings["from"]["analysis.min_region_area_um2"] == "command line"
    assert settings["from"]["models.nuclei"] == str(config.absolute())
    pipeline = summary["provenance"]["pipeline_config"]
    assert pipeline["device"] == "cpu" and pipeline["run_nuclei"] is False and pipeline["run_sua"] is True
    assert pipeline["uncertainty_tile_um"] == 32.0 and pipeline["min_region_area_um2"] == 100.0
    # Outputs without uncertainty_tiles and nuclei: neither is written.
    objects = list(read_features(project / "pdl1" / "1" / "objects.geojson"))
    assert not any(o.name == "PD-L1 uncertainty" for o in objects)
    assert not any(o.object_type == "detection" for o in objects)
    assert summary["nuclei"] == {}
    assert f"settings: {config.absolute()}" in result.output


def test_a_device_from_the_file_that_this_machine_lacks_names_the_file_not_the_option(tmp_path):
    # It said "Invalid value for --device", an option the run was not given.
    import torch

    slide = tmp_path / "c1.svs"
    write_phantom(slide, PhantomSpec(1024, 1024, seed=5, tps_percent=40))
    project = tmp_path / "project"
    init_project_files(project, [slide])
    config = project / CONFIG_NAME
    device = f"cuda:{torch.cuda.device_count()}"  # one more than there are, on any machine
    config.write_text(TEMPLATE.read_text().replace('device = "auto"', f'device = "{device}"'))
    line = next(n for n, text in enumerate(config.read_text().splitlines(), start=1) if text.startswith("device ="))
    args = ["run", str(project), "--qupath", "never", "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"error: {config.absolute()}, line {line}: [analysis] device: {device!r} asked for, but " in text, text
    assert text.endswith("change it in that file, or give --device, which overrides it"), text
    assert "Invalid value" not in text and not (project / "pdl1").exists()
    # --device overrides the file.
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_a_config_saved_with_a_byte_order_mark_reads(tmp_path):
    """Windows Notepad saves UTF-8 with a BOM; tomllib refused line 1 ('\\ufeff[analysis]': "not valid TOML")
    and told the user to quote strings."""
    path = tmp_path / CONFIG_NAME
    path.write_bytes(b"\xef\xbb\xbf" + b'[analysis]\ndevice = "cpu"\n')
    config = read_project_config(path)
    assert config.device == "cpu"
    assert config.where("device").endswith("line 2: [analysis] device")
