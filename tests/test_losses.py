"""Loss strategies: reference formulas, zero at agreement, no NaN when nothing counts, by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtp_plugins.losses import GroundTruth, HardLabel, SoftKL, _ForwardKL
from mtp_plugins.registry import LOSSES, UnknownPluginError, load_loss, plugin_names


def logits(n=6, v=11, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_builtins_by_name():
    assert plugin_names(LOSSES) == ["ground-truth", "hard-label", "soft-kl"]
    assert load_loss("soft-kl") is SoftKL and load_loss("hard-label") is HardLabel
    assert not load_loss("ground-truth").needs_teacher and load_loss("soft-kl").needs_teacher
    with pytest.raises(UnknownPluginError, match="unknown loss 'sof-kl'; did you mean 'soft-kl'"):
        load_loss("sof-kl")


def test_soft_kl_of_a_distribution_with_itself_is_zero():
    p = logits()
    assert SoftKL()(p, p.clone(), torch.zeros(6, dtype=torch.long), torch.ones(6)).item() == pytest.approx(0, abs=1e-6)


def test_each_loss_matches_its_reference_formula():
    s, t = logits(seed=1), logits(seed=2)
    targets = torch.tensor([3, 1, -100, 7, 0, 10])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    ps, pt = s.softmax(-1).tolist(), t.softmax(-1).tolist()

    def mean(values, weights):
        return sum(v * x for v, x in zip(values, weights)) / sum(weights)

    hard = [-math.log(ps[i][int(t[i].argmax())]) for i in range(6)]
    kl = [sum(pt[i][v] * math.log(pt[i][v] / ps[i][v]) for v in range(11)) for i in range(6)]
    gt = [0.0 if targets[i] < 0 else -math.log(ps[i][int(targets[i])]) for i in range(6)]
    assert HardLabel()(s, t, targets, w).item() == pytest.approx(mean(hard, w.tolist()), rel=1e-5)
    assert SoftKL()(s, t, targets, w).item() == pytest.approx(mean(kl, w.tolist()), rel=1e-5)
    assert GroundTruth()(s, None, targets, w).item() == pytest.approx(mean(gt, w.tolist()), rel=1e-5)


def test_soft_kl_value_and_gradient_equal_autograd_of_the_definition():
    """SoftKL computes its gradient itself, a few rows at a time: over several chunks (and a short
    last one) it must equal autograd through the plain formula."""
    generator = torch.Generator().manual_seed(7)
    rows = 2 * _ForwardKL.ROWS + 5
    s = (torch.randn(rows, 301, generator=generator) * 3).requires_grad_()
    t = torch.randn(rows, 301, generator=generator) * 3
    w = torch.rand(rows, generator=generator)
    reference = s.detach().clone().requires_grad_()
    log_p = F.log_softmax(t, dim=-1)
    want = (log_p.exp() * (log_p - F.log_softmax(reference, dim=-1))).sum(dim=-1)
    (want * w).sum().backward()
    got = SoftKL().per_position(s, t, torch.zeros(rows, dtype=torch.long))
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, reference.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the same values
        torch.testing.assert_close(SoftKL().per_position(s, t, None), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", [HardLabel(), SoftKL(), GroundTruth()])
def test_all_positions_ignored_gives_zero_with_a_gradient(loss):
    s = logits().requires_grad_()
    value = loss(s, logits(seed=3), torch.full((6,), -100), torch.zeros(6))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_losses_accept_bf16_logits_and_compute_in_float32():
    s, t = logits(seed=4), logits(seed=5)
    exact = SoftKL()(s, t, torch.zeros(6, dtype=torch.long), torch.ones(6))
    low = SoftKL()(s.bfloat16(), t.bfloat16(), torch.zeros(6, dtype=torch.long), torch.ones(6))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(exact.item(), rel=0.05)
