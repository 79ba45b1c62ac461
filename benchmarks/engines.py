"""One segmentation member's forward pass per engine and batch size on the CPU: is eager PyTorch the fastest?

The candidates the issue names: ONNX Runtime and OpenVINO (each member exported once, outputs
checked against PyTorch) and ``torch.compile`` (inductor), each in fp32 and, where the engine
has it, bf16; eager PyTorch as the pipeline runs it (channels-last input, BatchNorms folded) in
fp32 and bf16 autocast. Rows are ms per tile (the forward pass of a batch divided by its tiles),
so the batch sizes compare. ``max |diff|`` is against eager fp32 on the same batch (bf16 rows
differ by bf16's rounding, as the pipeline's bf16 autocast does).

ONNX Runtime and OpenVINO are benchmark-only dependencies, installed with torch pinned::

    pip install -c benchmarks/nnunet-constraints.txt onnxruntime onnx openvino

OpenVINO's rows run last: its CPU thread pool keeps spinning after a call, and eager PyTorch in
the same process ran several times slower after it (measured while writing this).
"""

from __future__ import annotations

import io
import time
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

import numpy as np
import torch

from benchmarks import Benchmark, Case
from inference.models.ensemble import Ensemble, demo_model_dir

BATCHES = (1, 2, 4, 8, 16)


def _per_tile_ms(run, batch: int, repeats: int = 7) -> float:
    run()
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / batch


class Engines(Benchmark):
    """ms per tile of one demo segmentation member: eager PyTorch vs ONNX Runtime, OpenVINO, torch.compile."""

    unit = "tiles/s"
    repeats = 1
    warmup = False  # each case warms up and takes its best of 7 inside
    extra_columns = (*(f"ms/tile, batch {b}" for b in BATCHES), "max |diff|")

    def setup(self, *, quick: bool) -> None:
        self.batches = BATCHES[:3] if quick else BATCHES
        demo = Ensemble.load(demo_model_dir("seg"), task="segmentation", device="cpu")
        self.member = demo.members[0]
        self.tile_px = demo.manifest.tile_size_px
        gen = torch.Generator().manual_seed(0)
        self.inputs = {
            b: torch.randn(b, 3, self.tile_px, self.tile_px, generator=gen).contiguous(
                memory_format=torch.channels_last
            )
            for b in self.batches
        }
        with torch.inference_mode():
            self.reference = {b: self.member(x).numpy() for b, x in self.inputs.items()}
        self.figures: dict[str, dict[str, str]] = {}
        self.best_tiles_per_s: dict[str, float] = {}

    def _measure(self, label: str, make_runner) -> float:
        """``make_runner(x)`` -> a callable running the engine on ``x`` and returning its output as numpy."""
        figures, worst, tiles_per_s = {}, 0.0, 0.0
        for b, x in self.inputs.items():
            runner = make_runner(x)
            worst = max(worst, float(np.abs(runner() - self.reference[b]).max()))
            ms = _per_tile_ms(runner, b)
            figures[f"ms/tile, batch {b}"] = f"{ms:.2f}"
            tiles_per_s = max(tiles_per_s, 1000 / ms)
        figures["max |diff|"] = f"{worst:.1e}"
        self.figures[label] = figures
        self.best_tiles_per_s[label] = tiles_per_s
        return tiles_per_s

    def _eager(self, bf16: bool):
        def make(x):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return self.member(x).float().numpy()

            return run

        return make

    def _compiled(self, bf16: bool):
        compiled = torch.compile(self.member)

        def make(x):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return compiled(x).float().numpy()

            return run

        return make

    def _onnx_session(self):
        import onnxruntime as ort

        buf = io.BytesIO()
        x = torch.zeros(1, 3, self.tile_px, self.tile_px)
        with torch.no_grad():
            torch.onnx.export(
                self.member, x, buf, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
            )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

        def make(x):
            feed = {"x": np.ascontiguousarray(x.numpy())}
            return lambda: session.run(None, feed)[0]

        return make

    def _openvino(self, hint: str):
        import openvino as ov

        with torch.no_grad():
            model = ov.convert_model(self.member, example_input=torch.zeros(1, 3, self.tile_px, self.tile_px))
        compiled = ov.Core().compile_model(
            model,
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()},
        )

        def make(x):
            request = compiled.create_infer_request()
            feed = np.ascontiguousarray(x.numpy())
            return lambda: request.infer({0: feed})[0]

        return make

    def cases(self) -> list[Case]:
        rows = [
            ("eager PyTorch, fp32 (the pipeline's fp32)", lambda: self._eager(False), True),
            ("eager PyTorch, bf16 autocast (the pipeline's auto on this CPU)", lambda: self._eager(True), False),
            ("torch.compile (inductor), fp32", lambda: self._compiled(False), False),
            ("torch.compile (inductor), bf16 autocast", lambda: self._compiled(True), False),
        ]
        if find_spec("onnxruntime") and find_spec("onnx"):
            rows.append(("ONNX Runtime 'CPUExecutionProvider', fp32", self._onnx_session, False))
        if find_spec("openvino"):
            rows += [
                ("OpenVINO CPU, f32", lambda: self._openvino("f32"), False),
                ("OpenVINO CPU, bf16 inference precision", lambda: self._openvino("bf16"), False),
            ]
        return [
            Case(label, (lambda label=label, make=make: self._measure(label, make())), baseline=base)
            for label, make, base in rows
        ]

    def extra(self, label: str) -> dict[str, str]:
        return self.figures.get(label, {})

    def rate(self, result) -> float:
        # Each case times its batches inside (best of 7 per batch): tiles/s at its best batch size.
        return self.best_tiles_per_s[result.label]

    def conditions(self) -> dict[str, str]:
        versions = []
        for package in ("onnxruntime", "openvino"):
            try:
                versions.append(f"{package} {version(package)}")
            except PackageNotFoundError:
                versions.append(f"{package} not installed (its rows left out)")
        return {
            "member": "demo segmentation member 0, BatchNorms folded, channels-last input",
            "tile": f"{self.tile_px} px",
            "torch threads": str(torch.get_num_threads()),
            "tiles/s": "at the best batch size; the compile time of torch.compile is not counted",
            "engines": ", ".join(versions),
        }
