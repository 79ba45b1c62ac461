import json

from typer.testing import CliRunner

from bridge.cli.app import app
from bridge.qupath_geojson import read_features

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "phantom", "bench"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith("pdl1-bridge 0.1.0")


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


def test_phantom_rejects_out_of_range_options(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "x.svs"), "--size", "10"])
    assert result.exit_code == 2
    assert "1024" in result.output


def test_phantom_rejects_unknown_suffix(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "x.png"), "--size", "1024", "--no-progress"])
    assert result.exit_code == 1
    assert ".svs or .tif" in result.output


def test_bench_lists_benchmarks():
    result = runner.invoke(app, ["bench"])
    assert result.exit_code == 0
    assert "tile_read" in result.output


def test_bad_log_level():
    result = runner.invoke(app, ["--log-level", "LOUD", "version"])
    assert result.exit_code == 2
