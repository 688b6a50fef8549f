"""Loss strategies for MTP self-distillation (METHOD.md section 4) and their protocol (API version 1).

A loss is a class registered under the stevedore namespace ``mtp_plugins.losses`` (the built-ins are
entry points of this distribution, like a third party's). The trainer builds it once with no
arguments and calls it on the supervised positions of a step, flattened:

- ``student``: ``[N, V]`` float logits of the student (with grad);
- ``teacher``: ``[N, V]`` float logits of the frozen teacher on the student-forced input, or None
  when the class sets ``needs_teacher = False`` (then no teacher is loaded at all);
- ``targets``: ``[N]`` long, the document's own tokens at those positions (``-100`` where absent);
- ``weights``: ``[N]`` float, 0 for positions that must not count.

It returns a scalar: the weighted mean over the positions. With no weight at all it returns 0 (with
a gradient path), never NaN.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

LOSS_API_VERSION = 1


class Loss:
    """Base class of loss strategies."""

    api_version: ClassVar[int] = LOSS_API_VERSION
    needs_teacher: ClassVar[bool] = True

    def per_position(
        self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """[N] float: the loss at every position (weights are applied by ``__call__``)."""
        raise NotImplementedError

    def __call__(
        self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        values = self.per_position(student.float(), None if teacher is None else teacher.float(), targets)
        weights = weights.to(values.dtype)
        total = weights.sum()
        # Where nothing counts, return a zero that still depends on the student (no NaN, no
        # missing gradient for distributed reductions).
        return (values * weights).sum() / total.clamp(min=1.0)


class HardLabel(Loss):
    """``hard-label``: cross-entropy to the teacher's argmax (the paper's main recipe)."""

    def per_position(self, student, teacher, targets):
        return F.cross_entropy(student, teacher.argmax(dim=-1), reduction="none")


class SoftKL(Loss):
    """``soft-kl``: forward KL(teacher || student) over the full distributions."""

    def per_position(self, student, teacher, targets):
        log_p_teacher = F.log_softmax(teacher, dim=-1)
        log_p_student = F.log_softmax(student, dim=-1)
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)


class GroundTruth(Loss):
    """``ground-truth``: cross-entropy to the document's own next tokens; no teacher (offline MTP)."""

    needs_teacher = False

    def per_position(self, student, teacher, targets):
        return F.cross_entropy(student, targets.clamp(min=0), reduction="none") * (targets >= 0)
