"""How the service runs: host, token, allowed roots, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inference import PipelineConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs; built by the CLI (or by tests) and never read from the environment below it."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_roots: tuple[Path, ...] = ()
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_request_bytes: int = 64 * 2**20
    max_upload_px: int = 8192 * 8192
    max_page: int = 200_000
    keep_results: int = 16
    max_queued: int = 16

    def __post_init__(self) -> None:
        if self.keep_results < 1:
            raise ValueError(f"--keep-results must be at least 1, got {self.keep_results}")
        if self.max_queued < 1:
            raise ValueError(f"--max-queued must be at least 1, got {self.max_queued}")
        if self.host not in LOOPBACK and not self.token:
            raise ValueError(
                f"binding {self.host} exposes the service beyond this machine: pass --token (every request "
                "must then send it) or keep the default --host 127.0.0.1"
            )
        if not self.allow_roots:
            raise ValueError("no --allow-root: give the folders whose images the service may open")
        for root in self.allow_roots:
            # A root that is not there would refuse every image with 403 while the service looked healthy.
            if not root.is_dir():
                what = "is a file" if root.exists() else "does not exist"
                raise ValueError(
                    f"--allow-root {root} {what}; expected a folder on this machine that holds the images "
                    "(check the path, or mount the share before starting the service)"
                )
