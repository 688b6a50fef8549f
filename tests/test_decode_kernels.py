"""The engine's per-pass shortcuts: each must give exactly what the plain operation gives."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from mtp_plugins.decoding import attention
from mtp_plugins.decoding.base import Proposals, greedy_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_is_argmax_ties_and_nan_included(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 5, 4099, generator=generator) * 2).round().to(dtype)  # many ties per row
    logits[3, 1, 17] = float("nan")
    logits[4, 2] = 1.0  # a row that is one long tie
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_slot_confidence_from_the_passed_maxima_equals_the_computed_one():
    generator = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(3, 4, 50, generator=generator).to(torch.bfloat16)
    next_logits = torch.randn(3, 50, generator=generator)
    top = mask_logits.max(dim=-1)
    tokens = torch.cat([greedy_tokens(next_logits)[:, None], top.indices], dim=1)
    valid = torch.full((3,), 5)
    given = Proposals(tokens=tokens, valid=valid, next_logits=next_logits, mask_logits=mask_logits, _mask_top=top.values)
    computed = Proposals(tokens=tokens, valid=valid, next_logits=next_logits, mask_logits=mask_logits)
    assert torch.equal(given.confidence, computed.confidence)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4), (3, 2), (16, 9)])
def test_confidence_from_one_reduction_over_all_rows_equals_the_row_by_row_one(dtype, shape):
    """A pass without drafts hands ``Proposals`` its logits as one [B, P, V] tensor; the confidences
    from one reduction over it must be exactly those of the separate next-token and slot rows."""
    batch, proposals = shape
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(batch, proposals, 4099, generator=generator) * 4).to(dtype)
    top = logits.max(dim=-1)
    valid = torch.full((batch,), proposals)
    joined = Proposals(tokens=top.indices, valid=valid, next_logits=logits[:, 0], mask_logits=logits[:, 1:],
                       _mask_top=top.values[:, 1:], _logits=logits)
    separate = Proposals(tokens=top.indices, valid=valid, next_logits=logits[:, 0].clone(),
                         mask_logits=logits[:, 1:].clone())
    assert torch.equal(joined.confidence, separate.confidence)
    assert torch.equal(joined.mask_confidence, separate.mask_confidence)
    torch.testing.assert_close(joined.confidence, torch.softmax(logits.float(), dim=-1).amax(dim=-1))


def test_proposals_of_a_pass_without_drafts_are_the_greedy_tokens_and_the_slots():
    """The engine's shortcut for passes that feed no drafts (views of the logits, one max over all
    rows) proposes what the general path does: row 0's greedy token, then each slot's."""
    from mtp_plugins.decoding.engine import _DecodeLoop

    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 4, 301, generator=generator) * 2).round().to(torch.bfloat16)  # ties included
    loop = _DecodeLoop.__new__(_DecodeLoop)
    loop.active = [type("Row", (), {"index": i})() for i in (5, 7)]
    loop.sampler = None
    got = loop._propose_undrafted(logits)
    assert torch.equal(got.tokens, logits.argmax(dim=-1))
    assert got.valid.tolist() == [4, 4] and got.row_index == [5, 7]
    assert torch.equal(got.next_logits, logits[:, 0]) and torch.equal(got.mask_logits, logits[:, 1:])
    loop.sampler = lambda rows: torch.tensor([11, 12])  # a sampled proposal 0; the slots stay greedy
    sampled = loop._propose_undrafted(logits)
    assert sampled.tokens[:, 0].tolist() == [11, 12] and torch.equal(sampled.tokens[:, 1:], logits[:, 1:].argmax(dim=-1))
    assert torch.equal(sampled.mask_confidence, got.mask_confidence)


def test_the_folded_attention_repeats_the_mask_once_per_pass(monkeypatch):
    model = build_model("llama", 64, num_hidden_layers=3)  # 4 query heads on 2 key/value heads
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0  # a left-padded row: the pass needs a mask
    calls = []
    plain = attention._repeat

    def counted(*args):
        calls.append(args[0])
        return plain(*args)

    monkeypatch.setattr(attention, "_repeat", counted)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=padding).logits  # HF's sdpa
        with attention.grouped_attention(model):
            got = model(input_ids=ids, attention_mask=padding).logits
            again = model(input_ids=ids, attention_mask=padding).logits
    assert len(calls) == 2 and calls[0] is not calls[1]  # once per pass (3 layers each), a new mask each pass
    assert not attention._REPEATED  # nothing held after the call
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_additive_folded_mask_gives_exactly_the_boolean_masks_attention(dtype):
    """The folded mask is handed to SDPA as 0 / -inf in the query's dtype (made once per pass, not
    converted from booleans in every layer): the attention is bit for bit the boolean mask's."""
    g = torch.Generator().manual_seed(3)
    batch, kv_heads, groups, length, keys = 2, 2, 3, 4, 37
    query = torch.randn(batch, kv_heads, groups * length, 16, generator=g).to(dtype)
    key, value = (torch.randn(batch, kv_heads, keys, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(batch, 1, length, keys, generator=g) > 0.3
    mask[..., -length:] = torch.tril(torch.ones(length, length, dtype=torch.bool))  # every query sees itself
    mask[1, :, :, :5] = False  # a row's left padding
    boolean = mask.repeat(1, 1, groups, 1)
    additive = attention._repeat(mask, batch, length, keys, groups, dtype)
    assert additive.dtype == dtype and torch.equal(additive == 0, boolean)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(query, key, value, attn_mask=boolean, scale=0.25)
    got = sdpa(query, key, value, attn_mask=additive, scale=0.25)
    assert torch.equal(got, want)
