"""Scoring models against truth: per-slide evaluation, calibration, and the metrics they use; the LoG baseline
detector, scores on a lab's own labels, and the review rule's fit."""
