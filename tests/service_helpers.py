"""The service on loopback for tests: a free port, uvicorn in a thread, a job waited for."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from bridge.service import ServiceSettings, create_app
from inference.pipeline import Models


def free_port() -> int:
    """A port nothing listens on now (8765 may be another service's on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(settings: ServiceSettings, models: Models) -> tuple[uvicorn.Server, threading.Thread]:
    """Start the service in a thread; stop it with ``server.should_exit = True`` and ``thread.join()``."""
    app = create_app(settings, models=models)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return server, thread


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
