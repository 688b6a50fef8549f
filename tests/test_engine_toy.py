"""Engine bookkeeping on the deterministic toy model (see toy.py): accepted drafts, holes, positions,
ragged acceptance in one batch, per-slot mask ids, and the strategies' emission rules."""

from __future__ import annotations

import pytest
import torch
from toy import ToyMTP

from mtp_plugins import generate

PROMPT_IDS = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 9, 11], [0, 0, 0, 0, 40, 2]])
PROMPT_MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
MAX_NEW = 30


def expected_greedy(model: ToyMTP, max_new: int = MAX_NEW) -> list[list[int]]:
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(PROMPT_IDS, PROMPT_MASK)]
    return [model.greedy_continuation(p, max_new) for p in prompts]


def generated(out) -> list[list[int]]:
    return out.sequences[:, PROMPT_IDS.shape[1] :].tolist()


def test_ar_follows_the_rule_with_left_padding():
    model = ToyMTP()
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="ar", max_new_tokens=MAX_NEW)
    assert generated(out) == expected_greedy(model)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("wrong_every", [0, 2, 3, 5])
def test_verify_is_exact_and_accelerates(k, wrong_every):
    model = ToyMTP(wrong_every=wrong_every)
    # The paper's width (every slot, every pass) and mask drafts only, so the pattern is known.
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="verify", k=k, max_new_tokens=MAX_NEW,
                   mask_slots=k - 1, draft_lookup=0)
    assert generated(out) == expected_greedy(model)
    # Drafts that verify are emitted: with no wrong slot, every pass after the first emits k tokens.
    if wrong_every == 0:
        for row in out.stats.rows:
            assert row.tokens_per_pass[0] == 1
            assert all(n == k for n in row.tokens_per_pass[1:-1])
    assert out.stats.eff_k > 1.2


@pytest.mark.parametrize("k", [2, 4, 8])
def test_confadapt_emits_only_confident_runs(k):
    # Wrong slots come with low confidence, so tau 0.9 never emits one: output == greedy, Eff. k > 1.
    model = ToyMTP(wrong_every=3, calibrated=True)
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="confadapt", k=k, tau=0.9, max_new_tokens=MAX_NEW,
                   mask_slots=k - 1)
    assert generated(out) == expected_greedy(model)
    assert out.stats.eff_k > 1.3
    # Rows accept different counts in the same pass (ragged acceptance).
    firsts = {tuple(r.tokens_per_pass[:3]) for r in out.stats.rows}
    assert len(firsts) > 1


def test_confadapt_trusts_overconfident_wrong_slots():
    # The same wrong slots at full confidence are emitted, so the output departs from greedy.
    model = ToyMTP(wrong_every=3, calibrated=False)
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="confadapt", k=4, tau=0.9, max_new_tokens=MAX_NEW,
                   mask_slots=3)
    assert generated(out) != expected_greedy(model)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_static_emits_exactly_k_per_pass(k):
    model = ToyMTP(wrong_every=3)
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="static", k=k, max_new_tokens=MAX_NEW, eos_token_id=[])
    for row in out.stats.rows:
        assert row.tokens == MAX_NEW
        assert all(n == k for n in row.tokens_per_pass[:-1])
        assert 1 <= row.tokens_per_pass[-1] <= k
        assert row.forward_passes == -(-MAX_NEW // k)


def test_per_slot_mask_ids_are_fed_in_slot_order():
    model = ToyMTP(num_masks=3)
    generate(model, PROMPT_IDS, PROMPT_MASK, strategy="static", k=4, max_new_tokens=8)
    assert model.calls
    for block in model.calls:
        assert block[:, -3:].tolist() == [model.mask_ids] * block.shape[0]
    with pytest.raises(ValueError, match="k <= 4; got k=5"):
        generate(model, PROMPT_IDS, PROMPT_MASK, strategy="static", k=5, max_new_tokens=8)


def test_ar_feeds_no_mask_slots():
    model = ToyMTP()
    generate(model, PROMPT_IDS, PROMPT_MASK, strategy="ar", k=8, max_new_tokens=5)
    assert all(model.mask_ids[0] not in block for block in model.calls)
    assert [b.shape[1] for b in model.calls[1:]] == [1] * 4


def test_finished_rows_leave_the_batch():
    model = ToyMTP()
    ar = expected_greedy(model)
    eos = ar[2][3]  # row 2 stops after 4 tokens, unless another row reaches this token first
    out = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="ar", max_new_tokens=MAX_NEW, eos_token_id=eos)
    rows = out.stats.rows
    stopped = [i for i, row in enumerate(rows) if row.stop_reason == "eos"]
    assert 2 in stopped
    batch_sizes = [b.shape[0] for b in model.calls]
    assert batch_sizes[0] == 3 and batch_sizes[-1] < 3
    assert sum(batch_sizes) == out.stats.forward_passes
    assert out.stats.model_calls == len(model.calls)
