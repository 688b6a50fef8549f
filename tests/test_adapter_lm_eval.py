"""A gated adapter checkpoint in lm-eval: ``--model mtp pretrained=ADAPTER`` answers and scores as
``--model hf pretrained=ORIGINAL`` wherever its contract says so (float32, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from test_lm_eval import GEN, TINY_MC, assert_same_loglikelihoods, evaluate, responses

from mtp_plugins import add_mask_tokens, load_checkpoint
from mtp_plugins.adapter_checkpoint import save_adapter, weights_hash
from mtp_plugins.adapters import AdapterSettings, attach_gated_lora


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoints, tmp_path_factory):
    """A gated adapter (random, non-zero) on the tiny ``plain`` checkpoint, saved as mtp-train does."""
    base = tiny_checkpoints["plain"]
    model, tokenizer, _ = load_checkpoint(base, dtype=torch.float32)
    spec = add_mask_tokens(model, tokenizer, k_max=4)
    adapters = attach_gated_lora(model, spec.mask_token_ids, AdapterSettings(rank=4))
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(out, model, tokenizer, base=str(base), base_hash=weights_hash(str(base)))
    return out


@pytest.mark.parametrize("mtp_args", ["strategy=ar", "strategy=verify,k=4", "strategy=verify,k=4,cache=static"])
def test_the_adapters_lossless_answers_equal_the_original_models(mtp_args, adapter_dir, tiny_checkpoints):
    hf = evaluate("hf", f"pretrained={tiny_checkpoints['plain']}", ["gsm8k"], limit=4, batch_size=2, gen_kwargs=GEN)
    mtp = evaluate("mtp", f"pretrained={adapter_dir},{mtp_args}", ["gsm8k"], limit=4, batch_size=2, gen_kwargs=GEN)
    assert responses(mtp, "gsm8k") == responses(hf, "gsm8k")
    assert mtp["config"]["mtp"]["samples"] == 4


def test_mask_slots_decode_through_the_adapter(adapter_dir):
    out = evaluate("mtp", f"pretrained={adapter_dir},strategy=static", ["gsm8k"], limit=2, batch_size=2, gen_kwargs=GEN)
    stats = out["config"]["mtp"]
    assert (stats["strategy"], stats["k"]) == ("static", 4)  # k from the adapter's recorded k_max
    assert stats["eff_k"] > 1.0


def test_the_adapters_log_likelihoods_equal_the_original_models(adapter_dir, tiny_checkpoints, tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "tiny_mc.jsonl"
    rows = [{"question": "2 + 3 = ?", "choices": ["5", "6", "23"], "label": 0},
            {"question": "How many eggs?", "choices": ["16 eggs", "three", "9"], "label": 2}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(TINY_MC.format(data=data))
    manager = TaskManager(include_path=str(tmp_path))
    hf = evaluate("hf", f"pretrained={tiny_checkpoints['plain']}", ["tiny_mc"], task_manager=manager, batch_size=2)
    mtp = evaluate("mtp", f"pretrained={adapter_dir}", ["tiny_mc"], task_manager=manager, batch_size=2)
    assert_same_loglikelihoods(mtp, hf, "tiny_mc")


def test_base_model_arg_names_the_base_and_is_refused_for_full_models(adapter_dir, tiny_checkpoints):
    from mtp_plugins.lm_eval.model import MTPArgumentError

    with pytest.raises(MTPArgumentError, match=r"gated adapter for .*plain.*but .*mtp has other weights"):
        evaluate("mtp", f"pretrained={adapter_dir},base={tiny_checkpoints['mtp']}", ["gsm8k"], limit=1)
    with pytest.raises(MTPArgumentError, match=r"base= is only for gated adapter checkpoints"):
        evaluate("mtp", f"pretrained={tiny_checkpoints['mtp']},base={tiny_checkpoints['plain']}", ["gsm8k"], limit=1)


def test_the_sweep_takes_an_adapter_and_its_recorded_base(adapter_dir, tiny_checkpoints, tmp_path):
    import shutil

    import yaml
    from test_sweep import sweep, table

    run = tmp_path / "adapter"
    shutil.copytree(adapter_dir, run)
    (run / "train_config.yaml").write_text(yaml.safe_dump({"model": str(tiny_checkpoints["plain"])}))  # as mtp-train writes it
    out = tmp_path / "sweep"
    proc = sweep(str(run), "--task", "gsm8k", "--limit", "2", "--taus", "0.9", "--static", "none", "--batch-size", "2",
                 "--dtype", "float32", "--max-gen-toks", "16", "--out", str(out), "--timing-repeats", "0",
                 "--verify-lookup", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table((out / "report.md").read_text())
    assert list(rows) == ["hf", "ar", "verify", "confadapt-tau0.9"]
    assert rows["verify"]["answers = ar"] == "2/2" and rows["verify"]["lossless by contract"] == "yes"
    assert rows["ar"]["answers = hf"] == "2/2" and rows["ar"]["texts = hf"] == "2/2"  # the original model's, exactly
