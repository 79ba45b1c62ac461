"""``analyse_slide`` end to end with glibc's default malloc vs the settings ``pdl1`` makes at start-up.

The allocator is process-wide, so each case runs the same analysis in a child process: glibc's defaults,
:func:`inference.allocator.tune_allocator` called first with the sliding windows' hand-back of freed
memory switched off (``RELEASE_EVERY_TILES = -1``), and ``pdl1``'s default (tuned, freed memory handed
back every 64 tiles); the child reports its own page faults, system time and peak RSS from the kernel's
accounting.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import Case, PhantomSlideBenchmark

# The child: what `pdl1 run` does for one image, then its own figures as JSON.
_CHILD = """
import json, resource, sys
if sys.argv[2] != "0":
    import inference.allocator as allocator
    assert allocator.tune_allocator(), "mallopt refused"
    if sys.argv[2] == "keep":
        allocator.RELEASE_EVERY_TILES = -1  # freed memory stays in the process (before release_every)
from inference.pipeline import Models, PipelineConfig, analyse_slide
config = PipelineConfig(device="cpu")
result = analyse_slide(sys.argv[1], models=Models(config), config=config)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"faults": usage.ru_minflt, "system_s": usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                  "nuclei": len(result.nuclei.xy)}))
"""


class Allocator(PhantomSlideBenchmark):
    """pdl1 run's analysis (segmentation M=5, SUA, nuclei) in a child process: glibc malloc defaults vs tuned."""

    unit = "Mpx/s"
    secondary_unit = "nuclei/s"
    repeats = 3
    interleave = True  # each round runs every case once: load from other jobs falls on all of them alike
    warmup = False  # every run is a fresh process
    extra_columns = ("minor faults", "system s", "peak RSS MB")

    def setup(self, *, quick: bool) -> None:
        self.open_phantom(4096 if quick else 8192, seed=11)
        self.usage: dict[str, list[dict]] = {}

    def _child(self, label: str, *, tune: bool, release: bool = True) -> tuple[float, float]:
        mode = ("1" if release else "keep") if tune else "0"
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(self.slide.path), mode],
            check=True,
            capture_output=True,
            text=True,
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        self.usage.setdefault(label, []).append(figures)
        return self.size_px**2 / 1e6, figures["nuclei"]

    def cases(self) -> list[Case]:
        return [
            Case("glibc defaults", lambda: self._child("glibc defaults", tune=False), baseline=True),
            Case(
                "tuned, freed memory kept",
                lambda: self._child("tuned, freed memory kept", tune=True, release=False),
            ),
            Case("tuned (pdl1's default)", lambda: self._child("tuned (pdl1's default)", tune=True)),
        ]

    def extra(self, label: str) -> dict[str, str]:
        runs = self.usage.get(label, [])
        if not runs:
            return {}
        median = sorted(runs, key=lambda r: r["system_s"])[len(runs) // 2]
        return {
            "minor faults": f"{median['faults']:,}",
            "system s": f"{median['system_s']:.2f}",
            "peak RSS MB": f"{max(r['rss_mb'] for r in runs):.0f}",
        }

    def conditions(self) -> dict[str, str]:
        return {
            "device": "cpu",
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px",
            "timed": "the whole child process (imports, model loading, analysis)",
            "faults, system s": "median run's",
        }
