"""Whether the service keeps answering while it takes in a large request or hands over a large result.

A second client polls ``GET /v1/health`` every 20 ms (QuPath's script polls job status every few hundred ms,
and several pathologists share one service) while the first posts a job request near the body limits (8 MiB of
QuPath's full-precision vertices, or 250 000 short ones), one whose ROI is refused (422), a 48 MiB pixel upload,
or fetches a 200 000-nucleus result in one page. Each case reports the worst health latency it saw: whatever
holds the event loop, or the GIL for long in one C call (``json.loads``, ``json.dumps``, a pass of the garbage
collector), shows there. Baseline: the same polling with nothing else sent.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from benchmarks import Benchmark, Case, Result
from benchmarks.result_pages import _result
from bridge.service import ServiceSettings, create_app
from bridge.service.jobs import Job
from inference.pipeline import Models, PipelineConfig

# The other client, in its own process: sends one request when told to, cancels the job it made, says how it went.
_CLIENT = """
import json, sys, time
import httpx
base, method, path, body, content_type = sys.argv[1:]
with httpx.Client(base_url=base, timeout=120) as client:
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    content = open(body, "rb").read() if body else None
    answer = client.request(method, path, content=content, headers={"Content-Type": content_type} if body else {})
    seconds = time.perf_counter() - t0
    if answer.status_code == 202:
        client.delete(f"/v1/jobs/{answer.json()['job_id']}")
    print(json.dumps({"status": answer.status_code, "bytes": len(answer.content), "seconds": seconds}), flush=True)
"""
POLL_S = 0.02
QUIET_S = 0.3  # polled before and after the request, so the worst latency is the request's
RESULT_NUCLEI = 200_000  # the service's largest page (--max-page's default)


def _ring(n: int, *, radius_px: float, digits: int | None) -> list[list[float]]:
    """A circle of ``n`` vertices (closed), full-precision doubles as QuPath sends them or rounded to ``digits``."""
    ring = []
    for i in range(n):
        a = 2 * math.pi * i / n
        x, y = 300_000 + radius_px * math.cos(a), 300_000 + radius_px * math.sin(a)
        ring.append([round(x, digits), round(y, digits)] if digits is not None else [x + 1e-7, y + 1e-7])
    return [*ring, ring[0]]


class _Poller:
    """``GET /v1/health`` every ``POLL_S`` from its own thread and client, recording each answer's latency."""

    def __init__(self, base: str):
        self.base = base
        self.latencies_s: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                client.get("/v1/health").raise_for_status()
                latency = time.perf_counter() - t0
                self.latencies_s.append(latency)
                time.sleep(max(0.0, POLL_S - latency))

    def __enter__(self) -> _Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class ServiceLoop(Benchmark):
    """Worst /v1/health latency while another client posts a large job request or fetches a large result.

    /v1/health is polled every 20 ms meanwhile."""

    unit = "worst health ms"
    extra_columns = ("99th pct health ms", "median health ms", "polls", "request s", "answer")
    repeats = 3

    def setup(self, *, quick: bool) -> None:
        logging.getLogger("bridge.service.jobs").setLevel(logging.ERROR)  # each job here fails, by design
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.slide = self.tmp / "bench.svs"
        self.slide.write_bytes(b"not a slide: the job fails in the worker, after everything measured here")
        settings = ServiceSettings(port=0, allow_roots=(self.tmp,), pipeline=PipelineConfig(device="cpu"))
        self.app = create_app(settings, models=Models(settings.pipeline))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        scale = 10 if quick else 1
        image = str(self.slide)
        self.full_vertices = 200_000 // scale
        full = _ring(self.full_vertices, radius_px=100_000, digits=None)
        self.short_vertices = 249_000 // scale
        short = _ring(self.short_vertices, radius_px=100_000, digits=0)
        crossed = [*short]
        crossed[1], crossed[2] = crossed[2], crossed[1]  # a bow tie: self-intersecting, refused after parsing
        self.bodies = {
            "full": json.dumps({"image": image, "roi": {"type": "Polygon", "coordinates": [full]}}).encode(),
            "short": json.dumps(
                {"image": image, "roi": {"type": "Polygon", "coordinates": [short]}}, separators=(",", ":")
            ).encode(),
            "crossed": json.dumps(
                {"image": image, "roi": {"type": "Polygon", "coordinates": [crossed]}}, separators=(",", ":")
            ).encode(),
        }
        for key, body in self.bodies.items():
            (self.tmp / f"{key}.json").write_bytes(body)
        side_px = 4096 // (3 if quick else 1)
        pixels = np.random.default_rng(0).integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG", compress_level=1)  # noise: about 3 bytes a pixel
        self.upload = png.getvalue()
        (self.tmp / "upload.png").write_bytes(self.upload)
        self.nuclei = RESULT_NUCLEI // scale
        self.job_id = uuid.uuid4().hex
        done = Job(id=self.job_id, image=image, roi=None, mpp=0.5, outputs=("nuclei",), state="done")
        done.result = _result(self.nuclei)
        worker = self.app.state.worker
        with worker.lock:
            worker.jobs[done.id] = done
            worker.finished.append(done.id)
        self.seen: dict[str, dict[str, list[float] | str]] = {}

    def _measured(self, label: str, request: tuple[str, str, Path | None, str] | None) -> float:
        """Polls health while ``request`` (method, path, body file, Content-Type) is sent by a child process: in
        this one, the client's own work (reading 75 MiB) would hold the GIL against the service's loop."""
        child = None
        if request is not None:
            child = subprocess.Popen(
                [sys.executable, "-c", _CLIENT, self.base, *(str(part or "") for part in request)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the client process did not start")
        with _Poller(self.base) as poller:
            time.sleep(QUIET_S)
            answer = None
            if child is not None:
                child.stdin.write("go\n")
                child.stdin.flush()
                answer = json.loads(child.stdout.readline())
                child.wait()
            time.sleep(QUIET_S)
        seen = self.seen.setdefault(label, {"latencies_s": [], "requests_s": [], "answer": ""})
        seen["latencies_s"].extend(poller.latencies_s)
        if answer is not None:
            if answer["status"] not in (200, 202, 422):
                raise RuntimeError(f"unexpected answer: {answer}")
            seen["requests_s"].append(answer["seconds"])
            seen["answer"] = f"{answer['status']}, {answer['bytes'] / 2**20:.1f} MiB"
        return len(poller.latencies_s)

    def _post(self, key: str) -> tuple[str, str, Path, str]:
        return ("POST", "/v1/jobs", self.tmp / f"{key}.json", "application/json")

    def cases(self) -> list[Case]:
        mib = {k: f"{len(v) / 2**20:.1f} MiB" for k, v in self.bodies.items()}
        return [
            Case("health polled alone", lambda: self._measured("idle", None), baseline=True),
            Case(
                f"job request, {self.full_vertices:,} full-precision vertices ({mib['full']})",
                lambda: self._measured("full", self._post("full")),
            ),
            Case(
                f"job request, {self.short_vertices:,} short vertices ({mib['short']})",
                lambda: self._measured("short", self._post("short")),
            ),
            Case(
                f"job request, self-intersecting ROI ({mib['crossed']}, 422)",
                lambda: self._measured("crossed", self._post("crossed")),
            ),
            Case(
                f"pixel upload, {len(self.upload) / 2**20:.0f} MiB PNG (job cancelled at once)",
                lambda: self._measured(
                    "upload", ("POST", "/v1/jobs/pixels?mpp=0.5", self.tmp / "upload.png", "image/png")
                ),
            ),
            Case(
                f"result of {self.nuclei:,} nuclei in one page",
                lambda: self._measured("result", ("GET", f"/v1/jobs/{self.job_id}/result", None, "")),
            ),
        ]

    def _key(self, label: str) -> str:
        for prefix, key in (("health", "idle"), ("result", "result"), ("pixel", "upload")):
            if label.startswith(prefix):
                return key
        return "full" if "full-precision" in label else "crossed" if "intersecting" in label else "short"

    def rate(self, result: Result) -> float:
        return 1000 * max(self.seen[self._key(result.label)]["latencies_s"])

    def extra(self, label: str) -> dict[str, str]:
        seen = self.seen[self._key(label)]
        return {
            "99th pct health ms": f"{1000 * statistics.quantiles(seen['latencies_s'], n=100)[98]:.1f}",
            "median health ms": f"{1000 * statistics.median(seen['latencies_s']):.1f}",
            "polls": str(len(seen["latencies_s"])),
            "request s": f"{min(seen['requests_s']):.2f}" if seen["requests_s"] else "",
            "answer": str(seen["answer"]),
        }

    def conditions(self) -> dict[str, str]:
        return {
            "service": "uvicorn in-process, one event loop; health polled every 20 ms by a second client",
            "timing": "health latency over all repeats (warm-up included); fastest request, sent from another process",
        }

    def teardown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
