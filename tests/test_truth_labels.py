"""Labels the training benchmarks draw from a phantom's truth (benchmarks/truth_labels.py), read as QuPath exports."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from benchmarks.truth_labels import full_truth_labels, truth_point_labels
from inference.phantom.truth import load_truth
from inference.phantom.truth_tissue import truth_tissue_mask
from inference.training.labels import IGNORE_LABEL, region_target


def test_full_truth_labels_label_every_tissue_pixel_with_its_truth(phantom_svs):
    truth = load_truth(phantom_svs)
    labels = full_truth_labels(phantom_svs)
    target = region_target(labels, shape_hw=truth.positive_mask.shape, downsample=truth.mask_downsample)
    positive = truth.positive_mask.astype(bool)
    np.testing.assert_array_equal(target == 1, positive)
    np.testing.assert_array_equal(target != IGNORE_LABEL, truth_tissue_mask(truth) | positive)
    assert not labels.has_points


@pytest.mark.parametrize("regions, scattered", [(2, 10), (3, 0), (0, 25)])
def test_sparse_point_labels_mark_every_nucleus_in_their_regions_and_scatter_the_rest(phantom_svs, regions, scattered):
    truth = load_truth(phantom_svs)
    labels = truth_point_labels(phantom_svs, regions=regions, region_um=60.0, scattered=scattered, seed=3)
    assert len(labels.training_regions) == regions and all(labels.exhaustive)
    assert labels.class_names == tuple(truth.class_names)
    # every labelled point is a true nucleus of the same class
    dist = np.linalg.norm(labels.points_xy[:, None] - truth.nuclei_xy[None], axis=2)
    nearest = dist.argmin(axis=1)
    assert dist.min(axis=1).max() < 1e-6
    np.testing.assert_array_equal(labels.points_class, truth.nuclei_class[nearest])
    # inside the regions: all true nuclei; outside: exactly `scattered`
    in_region = np.zeros(len(truth.nuclei_xy), bool)
    for box in labels.training_regions:
        assert box.bounds[2] - box.bounds[0] == pytest.approx(120.0)  # 60 µm at 0.5 µm/px
        in_region |= shapely.contains_xy(box, truth.nuclei_xy[:, 0], truth.nuclei_xy[:, 1])
    marked = np.zeros(len(truth.nuclei_xy), bool)
    marked[nearest] = True
    assert marked[in_region].all()
    assert (marked & ~in_region).sum() == scattered
    assert labels.counts.get("training regions (all nuclei marked)", 0) == regions


def test_full_point_labels_are_every_nucleus_under_one_exhaustive_region(phantom_svs):
    truth = load_truth(phantom_svs)
    labels = truth_point_labels(phantom_svs, regions=0, region_um=0, scattered=-1, seed=0)
    assert len(labels.points_xy) == len(truth.nuclei_xy)
    assert labels.exhaustive == (True,) and labels.training_regions[0].equals(shapely.box(0, 0, 2048, 2048))
    with pytest.raises(ValueError, match=r"scattered=-1 .* takes regions=0"):
        truth_point_labels(phantom_svs, regions=2, region_um=60, scattered=-1, seed=0)
