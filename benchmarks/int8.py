"""INT8 post-training quantisation (NNCF) of the demo members on OpenVINO against torch bf16 (issue #35).

``python -m benchmarks.int8 --work DIR [--stage phantoms|quantise|speed|agreement|e2e|all] [--quick]
[--kinds seg,nuclei] [--rounds N]``

The baseline is what the product runs by default on this CPU: eager PyTorch in bf16 autocast (``precision=auto``
on a CPU with AVX512-BF16), every ratio against it measured in the same run.

1. ``phantoms``: writes calibration phantoms (seeds 7101-7112, 4096² at 0.5 µm/px, TPS and shift in the demo's
   training range: 10-70 %, 0-0.3) and held-out phantoms (seeds 9301-9308, none used for calibration; shifts
   0.3-0.8 and TPS near the 1 % and 50 % cut-offs) under ``DIR/slides``, as ``pdl1 phantom`` does.
2. ``quantise``: converts each member as :mod:`inference.models.openvino_engine` does (``export_member``: traced
   from the loaded module, BatchNorms folded, checked against torch within 1e-4) and quantises the IR with
   ``nncf.quantize`` (presets ``performance`` and ``mixed``, ``subset_size`` 300) on calibration tiles read from
   the calibration phantoms' tissue exactly as ``segment_slide`` reads them (the tile grid of ``plan_tiles``,
   ``plan_reads``' pixels, ``Ensemble.normalize``): 300 tiles drawn with a fixed seed. IRs go to ``DIR/ir``.
3. ``speed``: one forward pass of a batch (the product's CPU batch: 4 tiles for segmentation, 2 for nuclei) per
   member and for the whole ensemble: torch fp32, torch bf16 autocast (baseline), OpenVINO f32, OpenVINO bf16
   (inference precision hint), OpenVINO int8 (each preset; its non-quantised operations in f32 and in bf16).
   Interleaved rounds (every case once per round, in turn), medians and spreads (min-max); threads fixed to
   torch's count (OpenVINO: ``INFERENCE_NUM_THREADS`` the same, one stream, as the product compiles members). The
   input is what ``segment_slide`` hands the members (:func:`pipeline_input`: ``Ensemble.normalize``'s
   channels-last strides), in a process set up as ``pdl1`` sets itself up (``GOMP_SPINCOUNT``, the allocator).
4. ``agreement``: each held-out phantom segmented as ``pdl1 eval seg`` does (``segment_slide`` on the product's
   tissue, maps on the truth's grid, per-member maps, Dice over the truth's tissue by
   :func:`~inference.evaluation.evaluate.evaluate_segmentation_maps`) by torch fp32 (the reference), torch bf16
   and OpenVINO int8: per slide the share of scored pixels of the same class as torch fp32, mean |Δ| of the mean
   probability, of mutual information and of predictive entropy, and Dice against the truth. The domain guard is
   left out (it hooks member 0's layers, which a compiled member does not have).
5. ``e2e``: ``pdl1 run``'s analysis of an 8192² phantom (seed 81, as ``benchmarks.runtimes``) in child
   processes: every member on torch bf16 (baseline), every member on OpenVINO bf16 as ``--runtime openvino`` runs
   them (IR from the cache beside the demo model), the segmentation members on OpenVINO int8 (member 0 stays on
   torch for the domain guard, as ``--runtime openvino`` does), and the nuclei members on int8 too; int8 IRs
   compiled with bf16 inference precision for what is not quantised (as ``precision=auto``); interleaved rounds,
   the 1-minute load average before each child in the table.

Results go to ``DIR/*.json``; each stage prints a markdown table. Not a registry benchmark: it quantises models.

Measured (2026-12-05, AMD EPYC 2 vCPUs with AVX512-VNNI/BF16, no AMX, torch 2.13.0+cpu, OpenVINO 2026.4.1,
NNCF 3.4.0, 2 threads, no other jobs, load 0.9-1.7 from the runs themselves): forward passes of the product's
batch, torch bf16 against OpenVINO bf16 / int8 (performance preset), seg ensemble 76.8 ms against 60.5 / 43.5
(1.27x / 1.77x), nuclei 22.6 ms against 19.3 / 11.6 (1.17x / 1.96x); ``pdl1 run``'s analysis of the 8192²
phantom 6.6 s on torch bf16, 6.5 s on OpenVINO bf16 (1.03x: nuclei forward passes 2.8 s against 3.6, the
segmentation's 1.7 against 1.8 with member 0 on torch, and about 0.6 s more outside them: compiling the 6 members
from the cached IR, 0.28 s, and the first inferences), 5.4 s with int8 for both models (1.24x). An earlier
version of this stage fed torch a contiguous NCHW copy, in a process without pdl1's allocator and OpenMP settings,
and reported torch bf16 at 172 ms (seg) and 56 ms (nuclei), hence 2.8-3.1x for OpenVINO bf16 and 3.8-5.0x for
int8 that ``pdl1 run`` never showed: PyTorch's oneDNN convolutions run channels-last on the strides
``Ensemble.normalize`` gives (seg ensemble 60 ms against 107-112 ms NCHW, allocator tuned; 1.4-1.6x slower again
with glibc's default allocator, which page-faults the activations afresh every pass); the e2e children, without
``GOMP_SPINCOUNT=1000``, had PyTorch's idle OpenMP threads spin beside OpenVINO's (OpenVINO's nuclei forward
passes 3.7 s against 2.9 s). No recipe kept Dice within 0.005 of torch bf16 on every held-out slide (worst: -0.072,
-0.054, -0.027 on the 1 % TPS slide; -0.015 to -0.020 at shift 0.8). Kept benchmark-only; see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import time_calls
from benchmarks.runtimes import analyse_and_record

SIZE_PX = 4096
# (name, seed, TPS %, shift): calibration in the demo's training range (its manifest: TPS 10-70 %, shift 0-0.3).
CALIBRATION = (
    ("c7101", 7101, 25.0, 0.0),
    ("c7102", 7102, 50.0, 0.3),
    ("c7103", 7103, 70.0, 0.0),
    ("c7104", 7104, 10.0, 0.15),
    ("c7105", 7105, 40.0, 0.3),
    ("c7106", 7106, 60.0, 0.0),
    ("c7107", 7107, 30.0, 0.15),
    ("c7108", 7108, 55.0, 0.0),
    ("c7109", 7109, 15.0, 0.3),
    ("c7110", 7110, 45.0, 0.0),
    ("c7111", 7111, 65.0, 0.15),
    ("c7112", 7112, 20.0, 0.3),
)
# Held out: new seeds, shifts 0.3-0.8, TPS near the 1 % and 50 % cut-offs.
HELD_OUT = (
    ("h9301", 9301, 30.0, 0.0),
    ("h9302", 9302, 1.0, 0.0),
    ("h9303", 9303, 1.5, 0.3),
    ("h9304", 9304, 0.8, 0.6),
    ("h9305", 9305, 50.0, 0.0),
    ("h9306", 9306, 48.0, 0.5),
    ("h9307", 9307, 52.0, 0.8),
    ("h9308", 9308, 35.0, 0.4),
)
CALIBRATION_TILES = 300
CALIBRATION_SEED = 0
# Quantisation recipes: NNCF's preset, and whether the first and the last convolution stay in float (their
# inputs are the normalised pixels and their outputs the logits: where int8 rounding is costliest).
RECIPES = {"performance": ("performance", False), "mixed": ("mixed", False), "mixed-ends": ("mixed", True)}
PRESETS = ("performance", "mixed")
E2E_SLIDE = ("e2e", 81, 30.0, 0.0)
E2E_SIZE_PX = 8192


def slide_path(work: Path, name: str) -> Path:
    return work / "slides" / f"{name}.svs"


def write_phantoms(work: Path, *, quick: bool) -> None:
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    todo = [(*s, SIZE_PX) for s in CALIBRATION + HELD_OUT] + [(*E2E_SLIDE, 4096 if quick else E2E_SIZE_PX)]
    for name, seed, tps, shift, size in todo:
        path = slide_path(work, name)
        if path.is_file():
            continue
        t0 = time.perf_counter()
        write_phantom(path, PhantomSpec(size, size, seed=seed, tps_percent=tps, shift=shift))
        print(f"{path}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def load(kind: str):
    from inference.models.ensemble import Ensemble, demo_model_dir

    return Ensemble.load(demo_model_dir(kind), task="segmentation" if kind == "seg" else "nuclei", device="cpu")


def calibration_tiles(work: Path, ensemble, *, n: int = CALIBRATION_TILES) -> np.ndarray:
    """``n`` normalised (3, T, T) tiles of the calibration phantoms' tissue, read as ``segment_slide`` reads them."""
    import torch

    from inference.analysis.segment import SegmentConfig, plan_reads, plan_tiles
    from inference.slides.slide import open_slide
    from inference.slides.tissue import tissue_mask_for_slide

    config = SegmentConfig()
    tiles = []
    for name, *_ in CALIBRATION:
        with open_slide(slide_path(work, name)) as slide:
            tissue = tissue_mask_for_slide(slide)
            grid = plan_tiles(slide, ensemble, roi=None, tissue=tissue, config=config)
            reads = plan_reads(slide, grid, mpp=ensemble.manifest.input_mpp, device=torch.device("cpu"), config=config)
            it = reads.tiles()
            try:
                tiles.extend(np.asarray(t) for _, t in it)
            finally:
                it.close()
    pick = np.random.default_rng(CALIBRATION_SEED).choice(len(tiles), size=min(n, len(tiles)), replace=False)
    batch = torch.from_numpy(np.stack([tiles[i] for i in sorted(pick)]))
    print(f"  calibration: {len(pick)} of {len(tiles)} tissue tiles", file=sys.stderr)
    return ensemble.normalize(batch).numpy()


def ir_folder(work: Path, kind: str, index: int, variant: str) -> Path:
    return work / "ir" / kind / f"member_{index:02d}" / variant


def end_convolutions(model) -> list[str]:
    """Names of the first and the last convolution of an OpenVINO model."""
    kinds = ("Convolution", "ConvolutionBackpropData", "GroupConvolution")
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in kinds]
    return [convs[0], convs[-1]]


def quantise(work: Path, kinds: list[str], *, presets=PRESETS) -> dict:
    import nncf
    import openvino as ov

    from inference.models import openvino_engine as ove

    record: dict = {}
    for kind in kinds:
        ens = load(kind)
        m = ens.manifest
        calib = None
        for i, module in enumerate(ens.members):
            f32 = ir_folder(work, kind, i, "f32")
            if not (f32 / "model.xml").is_file():
                key = ove.cache_key(member_sha256=ens.member_files[i].sha256, architecture=m.architecture,
                                    architecture_kwargs=m.architecture_kwargs, bn_folded=ens.bn_folded,
                                    ov_version=ove.openvino_version())  # fmt: skip
                ir = ove.export_member(module, name=f"{kind} member {i}", key=key, roots=[f32.parent / "cache"],
                                       tile_px=m.tile_size_px)  # fmt: skip
                f32.mkdir(parents=True, exist_ok=True)
                for n in ("model.xml", "model.bin", "meta.json"):
                    (f32 / n).write_bytes((ir.folder / n).read_bytes())
            for preset in presets:
                out = ir_folder(work, kind, i, f"int8-{preset}")
                if (out / "model.xml").is_file():
                    continue
                if calib is None:
                    calib = calibration_tiles(work, ens)
                model = ov.Core().read_model(f32 / "model.xml")
                nncf_preset, keep_ends = RECIPES[preset]
                t0 = time.perf_counter()
                q = nncf.quantize(
                    model,
                    nncf.Dataset([calib[j : j + 1] for j in range(len(calib))]),
                    preset=getattr(nncf.QuantizationPreset, nncf_preset.upper()),
                    subset_size=len(calib),
                    ignored_scope=nncf.IgnoredScope(names=end_convolutions(model)) if keep_ends else None,
                )
                seconds = time.perf_counter() - t0
                out.mkdir(parents=True, exist_ok=True)
                ov.save_model(q, out / "model.xml", compress_to_fp16=False)
                record[f"{kind}/{i}/{preset}"] = seconds
                print(f"  {kind} member {i} int8 {preset}: quantised in {seconds:.1f} s", file=sys.stderr)
    (work / "quantise.json").write_text(json.dumps(record, indent=1))
    return record


def compile_ir(folder: Path, *, bf16: bool, name: str = ""):
    from inference.models import openvino_engine as ove

    return ove.compile_ir(folder, bf16=bf16, name=name)


def variants(kind: str, work: Path, *, presets=PRESETS) -> dict[str, tuple[list, str]]:
    """label -> (members, what runs them): the torch modules, or compiled OpenVINO members."""
    ens = load(kind)
    n = len(ens.members)
    out: dict[str, tuple[list, str]] = {
        "torch fp32": (ens.members, "fp32"),
        "torch bf16 autocast": (ens.members, "bf16"),
        "openvino f32": ([compile_ir(ir_folder(work, kind, i, "f32"), bf16=False) for i in range(n)], ""),
        "openvino bf16": ([compile_ir(ir_folder(work, kind, i, "f32"), bf16=True) for i in range(n)], ""),
    }
    for preset in presets:
        for bf16 in (False, True):
            members = [compile_ir(ir_folder(work, kind, i, f"int8-{preset}"), bf16=bf16) for i in range(n)]
            out[f"openvino int8 {preset}{' +bf16' if bf16 else ''}"] = (members, "")
    return out


def _forward(members: list, x, how: str):
    import torch

    with torch.inference_mode():
        for model in members:
            if how == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(x).float()
            else:
                model(x).float()


def pipeline_input(normalised: np.ndarray):
    """The members' input as the sliding windows hand it to them: ``Ensemble.normalize``'s output, whose strides
    are channels-last (it permutes the (B, H, W, 3) tiles), not a contiguous NCHW copy. Eager PyTorch runs oneDNN's
    channels-last convolutions on it, twice as fast in bf16 on the 2-CPU machine as on NCHW (seg ensemble 57 ms
    against 178 ms with 4 tiles; OpenVINO copies either into its own layout, the same speed).

    >>> import torch
    >>> x = pipeline_input(torch.zeros(2, 8, 8, 3).permute(0, 3, 1, 2).numpy())
    >>> tuple(x.shape), x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    ((2, 3, 8, 8), False, True)
    """
    import torch

    return torch.from_numpy(normalised)  # keeps the numpy array's strides


def measure_speed(work: Path, kinds: list[str], *, rounds: int, presets=PRESETS) -> dict:
    import torch

    from inference.analysis.nuclei import NucleiConfig
    from inference.analysis.segment import SegmentConfig

    result: dict = {"torch_threads": torch.get_num_threads(), "rounds": rounds, "kinds": {}}
    for kind in kinds:
        ens = load(kind)
        cpu = torch.device("cpu")
        batch = (SegmentConfig() if kind == "seg" else NucleiConfig()).batch_for(cpu)
        x = pipeline_input(calibration_tiles(work, ens, n=batch))
        cases = variants(kind, work, presets=presets)
        # Per member (member i alone) and the whole ensemble, every case once per round.
        units = [(f"member {i}", [i]) for i in range(len(ens.members))] + [("ensemble", list(range(len(ens.members))))]
        seconds = {(label, u): [] for label in cases for u, _ in units}
        for members, how in cases.values():  # warm-up
            _forward(members, x, how)
        for r in range(rounds):
            for u, idx in units:
                for label, (members, how) in cases.items():
                    t0 = time.perf_counter()
                    _forward([members[i] for i in idx], x, how)
                    seconds[(label, u)].append(time.perf_counter() - t0)
            print(f"  {kind} round {r + 1} of {rounds}", file=sys.stderr)
        result["kinds"][kind] = {
            "batch": batch,
            "tile_px": ens.manifest.tile_size_px,
            "seconds": {f"{label}|{u}": s for (label, u), s in seconds.items()},
        }
    (work / "speed.json").write_text(json.dumps(result, indent=1))
    return result


def speed_table(result: dict, *, baseline: str = "torch bf16 autocast") -> str:
    lines = []
    for kind, data in result["kinds"].items():
        secs = {tuple(k.split("|")): v for k, v in data["seconds"].items()}
        labels = list(dict.fromkeys(k[0] for k in secs))
        units = list(dict.fromkeys(k[1] for k in secs))
        lines.append(f"\n{kind}: one forward pass of {data['batch']} tiles of {data['tile_px']}² px, "
                     f"{result['torch_threads']} threads, {result['rounds']} interleaved rounds; "
                     f"median ms (min-max), x = baseline median / case median")  # fmt: skip
        lines.append("| case | " + " | ".join(units) + " | ensemble x " + baseline + " |")
        lines.append("|---|" + "---|" * (len(units) + 1))
        for label in labels:
            cells = []
            for u in units:
                s = secs[(label, u)]
                cells.append(f"{statistics.median(s) * 1e3:.1f} ({min(s) * 1e3:.1f}-{max(s) * 1e3:.1f})")
            ratio = statistics.median(secs[(baseline, "ensemble")]) / statistics.median(secs[(label, "ensemble")])
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def score_slide(path: Path, ensemble, *, precision: str):
    """Segment ``path`` as ``pdl1 eval seg`` does (without the domain guard) and score it against its truth."""
    from inference.analysis.regions import mask_on_maps
    from inference.analysis.segment import SegmentConfig, segment_slide
    from inference.evaluation.evaluate import evaluate_segmentation_maps, truth_map_downsample
    from inference.phantom.truth import load_truth
    from inference.phantom.truth_tissue import truth_tissue_mask
    from inference.slides.slide import open_slide
    from inference.slides.tissue import TISSUE_METHOD_OF_STAIN, tissue_mask_for_slide

    truth_data = load_truth(path)
    m = ensemble.manifest
    with open_slide(path) as slide:
        truth_mpp = truth_data.mask_downsample * slide.mpp.mean
        config = SegmentConfig(map_downsample=truth_map_downsample(truth_mpp, m.input_mpp), member_maps=True,
                               precision=precision, runtime=ensemble.runtime)  # fmt: skip
        tissue = tissue_mask_for_slide(slide, method=TISSUE_METHOD_OF_STAIN[m.stain])
        t0 = time.perf_counter()
        maps = segment_slide(slide, ensemble, tissue=tissue, config=config)
        seconds = time.perf_counter() - t0
    region = mask_on_maps(truth_tissue_mask(truth_data), truth_data.mask_downsample, maps)
    truth = mask_on_maps(truth_data.positive_mask.astype(bool), truth_data.mask_downsample, maps) & region
    thr = m.thresholds.get("segmentation", 0.5)
    seg = evaluate_segmentation_maps(maps, truth, region, threshold=thr, slide=path.name)
    return seg, maps, region, seconds


def measure_agreement(work: Path, *, presets: list[str], quick: bool) -> dict:
    ens = load("seg")
    n = len(ens.members)
    cases = {"torch fp32": (ens, "fp32"), "torch bf16 autocast": (ens, "bf16")}
    for preset in presets:
        for bf16 in (False, True):
            members = [compile_ir(ir_folder(work, "seg", i, f"int8-{preset}"), bf16=bf16) for i in range(n)]
            label = f"openvino int8 {preset}{' +bf16' if bf16 else ''}"
            cases[label] = (ens._with(members, runtime="openvino", member_files=None), "fp32")
    preset = "_".join(presets)
    thr = ens.manifest.thresholds.get("segmentation", 0.5)
    rows = []
    for name, seed, tps, shift in HELD_OUT[:3] if quick else HELD_OUT:
        ref = None
        for label, (e, precision) in cases.items():
            seg, maps, region, seconds = score_slide(slide_path(work, name), e, precision=precision)
            prob = np.asarray(maps.prob)[region]
            mi = np.asarray(maps.mutual_information)[region]
            pe = np.asarray(maps.predictive_entropy)[region]
            if ref is None:
                ref = (prob, mi, pe, seg.dice_ensemble)
            row = {
                "slide": name,
                "seed": seed,
                "tps": tps,
                "shift": shift,
                "case": label,
                "pixels": int(region.sum()),
                "same_class": float(((prob >= thr) == (ref[0] >= thr)).mean()),
                "mean_abs_dprob": float(np.abs(prob - ref[0]).mean()),
                "max_abs_dprob": float(np.abs(prob - ref[0]).max()),
                "mean_abs_dmi": float(np.abs(mi - ref[1]).mean()),
                "mean_abs_dentropy": float(np.abs(pe - ref[2]).mean()),
                "dice": seg.dice_ensemble,
                "dice_members": list(seg.dice_members),
                "segment_s": seconds,
            }
            rows.append(row)
            print(f"  {name} {label}: dice {row['dice']:.4f}, same {row['same_class']:.5f}, "
                  f"|dprob| {row['mean_abs_dprob']:.4f}, {seconds:.1f} s", file=sys.stderr)  # fmt: skip
    result = {"preset": preset, "threshold": thr, "rows": rows}
    (work / f"agreement_{preset}.json").write_text(json.dumps(result, indent=1))
    return result


def agreement_table(result: dict) -> str:
    lines = [
        "\n| slide (seed, TPS %, shift) | case | same class as torch fp32 | mean abs dprob | max abs dprob | "
        "mean abs dMI | mean abs dentropy | Dice | dDice vs torch bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bf16 = {r["slide"]: r["dice"] for r in result["rows"] if r["case"] == "torch bf16 autocast"}
    for r in result["rows"]:
        lines.append(
            f"| {r['slide']} ({r['seed']}, {r['tps']:g}, {r['shift']:g}) | {r['case']} | {r['same_class']:.5f} | "
            f"{r['mean_abs_dprob']:.5f} | {r['max_abs_dprob']:.3f} | {r['mean_abs_dmi']:.5f} | "
            f"{r['mean_abs_dentropy']:.5f} | {r['dice']:.4f} | {r['dice'] - bf16[r['slide']]:+.4f} |"
        )
    return "\n".join(lines)


def _child(slide: Path, out: Path, *, seg: str, nuclei: str, ir_root: Path, preset: str) -> None:
    """One ``pdl1 run`` analysis (benchmarks.runtimes' recorded one), each model's members on torch or int8."""
    t_start = time.perf_counter()
    import inference.allocator as allocator

    allocator.tune_allocator()
    from inference import Models, PipelineConfig
    from inference.analysis.nuclei import NucleiConfig
    from inference.analysis.segment import SegmentConfig
    from inference.models.ensemble import demo_model_dir

    def runtime(how: str) -> str:
        return "torch" if how == "torch" else "openvino"

    config = PipelineConfig(
        device="cpu",
        seg_model_dir=str(demo_model_dir("seg")),
        nuclei_model_dir=str(demo_model_dir("nuclei")),
        segment=SegmentConfig(runtime=runtime(seg)),
        nuclei=NucleiConfig(runtime=runtime(nuclei)),
    )
    models = Models(config)
    models.load_he()
    for ens, how, kind in ((models.seg, seg, "seg"), (models.nuclei, nuclei, "nuclei")):
        if how in ("torch", "bf16"):  # bf16: OpenVINO as the product runs it (IR from the cache beside the model)
            continue

        def to_int8(*, bf16: bool, keep_on_torch: tuple[int, ...] = (), ens=ens, kind=kind):
            members = [
                m
                if i in keep_on_torch
                else compile_ir(ir_root / kind / f"member_{i:02d}" / f"int8-{preset}", bf16=bf16)
                for i, m in enumerate(ens.members)
            ]
            return ens._with(members, runtime="openvino")

        ens._to_openvino = to_int8  # in place of the f32 IR: the int8 one, compiled as the product compiles
    t_loaded = time.perf_counter()
    # The members' forward passes within each phase (normalisation included).
    import inference.analysis.nuclei as nuclei_module
    from inference.models.ensemble import Ensemble

    phases: dict[str, float] = {}
    time_calls(Ensemble, "member_logits", "seg_forward", phases)
    time_calls(nuclei_module, "_forward", "nuclei_forward", phases)
    analyse_and_record(
        slide, models, config, out, record={"load_s": t_loaded - t_start}, t_start=t_start, phases=phases
    )


E2E_CASES = {
    "torch bf16 autocast": ("torch", "torch"),
    "openvino bf16 (--runtime openvino)": ("bf16", "bf16"),
    "int8 segmentation, torch nuclei": ("int8", "torch"),
    "int8 segmentation and nuclei": ("int8", "int8"),
}


def measure_e2e(work: Path, *, preset: str, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {c: [] for c in E2E_CASES}
    files: dict[str, list[Path]] = {c: [] for c in E2E_CASES}
    for r in range(rounds):
        for label, (seg, nuclei) in E2E_CASES.items():
            out = work / "e2e" / f"{seg}_{nuclei}_{r}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.int8", "--work", str(work), "--child", str(out), "--seg", seg,
                   "--nuclei", nuclei, "--preset", preset]  # fmt: skip
            load = os.getloadavg()[0]
            subprocess.run(cmd, check=True)
            fig = {**json.loads(out.read_text()), "load1_before": load}
            print(f"  round {r + 1} {label} (load {load:.2f}): analysis {fig['analysis_s']:.1f} s, segmentation "
                  f"{fig['segmentation_s']:.1f} s (forward {fig['seg_forward_s']:.1f}), nuclei {fig['nuclei_s']:.1f} s "
                  f"(forward {fig['nuclei_forward_s']:.1f})", file=sys.stderr)  # fmt: skip
            runs[label].append(fig)
            files[label].append(out)
    base = files["torch bf16 autocast"]
    result = {"preset": preset, "rounds": rounds, "cases": {}}
    for label, rs in runs.items():
        same = []
        for i, run in enumerate(rs):
            p, q = (np.load(f[i].with_suffix(".prob.npy")) for f in (files[label], base))
            cov = np.load(files[label][i].with_suffix(".covered.npy")) & np.load(base[i].with_suffix(".covered.npy"))
            t = run["threshold"]
            same.append(float(((p >= t) == (q >= t))[cov].mean()))
        result["cases"][label] = {"runs": rs, "same_class": same}
    (work / f"e2e_{preset}.json").write_text(json.dumps(result, indent=1))
    return result


def e2e_table(result: dict) -> str:
    cases = result["cases"]
    base = cases["torch bf16 autocast"]["runs"]

    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    lines = [
        f"\npdl1 run analysis of the {E2E_SIZE_PX}² phantom (seed 81), {result['rounds']} interleaved rounds, "
        "median s (min-max)",
        "| case | analysis s | segmentation s | its forward passes s | nuclei s | its forward passes s | "
        "analysis x torch bf16 | segmentation x torch bf16 | TPS % | nuclei | same class | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, c in cases.items():
        rs = c["runs"]
        loads = [r["load1_before"] for r in rs if "load1_before" in r]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
        cells = [
            f"{med(rs, k):.1f} ({min(r[k] for r in rs):.1f}-{max(r[k] for r in rs):.1f})"
            for k in ("analysis_s", "segmentation_s", "seg_forward_s", "nuclei_s", "nuclei_forward_s")
        ]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {med(base, 'analysis_s') / med(rs, 'analysis_s'):.2f} | "
            f"{med(base, 'segmentation_s') / med(rs, 'segmentation_s'):.2f} | "
            + ", ".join(sorted({f"{r['tps']:.2f}" for r in rs if r["tps"] is not None}))
            + " | "
            + ", ".join(sorted({str(r["nuclei"]) for r in rs}))
            + f" | {min(c['same_class']):.4f} | {load} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stage", default="all", choices=("phantoms", "quantise", "speed", "agreement", "e2e", "all"))
    parser.add_argument("--quick", action="store_true", help="fewer rounds and held-out slides, a 4096² e2e slide")
    parser.add_argument("--kinds", default="seg", help="seg,nuclei: which demo models the speed stage times")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--preset", default="performance", help="recipe for e2e (agreement: one or more, a,b)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="recipes the quantise and speed stages make")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seg", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--nuclei", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work
    # As pdl1 starts (bridge.cli.app): libgomp's spin count before torch loads, and the allocator's hand-back of
    # freed heap. Without them eager PyTorch's forward passes page-fault their activations afresh (1.5x slower in
    # isolation), and its spinning OpenMP threads slow OpenVINO's beside them in one process (nuclei 1.25x).
    from inference.openmp import tune_openmp

    tune_openmp()
    import inference.allocator as allocator

    allocator.tune_allocator()
    if args.child is not None:
        _child(slide_path(work, E2E_SLIDE[0]), args.child, seg=args.seg, nuclei=args.nuclei, ir_root=work / "ir",
               preset=args.preset)  # fmt: skip
        return
    kinds = args.kinds.split(",")
    stages = ("phantoms", "quantise", "speed", "agreement", "e2e") if args.stage == "all" else (args.stage,)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}", file=sys.stderr)  # fmt: skip
    for stage in stages:
        if stage == "phantoms":
            write_phantoms(work, quick=args.quick)
        elif stage == "quantise":
            quantise(work, kinds, presets=args.presets.split(","))
        elif stage == "speed":
            rounds = args.rounds or (3 if args.quick else 7)
            print(speed_table(measure_speed(work, kinds, rounds=rounds, presets=args.presets.split(","))))
        elif stage == "agreement":
            presets = args.preset.split(",")
            print(agreement_table(measure_agreement(work, presets=presets, quick=args.quick)))
        elif stage == "e2e":
            print(e2e_table(measure_e2e(work, preset=args.preset, rounds=args.rounds or (1 if args.quick else 3))))


if __name__ == "__main__":
    main()
