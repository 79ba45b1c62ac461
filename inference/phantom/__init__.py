"""Phantom H&E slides with known PD-L1 truth: the data every test, demo and benchmark uses.

A phantom is procedural: every pixel is a function of its level-0 position, the seed and
the shift, so it is rendered tile by tile (any size up to 100k x 100k px without holding
the image) and is seamless across tiles and consistent across pyramid levels.

The scene, coarsest first:

* tissue pieces on glass, split into stroma and tumour nests;
* tumour nests are PD-L1 positive or negative by zone. The two differ by morphology
  visible in H&E, as nnUNet-B learns PD-L1 from H&E: positive nests have larger, oval,
  vesicular nuclei (pale chromatin, dark rim, nucleolus) in granular cytoplasm; negative
  nests have small, round, dense hyperchromatic nuclei. There is no colour code. As in real
  tissue, expression shows only partly in morphology: a smooth "morphology strength" field
  makes about a third of the positive area subtle (intermediate morphology), which is where
  a model misses positives and where its uncertainty should rise. ``weak_fraction`` adds
  weakly expressing patches (faint positive morphology, strength 0.15-0.45): whole positive
  areas that a model trained on clear cases tends to miss, the false negatives SUA is for;
* nuclei on jittered lattices: tumour nuclei (class from their zone) and sparse stromal
  spindle cells and lymphocytes (``Other``).

The positive zone threshold is set on the tumour nuclei themselves, so the truth TPS is
the requested one up to rounding. Truth lies beside the slide in ``<stem>.truth/``:
``truth.json`` (summary), ``positive_mask.tif`` (uint8 0/1 at ``truth_downsample``) and
``nuclei.csv`` (``x_px,y_px,class``, level-0 pixel centres).

The PD-L1 IHC (haematoxylin-DAB) of the same tissue is a consecutive section of it
(:mod:`~inference.phantom.ihc`: the section transform, the IHC cells and their staining),
written by :func:`~inference.phantom.pyramid.write_ihc_phantom` with its own truth (TPS, CPS,
intensities, patterns and the transform to the H&E).

Modules: :mod:`~inference.phantom.scene` (the spec and the procedural scene: zones, nuclei),
:mod:`~inference.phantom.stain` (stain vectors and how the scene's dyes become RGB),
:mod:`~inference.phantom.render` (drawing a region), :mod:`~inference.phantom.pyramid`
(writing the pyramidal slide), :mod:`~inference.phantom.ihc` (the IHC section), :mod:`~inference.phantom.truth`
(the truth files) and :mod:`~inference.phantom.truth_tissue` (a phantom's true tissue, redrawn from its truth).
"""
