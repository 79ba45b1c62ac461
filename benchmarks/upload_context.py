"""A pixel upload against a path job on the same pixels, per context margin: how much of the tissue around an ROI
an upload must carry (alpha 1-254, seen but not reported) to be analysed as the path job is.

``python -m benchmarks.upload_context [--margins 0,32,...] [--old]``: for the tests' octagon on a phantom's level 0
(a plain TIFF at 0.5 µm/px, so its 2 µm/px pixels are averaged as a scanner's pyramid and QuPath's rendering
average them), the same octagon on the real H&E tile ``real-he-hgsc-stroma`` and a 100 µm square on it, one row per
margin: the upload as pdl1_analyze.groovy makes it (the ROI's bounds grown by the margin, clamped to the image,
read at 1 µm/px; alpha 255 where an uploaded pixel's centre lies in the ROI, 128 elsewhere) sent to the service
beside a path job on the file with the same ROI, and the PD-L1 positive regions' IoU, the predicted TPS, the nuclei
and the out-of-domain score of both. ``--old`` adds the upload of a client before context (the ROI's bounds, alpha
0 outside the ROI); ``--ihc`` sends them as H-DAB (QuPath's BRIGHTFIELD_H_DAB), analysed by the IHC nuclei model
(TPS from its cells; no positive regions, so no IoU). The demo models, on the CPU.

Not a registry benchmark: it prints a table.
"""

from __future__ import annotations

import argparse
import io
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image
from shapely import contains_xy
from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from bridge.service import ServiceSettings, create_app
from inference import open_slide
from inference.pipeline import Models, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
REAL_TILE = ROOT.parent / "shared" / "fixtures" / "real-he-hgsc-stroma" / "hgsc_stroma.svs"
# An octagon, level-0 px at 0.5 µm/px, its bounds off the pixel grid; tests/test_groovy_pixel_upload.py's parity
# test analyses it too.
OCTAGON = Polygon(
    [
        (500.5, 300.3),
        (1000.2, 300.3),
        (1300.7, 600.0),
        (1300.7, 1000.0),
        (1000.2, 1300.9),
        (500.5, 1300.9),
        (200.4, 1000.0),
        (200.4, 600.0),
    ]
)
SQUARE_100UM = box(650, 650, 850, 850)  # 200 level-0 px at 0.5 µm/px, amid the real tile
UPLOAD_MPP = 1.0
CONTEXT_ALPHA = 128
# QuPath's image type: the outputs asked for and the TPS measurement on the parent.
ANALYSES = {
    "BRIGHTFIELD_H_E": (["regions", "nuclei"], "PD-L1: Predicted TPS % (H&E)"),
    "BRIGHTFIELD_H_DAB": (["nuclei"], "PD-L1: TPS %"),
}


def upload_png(
    slide_path: Path, roi: BaseGeometry, *, margin_um: float | None, image_type: str = "BRIGHTFIELD_H_E"
) -> tuple[bytes, dict]:
    """The upload pdl1_analyze.groovy makes of ``roi`` with ``margin_um`` of context (None: a client before
    context, alpha 0 outside the ROI), and its query."""
    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        mpp = slide.mpp.mean
        ds = UPLOAD_MPP / mpp
        grow = 0.0 if margin_um is None else margin_um / mpp
        x0, y0, x1, y1 = roi.bounds
        x, y = max(0, int(np.floor(x0 - grow))), max(0, int(np.floor(y0 - grow)))
        xe, ye = min(width, int(np.ceil(x1 + grow))), min(height, int(np.ceil(y1 + grow)))
        size = (max(1, round((xe - x) / ds)), max(1, round((ye - y) / ds)))
        rgb = slide.read_region_at_mpp((x, y), size, mpp=UPLOAD_MPP)
    jj, ii = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    inside = contains_xy(roi, x + (ii + 0.5) * ds, y + (jj + 0.5) * ds)
    alpha = np.where(inside, 255, 0 if margin_um is None else CONTEXT_ALPHA).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(buf, format="PNG")
    query = {"mpp": UPLOAD_MPP, "origin_x": x, "origin_y": y, "downsample": ds, "outputs": ANALYSES[image_type][0],
             "image_type": image_type}  # fmt: skip
    return buf.getvalue(), query


def _result(client: httpx.Client, response: httpx.Response) -> dict:
    if response.status_code != 202:
        raise RuntimeError(response.text)
    job_id = response.json()["job_id"]
    while (status := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.05)
    if status["state"] != "done":
        raise RuntimeError(str(status))
    return client.get(f"/v1/jobs/{job_id}/result").json()


def path_result(client: httpx.Client, slide_path: Path, roi: BaseGeometry, *, image_type: str) -> dict:
    body = {"image": str(slide_path), "roi": {"type": "Polygon", "coordinates": [list(map(list, roi.exterior.coords))]},
            "image_type": image_type, "outputs": ANALYSES[image_type][0]}  # fmt: skip
    return _result(client, client.post("/v1/jobs", json=body))


def upload_result(
    client: httpx.Client, slide_path: Path, roi: BaseGeometry, *, margin_um: float | None, image_type: str
) -> dict:
    png, query = upload_png(slide_path, roi, margin_um=margin_um, image_type=image_type)
    return _result(client, client.post("/v1/jobs/pixels", params=query, content=png))


def positive(result: dict) -> BaseGeometry:
    return unary_union(
        [
            shape(f["geometry"])
            for f in result["features"]
            if f["properties"].get("classification", {}).get("name") == "PD-L1 positive"
        ]
    )


def nuclei(result: dict) -> int:
    return sum(f["geometry"]["type"] == "Point" for f in result["features"])


def compared(upload: dict, path: dict, *, tps: str) -> dict:
    """The upload's numbers beside the path job's (IoU None where neither has positive regions)."""
    a, b = positive(upload), positive(path)
    union = a.union(b).area
    score = [r["pdl1"]["domain"]["out_of_domain_score"] for r in (upload, path)]
    return {
        "iou": a.intersection(b).area / union if union else None,
        "tps": [r["pdl1"]["parent_measurements"].get(tps) for r in (upload, path)],
        "nuclei": [nuclei(upload), nuclei(path)],
        "score": score,
    }


def flat_phantom(folder: Path) -> Path:
    """The tests' phantom's level 0 alone, as a plain TIFF at 0.5 µm/px."""
    import tifffile

    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    write_phantom(folder / "p.svs", PhantomSpec(2048, 2048, seed=1, tps_percent=30))
    with open_slide(folder / "p.svs") as slide:
        level0 = slide.read_region((0, 0), 0, slide.dimensions)
    path = folder / "p_level0.tif"
    tifffile.imwrite(path, level0, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--margins", default="0,32,64,128,256,512", help="context margins, µm, comma-separated")
    parser.add_argument("--old", action="store_true", help="also the upload of a client before context")
    parser.add_argument("--ihc", action="store_true", help="send the images as H-DAB (the IHC nuclei model)")
    args = parser.parse_args()
    image_type = "BRIGHTFIELD_H_DAB" if args.ihc else "BRIGHTFIELD_H_E"
    margins: list[float | None] = ([None] if args.old else []) + [float(m) for m in args.margins.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="pdl1-upload-context-"))
    cases = [("phantom level 0, octagon", flat_phantom(folder), OCTAGON)]
    if REAL_TILE.exists():
        cases += [("real HGSC tile, octagon", REAL_TILE, OCTAGON), ("real HGSC tile, 100 µm square", REAL_TILE,
                                                                     SQUARE_100UM)]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    roots = tuple({folder, REAL_TILE.parent})
    settings = ServiceSettings(port=port, allow_roots=roots, pipeline=PipelineConfig(device="cpu"))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, models=Models(settings.pipeline)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print("| image, ROI | margin µm | IoU | TPS upload / path | nuclei upload / path | domain score upload / path |")
    print("|---|---|---|---|---|---|")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for name, slide_path, roi in cases:
                path = path_result(client, slide_path, roi, image_type=image_type)
                for margin in margins:
                    upload = upload_result(client, slide_path, roi, margin_um=margin, image_type=image_type)
                    c = compared(upload, path, tps=ANALYSES[image_type][1])
                    shown = "before context" if margin is None else f"{margin:g}"
                    iou = "-" if c["iou"] is None else f"{c['iou']:.3f}"
                    print(
                        f"| {name} | {shown} | {iou} | {fmt(c['tps'][0])} / {fmt(c['tps'][1])} | "
                        f"{c['nuclei'][0]} / {c['nuclei'][1]} | {fmt(c['score'][0])} / {fmt(c['score'][1])} |",
                        flush=True,
                    )
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
