"""Progress bars for the CLI: library code reports through ``on_progress(done, total)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield an ``on_progress(done, total)`` callback drawing a rich bar (a no-op when disabled); a bar not
    finished when the block ends (its work failed, or never reported) is taken away rather than left unfinished."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            yield update
        finally:
            # A bar whose work failed, or reported nothing, would stay an empty 'name 0/?' above the error.
            if not progress.tasks[0].finished:
                progress.update(task, visible=False)
