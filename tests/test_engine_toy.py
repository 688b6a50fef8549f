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


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("wrong_every", [2, 3])
def test_verify_recovery_groups_keep_output_and_save_passes(k, wrong_every):
    # Recovery groups (mask slots after the decided token and the first drafts, each seeing only the
    # block up to its anchor) leave drafts after a rejection: fewer passes, the same tokens.
    model = ToyMTP(wrong_every=wrong_every)
    outs = {
        g: generate(model, PROMPT_IDS, PROMPT_MASK, strategy="verify", k=k, max_new_tokens=MAX_NEW,
                    mask_slots=k - 1, draft_lookup=0, decoder_options={"recovery": g})
        for g in (0, 1, k - 1)
    }
    for out in outs.values():
        assert generated(out) == expected_greedy(model)
    passes = {g: sum(r.forward_passes for r in out.stats.rows) for g, out in outs.items()}
    assert passes[1] < passes[0]
    assert passes[k - 1] <= passes[1]
    # Without recovery a rejected draft leaves the next pass none: some pass after the first emits a
    # single token with nothing fed to verify. With a group after every fed token that never happens.
    fed_widths = [call.shape[1] for call in model.calls]
    assert max(fed_widths) >= 1 + 2 * (k - 1) + (k - 1) * (k - 1)


def test_verify_recovery_group_sees_only_its_anchor():
    # A wrong draft must not leak into the recovery group's slots: the toy raises on inconsistent
    # positions and predicts from the last real token each slot sees, so a leak changes the drafts.
    model = ToyMTP(wrong_every=2)
    plain = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="verify", k=4, max_new_tokens=MAX_NEW, mask_slots=3,
                     draft_lookup=0, decoder_options={"recovery": 0})
    recovered = generate(model, PROMPT_IDS, PROMPT_MASK, strategy="verify", k=4, max_new_tokens=MAX_NEW, mask_slots=3,
                         draft_lookup=0, decoder_options={"recovery": 1})
    assert generated(recovered) == generated(plain) == expected_greedy(model)
    assert recovered.stats.eff_k > plain.stats.eff_k


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_verify_recovery_must_be_a_count(bad):
    with pytest.raises(ValueError, match="recovery must be an int >= 0"):
        generate(ToyMTP(), PROMPT_IDS, PROMPT_MASK, strategy="verify", k=4, max_new_tokens=4,
                 decoder_options={"recovery": bad})


def test_recovery_layout_anchors_each_group():
    from mtp_plugins.decoding.engine import _recovery_layout

    # Block: 5 pending columns, 2 mask slots after the drafts, 2 recovery groups of 2.
    positions = torch.arange(11).expand(2, -1) + torch.tensor([[10], [20]])
    pos, within = _recovery_layout(positions, torch.tensor([2, 0]), width=5, slots=2, groups=2)
    # Row 0 has 2 drafts: its decided token is column 2, so group 0 follows column 2, group 1 column 3.
    assert pos[0].tolist() == [10, 11, 12, 13, 14, 15, 16, 13, 14, 14, 15]
    assert within[0, 7].nonzero().flatten().tolist() == [0, 1, 2, 7]
    assert within[0, 8].nonzero().flatten().tolist() == [0, 1, 2, 7, 8]
    assert within[0, 10].nonzero().flatten().tolist() == [0, 1, 2, 3, 9, 10]
    # Everything before the groups keeps the causal order (and sees no group).
    assert torch.equal(within[0, :7, :7], torch.ones(7, 7, dtype=torch.bool).tril())
    assert not within[0, :7, 7:].any()
    # Row 1 has no drafts: both groups follow its last column (their proposals go unused).
    assert pos[1, 7:].tolist() == [25, 26, 25, 26]
