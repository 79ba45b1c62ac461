"""The service under load: a 2k x 2k px ROI job with the demo models, one client vs four at once."""

from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from benchmarks import Benchmark, Case
from bridge.service import ServiceSettings, create_app
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig


class ServiceRoi(Benchmark):
    """Jobs/min and latency of 2k x 2k ROI jobs through a real uvicorn: one client in turn vs four at once."""

    unit = "jobs/min"
    extra_columns = ("mean latency s", "max latency s")
    repeats = 1
    warmup = False

    def setup(self, *, quick: bool) -> None:
        self.roi_px = 1024 if quick else 2048
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.slide = self.tmp / "bench.svs"
        write_phantom(self.slide, PhantomSpec(self.roi_px + 1024, self.roi_px + 1024, seed=79))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = ServiceSettings(port=port, allow_roots=(self.tmp,), pipeline=PipelineConfig(device="auto"))
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, models=Models(settings.pipeline)), host="127.0.0.1", port=port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{port}"
        x0 = 512
        x1 = x0 + self.roi_px
        self.body = {
            "image": str(self.slide),
            "roi": {"type": "Polygon", "coordinates": [[[x0, x0], [x1, x0], [x1, x1], [x0, x1], [x0, x0]]]},
        }
        self.latencies: dict[str, list[float]] = {}

    def _job(self) -> float:
        t0 = time.perf_counter()
        with httpx.Client(base_url=self.base, timeout=600) as c:
            job = c.post("/v1/jobs", json=self.body).json()["job_id"]
            while c.get(f"/v1/jobs/{job}").json()["state"] not in ("done", "failed", "cancelled"):
                time.sleep(0.05)
            c.get(f"/v1/jobs/{job}/result").raise_for_status()
        return time.perf_counter() - t0

    def _one_client(self) -> float:
        self.latencies["one"] = [self._job() for _ in range(4)]
        return 4 * 60.0  # jobs x 60 s: the harness divides by seconds, giving jobs/min

    def _four_clients(self) -> float:
        out: list[float] = []
        threads = [threading.Thread(target=lambda: out.append(self._job())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.latencies["four"] = out
        return 4 * 60.0

    def cases(self) -> list[Case]:
        return [
            Case("one client, 4 jobs in turn", self._one_client, baseline=True),
            Case("four clients, 1 job each at once", self._four_clients),
        ]

    def extra(self, label: str) -> dict[str, str]:
        lat = self.latencies.get("one" if label.startswith("one") else "four", [])
        if not lat:
            return {}
        return {"mean latency s": f"{statistics.mean(lat):.2f}", "max latency s": f"{max(lat):.2f}"}

    def conditions(self) -> dict[str, str]:
        return {
            "roi": f"{self.roi_px}x{self.roi_px} px at 0.5 µm/px, all outputs",
            "service": "one inference worker; jobs queue (FIFO)",
        }

    def teardown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
