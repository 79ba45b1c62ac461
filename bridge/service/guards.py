"""What every request passes before an endpoint: the token, where it comes from, and the body's size."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.service.messages import clipped, quoted

# The one route whose body is not JSON: a pixel upload, read as bytes and checked in a worker thread.
UPLOAD_PATH = "/v1/jobs/pixels"
# Bytes a vertex of an ROI takes as QuPath sends it at most (full-precision doubles: "[12345.678901234567,
# 67890.12345678901],"), to say how many vertices a JSON limit leaves room for.
QUPATH_VERTEX_BYTES = 39
# JSON values of a job request besides its ROI's vertices (its fields, outputs, image_size_px, the ROI's rings).
OTHER_JSON_VALUES = 200
SIMPLIFY = (
    "an ROI that detailed should be simplified in QuPath before it is analysed (select the annotation, then "
    "Objects > Annotations > Simplify shape) and the script run again"
)


@dataclass(frozen=True)
class BodyLimits:
    """How many bytes a request body may have: a pixel upload's (``upload_bytes``, the region's PNG or TIFF) or
    any other's, which is JSON (``json_bytes``, a job request and its ROI), parsed in full before it is used."""

    upload_bytes: int
    json_bytes: int
    roi_vertices: int

    def of(self, path: str) -> int:
        return self.upload_bytes if path == UPLOAD_PATH else self.json_bytes

    @property
    def json_values(self) -> int:
        """The most values (numbers, strings, arrays, objects) a JSON body may hold: an ROI's vertex ``[x, y]`` is
        three. Parsing takes time by values, not bytes (8 MiB of ``[1,2],`` is 1.4 million vertices)."""
        return 3 * self.roi_vertices + OTHER_JSON_VALUES

    def too_many_values(self) -> str:
        return (
            f"JSON request body holds more than {self.json_values:,} values (numbers, strings, arrays, objects), "
            f"room for an ROI of about {self.roi_vertices:,} vertices (each [x, y] is three); {SIMPLIFY}"
        )

    def problem(self, path: str, size: str) -> str:
        """The 413's detail for a body of ``size`` bytes sent to ``path``."""
        if path == UPLOAD_PATH:
            return too_large(size, self.upload_bytes)
        return json_too_large(size, self.json_bytes)


class BodyLimit:
    """Refuses a request body over its limit (:class:`BodyLimits`) while it is read, so a chunked body (no
    Content-Length) is stopped too, before any of it is parsed; the 413 is the service's JSON error like any
    other."""

    def __init__(self, app: ASGIApp, limits: BodyLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limits.of(path)
        counted = path != UPLOAD_PATH  # JSON: its values counted as it comes, before anything parses it
        received = values = 0

        async def limited() -> Message:
            nonlocal received, values
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                # HTTPException: FastAPI passes it on from body parsing (anything else becomes a 400).
                if received > limit:
                    raise HTTPException(413, detail=self.limits.problem(path, f"more than {limit}"))
                if counted:
                    values += json_values_at_most(chunk)
                    if values > self.limits.json_values:
                        raise HTTPException(413, detail=self.limits.too_many_values())
            return message

        await self.app(scope, limited, send)


def token_sent(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a Bearer credential.

    The scheme is case-insensitive (RFC 7235: ``bearer`` is ``Bearer``); compare_digest, so the time taken
    does not tell how much of a guessed token was right.
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(), token.encode())


_STARTED_WITH = "the token `pdl1 serve` was started with (--token, --token-file or PDL1_TOKEN)"


def token_problem(authorization: str | None, token: str) -> str | None:
    """Why a request's ``Authorization`` header (None: not sent) does not carry ``token`` (:func:`token_sent`), else
    None: no header, another scheme than Bearer, or another token. Which of the three is told (not the token sent):
    "missing or wrong" left a client to guess whether its header was sent at all.

    >>> token_problem("Bearer s3cret-token", "s3cret-token") is None
    True
    >>> token_problem("Basic dXNlcjpwdw==", "s3cret-token")[:44]
    "the Authorization header's scheme is 'Basic'"
    """
    if authorization is None or not authorization.strip():
        return (
            f"no token: this service takes only requests that send 'Authorization: Bearer <token>', with "
            f"{_STARTED_WITH}"
        )
    if token_sent(authorization, token):
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    expected = f"expected 'Authorization: Bearer <token>', with {_STARTED_WITH}"
    if not credentials.strip():  # one word: a token without "Bearer " (not echoed), or "Bearer" without a token
        said = "Bearer without a token" if scheme.lower() == "bearer" else "one word (the token without 'Bearer '?)"
        return f"the Authorization header is {said}; {expected}"
    if scheme.lower() != "bearer":
        return f"the Authorization header's scheme is {quoted(scheme, limit_chars=20)}; {expected}"
    return f"wrong token: the Authorization header's Bearer token is not {_STARTED_WITH}; send that one"


def too_large(size: str, limit: int) -> str:
    return (
        f"request body of {size} bytes is over the limit of {limit}; "
        "send a smaller region or a lower resolution (downsample)"
    )


def json_values_at_most(text: bytes) -> int:
    """A bound on the values (numbers, strings, arrays, objects) inside ``text``, a JSON document or a part of one,
    without parsing it: every value in a container but its first follows a comma, so they are at most the commas
    plus the containers. Counted at memchr's speed; a comma or bracket inside a string counts too, which only
    loosens the bound. A vertex ``[x, y]`` is three.

    >>> json_values_at_most(b'[[0,0],[1,0],[1,1],[0,0]]')  # 4 vertices and their 8 numbers in the outer array
    12
    """
    return text.count(b",") + text.count(b"[") + text.count(b"{")


def json_too_large(size: str, limit: int) -> str:
    vertices = round(limit / QUPATH_VERTEX_BYTES, -3)
    return (
        f"JSON request body of {size} bytes is over the limit of {limit} ({limit / 2**20:.3g} MiB), room for an ROI "
        f"of about {vertices:,.0f} vertices as QuPath sends them; {SIMPLIFY}"
    )


def _is_loopback_name(host: str) -> bool:
    """Whether ``host`` (a Host header's or an Origin's name, without its port) names this machine's loopback."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(host_header: str) -> str:
    """The name of a ``Host`` header's value, without its port (``[::1]:8765`` is ``::1``)."""
    return urlsplit(f"//{host_header}").hostname or ""


def cross_site_problem(host_header: str | None, origin: str | None) -> str | None:
    """Why a request to a service without a token came from a web page rather than a program, else None.

    Without a token, anything that can reach the loopback port can use the service, and a browser on this machine
    can: a page of another site may send it requests (a job submitted, the queue filled), and one whose name
    was pointed at 127.0.0.1 (DNS rebinding) may also read the answers. Browsers always say where a request
    comes from: a ``Host`` naming that other site, an ``Origin`` naming the page's site. QuPath's scripts, curl
    and Python clients send the loopback address as ``Host`` and no ``Origin``. With a token these checks are
    not needed: a page cannot send the ``Authorization`` header without the service's leave (CORS), which it
    never gives.
    """
    fix = "call the service as http://127.0.0.1:PORT from QuPath's scripts or a program, or start it with --token"
    if host_header and not _is_loopback_name(_split_host(host_header)):
        return (
            f"request addressed to {clipped(host_header)!r} (its Host header); this service listens on loopback "
            "without a token, so it answers only requests addressed to 127.0.0.1, localhost or ::1 (a web page "
            f"whose site name was pointed at this machine sends its own name): {fix}"
        )
    if origin is not None and (not host_header or urlsplit(origin).netloc.lower() != host_header.lower()):
        return (
            f"request from a web page of {clipped(origin)!r} (its Origin header); this service listens on loopback "
            "without a token and takes requests from programs on this machine, not from pages of other sites, "
            f"which any site could make a browser here send: {fix}"
        )
    return None
