"""Fetching a whole slide's result from the service in pages, as ``pdl1_analyze.groovy`` does.

The work of ``GET /v1/jobs/{id}/result`` for every page of one result (objects built, QuPath
features made, JSON encoded), without HTTP: a result of N nuclei in pages of 50 000 features,
the Groovy script's page size. Baseline: what the service did until it built pages alone,
every object of the result built for each page and then sliced, so fetching a result took
time quadratic in its size. The middle row builds only the page, but still one shapely point
and QuPathObject per nucleus; ours makes the nuclei's features straight from the arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from benchmarks import Benchmark, Case
from bridge.objects import feature_page, nucleus_object, nucleus_objects
from bridge.qupath_geojson import to_feature
from inference.results import ModelInfo, Nuclei, SlideResult, UncertaintyMaps

PAGE = 50_000
OUTPUTS = ("nuclei",)


def _result(n: int) -> SlideResult:
    rng = np.random.default_rng(0)
    nuclei = Nuclei(
        xy=rng.uniform(0, 100_000, (n, 2)),
        cls=rng.integers(0, 3, n),
        score=rng.uniform(0.3, 1.0, n),
        class_prob=rng.uniform(0.5, 1.0, n),
        positive_prob=rng.uniform(0.0, 1.0, n),
        entropy=rng.uniform(0.0, 1.0, n),
        class_names=("Tumor: Positive", "Tumor: Negative", "Other"),
    )
    empty = np.zeros((1, 1), np.float32)
    maps = UncertaintyMaps(empty, empty, empty, empty, empty, empty.astype(bool), (0.0, 0.0), 16.0, 0.5)
    model = ModelInfo("bench", "0", "0" * 64, 1)
    return SlideResult("bench.svs", 100_000, 100_000, 0.5, "run", "cfg", model, maps, (), (), 0.0, 1.0, nuclei=nuclei)


class ResultPages(Benchmark):
    """k features/s handing over a result of 500k nuclei in 50k pages: each page alone vs all built per page."""

    unit = "k features/s"
    repeats = 1
    warmup = False

    def setup(self, *, quick: bool) -> None:
        self.n = 100_000 if quick else 500_000
        self.result = _result(self.n)

    def _fetch(self, page_features: Callable[[int], list[dict]]) -> float:
        encoded = 0
        for offset in range(0, self.n, PAGE):
            encoded += len(json.dumps({"type": "FeatureCollection", "features": page_features(offset)}))
        if encoded == 0:
            raise RuntimeError("no features were encoded")
        return self.n / 1000

    def _all_then_slice(self, offset: int) -> list[dict]:
        return [to_feature(o) for o in list(nucleus_objects(self.result))[offset : offset + PAGE]]

    def _page_objects(self, offset: int) -> list[dict]:
        nuclei = self.result.nuclei
        return [to_feature(nucleus_object(nuclei, i)) for i in range(offset, min(offset + PAGE, len(nuclei)))]

    def _page(self, offset: int) -> list[dict]:
        return feature_page(self.result, OUTPUTS, offset, PAGE)[0]

    def cases(self) -> list[Case]:
        return [
            Case(
                "every object built for each page, then sliced",
                lambda: self._fetch(self._all_then_slice),
                baseline=True,
            ),
            Case(
                "the page's objects only, each a shapely point and QuPathObject",
                lambda: self._fetch(self._page_objects),
            ),
            Case("ours: the page only, nuclei straight from the arrays", lambda: self._fetch(self._page)),
        ]

    def conditions(self) -> dict[str, str]:
        return {"nuclei": f"{self.n:,}", "page": f"{PAGE:,} features", "outputs": "nuclei"}
