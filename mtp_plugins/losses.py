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
        if teacher.requires_grad:  # not the trainer's frozen teacher: the plain definition
            log_p_teacher = F.log_softmax(teacher, dim=-1)
            return (log_p_teacher.exp() * (log_p_teacher - F.log_softmax(student, dim=-1))).sum(dim=-1)
        return _ForwardKL.apply(student, teacher)


class _ForwardKL(torch.autograd.Function):
    """KL(p || q) per row of ``[N, V]`` logits (p: the teacher's softmax, q: the student's), with its
    gradient ``q - p`` made in the same sweep, a few rows at a time.

    ``KL = sum p (log p - s) + logsumexp(s)``. Autograd's version of the same formula makes and keeps
    several ``[N, V]`` float32 tensors (both log-softmaxes, ``p``, the difference) and walks them
    again backwards; with a 49k vocabulary and ~1000 supervised positions each is ~200 MB. Rows are
    taken ``ROWS`` at a time (a few MB, cache-resident), and only the gradient is kept: on a 2-core
    CPU 768 rows forward and backward took 0.19 s against 0.47 s, a demo training step about 3% less.
    """

    ROWS = 32

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        keep = ctx.needs_input_grad[0]
        kl = student.new_empty(student.shape[0])
        grad = torch.empty_like(student) if keep else None
        for i in range(0, student.shape[0], _ForwardKL.ROWS):
            s, t = student[i : i + _ForwardKL.ROWS], teacher[i : i + _ForwardKL.ROWS]
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            log_p = t - torch.logsumexp(t, dim=-1, keepdim=True)
            p = log_p.exp()
            kl[i : i + _ForwardKL.ROWS] = torch.linalg.vecdot(p, log_p.sub_(s)) + lse.squeeze(-1)
            if keep:
                torch.sub(s, lse, out=grad[i : i + _ForwardKL.ROWS]).exp_().sub_(p)  # q - p
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (grad,) = ctx.saved_tensors
        return grad * upstream[:, None], None


class GroundTruth(Loss):
    """``ground-truth``: cross-entropy to the document's own next tokens; no teacher (offline MTP)."""

    needs_teacher = False

    def per_position(self, student, teacher, targets):
        return F.cross_entropy(student, targets.clamp(min=0), reduction="none") * (targets >= 0)
