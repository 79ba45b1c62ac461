"""A job request's JSON body parsed and validated in a worker thread, not on the event loop.

FastAPI parses a JSON body (``json.loads``) and validates it (pydantic, with the request model's validators)
inside the ``async`` code that serves every request: a body near the limits (8 MiB, 250 000 vertices) held
``/v1/health`` and every other client's polling 0.6 to 1.4 s (``python -m benchmarks service_loop``).
:class:`ThreadParsedRoute` hands FastAPI the model already validated in a worker thread; FastAPI's own steps
(the body read, its Content-Type rule, its answers to a body that is no JSON or no UTF-8) are unchanged, and so
are the route's request model and OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from typing import Any

from fastapi import params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from bridge.service.json_text import collector_paused, loads_in_steps


class _ThreadParsedRequest(Request):
    """A request whose ``json()`` (what FastAPI calls for a JSON body) parses and validates in a worker thread.

    Returns the validated model, which FastAPI's own validation passes through as it is. A body that does not
    validate is answered with the errors FastAPI would give (``refused``): raised from ``json()``, FastAPI
    would turn them into a 400.
    """

    validate: Callable[[Any], tuple[Any, list[dict[str, Any]]]]
    paused: ExitStack  # the collector's pause, ended by the route
    refused: RequestValidationError | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            # Not while the body comes in: a client that sends it slowly would hold the pause.
            self.paused.enter_context(collector_paused())
            self._json = await run_in_threadpool(self._parsed, body)
        return self._json

    def forget(self) -> None:
        self.__dict__.pop("_json", None)

    def _parsed(self, body: bytes) -> Any:
        # json.JSONDecodeError and UnicodeDecodeError pass to FastAPI, which answers them as before (422, 400).
        document = loads_in_steps(body)
        value, errors = self.validate(document)
        if errors:
            self.refused = RequestValidationError(errors, body=document)
            return None  # FastAPI refuses it (a required body), and the route raises ``refused`` instead
        return value


class ThreadParsedRoute(APIRoute):
    """A route whose one JSON body model is parsed and validated in a worker thread (:class:`_ThreadParsedRequest`).

    Routes without a JSON body are served as by :class:`APIRoute`.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        if field is None or isinstance(field.field_info, params.Form) or len(self.dependant.body_params) != 1:
            return handler

        def validate(document: Any) -> tuple[Any, list[dict[str, Any]]]:
            # FastAPI's own validation of a single body model, errors located under "body" as it places them.
            return field.validate(document, {}, loc=("body",))

        async def route(request: Request) -> Response:
            parsed = _ThreadParsedRequest(request.scope, request.receive)
            parsed.validate = validate
            # The collector is paused from the parse to the endpoint's end (a large ROI's lists are read again as
            # its geometry is made), and the parsed body dropped before it resumes: else its first pass walks them.
            with ExitStack() as parsed.paused:
                try:
                    return await handler(parsed)
                except RequestValidationError:
                    if parsed.refused is not None:
                        raise parsed.refused from None
                    raise
                finally:
                    parsed.forget()

        return route
