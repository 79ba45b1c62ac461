"""The ``pdl1`` command's entry point: the Typer app, and a Ctrl-C that comes while it is still being imported.

Importing the app takes a few tenths of a second; a Ctrl-C then printed Python's KeyboardInterrupt traceback
(through importlib's frames) before the command could say anything. Nothing has been done by then.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from bridge.cli.app import app
    except KeyboardInterrupt:
        print("pdl1: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    app()
