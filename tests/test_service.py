"""The service end to end through a real uvicorn on loopback."""

import io
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bridge.qupath_geojson import validate_feature
from bridge.service import ServiceSettings
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig
from tests.service_helpers import free_port, served, wait_for_job

SCRIPTS = Path(__file__).resolve().parents[1] / "qupath_scripts"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def slides_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    write_phantom(root / "small.svs", PhantomSpec(1024, 1024, seed=41, tps_percent=50))
    write_phantom(root / "big.svs", PhantomSpec(4096, 4096, seed=42, tps_percent=30))
    return root


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


@pytest.fixture(scope="module")
def service(slides_root, models):
    settings = ServiceSettings(
        port=free_port(),
        allow_roots=(slides_root,),
        pipeline=PipelineConfig(device="cpu"),
        max_request_bytes=4 * 2**20,
        max_json_bytes=4 * 2**20,
    )
    with served(settings, models) as client:
        yield client


def test_health_and_models(service):
    from inference import demo_model_dir, read_manifest

    health = service.get("/v1/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert [(m["task"], m["stain"]) for m in health["models"]] == [
        ("segmentation", "H&E"),
        ("nuclei", "H&E"),
        ("nuclei", "H-DAB"),  # the PD-L1 IHC model, listed before its first job loads it
    ]
    ihc = read_manifest(demo_model_dir("nuclei-ihc"))
    assert health["models"][2] == {
        "task": "nuclei",
        "name": ihc.name,
        "version": ihc.version,
        "sha256": ihc.checksum,
        "members": len(ihc.members),
        "input_mpp": ihc.input_mpp,
        "tile_size_px": ihc.tile_size_px,  # how far its tiles see: the context a pixel upload carries
        "stain": "H-DAB",
    }
    assert service.get("/v1/models").json() == health["models"]


def test_submit_poll_result_is_valid_qupath_geojson(service, slides_root):
    roi = {"type": "Polygon", "coordinates": [[[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]]}
    r = service.post("/v1/jobs", json={"image": (slides_root / "small.svs").as_uri(), "roi": roi, "mpp": 0.5})
    assert r.status_code == 202
    accepted = r.json()
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    status = wait_for_job(service, accepted["job_id"])
    assert status["state"] == "done" and status["progress"] == 1.0 and status["tiles_total"] > 0
    result = service.get(accepted["result_url"]).json()
    assert result["type"] == "FeatureCollection" and result["features"]
    for feature in result["features"]:
        validate_feature(feature)
    meta = result["pdl1"]
    assert meta["total"] == len(result["features"]) and meta["next_offset"] is None
    assert "PD-L1: Predicted TPS % (H&E)" in meta["parent_measurements"]
    assert "PD-L1: TPS %" not in meta["parent_measurements"]  # the measured score is an immunostain's
    assert meta["metadata"]["PD-L1 run"] == meta["run_id"]
    # The counts the metadata's TPS comes from, for the script to merge several annotations' as pdl1 run does.
    counts = meta["metadata_counts"]
    assert set(counts) == {"tumour_positive", "tumour_negative"} and sum(counts.values()) > 0
    points = [f["geometry"]["coordinates"] for f in result["features"] if f["geometry"]["type"] == "Point"]
    assert points and all(100 <= x <= 900 and 100 <= y <= 900 for x, y in points)
    # Paging: pages that cut across regions, candidates, tiles and nuclei hold the same
    # features, in the same order, as one page (ids are fresh uuids per request).
    kinds = [f["properties"]["objectType"] for f in result["features"]]
    assert {"annotation", "tile", "detection"} <= set(kinds)
    pages, offset = [], 0
    while offset is not None:
        page = service.get(accepted["result_url"], params={"offset": offset, "limit": 7}).json()
        assert page["pdl1"]["total"] == meta["total"] and len(page["features"]) <= 7
        pages += page["features"]
        offset = page["pdl1"]["next_offset"]

    def without_id(features):
        return [{k: v for k, v in f.items() if k != "id"} for f in features]

    assert without_id(pages) == without_id(result["features"])
    beyond = service.get(accepted["result_url"], params={"offset": meta["total"] + 10}).json()
    assert beyond["features"] == [] and beyond["pdl1"]["next_offset"] is None


def test_outputs_select_what_comes_back(service, slides_root):
    r = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["uncertainty_tiles"]})
    job_id = r.json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    kinds = {f["properties"]["objectType"] for f in service.get(f"/v1/jobs/{job_id}/result").json()["features"]}
    assert kinds == {"tile"}


def test_cancel_stops_a_running_job(service, slides_root):
    job_id = service.post("/v1/jobs", json={"image": str(slides_root / "big.svs")}).json()["job_id"]
    deadline = time.time() + 60
    while service.get(f"/v1/jobs/{job_id}").json()["state"] == "queued" and time.time() < deadline:
        time.sleep(0.05)
    assert service.delete(f"/v1/jobs/{job_id}").json()["state"] in ("cancelling", "cancelled")
    assert wait_for_job(service, job_id)["state"] == "cancelled"
    r = service.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"image": "/etc/passwd"}, 403, "outside the folders"),
        ({"image": "{root}/missing.svs"}, 404, "image not found"),
        (
            {"image": "{root}/small.svs", "roi": {"type": "Point", "coordinates": [1, 2]}},
            422,
            "Polygon or MultiPolygon",
        ),
        ({"image": "{root}/small.svs", "outputs": ["everything"]}, 422, "outputs"),
        ({"image": "{root}/small.svs", "mpp": -1}, 422, "mpp"),
        ({"roi": None}, 422, "image"),
        ({"image": "{root}/small.svs", "model": "other"}, 409, "unknown model"),
    ],
)
def test_bad_requests_say_what_is_wrong(service, slides_root, body, status, match):
    body = {k: v.replace("{root}", str(slides_root)) if isinstance(v, str) else v for k, v in body.items()}
    r = service.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert re.search(match, r.json()["detail"])


def test_invalid_roi_is_refused_at_submission(service, slides_root):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [500, 500], [500, 0], [0, 500], [0, 0]]]}
    r = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": bowtie})
    assert r.status_code == 422 and "not a valid Polygon (Self-intersection at (250, 250))" in r.json()["detail"]


def test_an_image_qupath_shows_at_another_size_is_refused_not_misplaced(service, slides_root):
    # Refused at submission, saying the service cannot open it as QuPath shows it (another series of a multi-image
    # file): pdl1_analyze.groovy then sends the pixels; it was a failed job after the queue.
    small = str(slides_root / "small.svs")
    r = service.post("/v1/jobs", json={"image": small, "image_size_px": [1024, 512]})
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": f"{small}: QuPath shows this image at 1024 x 512 px, but the file opens here at 1024 x 1024 px, "
        "so results would not line up: QuPath shows another series or scene of a multi-image file (the service "
        "reads a file's first image), or the file is not the one QuPath opened (point the entry at the right file "
        "with File > Project... > Check project URIs). pdl1_analyze.groovy then sends the region's pixels "
        "(POST /v1/jobs/pixels)",
        "cannot_open": True,
    }
    ok = service.post("/v1/jobs", json={"image": small, "image_size_px": [1024, 1024], "outputs": ["regions"]})
    assert wait_for_job(service, ok.json()["job_id"])["state"] == "done"
    r = service.post("/v1/jobs", json={"image": small, "image_size_px": [0, 5]})
    assert r.status_code == 422 and "image_size_px" in r.json()["detail"]


def test_a_pixel_size_the_models_cannot_use_fails_the_job_without_filling_memory(service, slides_root, caplog):
    # mpp 50 on a 400 x 400 px ROI once grew the server to 23.6 GB (the whole image enlarged for tissue).
    roi = {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]]}
    body = {"image": str(slides_root / "small.svs"), "roi": roi, "mpp": 50}
    with caplog.at_level("WARNING", logger="bridge.service"):
        job_id = service.post("/v1/jobs", json=body).json()["job_id"]
        status = wait_for_job(service, job_id, timeout=30)
    assert status["state"] == "failed"
    # Bad input, not a bug: one line in the log, no traceback.
    [record] = [r for r in caplog.records if job_id in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "its pixels are 50 µm (from the request's mpp), but the segmentation model reads 2 µm/px" in status["error"]


def test_an_immunostain_job_returns_the_cells_its_tps_counts_whatever_its_outputs(service, slides_root):
    # A project config with outputs = ["regions", "sua"] (no nuclei, for fast H&E runs) once gave an IHC's parent
    # its cell counts and TPS but sent none of the cells, which pdl1_analyze.groovy had removed from the last run.
    body = {"image": str(slides_root / "small.svs"), "image_type": "BRIGHTFIELD_H_DAB", "outputs": ["regions"]}
    job_id = service.post("/v1/jobs", json=body).json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    result = service.get(f"/v1/jobs/{job_id}/result").json()
    parent = result["pdl1"]["parent_measurements"]
    counted = ("Tumor: Positive", "Tumor: Negative", "Immune cells: PD-L1 positive", "Immune cells: PD-L1 negative")
    cells = sum(parent[f"PD-L1: Num {name}"] for name in (*counted, "Other"))
    assert cells > 0 and result["pdl1"]["total"] == cells == len(result["features"])
    assert all(f["properties"]["objectType"] == "detection" for f in result["features"])


def test_a_pixel_size_sent_unlike_the_files_is_a_review_reason(service, slides_root):
    # A 0.5 µm/px file sent with mpp 2.0 (QuPath's calibration, set wrong) found 8 times the tumour cells, TPS 22.9 %
    # for 40, without a word (helper-166 on a live service).
    small = str(slides_root / "small.svs")
    job_id = service.post("/v1/jobs", json={"image": small, "mpp": 1.0, "outputs": ["regions"]}).json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    pdl1 = service.get(f"/v1/jobs/{job_id}/result").json()["pdl1"]
    (said,) = [r for r in pdl1["review_reasons"] if r["reason"].startswith("pixel size: ")]
    assert said["reason"].startswith("pixel size: the request's mpp says 1 µm/px, the file says 0.5")
    assert any(a.startswith("pixel size unlike the file's: ") for a in pdl1["review_advice"])


def test_an_image_qupath_types_as_an_immunostain_is_scored_by_the_ihc_model_and_flagged_when_its_colour_disagrees(
    service, slides_root
):
    small = str(slides_root / "small.svs")  # an H&E phantom that QuPath says is an immunostain
    body = {"image": small, "image_type": "BRIGHTFIELD_H_DAB", "outputs": ["nuclei"]}
    job_id = service.post("/v1/jobs", json=body).json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    pdl1 = service.get(f"/v1/jobs/{job_id}/result").json()["pdl1"]
    assert pdl1["stain"] == "H-DAB" and "PD-L1: CPS" in pdl1["parent_measurements"]
    reasons = [r["reason"] for r in pdl1["review_reasons"]]
    assert "stain: QuPath's image type BRIGHTFIELD_H_DAB says H-DAB, the colour says H&E" in reasons
    # and what to check, the stain first, as pdl1 run says it (pdl1_analyze.groovy prints it)
    # in the words of a QuPath user, who has no --stain (it said "check the image type in QuPath (Image tab) or
    # --stain")
    assert pdl1["review_advice"][0] == (
        "stated stain contradicted by the colour: check the stain stated against the slide: a model run on the wrong "
        "stain gives meaningless numbers; if it is wrong: set its image type in QuPath (Image tab: Image type) and run "
        "pdl1_analyze.groovy again"
    )
    assert pdl1["parent_measurements"]["PD-L1: Uncertainty flag"] == 1.0
    # An image of no stain pdl1-bridge knows is refused at submission, naming what it analyses.
    for image_type in ("FLUORESCENCE", "BRIGHTFIELD_OTHER", "OTHER"):
        r = service.post("/v1/jobs", json={"image": small, "image_type": image_type})
        assert r.status_code == 422, r.text
        assert r.json() == {
            "detail": f"image_type {image_type}: pdl1-bridge analyses brightfield H&E (BRIGHTFIELD_H_E: the "
            "segmentation ensemble and a predicted TPS) and PD-L1 IHC (BRIGHTFIELD_H_DAB: TPS and CPS from its "
            "cells), nothing else. If the image is one of those, set its image type in QuPath (Image tab: Image "
            "type) and run the script again"
        }
    body = {"image": small, "image_type": "BRIGHTFIELD_H_E", "outputs": ["regions"]}
    assert wait_for_job(service, service.post("/v1/jobs", json=body).json()["job_id"])["state"] == "done"
    r = service.post("/v1/jobs", json={"image": small, "image_type": "H&E"})
    assert r.status_code == 422 and "image_type" in r.json()["detail"]


def test_symlink_out_of_the_allowed_root_is_refused(service, slides_root, tmp_path):
    outside = tmp_path / "outside.svs"
    outside.write_bytes((slides_root / "small.svs").read_bytes())
    link = slides_root / "link.svs"
    link.symlink_to(outside)
    try:
        r = service.post("/v1/jobs", json={"image": str(link)})
        assert r.status_code == 403
    finally:
        link.unlink()


def test_a_multi_file_slide_whose_other_files_lie_outside_the_allowed_root_is_refused(service, slides_root, tmp_path):
    # Only the file named was checked: a .vms under the root naming ../outside/secret.jpg had that file analysed.
    (tmp_path / "secret.jpg").write_bytes(b"not for this service")
    made = []
    try:
        vms = slides_root / "case.vms"
        vms.write_text(f"[Virtual Microscope Specimen]\nNoLayers=1\nImageFile={tmp_path / 'secret.jpg'}\n")
        mrxs, folder = slides_root / "case.mrxs", slides_root / "case"
        mrxs.write_text("")
        folder.mkdir()
        (folder / "Slidedat.ini").write_text("[DATAFILE]\nFILE_COUNT=1\nFILE_0=../../outside/Data0000.dat\n")
        linked = slides_root / "linked.mrxs"
        linked.write_text("")
        (slides_root / "linked").symlink_to(tmp_path)  # the data folder itself a link out
        made = [vms, mrxs, folder / "Slidedat.ini", folder, linked, slides_root / "linked"]
        for image, named in ((vms, "secret.jpg"), (mrxs, "Data0000.dat"), (linked, "linked")):
            r = service.post("/v1/jobs", json={"image": str(image)})
            assert r.status_code == 403, (image, r.text)
            assert named in r.json()["detail"] and "keep a slide's files together" in r.json()["detail"]
        vms.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=case.jpg\n")  # its own folder: let by
        r = service.post("/v1/jobs", json={"image": str(vms)})
        assert r.status_code != 403, r.text
    finally:
        for path in made:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                path.rmdir()


def test_unknown_job_and_result_before_done(service):
    assert service.get("/v1/jobs/nope").status_code == 404
    assert "no job" in service.get("/v1/jobs/nope/result").json()["detail"]


def test_request_size_limit(service):
    r = service.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=b"0" * (5 * 2**20))
    assert r.status_code == 413

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(5):
            yield b"0" * 2**20

    r = service.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=chunked())
    assert r.status_code == 413


def test_a_streamed_json_body_over_the_limit_is_refused(service):
    def chunked():
        for _ in range(5):
            yield b" " * 2**20

    r = service.post("/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert service.get("/v1/health").status_code == 200


def test_pixel_upload_maps_back_to_level0(service, slides_root):
    from inference.slides.slide import open_slide

    with open_slide(slides_root / "small.svs") as slide:
        rgb = slide.read_region((200, 300), 0, (512, 512))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    r = service.post(
        "/v1/jobs/pixels",
        params={"mpp": 0.5, "origin_x": 200, "origin_y": 300, "outputs": ["nuclei"]},
        content=buf.getvalue(),
    )
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    features = service.get(f"/v1/jobs/{job_id}/result").json()["features"]
    points = np.array([f["geometry"]["coordinates"] for f in features])
    assert len(points) and points[:, 0].min() >= 200 and points[:, 1].min() >= 300 and points.max() <= 812


def _class_name(feature: dict) -> str | None:
    cls = feature["properties"].get("classification")
    return None if cls is None else cls.get("name") or ": ".join(cls["names"])


def _record_agrees_with_pages(record: dict, features: list[dict]) -> None:
    """The record holds what the result pages put into QuPath: their FN candidates, positive regions' bounds and
    nuclei (to the record's 0.1 px)."""
    from shapely.geometry import shape

    by_class = {}
    for f in features:
        by_class.setdefault(_class_name(f), []).append(f)

    def bounds(geometries) -> np.ndarray:
        return np.array([shape(g).bounds for g in geometries], float).reshape(-1, 4)

    candidates = [f["geometry"] for f in by_class.get("PD-L1 FN candidate", [])]
    np.testing.assert_allclose(bounds(record["candidates"]), bounds(candidates), atol=0.05)
    regions = [f["geometry"] for f in by_class.get("PD-L1 positive", [])]
    np.testing.assert_allclose(np.array(record["region_bounds"], float).reshape(-1, 4), bounds(regions), atol=0.05)
    points = [f for f in features if f["geometry"]["type"] == "Point"]
    nuclei = record["nuclei"]
    assert len(nuclei["x"]) == len(points) > 0
    xy = np.array([p["geometry"]["coordinates"] for p in points])
    np.testing.assert_allclose(np.c_[nuclei["x"], nuclei["y"]], xy, atol=0.05 + 1e-9)
    assert [nuclei["class_names"][i] for i in nuclei["class"]] == [_class_name(p) for p in points]


def test_a_job_s_record_says_what_its_pages_put_into_qupath_where_qupath_shows_it(service, slides_root):
    # pdl1_analyze.groovy saves the record beside the project for `pdl1 train --from-review`: the analysed area,
    # the candidates, the regions and the nuclei, in level-0 px, and when.
    from datetime import datetime, timedelta, timezone

    from shapely.geometry import Polygon, shape

    outline = Polygon([(100, 100), (900, 150), (850, 900), (120, 800)])
    roi = {"type": "Polygon", "coordinates": [list(map(list, outline.exterior.coords))]}
    job_id = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi, "mpp": 0.5}).json()[
        "job_id"
    ]
    assert service.get(f"/v1/jobs/{job_id}/record").status_code in (200, 409)  # 409 while it runs
    assert wait_for_job(service, job_id)["state"] == "done"
    before = datetime.now(timezone.utc)
    record = service.get(f"/v1/jobs/{job_id}/record").json()
    assert (record["format"], record["version"]) == ("pdl1-bridge analysis record", 1)
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(record["written_at"]) <= datetime.now(timezone.utc)
    assert shape(record["outline"]).equals(outline)
    assert record["run_id"] == service.get(f"/v1/jobs/{job_id}/result").json()["pdl1"]["run_id"]
    _record_agrees_with_pages(record, service.get(f"/v1/jobs/{job_id}/result").json()["features"])
    # Its scores, for `pdl1 report` and `pdl1 review-queue`: pdl1 run's summary of one target and the target's row,
    # named as the script names the parent.
    pdl1 = service.get(f"/v1/jobs/{job_id}/result").json()["pdl1"]
    assert record["scores"]["summary"]["metadata"] == pdl1["metadata"]
    assert record["scores"]["summary"]["mpp"] == 0.5 and record["scores"]["target"]["target"] is None
    named = service.get(f"/v1/jobs/{job_id}/record", params={"target": "A-1", "target_type": "TMA core"}).json()
    assert (named["scores"]["target"]["target"], named["scores"]["target"]["target_type"]) == ("A-1", "TMA core")
    assert named["scores"]["target"]["tps_percent"] == named["scores"]["summary"]["tps_percent"]
    assert service.get(f"/v1/jobs/{job_id}/record", params={"target_type": "core"}).status_code == 422
    # The pdl1 run output the script found in the entry's folder as it asked (a summary's run id, or none): kept, so
    # the record is known newer than that output whatever the two machines' clocks say. Not said: not kept.
    run_id = "3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b"
    assert service.get(f"/v1/jobs/{job_id}/record", params={"after_run": run_id}).json()["after_run"] == run_id
    after_none = service.get(f"/v1/jobs/{job_id}/record", params={"after_run": "none"}).json()
    assert "after_run" in after_none and after_none["after_run"] is None and "after_run" not in record
    assert service.get(f"/v1/jobs/{job_id}/record", params={"after_run": "run 7"}).status_code == 422
    # An ROI over the image's edge is analysed within the image, and the record's outline is that part (it kept the
    # part outside, 1400-2600 px on a 1024 px image: helper-166).
    over = {"type": "Polygon", "coordinates": [[[600, 600], [1400, 600], [1400, 1400], [600, 1400], [600, 600]]]}
    job_id = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": over}).json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    assert shape(service.get(f"/v1/jobs/{job_id}/record").json()["outline"]).bounds == (600, 600, 1024, 1024)
    # A whole-image job's area is the image.
    job_id = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["sua"]}).json()[
        "job_id"
    ]
    assert wait_for_job(service, job_id)["state"] == "done"
    record = service.get(f"/v1/jobs/{job_id}/record").json()
    assert shape(record["outline"]).bounds == (0, 0, 1024, 1024)
    assert record["nuclei"]["x"] == [] and record["region_bounds"] == []  # not asked for: not put into QuPath
    # Released with the job: asked for after the DELETE, it is gone as the result is.
    service.delete(f"/v1/jobs/{job_id}")
    assert service.get(f"/v1/jobs/{job_id}/record").status_code == 404
    assert "no job" in service.get("/v1/jobs/nope/record").json()["detail"]


def test_an_upload_s_record_is_in_level0_px_as_its_pages_are(service, slides_root):
    from shapely.geometry import shape

    from inference.slides.slide import open_slide

    with open_slide(slides_root / "small.svs") as slide:  # 600 x 500 level-0 px from (200, 300), at downsample 2
        rgb = slide.read_region_at_mpp((200, 300), (300, 250), mpp=1.0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    r = service.post(
        "/v1/jobs/pixels",
        params={"mpp": 1.0, "origin_x": 200, "origin_y": 300, "downsample": 2},
        content=buf.getvalue(),
    )
    job_id = r.json()["job_id"]
    assert wait_for_job(service, job_id)["state"] == "done"
    record = service.get(f"/v1/jobs/{job_id}/record").json()
    assert shape(record["outline"]).bounds == pytest.approx((200, 300, 800, 800))
    _record_agrees_with_pages(record, service.get(f"/v1/jobs/{job_id}/result").json()["features"])
    xy = np.c_[record["nuclei"]["x"], record["nuclei"]["y"]]
    assert (xy >= [200, 300]).all() and (xy <= [800, 800]).all()
    # Its scores' µm/px is the image's level-0 one, as its px are; the upload's size is not the image's.
    assert record["scores"]["summary"]["mpp"] == 0.5 and record["scores"]["summary"]["image_size_px"] is None


def test_two_clients_at_once(service, slides_root):
    results = {}

    def client(name):
        with httpx.Client(base_url=service.base_url, timeout=60) as c:
            body = {"image": str(slides_root / "small.svs"), "outputs": ["regions"]}
            job_id = c.post("/v1/jobs", json=body).json()["job_id"]
            results[name] = wait_for_job(c, job_id)["state"]

    threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "done", "b": "done"}


def test_delete_forgets_a_finished_job(service, slides_root):
    job_id = service.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": ["regions"]}).json()[
        "job_id"
    ]
    assert wait_for_job(service, job_id)["state"] == "done"
    assert service.get(f"/v1/jobs/{job_id}/result").status_code == 200
    assert service.delete(f"/v1/jobs/{job_id}").json()["state"] == "done"
    assert service.get(f"/v1/jobs/{job_id}").status_code == 404
    assert service.get(f"/v1/jobs/{job_id}/result").status_code == 404


def test_a_long_running_service_keeps_only_recent_results(slides_root, models, monkeypatch):
    # Weeks of slides must not pile up in memory: with --keep-results 1 and room for two
    # records, the oldest of three jobs is forgotten and the middle one's result released.
    monkeypatch.setattr("bridge.service.jobs.KEEP_RECORDS", 2)
    settings = ServiceSettings(
        port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"), keep_results=1
    )
    with served(settings, models) as client:
        body = {"image": str(slides_root / "small.svs"), "outputs": ["regions"]}
        ids = []
        for _ in range(3):
            # One after another: with three queued at once, the first could be forgotten before it
            # was polled (a small job takes about a poll interval).
            ids.append(client.post("/v1/jobs", json=body).json()["job_id"])
            assert wait_for_job(client, ids[-1])["state"] == "done"
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert client.get(f"/v1/jobs/{ids[1]}").json()["state"] == "done"
        released = client.get(f"/v1/jobs/{ids[1]}/result")
        assert released.status_code == 410 and "--keep-results" in released.json()["detail"]
        assert client.get(f"/v1/jobs/{ids[2]}/result").json()["type"] == "FeatureCollection"


def test_openapi_is_served(service):
    schema = service.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"]


def test_token_is_required_when_set(slides_root, models):
    settings = ServiceSettings(
        port=free_port(), token=TOKEN, allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu")
    )
    with served(settings, models) as client:
        base = str(client.base_url).rstrip("/")
        assert httpx.get(f"{base}/v1/health").status_code == 401
        assert httpx.get(f"{base}/v1/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # The scheme is case-insensitive (RFC 7235); the token is not, and no other scheme carries it.
        for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}"):
            assert httpx.get(f"{base}/v1/health", headers={"Authorization": header}).status_code == 200, header
        for header in (f"Bearer {TOKEN.upper()}", f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}"):
            assert httpx.get(f"{base}/v1/health", headers={"Authorization": header}).status_code == 401, header


def test_non_loopback_bind_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="--token"):
        ServiceSettings(host="0.0.0.0", allow_roots=(tmp_path,))
    ServiceSettings(host="0.0.0.0", token="a-long-enough-s3cret", allow_roots=(tmp_path,))
    with pytest.raises(ValueError, match="allow-root"):
        ServiceSettings()
    with pytest.raises(ValueError, match="--keep-results"):
        ServiceSettings(allow_roots=(tmp_path,), keep_results=0)


def test_every_endpoint_and_key_the_scripts_use_exists(service):
    schema = service.get("/openapi.json").json()
    paths = {re.sub(r"\{[^}]+\}", "{}", p): set(v) for p, v in schema["paths"].items()}
    script = (SCRIPTS / "pdl1_analyze.groovy").read_text()
    used = set(re.findall(r'"(/v1/[^"$]*)', script))
    assert used, "the script calls the service"
    for path in used:
        assert path.split("?")[0].rstrip("/") in {p.split("{}")[0].rstrip("/") for p in paths}, path
    components = schema["components"]["schemas"]
    request_keys = set(components["JobRequest"]["properties"])
    status_keys = set(components["JobStatus"]["properties"])
    accepted_keys = set(components["JobAccepted"]["properties"])
    for key in re.findall(r'body\.put\("(\w+)"', script):
        assert key in request_keys, key
    for key in re.findall(r'status\.get\("(\w+)"\)', script):
        assert key in status_keys, key
    for key in re.findall(r'accepted\.get\("(\w+)"\)', script):
        assert key in accepted_keys, key
    for key in re.findall(r'pdl1\.get\("(\w+)"\)', script):
        assert key in {
            "total",
            "offset",
            "next_offset",
            "parent_measurements",
            "metadata",
            "metadata_counts",
            "run_id",
            "stain",
            "review_reasons",
            "review_advice",
            "domain",
        }, key
    # The pixel upload: what it reads of /v1/health and the models, and the query parameters it sends.
    for key in re.findall(r'health\.get\("(\w+)"\)', script):
        assert key in components["Health"]["properties"], key
    assert {"input_mpp", "task", "stain", "tile_size_px"} <= set(components["ModelDescription"]["properties"])
    assert set(components["UploadLimits"]["properties"]) == {"max_px", "max_bytes"}
    upload = {p["name"] for p in schema["paths"]["/v1/jobs/pixels"]["post"]["parameters"]}
    # What an upload's alpha means is the endpoint's description (the script sends 255, its context alpha and 0).
    said = " ".join(schema["paths"]["/v1/jobs/pixels"]["post"]["description"].split())
    assert "255 inside the ROI" in said and "1 to 254 context" in said and "0 absent" in said, said
    assert "def UPLOAD_CONTEXT_ALPHA = 128" in script
    upload_query = script.split("def uploadQuery", 1)[1].split("\n}\n", 1)[0]
    sent = set(re.findall(r'"(\w+)=" \+ enc\(', upload_query)) | set(re.findall(r'parts << "(\w+)="', upload_query))
    assert sent == {"mpp", "origin_x", "origin_y", "downsample", "outputs", "image_type", "model"}, sent
    assert sent <= upload, sent
    # The record's: the parent's name and what it is, for the record's scores.
    record_query = script.split("def recordQuery", 1)[1].split("\n}\n", 1)[0]
    record = {p["name"] for p in schema["paths"]["/v1/jobs/{job_id}/record"]["get"]["parameters"]}
    sent = set(re.findall(r'"&?(\w+)=" \+ enc\(', record_query))
    assert sent == {"target", "target_type", "after_run"} and sent <= record, (sent, record)


@pytest.mark.skipif(not os.environ.get("PDL1_GROOVY_LINT"), reason="set PDL1_GROOVY_LINT to npm-groovy-lint's path")
def test_groovy_scripts_compile_with_groovy4():
    import subprocess

    # Every script in one call: each call starts CodeNarc's JVM anew (about 9 s a script; 17 s for all four at once).
    scripts = sorted(map(str, SCRIPTS.glob("*.groovy")))
    assert len(scripts) == 4
    out = subprocess.run(
        [os.environ["PDL1_GROOVY_LINT"], "--failon", "error", "--noserver", "--output", "txt", *scripts],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
