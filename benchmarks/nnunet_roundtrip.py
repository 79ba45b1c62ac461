"""nnU-Net v2 round trip on the CPU: export phantom labels, train, import, compare with nnUNetPredictor.

``python -m benchmarks.nnunet_roundtrip [--out DIR] [--epochs 3]`` (needs nnU-Net v2, installed as
``benchmarks/README.md`` says). Steps, all in ``DIR`` (a temporary folder by default):

1. two phantom slides for training and one held out (``pdl1 phantom``'s writer, with truth);
2. ``pdl1 export nnunet``'s writer: an nnU-Net raw dataset from the phantom truth, checked with
   nnU-Net's own ``verify_dataset_integrity``;
3. nnU-Net's fingerprint, plans and preprocessing; the ``2d`` plans are shrunk (4 stages of 8-64
   features, 128 px patches, batch 2) so that training takes a minute on two cores;
4. training with a subclass of ``nnUNetTrainer`` that runs few short epochs and keeps a checkpoint
   after each of the last two (as nnUNet-B keeps them at the low-learning-rate ends of cycles);
5. ``pdl1 import nnunet``'s importer takes both checkpoints;
6. on a held-out region, the product's mean softmax (``segment_slide``, overlap 0.5 as nnU-Net's
   step 0.5, fp32) against the mean over members of ``nnUNetPredictor``'s softmax (each member
   run alone, no mirroring, step 0.5, nnU-Net's own preprocessing of the raw RGB array);
7. the same members through ``analyse_slide`` on the held-out slide: uncertainty maps, SUA
   candidates, and the result written as QuPath GeoJSON.

Prints what it measured; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 501
MPP = 2.0
TILE_PX = 128


def _shrink_plans(plans_path: Path) -> None:
    """A tiny 2D U-Net in the plans nnU-Net wrote, so that CPU training is quick."""
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["2d"]
    arch = config["architecture"]["arch_kwargs"]
    stages = 4
    arch.update(
        n_stages=stages,
        features_per_stage=[8, 16, 32, 64],
        kernel_sizes=[[3, 3]] * stages,
        strides=[[1, 1]] + [[2, 2]] * (stages - 1),
        n_conv_per_stage=[2] * stages,
        n_conv_per_stage_decoder=[2] * (stages - 1),
    )
    config["patch_size"] = [TILE_PX, TILE_PX]
    config["batch_size"] = 2
    plans_path.write_text(json.dumps(plans, indent=2))


def _trainer_class(epochs: int, iterations: int):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerPdl1Tiny(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
        """Few short epochs; a checkpoint kept after each of the last two."""

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 2

        def on_epoch_end(self):
            # Before nnU-Net's own on_epoch_end advances current_epoch, as its checkpoint_latest is saved.
            finished = self.current_epoch + 1
            if finished >= self.num_epochs - 1:
                self.save_checkpoint(os.path.join(self.output_folder, f"checkpoint_epoch_{finished}.pth"))
            super().on_epoch_end()

    return nnUNetTrainerPdl1Tiny


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nnunet_roundtrip", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--size", type=int, default=2048, help="phantom edge, level-0 px at 0.5 µm/px")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="pdl1-nnunet-"))
    work.mkdir(parents=True, exist_ok=True)
    # nnU-Net reads its folders from the environment when imported; this script is an edge.
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(work / key)
    os.environ.setdefault("nnUNet_compile", "f")
    try:
        run(work, epochs=args.epochs, iterations=args.iterations, size_px=args.size)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, *, epochs: int, iterations: int, size_px: int) -> dict:
    import torch

    from bridge.nnunet_export import PhantomTruthLabels, export_nnunet_dataset
    from inference.models.nnunet_import import import_nnunet
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    torch.manual_seed(0)
    figures: dict = {"torch threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    slides = work / "slides"
    slides.mkdir(exist_ok=True)
    paths = {}
    for name, seed, tps in (("train_a", 601, 40.0), ("train_b", 602, 60.0), ("held", 603, 50.0)):
        paths[name] = slides / f"{name}.svs"
        if not paths[name].exists():
            write_phantom(paths[name], PhantomSpec(size_px, size_px, seed=seed, tps_percent=tps))
    figures["phantoms s"] = round(time.perf_counter() - t0, 1)

    raw = work / "nnUNet_raw" / f"Dataset{DATASET_ID}_PDL1"
    t0 = time.perf_counter()
    if not (raw / "dataset.json").exists():
        summary = export_nnunet_dataset(
            [paths["train_a"], paths["train_b"]],
            raw,
            source=PhantomTruthLabels(margin_px=2),
            mpp=MPP,
            case_size_px=256,
            test_slides=[paths["held"]],
        )
        figures["export"] = {
            "training cases": summary.training_cases,
            "test cases": summary.test_cases,
            "labelled fraction": round(summary.labelled_fraction, 4),
            "positive fraction of labelled": round(summary.positive_fraction, 4),
        }
    figures["export s"] = round(time.perf_counter() - t0, 1)

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112 - nnU-Net's name; the planner sets torch's threads to it (0 is refused)
    with contextlib.redirect_stdout(io.StringIO()):
        verify_dataset_integrity(str(raw), num_processes=1)  # raises on a dataset nnU-Net would reject
    figures["verify_dataset_integrity"] = "passed"
    plans_path = work / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json"
    if not plans_path.exists():  # a rerun in the same --out folder keeps what it has
        with contextlib.redirect_stdout(io.StringIO()):
            extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False)
            plan_experiments([DATASET_ID])
            _shrink_plans(plans_path)
            preprocess([DATASET_ID], configurations=("2d",), num_processes=(1,))
    figures["plan + preprocess s"] = round(time.perf_counter() - t0, 1)
    torch.set_num_threads(threads)
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 - augmentation in this process, no workers
    plans = json.loads(plans_path.read_text())
    figures["normalization_schemes"] = plans["configurations"]["2d"]["normalization_schemes"]

    from batchgenerators.utilities.file_and_folder_operations import load_json

    trainer_cls = _trainer_class(epochs, iterations)
    plans["continue_training"] = False  # what nnUNetv2_train puts in (the trainer pops it)
    trainer = trainer_cls(plans, "2d", 0, load_json(str(raw / "dataset.json")), torch.device("cpu"))
    results = Path(trainer.output_folder_base)
    ckpts = [f"checkpoint_epoch_{e}.pth" for e in (epochs - 1, epochs)]
    if not all((results / "fold_0" / c).exists() for c in ckpts):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.run_training()
        figures["training s"] = round(time.perf_counter() - t0, 1)

    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # a rerun imports again (the importer keeps an existing model)
    shutil.rmtree(work / "run", ignore_errors=True)
    manifest = import_nnunet(results, model_dir, mpp=MPP, checkpoints=ckpts, folds=["0"])
    figures["imported"] = {
        "members": [(m.file, m.epoch) for m in manifest.members],
        "architecture": manifest.architecture.rsplit(".", 1)[-1],
        "tile px": manifest.tile_size_px,
        "normalization": manifest.normalization,
    }

    figures["equality"] = compare_with_predictor(results, model_dir, ckpts, paths["held"])
    figures["pipeline"] = run_pipeline(model_dir, paths["held"], work / "run")
    print(json.dumps(figures, indent=2))
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    return figures


def _initialize(predictor, results: Path, ckpt: str) -> None:
    """What ``initialize_from_trained_model_folder`` does, for a trainer class nnU-Net cannot find by name.

    The network comes from nnU-Net's own ``get_network_from_plans``; the checkpoint is the one this
    script just trained, so nnU-Net's full unpickler is used here as nnU-Net uses it.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = load_json(str(results / "dataset.json"))
    plans_manager = PlansManager(load_json(str(results / "plans.json")))
    checkpoint = torch.load(results / "fold_0" / ckpt, map_location="cpu", weights_only=False)
    configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        deep_supervision=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        [checkpoint["network_weights"]],
        dataset_json,
        checkpoint["trainer_name"],
        checkpoint["inference_allowed_mirroring_axes"],
    )


def compare_with_predictor(results: Path, model_dir: Path, ckpts: list[str], held: Path) -> dict:
    """Our mean softmax against the mean of nnUNetPredictor's per-member softmax on one held-out region."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from inference.analysis.segment import SegmentConfig, segment_slide
    from inference.models.ensemble import Ensemble
    from inference.slides.reader import ArrayReader
    from inference.slides.slide import Mpp, Slide, open_slide

    with open_slide(held) as slide:
        rgb = np.ascontiguousarray(slide.thumbnail(mpp=MPP))
    height, width = rgb.shape[:2]
    region = rgb[: min(height, 448), : min(width, 448)].copy()  # not a multiple of the tile: steps overlap unevenly
    h, w = region.shape[:2]

    probs = []
    t0 = time.perf_counter()
    for ckpt in ckpts:
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=False,
                perform_everything_on_device=False,
                device=torch.device("cpu"),
                allow_tqdm=False,
            )
            _initialize(predictor, results, ckpt)
            # As nnU-Net's NaturalImage2DIO reads a PNG: (c, 1, y, x) float32, spacing (999, 1, 1).
            raw = region.transpose(2, 0, 1)[:, None].astype(np.float32)
            _, prob = predictor.predict_single_npy_array(raw, {"spacing": [999, 1, 1]}, None, None, True)
        probs.append(prob[:, 0])
    reference = np.mean(probs, axis=0)
    nnunet_s = time.perf_counter() - t0

    ensemble = Ensemble.load(model_dir, task="segmentation", device="cpu")
    positive = ensemble.manifest.positive_class
    config = SegmentConfig(overlap_fraction=0.5, map_downsample=1, precision="fp32", read_workers=0, batch_size=4)
    t0 = time.perf_counter()
    maps = segment_slide(Slide(ArrayReader(region), mpp=Mpp(MPP, MPP, "roundtrip")), ensemble, config=config)
    ours_s = time.perf_counter() - t0
    ours = np.asarray(maps.prob)[:h, :w]
    diff = np.abs(ours - reference[positive])
    # Saturated probabilities agree trivially; the pixels in between show whether the blending is nnU-Net's.
    undecided = (reference[positive] >= 0.01) & (reference[positive] <= 0.99)
    return {
        "region px": [w, h],
        "fraction within 1e-3": float((diff <= 1e-3).mean()),
        "fraction within 1e-4": float((diff <= 1e-4).mean()),
        "max abs difference": float(diff.max()),
        "mean abs difference": float(diff.mean()),
        "same class": float(((ours >= 0.5) == (reference[positive] >= 0.5)).mean()),
        "pixels with 0.01 <= p <= 0.99 (nnU-Net)": float(undecided.mean()),
        "of those, within 1e-3": float((diff[undecided] <= 1e-3).mean()) if undecided.any() else None,
        "positive fraction (ours)": float((ours >= 0.5).mean()),
        "nnU-Net s (2 members)": round(nnunet_s, 2),
        "ours s": round(ours_s, 2),
    }


def run_pipeline(model_dir: Path, held: Path, out: Path) -> dict:
    """The imported members through ``pdl1 run`` on the held-out slide (GeoJSON sidecars)."""
    from typer.testing import CliRunner

    from bridge.cli.app import app

    args = ["run", str(held), "--out", str(out), "--seg-model", str(model_dir)]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args)
    figures: dict = {"command": "pdl1 " + " ".join(args), "exit code": result.exit_code, "s": 0.0}
    figures["s"] = round(time.perf_counter() - t0, 1)
    if result.exit_code != 0:
        figures["output"] = result.output[-2000:]
        return figures
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    figures["files"] = written
    for path in out.rglob("*.geojson"):
        data = json.loads(path.read_text())
        features = data.get("features", data if isinstance(data, list) else [])
        kinds: dict[str, int] = {}
        for f in features:
            cls = (f.get("properties", {}).get("classification") or {}).get("name", "(none)")
            kinds[cls] = kinds.get(cls, 0) + 1
        figures[path.name] = kinds
    return figures


if __name__ == "__main__":
    sys.exit(main())
