"""The ``pdl1`` command's entry point: the Typer app, and a Ctrl-C that comes while it is still starting.

Importing the app and reading its commands take a few tenths of a second; a Ctrl-C then printed Python's
KeyboardInterrupt traceback (through importlib's or inspect's frames) before the command could say anything.
Nothing has been done by then.

The commands import torch when they first need it (a second or two). A KeyboardInterrupt raised inside torch's
import can land in Python code that torch's C++ runs (pybind11), which aborts the process (exit 134, a C++
``error_already_set``), or in an import lock's callback, which drops it and lets the command run on. So a Ctrl-C
during that import is held until torch's own code has run to its end, and then delivered there, at the end of the
import: the command's own Ctrl-C handling says what it stopped. (Python then forgets the module, its submodules
loaded: the command stops anyway, and nothing imports torch again.)
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import signal
import sys
import threading
from collections.abc import Iterable
from importlib.machinery import ModuleSpec
from types import ModuleType

from bridge.stopping import STOPPING_SIGNALS

HELD_WHILE_IMPORTING = ("torch",)


class _InterruptHeld:
    """SIGINT recorded, not raised, inside the ``with``; raised again on leaving where one came."""

    def __enter__(self) -> None:
        self._came = False
        self._terminated = False  # a kill taken as a Ctrl-C (_as_interrupt): a stop even where SIGINT is ignored
        self._before = signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self._came = True

    def terminate(self) -> None:
        self._terminated = True

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._before)
        if self._terminated and _sigint_unhandled(self._before):
            raise KeyboardInterrupt
        if self._came or self._terminated:
            signal.raise_signal(signal.SIGINT)  # the handler before (Python's: KeyboardInterrupt) takes it here


class _HeldLoader(importlib.abc.Loader):
    """The module's own loader, with a Ctrl-C held while the module's code runs (main thread only)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            self._loader.exec_module(module)
            return
        with _InterruptHeld():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, ...: the loader's own
        return getattr(self._loader, name)


class HoldInterruptsWhileImporting(importlib.abc.MetaPathFinder):
    """Finds the named top-level modules as Python would, and loads each with a Ctrl-C held until it is loaded."""

    def __init__(self, names: Iterable[str] = HELD_WHILE_IMPORTING) -> None:
        self._names = frozenset(names)

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self._names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldLoader(spec.loader)
        return spec


def _sigint_unhandled(handler: object) -> bool:
    """Whether a SIGINT raises no KeyboardInterrupt here: ignored (a background job), default, or set outside Python."""
    return handler in (signal.SIG_IGN, signal.SIG_DFL, None)


def _as_interrupt(signum: int, frame: object) -> None:
    handler = signal.getsignal(signal.SIGINT)
    held = getattr(handler, "__self__", None)
    if isinstance(held, _InterruptHeld):  # torch importing: the stop comes at the end of the import
        held.terminate()
    elif _sigint_unhandled(handler):
        # A command started in the background (`cmd &` in a script) ignores SIGINT, so a kill forwarded as one was
        # lost, and left at its default it ended the command where it stood, its half-written folders left for good.
        raise KeyboardInterrupt
    else:
        signal.raise_signal(signal.SIGINT)  # the SIGINT handler of the moment: Python's raises KeyboardInterrupt


def stop_on_termination() -> None:
    """Take :data:`STOPPING_SIGNALS` as a Ctrl-C from now on (main thread only, as every signal handler), those
    left at their default only: one ignored (`nohup` ignores SIGHUP) stays ignored."""
    for signum in STOPPING_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _as_interrupt)


def main() -> None:
    stop_on_termination()
    sys.meta_path.insert(0, HoldInterruptsWhileImporting())
    try:
        import typer.main

        from bridge.cli.app import app

        command = typer.main.get_command(app)  # Typer reads every command's signature here: a few tenths more
    except KeyboardInterrupt:
        print("pdl1: interrupted while starting; nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    try:
        command(prog_name="pdl1")  # Click's own handling from here: each command says what a Ctrl-C stopped
    except ctypes.ArgumentError as err:
        # A Ctrl-C (or a kill taken as one) while ctypes converted a call's arguments (openslide's reader) comes as
        # "argument 1: KeyboardInterrupt", past the command's own Ctrl-C handling: a traceback, exit 1.
        if "KeyboardInterrupt" not in str(err):
            raise
        print(
            "pdl1: interrupted while reading a slide; what the command was writing then is not kept (an image "
            "or model half-written is removed; what it had finished stays)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
