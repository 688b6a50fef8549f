"""The MTP checkpoint format: mask tokens, mean-initialised rows, the `mtp` config block, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtp_plugins import MTPSpec, add_mask_tokens, load_checkpoint, read_mtp_spec
from mtp_plugins.checkpoint import MASK_TOKEN, mask_token_names


@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True)])
def test_add_mask_tokens_grows_vocab_with_mean_rows(arch, tie, tokenizer):
    model = build_model(arch, len(tokenizer), tie=tie)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()

    spec = add_mask_tokens(model, tokenizer)

    (mask_id,) = spec.mask_token_ids
    assert mask_id == emb_before.shape[0] == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids(MASK_TOKEN) == mask_id
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == emb_before.shape[0] + 1
    assert torch.equal(emb[:-1], emb_before)
    torch.testing.assert_close(emb[mask_id], emb_before.mean(dim=0), rtol=0, atol=1e-6)
    out = model.get_output_embeddings().weight
    assert out.shape[0] == emb.shape[0]
    if tie:
        assert out.data_ptr() == emb.data_ptr()
    else:
        torch.testing.assert_close(out[mask_id], out_before.mean(dim=0), rtol=0, atol=1e-6)
    assert model.config.vocab_size == emb.shape[0]
    assert read_mtp_spec(model) == spec == MTPSpec(mask_token_ids=(mask_id,), k_max=None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_round_trip_through_save_pretrained(arch, tokenizer, tmp_path):
    model = build_model(arch, len(tokenizer))
    spec = add_mask_tokens(model, tokenizer, num_tokens=3, k_max=4)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mtp"] == {"format_version": 1, "mask_token_ids": list(spec.mask_token_ids), "k_max": 4}
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))

    loaded, tok, loaded_spec = load_checkpoint(tmp_path)
    assert loaded_spec == spec
    assert [tok.convert_tokens_to_ids(n) for n in mask_token_names(3)] == list(spec.mask_token_ids)
    assert type(loaded) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # still an ordinary HF checkpoint
    assert read_mtp_spec(plain) == spec
    assert AutoTokenizer.from_pretrained(tmp_path).decode(list(spec.mask_token_ids), skip_special_tokens=True) == ""


def test_padding_rows_beyond_tokenizer_are_reused_not_averaged(tokenizer):
    # Some checkpoints carry more embedding rows than tokens; the mask takes the first free id and
    # the mean is over the real token rows only.
    model = build_model("llama", len(tokenizer) + 8)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :] = 100.0
    real = model.get_input_embeddings().weight[: len(tokenizer)].detach().clone()
    spec = add_mask_tokens(model, tokenizer)
    assert spec.mask_token_ids == (len(real),)
    assert model.get_input_embeddings().weight.shape[0] == len(real) + 8
    torch.testing.assert_close(model.get_input_embeddings().weight[len(real)], real.mean(dim=0), rtol=0, atol=1e-6)


def test_add_mask_tokens_is_idempotent_and_refuses_a_different_count(tokenizer):
    model = build_model("llama", len(tokenizer))
    first = add_mask_tokens(model, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert add_mask_tokens(model, tokenizer) == first
    assert model.get_input_embeddings().weight.shape[0] == rows
    with pytest.raises(ValueError, match="already has 1 mask token"):
        add_mask_tokens(model, tokenizer, num_tokens=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_add_mask_tokens_rejects_bad_counts(bad, tokenizer):
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        add_mask_tokens(build_model("llama", len(tokenizer)), tokenizer, num_tokens=bad)


def test_per_slot_masks_bound_k():
    spec = MTPSpec(mask_token_ids=(10, 11, 12))
    assert spec.mask_ids(2) == [10, 11]
    assert spec.max_decodable_k == 4
    with pytest.raises(ValueError, match="k <= 4; got k=5"):
        spec.mask_ids(4)
    assert MTPSpec(mask_token_ids=(7,)).mask_ids(5) == [7] * 5


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"format_version": 2, "mask_token_ids": [3]}, "format_version is 2"),
        ({"format_version": 1, "mask_token_ids": []}, "non-empty list"),
        ({"format_version": 1, "mask_token_ids": [-1]}, "non-empty list"),
        ({"format_version": 1, "mask_token_ids": [3], "k_max": 0}, "k_max must be"),
        ({"format_version": 1, "mask_token_ids": [500]}, "outside the vocabulary"),
        ("mask", "must be a mapping"),
    ],
)
def test_read_mtp_spec_rejects_bad_blocks(block, message, tokenizer):
    model = build_model("llama", len(tokenizer))
    model.config.mtp = block
    with pytest.raises(ValueError, match=message):
        read_mtp_spec(model)
