"""A broken model fails only the images that need it: in a batch of both stains, the other stain's images
still finish and are written, and each failed image says what is wrong with the model and how to fix it."""

import json
import shutil

import pytest

from bridge.run import RunConfig, run_batch
from inference import ModelFileError, Models, PipelineConfig, demo_model_dir


@pytest.fixture
def broken_seg(tmp_path):
    """The demo segmentation ensemble with one member's bytes changed after its manifest was written."""
    folder = tmp_path / "seg-broken"
    shutil.copytree(demo_model_dir("seg"), folder)
    member = folder / "member_02.safetensors"
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))
    return folder


@pytest.fixture
def broken_ihc(tmp_path):
    """The demo PD-L1 IHC nuclei ensemble with a member file missing (an interrupted copy)."""
    folder = tmp_path / "ihc-broken"
    shutil.copytree(demo_model_dir("nuclei-ihc"), folder)
    (folder / "member_01.safetensors").unlink()
    return folder


def _project(ihc_pair, tmp_path):
    from bridge.init_project import init_project_files

    return init_project_files(tmp_path / "project", list(ihc_pair)).parent


def _summaries(project, outcomes) -> dict[str, dict | None]:
    """Each image's written summary, or None where nothing was written."""
    paths = {o.name: project / "pdl1" / o.key / "summary.json" for o in outcomes}
    return {name: json.loads(p.read_text()) if p.is_file() else None for name, p in paths.items()}


def test_models_load_nothing_until_an_image_needs_them(broken_seg, broken_ihc):
    models = Models(PipelineConfig(device="cpu", seg_model_dir=str(broken_seg), ihc_model_dir=str(broken_ihc)))
    with pytest.raises(ModelFileError, match=r"member_02\.safetensors: sha256 .* does not match"):
        models.seg  # noqa: B018 (loading is the point)
    with pytest.raises(ModelFileError, match=r"member_01\.safetensors: member listed in .* is missing"):
        models.ihc()
    assert Models(PipelineConfig(device="cpu", run_nuclei=False)).nuclei is None


def test_a_broken_segmentation_model_fails_the_h_and_e_images_only(ihc_pair, broken_seg, tmp_path):
    project = _project(ihc_pair, tmp_path)
    config = PipelineConfig(device="cpu", seg_model_dir=str(broken_seg))
    outcomes = run_batch([project], RunConfig(pipeline=config, qupath="never"))
    assert [(o.name, o.state) for o in outcomes] == [("he_271.svs", "failed"), ("ihc_271.svs", "done")]
    he = outcomes[0]
    assert he.error.startswith(f"{broken_seg / 'member_02.safetensors'}: sha256 "), he.error
    assert he.error.endswith("the file is corrupt or was replaced: restore it or retrain")
    summaries = _summaries(project, outcomes)
    assert summaries["he_271.svs"] is None
    assert summaries["ihc_271.svs"]["stain"] == "H-DAB" and summaries["ihc_271.svs"]["tps_percent"] is not None
    status = json.loads((project / "pdl1" / "status.json").read_text())["images"]
    assert status[he.key]["state"] == "failed" and status[he.key]["error"] == he.error
    assert status[outcomes[1].key]["state"] == "done"


def test_a_broken_model_is_read_once_per_run_and_each_image_gets_its_message(
    ihc_pair, broken_seg, tmp_path, monkeypatch
):
    """The first H&E image that needs the broken model reads and hashes it; the later ones get the same
    error without the folder being read again, and the IHC image still finishes."""
    import inference.models.manifest as manifest_module

    he, ihc = ihc_pair
    second = tmp_path / "more" / "he_271_b.svs"
    second.parent.mkdir()
    shutil.copyfile(he, second)
    third = tmp_path / "more" / "he_271_c.svs"
    shutil.copyfile(he, third)
    from bridge.init_project import init_project_files

    project = init_project_files(tmp_path / "project", [he, second, third, ihc]).parent
    hashed: list[str] = []
    real_sha256 = manifest_module.sha256_file

    def counting_sha256(path):
        hashed.append(str(path))
        return real_sha256(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting_sha256)
    config = PipelineConfig(device="cpu", seg_model_dir=str(broken_seg))
    outcomes = run_batch([project], RunConfig(pipeline=config, qupath="never", compare_pairs=False))
    states = {o.name: o.state for o in outcomes}
    assert states == {"he_271.svs": "failed", "he_271_b.svs": "failed", "he_271_c.svs": "failed", "ihc_271.svs": "done"}
    errors = {o.error for o in outcomes if o.state == "failed"}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith(f"{broken_seg / 'member_02.safetensors'}: sha256 "), error
    assert error.endswith("the file is corrupt or was replaced: restore it or retrain")
    # member_00..02 hashed once (the hash of member_02 fails); nothing of the folder read again after that.
    seg_hashes = [p for p in hashed if p.startswith(str(broken_seg))]
    assert seg_hashes == [str(broken_seg / f"member_0{i}.safetensors") for i in range(3)], seg_hashes


def test_a_broken_ihc_model_fails_the_ihc_images_only(ihc_pair, broken_ihc, tmp_path):
    project = _project(ihc_pair, tmp_path)
    config = PipelineConfig(device="cpu", ihc_model_dir=str(broken_ihc), run_nuclei=False, run_sua=False)
    outcomes = run_batch([project], RunConfig(pipeline=config, qupath="never", compare_pairs=False))
    assert [(o.name, o.state) for o in outcomes] == [("he_271.svs", "done"), ("ihc_271.svs", "failed")]
    assert outcomes[1].error.startswith(f"{broken_ihc / 'member_01.safetensors'}: member listed in ")
    assert "copy the whole model folder again" in outcomes[1].error
    summaries = _summaries(project, outcomes)
    assert summaries["he_271.svs"]["stain"] == "H&E" and summaries["ihc_271.svs"] is None


def test_the_service_still_checks_the_h_and_e_models_at_start_up(broken_seg, tmp_path):
    import asyncio

    from bridge.service import ServiceSettings, create_app

    settings = ServiceSettings(
        allow_roots=(tmp_path,), pipeline=PipelineConfig(device="cpu", seg_model_dir=str(broken_seg))
    )
    app = create_app(settings)

    async def start_up() -> None:  # what uvicorn runs before it serves (Starlette's TestClient needs httpx2 now)
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ModelFileError, match=r"member_02\.safetensors: sha256 .* does not match"):
        asyncio.run(start_up())


def test_pdl1_serve_with_a_broken_model_says_so_and_exits_before_the_server_starts(broken_seg, tmp_path):
    """The message alone (no uvicorn start-up traceback before it) and exit code 1."""
    import os
    import socket
    import subprocess
    import sys

    models = tmp_path / "models"
    shutil.copytree(broken_seg, models / "seg")
    for name in ("nuclei", "nuclei-ihc"):
        shutil.copytree(demo_model_dir(name), models / name)
    with socket.socket() as sock:  # a port free now, so the port check passes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = "from bridge.cli.app import app; app(prog_name='pdl1')"
    args = ["serve", "--models", str(models), "--device", "cpu", "--port", str(port), "--allow-root", str(tmp_path)]
    env = {**os.environ, "COLUMNS": "400"}
    done = subprocess.run(
        [sys.executable, "-c", cli, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Application startup failed" not in output, output
    text = " ".join(output.split())
    assert f"error: {models / 'seg' / 'member_02.safetensors'}: sha256 " in text, output
    assert "the file is corrupt or was replaced: restore it or retrain" in text
    assert "pdl1 serve on http://" not in text  # it never claimed to be serving


def test_pdl1_serve_with_a_device_it_cannot_use_says_so_before_the_server_starts(tmp_path):
    """A misspelt --device was torch's traceback listing a dozen device types (a GPU this machine lacks, uvicorn's
    start-up traceback: tests/test_cli.py)."""
    import socket

    from typer.testing import CliRunner

    from bridge.cli.app import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["serve", "--port", str(port), "--allow-root", str(tmp_path), "--device"]
    bogus = CliRunner().invoke(app, [*args, "gpu0"], env={"COLUMNS": "400"})
    text = " ".join(bogus.output.replace("│", " ").split())
    assert bogus.exit_code == 2 and "--device': expected auto, cpu, cuda or cuda:N, got 'gpu0'" in text, bogus.output


def test_a_mended_model_folder_loads_without_a_restart(broken_ihc, monkeypatch):
    """The failure is kept only while the folder's files stay as they were: a service whose IHC model was
    broken loads it once the missing member is put back, without being restarted."""
    import inference.pipeline as pipeline

    loads: list[str] = []
    real_load = pipeline.Ensemble.load

    def counting_load(folder, **kwargs):
        loads.append(str(folder))
        return real_load(folder, **kwargs)

    monkeypatch.setattr(pipeline.Ensemble, "load", counting_load)
    models = Models(PipelineConfig(device="cpu", ihc_model_dir=str(broken_ihc)))
    for _ in range(2):
        with pytest.raises(ModelFileError, match=r"member_01\.safetensors"):
            models.ihc()
    assert len(loads) == 1  # the second image got the kept failure
    shutil.copyfile(demo_model_dir("nuclei-ihc") / "member_01.safetensors", broken_ihc / "member_01.safetensors")
    assert models.ihc().manifest.stain == "H-DAB"
    assert len(loads) == 2
