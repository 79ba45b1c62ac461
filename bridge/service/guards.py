"""What every request passes before an endpoint: the token, where it comes from, and the body's size."""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.service.messages import clipped


class BodyLimit:
    """Refuses a request body over ``limit`` bytes while it is read, so a chunked body (no
    Content-Length) is stopped too; the 413 is the service's JSON error like any other."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # HTTPException: FastAPI passes it on from body parsing (anything else becomes a 400).
                    raise HTTPException(413, detail=too_large(f"more than {self.limit}", self.limit))
            return message

        await self.app(scope, limited, send)


def token_sent(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a Bearer credential.

    The scheme is case-insensitive (RFC 7235: ``bearer`` is ``Bearer``); compare_digest, so the time taken
    does not tell how much of a guessed token was right.
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(), token.encode())


def too_large(size: str, limit: int) -> str:
    return (
        f"request body of {size} bytes is over the limit of {limit}; "
        "send a smaller region or a lower resolution (downsample)"
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
