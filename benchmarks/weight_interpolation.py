"""Weight-space interpolation of a fine-tuned ensemble toward the model it started from (WiSE-FT: Wortsman et al.
2022, "Robust fine-tuning of zero-shot models").

Fine-tuning on a few labels of a new domain moves the weights away from the initial model's and forgets what the
labels do not show (issue #33, the README's "Fine-tuning against forgetting"). WiSE-FT keeps each fine-tuned
weight only part of the way: ``w = w_init + alpha * (w_tuned - w_init)`` (``alpha`` 1: the fine-tuned model, 0: the
initial one), after training, with no retraining. Every floating-point entry of the state dict moves so,
BatchNorm's running mean and variance included (they carry part of the forgetting, :mod:`benchmarks.batchnorm_stats`);
the counters (``num_batches_tracked``) stay the fine-tuned model's. The initial weights are those fine-tuning started
from: the ``--init`` model's last member for every member (``pdl1 train seg``).

Benchmark code (``python -m benchmarks.shift_finetune --interpolate 1,0.5,0.3,...``), not a product option: measured
on the README's weak-expression phantoms it did not keep a held-out gain in the new domain at the weights that held
the unshifted slides within 0.01 (README, "Weight interpolation (WiSE-FT), measured").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from benchmarks.batchnorm_stats import member_copies, wrap_members
from inference.models.ensemble import Ensemble


def interpolated_state(
    init: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``init + alpha * (tuned - init)`` for every floating-point entry, the tuned one's for the rest (counters).

    >>> a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    >>> b = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(9)}
    >>> out = interpolated_state(a, b, 0.25)
    >>> out["w"].tolist(), int(out["n"])
    ([0.25, 2.5], 9)
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (1: the fine-tuned weights, 0: the initial ones), got {alpha!r}")
    differing = sorted(set(init) ^ set(tuned))
    if differing:
        raise ValueError(f"the two models' state dicts differ (entries {differing[:5]}): not the same architecture")
    out = {}
    for key, value in tuned.items():
        if value.is_floating_point():
            start = init[key].to(value)
            out[key] = start + alpha * (value - start)
        else:
            out[key] = value.clone()
    return out


def interpolated_ensemble(ensemble: Ensemble, init: Mapping[str, torch.Tensor], alpha: float) -> Ensemble:
    """A copy of ``ensemble`` (loaded unfolded: ``Ensemble.load(..., fold_bn=False)``) whose every member's weights
    lie ``alpha`` of the way from ``init`` (the state dict fine-tuning started from) to its own."""
    members = member_copies(ensemble)
    for member in members:
        member.load_state_dict(interpolated_state(init, member.state_dict(), alpha))
    return wrap_members(ensemble, members, fold_bn=True)
