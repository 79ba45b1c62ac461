"""Large job requests and result pages are parsed, validated and encoded off the event loop, in short steps,
with the answers they had on it. How long the loop is held is measured by ``python -m benchmarks service_loop``."""

import asyncio
import gc
import json
import threading

import pytest
from starlette.responses import JSONResponse

import bridge.service.app as service_app
from bridge.service import ServiceSettings, bodies, json_text, schemas
from bridge.service.json_text import collector_paused, dumps_in_steps, loads_in_steps
from inference.pipeline import Models, PipelineConfig
from tests.service_helpers import free_port, served, small_phantom_root, wait_for_job


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _outcome(loads, document: bytes) -> tuple:
    try:
        return ("value", repr(loads(document)))  # repr: NaN is not equal to itself
    except Exception as err:  # the error itself is compared
        return (type(err), str(err), getattr(err, "pos", None))


DOCUMENTS = [
    b"{}",
    b" [ ] ",
    b'{"a": [1, 2.5, -3e2, true, false, null, "x]y", "\\u00b5\\n"], "b": {}, "c": [[]]}',
    b'{"a": 1, "a": 2, "b": [1]}',
    b"[NaN, Infinity, -Infinity, 123456789012345678901234567890, 1.0000000000000002]",
    b'"text"',
    '{"µm": "Über [1, 2]"}'.encode(),
    '{"a": [[0, 1]]}'.encode("utf-16"),
    b'\xef\xbb\xbf{"a": [[0, 1]]}',
    b"[" + b",".join(b"1" for _ in range(400)) + b"]",  # a flat array too long for one step
    b"[" * 600 + b"]" * 600,  # deeper than the steps recurse, not than json.loads does
    b"[" * 5000 + b"]" * 5000,  # deeper than json.loads recurses: its RecursionError
    b"",
    b"  ",
    b"[1,]",
    b"[[0, 0], [1 0]]",
    b'{"a": [[0, 0], [1, 0]], "b": [[1, 2] [3, 4]]}',
    b'{"a" 1}',
    b'{"a": 1,}',
    b"{a: 1}",
    b"{'a': 1}",
    b"[1] x",
    b'"abc',
    b'{"a": [1, 2}',
    b"[-]",
    b"[tru]",
    b"\xef\xbb\xbf\xef\xbb\xbf{}",
    b'{"a": "\xff"}',
]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_loads_in_steps_gives_what_json_loads_gives(document):
    assert _outcome(loads_in_steps, document) == _outcome(json.loads, document)


def test_a_long_ring_is_parsed_a_vertex_per_c_call(monkeypatch):
    spans: list[int] = []
    c_make_scanner = json_text.c_make_scanner

    def recording(context):
        scan = c_make_scanner(context)

        def scan_once(text, idx):
            value, end = scan(text, idx)
            spans.append(end - idx)
            return value, end

        return scan_once

    monkeypatch.setattr(json_text, "c_make_scanner", recording)
    ring = [[i * 1.25, i * 2.5] for i in range(10_000)]
    document = json.dumps({"image": "/a.svs", "roi": {"type": "Polygon", "coordinates": [ring]}}).encode()
    assert loads_in_steps(document) == json.loads(document)
    assert len(spans) > 10_000 and max(spans) < 40  # not the ring in one call


@pytest.mark.parametrize(
    "content",
    [
        {"type": "FeatureCollection", "features": [], "pdl1": {"total": 0, "next_offset": None}},
        {"features": [{"id": i, "name": "Tumor: Positive µ", "xy": [i / 3, -i]} for i in range(7)], "n": 7},
    ],
)
@pytest.mark.parametrize("step", [1, 3, 100])
def test_dumps_in_steps_gives_json_response_s_bytes(content, step):
    items = content["features"]
    steps = [items[i : i + step] for i in range(0, len(items), step)] + [[]]
    assert dumps_in_steps({**content, "features": iter(steps)}, chunked="features") == JSONResponse(content).body


def test_dumps_in_steps_refuses_nan_as_json_response_does():
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        dumps_in_steps({"features": [[{"x": float("nan")}]]}, chunked="features")


def test_the_collector_is_back_once_every_pause_has_ended():
    assert gc.isenabled()
    first, second = collector_paused(), collector_paused()
    first.__enter__()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (second.__enter__(), done.wait(), second.__exit__(None, None, None)))
    worker.start()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the other thread's pause still runs
    done.set()
    worker.join()
    assert gc.isenabled()


def test_a_collector_switched_off_before_stays_off():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# ------------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def slides_root(tmp_path_factory):
    return small_phantom_root(tmp_path_factory.mktemp("allowed"))


@pytest.fixture(scope="module")
def client(slides_root):
    settings = ServiceSettings(port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"))
    with served(settings, Models(PipelineConfig(device="cpu"))) as c:
        yield c


def _recorded(where: list[tuple[str, bool]], fn):
    def wrapper(*args, **kwargs):
        where.append((fn.__name__, _on_event_loop()))
        return fn(*args, **kwargs)

    return wrapper


def test_a_job_request_is_parsed_and_validated_off_the_event_loop(client, slides_root, monkeypatch):
    where: list[tuple[str, bool]] = []
    monkeypatch.setattr(bodies, "loads_in_steps", _recorded(where, bodies.loads_in_steps))
    monkeypatch.setattr(schemas, "scan_coordinates", _recorded(where, schemas.scan_coordinates))  # roi's validator
    roi = {"type": "Polygon", "coordinates": [[[20, 20], [30, 20], [30, 30], [20, 20]]]}
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi, "image_size_px": [10, 10]})
    assert r.status_code == 422, r.text  # outside the image: refused before anything is queued
    assert where == [("loads_in_steps", False), ("scan_coordinates", False)]
    assert gc.isenabled()


def test_a_large_roi_refused_by_validation_is_answered_as_on_the_loop(client, slides_root):
    ring = [[i + 0.5, (i % 7) + 0.25] for i in range(50_000)]
    ring[25_000][1] = float("nan")
    body = json.dumps({"image": str(slides_root / "small.svs"), "roi": {"type": "Polygon", "coordinates": [ring]}})
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: body.roi: roi coordinates must be finite numbers, got NaN; send the "
            "ROI's vertices in level-0 px"
        },
    )
    assert gc.isenabled()


def _without_ids(page: dict) -> dict:
    """A result page without its features' ids, which are new uuid4s each time a page is made."""
    return {**page, "features": [{k: v for k, v in f.items() if k != "id"} for f in page["features"]]}


def test_a_result_page_built_in_steps_is_the_page_built_at_once(client, slides_root, monkeypatch):
    job = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "mpp": 0.5}).json()["job_id"]
    assert wait_for_job(client, job)["state"] == "done"
    result = f"/v1/jobs/{job}/result"
    monkeypatch.setattr(service_app, "FEATURES_PER_STEP", 10**9)
    whole = _without_ids(client.get(result).json())
    features = whole["features"]
    assert len(features) > 30  # several steps of 7
    monkeypatch.setattr(service_app, "FEATURES_PER_STEP", 7)
    assert _without_ids(client.get(result).json()) == whole
    page = _without_ids(client.get(result, params={"offset": 5, "limit": 23}).json())
    assert page["features"] == features[5:28] and page["pdl1"] == {**whole["pdl1"], "offset": 5, "next_offset": 28}
    last = _without_ids(client.get(result, params={"offset": len(features) - 3}).json())
    assert last["features"] == features[-3:] and last["pdl1"]["next_offset"] is None
    past = client.get(result, params={"offset": len(features) + 10}).json()
    assert past["features"] == [] and past["pdl1"]["total"] == len(features)
    assert gc.isenabled()
