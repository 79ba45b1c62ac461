"""Scoring models against truth: per-slide evaluation, calibration, and the metrics they use."""
