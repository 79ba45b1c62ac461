"""How error answers repeat a client's values (a path, a field name, a job id): whole when short, else
clipped to their start and end, so a 100 kB path does not come back whole."""

from __future__ import annotations

# The most characters of a client's value (a path, a field name, a job id) an error answer repeats: a 100 kB path
# comes back as its start and end, not whole.
ECHO_LIMIT_CHARS = 200
# And the most characters of any error answer's detail: a backstop for a message that repeats a value whole.
MAX_DETAIL_CHARS = 4000


def _shortened(text: str, limit_chars: int) -> str:
    tail = limit_chars // 3
    return f"{text[: limit_chars - tail - 1]}…{text[-tail:]}"


def clipped(text: str, *, limit_chars: int = ECHO_LIMIT_CHARS) -> str:
    """``text`` as an error message repeats it: whole up to ``limit_chars``, else its start and end around an
    ellipsis, followed by its length, so a client sees which value it was without getting it all back.

    >>> clipped("/data/" + "x" * 300 + ".svs", limit_chars=20)
    '/data/xxxxxxx…xx.svs (310 characters)'
    """
    if len(text) <= limit_chars:
        return text
    return f"{_shortened(text, limit_chars)} ({len(text)} characters)"


def quoted(text: str, *, limit_chars: int = ECHO_LIMIT_CHARS) -> str:
    """``repr(text)`` for a message, shortened as :func:`clipped` does, with the length after the closing quote.

    >>> quoted("abc")
    "'abc'"
    >>> quoted("/data/" + "x" * 300 + ".svs", limit_chars=20)
    "'/data/xxxxxxx…xx.svs' (310 characters)"
    """
    if len(text) <= limit_chars:
        return repr(text)
    return f"{_shortened(text, limit_chars)!r} ({len(text)} characters)"
