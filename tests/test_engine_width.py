"""Adaptive width (``mask_slots``), drafts from the row's own text (``draft_lookup``) and cache
compaction: what they choose, and that ``verify`` stays exactly ``ar`` with all of them on."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from toy import ToyMTP

from mtp_plugins import add_mask_tokens, generate
from mtp_plugins.decoding import engine, kvcache
from mtp_plugins.decoding.lookup import NgramIndex
from mtp_plugins.decoding.width import WidthPolicy


class Cost:
    """A pass-cost table: ``base`` seconds plus ``per_token`` for each query token of every row."""

    def __init__(self, base: float, per_token: float) -> None:
        self.base, self.per_token = base, per_token

    def __call__(self, batch: int, width: int) -> float:
        return self.base + self.per_token * batch * width


def test_ngram_index_continues_the_latest_occurrence():
    index = NgramIndex([5, 6, 7, 8, 5, 6, 9], max_n=3)
    assert index.continuation([], 4) == []  # the text ends in "5 6 9": "9" never continued before
    index.extend([1, 5, 6])
    assert index.continuation([], 4) == [9, 1, 5, 6]  # latest "5 6" was followed by 9
    assert index.continuation([7], 2) == [8, 5]  # tail "6 7" -> "8 5"
    assert index.continuation([], 0) == []
    assert NgramIndex([1, 2, 3], max_n=2).continuation([4], 3) == []


def test_policy_feeds_slots_when_they_are_cheap_and_taken():
    policy = WidthPolicy(7, feeds_drafts=False, cost=Cost(base=1.0, per_token=0.001))
    policy.observe([(7, 7)] * 8)
    assert policy.choose(1) == 7


def test_policy_drops_slots_that_cost_more_than_they_return():
    policy = WidthPolicy(7, feeds_drafts=False, cost=Cost(base=0.1, per_token=0.1))  # compute-bound
    for _ in range(5):
        policy.observe([(policy.choose(16), 0)] * 16)
    assert policy.choose(16) == 0
    # The same rejections at batch 1 on overhead-bound hardware: a slot still may pay off later.
    cheap = WidthPolicy(7, feeds_drafts=False, cost=Cost(base=1.0, per_token=0.001))
    for _ in range(5):
        cheap.observe([(cheap.choose(1), 0)])
    assert cheap.choose(1) >= 1


def test_policy_retries_switched_off_slots():
    policy = WidthPolicy(3, feeds_drafts=True, cost=Cost(base=1.0, per_token=0.3))
    policy.observe([(3, 0)] * 64)
    assert policy.choose(1) == 0
    passes = 0
    while policy.choose(1) == 0:  # no outcomes while no slot is fed; the counts decay to the prior
        policy.observe([])
        passes += 1
    assert 50 < passes < 1000


def test_policy_counts_acceptance_per_offset():
    policy = WidthPolicy(3, feeds_drafts=False, cost=Cost(1.0, 0.0))
    policy.observe([(3, 1), (3, 3), (2, 0)])
    assert policy.fed[1:] == [3.0, 3.0, 2.0] and policy.hit[1:] == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("slots", [0, 1, 3])
def test_fixed_mask_slots_cap_what_a_pass_emits(slots):
    model = ToyMTP(wrong_every=0)
    ids = torch.tensor([[3, 4, 5], [10, 11, 12]])
    out = generate(model, ids, strategy="confadapt", k=4, tau=0.5, max_new_tokens=20, eos_token_id=[],
                   mask_slots=slots)
    assert out.stats.mask_slots_per_call == [slots] * out.stats.model_calls
    for row in out.stats.rows:
        assert max(row.tokens_per_pass) == slots + 1
    assert out.sequences[:, 3:].tolist() == [model.greedy_continuation(p, 20) for p in ids.tolist()]


@pytest.mark.parametrize(
    ("value", "message"),
    [(8, r"mask_slots must be 'auto', 'adaptive', 'timed' or an int in \[0, 3\] \(k-1 for k=4\), got 8"),
     (-1, r"got -1"), ("many", r"got 'many'"), (True, r"got True")],
)
def test_mask_slots_must_be_auto_or_in_range(value, message):
    with pytest.raises(ValueError, match=message):
        generate(ToyMTP(), torch.tensor([[1, 2]]), strategy="confadapt", k=4, mask_slots=value)


def test_draft_lookup_must_be_a_count():
    with pytest.raises(ValueError, match=r"draft_lookup must be an int >= 0 .* got -2"):
        generate(ToyMTP(), torch.tensor([[1, 2]]), strategy="verify", k=4, draft_lookup=-2)


class CyclingToy(ToyMTP):
    """The next token is (t + 1) mod 10 wherever it stands, so the text repeats itself, while every
    mask slot is wrong and unsure: only drafts looked up in the row's own text can verify."""

    def rule(self, token: int, position: int) -> int:
        return (token + 1) % 10


def test_lookup_drafts_verify_where_mask_drafts_fail():
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]])
    model = CyclingToy(wrong_every=1, calibrated=True)
    expected = model.greedy_continuation(ids[0].tolist(), 40)
    masks_only = generate(model, ids, strategy="verify", k=6, max_new_tokens=40, eos_token_id=[], mask_slots=5,
                          draft_lookup=0)
    looked_up = generate(model, ids, strategy="verify", k=6, max_new_tokens=40, eos_token_id=[], mask_slots=5)
    assert masks_only.sequences[0, 12:].tolist() == expected == looked_up.sequences[0, 12:].tolist()
    assert masks_only.stats.eff_k == 1.0
    assert looked_up.stats.eff_k >= 5.0


@pytest.fixture
def eager_compaction(monkeypatch):
    """Compact short caches with few holes too, and count the compactions."""
    monkeypatch.setattr(kvcache, "COMPACT_MIN", 8)
    monkeypatch.setattr(kvcache, "COMPACT_BELOW", 0.8)
    calls = []
    original = kvcache.DynamicKV.compact

    def counted(self):
        before = self.valid.shape[1]
        done = original(self)
        if self.valid.shape[1] < before:
            calls.append((before, self.valid.shape[1]))
        return done

    monkeypatch.setattr(kvcache.DynamicKV, "compact", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("width", ["auto", "all"])
def test_verify_with_lookup_and_compaction_equals_ar(arch, k, width, tokenizer, eager_compaction):
    model = build_model(arch, len(tokenizer), seed=k)
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=40)
    out = generate(model, ids, mask, strategy="verify", k=k, max_new_tokens=40,
                   mask_slots="auto" if width == "auto" else k - 1)
    assert torch.equal(out.sequences, ar.sequences)
    assert max(out.stats.mask_slots_per_call) <= k - 1
    if width == "all":  # an untrained model rejects most drafts: their holes were dropped
        assert eager_compaction

