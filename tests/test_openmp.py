"""The OpenMP wait policy pdl1 sets at start-up (inference.openmp)."""

import os
import subprocess
import sys

from typer.testing import CliRunner

from inference.openmp import SPIN_COUNT, tune_openmp


def test_sets_the_spin_count_only_before_torch_loads(monkeypatch):
    import torch  # noqa: F401  (the test process has it loaded)

    environ: dict[str, str] = {}
    assert tune_openmp(environ) is False  # libgomp has read its settings already
    assert environ == {}

    monkeypatch.delitem(sys.modules, "torch")
    assert tune_openmp(environ) is True
    assert environ == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def test_a_wait_policy_the_user_set_is_kept(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    for stated in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(stated)
        assert tune_openmp(environ) is False
        assert environ == stated


def test_every_pdl1_command_sets_it_before_it_runs(monkeypatch):
    import bridge.cli.app as cli

    calls = []
    monkeypatch.setattr(cli, "tune_openmp", lambda: calls.append(1) or True)
    result = CliRunner().invoke(cli.app, ["version"])
    assert result.exit_code == 0, result.output
    assert calls == [1]


def test_a_fresh_pdl1_process_reaches_torch_with_the_spin_count_set():
    # The CLI must not load torch before its callback: libgomp reads the variable when torch loads it.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import sys, bridge.cli.app as cli\n"
        "assert 'torch' not in sys.modules, 'the CLI loaded torch at import'\n"
        "cli.main(log_level='WARNING')\n"
        "import os, torch\n"
        "print(os.environ['GOMP_SPINCOUNT'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(SPIN_COUNT)
