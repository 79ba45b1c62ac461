"""INT8 post-training quantisation (NNCF) of the demo members on OpenVINO against torch bf16 (issue #35).

``python -m benchmarks.int8 --work DIR [--stage phantoms|quantise|quantise-ac|speed|agreement|e2e|all] [--quick]
[--kinds seg,nuclei] [--rounds N] [--presets P,Q] [--max-drop D]``

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
2b. ``quantise-ac`` (not part of ``all``; ``--presets`` ``ac-performance``, ``ac-mixed`` or ``ac-mixed-ends``, the
   plain recipes' settings): each member's (``--kinds``)
   f32 IR through ``nncf.quantize_with_accuracy_control``, which quantises as ``quantise`` does and then returns to
   float, one group at a time, the operations whose quantisation costs most on a validation metric until the drop
   is at most ``--max-drop`` (absolute). The calibration phantoms are split, so the held-out ones stay unseen:
   calibration on every tissue tile of 7101-7108 (TPS 10-70 %, shift 0-0.3), validation on every tissue tile of
   7109-7112 (TPS 15, 45, 65, 20 %; shift 0.3, 0, 0.15, 0.3). The metric (:func:`positive_agreement`) is the
   member's own positive pixels against the float IR's on those tiles: the smaller of the pooled Dice of the
   positive class over all tiles and over the low-positive ones (under 5 % of the tile positive by the float IR),
   since the plain recipes lost most on a 1 % TPS slide, where a few flipped pixels weigh most. ``max_drop`` 0.005
   (that Dice at least 0.995 against float): the budget this module holds the held-out slides to is 0.005 Dice
   against torch bf16, torch bf16 keeps within 0.0012 of fp32 there, and a member that changes at most 0.5 % of its
   positive pixels on calibration-like tiles moves the ensemble's Dice against the truth by about that or less,
   if the held-out slides behave like the validation ones (they are further out: shift up to 0.8, TPS 0.8-1.5 %;
   the ``agreement`` stage checks it). IRs go to ``DIR/ir/seg/member_NN/int8-ac-<preset>``, what stayed in
   float to ``DIR/quantise_ac.json``; ``speed``, ``agreement`` and ``e2e`` take the recipe by name.
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

Accuracy control (``quantise-ac``, 2026-12-05, same machine, max_drop 0.005; 190 calibration and 95 validation
tiles, 53-56 of them low-positive): the plain recipes' IRs (calibrated on all 12 phantoms) scored 0.929-0.990
(``performance``) and 0.974-0.995 (``mixed-ends``), their false positives on the low-positive tiles (the plain
``performance`` members call 2-15 % more positive pixels there). NNCF's greedy reverting kept 13 and 12 of 18
operations in int8 for members 0 and 1 (``ac-performance``; 5 and 6 in float) but could not reach the drop on
members 2-4 short of reverting all 18: their drop stayed at 0.0076-0.03 while layer after layer went back to float.
``ac-mixed-ends``: members 0 and 4 as plain ``mixed-ends`` (16 of 18 in int8, within the drop already), member 1
with 2 in int8, members 2 and 3 all float. On the held-out slides both keep Dice within 0.005 of torch bf16 on every
slide (worst |change| 0.0041 with bf16 for the float operations, both recipes; the plain ones -0.072 and -0.027),
the first INT8 recipes that do; but they buy almost no speed over OpenVINO bf16. Forward passes of the segmentation
ensemble (15 interleaved rounds, load 1.5-2.2 from other jobs; median of the per-round ratios to torch bf16):
OpenVINO bf16 1.23x, int8 ``performance`` 1.86x, ``ac-performance`` 1.31x and ``ac-mixed-ends`` 1.27x (both with
bf16 for the float operations; in f32 0.80x and 0.85x): the members wholly in float run at OpenVINO bf16's speed,
and the partly quantised ones barely faster (members 0 and 1 of ``ac-performance`` 15.5 and 16.5 ms against 16.9
and 15.7 ms bf16 and 10.7 and 10.8 ms plain int8: the layers returned to float are the costly ones, and each
boundary adds a conversion). ``pdl1 run`` end to end, 3 rounds at load 2.0-3.8: segmentation phases within the
noise of OpenVINO bf16 (1.05x; ``ac-performance`` 1.10x, ``ac-mixed-ends`` 1.28x, plain int8 1.06x, each with
torch nuclei; an earlier run at load 4.2-4.9: 1.00x, 0.93x, 0.92x, 0.97x), nothing this machine can resolve.
Nuclei members (``--kinds nuclei``, metric on each class's heatmap at ``min_score``; 300 calibration and 300
validation tiles): plain int8 scored 0.992 and 0.991; ``ac-performance`` kept 10 of 13 convolutions in int8 in both
(the first full-resolution one, the first downsampling one and the head in float; NNCF counted 3 of 17 quantised
operations reverted), forward passes 1.79x torch bf16 with bf16 for the float ones (plain int8 2.23x, OpenVINO bf16
1.23x; 15 rounds, load 1.6-2.0). Their accuracy on the held-out slides is not measured (``agreement`` scores the
segmentation).
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
# Accuracy-controlled recipes (``quantise-ac``): nncf.quantize_with_accuracy_control with NNCF's preset, calibrated on
# the first 8 calibration phantoms and validated on the last 4 (none of the held-out ones), at most AC_MAX_DROP
# (absolute) below the float member on the validation metric (:func:`positive_agreement`).
AC_RECIPES = {"ac-performance": "performance", "ac-mixed": "mixed", "ac-mixed-ends": "mixed-ends"}  # the plain one
AC_CALIBRATION = CALIBRATION[:8]
AC_VALIDATION = CALIBRATION[8:]
AC_MAX_DROP = 0.005
# A validation tile is low-positive when under this share of its pixels is positive by the float member.
AC_LOW_POSITIVE = 0.05
E2E_SLIDE = ("e2e", 81, 30.0, 0.0)
STAGES = ("phantoms", "quantise", "quantise-ac", "speed", "agreement", "e2e")
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


def calibration_tiles(work: Path, ensemble, *, n: int | None = CALIBRATION_TILES, slides=CALIBRATION) -> np.ndarray:
    """``n`` normalised (3, T, T) tiles of ``slides``' tissue (all of them if ``n`` is None), read as
    ``segment_slide`` reads them."""
    import torch

    from inference.analysis.segment import SegmentConfig, plan_reads, plan_tiles
    from inference.slides.slide import open_slide
    from inference.slides.tissue import tissue_mask_for_slide

    config = SegmentConfig()
    tiles = []
    for name, *_ in slides:
        with open_slide(slide_path(work, name)) as slide:
            tissue = tissue_mask_for_slide(slide)
            grid = plan_tiles(slide, ensemble, roi=None, tissue=tissue, config=config)
            reads = plan_reads(slide, grid, mpp=ensemble.manifest.input_mpp, device=torch.device("cpu"), config=config)
            it = reads.tiles()
            try:
                tiles.extend(np.asarray(t) for _, t in it)
            finally:
                it.close()
    size = len(tiles) if n is None else min(n, len(tiles))
    pick = np.random.default_rng(CALIBRATION_SEED).choice(len(tiles), size=size, replace=False)
    batch = torch.from_numpy(np.stack([tiles[i] for i in sorted(pick)]))
    print(f"  {len(pick)} of {len(tiles)} tissue tiles of {', '.join(s[0] for s in slides)}", file=sys.stderr)
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


def positive_agreement(reference: np.ndarray, masks: np.ndarray) -> tuple[float, list[float]]:
    """The accuracy-controlled stage's validation metric: how well a member's positive pixels ``masks`` (N, H, W)
    match the float member's ``reference`` on the same N tiles. The metric is the smaller of two pooled Dice
    coefficients of the positive class: over all tiles, and over the low-positive tiles (under
    :data:`AC_LOW_POSITIVE` of their pixels positive by the reference), where a few flipped pixels weigh most (the
    plain INT8 recipes lost their most Dice on a 1 % TPS slide). A pool with no positive pixel on either side scores
    1. Per tile: its Dice with one pixel of smoothing (NNCF ranks the tiles by it).

    >>> ref = np.zeros((3, 4, 10), bool); ref[0] = True; ref[1, 0, 0] = True
    >>> positive_agreement(ref, ref)[0]
    1.0
    >>> worse = ref.copy(); worse[1, 1, :3] = True  # 3 false positives on the low-positive tile
    >>> metric, per_tile = positive_agreement(ref, worse)
    >>> round(metric, 3), [round(v, 3) for v in per_tile]
    (0.4, [1.0, 0.5, 1.0])
    """
    ref = reference.reshape(len(reference), -1)
    got = masks.reshape(len(masks), -1)
    inter = (ref & got).sum(axis=1)
    sizes = ref.sum(axis=1) + got.sum(axis=1)
    low = ref.mean(axis=1) < AC_LOW_POSITIVE

    def pooled(pick) -> float:
        total = sizes[pick].sum()
        return 1.0 if total == 0 else float(2 * inter[pick].sum() / total)

    metric = min(pooled(np.ones(len(ref), bool)), pooled(low))
    return metric, [float((2 * i + 1) / (n + 1)) for i, n in zip(inter, sizes, strict=True)]


def member_positive(logits: np.ndarray, manifest) -> np.ndarray:
    """A member's positive pixels from its logits (N, C, H, W): for a segmentation member (N, H, W), as
    ``segment_slide`` calls them (softmax of the positive class at the threshold; one member's own map); for a
    nuclei member (N, C, H, W), each class's heatmap (sigmoid) at or above the peak threshold ``min_score``, where
    ``detect_nuclei`` may find a nucleus of that class."""
    if manifest.task != "segmentation":
        return 1 / (1 + np.exp(-logits)) >= float(manifest.thresholds.get("min_score", 0.3))
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, manifest.positive_class] / e.sum(axis=1) >= manifest.thresholds.get("segmentation", 0.5)


def quantised_ops(model) -> tuple[list[str], list[str]]:
    """(quantised, float): the names of the model's convolutions and matrix products whose weights are int8 (or go
    through a FakeQuantize) and of those left in float."""
    kinds = ("Convolution", "ConvolutionBackpropData", "GroupConvolution", "MatMul")
    quantised, floating = [], []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in kinds:
            continue
        todo, int8 = [op.input_value(1).get_node()], False
        while todo and not int8:
            node = todo.pop()
            if node.get_type_name() == "FakeQuantize":
                int8 = True
            elif node.get_type_name() == "Constant":
                int8 = node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")
            else:
                todo.extend(v.get_node() for v in node.input_values())
        (quantised if int8 else floating).append(op.get_friendly_name())
    return quantised, floating


def ac_variant(recipe: str, max_drop: float) -> str:
    """The IR folder's recipe name: the recipe, with the drop when it is not :data:`AC_MAX_DROP`.

    >>> ac_variant("ac-performance", 0.005), ac_variant("ac-performance", 0.002)
    ('ac-performance', 'ac-performance-0.002')
    """
    return recipe if max_drop == AC_MAX_DROP else f"{recipe}-{max_drop:g}"


def quantise_ac(work: Path, kinds: list[str], *, recipes: list[str], max_drop: float = AC_MAX_DROP) -> dict:
    """``nncf.quantize_with_accuracy_control`` of each member (its f32 IR from ``quantise``): calibrated on up to
    :data:`CALIBRATION_TILES` tissue tiles of :data:`AC_CALIBRATION`, validated by :func:`positive_agreement`
    against the float IR's own positive pixels (:func:`member_positive`) on up to as many of :data:`AC_VALIDATION`
    (the segmentation's: all of them)."""
    import nncf
    import openvino as ov
    import torch
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    path = work / "quantise_ac.json"
    record: dict = json.loads(path.read_text()) if path.is_file() else {}
    for kind, i in [(k, i) for k in kinds for i in range(len(load(k).members))]:
        if i == 0:
            ens = load(kind)
            m = ens.manifest
            calib = calibration_tiles(work, ens, slides=AC_CALIBRATION)
            valid = calibration_tiles(work, ens, slides=AC_VALIDATION)
        variant = {recipe: ac_variant(recipe, max_drop) for recipe in recipes}
        f32 = ir_folder(work, kind, i, "f32")
        model = ov.Core().read_model(f32 / "model.xml")
        ref_model = compile_ir(f32, bf16=False)
        logits = [ref_model(torch.from_numpy(valid[j : j + 8])).numpy() for j in range(0, len(valid), 8)]
        reference = member_positive(np.concatenate(logits), m)

        def validate(compiled, items, reference=reference, valid=valid, m=m) -> tuple[float, list[float]]:
            idx = list(items)
            out = np.concatenate([compiled(valid[j : j + 1])[0] for j in idx])
            return positive_agreement(reference[idx], member_positive(out, m))

        low = int((reference.reshape(len(reference), -1).mean(axis=1) < AC_LOW_POSITIVE).sum())
        for recipe in recipes:
            out = ir_folder(work, kind, i, f"int8-{variant[recipe]}")
            if (out / "model.xml").is_file():
                continue
            nncf_preset, keep_ends = RECIPES[AC_RECIPES[recipe]]
            t0 = time.perf_counter()
            q = nncf.quantize_with_accuracy_control(
                model,
                nncf.Dataset([calib[j : j + 1] for j in range(len(calib))]),
                nncf.Dataset(list(range(len(valid)))),
                validate,
                max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                preset=getattr(nncf.QuantizationPreset, nncf_preset.upper()),
                ignored_scope=nncf.IgnoredScope(names=end_convolutions(model)) if keep_ends else None,
                subset_size=len(calib),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(num_ranking_workers=1),
            )
            seconds = time.perf_counter() - t0
            out.mkdir(parents=True, exist_ok=True)
            ov.save_model(q, out / "model.xml", compress_to_fp16=False)
            hint = {"INFERENCE_PRECISION_HINT": "f32"}  # as NNCF validates
            quantised, floating = quantised_ops(q)
            plain = ir_folder(work, kind, i, f"int8-{AC_RECIPES[recipe]}")
            plain_metric = None
            if (plain / "model.xml").is_file():
                plain_metric = validate(ov.Core().compile_model(plain / "model.xml", "CPU", hint), range(len(valid)))
                plain_metric = plain_metric[0]
            row = {
                "seconds": seconds,
                "max_drop": max_drop,
                "calibration_tiles": len(calib),
                "validation_tiles": len(valid),
                "low_positive_tiles": low,
                "metric": validate(ov.Core().compile_model(q, "CPU", hint), range(len(valid)))[0],
                "metric_plain_int8": plain_metric,
                "quantised": len(quantised),
                "float": floating,
            }
            record[f"{kind}/{i}/{variant[recipe]}"] = row
            path.write_text(json.dumps(record, indent=1))
            print(f"  {kind} member {i} int8 {variant[recipe]}: {seconds:.1f} s, metric {row['metric']:.5f} (plain "
                  f"int8 {plain_metric}), {len(quantised)} operations quantised, {len(floating)} in float: {floating}",
                  file=sys.stderr)  # fmt: skip
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


def _child(slide: Path, out: Path, *, seg: str, nuclei: str, ir_root: Path) -> None:
    """One ``pdl1 run`` analysis (benchmarks.runtimes' recorded one), each model's members on torch (``torch``),
    OpenVINO bf16 (``bf16``) or an int8 IR (its variant folder, ``int8-<recipe>``)."""
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

        def to_int8(*, bf16: bool, keep_on_torch: tuple[int, ...] = (), ens=ens, kind=kind, how=how):
            members = [
                m if i in keep_on_torch else compile_ir(ir_root / kind / f"member_{i:02d}" / how, bf16=bf16)
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


def e2e_cases(presets: list[str], *, nuclei_preset: str | None = None) -> dict[str, tuple[str, str]]:
    """label -> (how the segmentation members run, how the nuclei members run): the baseline, OpenVINO bf16, and per
    int8 recipe the segmentation on it with torch nuclei and with int8 nuclei (``nuclei_preset``, else the same
    recipe: the accuracy-controlled recipes are made for the segmentation only).

    >>> e2e_cases(["ac-performance"], nuclei_preset="performance")["int8 ac-performance segmentation and nuclei"]
    ('int8-ac-performance', 'int8-performance')
    """
    cases = {"torch bf16 autocast": ("torch", "torch"), "openvino bf16 (--runtime openvino)": ("bf16", "bf16")}
    for preset in presets:
        nuclei = nuclei_preset or preset
        cases[f"int8 {preset} segmentation, torch nuclei"] = (f"int8-{preset}", "torch")
        cases[f"int8 {preset} segmentation and nuclei"] = (f"int8-{preset}", f"int8-{nuclei}")
    return cases


def measure_e2e(work: Path, *, presets: list[str], rounds: int, nuclei_preset: str | None = None) -> dict:
    e2e = e2e_cases(presets, nuclei_preset=nuclei_preset)
    runs: dict[str, list[dict]] = {c: [] for c in e2e}
    files: dict[str, list[Path]] = {c: [] for c in e2e}
    for r in range(rounds):
        for label, (seg, nuclei) in e2e.items():
            out = work / "e2e" / f"{seg}_{nuclei}_{r}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.int8", "--work", str(work), "--child", str(out), "--seg", seg,
                   "--nuclei", nuclei]  # fmt: skip
            load = os.getloadavg()[0]
            subprocess.run(cmd, check=True)
            fig = {**json.loads(out.read_text()), "load1_before": load}
            print(f"  round {r + 1} {label} (load {load:.2f}): analysis {fig['analysis_s']:.1f} s, segmentation "
                  f"{fig['segmentation_s']:.1f} s (forward {fig['seg_forward_s']:.1f}), nuclei {fig['nuclei_s']:.1f} s "
                  f"(forward {fig['nuclei_forward_s']:.1f})", file=sys.stderr)  # fmt: skip
            runs[label].append(fig)
            files[label].append(out)
    base = files["torch bf16 autocast"]
    preset = "_".join(presets)
    result = {"preset": preset, "nuclei_preset": nuclei_preset, "rounds": rounds, "cases": {}}
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
    parser.add_argument("--stage", default="all", choices=(*STAGES, "all"))
    parser.add_argument("--quick", action="store_true", help="fewer rounds and held-out slides, a 4096² e2e slide")
    parser.add_argument("--kinds", default="seg", help="seg,nuclei: which demo models the speed stage times")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--preset", default="performance", help="recipes for agreement and e2e (one or more, a,b)")
    parser.add_argument("--nuclei-preset", help="e2e: the nuclei members' int8 recipe (default: --preset's)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="recipes the quantise and speed stages make")
    parser.add_argument("--max-drop", type=float, default=AC_MAX_DROP, help="quantise-ac: absolute drop allowed")
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
        _child(slide_path(work, E2E_SLIDE[0]), args.child, seg=args.seg, nuclei=args.nuclei, ir_root=work / "ir")
        return
    kinds = args.kinds.split(",")
    stages = tuple(s for s in STAGES if s != "quantise-ac") if args.stage == "all" else (args.stage,)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}", file=sys.stderr)  # fmt: skip
    for stage in stages:
        if stage == "phantoms":
            write_phantoms(work, quick=args.quick)
        elif stage == "quantise":
            quantise(work, kinds, presets=args.presets.split(","))
        elif stage == "quantise-ac":
            quantise_ac(work, kinds, recipes=args.presets.split(","), max_drop=args.max_drop)
        elif stage == "speed":
            rounds = args.rounds or (3 if args.quick else 7)
            print(speed_table(measure_speed(work, kinds, rounds=rounds, presets=args.presets.split(","))))
        elif stage == "agreement":
            presets = args.preset.split(",")
            print(agreement_table(measure_agreement(work, presets=presets, quick=args.quick)))
        elif stage == "e2e":
            rounds = args.rounds or (1 if args.quick else 3)
            e2e = measure_e2e(work, presets=args.preset.split(","), rounds=rounds, nuclei_preset=args.nuclei_preset)
            print(e2e_table(e2e))


if __name__ == "__main__":
    main()
