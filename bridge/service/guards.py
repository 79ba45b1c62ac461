"""What every request passes before an endpoint: the token and the body's size."""

from __future__ import annotations

import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
