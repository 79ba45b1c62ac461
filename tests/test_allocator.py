"""The allocator settings pdl1 makes at start-up (inference.allocator)."""

import platform
import sys

import pytest
from typer.testing import CliRunner

from inference.allocator import tune_allocator


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)
def test_glibc_takes_the_settings():
    assert tune_allocator() is True


def test_every_pdl1_command_tunes_the_allocator_before_it_runs(monkeypatch):
    import bridge.cli.app as cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1) or True)
    result = CliRunner().invoke(cli.app, ["version"])
    assert result.exit_code == 0, result.output
    assert calls == [1]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)
def test_freed_memory_goes_back_to_the_kernel():
    import numpy as np

    from inference.allocator import release_freed_memory

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    tune_allocator()  # keeps up to 512 MB of freed heap: what the release must undo
    # Many 1 MB blocks (below the mmap threshold, so from the heap), touched, then freed but one in eight,
    # which pins the heap's top as long-lived results between tile buffers do.
    blocks = [np.ones(2**17) for _ in range(400)]
    kept = blocks[::8]
    before = rss_mb()
    del blocks
    assert release_freed_memory() is True
    assert rss_mb() < before - 200  # most of the 350 MB freed left the process
    assert len(kept) == 50


def test_the_sliding_windows_release_every_so_many_tiles_and_at_their_end(monkeypatch):
    import inference.allocator as allocator

    calls = []
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "RELEASE_EVERY_TILES", 64)
    for done in range(0, 200, 4):  # batches of 4 tiles: crossing 64, 128 and 192
        allocator.release_every(done, done + 4)
    assert len(calls) == 3
    allocator.release_every(200, 200, finished=True)
    assert len(calls) == 4
    monkeypatch.setattr(allocator, "RELEASE_EVERY_TILES", -1)  # off (the benchmarks' "without")
    allocator.release_every(0, 1000, finished=True)
    assert len(calls) == 4
