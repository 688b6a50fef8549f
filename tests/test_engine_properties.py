"""Property-based checks of the engine on the toy model: random batches, prompt lengths, k, tau, stop
strings and limits; the exactness contracts and the limits hold for every draw."""

from __future__ import annotations

import string
from unittest.mock import patch

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy import ToyMTP

from mtp_plugins import generate
from mtp_plugins.decoding import engine, kvcache

VOCAB = 26


class LetterTokenizer:
    """Token i decodes to the i-th lowercase letter (mask ids decode to '#')."""

    def decode(self, tokens, skip_special_tokens=False):
        return "".join(string.ascii_lowercase[t] if t < VOCAB else "#" for t in tokens)


@st.composite
def batches(draw):
    size = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 6), min_size=size, max_size=size))
    width = max(lengths)
    ids = torch.zeros((size, width), dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)))
        mask[row, width - n :] = 1
    return ids, mask


def reference(model: ToyMTP, ids, mask, max_new: int, eos: int | None, stops: list[str]) -> list[list[int]]:
    """Plain greedy decoding of each row, cut at EOS, at a stop string, at max_new."""
    out = []
    for row, m in zip(ids, mask):
        tokens = model.greedy_continuation(row[m.bool()].tolist(), max_new)
        for n in range(1, len(tokens) + 1):
            text = LetterTokenizer().decode(tokens[:n])
            if tokens[n - 1] == eos or any(s in text for s in stops):
                tokens = tokens[:n]
                break
        out.append(tokens)
    return out


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    batch=batches(),
    k=st.integers(1, 6),
    wrong_every=st.integers(0, 4),
    max_new=st.integers(0, 14),
    eos=st.one_of(st.none(), st.integers(0, VOCAB - 1)),
    stops=st.lists(st.text(alphabet="abcdef", min_size=1, max_size=2), max_size=2),
    strategy=st.sampled_from(["ar", "verify", "confadapt-calibrated"]),
    slots=st.one_of(st.just("auto"), st.integers(0, 5)),
    lookup=st.integers(0, 3),
    compact=st.booleans(),
    cache=st.sampled_from(["dynamic", "static", "static-fixed-shapes"]),
)
def test_lossless_strategies_reproduce_greedy_with_every_limit(
    batch, k, wrong_every, max_new, eos, stops, strategy, slots, lookup, compact, cache
):
    ids, mask = batch
    model = ToyMTP(vocab=VOCAB, wrong_every=wrong_every, calibrated=True)
    name = "confadapt" if strategy.startswith("confadapt") else strategy
    slots = slots if slots == "auto" or name == "ar" else min(slots, k - 1)
    # compact: drop the cache's holes as soon as a few are there (the default waits for long caches);
    # a static cache is then sized to the least that fits, so it compacts whenever the next block
    # would overflow. "static-fixed-shapes" pads batch and block as for torch.compile (uncompiled).
    with patch.object(kvcache, "COMPACT_MIN", 4 if compact else kvcache.COMPACT_MIN), \
            patch.object(kvcache, "COMPACT_BELOW", 0.9 if compact else kvcache.COMPACT_BELOW), \
            patch.object(kvcache, "CAPACITY_STEP", 1 if compact else kvcache.CAPACITY_STEP), \
            patch.object(engine, "compiled_call", lambda model, mode: model.__call__):
        out = generate(
            model, ids, mask, strategy=name, k=k, tau=0.9, max_new_tokens=max_new,
            eos_token_id=[] if eos is None else eos, pad_token_id=0,
            stop_strings=stops or None, tokenizer=LetterTokenizer(),
            mask_slots=0 if name == "ar" and slots != "auto" else slots, draft_lookup=lookup,
            cache=cache[:6] if cache != "dynamic" else "dynamic",
            compile="default" if cache == "static-fixed-shapes" else False,
        )
    expected = reference(model, ids, mask, max_new, eos, stops)
    width = ids.shape[1]
    assert out.sequences.shape[1] == width + max((len(e) for e in expected), default=0)
    for row, want, stats in zip(out.sequences, expected, out.stats.rows):
        assert row[width : width + len(want)].tolist() == want
        assert (row[width + len(want) :] == 0).all()
        assert stats.tokens == len(want) <= max_new
        most = k if slots == "auto" or name == "ar" else slots + 1
        assert all(1 <= n <= most for n in stats.tokens_per_pass)


@SETTINGS
@given(batch=batches(), k=st.integers(1, 6), max_new=st.integers(1, 14), tau=st.floats(0.0, 1.5))
def test_every_strategy_respects_the_pass_and_length_limits(batch, k, max_new, tau):
    ids, mask = batch
    model = ToyMTP(vocab=VOCAB, wrong_every=3, calibrated=False)
    for strategy in ["static", "confadapt"]:
        out = generate(model, ids, mask, strategy=strategy, k=k, tau=tau, max_new_tokens=max_new, eos_token_id=[])
        for stats in out.stats.rows:
            assert stats.tokens == max_new
            assert all(1 <= n <= k for n in stats.tokens_per_pass)
            if strategy == "static":
                assert all(n == k for n in stats.tokens_per_pass[:-1])
        assert out.stats.eff_k == out.stats.tokens / out.stats.forward_passes
