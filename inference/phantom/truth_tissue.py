"""A phantom's true tissue, redrawn from the spec in its truth (the scene is a function of the spec)."""

from __future__ import annotations

import numpy as np

from inference.phantom.ihc import IhcScene, IhcSpec
from inference.phantom.scene import PhantomScene, PhantomSpec
from inference.phantom.truth import PhantomTruthData


def truth_tissue_mask(truth: PhantomTruthData) -> np.ndarray:
    """bool mask of the phantom's true tissue on the grid of ``truth.positive_mask``.

    Not a file of the truth folder: redrawn from ``truth.json``'s spec (the scene is a function of
    it), so the truth of slides written before it existed has it too. An IHC's is in its own frame.
    """
    spec_fields = truth.summary.get("spec")
    if not isinstance(spec_fields, dict):
        raise ValueError("truth.json has no 'spec': rewrite the truth with `pdl1 phantom`")
    spec = PhantomSpec(**spec_fields)
    if truth.summary.get("stain") == "H-DAB":
        scene = IhcScene(spec, IhcSpec(**truth.summary.get("ihc_spec", {})))
    else:
        scene = PhantomScene(spec)
    height, width = truth.positive_mask.shape
    ds = truth.mask_downsample
    xs = (np.arange(width) + 0.5) * ds
    ys = (np.arange(height) + 0.5) * ds
    return scene.zones(xs[None, :], ys[:, None])[0]
