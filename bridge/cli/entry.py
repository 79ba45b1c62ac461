"""The ``pdl1`` command's entry point: the Typer app, and a Ctrl-C that comes while it is still being imported.

Importing the app and reading its commands take a few tenths of a second; a Ctrl-C then printed Python's
KeyboardInterrupt traceback (through importlib's or inspect's frames) before the command could say anything.
Nothing has been done by then.
"""

from __future__ import annotations

import sys

import typer.main


def main() -> None:
    try:
        from bridge.cli.app import app

        command = typer.main.get_command(app)  # Typer reads every command's signature here: a few tenths more
    except KeyboardInterrupt:
        print("pdl1: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    command(prog_name="pdl1")  # Click's own handling from here: each command says what a Ctrl-C stopped
