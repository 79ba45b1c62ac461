"""`pdl1 run`'s options as a user types them (the analysis itself faked): --nuclei/--no-nuclei."""

import json

import pytest
from typer.testing import CliRunner

from bridge.cli.app import app

runner = CliRunner()


@pytest.fixture
def captured_run(monkeypatch):
    import bridge.cli.run

    seen = []

    def fake_run(inputs, run_config, *, progress):
        seen.append(run_config)
        return []

    monkeypatch.setattr(bridge.cli.run, "run_with_progress", fake_run)
    return seen


def _project(tmp_path):
    (tmp_path / "project.qpproj").write_text(json.dumps({"version": "0.4.4", "images": []}))
    return tmp_path


def test_help_reads_nuclei_or_no_nuclei():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "--nuclei" in result.output and "--no-nuclei" in result.output
    assert "--no-no-nuclei" not in result.output


@pytest.mark.parametrize(
    ("args", "outputs", "run_nuclei"),
    [
        ([], ("regions", "uncertainty_tiles", "sua", "nuclei"), True),
        (["--no-nuclei"], ("regions", "uncertainty_tiles", "sua"), False),
        (["--output", "regions", "--nuclei"], ("regions", "nuclei"), True),
        (["--output", "regions"], ("regions",), False),
    ],
)
def test_nuclei_puts_nuclei_into_the_outputs_and_no_nuclei_takes_it_out(
    tmp_path, captured_run, args, outputs, run_nuclei
):
    result = runner.invoke(app, ["run", str(_project(tmp_path)), "--no-progress", "--no-config", *args])
    assert result.exit_code == 0, result.output
    (config,) = captured_run
    assert config.settings.outputs == outputs and config.pipeline.run_nuclei is run_nuclei
