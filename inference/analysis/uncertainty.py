"""Ensemble uncertainty from member probabilities (nnUNet-B, DESIGN.md §6).

Members are combined as probabilities, never as logits. For member probabilities
``p_m`` (M members, C classes):

* mean probability ``p̄ = mean_m p_m``
* predictive entropy ``H(p̄)`` (total uncertainty)
* expected entropy ``mean_m H(p_m)`` (aleatoric)
* mutual information ``H(p̄) - mean_m H(p_m)`` (epistemic; >= 0 by concavity of H)
* std over members of the positive-class probability

Entropies are in nats. The torch functions run per tile on the device; the sliding window
blends their outputs with Gaussian weights (see :mod:`inference.analysis.segment`).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12


def entropy_np(p: np.ndarray, *, axis: int) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0).

    >>> float(entropy_np(np.array([0.5, 0.5]), axis=0).round(4))
    0.6931
    """
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.clip(p, EPS, 1.0))).sum(axis=axis)


def ensemble_stats_np(member_probs: np.ndarray, *, positive_class: int = 1) -> dict[str, np.ndarray]:
    """Reference implementation on numpy: ``member_probs`` is (M, C, ...) summing to 1 over C."""
    mean = member_probs.mean(axis=0)
    pe = entropy_np(mean, axis=0)
    ee = entropy_np(member_probs, axis=1).mean(axis=0)
    return {
        "prob": mean[positive_class],
        "predictive_entropy": pe,
        "expected_entropy": ee,
        "mutual_information": np.maximum(pe - ee, 0.0),
        "prob_std": member_probs[:, positive_class].std(axis=0),
    }


def ensemble_stats(member_probs: torch.Tensor, *, positive_class: int = 1) -> torch.Tensor:
    """Per-pixel ensemble statistics of a batch: (M, B, C, H, W) probabilities -> (B, 5, H, W) fp32.

    Channels follow :data:`inference.results.MAP_NAMES`. Computed in fp32 whatever the input dtype.
    """
    p = member_probs.float()
    mean = p.mean(dim=0)
    pe = -(mean * torch.log(mean.clamp_min(EPS))).sum(dim=1)
    ee = -(p * torch.log(p.clamp_min(EPS))).sum(dim=2).mean(dim=0)
    # The population std written out: torch's std reduction over the member axis of these strided
    # (channels-last) slices took 50 ms per batch of four 256² tiles, half of an M=1 run's time; this 1 ms.
    positive = p[:, :, positive_class]
    std = (positive - positive.mean(dim=0)).square_().mean(dim=0).sqrt_()
    return torch.stack([mean[:, positive_class], pe, ee, (pe - ee).clamp_min(0.0), std], dim=1)
