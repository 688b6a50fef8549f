"""Gated low-rank adapters: the base model's next-token path, exactly, with adapters that act only on
mask slots (float32, tiny random models; every exactness contract token for token)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from transformers import AutoModelForCausalLM

from mtp_plugins import add_mask_tokens, generate, load_checkpoint
from mtp_plugins.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterSettings,
    adapters_of,
    attach_gated_lora,
    gate_all,
    parse_targets,
)
from mtp_plugins.adapter_checkpoint import save_adapter, weights_hash
from mtp_plugins.checkpoint import CheckpointError


def _gated(original, tokenizer, rank=4, targets="all", seed=0):
    """A copy of ``original`` made an MTP model with random (non-zero) gated adapters."""
    model = copy.deepcopy(original)
    spec = add_mask_tokens(model, tokenizer)
    adapters = attach_gated_lora(model, spec.mask_token_ids, AdapterSettings(rank=rank, targets=parse_targets(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, spec


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def pair(request, tokenizer):
    original = build_model(request.param, len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer)
    return original, model, spec


def test_real_tokens_compute_exactly_the_base_model(pair, tokenizer):
    original, model, spec = pair
    ids, mask = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got[..., : want.shape[-1]], want)


def test_adapters_act_on_mask_slots_only(pair, tokenizer):
    original, model, spec = pair
    plain = copy.deepcopy(original)
    add_mask_tokens(plain, copy.deepcopy(tokenizer))
    ids, _ = batch(tokenizer, PROMPTS[:1])
    with_masks = torch.cat([ids, torch.tensor([[spec.mask_token_ids[0]] * 3])], dim=1)
    with torch.no_grad():
        ours, theirs = model(with_masks).logits, plain(with_masks).logits
    n = ids.shape[1]
    assert torch.equal(ours[:, :n], theirs[:, :n])  # real tokens: the base model
    assert not torch.allclose(ours[:, n:], theirs[:, n:])  # mask slots: the adapter


def test_ar_and_verify_equal_the_original_models_generate(pair, tokenizer):
    original, model, spec = pair
    ids, mask = batch(tokenizer, PROMPTS)
    want = original.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=1)
    for strategy, extra in [("ar", {}), ("verify", {}), ("verify", {"mask_slots": 3, "draft_lookup": 0}),
                            ("verify", {"cache": "static"})]:
        out = generate(model, ids, mask, strategy=strategy, k=4, max_new_tokens=24, **extra)
        assert torch.equal(out.sequences, want), (strategy, extra)


def test_the_engine_gates_the_mask_slots_of_every_pass(tokenizer):
    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer)
    plain = copy.deepcopy(original)
    add_mask_tokens(plain, copy.deepcopy(tokenizer))
    ids, mask = batch(tokenizer, PROMPTS)
    for cache in ("dynamic", "static"):
        gated = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16, cache=cache)
        ungated = generate(plain, ids, mask, strategy="static", k=4, max_new_tokens=16, cache=cache)
        assert not torch.equal(gated.sequences, ungated.sequences)  # mask proposals come from the adapter
    # ... and the same gated proposals whatever the cache.
    dynamic = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16)
    static = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16, cache="static")
    assert torch.equal(dynamic.sequences, static.sequences)


def test_no_low_rank_work_in_a_pass_without_mask_slots(tokenizer, monkeypatch):
    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer)
    with torch.no_grad():
        for p in adapters_of(model).parameters():
            p.fill_(float("nan"))  # any low-rank work on a real token would poison the output
    ids, mask = batch(tokenizer, PROMPTS)
    want = original.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(generate(model, ids, mask, strategy="ar", max_new_tokens=12).sequences, want)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                      pad_token_id=1), want)
    with torch.no_grad(), gate_all(model):
        assert torch.isnan(model(ids).logits).all()  # (the poison is real where the gate is on)


def test_the_adapter_checkpoint_round_trips_and_refuses_other_loaders(tmp_path, tokenizer):
    original = build_model("llama", len(tokenizer), seed=5)
    base_dir = tmp_path / "base"
    original.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, spec = _gated(original, tokenizer)
    out = tmp_path / "adapter"
    save_adapter(out, model, tokenizer, base=str(base_dir), base_hash=weights_hash(str(base_dir)))
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    assert not (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers cannot take it for a model (nor PEFT for an adapter)
        AutoModelForCausalLM.from_pretrained(out)
    loaded, loaded_tokenizer, loaded_spec = load_checkpoint(out)
    assert loaded_spec == spec and len(loaded_tokenizer) == len(tokenizer)
    ids, mask = batch(tokenizer, PROMPTS)
    a = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=12)
    b = generate(loaded, ids, mask, strategy="static", k=4, max_new_tokens=12)
    assert torch.equal(a.sequences, b.sequences)


def test_a_full_export_loads_as_the_exact_base_elsewhere(tmp_path, tokenizer):
    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer)
    out = tmp_path / "full"
    save_adapter(out, model, tokenizer, base="base-model", base_hash=None, full=True)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert adapters_of(plain) is None
    ids, mask = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        assert torch.equal(plain(ids, attention_mask=mask).logits[..., : want.shape[-1]], want)
    loaded, _, _ = load_checkpoint(out)
    assert adapters_of(loaded) is not None
    a = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=12)
    assert torch.equal(generate(loaded, ids, mask, strategy="static", k=4, max_new_tokens=12).sequences, a.sequences)


def test_another_base_is_refused_naming_both(tmp_path, tokenizer):
    original = build_model("llama", len(tokenizer), seed=5)
    other = build_model("llama", len(tokenizer), seed=6)
    for name, m in (("base", original), ("other", other)):
        m.save_pretrained(tmp_path / name)
    model, _ = _gated(original, tokenizer)
    save_adapter(tmp_path / "adapter", model, tokenizer, base=str(tmp_path / "base"),
                 base_hash=weights_hash(str(tmp_path / "base")))
    with pytest.raises(CheckpointError, match=r"gated adapter for .*base \(weights sha256 \w+\.\.\.\), but .*other has other weights"):
        load_checkpoint(tmp_path / "adapter", base=str(tmp_path / "other"))
    (tmp_path / "base" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"cannot read its base model .*base.*base=PATH"):
        load_checkpoint(tmp_path / "adapter")


def test_weights_hash_follows_content_not_files(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), seed=5)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_hash(str(tmp_path / "one")) == weights_hash(str(tmp_path / "sharded"))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "changed")
    assert weights_hash(str(tmp_path / "changed")) != weights_hash(str(tmp_path / "one"))


def test_targets_and_settings_are_checked(tokenizer):
    assert parse_targets("attention") == ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    model = build_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match=r"match no projection of LlamaForCausalLM; its projections: .*q_proj"):
        attach_gated_lora(model, [3], AdapterSettings(targets=("qkv",)))
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        AdapterSettings(rank=0)


def test_inference_sees_every_update_of_trainable_adapters(tokenizer):
    """Fused AdamW updates weights without bumping their version counter: what the inference path
    holds must follow the weights all the same."""
    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer)
    ids = torch.cat([batch(tokenizer, PROMPTS[:1])[0], torch.tensor([[spec.mask_token_ids[0]] * 2])], dim=1)
    params = adapters_of(model).parameters()
    optimizer = torch.optim.AdamW(params, lr=0.5, fused=True)
    with torch.no_grad():
        before = model(ids).logits[:, -2:]
    with gate_all(model):
        model(ids).logits.sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = model(ids).logits[:, -2:]
        fresh = copy.deepcopy(model)
        for p in adapters_of(fresh).parameters():
            p.requires_grad_(False)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, fresh(ids).logits[:, -2:], atol=1e-5)


def _compile_case(tokenizer):
    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer, targets="residual")
    for p in adapters_of(model).parameters():
        p.requires_grad_(False)  # as load_checkpoint gives them
    ids, mask = batch(tokenizer, PROMPTS[:3])
    return original, model, ids, mask


def test_the_fixed_shape_path_gates_the_mask_slots(tokenizer, monkeypatch):
    from test_engine_static import Recorder

    from mtp_plugins.decoding import engine

    original, model, ids, mask = _compile_case(tokenizer)
    monkeypatch.setattr(engine, "compiled_call", Recorder())
    want = original.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=1)
    assert torch.equal(generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=16, compile=True).sequences, want)
    eager = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16)
    fixed = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16, compile=True)
    assert torch.equal(eager.sequences, fixed.sequences)


@pytest.mark.slow
def test_torch_compile_traces_the_gated_adapters(tokenizer):
    """A real inductor compile of a model with gated adapters: ``verify`` is the original model's
    greedy decoding, and ``static`` proposes what the eager engine proposes (float32)."""
    original, model, ids, mask = _compile_case(tokenizer)
    want = original.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=1)
    assert torch.equal(generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=16, compile=True).sequences, want)
    eager = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16)
    compiled = generate(model, ids, mask, strategy="static", k=4, max_new_tokens=16, compile=True)
    assert torch.equal(eager.sequences, compiled.sequences)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_inference_path_computes_the_training_formula_on_the_tail(tokenizer, rows):
    """Without gradients the low-rank path runs in float32 and adds into the tail in place (the
    engine's fast path); it computes what the trainer's path computes, on every row of the batch."""
    from mtp_plugins.adapters import gate_tail

    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer, targets="residual")
    ids = batch(tokenizer, PROMPTS[:rows])[0]
    ids = torch.cat([ids, torch.tensor([spec.mask_token_ids[:3]] * rows)], dim=1)
    with torch.no_grad(), gate_tail(model, 3):
        trainable = model(ids).logits  # trainable weights: held per call
    frozen = copy.deepcopy(model)
    for p in adapters_of(frozen).parameters():
        p.requires_grad_(False)
    with torch.no_grad(), gate_tail(frozen, 3):
        fast = frozen(ids).logits
    with torch.enable_grad(), gate_tail(model, 3):
        reference = model(ids).logits.detach()  # the trainer's formula (F.linear in the model's dtype)
    assert torch.equal(fast[:, :-3], reference[:, :-3]) and torch.equal(trainable, fast)
    assert torch.allclose(fast[:, -3:], reference[:, -3:], atol=1e-5)
    plain = copy.deepcopy(original)
    add_mask_tokens(plain, copy.deepcopy(tokenizer))
    with torch.no_grad():
        assert not torch.allclose(fast[:, -3:], plain(ids).logits[:, -3:])  # the adapter did act


def test_the_inference_path_runs_under_autocast(tokenizer):
    """The trainer evaluates under bf16 autocast without gradients: the low-rank path's products
    follow autocast there (an in-place float32 add would meet bf16 products)."""
    from mtp_plugins.adapters import gate_tail

    original = build_model("llama", len(tokenizer), seed=5)
    model, spec = _gated(original, tokenizer, targets="residual")
    for p in adapters_of(model).parameters():
        p.requires_grad_(False)
    ids = torch.cat([batch(tokenizer, PROMPTS[:2])[0], torch.tensor([spec.mask_token_ids[:3]] * 2)], dim=1)
    with torch.no_grad(), gate_tail(model, 3):
        want = model(ids).logits[:, -3:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids).logits[:, -3:].float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.99  # bf16 rounding only
