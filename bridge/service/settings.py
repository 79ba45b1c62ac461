"""How the service runs: host, token, allowed roots, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inference import PipelineConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")

# A job request's JSON body (POST /v1/jobs): parsing and validating it takes time and memory by vertices. On the
# event loop, where FastAPI did it, no other request was answered meanwhile (an ROI of 2 million vertices, 34 MB,
# held /v1/health 5 s and took 260 MB; 9.4 s in the security review); now a worker thread does it in short steps
# (bridge.service.bodies), but the time and memory remain. QuPath (pdl1_analyze.groovy) sends a vertex as 18 bytes
# ("[12345.0,67890.0],") to 39 (full-precision doubles), so 100 000 vertices, more than a whole-slide tissue
# outline has, take 1.7 to 3.7 MiB: the limit is twice that.
MAX_JSON_BYTES = 8 * 2**20
# And the vertices it may hold, counted before it is parsed: the time taken goes by vertices, not bytes, and 8 MiB
# of short ones ("[1,2],", 1.4 million) held /v1/health 3.9 s; at either limit (250 000 short vertices, or 215 000
# full-precision ones in 8 MiB) it waited 0.7 to 1.4 s on a busy 2-core machine, 0.3 s for 100 000 of QuPath's;
# parsed in the worker thread, 40 to 160 ms on that machine (python -m benchmarks service_loop).
MAX_ROI_VERTICES = 250_000
# The shortest token a service beyond loopback takes: anyone who can reach the port may guess at it, and wrong
# tokens are not slowed down. secrets.token_urlsafe(32) gives 43 characters.
MIN_PUBLIC_TOKEN_CHARS = 16
MAKE_A_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def token_characters_problem(token: str) -> str | None:
    """Why no HTTP client can send ``token`` in its ``Authorization`` header, else None. A header carries
    printable ASCII: Starlette reads one as latin-1 while the token is compared as UTF-8, so a non-ASCII token never
    matched, and white space inside it (a --token-file of two lines, stripped only at its ends) is no part of a
    Bearer credential; either way every request was a 401. The character is not shown: it is part of a secret.

    >>> token_characters_problem("s3cret-token_x.y~z") is None
    True
    >>> token_characters_problem("two\\nlines")[:56]
    'the token holds a line break (character 4 of 9); a token'
    """
    for index, char in enumerate(token):
        if "!" <= char <= "~":
            continue
        if char in "\r\n":
            what = "a line break"
        elif char.isspace():
            what = "white space"
        elif char.isascii():
            what = "a control character"
        else:
            what = "a character outside ASCII"
        return (
            f"the token holds {what} (character {index + 1} of {len(token)}); a token may hold only printable "
            "ASCII characters without white space (letters, digits and punctuation such as - _ . ~), which every "
            f"HTTP client can send: make one with `{MAKE_A_TOKEN}`"
        )
    return None


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs; built by the CLI (or by tests) and never read from the environment below it."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_roots: tuple[Path, ...] = ()
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_request_bytes: int = 64 * 2**20  # a pixel upload's body (POST /v1/jobs/pixels)
    max_json_bytes: int = MAX_JSON_BYTES  # any other request's body: a job request's JSON
    max_roi_vertices: int = MAX_ROI_VERTICES  # in that JSON, counted before it is parsed
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
        problem = None if self.token is None else token_characters_problem(self.token)
        if problem is not None:
            raise ValueError(problem)
        if self.host not in LOOPBACK and self.token is not None and len(self.token) < MIN_PUBLIC_TOKEN_CHARS:
            # Refused, not warned of: a warning scrolls by in a service's log while the short token stays in use.
            raise ValueError(
                f"the token has {len(self.token)} characters; binding {self.host} lets anyone who can reach the "
                f"port guess at it, so it needs at least {MIN_PUBLIC_TOKEN_CHARS}: make one with `{MAKE_A_TOKEN}`, "
                "give it through PDL1_TOKEN or --token-file (and to the QuPath scripts as service.token in "
                "pdl1-config.toml), or keep the default --host 127.0.0.1"
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
