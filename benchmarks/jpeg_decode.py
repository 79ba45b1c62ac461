"""JPEG tile decoding: libjpeg-turbo on CPU threads vs nvImageCodec on the GPU (issue #8's open question).

Reading starves one nnU-Net-sized member on an H100 because CPU threads cannot decode JPEG
tiles as fast as the GPU consumes them. This measures what a GPU JPEG decoder would change
before the read path is built around one: how fast each nvImageCodec backend decodes the
slide's own tiles, whether its pixels equal libjpeg-turbo's ("max |diff|", grey levels over
every tile), and whether decoding on the GPU slows the model running beside it ("model
slowdown": time of the same forward passes with the decoder busy on another thread and CUDA
stream, over their time alone).

Tiles: level 0 of a phantom SVS (YCbCr JPEG, tables in every tile) or, with
``PDL1_BENCH_SLIDE=PATH``, of that slide (Aperio: abbreviated RGB JPEG with shared tables).
The GPU gets each tile as a file of its own (:func:`inference.slides.tiff_tiles.standalone_jpeg`),
decoded as the pipeline decodes it (:class:`inference.slides.gpu_decode.NvImageCodecDecoder`).
CPU rows run anywhere; GPU rows need CUDA and ``nvidia-nvimgcodec-cu12`` or ``-cu13``.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from benchmarks import Case, PhantomSlideBenchmark
from inference.analysis.segment import SegmentConfig
from inference.slides.gpu_decode import NvImageCodecDecoder, nvimgcodec_available
from inference.slides.slide import open_slide
from inference.slides.tiff_tiles import TiffTileReader

SLIDE_ENV = "PDL1_BENCH_SLIDE"
_MODEL_BATCHES = 20


class JpegDecode(PhantomSlideBenchmark):
    """JPEG tile decode Mpx/s: libjpeg-turbo on 1 and N CPU threads vs nvImageCodec backends on the GPU."""

    unit = "Mpx/s"
    extra_columns = ("max |diff|", "model slowdown")

    def setup(self, *, quick: bool) -> None:
        path = os.environ.get(SLIDE_ENV)
        if path is None:
            self.open_phantom(4096 if quick else 8192, seed=77)
        else:
            self.slide = open_slide(path)
        reader = self.slide.reader
        if not isinstance(reader, TiffTileReader) or 0 not in reader.direct_levels:
            raise RuntimeError(
                f"{self.slide.path}: level 0 is not a tiled TIFF level inference.slides.tiff_tiles decodes"
            )
        self.level = reader.tiled_level(0)
        if not self.level.is_jpeg:
            raise RuntimeError(f"{self.slide.path}: level 0 is not JPEG-compressed")
        self.streams = list(reader.jpeg_tiles(0))
        self.stored = [(i, reader.tile_bytes(0, i)) for i, _ in self.streams]
        width, height = self.slide.dimensions
        self.slide_name = f"{Path(self.slide.path).name}, {width}x{height} px"
        self.reference = {i: self.level.decode(data, i) for i, data in self.stored}
        # As many threads as segment_slide reads with on CUDA when the CPU decodes.
        self.threads = SegmentConfig(read_on_device=False).workers_for(torch.device("cuda"))
        self.extras: dict[str, dict[str, str]] = {}
        self.gpu = torch.cuda.is_available() and nvimgcodec_available()
        self._decoders: dict[str | None, NvImageCodecDecoder] = {}
        if self.gpu:
            self._setup_model()

    @property
    def mpx(self) -> float:
        return len(self.streams) * self.level.tile_w * self.level.tile_h / 1e6

    def _max_diff(self, label: str, decoded: dict[int, np.ndarray]) -> None:
        worst = max(int(np.abs(decoded[i].astype(np.int16) - ref).max()) for i, ref in self.reference.items())
        self.extras[label] = {**self.extras.get(label, {}), "max |diff|": str(worst)}

    # CPU -----------------------------------------------------------------------------------
    def _cpu_readers(self) -> float:
        for index, data in self.stored:
            self.level.decode(data, index)
        return self.mpx

    def _cpu_standalone(self, label: str) -> float:
        if label not in self.extras:  # compared once, in the warm-up run
            self._max_diff(label, {i: imagecodecs.jpeg8_decode(s) for i, s in self.streams})
            return self.mpx
        for _, stream in self.streams:  # timed: each tile dropped as the readers' are, not kept
            imagecodecs.jpeg8_decode(stream)
        return self.mpx

    def _cpu_threads(self) -> float:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda item: self.level.decode(item[1], item[0]), self.stored))
        return self.mpx

    # GPU -----------------------------------------------------------------------------------
    def _decoder(self, kind: str | None) -> NvImageCodecDecoder:
        if kind not in self._decoders:
            self._decoders[kind] = NvImageCodecDecoder(torch.device("cuda"), backend=kind)
        return self._decoders[kind]

    def _gpu_batch(
        self, decoder: NvImageCodecDecoder, start: int, batch: int, stream: torch.cuda.Stream
    ) -> list[torch.Tensor]:
        # Decoded as the pipeline decodes (inference.slides.gpu_decode), on ``stream``.
        data = [s for _, s in self.streams[start : start + batch]]
        with torch.cuda.stream(stream):
            tiles = decoder(data, self.level.jpeg_rgb)
        if any(tile is None for tile in tiles):
            raise RuntimeError(f"nvImageCodec could not decode some of tiles {start}..{start + len(data) - 1}")
        return tiles

    def _gpu(self, label: str, kind: str | None, batch: int) -> float:
        decoder = self._decoder(kind)
        stream = torch.cuda.current_stream()
        tiles = []
        for start in range(0, len(self.streams), batch):
            tiles += self._gpu_batch(decoder, start, batch, stream)
        stream.synchronize()
        if label not in self.extras:  # compared once, in the warm-up run
            self._max_diff(label, {i: t.cpu().numpy() for (i, _), t in zip(self.streams, tiles, strict=True)})
        return self.mpx

    def _setup_model(self) -> None:
        from benchmarks.seg_gpu import BIG_FEATURES
        from inference.models.unet import build_model

        torch.manual_seed(0)
        kwargs = {"in_channels": 3, "n_classes": 2, "features": list(BIG_FEATURES), "n_conv_per_stage": 2}
        self.model = build_model("PlainConvUNet", kwargs).cuda().eval()
        self.batch_x = torch.randn(16, 3, 512, 512, device="cuda")
        self._forward(3)  # warm-up: cuDNN algorithm search
        self.model_alone_s = min(self._timed_forward() for _ in range(2))

    def _timed_forward(self) -> float:
        t0 = time.perf_counter()
        self._forward(_MODEL_BATCHES)
        return time.perf_counter() - t0

    def _forward(self, batches: int) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(batches):
                self.model(self.batch_x)
        torch.cuda.current_stream().synchronize()  # not the device: a decoder may be busy on another stream

    def _beside_model(self, label: str, kind: str | None) -> float:
        # The decoder loops over the tiles on its own thread and CUDA stream while the model
        # runs _MODEL_BATCHES forward passes; the rate is the tiles it decoded meanwhile.
        decoder = self._decoder(kind)
        stop, decoded = threading.Event(), [0]
        errors: list[BaseException] = []
        stream = torch.cuda.Stream()

        def decode_loop() -> None:
            start = 0
            try:
                while not stop.is_set():
                    tiles = self._gpu_batch(decoder, start, 64, stream)
                    stream.synchronize()
                    decoded[0] += len(tiles)
                    start = (start + 64) % len(self.streams)
            except BaseException as err:  # reported by the case below, not lost as a thread traceback
                errors.append(err)

        thread = threading.Thread(target=decode_loop, daemon=True)
        thread.start()
        model_s = self._timed_forward()
        stop.set()
        thread.join()
        if errors:
            raise RuntimeError(f"{label}: the decoder failed while the model ran beside it") from errors[0]
        self.extras[label] = {"model slowdown": f"{model_s / self.model_alone_s:.2f}"}
        return decoded[0] * self.level.tile_w * self.level.tile_h / 1e6

    def cases(self) -> list[Case]:
        standalone = "libjpeg-turbo, 1 thread, standalone files"
        cases = [
            Case("libjpeg-turbo, 1 thread, as the readers decode", self._cpu_readers, baseline=True),
            Case(standalone, lambda: self._cpu_standalone(standalone)),
            Case(f"libjpeg-turbo, {self.threads} threads, as the readers decode", self._cpu_threads),
        ]
        if not self.gpu:
            return cases
        for kind, name in (
            (None, "default backends"),
            ("HW_GPU_ONLY", "hardware decoder"),
            ("HYBRID_CPU_GPU", "hybrid CPU+GPU"),
        ):
            for batch in (64, 256):
                label = f"nvImageCodec {name}, batches of {batch}"
                cases.append(Case(label, lambda label=label, kind=kind, batch=batch: self._gpu(label, kind, batch)))
            label = f"nvImageCodec {name}, beside the nnU-Net-sized model"
            cases.append(Case(label, lambda label=label, kind=kind: self._beside_model(label, kind)))
        return cases

    def extra(self, label: str) -> dict[str, str]:
        return self.extras.get(label, {})

    def conditions(self) -> dict[str, str]:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        conditions = {
            "slide": self.slide_name,
            "tiles": f"{len(self.streams)} x {self.level.tile_w}x{self.level.tile_h} px",
            "GPU": gpu if self.gpu else f"{gpu} (nvImageCodec rows need CUDA and nvidia-nvimgcodec)",
        }
        if self.gpu:
            conditions["model"] = f"PlainConvUNet features 32..512, {_MODEL_BATCHES} batches of 16 x 512² px, bf16"
        return conditions
