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
