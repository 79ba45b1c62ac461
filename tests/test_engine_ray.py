"""The Ray engine against a local Ray cluster: same outcomes as the local engine, failures isolated."""

import json
from types import SimpleNamespace

import pytest

from bridge.run import RunConfig, run_batch
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import PipelineConfig
from tests.qupath_fakes import stand_in_core

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra: pip install 'pdl1-bridge[ray]'")


def _phantoms(folder, prefix: str, seeds) -> list:
    """A 1024² phantom at TPS 40 % per seed, ``<prefix><seed>.svs`` in ``folder``."""
    slides = []
    for seed in seeds:
        path = folder / f"{prefix}{seed}.svs"
        write_phantom(path, PhantomSpec(1024, 1024, seed=seed, tps_percent=40))
        slides.append(path)
    return slides


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_and_isolates_failures(tmp_path, local_cluster):
    from bridge.engine_ray import run_batch_ray

    slides = []
    for seed, tps in ((51, 40), (52, 70)):
        path = tmp_path / f"r{seed}.svs"
        write_phantom(path, PhantomSpec(1024, 1024, seed=seed, tps_percent=tps))
        slides.append(path)
    corrupt = tmp_path / "bad.svs"
    corrupt.write_bytes(b"nope")
    inputs = [slides[0], corrupt, slides[1]]
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "ray")
    seen = []
    outcomes = run_batch_ray(inputs, config, on_image=lambda done, n, name: seen.append((done, n)))
    assert [o.state for o in outcomes] == ["done", "failed", "done"]
    assert "bad.svs: neither OpenSlide nor Pillow can read it" in outcomes[1].error  # our message, no class name
    assert seen[-1] == (3, 3)
    local = run_batch(inputs, RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "local"))
    for a, b in zip(outcomes, local, strict=True):
        assert a.state == b.state and a.tps_percent == b.tps_percent and a.candidates == b.candidates
    summary = json.loads((tmp_path / "ray" / "r51.summary.json").read_text())
    assert summary["provenance"]["pdl1_bridge"]

    again = run_batch_ray(
        inputs, RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "ray", resume=True)
    )
    assert [o.state for o in again] == ["skipped", "failed", "skipped"]
    # The skipped rows keep the earlier run's results (they were blank in the closing table).
    assert [(o.tps_percent, o.run_id) for o in again[::2]] == [(o.tps_percent, o.run_id) for o in outcomes[::2]]


def test_ray_workers_analyse_in_the_frame_and_calibration_the_project_states(tmp_path, local_cluster):
    from bridge.engine_ray import run_batch_ray
    from bridge.init_project import init_project_files

    slide = tmp_path / "p.svs"
    write_phantom(slide, PhantomSpec(1024, 1024, seed=53, tps_percent=40))  # 0.5 µm/px
    project = tmp_path / "project"
    init_project_files(project, [slide, slide])
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text())
    calibration = raw["images"][0]["serverBuilder"]["metadata"]["pixelCalibration"]
    calibration["pixelWidth"]["value"] = calibration["pixelHeight"]["value"] = 0.25
    raw["images"][1]["serverBuilder"]["metadata"]["height"] = 512
    qpproj.write_text(json.dumps(raw))
    outcomes = run_batch_ray([project], RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never"))
    assert [o.state for o in outcomes] == ["done", "failed"]
    assert json.loads((project / "pdl1" / "1" / "summary.json").read_text())["mpp"] == 0.25
    assert "QuPath shows this image at 1024 x 512 px" in outcomes[1].error


def test_without_qupath_ray_analyses_the_exported_targets_as_the_local_engine_does(tmp_path, local_cluster):
    import uuid

    from shapely.geometry import box

    from bridge.engine_ray import run_batch_ray
    from bridge.init_project import init_project_files
    from bridge.qupath_geojson import QuPathObject, to_feature

    (slide,) = _phantoms(tmp_path, "e", [54])
    summaries, files = [], []
    for engine in ("ray", "local"):
        project = tmp_path / engine
        init_project_files(project, [slide])
        export = project / "pdl1" / "labels" / "1.geojson"
        export.parent.mkdir(parents=True)
        features = [
            to_feature(QuPathObject(box(x, x, x + 400, x + 400), "annotation", "Tumor", {}, id=str(uuid.UUID(int=i)),
                                    color=(200, 0, 0)))
            for i, x in enumerate((50, 550), start=1)
        ]  # fmt: skip
        export.write_text(json.dumps(features))
        config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", target_classes=("Tumor",))
        (outcome,) = (run_batch_ray if engine == "ray" else run_batch)([project], config)
        assert outcome.state == "done", outcome.error
        summary = json.loads((project / "pdl1" / "1" / "summary.json").read_text())
        summaries.append([(r["object_id"], r["tps_percent"], r["tumour_cells"]) for r in summary["targets"]])
        files.append(sorted(p.name for p in (project / "pdl1" / "1" / "target_objects").iterdir()))
    assert summaries[0] == summaries[1] and len(summaries[0]) == 2
    assert files[0] == files[1] == [f"{uuid.UUID(int=i)}.geojson" for i in (1, 2)]


def test_a_worker_caches_openvino_conversions_in_its_own_user_cache(tmp_path, monkeypatch):
    # The user cache folder is read from the environment in bridge: on a Ray worker, the worker's, not the driver's.
    from dataclasses import replace

    from bridge.engine_ray import analyse_to_files

    seen = []

    class Job:
        def analyse(self, models, config):
            seen.append(config.pipeline.openvino_cache_dir)
            raise RuntimeError("stop here")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "worker"))
    config = RunConfig(pipeline=PipelineConfig(device="cpu", openvino_cache_dir="/home/driver/.cache/x"))
    for given in (config, replace(config, pipeline=replace(config.pipeline, openvino_cache_dir=None))):
        with pytest.raises(RuntimeError, match="stop here"):
            analyse_to_files(Job(), str(tmp_path / "g"), str(tmp_path / "s"), None, given)
    assert seen == [str(tmp_path / "worker" / "pdl1-bridge" / "openvino"), None]


def test_an_address_ray_cannot_use_says_what_it_takes(tmp_path, monkeypatch):
    # It said only Ray's "Invalid address format: 1.2.3.4" (or "Could not find any running Ray instance").
    from bridge.engine_ray import run_batch_ray
    from bridge.project import ProjectError

    def refuses(address, **kwargs):
        raise ValueError(f"Invalid address format: {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuses)
    slide = tmp_path / "s.svs"
    write_phantom(slide, PhantomSpec(1024, 1024, seed=54, tps_percent=40))
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "out")
    with pytest.raises(ProjectError) as err:
        run_batch_ray([slide], config, address="1.2.3.4")
    assert str(err.value).startswith(
        "--address 1.2.3.4: Ray cannot reach a cluster there (Invalid address format: 1.2.3.4); expected auto (a "
        "cluster started on this machine with `ray start --head`), HOST:PORT of its head node (port 6379) or "
    )
    assert not (tmp_path / "out" / "pdl1" / "run.lock").exists()


def test_ray_init_leaves_the_commands_own_handler_of_a_kill(tmp_path, monkeypatch):
    # helper-136: ray.init put its SIGTERM handler in, and a kill of `pdl1 run --engine ray` aborted in Ray's C++ core
    # (exit -6, a stack) instead of stopping as a Ctrl-C does, its tasks left running.
    import signal

    from bridge.engine_ray import run_batch_ray
    from bridge.project import ProjectError

    def ours(signum, frame):
        raise KeyboardInterrupt

    def ray_init(address, **kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as Ray's own handler replaces the command's
        raise ValueError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)
    before = signal.signal(signal.SIGTERM, ours)
    try:
        slide = tmp_path / "s.svs"
        write_phantom(slide, PhantomSpec(1024, 1024, seed=54, tps_percent=40))
        config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "out")
        with pytest.raises(ProjectError, match="stop here"):
            run_batch_ray([slide], config, address="auto")
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_address_where_nothing_listens_fails_in_seconds_naming_the_fix(tmp_path, monkeypatch):
    # Ray retried a closed HOST:PORT for minutes (20 tries of some 40 s) before it failed; the port is now
    # tried first, and ray.init is never reached.
    import socket

    from bridge.engine_ray import run_batch_ray
    from bridge.project import ProjectError

    with socket.socket() as closed:  # a local port that was free a moment ago: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append(kwargs) or pytest.fail("ray.init called"))
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"not read: the address is refused first")
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "out")
    with pytest.raises(ProjectError) as err:
        run_batch_ray([slide], config, address=f"127.0.0.1:{port}")
    assert str(err.value).startswith(f"--address 127.0.0.1:{port}: nothing answers there (ConnectionRefusedError: ")
    assert str(err.value).endswith(
        "start the Ray cluster on that machine with `ray start --head` (its head node listens on port 6379; Ray "
        "Client, ray://, on 10001), or leave --address out for a local cluster of this machine's cores"
    )
    assert calls == []
    assert not (tmp_path / "out").exists()


def test_through_qupath_ray_analyses_each_target_as_the_local_engine_does(
    tmp_path, local_cluster, fake_qupath, monkeypatch
):
    # --engine ray analysed every image whole: a dearrayed TMA's cores were scored as one (with a warning), and
    # --class/--name were refused. The driver now reads each entry's targets, a worker analyses each one's region,
    # and the driver writes them under their targets: the same objects, measurements, summaries and targets.csv as
    # the local engine's. An entry whose targets cannot be read fails alone.
    from shapely.geometry import box

    from bridge import qupath
    from bridge.engine_ray import run_batch_ray
    from bridge.init_project import init_project_files

    slides = []
    for seed, tps in ((55, 60), (56, 10)):
        path = tmp_path / f"t{seed}.svs"
        write_phantom(path, PhantomSpec(1024, 1024, seed=seed, tps_percent=tps))
        slides.append(path)
    cores = [
        stand_in_core("A-1", 300, 300, radius_px=200),
        stand_in_core("A-2", 700, 300, radius_px=200, missing=True),
        stand_in_core("B-1", 500, 700, radius_px=250),
    ]
    tumour = SimpleNamespace(name="nest", path_class=SimpleNamespace(id="Tumor"), roi=box(100, 100, 600, 500))
    # Entry 1 a TMA, entry 2 an annotation of the target class, entry 3 one the target classes miss: it fails alone.
    monkeypatch.setattr(qupath, "tma_cores", lambda entry: cores if entry.entry_id == "1" else [])
    monkeypatch.setattr(
        qupath,
        "annotation_targets",
        lambda entry, *, classes=(), names=(): [tumour] if entry.entry_id == "2" else [],
    )
    monkeypatch.setattr(qupath, "core_is_analysed", lambda core: False)
    written = []
    monkeypatch.setattr(
        qupath,
        "write_children",
        lambda entry, parent, objects, measurements: written.append(
            (entry.entry_id, parent.name, sorted((o.object_type, o.classification) for o in objects), measurements)
        ),
    )
    pipeline = PipelineConfig(device="cpu")
    seen = {}
    for engine in ("local", "ray"):
        project = tmp_path / engine
        init_project_files(project, [slides[0], slides[1], slides[1]])
        config = RunConfig(pipeline=pipeline, qupath="always", target_classes=("Tumor",))
        written.clear()
        outcomes = run_batch_ray([project], config) if engine == "ray" else run_batch([project], config)
        summaries = [json.loads((project / "pdl1" / key / "summary.json").read_text()) for key in ("1", "2")]
        table = (project / "pdl1" / "targets.csv").read_text()
        seen[engine] = (outcomes, sorted(written, key=lambda w: (w[0], w[1])), summaries, table)
    (local, local_written, local_summaries, local_table), (ray_, ray_written, ray_summaries, ray_table) = seen.values()
    assert [o.state for o in ray_] == ["done", "done", "failed"]
    assert ray_[2].error == local[2].error and "no annotation of class ('Tumor',)" in ray_[2].error
    assert [(o.tps_percent, o.candidates, o.review_reasons) for o in ray_] == [
        (o.tps_percent, o.candidates, o.review_reasons) for o in local
    ]
    assert [w[:2] for w in ray_written] == [("1", "A-1"), ("1", "B-1"), ("2", "nest")]
    # The same numbers (workers run torch on one thread each, the local engine on all: equal to rounding at most).
    assert [w[:3] for w in ray_written] == [w[:3] for w in local_written]
    for a, b in zip(ray_written, local_written, strict=True):
        assert a[3] == pytest.approx(b[3], rel=1e-6, nan_ok=True)
    assert ray_table.replace(str(tmp_path / "ray"), "") == local_table.replace(str(tmp_path / "local"), "")
    for a, b in zip(ray_summaries, local_summaries, strict=True):
        assert [t["target"] for t in a["targets"]] == [t["target"] for t in b["targets"]]
        assert (a["tps_percent"], a["nuclei"], a["metadata"].keys()) == (
            b["tps_percent"],
            b["nuclei"],
            b["metadata"].keys(),
        )


def test_the_driver_keeps_at_most_twice_the_clusters_workers_in_flight(tmp_path, local_cluster, monkeypatch):
    # Every image was submitted before any result was collected: through QuPath each result holds an image's nuclei
    # and maps (hundreds of MB for a whole slide), and they piled up in the object store while the driver read the
    # other entries' targets. Progress comes as each image is written, in the order they finish.
    from bridge.engine_ray import run_batch_ray

    slides = _phantoms(tmp_path, "f", range(57, 62))
    in_flight = []
    wait = ray.wait
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})  # one worker: two tasks in flight
    monkeypatch.setattr(ray, "wait", lambda refs, **kw: in_flight.append(len(refs)) or wait(refs, **kw))
    seen = []
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "out")
    outcomes = run_batch_ray(slides, config, on_image=lambda done, n, name: seen.append((done, n)))
    assert [o.state for o in outcomes] == ["done"] * 5
    assert in_flight == [2, 2, 2, 2, 1]
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    # An autoscaling cluster's head holds no CPUs: the limit grows as the cluster does (counted once, it stayed 2, and
    # the autoscaler, which adds nodes for the tasks waiting, saw two).
    grows = iter([{}, {}, {}])  # the GPU check, then the first two images: no CPUs yet
    monkeypatch.setattr(ray, "cluster_resources", lambda: next(grows, {"CPU": 2.0}))
    in_flight.clear()
    run_batch_ray(slides, config)
    assert in_flight == [2, 4, 3, 2, 1]


def test_ctrl_c_keeps_the_images_written_names_them_and_cancels_the_tasks_in_flight(
    tmp_path, local_cluster, monkeypatch
):
    # A Ctrl-C said only "the images finished before it are written", with no table of them, and the tasks in flight
    # went on using the cluster for results nobody would write.
    from bridge.engine_ray import run_batch_ray
    from bridge.run import RunInterrupted

    slides = _phantoms(tmp_path, "c", range(62, 65))
    cancelled = []
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: cancelled.append(ref))

    def stop(done, n, name):
        raise KeyboardInterrupt

    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=tmp_path / "out")
    with pytest.raises(RunInterrupted) as stopped:
        run_batch_ray(slides, config, on_image=stop)
    (first,) = stopped.value.outcomes
    assert first.state == "done" and (tmp_path / "out" / f"{first.name.removesuffix('.svs')}.geojson").is_file()
    assert (stopped.value.stopped, stopped.value.total, len(cancelled)) == (None, 3, 2)


def test_through_qupath_an_image_failing_in_its_worker_or_its_writing_fails_alone_as_on_the_local_engine(
    tmp_path, local_cluster, fake_qupath, monkeypatch
):
    # Entry 1's results cannot be written into QuPath (its data restored from the backup), entry 2's target lies
    # outside the image (its worker fails); entry 3 is written. The same outcomes and messages on both engines.
    from shapely.geometry import box

    from bridge import qupath
    from bridge.engine_ray import run_batch_ray
    from bridge.init_project import init_project_files

    (slide,) = _phantoms(tmp_path, "s", [55])
    outside = SimpleNamespace(name="far", path_class=SimpleNamespace(id="Tumor"), roi=box(5000, 5000, 6000, 6000))
    inside = SimpleNamespace(name="near", path_class=SimpleNamespace(id="Tumor"), roi=box(100, 100, 600, 500))
    monkeypatch.setattr(
        qupath, "annotation_targets", lambda entry, **kw: [outside] if entry.entry_id == "2" else [inside]
    )
    restored = []
    monkeypatch.setattr(qupath, "restore_data", lambda entry, backup: restored.append(entry.entry_id))

    def write_children(entry, parent, objects, measurements):
        if entry.entry_id == "1":
            raise RuntimeError("the disk is full")

    monkeypatch.setattr(qupath, "write_children", write_children)
    config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="always", target_classes=("Tumor",))
    seen = {}
    for engine, run in (("local", run_batch), ("ray", run_batch_ray)):
        project = tmp_path / engine
        init_project_files(project, [slide] * 3)
        restored.clear()
        fake_qupath["let_go"].clear()
        outcomes = run([project], config)
        status = json.loads((project / "pdl1" / "status.json").read_text())
        let_go = sorted(fake_qupath["let_go"])  # what QuPath read of each entry, dropped as it ends
        seen[engine] = ([(o.state, o.error) for o in outcomes], list(restored), status["images"].keys(), let_go)
    assert seen["ray"] == seen["local"]
    (first, second, third), restored_ray, _, let_go = seen["ray"]
    assert let_go == ["1", "2", "3"]
    assert first == ("failed", "RuntimeError: the disk is full") and restored_ray == ["1"]
    assert second == (
        "failed",
        "ROI (5000, 5000)-(6000, 6000) lies outside the image of 1024x1024 px; ROI coordinates "
        "must be level-0 pixels of this image",
    )
    assert third == ("done", None)
