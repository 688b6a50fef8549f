"""The static KV cache and the ``torch.compile`` path: same tokens as the dynamic cache, fixed shapes.

- ``cache="static"`` (eager) == ``cache="dynamic"`` for every strategy and architecture, float32,
  token for token; ``ar`` == HF ``generate``; ``verify`` == ``ar``;
- with ``compile``, every pass after the first has a power-of-two batch and block, one cache length
  and one logits count (checked on the calls the compiled function receives); finished rows idle
  until the active ones fit half the batch, then move to a smaller cache;
- a cache sized to the least that fits compacts instead of overflowing, and stays exact;
- a real ``torch.compile`` (inductor, CPU) run equals ``ar``, and a second call of the same shape
  reuses the cache and compiles nothing new;
- bad values name what is allowed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from toy import ToyMTP

from mtp_plugins import add_mask_tokens, generate
from mtp_plugins.decoding import engine, kvcache

MAX_NEW = 24


def model_with_masks(arch, tokenizer, seed=0):
    model = build_model(arch, len(tokenizer), seed=seed)
    add_mask_tokens(model, tokenizer)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(("strategy", "k", "tau"), [("ar", 1, 0.9), ("verify", 4, 0.9), ("confadapt", 4, 1.01),
                                                    ("static", 3, 0.9)])
def test_static_cache_equals_dynamic(arch, strategy, k, tau, tokenizer):
    model = model_with_masks(arch, tokenizer, seed=k)
    ids, mask = batch(tokenizer, PROMPTS)
    dynamic = generate(model, ids, mask, strategy=strategy, k=k, tau=tau, max_new_tokens=MAX_NEW)
    static = generate(model, ids, mask, strategy=strategy, k=k, tau=tau, max_new_tokens=MAX_NEW, cache="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    if strategy == "ar":
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=1,
                            eos_token_id=0)
        assert torch.equal(static.sequences, hf)
    else:
        ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
        if strategy != "static":
            assert torch.equal(static.sequences, ar.sequences)
    # mask_slots="auto" feeds all k-1 slots on a static cache (fixed shapes)
    assert set(static.stats.mask_slots_per_call) == {k - 1}


class Recorder:
    """Stands in for ``torch.compile``: runs the model eagerly and records each call's shapes."""

    def __init__(self):
        self.shapes = []

    def __call__(self, model, mode):
        def call(**kwargs):
            self.shapes.append((tuple(kwargs["input_ids"].shape), tuple(kwargs["attention_mask"].shape),
                                tuple(kwargs["position_ids"].shape), kwargs["logits_to_keep"]))
            return model(**kwargs)

        return call


@pytest.mark.parametrize(("strategy", "k", "tau"), [("verify", 4, 0.9), ("confadapt", 4, 1.01), ("verify", 8, 0.9)])
def test_compiled_passes_have_fixed_shapes(strategy, k, tau, tokenizer, monkeypatch):
    model = model_with_masks("llama", tokenizer, seed=k)
    ids, mask = batch(tokenizer, PROMPTS[:3])  # 3 rows: padded to 4
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    # An EOS that row 0 reaches early: the rows finish at different passes and stay as idle rows.
    eos = int(ar.sequences[0, ids.shape[1] + 4])
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=1)
    assert len({r.tokens for r in ar.stats.rows}) > 1
    recorder = Recorder()
    monkeypatch.setattr(engine, "compiled_call", recorder)
    out = generate(model, ids, mask, strategy=strategy, k=k, tau=tau, max_new_tokens=MAX_NEW, compile=True,
                   eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out.sequences, ar.sequences)
    assert len(recorder.shapes) == out.stats.model_calls - 1  # every pass but the prompt's
    batches = [s[0][0] for s in recorder.shapes]
    lengths = {s[1][1] for s in recorder.shapes}
    widths = {s[0][1] for s in recorder.shapes}
    keeps = {s[3] for s in recorder.shapes}
    # 3 rows padded to 4; as rows finish, the rest move to a cache of 2, then 1 (powers of two only)
    assert batches[0] == 4 and batches == sorted(batches, reverse=True) and set(batches) <= {4, 2, 1}
    assert batches[-1] < 4
    assert len(lengths) == 1 and lengths.pop() % kvcache.CAPACITY_STEP == 0
    assert all(w & (w - 1) == 0 for w in widths) and len(widths) <= 3
    # verify: the decided token, k-1 drafts, k-1 masks; confadapt: the decided token, k-1 masks
    assert keeps == {1 + 2 * (k - 1) if strategy == "verify" else k}
    assert all(s[2] == s[0] for s in recorder.shapes)


def test_a_full_static_cache_compacts_instead_of_overflowing(tokenizer, monkeypatch):
    # An untrained model rejects most drafts: holes pile up and a least-size cache fills.
    model = model_with_masks("llama", tokenizer, seed=8)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=40)
    monkeypatch.setattr(kvcache, "CAPACITY_STEP", 1)
    compactions = []
    original = kvcache.StaticKV._compact

    def counted(self):
        before = self.length
        original(self)
        compactions.append((before, self.length))

    monkeypatch.setattr(kvcache.StaticKV, "_compact", counted)
    out = generate(model, ids, mask, strategy="verify", k=8, max_new_tokens=40, cache="static")
    assert torch.equal(out.sequences, ar.sequences)
    assert compactions and all(after < before for before, after in compactions)


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_static_toy_model_with_accepted_drafts(fixed_shapes, monkeypatch):
    """The toy model accepts most drafts: multi-token steps, holes and idle rows on a static cache."""
    monkeypatch.setattr(engine, "compiled_call", Recorder())
    model = ToyMTP(vocab=97, wrong_every=5, calibrated=True)
    ids = torch.tensor([[0, 5, 9, 3], [0, 0, 2, 8], [7, 1, 4, 6]])
    mask = (torch.arange(4) >= torch.tensor([[1], [2], [0]])).long()
    for strategy in ["verify", "confadapt"]:
        dynamic = generate(model, ids, mask, strategy=strategy, k=5, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
        static = generate(model, ids, mask, strategy=strategy, k=5, max_new_tokens=30, eos_token_id=[], pad_token_id=0,
                          cache="static", compile=fixed_shapes)
        assert torch.equal(static.sequences, dynamic.sequences)
        assert static.stats.eff_k > 1.5


def test_torch_compile_equals_ar_and_reuses_its_graphs(tokenizer):
    """A real ``torch.compile`` (inductor on this CPU): exact in float32; the second call of the same
    shape reuses the preallocated cache and triggers no new compilation."""
    from torch._dynamo.utils import counters

    model = model_with_masks("llama", tokenizer, seed=4)
    ids, mask = batch(tokenizer, PROMPTS[:3])
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=MAX_NEW)
    first = generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=MAX_NEW, compile=True)
    assert torch.equal(first.sequences, ar.sequences)
    caches = dict(model.__dict__["_mtp_static_caches"])
    graphs = counters["stats"]["unique_graphs"]
    second = generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=MAX_NEW, compile=True)
    assert torch.equal(second.sequences, ar.sequences)
    assert model.__dict__["_mtp_static_caches"] == caches  # the same cache objects, reused
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache": "paged"}, r"cache must be one of \['dynamic', 'static'\], got 'paged'"),
        ({"compile": "fast"}, r"compile must be True, False or a torch.compile mode \[.*'reduce-overhead'.*\], got 'fast'"),
        ({"compile": 1.5}, r"compile must be True, False or a torch.compile mode name, got 1.5"),
        ({"cache": "dynamic", "compile": True}, r"compile=True needs cache='static' .*got cache='dynamic'"),
    ],
)
def test_bad_cache_arguments_name_what_is_allowed(kwargs, message, tokenizer):
    model = model_with_masks("llama", tokenizer)
    ids, mask = batch(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match=message):
        generate(model, ids, mask, strategy="verify", k=2, max_new_tokens=4, **kwargs)


def test_static_cache_refuses_sliding_window_layers(tokenizer):
    model = build_model("qwen2", len(tokenizer), use_sliding_window=True, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"])
    add_mask_tokens(model, tokenizer)
    ids, mask = batch(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"cache='static' needs full attention in every layer .*use cache='dynamic'"):
        generate(model, ids, mask, strategy="verify", k=2, max_new_tokens=4, cache="static")


class ToyWithoutKeep(ToyMTP):
    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache=True):
        return super().forward(input_ids, attention_mask, position_ids, cache, use_cache)


def test_static_cache_needs_logits_to_keep():
    model = ToyWithoutKeep()
    with pytest.raises(ValueError, match=r"cache='static' needs a model whose forward takes logits_to_keep"):
        generate(model, torch.tensor([[1, 2, 3]]), strategy="verify", k=3, max_new_tokens=4, cache="static")
