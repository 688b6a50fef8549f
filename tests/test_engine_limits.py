"""Limits every strategy respects: max_new_tokens, EOS, stop strings, >= 1 token per pass; sampling;
the statistics (Eff. k computed independently); and the errors users see."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from toy import ToyMTP

from mtp_plugins import add_mask_tokens, generate
from mtp_plugins.registry import UnknownPluginError

def printable_piece(text: str, start: int, size: int = 3) -> str:
    """A substring of plain ASCII from ``text`` at or after ``start`` (byte-level BPE on a random model
    also emits partial UTF-8 bytes, which decode to U+FFFD and make no sense as stop strings)."""
    for i in range(start, len(text) - size):
        piece = text[i : i + size]
        if all(32 < ord(c) < 127 for c in piece):
            return piece
    raise AssertionError(f"no printable piece in {text!r}")


STRATEGIES = [("ar", 1), ("static", 4), ("confadapt", 4), ("verify", 4), ("static", 8)]


@pytest.fixture
def model_and_batch(tokenizer):
    model = build_model("llama", len(tokenizer), seed=5)
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    return model, ids, mask


@pytest.mark.parametrize(("strategy", "k"), STRATEGIES)
@pytest.mark.parametrize("max_new", [1, 5, 13])
def test_max_new_tokens_is_never_exceeded(strategy, k, max_new, model_and_batch):
    model, ids, mask = model_and_batch
    out = generate(model, ids, mask, strategy=strategy, k=k, tau=0.0, max_new_tokens=max_new, eos_token_id=[])
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + max_new)
    for row in out.stats.rows:
        assert row.tokens == max_new
        assert row.stop_reason == "length"
        assert all(n >= 1 for n in row.tokens_per_pass)


def test_zero_new_tokens_returns_the_prompt(model_and_batch):
    model, ids, mask = model_and_batch
    out = generate(model, ids, mask, strategy="confadapt", max_new_tokens=0)
    assert torch.equal(out.sequences, ids)
    assert out.stats.forward_passes == 0 and out.stats.eff_k == 0.0


@pytest.mark.parametrize(("strategy", "k"), STRATEGIES)
def test_eos_stops_each_row_and_pads(strategy, k):
    model = ToyMTP(wrong_every=0)
    ids = torch.tensor([[3, 4, 5], [10, 11, 12]])
    free = generate(model, ids, strategy="ar", max_new_tokens=20, eos_token_id=[]).sequences[:, 3:].tolist()
    eos = free[0][6]
    out = generate(model, ids, strategy=strategy, k=k, max_new_tokens=20, eos_token_id=[eos, 96], pad_token_id=0)
    got = out.sequences[:, 3:].tolist()
    for row, ref, stats in zip(got, free, out.stats.rows):
        n = stats.tokens
        if eos in ref[:20]:
            assert n == ref.index(eos) + 1 and stats.stop_reason == "eos"
        assert row[:n] == ref[:n]
        assert row[n:] == [0] * (len(row) - n)


@pytest.mark.parametrize(("strategy", "k"), STRATEGIES)
def test_stop_strings_cut_at_the_completing_token(strategy, k, tokenizer, model_and_batch):
    model, ids, mask = model_and_batch
    free = generate(model, ids, mask, strategy=strategy, k=k, tau=0.0, max_new_tokens=30, eos_token_id=[])
    width = ids.shape[1]
    text = tokenizer.decode(free.sequences[0, width:])
    stop = printable_piece(text, 8)
    assert stop.strip(), "the random model should produce printable text"
    out = generate(
        model, ids, mask, strategy=strategy, k=k, tau=0.0, max_new_tokens=30, eos_token_id=[],
        stop_strings=[stop], tokenizer=tokenizer,
    )
    for i, row in enumerate(out.stats.rows):
        tokens = out.sequences[i, width : width + row.tokens].tolist()
        assert tokens == free.sequences[i, width : width + row.tokens].tolist()
        if row.stop_reason == "stop_string":
            assert stop in tokenizer.decode(tokens)
            assert stop not in tokenizer.decode(tokens[:-1])
        else:
            assert stop not in tokenizer.decode(tokens)
    assert out.stats.rows[0].stop_reason == "stop_string"


def test_pooled_eff_k_is_tokens_over_row_passes():
    # Count independently: row-passes from the batch size of every forward call, tokens from the
    # output sequences (up to each row's EOS).
    model = ToyMTP(wrong_every=3)
    ids = torch.tensor([[3, 4, 5], [10, 11, 12], [20, 21, 22]])
    free = generate(model, ids, strategy="ar", max_new_tokens=25, eos_token_id=[]).sequences[:, 3:].tolist()
    eos = free[1][9]
    model.calls.clear()
    out = generate(model, ids, strategy="confadapt", k=5, tau=0.9, max_new_tokens=25, eos_token_id=eos, pad_token_id=0,
                   mask_slots=4)
    row_passes = sum(block.shape[0] for block in model.calls)
    tokens = 0
    for row in out.sequences[:, 3:].tolist():
        tokens += row.index(eos) + 1 if eos in row else len(row)
    assert out.stats.forward_passes == row_passes
    assert out.stats.tokens == tokens
    assert out.stats.eff_k == pytest.approx(tokens / row_passes)
    assert out.stats.eff_k > 1.0
    assert out.stats.mean_eff_k == pytest.approx(sum(r.tokens / r.forward_passes for r in out.stats.rows) / 3)
    summary = out.stats.to_dict()
    assert summary["tokens"] == tokens and summary["forward_passes"] == row_passes
    assert summary["wall_seconds"] > 0 and summary["tokens_per_second"] > 0


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(model_and_batch):
    model, ids, mask = model_and_batch
    greedy = generate(model, ids, mask, strategy="confadapt", k=4, tau=1.1, max_new_tokens=16, eos_token_id=[])

    def sampled(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, strategy="confadapt", k=4, tau=1.1, max_new_tokens=16, eos_token_id=[],
                        do_sample=True, generator=g, **kw).sequences

    assert torch.equal(sampled(1, temperature=1.5), sampled(1, temperature=1.5))
    assert not torch.equal(sampled(1, temperature=1.5), greedy.sequences)
    assert torch.equal(sampled(2, top_p=1e-6), greedy.sequences)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strategy": "confadap"}, UnknownPluginError, "unknown decoder 'confadap'; did you mean 'confadapt'"),
        ({"strategy": "nope"}, UnknownPluginError, "available: ar, confadapt, static, verify"),
        ({"k": 0}, ValueError, "k must be an int >= 1, got 0"),
        ({"k": 2.5}, ValueError, "k must be an int >= 1"),
        ({"tau": "high"}, ValueError, "tau must be a number"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0"),
        ({"strategy": "verify", "do_sample": True}, ValueError, "does not support do_sample=True"),
        ({"do_sample": True, "temperature": 0}, ValueError, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"stop_strings": ["Q:"]}, ValueError, "stop_strings need a tokenizer"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message, model_and_batch):
    model, ids, mask = model_and_batch
    with pytest.raises(error, match=message):
        generate(model, ids, mask, **kwargs)


def test_mtp_strategies_need_a_mask_token(tokenizer):
    model = build_model("llama", len(tokenizer))
    ids, mask = batch(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match=r"no MTP mask token.*add_mask_tokens.*mtp-train"):
        generate(model, ids, mask, strategy="confadapt", k=8)
    # k=1 and ar need no mask: the engine is an ordinary decoder for any causal LM.
    generate(model, ids, mask, strategy="confadapt", k=1, max_new_tokens=2)
    generate(model, ids, mask, strategy="ar", k=8, max_new_tokens=2)


def test_bad_batches_are_named(model_and_batch):
    model, ids, mask = model_and_batch
    with pytest.raises(ValueError, match="input_ids must be a .batch, length. tensor"):
        generate(model, ids[0], strategy="ar")
    with pytest.raises(ValueError, match="differs from input_ids shape"):
        generate(model, ids, mask[:, 1:], strategy="ar")
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] of the batch have an empty prompt"):
        generate(model, ids, empty, strategy="ar")


def test_decoding_past_trained_k_max_warns(model_and_batch):
    model, ids, mask = model_and_batch
    model.config.mtp["k_max"] = 4
    with pytest.warns(UserWarning, match="k=8, beyond the k_max=4"):
        generate(model, ids, mask, strategy="static", k=8, max_new_tokens=2)
