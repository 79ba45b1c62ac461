"""The simulated reviewer of benchmarks/review_loop.py, on hand-made polygons, read back as review labels."""

from __future__ import annotations

import pytest
from shapely.geometry import Point, box

from benchmarks.review_loop import review_candidates
from bridge.labels import LabelRules, labels_from_objects
from bridge.objects import OWN_ANNOTATION_SIGNATURE
from bridge.qupath_geojson import QuPathObject

WRITTEN = {OWN_ANNOTATION_SIGNATURE: 0.3, "SUA score": 0.6}  # measurements of a candidate pdl1 wrote


def _candidate(x0: float) -> QuPathObject:
    return QuPathObject(box(x0, 0, x0 + 10, 10), "annotation", "PD-L1 FN candidate", dict(WRITTEN))


# Truth positive: x 0-6 over the first candidate (60 %), x 20-25 over the second (50 %: not more than half),
# x 40-42 over the third (20 %).
TRUTH = box(0, 0, 6, 10).union(box(20, 0, 25, 10)).union(box(40, 0, 42, 10))


def test_candidates_are_reclassified_by_their_truly_positive_share_and_the_rest_left_alone():
    region = QuPathObject(box(60, 0, 70, 10), "annotation", "PD-L1 positive", {OWN_ANNOTATION_SIGNATURE: 0.8})
    nucleus = QuPathObject(Point(3, 3), "detection", "Tumor: Positive", {"PD-L1 positive probability": 0.9})
    objects = [_candidate(0), region, _candidate(20), nucleus, _candidate(40)]
    review = review_candidates(objects, TRUTH)
    assert [o.classification for o in review.objects] == [
        "PD-L1 positive",
        "PD-L1 positive",
        "PD-L1 negative",
        "Tumor: Positive",
        "PD-L1 negative",
    ]
    assert review.objects[1] is region and review.objects[3] is nucleus
    assert [(c.area_px2, c.positive_share) for c in review.candidates] == [(100.0, 0.6), (100.0, 0.5), (100.0, 0.2)]
    assert review.objects[0].measurements == WRITTEN  # QuPath keeps measurements when a class changes


def test_reviewed_candidates_become_labels_only_with_from_review():
    review = review_candidates([_candidate(0), _candidate(20)], TRUTH)
    reviewed = labels_from_objects(
        review.objects, slide="s.svs", image_size_px=(100, 100), rules=LabelRules(points=False, from_review=True)
    )
    assert reviewed.positive.equals(box(0, 0, 10, 10)) and reviewed.negative.equals(box(20, 0, 30, 10))
    assert reviewed.counts == {"reviewed: PD-L1 negative": 1, "reviewed: PD-L1 positive": 1}
    with pytest.raises(ValueError, match="no labels"):
        labels_from_objects(review.objects, slide="s.svs", image_size_px=(100, 100), rules=LabelRules(points=False))


def test_the_positive_share_must_leave_room_for_a_decision():
    with pytest.raises(ValueError, match=r"positive_share must be in \[0, 1\)"):
        review_candidates([_candidate(0)], TRUTH, positive_share=1.0)
