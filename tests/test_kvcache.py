"""The engine's dynamic cache: ``ReservedLayer`` holds exactly what HF's ``DynamicLayer`` holds, through
every operation the engine applies, without copying the whole cache on each pass."""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
from conftest import PROMPTS, batch, build_model
from transformers.cache_utils import DynamicLayer

from mtp_plugins import add_mask_tokens, generate
from mtp_plugins.adapters import AdapterSettings, adapters_of, attach_gated_lora, parse_targets
from mtp_plugins.decoding import kvcache
from mtp_plugins.decoding.kvcache import new_dynamic_cache, reserved_layer_class


def _kv(batch_size: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 2, columns, 4, generator=g), torch.randn(batch_size, 2, columns, 4, generator=g)


def _same(a, b) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_reserved_layer_holds_what_a_dynamic_layer_holds_through_every_operation():
    plain, reserved = DynamicLayer(), reserved_layer_class()()
    steps = [("update", 3, 7), ("update", 3, 2), ("crop", 2), ("update", 3, 4), ("select", [0, 2]),
             ("update", 2, 3), ("crop", 1), ("gather", [[0, 2, 3, 5], [1, 2, 4, 6]]), ("update", 2, 200),
             ("update", 2, 1)]
    for i, step in enumerate(steps):
        if step[0] == "update":
            k, v = _kv(step[1], step[2], seed=i)
            got, want = reserved.update(k, v), plain.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif step[0] == "crop":
            plain.crop(-step[1])
            reserved.crop(-step[1])
        elif step[0] == "select":
            index = torch.tensor(step[1])
            plain.batch_select_indices(index)
            reserved.batch_select_indices(index)
        else:  # what the engine's compaction does: set the layer's tensors itself
            order = torch.tensor(step[1])
            for layer in (plain, reserved):
                layer.keys, layer.values = kvcache._gather_columns(layer.keys, order), kvcache._gather_columns(layer.values, order)
        _same(plain, reserved)
        assert plain.get_seq_length() == reserved.get_seq_length()


def test_passes_write_into_spare_columns_instead_of_copying_the_cache():
    layer = reserved_layer_class()()
    layer.update(*_kv(1, 300, seed=0))
    start = layer.keys.data_ptr()
    for i in range(40):  # 40 passes of 3 columns, their last 2 dropped after: 40 columns kept
        layer.update(*_kv(1, 3, seed=i + 1))
        layer.crop(-2)
    assert layer.keys.data_ptr() == start  # one buffer the whole time (300 + 40 fits its reserve)
    assert layer.get_seq_length() == 340
    layer.update(*_kv(1, kvcache.RESERVE_MIN, seed=99))  # beyond the reserve: one move to a larger buffer
    assert layer.keys.data_ptr() != start and layer.get_seq_length() == 340 + kvcache.RESERVE_MIN


def test_states_with_gradients_are_concatenated_as_hf_does():
    layer = reserved_layer_class()()
    k, v = _kv(1, 5, seed=0)
    k.requires_grad_(True)
    keys, values = layer.update(k, v)
    keys.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_only_the_engine_asks_for_reserved_layers():
    model = build_model("llama", 64, seed=0)
    reserved = reserved_layer_class()
    plain = new_dynamic_cache(model)
    assert not any(isinstance(layer, reserved) for layer in plain.layers)  # training and others: HF's own
    engine = new_dynamic_cache(model, reserve=True)
    assert engine.layers and all(type(layer) is reserved for layer in engine.layers)


@pytest.mark.parametrize("compact", [False, True])
def test_every_strategy_decodes_the_same_tokens_with_either_cache(tokenizer, compact):
    original = build_model("llama", len(tokenizer), seed=5)
    model = copy.deepcopy(original)
    spec = add_mask_tokens(model, tokenizer)
    attach_gated_lora(model, spec.mask_token_ids, AdapterSettings(rank=4, targets=parse_targets("all")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters_of(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask = batch(tokenizer, PROMPTS)
    runs = [("ar", {}), ("verify", {}), ("confadapt", {"tau": 0.3}), ("static", {})]
    make = kvcache.new_dynamic_cache
    with patch.object(kvcache, "COMPACT_MIN", 4 if compact else kvcache.COMPACT_MIN), \
            patch.object(kvcache, "COMPACT_BELOW", 0.9 if compact else kvcache.COMPACT_BELOW):
        ours = [generate(model, ids, mask, strategy=s, k=4, max_new_tokens=20, **kw).sequences for s, kw in runs]
        with patch.object(kvcache, "new_dynamic_cache", lambda m, reserve=False: make(m, reserve=False)):
            hfs = [generate(model, ids, mask, strategy=s, k=4, max_new_tokens=20, **kw).sequences for s, kw in runs]
    for (strategy, _), got, want in zip(runs, ours, hfs):
        assert torch.equal(got, want), strategy
