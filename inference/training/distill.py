"""Distillation from the initial model while fine-tuning: Learning without Forgetting (Li & Hoiem 2016).

Fine-tuning on a few labels of a new domain moves the network wherever the labels ask and nowhere is
it told to keep what it did elsewhere. LwF runs the model as it was before fine-tuning (the teacher,
frozen) on every training batch and makes the student pay for departing from the teacher's soft
predictions (Hinton et al. 2015): ``weight * T^2 * KL(teacher_T || student_T)`` per pixel, both softmaxes at
temperature ``T`` (``T^2`` keeps the gradient's scale independent of ``T``). Unlike L2-SP
(:mod:`inference.training.anchor`), which holds the weights, this holds the function, and only on the
pixels trained on.

Which pixels: those with no human label (ignored pixels and pseudo-labelled ones), over the whole patch,
glass included. Labels win where they exist: a label is what a person taught, and the teacher is what the
labels came to correct, so asking the student to agree with both there would pay it for keeping the very
error being fixed. Pseudo-labelled pixels are the teacher's own confident calls, so its soft prediction
there agrees with their hard one (and adds how sure it was). Glass is kept: the teacher is surest there and
the student must stay negative there too, and a batch carries no tissue mask (only its targets).

The teacher is the initial model's last member, the one the student starts from (fine-tuning's
``init_model``): LwF's own choice (the network's responses before it learns the new task), one forward pass
per batch instead of one per member of the initial ensemble, and the penalty is 0 where the student has not
moved (its BatchNorm normalising the batch by the batch's statistics, the teacher's by its running ones, is
the only difference at the start).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F  # noqa: N812

#: Li & Hoiem's temperature, the default of ``distill_temperature``.
DEFAULT_TEMPERATURE = 2.0


def check_distillation(weight: float, temperature: float, *, init_model: str | None) -> None:
    """Raise ``ValueError`` for a distillation weight that is not a finite number >= 0, or > 0 without an
    initial model (from scratch there is no teacher), or a temperature that is not a finite number > 0."""
    if not (_number(weight) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"distill_weight must be a finite number >= 0 (0: off), got {weight!r}")
    if not (_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {temperature!r}")
    if weight > 0 and init_model is None:
        raise ValueError(
            f"distill_weight {weight:g} distils the initial model's predictions into the one trained, and this run "
            "starts from scratch: give init_model, or distill_weight 0"
        )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def unlabelled_pixels(target: torch.Tensor) -> torch.Tensor:
    """Bool mask of a target's pixels with no human label: neither 0 nor 1 (ignored or pseudo-labelled)."""
    return (target != 0) & (target != 1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """``T^2 * mean KL(softmax(teacher / T) || softmax(student / T))`` over the pixels of ``target`` (B, H, W)
    that carry no human label (:func:`unlabelled_pixels`); logits are (B, C, H, W). 0 (with a gradient) when
    there are none.

    Examples
    --------
    >>> logits = torch.tensor([[[[2.0]], [[-1.0]]]])  # (1, 2, 1, 1)
    >>> distillation_loss(logits, logits, torch.tensor([[[255]]]), temperature=2.0).item()
    0.0
    >>> distillation_loss(logits, -logits, torch.tensor([[[1]]]), temperature=2.0).item()  # a label: not distilled
    0.0
    """
    mask = unlabelled_pixels(target)
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return temperature**2 * kl[mask].mean()


class Distiller:
    """The frozen teacher (a copy of ``model`` as it is when this is made) and the penalty it sets.

    Parameters
    ----------
    model : torch.nn.Module
        The model as it starts fine-tuning; a copy, in eval mode with no gradients, is the teacher.
    weight : float
        The penalty's factor (> 0).
    temperature : float
        The softmaxes' temperature (> 0).
    """

    def __init__(self, model: torch.nn.Module, *, weight: float, temperature: float = DEFAULT_TEMPERATURE) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a distillation weight must be a finite number > 0, got {weight!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"a distillation temperature must be a finite number > 0, got {temperature!r}")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def penalty(self, x: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``weight *`` :func:`distillation_loss` of the student's logits on ``x`` against the teacher's."""
        self.teacher.eval()  # stays so, whatever mode the student is put in
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.weight * distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature)
