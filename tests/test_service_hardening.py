"""The service against hostile or odd input (issue #30): every input error is a 4xx with a JSON
``detail``, the queue is bounded, a folder swapped for a symlink while a job waits does not lead
out of --allow-root, and the OpenAPI schema says what the service answers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from typer.testing import CliRunner

import bridge.service
import inference.pipeline
from bridge.service import ServiceSettings, create_app
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig
from tests.service_helpers import free_port


def _wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout} s for {what}")


@pytest.fixture(scope="module")
def slides_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    write_phantom(root / "small.svs", PhantomSpec(1024, 1024, seed=41, tps_percent=50))
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


class Served:
    """A service on loopback with its app (for the worker's state) and a client."""

    def __init__(self, settings: ServiceSettings, models: Models):
        self.app = create_app(settings, models=models)
        # log_config=None: uvicorn's loggers propagate, so caplog sees what it logs.
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="info", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_for(lambda: self.server.started, "uvicorn to start", 30)
        self.port = settings.port
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=60)

    @property
    def worker(self) -> bridge.service.Worker:
        return self.app.state.worker

    def wait(self, job_id: str) -> dict:
        def finished():
            status = self.client.get(f"/v1/jobs/{job_id}").json()
            return status if status["state"] in ("done", "failed", "cancelled") else None

        return _wait_for(finished, f"job {job_id} to finish", 120)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(slides_root, models):
    settings = ServiceSettings(
        port=free_port(),
        allow_roots=(slides_root,),
        pipeline=PipelineConfig(device="cpu"),
        max_request_bytes=2**20,
        max_json_bytes=2**20,
    )
    served = Served(settings, models)
    yield served
    served.close()


@pytest.fixture
def held_worker(monkeypatch):
    """The worker blocks inside the first analysis until the test sets the returned event."""
    gate = threading.Event()
    analyse = bridge.service.jobs.analyse_slide

    def held(*args, **kwargs):
        if not gate.wait(60):
            raise AssertionError("the test never released the worker")
        return analyse(*args, **kwargs)

    monkeypatch.setattr(bridge.service.jobs, "analyse_slide", held)
    yield gate
    gate.set()


def _png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------- 2: input errors are 4xx


@pytest.mark.parametrize(
    "image",
    [
        "{root}/a\x00b.svs",
        "{uri}%00",
        "{root}/loop",
        "{root}/" + "x" * 300,
        "{root}/" + "/".join(["y" * 200] * 25),
        "file://[::1/x.svs",
    ],
    ids=["nul-in-path", "nul-in-uri", "symlink-loop", "name-too-long", "path-too-long", "unparsable-uri"],
)
def test_a_path_the_file_system_cannot_take_is_a_422(service, slides_root, image):
    image = image.replace("{root}", str(slides_root)).replace("{uri}", (slides_root / "small.svs").as_uri())
    r = service.client.post("/v1/jobs", json={"image": image})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    assert "cannot be used" in r.json()["detail"] and "--allow-root" in r.json()["detail"]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "true"])  # true: shapely took it for 1
@pytest.mark.parametrize("vertex", [0, -1])
def test_an_roi_with_a_non_finite_vertex_is_a_422(service, slides_root, bad, vertex):
    ring = ["[0, 0]", "[500, 0]", "[500, 500]", "[0, 0]"]
    ring[vertex] = f"[{bad}, 0]"
    roi = f'{{"type": "Polygon", "coordinates": [[{", ".join(ring)}]]}}'
    body = f'{{"image": "{slides_root / "small.svs"}", "roi": {roi}}}'
    r = service.client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert f"roi coordinates must be finite numbers, got {bad}; " in r.json()["detail"]  # as the client wrote it


@pytest.mark.parametrize(
    ("param", "value"),
    [("origin_x", "nan"), ("origin_y", "inf"), ("origin_x", "-inf"), ("downsample", "inf"), ("mpp", "nan")],
)
def test_a_pixel_upload_with_a_non_finite_number_is_a_422(service, param, value):
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, param: value}, content=_png())
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": f"bad request: query.{param}: Input should be a finite number"}


def test_a_pixel_upload_at_an_implausible_mpp_says_which_parameter(service):
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 1e-9}, content=_png())
    assert r.status_code == 422
    # It said "Input should be greater than or equal to 0.05": no unit, nor what to send.
    assert r.json() == {
        "detail": "bad request: query.mpp: 1e-09 µm/px is outside 0.05-50; send the µm/px of the uploaded region (the "
        "image's µm/px times the downsample it was read at)"
    }
    r = service.client.post("/v1/jobs", json={"image": "/nowhere/a.svs", "mpp": 500})
    assert r.json() == {
        "detail": "bad request: body.mpp: 500 µm/px is outside 0.05-50; send the µm/px QuPath reports for the image"
    }


@pytest.mark.parametrize(("param", "value"), [("origin_x", 3e9), ("origin_y", -3e9)])
def test_a_pixel_upload_placed_beyond_any_image_is_a_422(service, param, value):
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, param: value}, content=_png())
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"bad request: query.{param}: Input should be")


@pytest.mark.parametrize("value", ["5e-324", "1e-300", "0.001", "0", "-2", "1e16"])
def test_a_pixel_upload_at_a_downsample_no_image_is_read_at_is_a_422_naming_the_range(service, value):
    # 5e-324 and 1e-300 were accepted: the job failed on "cannot convert float NaN to integer" or answered vertices
    # around 8e-298 px.
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, "downsample": value}, content=_png())
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"bad request: query.downsample: {value} is outside 0.01-4096; send the level-0 px per uploaded "
            "px: the downsample the region was read at (1 at full resolution)"
        },
    )


def test_a_pixel_upload_naming_a_model_the_service_lacks_is_refused_as_a_path_job_is(service):
    # An upload took no model and ran the loaded ones whatever pdl1_analyze.groovy's MODEL said; a path job refused.
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, "model": "lab-v2"}, content=_png())
    assert r.status_code == 409, r.text
    assert r.json() == {"detail": "unknown model 'lab-v2'; this service has 'default' (see /v1/models)"}
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, "model": "default"}, content=_png())
    assert r.status_code == 202, r.text


def test_a_bug_still_answers_json(service, slides_root, monkeypatch):
    def broken(uri):
        raise KeyError("a bug")

    monkeypatch.setattr(bridge.service.paths, "uri_to_path", broken)
    # A client of its own: the server closes the connection after a 500 (the app raised), and the module's shared
    # client reused it for the next test's first request now and then (connection reset by peer).
    with httpx.Client(base_url=service.client.base_url, timeout=60) as client:
        r = client.post("/v1/jobs", json={"image": (slides_root / "small.svs").as_uri()})
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error (KeyError); the service log has the details, please report it"}


# ------------------------------------------------------------------- 3: a bounded queue


def test_queued_uploads_wait_compressed_the_queue_is_bounded_and_cancel_frees(slides_root, models, held_worker):
    settings = ServiceSettings(
        port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"), max_queued=2
    )
    served = Served(settings, models)
    try:
        client, png = served.client, _png()
        params = {"mpp": 0.5, "outputs": ["regions"]}
        running = client.post("/v1/jobs/pixels", params=params, content=png).json()["job_id"]
        _wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["state"] == "running", "the first job to start")
        queued = [client.post("/v1/jobs/pixels", params=params, content=png) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        ids = [r.json()["job_id"] for r in queued]
        for job_id in ids:  # the PNG as sent, not 64x64x3 decoded pixels
            assert served.worker.get(job_id).upload == png
        full = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs")})
        assert full.status_code == 429
        assert full.json()["detail"].startswith("2 jobs are waiting, the most this service queues (--max-queued 2)")
        assert client.delete(f"/v1/jobs/{ids[0]}").status_code == 200
        assert served.worker.get(ids[0]).upload is None  # freed now, not when its turn comes
        again = client.post("/v1/jobs/pixels", params=params, content=png)
        assert again.status_code == 202
        held_worker.set()
        states = [served.wait(j)["state"] for j in (running, ids[0], ids[1], again.json()["job_id"])]
        assert states == ["done", "cancelled", "done", "done"]
        assert all(job.upload is None for job in served.worker.jobs.values())
    finally:
        served.close()


def test_an_upload_to_a_full_queue_is_refused_before_its_body_is_parsed(slides_root, models, held_worker, monkeypatch):
    # Its header was parsed first (a PNG without eXIf decoded whole): a 429 took 1.5 s for an 8192² RGBA PNG.
    settings = ServiceSettings(
        port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"), max_queued=1
    )
    served = Served(settings, models)
    try:
        client, params = served.client, {"mpp": 0.5, "outputs": ["regions"]}
        running = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
        _wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["state"] == "running", "the first job to start")
        assert client.post("/v1/jobs/pixels", params=params, content=_png()).status_code == 202
        parsed: list[bytes] = []
        monkeypatch.setattr(bridge.service.app, "check_upload", lambda body, **kwargs: parsed.append(body))
        full = client.post("/v1/jobs/pixels", params=params, content=_png())
        assert (full.status_code, parsed) == (429, [])
        assert full.json()["detail"].startswith("1 jobs are waiting, the most this service queues (--max-queued 1)")
    finally:
        held_worker.set()
        served.close()


def test_uploads_still_arriving_hold_room_in_the_queue(slides_root, models, held_worker):
    # Only queued jobs counted: any number of uploads could be read at once, each held whole in memory before the
    # full queue refused it (30 uploads of 32 MiB, sent together, took the service from 0.36 to 2.3 GB).
    settings = ServiceSettings(
        port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"), max_queued=2
    )
    served = Served(settings, models)
    arriving: list[socket.socket] = []
    try:
        client, params = served.client, {"mpp": 0.5, "outputs": ["regions"]}
        running = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
        _wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["state"] == "running", "the first job to start")
        png = _png()
        for _ in range(2):  # each sends its header and a part of its body, then nothing more for now
            sock = socket.create_connection(("127.0.0.1", served.port))
            sock.sendall(
                f"POST /v1/jobs/pixels?mpp=0.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(png) + 2**20}\r\n\r\n".encode()
                + png
            )
            arriving.append(sock)
        _wait_for(lambda: served.worker.receiving == 2, "both uploads to be read")
        full = client.post("/v1/jobs/pixels", params=params, content=png)
        assert full.status_code == 429, full.text
        assert full.json()["detail"] == (
            "2 jobs are waiting (2 of them uploads still arriving), the most this service queues (--max-queued 2); "
            "retry when one has finished, or cancel one you no longer need (DELETE /v1/jobs/{id})"
        )
        assert client.post("/v1/jobs", json={"image": str(slides_root / "small.svs")}).status_code == 429
        for sock in arriving:  # their clients give up: the room they held is free again
            sock.close()
        _wait_for(lambda: served.worker.receiving == 0, "the uploads given up to let go of their room")
        assert client.post("/v1/jobs/pixels", params=params, content=png).status_code == 202
    finally:
        for sock in arriving:
            sock.close()
        held_worker.set()
        served.close()


def test_max_queued_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--max-queued must be at least 1, got 0"):
        ServiceSettings(allow_roots=(tmp_path,), max_queued=0)


# ------------------------------------------------------------------- 4: symlink swap while queued


def test_a_folder_swapped_for_a_symlink_while_queued_is_not_followed(
    service, slides_root, tmp_path, held_worker, monkeypatch
):
    inside = slides_root / "cases"
    inside.mkdir()
    (inside / "case.svs").write_bytes((slides_root / "small.svs").read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "case.svs").write_bytes((slides_root / "small.svs").read_bytes())
    opened: list[str] = []
    from inference.slides.slide import open_slide

    def recording(path, **kwargs):
        opened.append(str(Path(path).resolve()))
        return open_slide(path, **kwargs)

    for module in (bridge.service.paths, inference.pipeline):  # whichever opens the image records it
        monkeypatch.setattr(module, "open_slide", recording, raising=False)
    try:
        client = service.client
        first = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["regions"]})
        first_id = first.json()["job_id"]
        _wait_for(lambda: client.get(f"/v1/jobs/{first_id}").json()["state"] == "running", "the first job to start")
        r = client.post("/v1/jobs", json={"image": str(inside / "case.svs"), "outputs": ["regions"]})
        assert r.status_code == 202  # inside the root when submitted
        inside.rename(slides_root / "cases-old")
        inside.symlink_to(outside)
        held_worker.set()
        status = service.wait(r.json()["job_id"])
        assert status["state"] == "failed"
        assert status["error"].startswith(f"{inside / 'case.svs'} is outside the folders")
        assert "--allow-root" in status["error"]
        assert not any(p.startswith(str(outside)) for p in opened)
        assert service.wait(first_id)["state"] == "done"
    finally:
        inside.unlink(missing_ok=True)


def test_the_worker_reads_the_file_it_checked(slides_root, tmp_path):
    # The reader opens the checked file through its descriptor, under the image's own name.
    with bridge.service.open_allowed(slides_root / "small.svs", (slides_root,), mpp=None) as slide:
        assert slide.path == (slides_root / "small.svs").resolve()
        assert slide.dimensions == (1024, 1024)
    with (
        pytest.raises(bridge.service.PathNotAllowedError, match="--allow-root"),
        bridge.service.open_allowed(slides_root / "small.svs", (tmp_path,), mpp=None),
    ):
        pass


# ------------------------------------------------------------------- 5: the answers and the schema


def test_options_and_405_name_every_method_of_a_path(service):
    r = service.client.request("OPTIONS", "/v1/jobs/abc")
    assert r.status_code == 204 and r.headers["allow"] == "DELETE, GET, OPTIONS"
    r = service.client.put("/v1/jobs/abc")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, OPTIONS"
    # Starlette's "Method Not Allowed" named neither the methods nor the endpoints.
    assert r.json() == {"detail": f"PUT is not a method of /v1/jobs/abc, which takes DELETE or GET; {ENDPOINTS}"}
    # A fixed path is not also the templated one it fits: /v1/jobs/pixels is not a job id.
    r = service.client.request("OPTIONS", "/v1/jobs/pixels")
    assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"


ENDPOINTS = (
    "the API's endpoints are GET /v1/health, GET /v1/models, POST /v1/jobs, POST /v1/jobs/pixels, GET /v1/jobs/{id}, "
    "DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/result, GET /v1/jobs/{id}/record (see /docs)"
)


@pytest.mark.parametrize(
    ("method", "path", "allow", "takes"),
    [
        # Served as the job route: "no job 'pixels'", a 404 that did not say the path takes uploads.
        ("GET", "/v1/jobs/pixels", "OPTIONS, POST", "POST"),
        ("DELETE", "/v1/jobs/pixels", "OPTIONS, POST", "POST"),
        ("GET", "/v1/jobs", "OPTIONS, POST", "POST"),  # no list of jobs: said only "Method Not Allowed"
    ],
)
def test_a_method_a_path_does_not_take_is_a_405_naming_those_it_takes(service, method, path, allow, takes):
    r = service.client.request(method, path)
    assert (r.status_code, r.headers.get("allow"), r.json()) == (
        405,
        allow,
        {"detail": f"{method} is not a method of {path}, which takes {takes}; {ENDPOINTS}"},
    )


@pytest.mark.parametrize("path", ["/v2/jobs", "/", "/v1/job"])
def test_a_path_no_endpoint_serves_is_a_404_naming_the_endpoints(service, path):
    # Starlette's {"detail": "Not Found"} did not say that the path, not a job or an image, was not found.
    r = service.client.get(path)
    assert (r.status_code, r.json()) == (404, {"detail": f"no endpoint {path}; {ENDPOINTS}"})


def test_a_queued_job_asked_to_stop_says_cancelling_until_the_worker_stops_it(service, held_worker):
    client, params = service.client, {"mpp": 0.5, "outputs": ["regions"]}
    running = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
    _wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["state"] == "running", "the first job to start")
    queued = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
    assert client.delete(f"/v1/jobs/{queued}").json()["state"] == "cancelling"
    held_worker.set()
    assert service.wait(queued)["state"] == "cancelled"


def test_a_job_cancelled_as_its_analysis_ends_is_cancelled_not_done(service, monkeypatch):
    # The stop was looked for between batches only: a DELETE during the last one answered "cancelling", and the job
    # then ended "done" with a result, holding one of the --keep-results places.
    finished, gate = threading.Event(), threading.Event()
    analyse = bridge.service.jobs.analyse_slide

    def ends_then_held(*args, **kwargs):
        result = analyse(*args, **kwargs)
        finished.set()
        if not gate.wait(60):
            raise AssertionError("the test never released the worker")
        return result

    monkeypatch.setattr(bridge.service.jobs, "analyse_slide", ends_then_held)
    client = service.client
    job = client.post("/v1/jobs/pixels", params={"mpp": 0.5, "outputs": ["regions"]}, content=_png()).json()["job_id"]
    assert finished.wait(60), "the analysis never ended"
    assert client.delete(f"/v1/jobs/{job}").json()["state"] == "cancelling"
    gate.set()
    assert service.wait(job)["state"] == "cancelled"
    r = client.get(f"/v1/jobs/{job}/result")
    assert r.status_code == 409 and "was cancelled" in r.json()["detail"]


def test_a_result_asked_for_too_early_or_of_a_job_without_one_says_what_to_do(service, held_worker, monkeypatch):
    # All said "job … is <state>, not done" ("is failed, not done", "is cancelled, not done"): neither to poll, nor
    # that a failed or cancelled job will never have a result.
    client, params = service.client, {"mpp": 0.5, "outputs": ["regions"]}
    running = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
    _wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["state"] == "running", "the first job to start")
    queued = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
    poll = "not done: poll GET /v1/jobs/{0} until its state is done, then ask for its result"
    for job_id, state in ((running, "running"), (queued, "queued")):
        r = client.get(f"/v1/jobs/{job_id}/result")
        assert (r.status_code, r.json()) == (409, {"detail": f"job {job_id} is {state}, {poll.format(job_id)}"})
    client.delete(f"/v1/jobs/{queued}")
    cancelled = f"job {queued} was cancelled (DELETE /v1/jobs/{queued}), so it has no result; submit the job again"
    for _ in range(2):  # cancelling, then cancelled
        assert client.get(f"/v1/jobs/{queued}/result").json() == {"detail": cancelled}
        held_worker.set()
        assert service.wait(queued)["state"] == "cancelled"

    def fails(*args, **kwargs):
        raise inference.StainError("image: its colour is no stain the models run on; set its image type")

    monkeypatch.setattr(bridge.service.jobs, "analyse_slide", fails)
    failed = client.post("/v1/jobs/pixels", params=params, content=_png()).json()["job_id"]
    status = service.wait(failed)
    error = status["error"]
    assert status["state"] == "failed" and "no stain the models run on" in error, status
    r = client.get(f"/v1/jobs/{failed}/record")
    assert (r.status_code, r.json()) == (409, {"detail": f"job {failed} failed, so it has no result: {error}"})


def test_every_413_is_the_services_json(service):
    def chunked():
        for _ in range(3):
            yield b" " * 2**20

    upload = (
        r"request body of (more than )?\d+ bytes is over the limit of 1048576; send a smaller region or a lower "
        r"resolution \(downsample\)"
    )
    answers = [
        (
            service.client.post("/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"}),
            r"JSON request body of more than 1048576 bytes is over the limit of 1048576 \(1 MiB\), room for an ROI "
            r"of about 27,000 vertices as QuPath sends them; an ROI that detailed should be simplified in QuPath .*",
        ),
        (service.client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=chunked()), upload),
        (service.client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=b"0" * (3 * 2**20)), upload),
    ]
    for r, detail in answers:
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        assert re.fullmatch(detail, r.json()["detail"]), r.text


def test_openapi_documents_the_error_answers(service):
    schema = service.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    properties = schema["components"]["schemas"]["ErrorDetail"]["properties"]
    assert properties["detail"] == {"type": "string", "title": "Detail"}
    assert set(properties) == {"detail", "cannot_open"}
    assert properties["cannot_open"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert "POST /v1/jobs/pixels" in properties["cannot_open"]["description"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                if code.startswith("4"):
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorDetail", (path, method, code)
    submit = schema["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"403", "404", "409", "413", "422", "429"} <= set(submit)
    # 409: an unknown model, as a path job's (it was not listed for an upload).
    assert {"409", "413", "422", "429"} <= set(schema["paths"]["/v1/jobs/pixels"]["post"]["responses"])
    # With no token set every route answers 403 to a web page's request or one to another host: only the job
    # submission listed it (for --allow-root). And an upload may be a JPEG or a GIF too.
    assert all("403" in operation["responses"] for ops in schema["paths"].values() for operation in ops.values())
    upload = schema["paths"]["/v1/jobs/pixels"]["post"]["requestBody"]["content"]
    assert set(upload) == {"image/png", "image/tiff", "image/jpeg", "image/gif"}


def test_a_client_gone_mid_upload_is_one_log_line_shown_at_the_default_level(service, caplog):
    # It was logged at INFO, which the default --log-level (WARNING) does not show.
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(
            b"POST /v1/jobs/pixels?mpp=0.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100
        )
    _wait_for(
        lambda: any("disconnected during an upload" in r.getMessage() for r in caplog.records),
        "the service to log the disconnect",
        30,
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


TAKES_ONLY = "this service takes only requests that send 'Authorization: Bearer <token>'"
STARTED_WITH = "the token `pdl1 serve` was started with (--token, --token-file or PDL1_TOKEN)"
EXPECTED = f"expected 'Authorization: Bearer <token>', with {STARTED_WITH}"
SEND = "send that one"


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        ("", f"no token: {TAKES_ONLY}, with {STARTED_WITH}"),
        ("Bearer a-guess", f"wrong token: the Authorization header's Bearer token is not {STARTED_WITH}; {SEND}"),
        ("Basic dXNlcjpwYXNz", f"the Authorization header's scheme is 'Basic'; {EXPECTED}"),
        ("s3cret-s3cret-s3cret", f"the Authorization header is one word (the token without 'Bearer '?); {EXPECTED}"),
        ("Bearer", f"the Authorization header is Bearer without a token; {EXPECTED}"),
    ],
    ids=["none", "wrong", "basic", "no-scheme", "no-token"],
)  # fmt: skip
def test_a_401_says_which_of_header_scheme_and_token_is_wrong(slides_root, models, authorization, detail):
    # All were "missing or wrong token": a client could not tell a header it never sent from a wrong token.
    settings = ServiceSettings(
        port=free_port(),
        token="s3cret-s3cret-s3cret",
        allow_roots=(slides_root,),
        pipeline=PipelineConfig(device="cpu"),
    )
    served = Served(settings, models)
    try:
        headers = {"Authorization": authorization} if authorization else {}
        r = served.client.get("/v1/health", headers=headers)
        assert (r.status_code, r.headers["www-authenticate"], r.json()) == (401, "Bearer", {"detail": detail})
        assert "s3cret" not in r.text  # the token sent is not echoed
        assert served.client.get("/v1/health", headers={"Authorization": "bearer s3cret-s3cret-s3cret"}).is_success
    finally:
        served.close()


def test_401_says_bearer(slides_root, models):
    settings = ServiceSettings(
        port=free_port(), token="s3cret", allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu")
    )
    served = Served(settings, models)
    try:
        r = served.client.get("/v1/health")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": f"no token: {TAKES_ONLY}, with {STARTED_WITH}"}
        schema = served.client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert "401" in schema["paths"]["/v1/health"]["get"]["responses"]
    finally:
        served.close()


# ------------------------------------------------------------------- 5: the token off the command line


@pytest.fixture
def started(monkeypatch):
    """What `pdl1 serve` would start: its settings, without binding a port."""
    import bridge.service.server

    got: dict = {}

    def fake_create_app(settings, **kwargs):
        got["settings"] = settings
        return object()

    monkeypatch.setattr(bridge.service, "create_app", fake_create_app)
    monkeypatch.setattr(bridge.service.server, "run_service", lambda *args, **kwargs: None)
    monkeypatch.delenv("PDL1_TOKEN", raising=False)
    return got


def _serve(args: list[str], env: dict[str, str] | None = None):
    from bridge.cli.app import app

    if "--port" not in args:  # not the default 8765, which another service on this machine may hold
        args = [*args, "--port", str(free_port())]
    # Wide enough that Rich's error box never breaks a long path (a longer TMPDIR than /tmp broke these tests).
    result = CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "1000", **(env or {})})
    return result, " ".join(result.output.replace("│", " ").split())


def test_the_token_can_come_from_the_environment_or_a_file(started, tmp_path):
    public = ["--allow-root", str(tmp_path), "--host", "0.0.0.0"]
    result, _ = _serve(public, env={"PDL1_TOKEN": "from-the-environment"})
    assert result.exit_code == 0, result.output
    assert started["settings"].token == "from-the-environment"
    token_file = tmp_path / "token"
    token_file.write_text("from-the-token-file\n")
    result, _ = _serve([*public, "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    assert started["settings"].token == "from-the-token-file"
    result, _ = _serve(["--allow-root", str(tmp_path), "--max-queued", "3"])
    assert result.exit_code == 0 and started["settings"].max_queued == 3


@pytest.mark.parametrize("from_env", [False, True])
def test_token_and_token_file_together_is_a_usage_error(started, tmp_path, from_env):
    token_file = tmp_path / "token"
    token_file.write_text("t")
    args = ["--allow-root", str(tmp_path), "--token-file", str(token_file)]
    env = {"PDL1_TOKEN": "t"} if from_env else None
    result, output = _serve(args if from_env else [*args, "--token", "t"], env=env)
    assert result.exit_code == 2
    assert "give the token one way: --token (or PDL1_TOKEN) or --token-file, not both" in output
    assert "settings" not in started


def test_a_token_is_stripped_as_a_token_file_is_and_a_blank_one_is_no_token(started, tmp_path):
    # "secret\n" (a file read into PDL1_TOKEN) was a token no client could send; "   " on a public address passed
    # for a token, and the service refused every request.
    public = ["--allow-root", str(tmp_path), "--host", "0.0.0.0"]
    result, _ = _serve(public, env={"PDL1_TOKEN": "a-long-enough-s3cret\n"})
    assert result.exit_code == 0, result.output
    assert started.pop("settings").token == "a-long-enough-s3cret"
    result, output = _serve([*public, "--token", "   "])
    assert result.exit_code == 2, output
    assert "--token (or PDL1_TOKEN) is blank; give the shared secret every request must send" in output
    assert "settings" not in started
    result, _ = _serve(["--allow-root", str(tmp_path)], env={"PDL1_TOKEN": " "})  # loopback: as if none were set
    assert result.exit_code == 0 and started["settings"].token is None


@pytest.mark.parametrize(
    ("token", "what"),
    [
        ("s\u00e9cret-long-enough-token", "a character outside ASCII (character 2 of 24)"),
        ("first-line-of-it\nsecond-line-of-it", "a line break (character 17 of 34)"),
        ("two words-long-enough", "white space (character 4 of 21)"),
    ],
)
@pytest.mark.parametrize("source", ["--token-file", "PDL1_TOKEN"])
def test_a_token_no_http_client_can_send_is_refused_at_start_up_without_showing_it(
    started, tmp_path, token, what, source
):
    # Accepted, each made every request a 401: a header is read as latin-1 and the token compared as UTF-8, and a
    # --token-file of two lines was stripped only at its ends.
    args, env = ["--allow-root", str(tmp_path)], None
    if source == "--token-file":
        token_file = tmp_path / "token"
        token_file.write_text(f"{token}\n")
        token_file.chmod(0o600)
        args += ["--token-file", str(token_file)]
        fix = "write only the token into the file, on one line"
    else:
        env = {"PDL1_TOKEN": token}
        fix = "give --token (or PDL1_TOKEN) such a token"
    result, output = _serve(args, env=env)
    assert result.exit_code == 2, output
    assert (
        f"the token holds {what}; a token may hold only printable ASCII characters without white space (letters, "
        "digits and punctuation such as - _ . ~), which every HTTP client can send: make one with "
        f'`python -c "import secrets; print(secrets.token_urlsafe(32))"`; {fix}'
    ) in output
    assert all(part not in output for part in token.split()) and "settings" not in started


def test_an_empty_token_file_is_a_usage_error(started, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    result, output = _serve(["--allow-root", str(tmp_path), "--token-file", str(token_file)])
    assert result.exit_code == 2 and "is empty; write the token into it" in output


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_an_allow_root_that_is_no_folder_is_a_usage_error(started, tmp_path, kind):
    root = tmp_path / "slides"
    if kind == "file":
        root.write_text("not a folder")
    result, output = _serve(["--allow-root", str(tmp_path), "--allow-root", str(root)])
    assert result.exit_code == 2, result.output
    what = "is a file" if kind == "file" else "does not exist"
    assert f"--allow-root {root} {what}; expected a folder on this machine that holds the images" in output
    assert "settings" not in started


def test_a_port_in_use_is_refused_before_the_models_load(started, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result, output = _serve(["--allow-root", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"port {port} on 127.0.0.1 is already in use" in output and "choose a free port with --port" in output
    assert "settings" not in started  # no app built, so no models loaded
    result, _ = _serve(["--allow-root", str(tmp_path), "--port", str(port)])  # free again
    assert result.exit_code == 0, result.output


def test_an_address_of_another_machine_is_refused_before_the_models_load(started, tmp_path):
    # 192.0.2.1: TEST-NET-1 (RFC 5737), never an address of this machine.
    result, output = _serve(["--allow-root", str(tmp_path), "--host", "192.0.2.1", "--token", "a-long-enough-s3cret"])
    assert result.exit_code == 2, result.output
    assert "cannot bind 192.0.2.1 port" in output and "a --host of this machine" in output
    assert "settings" not in started


def test_a_models_option_that_is_no_folder_of_model_folders_is_a_usage_error(started, tmp_path):
    # Each said only "MODELS/seg: no such model folder", after the port check.
    from inference.models.ensemble import demo_model_dir

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    expected = (
        "expected a folder holding seg/ and nuclei/ (H&E) and nuclei-ihc/ (PD-L1 IHC) model folders, as the shipped "
        "demo's"
    )
    for models, came in [
        (tmp_path / "file", "is a file"),
        (tmp_path / "nope", "does not exist"),
        (tmp_path / "empty", "holds no seg/ and nuclei/"),
        (demo_model_dir("seg"), "holds no seg/ and nuclei/ (it is a model folder itself)"),
    ]:
        result, output = _serve(["--allow-root", str(tmp_path), "--models", str(models)], env={"COLUMNS": "400"})
        assert result.exit_code == 2, output
        assert f"--models: {models} {came}; {expected}" in output, output
        assert "settings" not in started


# ------------------------------------------------------------------- shutdown with jobs waiting


def _jobs_run_until_stopped(monkeypatch) -> list[str]:
    """The worker's jobs made to run until they are asked to stop, then end cancelled; the ids of those started."""
    from bridge.service import Worker
    from inference.errors import Cancelled

    started: list[str] = []

    def run(self, job):
        started.append(job.id)
        if not job.cancel.wait(20):
            raise AssertionError("the running job was not asked to stop")
        raise Cancelled("stopped")

    monkeypatch.setattr(Worker, "_run", run)
    return started


def test_shutdown_stops_the_running_job_and_starts_no_queued_one(tmp_path, monkeypatch):
    """Jobs do not survive a restart: at shutdown the worker stops the running job and starts no queued one
    (it went on through the queue while the service waited, then exited mid-analysis when the join timed out)."""
    from bridge.service import Job, Worker

    started = _jobs_run_until_stopped(monkeypatch)
    worker = Worker(None, PipelineConfig(device="cpu"), allow_roots=(tmp_path,))
    jobs = [
        Job(id=f"job{i}", image=str(tmp_path / "x.svs"), roi=None, mpp=None, outputs=("regions",)) for i in range(4)
    ]
    for job in jobs:
        worker.submit(job)
    _wait_for(lambda: jobs[0].state == "running", "the first job to start")
    worker.stop()
    assert not worker.thread.is_alive()
    assert started == ["job0"]  # the queue was not gone through
    assert [job.state for job in jobs] == ["cancelled"] * 4


def test_only_jobs_done_count_toward_keep_results_failed_ones_release_no_result(tmp_path, monkeypatch):
    # With --keep-results 2, one job done and two failed uploads released the done job's result unfetched (410).
    from bridge.service import Job, Worker
    from inference import Pdl1Error

    def run(self, job):
        if job.id.startswith("fails"):
            raise Pdl1Error("not an image")
        return f"result of {job.id}"

    monkeypatch.setattr(Worker, "_run", run)
    worker = Worker(None, PipelineConfig(device="cpu"), allow_roots=(tmp_path,), keep_results=2)

    def finish(job_id: str) -> Job:
        job = Job(id=job_id, image="upload", roi=None, mpp=0.5, outputs=("regions",))
        worker.submit(job)
        _wait_for(lambda: job.finished is not None and job.id in worker.finished, f"{job_id} to finish")
        return job

    done = finish("done0")
    failed = [finish(f"fails{i}") for i in range(3)]
    assert [job.state for job in failed] == ["failed"] * 3
    assert (done.result, done.released) == ("result of done0", False)
    later = [finish(f"done{i}") for i in (1, 2)]
    assert (done.result, done.released) == (None, True)  # two newer results push it out
    assert [job.result for job in later] == ["result of done1", "result of done2"]
    worker.stop()


def test_a_job_submitted_while_the_service_stops_is_refused_not_left_queued(tmp_path):
    from bridge.service import Job, Worker
    from bridge.service.errors import ServiceStoppingError

    worker = Worker(None, PipelineConfig(device="cpu"), allow_roots=(tmp_path,))
    worker.halt()
    job = Job(id="late", image=str(tmp_path / "x.svs"), roi=None, mpp=None, outputs=("regions",))
    with pytest.raises(ServiceStoppingError, match="shutting down and starts no more jobs; submit the job again"):
        worker.submit(job)
    worker.stop()
    assert not worker.thread.is_alive()


def test_a_job_submitted_just_after_sigterm_gets_the_503_of_a_stopping_service(slides_root, models, monkeypatch):
    """uvicorn sees a SIGTERM at its next tick (0.1 s) and only then shuts down: a job sent 17 ms after one was
    accepted (202), then cancelled with the service, its client never told (helper-166)."""
    import signal

    from bridge.service.server import ServiceServer

    _jobs_run_until_stopped(monkeypatch)
    port = free_port()
    settings = ServiceSettings(port=port, allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"))
    app = create_app(settings, models=models)
    server = ServiceServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app=app, drain_s=2)
    # The shutdown held back, as uvicorn's tick may: only the signal's own effect is seen by the next request.
    real_shutdown = server.shutdown
    release = threading.Event()

    async def held_shutdown(sockets=None):
        while not release.is_set():
            await asyncio.sleep(0.01)
        await real_shutdown(sockets)

    monkeypatch.setattr(server, "shutdown", held_shutdown)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "uvicorn to start", 30)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            server.handle_exit(signal.SIGTERM, None)  # what the signal calls
            _wait_for(lambda: app.state.worker.stopping, "the worker to be halted", 5)
            r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["regions"]})
            assert r.status_code == 503, r.text
            assert "shutting down and starts no more jobs" in r.json()["detail"]
    finally:
        release.set()
        thread.join(15)
    assert not thread.is_alive()


def test_stopping_the_service_stops_its_worker_at_once_and_a_stalled_upload_only_delays_the_end(
    slides_root, models, monkeypatch
):
    """A Ctrl-C or SIGTERM stops the worker as the shutdown begins, not once every connection has closed: a client
    that stalled mid-upload kept uvicorn waiting for ever while the worker started queued jobs. Connections still
    open after the drain time are closed."""
    from bridge.service import Worker
    from bridge.service.server import ServiceServer

    started = _jobs_run_until_stopped(monkeypatch)
    port = free_port()
    settings = ServiceSettings(port=port, allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"))
    app = create_app(settings, models=models)
    server = ServiceServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app=app, drain_s=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "uvicorn to start", 30)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        body = {"image": str(slides_root / "small.svs"), "outputs": ["regions"]}
        ids = [client.post("/v1/jobs", json=body).json()["job_id"] for _ in range(3)]
    worker: Worker = app.state.worker
    _wait_for(lambda: worker.jobs[ids[0]].state == "running", "the first job to start")
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(
            b"POST /v1/jobs/pixels?mpp=0.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 10
        )
        _wait_for(lambda: server.server_state.tasks, "the upload's request to begin")
        stopped_at = time.monotonic()
        server.should_exit = True  # what uvicorn's handler of SIGINT and SIGTERM does
        _wait_for(lambda: all(worker.jobs[i].state == "cancelled" for i in ids), "the jobs to be cancelled", 5)
        assert server.server_state.connections, "the worker stopped only once the stalled upload's connection closed"
        assert started == [ids[0]]  # no queued job started
        stalled.settimeout(10)
        assert stalled.recv(1024) == b""  # closed by the service after the drain time, unanswered
        thread.join(10)
    assert not thread.is_alive()
    assert 1.5 < time.monotonic() - stopped_at < 8
    assert not worker.thread.is_alive()


# ------------------------------------------------------------------- the stain, in the service's words


def _grey_png(size: int = 512) -> bytes:
    """Tissue of no brightfield stain pdl1-bridge analyses: shades of grey on white (a fluorescence channel)."""
    rgb = np.full((size, size, 3), 245, np.uint8)
    shades = np.random.default_rng(0).integers(30, 200, (size - size // 4, size - size // 4, 1), dtype=np.uint8)
    rgb[size // 8 : -size // 8, size // 8 : -size // 8] = shades
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_an_upload_of_another_stain_is_told_how_a_client_says_the_stain(service):
    # The job's error said "set its image type in QuPath (Image tab: Image type) or pass --stain he|ihc": the
    # service has no --stain, and an upload carries no image type.
    params = {"mpp": 0.5, "outputs": ["regions"]}
    job_id = service.client.post("/v1/jobs/pixels", params=params, content=_grey_png()).json()["job_id"]
    status = service.wait(job_id)
    assert status["state"] == "failed", status
    assert "is not a brightfield H&E or haematoxylin-DAB stain" in status["error"]
    assert "--stain" not in status["error"]
    assert status["error"].endswith(f"say which: {bridge.service.UPLOAD_STAIN_ADVICE}")


def test_an_image_file_of_another_stain_is_told_to_set_its_image_type_in_qupath(service, slides_root):
    (slides_root / "grey.png").write_bytes(_grey_png())
    body = {"image": str(slides_root / "grey.png"), "mpp": 0.5, "outputs": ["regions"]}
    status = service.wait(service.client.post("/v1/jobs", json=body).json()["job_id"])
    assert status["state"] == "failed", status
    assert "--stain" not in status["error"]
    assert status["error"].endswith(f"say which: {bridge.service.PATH_STAIN_ADVICE}")


# ------------------------------------------------------------------- a named pipe in the image's place


def test_a_named_pipe_in_the_images_place_is_refused_not_waited_on(service, slides_root, tmp_path):
    # At submission it was "image not found"; put there while the job waited, opening it blocked the one worker
    # for good (no cancel reaches an open()).
    pipe = slides_root / "pipe.svs"
    os.mkfifo(pipe)
    try:
        r = service.client.post("/v1/jobs", json={"image": str(pipe)})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"{pipe} is not a regular file (a named pipe, socket or device)")

        outcome: list[BaseException | str] = []

        def open_it():
            try:
                with bridge.service.open_allowed(pipe, (slides_root,), mpp=None):
                    outcome.append("opened")
            except BaseException as err:
                outcome.append(err)

        thread = threading.Thread(target=open_it, daemon=True)
        thread.start()
        thread.join(10)
        assert outcome, "opening the pipe blocked"
        assert isinstance(outcome[0], bridge.service.ImagePathError), outcome
        assert str(outcome[0]).startswith(f"{pipe} is not a regular file")
    finally:
        with contextlib.suppress(OSError):  # a reader still blocked in open() is let go
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pipe.unlink()


def _made_multi_file_pipe(folder: Path, case: str) -> tuple[Path, Path]:
    """A multi-file slide under ``folder`` with a named pipe where the service reads one of its files: the
    image to submit and the pipe."""
    if case == "vms-itself":
        pipe = image = folder / "piped.vms"
    elif case == "vms-names-a-pipe":
        image, pipe = folder / "piped.vms", folder / "piped.jpg"
        image.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=piped.jpg\n")
    elif case == "mrxs-slidedat":
        image, pipe = folder / "piped.mrxs", folder / "piped" / "Slidedat.ini"
        image.write_text("")
        pipe.parent.mkdir()
    else:  # a DICOM slide's folder: OpenSlide opens each .dcm in it
        image, pipe = folder / "piped" / "level_0.dcm", folder / "piped" / "level_1.dcm"
        pipe.parent.mkdir()
        image.write_bytes(b"\0" * 128 + b"DICM")
    os.mkfifo(pipe)
    return image, pipe


@pytest.mark.parametrize("case", ["vms-itself", "vms-names-a-pipe", "mrxs-slidedat", "dicom-folder"])
def test_a_named_pipe_among_a_multi_file_slide_s_files_is_refused_not_waited_on(service, tmp_path, case):
    # The check of a .vms, .mrxs or DICOM slide's other files read its index with a blocking open(): a pipe named
    # piped.vms, or a Slidedat.ini that was one, held the request's thread for good, and 40 such requests (their
    # clients long gone) left the service answering nothing, /v1/health included.
    root = tmp_path / "root"
    root.mkdir()
    image, pipe = _made_multi_file_pipe(root, case)
    outcome: list[BaseException | str] = []

    def check_it():
        try:
            bridge.service.check_allowed(image, (root,))
            outcome.append("let by")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=check_it, daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert outcome, "checking the slide's files blocked on the pipe"
        if case == "vms-itself":  # the file named: the submission's own check refuses it
            assert outcome == ["let by"]
        else:
            assert isinstance(outcome[0], bridge.service.ImagePathError), outcome
            assert str(outcome[0]) == (
                f"{image} is read from {pipe} too, which is not a regular file (a named pipe, socket or device); "
                "a slide's files are the regular files its scanner wrote: copy the slide again"
            )
    finally:
        with contextlib.suppress(OSError):  # a reader still blocked in open() is let go
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))


def test_a_multi_file_slide_named_as_a_pipe_is_a_422_at_submission(service, slides_root):
    pipe = slides_root / "pipe.vms"
    os.mkfifo(pipe)
    try:
        r = service.client.post("/v1/jobs", json={"image": str(pipe)}, timeout=10)
        assert r.status_code == 422, r.text
        assert r.json() == {
            "detail": f"{pipe} is not a regular file (a named pipe, socket or device); expected an image file (e.g. "
            "a .svs, .ndpi or .tif): send the path of the image file itself",
            "cannot_open": True,
        }
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pipe.unlink()


def test_a_result_asked_for_while_its_job_is_deleted_says_so(service, slides_root, monkeypatch):
    # A DELETE between the lookup and the read of the result answered 409 "job … is done, not done".
    client = service.client
    job_id = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["regions"]})
    job_id = job_id.json()["job_id"]
    assert service.wait(job_id)["state"] == "done"
    real_get = bridge.service.Worker.get

    def deleted_meanwhile(self, wanted):
        job = real_get(self, wanted)
        self.forget(wanted)
        return job

    monkeypatch.setattr(bridge.service.Worker, "get", deleted_meanwhile)
    r = client.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 404, r.text
    assert r.json() == {
        "detail": f"job {job_id} was deleted (DELETE /v1/jobs/{job_id}) while its result was asked for, and its "
        "result released with it; submit the job again"
    }


def test_a_result_asked_for_as_its_job_finishes_is_not_said_to_be_deleted(service, slides_root, monkeypatch):
    # The worker sets a job's result, then its state "done". The result read first (None: still running) and the
    # state after ("done": finished meanwhile) answered 404 "was deleted"; the job was there, its result too.
    client = service.client
    job_id = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["regions"]})
    job_id = job_id.json()["job_id"]
    assert service.wait(job_id)["state"] == "done"
    real_get = bridge.service.Worker.get

    class FinishesAsItsResultIsRead:
        """The job as the endpoint sees it while the worker finishes it at the first read of its result."""

        def __init__(self, job):
            self._job, self._finished = job, False

        def __getattr__(self, name):
            if name == "state":
                return "done" if self._finished else "running"
            if name == "result":
                was_finished, self._finished = self._finished, True
                return self._job.result if was_finished else None
            return getattr(self._job, name)

    monkeypatch.setattr(
        bridge.service.Worker, "get", lambda self, wanted: FinishesAsItsResultIsRead(real_get(self, wanted))
    )
    r = client.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 409, r.text
    assert r.json() == {
        "detail": f"job {job_id} is running, not done: poll GET /v1/jobs/{job_id} until its state is done, then ask "
        "for its result"
    }


# ------------------------------------------------------------------- 6: an attacker's requests (security review)


def test_a_request_addressed_to_another_name_is_refused_without_a_token(service):
    # DNS rebinding: a page of evil.example whose name then resolves to 127.0.0.1 is the service's own origin to the
    # browser, which sends Host: evil.example. It was answered: it could submit jobs and read their results.
    r = service.client.get("/v1/health", headers={"Host": f"evil.example:{service.port}"})
    assert (r.status_code, r.json()) == (
        403,
        {
            "detail": f"request addressed to 'evil.example:{service.port}' (its Host header); this service listens "
            "on loopback without a token, so it answers only requests addressed to 127.0.0.1, localhost or ::1 (a "
            "web page whose site name was pointed at this machine sends its own name): call the service as "
            "http://127.0.0.1:PORT from QuPath's scripts or a program, or start it with --token"
        },
    )
    for host in (f"127.0.0.1:{service.port}", f"localhost:{service.port}", f"[::1]:{service.port}", "localhost"):
        assert service.client.get("/v1/health", headers={"Host": host}).status_code == 200, host


def test_a_request_from_another_site_s_page_is_refused_without_a_token(service):
    # A page of any site could make a browser on this machine POST an upload (text/plain needs no CORS preflight):
    # the job was queued, and such requests filled the queue.
    waiting = len(service.worker.jobs)
    r = service.client.post(
        "/v1/jobs/pixels",
        params={"mpp": 0.5},
        content=_png(),
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert (r.status_code, r.json()) == (
        403,
        {
            "detail": "request from a web page of 'https://evil.example' (its Origin header); this service listens "
            "on loopback without a token and takes requests from programs on this machine, not from pages of other "
            "sites, which any site could make a browser here send: call the service as http://127.0.0.1:PORT from "
            "QuPath's scripts or a program, or start it with --token"
        },
    )
    assert len(service.worker.jobs) == waiting
    assert service.client.get("/v1/health", headers={"Origin": "null"}).status_code == 403
    # The service's own page (/docs) sends its own origin.
    assert service.client.get("/v1/health", headers={"Origin": f"http://127.0.0.1:{service.port}"}).status_code == 200


def test_with_a_token_other_names_and_pages_are_left_to_the_token(slides_root, models):
    token = "a-long-enough-s3cret"
    settings = ServiceSettings(
        host="0.0.0.0", port=free_port(), token=token, allow_roots=(slides_root,), pipeline=PipelineConfig()
    )
    served = Served(settings, models)
    try:
        headers = {"Host": "slides-server.example", "Origin": "https://other.example"}
        assert served.client.get("/v1/health", headers=headers).status_code == 401
        r = served.client.get("/v1/health", headers={**headers, "Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    finally:
        served.close()


def test_an_upload_in_a_format_other_than_png_tiff_jpeg_or_gif_is_refused(service):
    # Pillow opened any format it knows: an EPS was queued, to be decoded by Ghostscript when its job ran.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=eps)
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "the request body (56 bytes, starting b'%!PS-Ado') is not a PNG or TIFF image; expected the "
            "region's PNG or TIFF bytes (Content-Type: image/png or image/tiff)"
        },
    )


def _tiny_pages(count: int) -> bytes:
    """A TIFF of ``count`` 1x1 8-bit pages, 130 bytes each (a 64 MB body holds half a million)."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for _ in range(count):
            tif.write(np.zeros((1, 1), np.uint8), contiguous=False)
    return buf.getvalue()


def test_an_upload_of_very_many_pages_is_refused_without_walking_them_all(service, monkeypatch):
    # Counting the pages walked every one (Pillow's n_frames): 20 000 of them in 2 MB kept the service from
    # answering anyone for 6 s, 64 MB for minutes.
    content = _tiny_pages(1000)
    r = service.client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content)
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "the uploaded image has more than 64 pages or frames, more than a region and its "
            "reduced-resolution levels hold; send one region as a single-page PNG or TIFF (one upload per region)"
        },
    )
    from PIL import TiffImagePlugin

    walked = []
    seek = TiffImagePlugin.TiffImageFile.seek
    monkeypatch.setattr(
        TiffImagePlugin.TiffImageFile, "seek", lambda im, frame: walked.append(frame) or seek(im, frame)
    )
    monkeypatch.setattr(
        TiffImagePlugin.TiffImageFile, "n_frames", property(lambda im: pytest.fail("n_frames walks every page"))
    )
    with pytest.raises(bridge.service.uploads.SlideFormatError, match="more than 64 pages"):
        bridge.service.check_upload(content, mpp=0.5, max_px=2**26)
    assert max(walked) <= 64


def test_an_upload_s_header_is_read_while_the_service_answers_others(service, monkeypatch):
    # check_upload ran on the event loop: while it read a header no other request was answered.
    reading, release = threading.Event(), threading.Event()

    def slow_check(*args, **kwargs):
        reading.set()
        release.wait(30)

    monkeypatch.setattr(bridge.service.app, "check_upload", slow_check)
    answers: list[httpx.Response] = []
    upload = threading.Thread(
        target=lambda: answers.append(
            service.client.post("/v1/jobs/pixels", params={"mpp": 0.5, "outputs": ["regions"]}, content=_png())
        )
    )
    upload.start()
    try:
        assert reading.wait(30)
        with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=5) as other:
            assert other.get("/v1/health").status_code == 200
    finally:
        release.set()
        upload.join(60)
    # Its job over before the next test holds the worker (held_worker): one that had not yet reached the analysis
    # was held there instead, and the next test's job waited 60 s behind it.
    service.wait(answers[0].json()["job_id"])


def test_a_cancelled_queued_job_lets_go_of_its_roi(service, slides_root, held_worker):
    # A cancelled job no longer counts against --max-queued but kept its ROI (a 36 MB GeoJSON is 2 million
    # vertices) until its turn came: submitted and cancelled over and over while a long job ran, they piled up.
    client = service.client
    running = client.post("/v1/jobs/pixels", params={"mpp": 0.5, "outputs": ["regions"]}, content=_png()).json()
    _wait_for(lambda: client.get(f"/v1/jobs/{running['job_id']}").json()["state"] == "running", "a job to start")
    roi = {"type": "Polygon", "coordinates": [[[0, 0], [500, 0], [500, 500], [0, 500], [0, 0]]]}
    queued = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi, "outputs": ["regions"]})
    job_id = queued.json()["job_id"]
    assert service.worker.jobs[job_id].roi is not None
    assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelling"
    assert service.worker.jobs[job_id].roi is None
    held_worker.set()
    assert service.wait(job_id)["state"] == "cancelled"
    assert service.wait(running["job_id"])["state"] == "done"


def test_a_file_swapped_as_it_is_opened_is_not_named_in_the_error(slides_root, tmp_path, monkeypatch):
    # Swapped between the check and the open (a folder on its path replaced by a symlink), the file opened lay
    # outside the roots, and the job's error named where: a path outside the roots, told to the client.
    inside = slides_root / "swapped"
    inside.mkdir()
    (inside / "case.svs").write_bytes((slides_root / "small.svs").read_bytes())
    secret = tmp_path / "private-outside"
    secret.mkdir()
    (secret / "case.svs").write_bytes((slides_root / "small.svs").read_bytes())
    real_open = os.open

    def swapping_open(path, flags, *args):
        if str(path).startswith(str(inside)) and not inside.is_symlink():
            inside.rename(slides_root / "swapped-old")
            inside.symlink_to(secret)
        return real_open(path, flags, *args)

    monkeypatch.setattr(bridge.service.paths.os, "open", swapping_open)
    try:
        with (
            pytest.raises(bridge.service.PathNotAllowedError) as caught,
            bridge.service.open_allowed(inside / "case.svs", (slides_root,), mpp=None, shown="/as/sent/case.svs"),
        ):
            pass
    finally:
        monkeypatch.undo()
        inside.unlink(missing_ok=True)
    assert str(caught.value) == (
        "/as/sent/case.svs changed while it was being opened (a file or folder on its path was replaced); only "
        "files under the --allow-root folders are opened: submit the job again"
    )


@pytest.mark.parametrize(("mode", "who"), [(0o604, "others"), (0o640, "its group"), (0o644, "its group and others")])
def test_a_token_file_others_may_read_is_warned_of(started, tmp_path, mode, who):
    # Whoever reads the token can use the service, on loopback too; the file was read whatever its mode.
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-file\n")
    token_file.chmod(mode)
    result, output = _serve(["--allow-root", str(tmp_path), "--host", "0.0.0.0", "--token-file", str(token_file)])
    assert result.exit_code == 0, output
    assert (
        f"warning: --token-file {token_file} may be read or changed by {who} (mode {mode:04o}), and whoever reads it "
        f"can use the service: chmod 600 {token_file}"
    ) in output
    token_file.chmod(0o600)
    result, output = _serve(["--allow-root", str(tmp_path), "--host", "0.0.0.0", "--token-file", str(token_file)])
    assert result.exit_code == 0 and "warning" not in output


# ------------------------------------------------------------------- 7: the second security review


def _qupath_roi_body(vertices: int, *, image: str = "/data/slide.svs") -> bytes:
    """A job request as pdl1_analyze.groovy sends it (Gson: no spaces), its ROI a tissue outline of ``vertices``
    full-precision vertices, the longest QuPath writes (brush strokes, simplified shapes)."""
    rng = np.random.default_rng(3)
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    radius = 30_000 * (1 + 0.05 * rng.random(vertices))
    ring = [[50_000 + r * np.cos(a), 40_000 + r * np.sin(a)] for r, a in zip(radius, angles, strict=True)]
    roi = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
    return json.dumps({"image": image, "roi": roi, "image_size_px": [100_000, 80_000]}, separators=(",", ":")).encode()


def test_the_json_limits_leave_room_for_a_whole_slide_outline_of_qupath_s(slides_root):
    # A whole-slide tissue outline has tens of thousands of vertices: 100 000 fit twice in the bytes, 2.5 times in
    # the vertices; the 2-million-vertex ROI of the review (36 MB, 9.4 s without an answer to anyone) is over both.
    from bridge.service.guards import BodyLimits, json_values_at_most
    from bridge.service.settings import MAX_JSON_BYTES, MAX_ROI_VERTICES

    body = _qupath_roi_body(100_000)
    limits = BodyLimits(upload_bytes=64 * 2**20, json_bytes=MAX_JSON_BYTES, roi_vertices=MAX_ROI_VERTICES)
    assert 3.5 * 2**20 < len(body) <= limits.json_bytes / 2
    assert json_values_at_most(body) <= limits.json_values / 2.5
    assert limits.json_bytes < 36_000_000 and limits.json_values < 3 * 2_000_000


@pytest.fixture(scope="module")
def json_limited(slides_root, models):
    settings = ServiceSettings(
        port=free_port(),
        allow_roots=(slides_root,),
        pipeline=PipelineConfig(device="cpu"),
        max_request_bytes=2**20,
        max_json_bytes=2**16,
        max_roi_vertices=1000,
    )
    served = Served(settings, models)
    yield served
    served.close()


SIMPLIFY = (
    "an ROI that detailed should be simplified in QuPath before it is analysed (select the annotation, then "
    "Objects > Annotations > Simplify shape) and the script run again"
)


@pytest.mark.parametrize("streamed", [False, True], ids=["stated", "streamed"])
def test_a_json_body_over_its_limit_is_refused_before_it_is_parsed(json_limited, streamed):
    # FastAPI parses a job's JSON on the event loop: up to the upload's 64 MB, a 36 MB ROI held every other request
    # 9.4 s. Now a JSON body has its own limit, in bytes and in values, both checked before it is parsed.
    client = json_limited.client
    padded = b'{"image": "/x.svs"' + b" " * 70_000 + b"}"  # over 64 KiB, under the upload's 1 MiB
    dense = json.dumps({"image": "/x.svs", "roi": {"type": "Polygon", "coordinates": [[[1, 2]] * 2000]}}).encode()
    assert len(dense) < 2**16

    def halves(body: bytes):  # no Content-Length: the limits must hold while reading
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    def sent(body: bytes):
        return halves(body) if streamed else body

    r = client.post("/v1/jobs", content=sent(padded), headers={"Content-Type": "application/json"})
    size = "more than 65536" if streamed else str(len(padded))
    assert (r.status_code, r.json()) == (
        413,
        {
            "detail": f"JSON request body of {size} bytes is over the limit of 65536 (0.0625 MiB), room for an ROI "
            f"of about 2,000 vertices as QuPath sends them; {SIMPLIFY}"
        },
    )
    r = client.post("/v1/jobs", content=sent(dense), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (
        413,
        {
            "detail": "JSON request body holds more than 3,200 values (numbers, strings, arrays, objects), room for "
            f"an ROI of about 1,000 vertices (each [x, y] is three); {SIMPLIFY}"
        },
    )
    assert client.get("/v1/health").status_code == 200


def test_a_json_body_within_its_limits_and_an_upload_over_them_are_not_refused_for_size(json_limited):
    client = json_limited.client
    body = _qupath_roi_body(1000 - 1, image="/etc/passwd")  # 1000 with the first repeated last
    assert 2**15 < len(body) < 2**16
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 403 and "outside the folders" in r.json()["detail"]  # parsed and checked
    upload = np.random.default_rng(0).bytes(100_000)  # over the JSON limit: an upload has its own
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=upload)
    assert r.status_code == 422 and "is not a PNG or TIFF image" in r.json()["detail"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "slides-server.example"])
def test_a_short_token_on_a_public_address_is_refused(tmp_path, host):
    with pytest.raises(ValueError) as caught:
        ServiceSettings(host=host, token="fifteen-chars-x", allow_roots=(tmp_path,))
    assert str(caught.value) == (
        f"the token has 15 characters; binding {host} lets anyone who can reach the port guess at it, so it needs "
        'at least 16: make one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`, give it through '
        "PDL1_TOKEN or --token-file (and to the QuPath scripts as service.token in pdl1-config.toml), or keep the "
        "default --host 127.0.0.1"
    )
    ServiceSettings(host=host, token="sixteen-chars-xx", allow_roots=(tmp_path,))
    ServiceSettings(host="127.0.0.1", token="short", allow_roots=(tmp_path,))  # loopback: a token is optional


def test_pdl1_serve_refuses_a_short_token_on_a_public_address_without_showing_it(started, tmp_path):
    result, output = _serve(["--allow-root", str(tmp_path), "--host", "0.0.0.0"], env={"PDL1_TOKEN": "s3cret"})
    assert result.exit_code == 2, output
    assert "the token has 6 characters" in output and "secrets.token_urlsafe(32)" in output
    assert "s3cret" not in output and "settings" not in started


def test_a_job_s_status_names_its_image_as_sent_not_where_a_symlink_leads(service, slides_root):
    # The resolved path told a client where a symlinked folder really lies.
    link = slides_root / "linked"
    link.symlink_to(slides_root, target_is_directory=True)
    try:
        for sent in (str(link / "small.svs"), (link / "small.svs").as_uri()):
            r = service.client.post("/v1/jobs", json={"image": sent, "outputs": ["regions"]})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert service.client.get(f"/v1/jobs/{job_id}").json()["image"] == str(link / "small.svs")
            service.client.delete(f"/v1/jobs/{job_id}")
            assert service.wait(job_id)["image"] == str(link / "small.svs")
    finally:
        link.unlink()
