"""The PD-L1 IHC nuclei model the service loads on its first H-DAB job: listed before, and named when missing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from inference import ModelFileError, PipelineConfig, demo_model_dir, read_manifest

if TYPE_CHECKING:
    from inference import Manifest  # read_manifest's answer, for annotations only

log = logging.getLogger(__name__)


def ihc_manifest(pipeline: PipelineConfig) -> Manifest | None:
    """The manifest of the PD-L1 IHC nuclei model the service would load, for listing it.

    The model loads on the first H-DAB job (``Models.ihc``); its manifest is read now without hashing the
    weights (the checksum is the manifest's), so listing it costs no start-up time. None, with a warning,
    where it does not read: H&E jobs run as before, and an H-DAB job fails naming the problem.
    """
    folder = pipeline.ihc_model_dir or demo_model_dir("nuclei-ihc")
    try:
        return read_manifest(folder, task="nuclei", verify=False)
    except ModelFileError as err:
        why = ihc_folder_problem(pipeline) or str(err)
        log.warning("the PD-L1 IHC nuclei model is not listed, and H-DAB images will fail: %s", why)
        return None


def ihc_folder_problem(pipeline: PipelineConfig) -> str | None:
    """Why ``pdl1 serve --models DIR`` has no PD-L1 IHC nuclei model in ``DIR/nuclei-ihc``, in the service's words;
    None where that folder holds a manifest (or the shipped demo's is used).

    The model's own error ends "or leave the model option out to use the shipped demo", which is what
    ``pdl1 run`` can do; the service takes its models from ``--models`` alone, so the fix is a folder there.
    """
    if pipeline.ihc_model_dir is None:
        return None
    folder = Path(pipeline.ihc_model_dir)
    if folder.name != "nuclei-ihc" or (folder / "manifest.json").is_file():  # a model: its own errors say more
        return None
    what = "is a file" if folder.is_file() else "holds no model manifest" if folder.is_dir() else "does not exist"
    return (
        f"{folder} {what}, so the service has no PD-L1 IHC nuclei model: add a nuclei-ihc/ model folder to the "
        f"--models folder {folder.parent} (copy the shipped {demo_model_dir('nuclei-ihc')}, or put a model "
        "trained with `pdl1 train nuclei --stain ihc` there); the next H-DAB job loads it, no restart needed"
    )
