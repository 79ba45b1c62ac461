"""Bad requests in the client's terms: pydantic's validation errors as what was expected, and the OpenAPI entries
of the error answers."""

from __future__ import annotations

import difflib
import inspect
import json
from collections import Counter
from typing import Any, get_origin

from fastapi import params
from fastapi.exceptions import RequestValidationError

from bridge.service.messages import clipped, quoted
from bridge.service.schemas import MAX_DOWNSAMPLE, MIN_DOWNSAMPLE, ROI_EXPECTED, ErrorDetail, JobRequest
from inference import MPP_PLAUSIBLE_RANGE

# Whose parameters an unknown one is told against (refuse_unknown_parameters).
UPLOAD = "the upload's"
RECORD = "the record's"
RESULT = "the result's"


def query_parameters(endpoint: Any) -> tuple[str, ...]:
    """The query parameters an endpoint declares (those whose default is a ``Query``), from its signature: the
    ones a request may send, so any other is refused rather than ignored (a misspelt origin_x put every result of
    an upload at x 0)."""
    return tuple(
        name for name, p in inspect.signature(endpoint).parameters.items() if isinstance(p.default, params.Query)
    )


def list_parameters(endpoint: Any) -> tuple[str, ...]:
    """The query parameters of :func:`query_parameters` that take a list, sent once per value."""
    lists = []
    for name, p in inspect.signature(endpoint).parameters.items():
        annotation = p.annotation  # a string where the module defers its annotations
        text = annotation if isinstance(annotation, str) else ""
        if isinstance(p.default, params.Query) and (get_origin(annotation) is list or text.startswith("list[")):
            lists.append(name)
    return tuple(lists)


def refuse_unknown_parameters(request: Any, endpoint: Any, whose: str) -> None:
    """Raise the 422 of every query parameter ``request`` sends that ``endpoint`` does not declare
    (:func:`query_parameters`), ``whose`` naming the endpoint's in the answer ("the upload's"): FastAPI ignores them,
    and a misspelt one silently took its default."""
    known = query_parameters(endpoint)
    unknown = [name for name in request.query_params if name not in known]
    # A parameter sent twice (?mpp=0.5&mpp=0.6) took the last value without a word: which one was meant is unknown.
    # A list is sent once per value (?outputs=regions&outputs=nuclei).
    sent = Counter(name for name, _ in request.query_params.multi_items())
    lists = set(list_parameters(endpoint))
    repeated = [name for name in request.query_params if name in known and name not in lists and sent[name] > 1]
    if unknown or repeated:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": "unknown",
                    "ctx": {"parameters": known, "whose": whose},
                }
                for name in unknown
            ]
            + [
                {
                    "type": "repeated",
                    "loc": ("query", name),
                    "msg": "repeated",
                    "ctx": {"values": request.query_params.getlist(name)},
                }
                for name in repeated
            ]
        )


# What a required value that was left out is, and how to send it.
_MISSING = {
    ("body", "image"): "the image's absolute path on the service's machine or its file: URI, as {\"image\": "
    '"/path/to/slide.svs"} (the other fields may be left out)',
    ("query", "mpp"): "the µm per uploaded pixel: the image's µm/px times the downsample the region was read at "
    "(e.g. ?mpp=0.5)",
}


def validation_problem(error: dict[str, Any], content_type: str | None) -> str:
    """One of pydantic's validation errors as ``where: what``; for the mistakes a client makes by
    accident (no JSON Content-Type, a body that is no object, a misspelt field) also what was expected."""
    loc = tuple(error["loc"])
    where = ".".join(clipped(str(p)) for p in loc)  # a field name is the client's too, and may be long
    if loc == ("body",):
        if error["type"] == "missing":
            return 'body: empty; expected a JSON object such as {"image": "/path/to/slide.svs"}'
        if isinstance(error.get("input"), bytes):  # FastAPI parses the body as JSON only when the header says so
            return (
                f"body: sent with Content-Type {content_type or '(none)'}; expected JSON with "
                "'Content-Type: application/json': send that header"
            )
        if error["type"] == "model_attributes_type":
            kinds = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
            return (
                f"body: a JSON {kinds.get(type(error.get('input')), 'value')}; expected a JSON object such as "
                '{"image": "/path/to/slide.svs"}'
            )
    if error["type"] == "json_invalid" and loc[:1] == ("body",):  # FastAPI puts the character's index after "body"
        at = f" at character {loc[1]}" if len(loc) == 2 else ""
        reason = (error.get("ctx") or {}).get("error", error["msg"])
        return (
            f"body: not valid JSON ({reason}{at}); expected a JSON object such as "
            '{"image": "/path/to/slide.svs"}: JSON takes double quotes around names and strings, and no trailing comma'
        )
    if error["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "query":
        ctx = error.get("ctx") or {}
        fields, whose = list(ctx.get("parameters", ())), ctx.get("whose", "the endpoint's")
        if loc[1] == "roi" and whose == UPLOAD:
            hint = "an upload is analysed whole: send only the ROI's bounding region (and its origin_x, origin_y); "
        else:
            close = difflib.get_close_matches(str(loc[1]), fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown parameter {quoted(str(loc[1]))}; {hint}{whose} parameters are {', '.join(fields)}"
    if error["type"] == "repeated" and len(loc) == 2 and loc[0] == "query":
        values = [quoted(str(v)) for v in (error.get("ctx") or {}).get("values", ())]
        return f"{where}: sent {len(values)} times ({', '.join(values)}); send it once"
    if error["type"] == "missing" and loc in _MISSING:  # pydantic's "Field required" said neither what nor how
        return f"{where}: missing; expected {_MISSING[loc]}"
    if loc == ("query", "target_type") and error["type"] == "string_pattern_mismatch":  # it showed its regex
        return (
            f"{where}: {quoted(str(error.get('input')))} is not what a parent can be; expected 'annotation', "
            "'TMA core' or 'whole image' (as the record's target_type), or leave it out"
        )
    if loc == ("query", "after_run") and error["type"] == "string_pattern_mismatch":
        return (
            f"{where}: {quoted(str(error.get('input')))} is no run id; expected the run_id of the pdl1 run "
            "summary.json in the entry's folder (a UUID such as 3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b), or 'none' "
            "where there is none"
        )
    if error["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "body":
        fields = list(JobRequest.model_fields)
        close = difflib.get_close_matches(str(loc[1]), fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown field {quoted(str(loc[1]))}; {hint}the request's fields are {', '.join(fields)}"
    if loc[-1:] == ("mpp",) and error["type"] in ("greater_than_equal", "less_than_equal"):  # said no unit or fix
        low, high = MPP_PLAUSIBLE_RANGE
        value = error.get("input")  # a query's is the text sent
        shown = clipped(value if isinstance(value, str) else json.dumps(value))
        pixels = (
            "of the uploaded region (the image's µm/px times the downsample it was read at)"
            if loc[0] == "query"
            else "QuPath reports for the image"
        )
        return f"{where}: {shown} µm/px is outside {low:g}-{high:g}; send the µm/px {pixels}"
    if loc == ("query", "downsample") and error["type"] in ("greater_than_equal", "less_than_equal"):
        return (
            f"{where}: {clipped(str(error.get('input')))} is outside {MIN_DOWNSAMPLE:g}-{MAX_DOWNSAMPLE:g}; send the "
            "level-0 px per uploaded px: the downsample the region was read at (1 at full resolution)"
        )
    if loc == ("body", "roi") and error["type"] == "dict_type":  # pydantic's "Input should be a valid dictionary"
        return f"{where}: {ROI_EXPECTED}; got {clipped(json.dumps(error.get('input')))}"
    if error["type"] == "value_error":  # our validators' words, without pydantic's "Value error, " before them
        return f"{where}: {(error.get('ctx') or {}).get('error', error['msg'])}"
    return f"{where}: {error['msg']}"


# Every route's 403 where no token is set (bridge.service.guards refuses such requests before any route).
FOREIGN_REQUEST: dict[str, Any] = {
    "model": ErrorDetail,
    "description": "A request from a web page (an Origin header) or addressed to another host than this one (its "
    "Host header), refused since no token is set: call the address `pdl1 serve` printed, or start it with --token.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers: each is the service's JSON ``detail``."""
    meaning = {
        400: "The body is not UTF-8 text (JSON that does not parse is a 422).",
        401: "Missing or wrong token.",
        403: "The image lies outside the --allow-root folders; or, with no token set, the request came from a web "
        "page or was addressed to another host than this one.",
        404: "No such image or job.",
        409: "The job is not in a state that allows this (e.g. not done yet), or an unknown model.",
        410: "The job's result was released (--keep-results).",
        413: "The request body is over the limit: a job request's JSON over 8 MiB or about 250 000 ROI vertices, an "
        "upload over 64 MiB (upload_limits.max_bytes of GET /v1/health).",
        422: "The request is malformed (its body or parameters), or a job's names an image that cannot be analysed.",
        429: "The queue is full (--max-queued); retry later.",
        503: "The service is shutting down and starts no more jobs; submit again once it has been started again.",
    }
    return {code: {"model": ErrorDetail, "description": meaning[code]} for code in codes}
