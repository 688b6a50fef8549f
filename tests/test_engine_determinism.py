"""Outputs that do not depend on timing, and mask tokens that are never a prediction.

The same checkpoint and settings must give the same tokens on any machine and under any load: by
default no width choice reads a clock (``mask_slots="auto"``: all k-1 slots for lossy strategies,
the fixed cost model for ``verify``). Only ``mask_slots="timed"`` does, and there the test shows
that a different cost table does change what ConfAdapt emits (so the default's test has teeth).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from toy import ToyMTP

from mtp_plugins import add_mask_tokens, generate
from mtp_plugins.decoding import width

IDS = torch.tensor([[3, 4, 5, 6], [10, 11, 12, 13], [20, 21, 22, 23]])


class FakeCost:
    """A pass-cost table standing in for the timed one: ``base`` plus ``per_token`` per query token."""

    calls = 0

    def __init__(self, base: float, per_token: float) -> None:
        self.base, self.per_token = base, per_token

    def __call__(self, batch: int, width: int) -> float:
        FakeCost.calls += 1
        return self.base + self.per_token * batch * width


@pytest.fixture
def cost_table(monkeypatch):
    """``set(base, per_token)`` makes every timed cost table that one (a loaded or an idle machine)."""

    def set_table(base: float, per_token: float) -> None:
        table = FakeCost(base, per_token)
        monkeypatch.setattr(width.PassCost, "__call__", lambda self, b, w: table(b, w))

    FakeCost.calls = 0
    return set_table


def _decode(strategy: str, mask_slots: str = "auto", **kwargs):
    model = ToyMTP(wrong_every=3, calibrated=False)  # wrong slots are confident: ConfAdapt emits them
    out = generate(model, IDS, strategy=strategy, k=6, tau=0.6, max_new_tokens=30, eos_token_id=[],
                   mask_slots=mask_slots, **kwargs)
    return out.sequences.tolist(), out.stats.mask_slots_per_call


@pytest.mark.parametrize("strategy", ["confadapt", "static", "verify"])
def test_default_outputs_are_the_same_under_any_cost_table(strategy, cost_table):
    runs = []
    for base, per_token in [(1.0, 1e-4), (0.01, 1.0), (5.0, 0.5)]:  # idle, loaded, skewed
        cost_table(base, per_token)
        runs.append(_decode(strategy))
    assert runs[0] == runs[1] == runs[2]
    assert FakeCost.calls == 0  # no default choice read a timed cost
    if strategy != "verify":  # lossy strategies feed every slot by default: the paper's method
        assert set(runs[0][1]) == {5}


def test_timed_width_is_an_opt_in_that_can_change_confadapt_output(cost_table):
    cost_table(1.0, 1e-4)  # slots nearly free: all fed
    cheap = _decode("confadapt", mask_slots="timed")
    cost_table(0.01, 1.0)  # slots dear: few fed, so fewer (wrong) confident proposals are emitted
    dear = _decode("confadapt", mask_slots="timed")
    assert FakeCost.calls > 0
    assert sum(dear[1]) < sum(cheap[1])
    assert dear[0] != cheap[0]


def test_adaptive_width_reads_no_clock_and_follows_the_batch(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("the adaptive width must not time passes")

    monkeypatch.setattr(width.PassCost, "_measure", no_timing)
    one = _decode("confadapt", mask_slots="adaptive")
    assert one == _decode("confadapt", mask_slots="adaptive")
    cost = width.ModelCost(torch.device("cpu"))
    assert cost(1, 8) < 1.1 < 2.0 < cost(16, 8)  # a single row's extra slots are nearly free; 16 rows' are not


def test_verify_with_the_default_width_is_still_exactly_ar():
    model = ToyMTP(wrong_every=3, calibrated=False)
    ar = generate(model, IDS, strategy="ar", max_new_tokens=30, eos_token_id=[])
    out = generate(model, IDS, strategy="verify", k=6, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(out.sequences, ar.sequences)


# ------------------------------------------------------------------ mask tokens are never emitted


@pytest.fixture
def mask_loving_model(tokenizer):
    """A tiny Llama MTP checkpoint whose output layer favours the mask token everywhere."""
    model = build_model("llama", len(tokenizer), seed=3)
    spec = add_mask_tokens(model, tokenizer)
    mask = spec.mask_token_ids[0]
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([mask]), torch.full((*out.shape[:-1], 1), 50.0)))
    return model, mask


@pytest.mark.parametrize("strategy", ["ar", "static", "confadapt", "verify"])
def test_no_strategy_emits_a_mask_token(strategy, mask_loving_model, tokenizer):
    model, mask = mask_loving_model
    ids, attention = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        assert int(model(ids[:1], attention_mask=attention[:1]).logits[0, -1].argmax()) == mask  # biased indeed
    out = generate(model, ids, attention, strategy=strategy, k=4, tau=0.0, max_new_tokens=12, eos_token_id=[])
    assert mask not in out.sequences[:, ids.shape[1]:].flatten().tolist()
    # Greedy decoding over every token but the mask: what HF generate gives with the mask suppressed.
    if strategy in ("ar", "verify"):
        expected = model.generate(ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
                                  suppress_tokens=[mask], eos_token_id=None, pad_token_id=1)
        assert torch.equal(out.sequences, expected)


def test_sampling_never_draws_a_mask_token(mask_loving_model, tokenizer):
    model, mask = mask_loving_model
    ids, attention = batch(tokenizer, PROMPTS)
    out = generate(model, ids, attention, strategy="confadapt", k=3, max_new_tokens=12, eos_token_id=[],
                   do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert mask not in out.sequences[:, ids.shape[1]:].flatten().tolist()
