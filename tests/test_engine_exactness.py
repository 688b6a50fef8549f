"""Exactness contracts on tiny random models, float32, token for token.

- ``ar`` == HF ``model.generate(do_sample=False)``, batch 1 and a left-padded batch of mixed lengths;
- ``verify`` == ``ar`` for k in {2, 4, 8} on an untrained model (its drafts are mostly wrong, so this
  exercises rejection, holes and the cache bookkeeping);
- ``confadapt`` with tau > 1 == ``ar`` (the mask slots are fed but never accepted).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch, build_model

from mtp_plugins import add_mask_tokens, generate

ARCHS = ["llama", "qwen2", "gpt2"]
MAX_NEW = 24


def hf_greedy(model, ids, mask, max_new=MAX_NEW):
    return model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=1, eos_token_id=0
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch4-left-padded"])
def test_ar_equals_hf_generate(arch, prompts, tokenizer):
    model = build_model(arch, len(tokenizer))
    ids, mask = batch(tokenizer, prompts)
    expected = hf_greedy(model, ids, mask)
    out = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)
    assert out.stats.rows[0].forward_passes == out.stats.rows[0].tokens  # one token per pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ar_equals_hf_generate_until_eos(arch, tokenizer):
    # Choose as EOS a token that row 0 produces mid-way, so rows finish at different passes and the
    # finished ones are padded while the others go on.
    model = build_model(arch, len(tokenizer), seed=3)
    ids, mask = batch(tokenizer, PROMPTS)
    free_run = hf_greedy(model, ids, mask)
    eos = int(free_run[0, ids.shape[1] + 5])
    model.generation_config.eos_token_id = eos
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=1)
    out = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW, pad_token_id=1)
    assert torch.equal(out.sequences, expected)
    assert out.stats.rows[0].stop_reason == "eos"
    assert out.stats.rows[0].tokens <= 6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_verify_equals_ar_on_random_model(arch, k, tokenizer):
    model = build_model(arch, len(tokenizer), seed=k)
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    out = generate(model, ids, mask, strategy="verify", k=k, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, ar.sequences)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recovery", [0, 3])
def test_verify_recovery_groups_equal_ar_on_random_model(arch, recovery, tokenizer):
    # Random drafts are rejected almost always, so the recovery groups' proposals are used every pass.
    model = build_model(arch, len(tokenizer), seed=5)
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    out = generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=MAX_NEW, mask_slots=3,
                   decoder_options={"recovery": recovery})
    assert torch.equal(out.sequences, ar.sequences)


@pytest.mark.parametrize("arch", ARCHS)
def test_confadapt_above_one_equals_ar(arch, tokenizer):
    model = build_model(arch, len(tokenizer), seed=1)
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    out = generate(model, ids, mask, strategy="confadapt", k=4, tau=1.01, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, ar.sequences)
    assert all(n == 1 for r in out.stats.rows for n in r.tokens_per_pass)


def test_right_padded_prompts_decode_like_left_padded(tokenizer):
    model = build_model("llama", len(tokenizer))
    add_mask_tokens(model, tokenizer)
    left_ids, left_mask = batch(tokenizer, PROMPTS)
    tokenizer.padding_side = "right"
    right_ids, right_mask = batch(tokenizer, PROMPTS)
    a = generate(model, left_ids, left_mask, strategy="verify", k=3, max_new_tokens=12)
    b = generate(model, right_ids, right_mask, strategy="verify", k=3, max_new_tokens=12)
    width = left_ids.shape[1]
    assert torch.equal(a.sequences[:, width:], b.sequences[:, width:])
