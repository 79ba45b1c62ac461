"""Progress for the CLI: library code reports through ``on_progress(done, total)``.

In a terminal a rich bar; where stderr is no terminal (``nohup``, a job scheduler, ``2> log``) rich draws its bar
only when it stops, so a log showed nothing of a run for hours: lines are written instead (:class:`ProgressLines`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# At most one line per this many seconds in a log, besides the first and the last.
LINE_EVERY_S = 30.0


def writes_to_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or a stand-in without isatty
        return False


class ProgressLines:
    """Progress as lines for a log: ``<description>: done/total (elapsed, about ETA left)``, at the first report, at
    the last and at most every :data:`LINE_EVERY_S` seconds between (``always``: every report, as each image of a
    run gets its line)."""

    def __init__(self, description: str, *, stream: TextIO | None = None, every_s: float = LINE_EVERY_S) -> None:
        self.description = description
        self.stream = stream
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_line: float | None = None
        self.last_done: int | None = None
        self.first: tuple[float, int] | None = None  # the first report: work done before it was done earlier

    def update(
        self, done: int, total: int | None, note: str = "", *, always: bool = False, stage: str | None = None
    ) -> None:
        """``stage``: the description from this report on (a long command's next stage, such as training's
        domain statistics after its steps): its first report gets a line, its time and pace are its own."""
        now = time.monotonic()
        if stage is not None and stage != self.description:
            self.description, self.started = stage, now
            self.last_line = self.last_done = self.first = None
        if self.first is None:
            self.first = (now, done)
        finished = total is not None and done >= total
        due = self.last_line is None or now - self.last_line >= self.every_s
        if (done == self.last_done and not always) or not (always or due or finished):
            return
        self.last_line, self.last_done = now, done
        elapsed = now - self.started
        where = f"{done}/{total}" if total is not None else str(done)
        left = ""
        since, done_then = self.first
        if total is not None and done_then < done < total:
            # At this report's pace: images a --resume skipped, or a resumed training's steps, took no time here.
            left = f", about {_duration((now - since) / (done - done_then) * (total - done))} left"
        note = f" {note}" if note else ""
        print(
            f"{self.description}: {where}{note} ({_duration(elapsed)}{left})",
            file=sys.stderr if self.stream is None else self.stream,
            flush=True,
        )


def _duration(seconds: float) -> str:
    """A duration as a person reads it in a log.

    >>> _duration(5.2), _duration(75), _duration(3725)
    ('5 s', '1 min 15 s', '1 h 2 min')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield an ``on_progress(done, total)`` callback drawing a rich bar (a no-op when disabled; lines where stderr
    is no terminal); a bar not finished when the block ends (its work failed, or never reported) is taken away
    rather than left unfinished. ``on_progress(done, total, stage="...")`` reports a next stage of the work (a
    bar of its own below, in a log lines of its own description, count and time left), for library code that
    reports a second stage through a second callback."""
    if not enabled:
        yield lambda done, total, stage=None: None
        return
    if not writes_to_terminal():
        lines = ProgressLines(description)
        yield lambda done, total, stage=None: lines.update(done, total, stage=stage)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        tasks = {description: progress.add_task(description, total=None)}
        current = [description]
        reported: set[str] = set()

        def update(done: int, total: int, stage: str | None = None) -> None:
            if stage is not None and stage not in tasks:
                if current[0] in reported:  # a bar of its own below the stage before, which stays
                    tasks[stage] = progress.add_task(stage, total=total)
                else:  # the first report is of a stage: the bar named, not an empty 'name 0/?' above it
                    tasks[stage] = tasks.pop(current[0])
                    progress.update(tasks[stage], description=stage)
            if stage is not None:
                current[0] = stage
            reported.add(current[0])
            progress.update(tasks[current[0]], completed=done, total=total)

        try:
            yield update
        finally:
            # A bar whose work failed, or reported nothing, would stay an empty 'name 0/?' above the error.
            for task in progress.tasks:
                if not task.finished:
                    progress.update(task.id, visible=False)
