"""Large JSON taken in and handed out in steps, each holding the GIL briefly, with the collector paused meanwhile.

A worker thread frees the event loop only between C calls: ``json.loads`` of an 8 MiB job request is one call
that held the GIL, and with it ``/v1/health``, 0.1 to 0.5 s; ``json.dumps`` of a 200 000-nucleus page
(75 MiB) one of over 0.3 s. And building hundreds of thousands of lists or dicts sets off the cyclic garbage
collector again and again, each pass over every object the service holds (0.5 s instead of 0.1 s for that
``json.loads``). Measured by ``python -m benchmarks service_loop``.
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from json.decoder import JSONArray, JSONObject
from typing import Any

try:
    from json.scanner import c_make_scanner
except ImportError:  # a Python built without the _json accelerator: json.loads is pure Python anyway
    c_make_scanner = None

# An array of numbers (a vertex, [x, y]) whose closing bracket comes within 256 characters, with no array, object
# or string inside, is parsed by one C call; any other array or object element by element.
_FLAT_ARRAY = re.compile(r'\[[^\[\]{}"]{0,256}\]')

_paused = 0
_was_enabled = False
_pause_lock = threading.Lock()


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, in any thread; back as it was once every such block ends.

    The objects a large body is parsed into hold no cycles (refcounting frees them), yet each collection that
    building them sets off walks every object of the process with the GIL held.
    """
    global _paused, _was_enabled
    with _pause_lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


def loads_in_steps(document: bytes) -> Any:
    """``json.loads(document)``: the same value, or the same error, parsed in steps of short C calls.

    Objects and arrays are walked by the standard library's own Python parser (:mod:`json.decoder`, which
    CPython tests against its C scanner), their leaves and small arrays of numbers (vertices) by the C scanner,
    so another thread gets the GIL between steps. Nested deeper than that recursion allows, the document is
    parsed by ``json.loads`` as before.

    >>> loads_in_steps(b'{"roi": {"coordinates": [[[0, 0], [1.5, 0], [1, 1e3], [0, 0]]]}, "a": [true, null, "]"]}')
    {'roi': {'coordinates': [[[0, 0], [1.5, 0], [1, 1000.0], [0, 0]]]}, 'a': [True, None, ']']}
    """
    if c_make_scanner is None:
        return json.loads(document)
    text = document.decode(json.detect_encoding(document), "surrogatepass")  # as json.loads decodes bytes
    try:
        return _SteppedDecoder().decode(text)
    except RecursionError:
        return json.loads(document)


class _SteppedDecoder(json.JSONDecoder):
    def __init__(self) -> None:
        super().__init__()
        leaf = c_make_scanner(self)
        memo: dict[str, str] = {}

        def scan_once(text: str, idx: int) -> tuple[Any, int]:
            # The contract of json.scanner's scan_once: (value, end), StopIteration(idx) where no value starts.
            char = text[idx : idx + 1]
            if char == "{":
                return JSONObject(
                    (text, idx + 1), self.strict, scan_once, self.object_hook, self.object_pairs_hook, memo
                )
            if char == "[" and _FLAT_ARRAY.match(text, idx) is None:
                return JSONArray((text, idx + 1), scan_once)
            return leaf(text, idx)

        self.scan_once = scan_once


def dumps_in_steps(content: dict[str, Any], *, chunked: str) -> bytes:
    """Starlette's ``JSONResponse`` body of ``content`` (compact, UTF-8, no NaN), byte for byte, where
    ``content[chunked]`` is an iterable of lists that, one after the other, make that key's list: each is encoded
    by one ``json.dumps`` call (and may be made only as it is asked for, and dropped after).

    >>> dumps_in_steps({"type": "FeatureCollection", "features": ([{"id": 0}, {"id": 1}], [], [{"id": 2}]), "n": 3},
    ...                chunked="features")
    b'{"type":"FeatureCollection","features":[{"id":0},{"id":1},{"id":2}],"n":3}'
    """

    def encoded(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()

    pieces = [b"{"]
    for key, value in content.items():
        pieces += [b"," if len(pieces) > 1 else b"", encoded(key), b":"]
        if key != chunked:
            pieces.append(encoded(value))
            continue
        pieces.append(b"[")
        for chunk in value:
            if chunk:  # a comma before each chunk's items but the first's; joined once, at the end
                pieces += [b"," if pieces[-1] != b"[" else b"", encoded(chunk)[1:-1]]
        pieces.append(b"]")
    pieces.append(b"}")
    return b"".join(pieces)
