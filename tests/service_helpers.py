"""The service on loopback for tests: a free port, uvicorn in a thread, a job waited for."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from bridge.service import ServiceSettings, create_app
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models


def free_port() -> int:
    """A port nothing listens on now (8765 may be another service's on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_phantom_root(root: Path) -> Path:
    """``root`` (an allowed root of the service under test) holding ``small.svs``, a 1024² phantom at TPS 50."""
    write_phantom(root / "small.svs", PhantomSpec(1024, 1024, seed=41, tps_percent=50))
    return root


@contextmanager
def served(settings: ServiceSettings, models: Models) -> Iterator[httpx.Client]:
    """The service running in a thread on loopback for the block, with a client of it; stopped afterwards."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, models=models), host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """The job's status once it is done, failed or cancelled."""
    deadline = time.time() + timeout
    status: dict = {}
    while time.time() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {status}")
