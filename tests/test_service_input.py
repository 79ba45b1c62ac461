"""The service's answers to input a client gets wrong by accident: each names what came, what was
expected and the fix, at submission where it can be told then (not as a job that fails later)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from shapely.geometry import Point, box, shape
from shapely.ops import unary_union

from bridge.service import ServiceSettings
from inference.errors import RoiError
from inference.pipeline import Models, PipelineConfig
from tests.service_helpers import free_port, served, small_phantom_root, wait_for_job


@pytest.fixture(scope="module")
def slides_root(tmp_path_factory):
    return small_phantom_root(tmp_path_factory.mktemp("allowed"))


@pytest.fixture(scope="module")
def models():
    return Models(PipelineConfig(device="cpu"))


@pytest.fixture(scope="module")
def client(slides_root, models):
    settings = ServiceSettings(port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"))
    with served(settings, models) as c:
        yield c


# ------------------------------------------------------------------- the request body


def test_a_misspelt_field_is_refused_not_ignored(client, slides_root):
    # Ignored, 'roii' once had the whole slide analysed instead of the ROI.
    roi = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 0]]]}
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roii": roi})
    assert r.status_code == 422
    assert r.json() == {
        "detail": "bad request: body.roii: unknown field 'roii'; did you mean 'roi'? the request's fields are "
        "image, roi, mpp, image_size_px, image_type, outputs, model"
    }


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_a_json_body_without_its_content_type_says_so(client, slides_root, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post("/v1/jobs", content=json.dumps({"image": str(slides_root / "small.svs")}), headers=headers)
    assert r.status_code == 422
    assert r.json() == {
        "detail": f"bad request: body: sent with Content-Type {content_type or '(none)'}; expected JSON with "
        "'Content-Type: application/json': send that header"
    }


@pytest.mark.parametrize(
    ("content", "what"),
    [("", 'empty; expected a JSON object such as {"image": "/path/to/slide.svs"}'), ("[1]", "a JSON array;")],
)
def test_a_body_that_is_no_json_object_says_what_is_expected(client, content, what):
    r = client.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith(f"bad request: body: {what}")


JSON_HINT = (
    'expected a JSON object such as {"image": "/path/to/slide.svs"}: JSON takes double quotes around names and '
    "strings, and no trailing comma"
)


@pytest.mark.parametrize(
    ("content", "status", "detail"),
    [
        (
            b"{",
            422,
            f"bad request: body: not valid JSON (Expecting property name enclosed in double quotes at "
            f"character 1); {JSON_HINT}",
        ),
        (
            b'{"image": "/a.svs",}',
            422,
            "bad request: body: not valid JSON (Expecting property name enclosed in "
            f"double quotes at character 19); {JSON_HINT}",
        ),
        (
            b"{'image': '/a.svs'}",
            422,
            "bad request: body: not valid JSON (Expecting property name enclosed in "
            f"double quotes at character 1); {JSON_HINT}",
        ),
        # Latin-1 bytes: FastAPI's own answer was "There was an error parsing the body".
        (
            b'{"image": "/d\xe9p\xf4t.svs"}'.decode("unicode_escape").encode("latin-1"),
            400,
            "body: not UTF-8 text "
            '(invalid continuation byte at byte 13); expected a JSON object in UTF-8 such as {"image": '
            '"/path/to/slide.svs"}: send the JSON encoded as UTF-8',
        ),
    ],
    ids=["cut-short", "trailing-comma", "single-quotes", "latin-1"],
)
def test_a_body_that_is_no_json_says_where_and_why(client, content, status, detail):
    r = client.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (status, {"detail": detail})


# ------------------------------------------------------------------- the ROI

WHOLE = "or omit roi to analyse the whole tissue"


@pytest.mark.parametrize(
    ("roi", "detail"),
    [
        (
            {"type": "Polygon", "coordinates": []},
            f"roi is an empty Polygon (no vertices); send the annotation's outline in level-0 px, {WHOLE}",
        ),
        (
            {"type": "MultiPolygon", "coordinates": [[[]]]},
            f"roi is an empty MultiPolygon (no vertices); send the annotation's outline in level-0 px, {WHOLE}",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [500, 500], [500, 0], [0, 500], [0, 0]]]},
            "roi is not a valid Polygon (Self-intersection at (250, 250)); expected an outline that does not cross "
            f"or touch itself: redraw the annotation in QuPath, {WHOLE}",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [100, 100]]]},
            "roi is not a readable GeoJSON Polygon (A linearring requires at least 4 coordinates.); expected rings "
            "of at least 4 [x, y] vertices in level-0 px, the first repeated last: send the annotation's outline "
            f"as QuPath gives it, {WHOLE}",
        ),
        (
            {"type": "Polygon", "coordinates": [[[2000, 0], [2100, 0], [2100, 100], [2000, 0]]]},
            "roi (2000, 0)-(2100, 100) lies outside the image of 1024 x 1024 px (image_size_px); expected level-0 "
            "px of this image, as QuPath's annotations are: send the ROI of an annotation on this image, "
            f"{WHOLE}",
        ),
        (
            {"type": "Polygon"},
            "roi is a GeoJSON Polygon without 'coordinates'; expected rings of at least 4 [x, y] vertices in "
            "level-0 px under 'coordinates', the first repeated last: send the annotation's outline as QuPath "
            f"gives it, {WHOLE}",
        ),
        (
            # Without image_size_px this was queued, and failed with the vertex as a 300-digit number.
            {"type": "Polygon", "coordinates": [[[1e300, 0], [2e300, 0], [2e300, 1e300], [1e300, 0]]]},
            "roi has a vertex beyond 2,147,483,648 px (bounds 1e+300, 0, 2e+300, 1e+300); expected level-0 px of "
            f"this image, as QuPath's annotations are: send the annotation's outline, {WHOLE}",
        ),
        (
            # Said "expected an outline that does not cross or touch itself: redraw the annotation".
            {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 0], [0, 0]]]},
            "roi is not a valid Polygon (Too few points in geometry component at (0, 0)): a ring has fewer than 3 "
            "distinct vertices, so it encloses no area; expected rings of at least 4 [x, y] vertices in level-0 px, "
            f"the first repeated last: send the annotation's outline as QuPath gives it, {WHOLE}",
        ),
    ],
    ids=[
        "empty",
        "empty-multi",
        "self-intersecting",
        "two-points",
        "outside",
        "no-coordinates",
        "astronomical",
        "two-distinct-points",
    ],
)
def test_an_roi_no_analysis_can_use_is_refused_at_submission(client, slides_root, roi, detail):
    body = {"image": str(slides_root / "small.svs"), "roi": roi}
    if "beyond" not in detail:  # that one is refused without the image's size too
        body["image_size_px"] = [1024, 1024]
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": detail}


@pytest.mark.parametrize(
    ("coordinates", "corners"),
    [
        ([[[2000, 0], [2100, 0], [2100, 100], [2000, 0]]], "(2000, 0)-(2100, 100)"),
        ([[[-500, -500], [-100, -500], [-100, -100], [-500, -500]]], "(-500, -500)-(-100, -100)"),
    ],
    ids=["right", "negative"],
)
def test_an_roi_outside_the_image_is_refused_at_submission_without_image_size_px(
    client, slides_root, coordinates, corners
):
    # The header was read at submission, yet without image_size_px the job queued and failed after the queue.
    roi = {"type": "Polygon", "coordinates": coordinates}
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"roi {corners} lies outside the image of 1024 x 1024 px (its size as the file opens here); "
            "expected level-0 px of this image, as QuPath's annotations are: send the ROI of an annotation on this "
            f"image, {WHOLE}"
        },
    )


def test_an_roi_partly_outside_the_image_is_accepted(client, slides_root):
    # QuPath's own ROIs may overhang the image; the analysis clips them.
    roi = {"type": "Polygon", "coordinates": [[[900, 900], [1200, 900], [1200, 1200], [900, 900]]]}
    body = {"image": str(slides_root / "small.svs"), "roi": roi, "image_size_px": [1024, 1024], "outputs": ["regions"]}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"


# ------------------------------------------------------------------- the image path


def test_a_folder_is_not_an_image(client, slides_root):
    (slides_root / "case-folder").mkdir(exist_ok=True)
    for image in (str(slides_root / "case-folder"), (slides_root / "case-folder").as_uri()):
        r = client.post("/v1/jobs", json={"image": image})
        assert r.status_code == 422, r.text
        assert r.json() == {
            "detail": f"{slides_root / 'case-folder'} is a folder; expected an image file (e.g. a .svs, .ndpi or "
            ".tif): send the path of the image file itself",
            "cannot_open": True,  # QuPath may open it (an OME-Zarr folder): the script sends the pixels
        }


@pytest.mark.parametrize(
    ("image", "came"),
    [
        ("small.svs", "image path 'small.svs' is relative"),
        ("./slides/small.svs", "image path './slides/small.svs' is relative"),
        ("http://scanner.local/slides/small.svs", "image 'http://scanner.local/slides/small.svs' is a http: URL"),
        ("C:\\Slides\\small.svs", "image path 'C:\\\\Slides\\\\small.svs' is a Windows path"),
        ("file:/C:/Slides/small.svs", "image path 'file:/C:/Slides/small.svs' is a Windows path"),
        ("\\\\server\\share\\small.svs", "image path '\\\\\\\\server\\\\share\\\\small.svs' is a Windows path"),
        # Both said "is relative".
        ("file:slides/small.svs", "image URI 'file:slides/small.svs' names no absolute path"),
        ("~/slides/small.svs", "image path '~/slides/small.svs' starts with ~, which only a shell expands"),
        # Said "is a Windows path" of a URI with a host.
        (
            "file://scanner/share/small.svs",
            "image URI 'file://scanner/share/small.svs' names a file on the machine 'scanner' (a network share)",
        ),
    ],
)
def test_a_path_the_service_cannot_place_says_it_must_be_absolute_here(client, image, came):
    r = client.post("/v1/jobs", json={"image": image})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{came}; ") or detail.startswith(f"{came}, "), detail
    assert "absolute path" in detail and "file: URI" in detail and "outside the folders" not in detail


@pytest.mark.parametrize("scheme", ["FILE", "File"])
def test_a_file_uri_s_scheme_is_case_insensitive(client, slides_root, scheme):
    # FILE:///… was refused as "a FILE: URL"; schemes are case-insensitive (RFC 3986).
    image = f"{scheme}://{(slides_root / 'small.svs').as_posix()}"
    r = client.post("/v1/jobs", json={"image": image, "outputs": ["regions"]})
    assert r.status_code == 202, r.text
    status = client.get(f"/v1/jobs/{r.json()['job_id']}").json()
    assert status["image"] == str(slides_root / "small.svs")
    client.delete(f"/v1/jobs/{r.json()['job_id']}")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST"])
def test_a_file_uri_naming_localhost_is_this_machine_s_file(client, slides_root, host):
    # RFC 8089's file://localhost/path, as file:///path: it was taken for another machine's share ("a Windows path").
    image = f"file://{host}{(slides_root / 'small.svs').as_posix()}"
    roi = {"type": "Polygon", "coordinates": [[[0, 0], [64, 0], [64, 64], [0, 0]]]}
    r = client.post("/v1/jobs", json={"image": image, "roi": roi, "outputs": ["regions"]})
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"


LONG = "x" * 100_000  # a client's runaway value: the answer names it by its start, end and length


@pytest.mark.parametrize(
    ("request_", "status", "came", "fix"),
    [
        ({"image": LONG}, 422, "image path 'xxx", "is relative; expected the absolute path"),
        ({"image": "{root}/" + LONG}, 422, "image path '{root}/xxx", "send the path (or file: URI)"),
        ({"image": "/" + LONG}, 403, "/xxx", "start it with --allow-root"),
        ({"image": "http://" + LONG}, 422, "image 'http://xxx", "send the file's absolute path"),
        ({"image": "C:\\" + LONG}, 422, "image path 'C:\\\\xxx", "is a Windows path"),
        ({"image": "file:" + LONG}, 422, "image URI 'file:xxx", "names no absolute path"),
        ({"image": "~" + LONG}, 422, "image path '~xxx", "only a shell expands"),
        ({"image": LONG + "\x00"}, 422, "bad request: body.image: image path 'xxx", "NUL byte"),
        ({"image": "{root}/small.svs", LONG: 1}, 422, "bad request: body.xxx", "the request's fields are image"),
        ({"image": "{root}/small.svs", "model": LONG}, 409, "unknown model 'xxx", "this service has 'default'"),
        ({"image": "{root}/small.svs", "roi": {"type": LONG}}, 422, "bad request: body.roi", "Polygon or MultiPolygon"),
        (
            {"image": "{root}/small.svs", "roi": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [LONG, 0]]]}},
            422,
            "roi is not a readable GeoJSON Polygon",
            "send the annotation's outline",
        ),
    ],
    ids=[
        "relative", "too-long", "outside", "url", "windows", "file-uri", "tilde", "nul", "field", "model",
        "roi-type", "roi-vertex",
    ],
)  # fmt: skip
def test_a_long_value_is_not_echoed_whole(client, slides_root, request_, status, came, fix):
    # A 100 kB path came back whole in the 422's detail (and twice for a field name).
    request_ = {k: v.replace("{root}", str(slides_root)) if k == "image" else v for k, v in request_.items()}
    r = client.post("/v1/jobs", json=request_)
    assert r.status_code == status, r.text[:500]
    detail = r.json()["detail"]
    assert len(detail) < 1000, detail[:500]
    assert detail.startswith(came.replace("{root}", str(slides_root))), detail
    assert "…" in detail and "characters)" in detail and fix in detail, detail


@pytest.mark.parametrize(
    ("roi", "came"),
    [
        ({"coordinates": []}, "got no type"),
        ({"type": 5}, "got type 5"),
        ({"type": ["x"] * 100}, f"got type {json.dumps(['x'] * 100)[:133]}…{json.dumps(['x'] * 100)[-66:]} (500 "),
    ],
    ids=["none", "number", "long-list"],
)
def test_an_roi_type_that_is_no_string_is_shown_as_sent(client, slides_root, roi, came):
    # A missing type read "got type None" (Python's word); a 100 kB array as type came back whole.
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi})
    assert r.status_code == 422
    assert r.json()["detail"].startswith(
        "bad request: body.roi: roi must be a GeoJSON Polygon or MultiPolygon geometry: send the annotation's outline "
        f"as QuPath gives it, or omit roi to analyse the whole tissue; {came}"
    ), r.json()


@pytest.mark.parametrize(
    ("roi", "came"),
    [
        ({"type": "Point", "coordinates": [1, 2]}, "got type 'Point'"),
        ({"type": "Feature", "geometry": {}}, "got type 'Feature' (of a GeoJSON Feature, send its geometry)"),
        ([[0, 0], [1, 0], [1, 1]], "got [[0, 0], [1, 0], [1, 1]]"),
    ],
    ids=["point", "feature", "array"],
)
def test_an_roi_that_is_no_polygon_is_told_what_to_send(client, slides_root, roi, came):
    # These said what came alone ("Input should be a valid dictionary" for an array), after pydantic's "Value error, ".
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "roi": roi})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "bad request: body.roi: roi must be a GeoJSON Polygon or MultiPolygon geometry: send the annotation's outline "
        f"as QuPath gives it, or omit roi to analyse the whole tissue; {came}"
    )


def test_a_long_job_id_is_not_echoed_whole(client):
    r = client.get("/v1/jobs/" + "j" * 10_000)
    assert r.status_code == 404
    assert r.json() == {
        "detail": f"no job {'j' * 133 + '…' + 'j' * 66!r} (10000 characters): never submitted, deleted, or older "
        "than the last 1000 finished jobs (jobs do not survive a restart of the service)"
    }


def test_an_error_that_repeats_a_long_value_deeper_down_is_capped_too(client, slides_root, monkeypatch):
    # The backstop for a message from below the service (a reader's, shapely's) that repeats a value whole.
    def refuse(roi, *, image_size_px):
        raise RoiError("roi: " + "y" * 50_000 + "; send another")

    monkeypatch.setattr("bridge.service.app.parse_roi", refuse)
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs")})
    assert r.status_code == 422
    assert r.json() == {"detail": f"roi: {'y' * 2661}…{'y' * 1319}; send another (50019 characters)"}


# ------------------------------------------------------------------- the pixel upload


@pytest.mark.parametrize(
    ("content", "came"),
    [
        (b"", "the request body is empty"),
        (b"hello", "the request body (5 bytes, starting b'hello') is not a PNG or TIFF image"),
    ],
    ids=["empty", "text"],
)
def test_an_upload_that_is_no_image_says_what_is_expected(client, content, came):
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content, headers={"Content-Type": "image/png"})
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": f"{came}; expected the region's PNG or TIFF bytes (Content-Type: image/png or image/tiff)"
    }


@pytest.mark.parametrize("how", ["files", "data"])
def test_an_upload_sent_as_a_form_says_to_send_the_image_as_the_body(client, how):
    # curl -F / requests' files= wrap the PNG in a form: it was refused as "starting b'--2b5f...' is not a PNG
    # or TIFF image", which did not say what was wrong with a PNG the client had indeed sent.
    png = _encoded(np.full((8, 8, 3), 200, np.uint8), "PNG")
    sent = {"files": {"file": ("region.png", png, "image/png")}} if how == "files" else {"data": {"image": "x"}}
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, **sent)
    form = "multipart/form-data" if how == "files" else "application/x-www-form-urlencoded"
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"the request body is a form (Content-Type: {form}), not the image itself; expected the "
            "region's PNG or TIFF bytes (Content-Type: image/png or image/tiff), sent as the whole body: curl "
            "--data-binary @region.png -H 'Content-Type: image/png', requests.post(url, data=png_bytes)"
        },
    )


@pytest.mark.parametrize("fmt", ["BMP", "WEBP"])
def test_an_image_of_another_format_sent_with_curl_s_default_content_type_is_no_png_or_tiff_not_a_form(client, fmt):
    # curl --data-binary @region.bmp without -H labels it a URL-encoded form: it was told to use --data-binary,
    # which it had; a form's body looks like one (name=value in URL-safe bytes, or a multipart boundary).
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format=fmt)
    content = buf.getvalue()
    r = client.post(
        "/v1/jobs/pixels",
        params={"mpp": 0.5},
        content=content,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"the request body ({len(content)} bytes, starting {content[:8]!r}) is not a PNG or TIFF "
            "image; expected the region's PNG or TIFF bytes (Content-Type: image/png or image/tiff)"
        },
    )


def test_an_image_sent_with_curl_s_default_form_content_type_is_taken_as_the_image(client):
    # curl --data-binary @region.png without -H labels the PNG application/x-www-form-urlencoded.
    png = _encoded(np.full((8, 8, 3), 200, np.uint8), "PNG")
    r = client.post(
        "/v1/jobs/pixels",
        params={"mpp": 0.5},
        content=png,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"


PIXELS_PARAMETERS = "the upload's parameters are mpp, origin_x, origin_y, downsample, outputs, image_type, model"


@pytest.mark.parametrize(
    ("params", "came"),
    [
        (
            {"mpp": 0.5, "originx": 100},
            f"query.originx: unknown parameter 'originx'; did you mean 'origin_x'? {PIXELS_PARAMETERS}",
        ),
        (
            {"mpp": 0.5, "roi": "POLYGON ((0 0, 9 0, 9 9, 0 0))"},
            "query.roi: unknown parameter 'roi'; an upload is analysed whole: send only the ROI's bounding region "
            f"(and its origin_x, origin_y); {PIXELS_PARAMETERS}",
        ),
    ],
    ids=["misspelt", "roi"],
)
def test_an_upload_s_unknown_parameter_is_refused_not_ignored(client, params, came):
    # Ignored, a misspelt origin_x put every result at x 0, and an roi had the whole upload analysed.
    png = _encoded(np.full((8, 8, 3), 200, np.uint8), "PNG")
    r = client.post("/v1/jobs/pixels", params=params, content=png, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()) == (422, {"detail": f"bad request: {came}"})


def test_a_query_parameter_sent_twice_is_refused_not_resolved_to_the_last(client):
    # ?mpp=0.5&mpp=0.6 was analysed at 0.6 without a word: which value the client meant cannot be told.
    png = _encoded(np.full((8, 8, 3), 200, np.uint8), "PNG")
    r = client.post("/v1/jobs/pixels?mpp=0.5&origin_x=3&mpp=0.6", content=png, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()) == (
        422,
        {"detail": "bad request: query.mpp: sent 2 times ('0.5', '0.6'); send it once"},
    )
    # A list is sent once per value.
    r = client.post(
        "/v1/jobs/pixels?mpp=0.5&outputs=regions&outputs=nuclei", content=png, headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 202, r.text
    r = client.get("/v1/jobs/nope/result?offset=0&offset=0")
    assert (r.status_code, r.json()) == (
        422,
        {"detail": "bad request: query.offset: sent 2 times ('0', '0'); send it once"},
    )


def test_a_record_s_unknown_parameter_is_refused_not_ignored(client):
    # Ignored, a misspelt after_run left the record to be ordered by two machines' clocks, without a word.
    r = client.get("/v1/jobs/nope/record", params={"afterrun": "none"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: query.afterrun: unknown parameter 'afterrun'; did you mean 'after_run'? the "
            "record's parameters are target, target_type, after_run"
        },
    )


@pytest.mark.parametrize(
    ("params", "came"),
    [
        ({"ofset": 5}, "query.ofset: unknown parameter 'ofset'; did you mean 'offset'? "),
        ({"page": 2}, "query.page: unknown parameter 'page'; "),
    ],
    ids=["misspelt", "other"],
)
def test_a_result_s_unknown_parameter_is_refused_not_ignored(client, params, came):
    # Ignored, a misspelt offset gave the first page again with its next_offset: a client paging on it looped.
    r = client.get("/v1/jobs/nope/result", params=params)
    assert (r.status_code, r.json()) == (
        422,
        {"detail": f"bad request: {came}the result's parameters are offset, limit"},
    )


def test_a_job_request_without_its_image_says_what_to_send(client):
    # pydantic's "body.image: Field required" said neither what the image is nor how to send it.
    r = client.post("/v1/jobs", json={"outputs": ["regions"]})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: body.image: missing; expected the image's absolute path on the service's machine "
            'or its file: URI, as {"image": "/path/to/slide.svs"} (the other fields may be left out)'
        },
    )


def test_an_upload_without_its_mpp_says_what_to_send(client):
    png = _encoded(np.full((8, 8, 3), 200, np.uint8), "PNG")
    r = client.post("/v1/jobs/pixels", content=png, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: query.mpp: missing; expected the µm per uploaded pixel: the image's µm/px times "
            "the downsample the region was read at (e.g. ?mpp=0.5)"
        },
    )


def test_a_record_s_target_type_that_is_none_of_them_names_them(client):
    # It showed its regular expression: "String should match pattern '^(TMA core|annotation|whole image)$'".
    r = client.get("/v1/jobs/nope/record", params={"target_type": "tma"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: query.target_type: 'tma' is not what a parent can be; expected 'annotation', "
            "'TMA core' or 'whole image' (as the record's target_type), or leave it out"
        },
    )


@pytest.mark.parametrize("after_run", ["run-7", "", "3F2B1C9E4D5A4E6F8A7B9C0D1E2F3A4B", "None"])
def test_a_record_s_after_run_that_is_no_run_id_is_refused_saying_what_is_expected(client, after_run):
    # The record keeps it as the run id of the summary.json the script found: anything else would order nothing.
    r = client.get("/v1/jobs/nope/record", params={"after_run": after_run})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"bad request: query.after_run: {after_run!r} is no run id; expected the run_id of the pdl1 run "
            "summary.json in the entry's folder (a UUID such as 3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b), or 'none' "
            "where there is none"
        },
    )


RGB8 = (
    "expected 8-bit RGB (or greyscale) pixels of a brightfield region, as QuPath shows it: export the region as an "
    "8-bit RGB PNG or TIFF"
)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(array).save(buf, format="PNG")
    else:
        import tifffile

        tifffile.imwrite(buf, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("array", "fmt", "came"),
    [
        # Converted to RGB these were clipped at 255 and a white image analysed, or refused as "not a TIFF".
        (
            np.full((64, 64), 40000, np.uint16),
            "PNG",
            "the uploaded image has 16- or 32-bit integer samples (Pillow mode I;16), which would be clipped",
        ),
        (
            np.full((64, 64, 3), 0.5, np.float32),
            "TIFF",
            "the request body ({n} bytes) is a TIFF whose pixels cannot "
            "be decoded (floating-point or other samples it cannot read as colours)",
        ),
    ],
    ids=["16-bit-png", "float-tiff"],
)
def test_an_upload_of_other_than_8_bit_colour_is_refused_not_clipped(client, array, fmt, came):
    content = _encoded(array, fmt)
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()) == (422, {"detail": f"{came.format(n=len(content))}; {RGB8}"})


def _png_header(width_px: int, height_px: int) -> bytes:
    """A PNG whose header states width x height 8-bit RGB pixels and whose data is one empty chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width_px, height_px, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_an_upload_whose_header_states_a_huge_image_is_told_it_is_too_large(client):
    # 300 bytes stating 20000x20000 px: Pillow's decompression-bomb guard refused it, and the answer said
    # the body "is not a PNG/TIFF image" and to send one.
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=_png_header(20000, 20000))
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "upload of 400000000 px (as its header states) is over 67108864 px; send a smaller region "
            "or a lower resolution (downsample)"
        },
    )


def _pages(*shapes: tuple[int, ...], reduced_from: int = 99) -> bytes:
    """A TIFF of one 8-bit page per shape; pages from index reduced_from on are marked reduced-resolution."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for index, shape in enumerate(shapes):
            tif.write(np.full(shape, 200, np.uint8), photometric="rgb", subfiletype=int(index >= reduced_from))
    return buf.getvalue()


def _frames(count: int) -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(count)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "pages"),
    [(_pages((64, 64, 3), (64, 64, 3), (64, 64, 3)), 3), (_frames(2), 2)],
    ids=["tiff-stack", "animation"],
)
def test_an_upload_of_several_pages_is_refused_not_cut_to_the_first(client, content, pages):
    # Only the first page was decoded: the others were dropped and the job said nothing of them.
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content, headers={"Content-Type": "image/tiff"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"the uploaded image has {pages} pages or frames at full resolution (a stack or an animation), "
            "of which only the first would be analysed; send one region as a single-page PNG or TIFF (one upload "
            "per region)"
        },
    )


def test_an_upload_of_one_page_and_its_reduced_resolution_levels_is_accepted(client):
    content = _pages((64, 64, 3), (32, 32, 3), (16, 16, 3), reduced_from=1)
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content, headers={"Content-Type": "image/tiff"})
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"


def _transparent(mode: str) -> bytes:
    """A 4x4 PNG: the left half opaque mid-grey, the right half fully transparent over black."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (128, 128, 128, 255)
    im = Image.fromarray(rgba)  # RGBA
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = im.convert("P")  # a palette with one entry marked transparent
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_an_upload_s_transparent_pixels_read_as_empty_glass_not_as_what_lies_under_them(mode):
    # Alpha was dropped: the transparent half read as black, the darkest stain there is.
    from bridge.service import decoded_upload

    content = _transparent(mode)
    with Image.open(io.BytesIO(content)) as im:
        assert im.mode in ("RGBA", "LA") or "transparency" in im.info
    with decoded_upload(content, mpp=0.5) as slide:
        rgb = slide.read_region((0, 0), 0, (4, 4))
    assert rgb.shape == (4, 4, 3)
    assert (rgb[:, :2] == 128).all()
    assert (rgb[:, 2:] == 255).all()


def _with_orientation(fmt: str, orientation: int) -> bytes:
    im = Image.fromarray(np.full((8, 16, 3), 200, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "PNG"])
def test_an_upload_with_an_orientation_tag_is_refused_not_analysed_as_stored(client, fmt):
    # A phone or viewer's EXIF rotation was ignored: a 16x8 image shown upright as 8x16 was analysed as 16x8,
    # and its results placed turned against the region the user saw.
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=_with_orientation(fmt, 6))
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "the uploaded image carries an orientation tag (6: turned 90° clockwise), so it is shown "
            "turned or mirrored but analysed as stored, and its results would not lie over the region; send the "
            "region's pixels as QuPath reads them, without an orientation tag (an exported PNG or TIFF; for a JPEG, "
            "turn the pixels and drop the tag, e.g. PIL.ImageOps.exif_transpose)"
        },
    )


def test_an_upload_whose_orientation_tag_says_as_stored_is_accepted(client):
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=_with_orientation("JPEG", 1))
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"


def test_an_uploaded_png_is_not_decoded_at_submission(monkeypatch):
    # Pillow's PNG reader decoded the whole image to look for an orientation after its pixels: an 8192² RGBA PNG
    # of 359 kB cost 0.8 s and 256 MB at submission, before the queue was looked at.
    from PIL import ImageFile

    from bridge.service import check_upload

    rgba = np.full((32, 48, 4), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")

    def load(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    check_upload(buf.getvalue(), mpp=0.5, max_px=10**6)


def _png_with_orientation_after_its_pixels(orientation: int) -> bytes:
    """A PNG whose eXIf chunk, stating ``orientation``, comes after its pixels (IDAT), just before IEND."""
    import struct
    import zlib

    plain = io.BytesIO()
    Image.fromarray(np.full((8, 16, 3), 200, np.uint8)).save(plain, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    png = plain.getvalue()
    end = png.rindex(b"IEND") - 4  # IEND's length field
    return png[:end] + chunk + png[end:]


def test_an_orientation_tag_after_a_pngs_pixels_fails_its_job_when_the_pixels_are_decoded(client):
    # Submission reads only the header (the chunks before the pixels); the job reads the rest as it decodes.
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=_png_with_orientation_after_its_pixels(6))
    assert r.status_code == 202, r.text
    status = wait_for_job(client, r.json()["job_id"])
    assert status["state"] == "failed"
    assert "the uploaded image carries an orientation tag (6: turned 90° clockwise)" in status["error"], status


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's own note on the cut TIFF it reads
@pytest.mark.parametrize(("fmt", "cut_at"), [("PNG", 20), ("PNG", 30), ("TIFF", 8), ("TIFF", 100)])
def test_an_upload_cut_short_in_its_header_says_so_not_that_it_is_no_image(client, fmt, cut_at):
    # An interrupted transfer: a PNG was told it "is not a PNG or TIFF image", a TIFF that its samples were
    # floating point.
    content = _encoded(np.full((64, 64, 3), 200, np.uint8), fmt)[:cut_at]
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=content)
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": f"the request body ({cut_at} bytes) starts as a {fmt} but is cut short or damaged before its "
            f"pixels begin; send the complete {fmt} file (an interrupted transfer or a partial read sends only its "
            "start)"
        },
    )


UPLOAD_ADVICE = (
    "send as mpp the µm per uploaded pixel: the scanner's µm/px (0.25 at 40x, 0.5 at 20x) times the downsample "
    "the region was read at"
)


def _png(size_px: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size_px, size_px, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mpp", [100.0, 0.01])
def test_an_upload_at_an_implausible_mpp_is_told_in_the_request_s_terms(mpp):
    # The endpoint's own range refuses these first (query.mpp); check_upload says the same in its own words.
    from bridge.service import check_upload
    from inference import MissingMppError

    with pytest.raises(MissingMppError) as caught:
        check_upload(_png(), mpp=mpp, max_px=10**8)
    assert str(caught.value) == (
        f"image: microns per pixel {mpp:g} (from the mpp query parameter) is outside the plausible range "
        f"(0.05, 50.0); {UPLOAD_ADVICE}"
    )


def test_an_upload_too_coarse_for_the_model_is_told_in_the_request_s_terms(client):
    r = client.post("/v1/jobs/pixels", params={"mpp": 50}, content=_png())
    assert r.status_code == 202, r.text
    status = wait_for_job(client, r.json()["job_id"])
    assert status["state"] == "failed"
    assert status["error"] == (
        "image: its pixels are 50 µm (from the mpp query parameter), but the segmentation model reads 2 µm/px: it "
        "would enlarge the image 25 times (at most 2 is allowed). Check the pixel size; if it is wrong, "
        f"{UPLOAD_ADVICE}. An image truly this coarse cannot be analysed"
    )


def test_an_image_too_coarse_for_the_model_is_told_in_qupath_s_terms(client, slides_root):
    path = str(slides_root / "small.svs")
    r = client.post("/v1/jobs", json={"image": path, "mpp": 40})
    assert r.status_code == 202, r.text
    status = wait_for_job(client, r.json()["job_id"])
    assert status["state"] == "failed" and "--mpp" not in status["error"]
    assert status["error"].startswith(f"{path}: its pixels are 40 µm (from the request's mpp), but the ")
    assert status["error"].endswith(
        "Check the pixel size; if it is wrong, set the pixel size in QuPath (Image tab: Pixel width/height) to the "
        "scanner's µm/px (0.25 at 40x, 0.5 at 20x); pdl1_analyze.groovy sends it with the job, so run the script "
        "again. An image truly this coarse cannot be analysed"
    )


# ------------------------------------------------------------------- an image that does not open


@pytest.fixture(scope="module")
def unopenable(slides_root):
    """Files under the allowed root that do not open as images; a link to the one without MPP."""
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(slides_root / "nompp.png")  # no dpi: no MPP
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(slides_root / "coarse.png", dpi=(254, 254))  # 100 µm/px
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)).save(whole, format="PNG")
    (slides_root / "truncated.png").write_bytes(whole.getvalue()[:3000])
    (slides_root / "results.json").write_text('{"type": "FeatureCollection"}')
    (slides_root / "linked.png").symlink_to(slides_root / "nompp.png")
    return slides_root


@pytest.mark.parametrize(
    ("name", "after"),
    [
        (
            "nompp.png",
            ": a plain PNG file states no microns per pixel. Set the pixel size in QuPath (Image tab: Pixel "
            "width/height) to the µm/px of the scanner or camera it came from (for a microscope camera: its sensor "
            "pixel size divided by the total magnification, e.g. 3.45 µm / 20 = 0.17); pdl1_analyze.groovy sends "
            "it with the job, so run the script again",
        ),
        ("linked.png", ": a plain PNG file states no microns per pixel. Set the pixel size in QuPath"),
        (
            "coarse.png",
            ": microns per pixel 100 (from image dpi) is outside the plausible range (0.05, 50.0); set the pixel "
            "size in QuPath (Image tab: Pixel width/height) to the scanner's µm/px (0.25 at 40x, 0.5 at 20x); "
            "pdl1_analyze.groovy sends it with the job, so run the script again",
        ),
        # Its header reads: only the job finds the pixels cut short.
        (
            "truncated.png",
            ": neither OpenSlide nor Pillow can read it (image file is truncated); the file looks damaged",
        ),
    ],
)
def test_an_image_that_does_not_open_is_named_as_the_client_sent_it(client, unopenable, name, after):
    path = str(unopenable / name)
    r = client.post("/v1/jobs", json={"image": path})
    assert r.status_code == 202, r.text
    status = wait_for_job(client, r.json()["job_id"])
    assert status["state"] == "failed"
    assert status["error"].startswith(path + after.replace("{path}", path)), status["error"]
    assert "pdl1-open-" not in status["error"] and "--mpp" not in status["error"]


@pytest.fixture(scope="module")
def no_reader_opens(slides_root):
    """Files under the allowed root that QuPath may show (through Bio-Formats) but no reader here opens."""
    (slides_root / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(200))  # Zeiss's header, as OpenSlide meets it
    (slides_root / "results.json").write_text('{"type": "FeatureCollection"}')
    tifffile.imwrite(slides_root / "deep.tif", np.zeros((32, 32, 3), np.uint16))  # 16-bit: read as white
    return slides_root


@pytest.mark.parametrize(
    ("name", "after"),
    [
        ("scan.czi", ": OpenSlide cannot read it: "),
        ("results.json", ": neither OpenSlide nor Pillow can read it (cannot identify image file '{path}'); expected"),
        ("deep.tif", ": expected 8-bit RGB pixels, got uint16"),
    ],
)
def test_an_image_no_reader_opens_is_refused_at_submission_saying_cannot_open(client, no_reader_opens, name, after):
    # It queued and failed when its turn came ("OpenSlide cannot read it"); pdl1_analyze.groovy gave up on the
    # image. Now the submission reads its header and says so in a field the script tests, and the script sends the
    # region's pixels instead.
    path = str(no_reader_opens / name)
    r = client.post("/v1/jobs", json={"image": path, "outputs": ["regions"]})
    assert r.status_code == 422, r.text
    answer = r.json()
    assert set(answer) == {"detail", "cannot_open"} and answer["cannot_open"] is True
    assert answer["detail"].startswith(path + after.replace("{path}", path)), answer["detail"]
    assert "pdl1-open-" not in answer["detail"]  # the image as the client named it, not the private link


def test_an_image_the_service_cannot_reach_says_cannot_open_with_its_own_status(client, slides_root, tmp_path):
    outside = tmp_path / "elsewhere.svs"
    outside.write_bytes((slides_root / "small.svs").read_bytes())
    cases = [
        (str(slides_root / "not-here.svs"), 404, f"image not found: {slides_root / 'not-here.svs'}"),
        (str(outside), 403, f"{outside} is outside the folders this service may open"),
        ("C:\\slides\\case.svs", 422, "image path 'C:\\\\slides\\\\case.svs' is a Windows path"),
    ]
    for image, status, start in cases:
        r = client.post("/v1/jobs", json={"image": image})
        assert r.status_code == status, r.text
        assert r.json()["cannot_open"] is True and r.json()["detail"].startswith(start), r.json()


def test_refusals_that_pixels_would_not_mend_carry_no_cannot_open(client, slides_root):
    small = str(slides_root / "small.svs")
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [500, 500], [500, 0], [0, 500], [0, 0]]]}
    for body in (
        {"image": small, "roi": bowtie},
        {"image": small, "image_type": "FLUORESCENCE"},
        {"image": small, "model": "other"},
        {"image": small, "mpp": "x"},
    ):
        r = client.post("/v1/jobs", json=body)
        assert r.status_code in (409, 422) and set(r.json()) == {"detail"}, (body, r.text)


def test_the_submission_reads_the_header_off_the_event_loop(slides_root, models, monkeypatch):
    # A header that is slow to read (a file on a slow share) must not keep other requests waiting.
    import threading

    import httpx

    import bridge.service.paths

    reading, release = threading.Event(), threading.Event()
    real = bridge.service.paths.slide_size

    def slow(path):
        reading.set()
        release.wait(30)
        return real(path)

    monkeypatch.setattr(bridge.service.paths, "slide_size", slow)
    settings = ServiceSettings(port=free_port(), allow_roots=(slides_root,), pipeline=PipelineConfig(device="cpu"))
    with served(settings, models) as c:
        answers = []
        body = {"image": str(slides_root / "small.svs"), "outputs": ["regions"]}
        submit = threading.Thread(target=lambda: answers.append(httpx.post(f"{c.base_url}/v1/jobs", json=body)))
        submit.start()
        try:
            assert reading.wait(10), "the submission did not read the header"
            assert c.get("/v1/health", timeout=5).status_code == 200  # answered while the submission reads
        finally:
            release.set()
            submit.join(30)
        assert answers[0].status_code == 202, answers[0].text
        wait_for_job(c, answers[0].json()["job_id"])


def test_an_upload_is_analysed_in_its_opaque_pixels_only(client, slides_root):
    # Transparent pixels read as glass, but the analysis ran over the whole rectangle: its uncertainty tiles were
    # whole 64 µm cells over the ROI's edge, out of the annotation they belong to. Now the opaque pixels are the ROI.
    from inference import open_slide

    with open_slide(slides_root / "small.svs") as slide:
        rgb = slide.read_region((128, 128), 0, (768, 768))  # tissue
    alpha = np.zeros((768, 768), np.uint8)
    alpha[100:500, 150:550] = 255  # a 200 µm square ROI inside the rectangle
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(buf, format="PNG")
    params = {"mpp": 0.5, "origin_x": 1000, "origin_y": 2000, "downsample": 2, "outputs": ["uncertainty_tiles"]}
    r = client.post("/v1/jobs/pixels", params=params, content=buf.getvalue())
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["state"] == "done"
    tiles = client.get(f"/v1/jobs/{r.json()['job_id']}/result").json()["features"]
    assert len(tiles) >= 4
    xs = [x for t in tiles for ring in t["geometry"]["coordinates"] for x, _ in ring]
    ys = [y for t in tiles for ring in t["geometry"]["coordinates"] for _, y in ring]
    # In level-0 px: the origin plus twice the opaque pixels' edges, x 1300-2100 and y 2200-3000; the 64 µm cells
    # (128 uploaded px) over its edges trimmed to it.
    assert (min(xs), max(xs), min(ys), max(ys)) == (1300, 2100, 2200, 3000), (xs, ys)


def _rgba_png(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(buf, format="PNG")
    return buf.getvalue()


def test_an_upload_s_alpha_says_which_pixels_are_the_roi_which_its_context_and_which_absent():
    # Alpha 128 counted as the ROI (alpha >= 128) and was put over white. Now 255 is the ROI, 1 to 254 context:
    # its colours as sent, part of the image (Slide.opaque) but outside the area analysed; 0 absent, as before.
    from bridge.service.uploads import opened_upload

    rgb = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 3).astype(np.uint8)
    alpha = np.array([[255, 255, 128, 1, 0, 0]] * 4, np.uint8)
    alpha[3] = 128
    with opened_upload(_rgba_png(rgb, alpha), mpp=1.0) as up:
        seen = up.slide.read_region((0, 0), 0, (6, 4))
        assert np.array_equal(up.slide.opaque, alpha > 0)
        assert up.area.bounds == (0.0, 0.0, 2.0, 3.0)  # the outline of the alpha-255 pixels
    assert np.array_equal(seen[alpha > 0], rgb[alpha > 0]) and (seen[alpha == 0] == 255).all()
    # A client that sends only 0 and 255 (as all did before context) gets what it got.
    old = np.where(alpha == 255, 255, 0).astype(np.uint8)
    with opened_upload(_rgba_png(rgb, old), mpp=1.0) as up:
        assert np.array_equal(up.slide.opaque, old == 255) and up.area.bounds == (0.0, 0.0, 2.0, 3.0)


def _failed_upload_error(client, alpha: int) -> str:
    """The error of a job on a 64 x 64 grey upload whose every pixel has ``alpha``, which must fail."""
    rgb = np.full((64, 64, 3), 200, np.uint8)
    r = client.post("/v1/jobs/pixels", params={"mpp": 0.5}, content=_rgba_png(rgb, np.full((64, 64), alpha, np.uint8)))
    assert r.status_code == 202, r.text
    status = wait_for_job(client, r.json()["job_id"])
    assert status["state"] == "failed"
    return status["error"]


def test_an_upload_of_context_without_a_roi_pixel_is_refused_saying_what_alpha_means(client):
    error = _failed_upload_error(client, 128)
    assert error.endswith(
        "the upload has context pixels (alpha 1 to 254) but none inside its ROI (alpha 255), so nothing in it would "
        "be reported; send the ROI's pixels with alpha 255 (pdl1_analyze.groovy does), the tissue around it with "
        "alpha 1 to 254 and absent pixels with alpha 0"
    ), error


def test_an_upload_of_transparent_pixels_only_is_refused_not_analysed_as_no_tissue(client):
    # helper-131: alpha 0 everywhere was a finished job saying "almost no tissue".
    error = _failed_upload_error(client, 0)
    assert error.endswith(
        "every pixel of the upload is transparent (alpha 0), so there is nothing to analyse; send the ROI's pixels "
        "with alpha 255 (pdl1_analyze.groovy does)"
    ), error


def test_an_upload_s_context_is_seen_but_nothing_is_reported_there(client, slides_root):
    # The tissue around a 200 µm square ROI, sent as context (alpha 128): the analysis sees it (the domain guard
    # scores the upload, whose tile it fills, as a path job's tile holds the tissue around its ROI; amid transparent
    # pixels the tile is mostly white and not scored) and reports only in the ROI: the nuclei whose centres lie in
    # the context, which the whole rectangle sent as ROI finds, are not returned, nor regions or tiles there.
    from inference import open_slide

    with open_slide(slides_root / "small.svs") as slide:
        rgb = slide.read_region((128, 128), 0, (768, 768))  # tissue, 384 µm at 1 µm/px
    roi = np.zeros((768, 768), bool)
    roi[100:500, 150:550] = True
    params = {"mpp": 0.5, "origin_x": 1000, "origin_y": 2000, "downsample": 2,
              "outputs": ["regions", "uncertainty_tiles", "nuclei"]}  # fmt: skip

    def result(alpha: np.ndarray) -> dict:
        r = client.post("/v1/jobs/pixels", params=params, content=_rgba_png(rgb, alpha.astype(np.uint8)))
        assert r.status_code == 202, r.text
        assert wait_for_job(client, r.json()["job_id"])["state"] == "done"
        return client.get(f"/v1/jobs/{r.json()['job_id']}/result").json()

    context, transparent, whole = (result(np.where(roi, 255, outside)) for outside in (128, 0, 255))
    # In level-0 px: the origin plus twice the ROI pixels' edges, x 1300-2100 and y 2200-3000.
    inside = box(1300, 2200, 2100, 3000)

    def points(r: dict) -> list[Point]:
        return [Point(f["geometry"]["coordinates"]) for f in r["features"] if f["geometry"]["type"] == "Point"]

    assert any(not inside.contains(p) for p in points(whole))  # nuclei there to leave out
    assert points(context) and all(inside.contains(p) for p in points(context))
    for f in context["features"]:
        if f["geometry"]["type"] != "Point":
            assert inside.buffer(1e-6).contains(shape(f["geometry"])), f["properties"]
    tiles = [shape(f["geometry"]) for f in context["features"] if f["properties"]["objectType"] == "tile"]
    assert unary_union(tiles).bounds == (1300, 2200, 2100, 3000)
    # Seen: the context fills the segmentation's tile, so the guard scores it; amid transparent pixels it does not.
    assert context["pdl1"]["domain"]["out_of_domain_score"] is not None
    assert transparent["pdl1"]["domain"]["out_of_domain_score"] is None


# ------------------------------------------------------------------- the models listed


def test_listing_the_ihc_model_does_not_load_it(client, models, monkeypatch):
    def loading():
        raise AssertionError("listing the models loaded the IHC model's weights")

    monkeypatch.setattr(models, "ihc", loading)
    listed = client.get("/v1/models").json()
    assert [m["name"] for m in listed if m["stain"] == "H-DAB"] == ["pdl1-nuclei-ihc"]


def test_an_ihc_model_folder_that_does_not_read_is_not_listed_and_logged(tmp_path, caplog):
    from bridge.service import ihc_manifest

    with caplog.at_level("WARNING", logger="bridge.service"):
        assert ihc_manifest(PipelineConfig(device="cpu", ihc_model_dir=str(tmp_path))) is None
    [record] = caplog.records
    assert record.getMessage().startswith("the PD-L1 IHC nuclei model is not listed, and H-DAB images will fail: ")
    assert "no model manifest" in record.getMessage()


def test_serve_models_without_nuclei_ihc_says_to_add_it_there_not_to_leave_an_option_out(tmp_path, slides_root, caplog):
    # Said "or leave the model option out to use the shipped demo", which `pdl1 serve --models DIR` cannot do.
    from bridge.service import ihc_manifest

    missing = tmp_path / "models" / "nuclei-ihc"
    pipeline = PipelineConfig(device="cpu", ihc_model_dir=str(missing))
    fix = (
        f"{missing} does not exist, so the service has no PD-L1 IHC nuclei model: add a nuclei-ihc/ model folder "
        f"to the --models folder {missing.parent} (copy the shipped "
    )
    with caplog.at_level("WARNING", logger="bridge.service"):
        assert ihc_manifest(pipeline) is None
    [record] = caplog.records
    assert fix in record.getMessage() and "leave the model option out" not in record.getMessage()
    # The command that trains one: `pdl1 train` alone is refused, and an H&E nuclei model is no IHC one.
    assert "or put a model trained with `pdl1 train nuclei --stain ihc` there" in record.getMessage()

    settings = ServiceSettings(port=free_port(), allow_roots=(slides_root,), pipeline=pipeline)
    with served(settings, Models(pipeline)) as c:
        body = {"image": str(slides_root / "small.svs"), "image_type": "BRIGHTFIELD_H_DAB", "outputs": ["nuclei"]}
        status = wait_for_job(c, c.post("/v1/jobs", json=body).json()["job_id"])
    assert status["state"] == "failed"
    assert status["error"].startswith(fix) and status["error"].endswith(
        "the next H-DAB job loads it, no restart needed"
    )


def test_an_mpp_of_true_is_refused_not_taken_as_1(client, slides_root):
    """pydantic took "mpp": true as 1.0 µm/px, and the job ran at that scale."""
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "mpp": True})
    assert r.status_code == 422, r.text
    assert "mpp must be a number (the image's µm/px, e.g. 0.25), got true" in r.json()["detail"]


def test_empty_outputs_are_refused_naming_those_there_are(client, slides_root):
    """An empty list ran a job with no objects, and pdl1_analyze.groovy replaced the earlier results with none."""
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), "outputs": []})
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": "bad request: body.outputs: outputs is empty, so the job would return no objects; "
        "send some of regions, uncertainty_tiles, sua, nuclei, or omit outputs for all of them"
    }


@pytest.mark.parametrize("image", ["{path}\n", " {path}", "\t{uri}"])
def test_a_path_pasted_with_white_space_at_either_end_says_so(client, slides_root, image):
    """Said "image not found: /…/small.svs" with the newline invisible, of a file that is there; white space before
    the path said it "is relative"."""
    path = slides_root / "small.svs"
    image = image.format(path=path, uri=path.as_uri())
    r = client.post("/v1/jobs", json={"image": image})
    assert (r.status_code, r.json()) == (
        404,
        {
            "detail": f"image not found: {image!r}, which ends or starts with white space (a line "
            "end copied with the path?); send the path without it",
            "cannot_open": True,
        },
    )


def test_an_roi_nested_too_deep_is_a_422_not_a_500(client, slides_root):
    """900 nested lists made shapely recurse past Python's limit: 'internal error (RecursionError)', a 500."""
    coordinates = "[" * 900 + "]" * 900
    body = f'{{"image": "{slides_root / "small.svs"}", "roi": {{"type": "Polygon", "coordinates": {coordinates}}}}}'
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "roi's coordinates are nested 900 lists deep; a GeoJSON Polygon nests 3" in r.json()["detail"]


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_json_nested_past_the_parser_s_depth_is_a_422_saying_so(client, slides_root, nested):
    """Nested past where Python's JSON parser recurses, a 400 said 'There was an error parsing the body'."""
    body = f'{{"image": "{slides_root / "small.svs"}", "roi": {nested}}}'
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (
        422,
        {
            "detail": "bad request: body: not valid JSON here: its arrays or objects are nested inside each other "
            'deeper than the service parses (a few hundred levels); expected a JSON object such as {"image": '
            '"/path/to/slide.svs"}, whose roi nests its coordinates 3 lists deep (a Polygon) or 4 (a MultiPolygon): '
            "send the annotation's outline as QuPath gives it"
        },
    )


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("mpp", "0.5", 'mpp must be a number (the image\'s µm/px, e.g. 0.25), got "0.5"'),
        ("image_size_px", ["1024", "1024"], 'image_size_px must be two whole JSON numbers (width, height in px), got'),
        ("roi", {"type": "Polygon", "coordinates": [[["0", "0"], ["9", "0"], ["9", "9"], ["0", "0"]]]},
         "roi is not a readable GeoJSON Polygon (a vertex holds text, '0'); expected rings of [x, y] vertices as "
         "JSON numbers"),
    ],
)  # fmt: skip
def test_numbers_sent_as_text_are_refused_not_converted(client, slides_root, field, value, said):
    """pydantic (and shapely, for an ROI's vertices) took "0.5" and ["1024", "1024"] as the numbers (helper-166): a
    client that sends text has other numbers wrong as likely."""
    r = client.post("/v1/jobs", json={"image": str(slides_root / "small.svs"), field: value})
    assert r.status_code == 422, r.text
    assert said in r.json()["detail"]
