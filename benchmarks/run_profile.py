"""``pdl1 run`` on one phantom H&E, split into phases; wall time and peak memory against slide size.

Each size runs in a child process of its own (``python -m benchmarks.run_profile --child``), so
its peak RSS is its own: the child makes ``pdl1``'s allocator settings, loads the shipped demo
models, runs ``bridge.run.run_batch`` on the slide (plain slide, GeoJSON written to a temporary
folder) and times the phases with wrappers around the functions that do them:

- reading the slide's tissue, the segmentation and the nuclei forward passes (``Ensemble.member_logits``
  and the nuclei model's), blending and the uncertainty maths (accumulating the Gaussian-weighted
  statistics, finishing the maps), the positive regions and uncertainty tiles (vectorising), SUA,
  and writing the results;
- "waiting for tiles": the time the segmentation loop waited for the read-ahead threads;
- "other" is the rest of the analysis (tiling, NMS and nuclei classification, TPS, bookkeeping).

The phantoms are written once in ``setup`` (not timed). Seconds per Mpx of tissue show whether
time grows linearly with tissue area; peak RSS whether memory stays flat. The two largest sizes run
again with ``RELEASE_EVERY_TILES = -1`` (freed memory kept in the process, as before the sliding windows
handed it back), the measurement with and without.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import Benchmark, Case, time_calls

SIZES = (2048, 4096, 8192, 16384, 32768)
PHASES = (
    "load models",
    "tissue",
    "segmentation forward",
    "waiting for tiles",
    "blending + uncertainty maths",
    "nuclei forward",
    "regions + tiles (vectorising)",
    "SUA",
    "writing",
    "other",
)


def _child(slide: Path, out_json: Path, *, release_every_tiles: int | None = None) -> None:
    t_start = time.perf_counter()
    import inference.allocator as allocator

    allocator.tune_allocator()
    if release_every_tiles is not None:
        allocator.RELEASE_EVERY_TILES = release_every_tiles
    import bridge.run
    import inference.analysis.nuclei as nuclei
    import inference.analysis.segment as segment
    import inference.pipeline as pipeline
    from bridge.run import RunConfig, run_batch
    from inference import Models, PipelineConfig
    from inference.models.ensemble import Ensemble

    totals: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    config = PipelineConfig(device="cpu")
    models = Models(config)
    totals["load models"] = time.perf_counter() - t0 + (t0 - t_start)

    is_seg = lambda args: args[0].manifest.task == "segmentation"  # noqa: E731
    time_calls(pipeline, "tissue_mask_for_slide", "tissue", totals)
    time_calls(Ensemble, "member_logits", "segmentation forward", totals, when=is_seg)
    time_calls(segment, "accumulate_tile_stats", "blending + uncertainty maths", totals)
    time_calls(segment, "accumulate_tile_values", "blending + uncertainty maths", totals)
    time_calls(segment, "ensemble_stats", "blending + uncertainty maths", totals)
    time_calls(segment, "stats_from_logits", "blending + uncertainty maths", totals)
    time_calls(segment, "finish_maps", "blending + uncertainty maths", totals)
    time_calls(nuclei, "_forward", "nuclei forward", totals)
    time_calls(pipeline, "positive_regions", "regions + tiles (vectorising)", totals)
    time_calls(pipeline, "uncertainty_tiles", "regions + tiles (vectorising)", totals)
    time_calls(pipeline, "find_candidates", "SUA", totals)
    time_calls(bridge.run, "write_result_files", "writing", totals)
    profiles: list[segment.SegmentProfile] = []
    real_segment = pipeline.segment_slide

    def profiled_segment(*args, **kwargs):
        profiles.append(segment.SegmentProfile())
        return real_segment(*args, **kwargs, profile=profiles[-1])

    pipeline.segment_slide = profiled_segment

    with tempfile.TemporaryDirectory(prefix="pdl1-profile-") as out:
        t_run = time.perf_counter()
        outcomes = run_batch([slide], RunConfig(pipeline=config, out=Path(out)), models=models)
        run_s = time.perf_counter() - t_run
    if outcomes[0].state != "done":
        raise SystemExit(f"pdl1 run failed on {slide}: {outcomes[0].error}")
    totals["waiting for tiles"] = sum(p.read_wait_s for p in profiles)
    # The forward passes run inside the blending loop's timing of nothing else, so "other" is
    # what the run took beyond every timed phase.
    timed = sum(v for k, v in totals.items() if k != "load models")
    totals["other"] = max(run_s - timed, 0.0)
    wall = time.perf_counter() - t_start
    out_json.write_text(
        json.dumps(
            {
                "phases": dict(totals),
                "wall_s": wall,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tiles": sum(p.tiles for p in profiles),
            }
        )
    )


class RunProfile(Benchmark):
    """pdl1 run on one phantom H&E per size (2k-32k px): phases, wall time, peak RSS (child processes)."""

    unit = "Mpx/s"
    repeats = 1
    warmup = False
    extra_columns = ("s per tissue Mpx", "peak RSS MB", *PHASES)

    def setup(self, *, quick: bool) -> None:
        from inference.phantom.pyramid import write_phantom
        from inference.phantom.scene import PhantomSpec
        from inference.slides.slide import open_slide
        from inference.slides.tissue import tissue_mask_for_slide

        self.sizes = SIZES[:2] if quick else SIZES
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        self.slides: dict[int, Path] = {}
        self.tissue_mpx: dict[int, float] = {}
        for size in self.sizes:
            path = self.tmp / f"phantom_{size}.svs"
            write_phantom(path, PhantomSpec(size, size, seed=81))
            with open_slide(path) as slide:
                self.tissue_mpx[size] = tissue_mask_for_slide(slide).fraction * size * size / 1e6
            self.slides[size] = path
        self.figures: dict[str, dict[str, str]] = {}

    def _run(self, size: int, label: str, *, release: bool = True) -> float:
        out = self.tmp / f"profile_{size}.json"
        cmd = [sys.executable, "-m", "benchmarks.run_profile", "--child", str(self.slides[size]), str(out)]
        subprocess.run(cmd + ([] if release else ["--release-every-tiles", "-1"]), check=True)
        figures = json.loads(out.read_text())
        phases = figures["phases"]
        shares = {k: f"{100 * phases.get(k, 0.0) / figures['wall_s']:.0f} %" for k in PHASES}
        self.figures[label] = {
            "s per tissue Mpx": f"{figures['wall_s'] / self.tissue_mpx[size]:.3f}",
            "peak RSS MB": f"{figures['peak_rss_mb']:.0f}",
            **shares,
        }
        return size * size / 1e6

    def cases(self) -> list[Case]:
        cases = [
            Case(self._label(size), (lambda size=size: self._run(size, self._label(size))), baseline=i == 0)
            for i, size in enumerate(self.sizes)
        ]
        # The two largest again without handing freed memory back during the sliding windows.
        for size in self.sizes[-2:]:
            label = self._label(size) + ", no release"
            cases.append(Case(label, lambda size=size, label=label: self._run(size, label, release=False)))
        return cases

    def _label(self, size: int) -> str:
        return f"{size}x{size} ({self.tissue_mpx[size]:.0f} tissue Mpx)"

    def extra(self, label: str) -> dict[str, str]:
        return self.figures.get(label, {})

    def conditions(self) -> dict[str, str]:
        return {
            "device": "cpu",
            "what": "a whole pdl1 run of one plain slide in a child process (imports, models, analysis, GeoJSON)",
            "models": "shipped demo models (segmentation M=5, nuclei), pdl1 run's defaults",
            "phases": "share of the child's wall time; 'waiting for tiles' lies inside segmentation",
        }

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Child process of the run_profile benchmark.")
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT_JSON"), required=True)
    parser.add_argument("--release-every-tiles", type=int, default=None, help="-1: never hand freed memory back")
    args = parser.parse_args()
    _child(Path(args.child[0]), Path(args.child[1]), release_every_tiles=args.release_every_tiles)
