"""`mtp-train`: exact resume, the HF export, the prepared checkpoint, losses by name, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, PROMPTS, batch, build_model, build_tokenizer

from mtp_plugins import generate, read_mtp_spec
from train_cli.config import ConfigError, build_config
from train_cli.trainer import Trainer

MTP_TRAIN = str(Path(sys.executable).with_name("mtp-train"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model directory and a local JSONL data file."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"question": f"{CORPUS[i % 4][:50]} ({i})", "answer": CORPUS[(i + 1) % 4]} for i in range(48)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def settings(tiny_run, out, **overrides):
    base = dict(
        model=str(tiny_run / "model"), data=str(tiny_run / "data.jsonl"), prompt_field="question",
        response_field="answer", output_dir=str(out), max_steps=4, seq_len=40, regions=4, k_min=2, k_max=4,
        micro_batch_size=4, grad_accum=2, eval_every=2, eval_rows=8, save_every=2, dtype="fp32", lr=1e-3,
        warmup_steps=2,
    )
    base.update(overrides)
    return build_config(**base)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("loss", ["hard-label", "soft-kl"])
def test_resume_reaches_the_same_weights(loss, tiny_run, tmp_path):
    Trainer(settings(tiny_run, tmp_path / "straight", loss=loss)).run()
    Trainer(settings(tiny_run, tmp_path / "split", loss=loss, max_steps=2)).run()
    Trainer(settings(tiny_run, tmp_path / "split", loss=loss, max_steps=4)).run(resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(s["kind"], s["step"], s.get("k")) for s in steps] == [(s["kind"], s["step"], s.get("k")) for s in straight]


def test_export_is_an_ordinary_hf_model_that_decodes(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Trainer(settings(tiny_run, tmp_path / "out", loss="soft-kl", max_steps=3)).run()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    spec = read_mtp_spec(model)
    assert spec is not None and spec.k_max == 4 and len(spec.mask_token_ids) == 1
    assert not list(out.glob("*.bin")) and not (out / ".export-partial").exists()
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=16)
    verify = generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=16)
    assert torch.equal(ar.sequences, verify.sequences)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_zero_steps_writes_the_prepared_checkpoint(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = Trainer(settings(tiny_run, tmp_path / "out", max_steps=0)).run()
    original = AutoModelForCausalLM.from_pretrained(tiny_run / "model")
    prepared = AutoModelForCausalLM.from_pretrained(out)
    (mask_id,) = read_mtp_spec(prepared).mask_token_ids
    emb, base = prepared.get_input_embeddings().weight, original.get_input_embeddings().weight
    assert torch.equal(emb[:-1], base)
    torch.testing.assert_close(emb[mask_id], base.mean(0))


def test_ground_truth_loads_no_teacher_and_learns(tiny_run, tmp_path):
    trainer = Trainer(settings(tiny_run, tmp_path / "out", loss="ground-truth", max_steps=30, eval_every=30, save_every=30, lr=3e-3))
    trainer.run()
    assert trainer.teacher is None
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [line["loss"] for line in lines if line["kind"] == "train"]
    assert sum(train[-5:]) / 5 < 0.7 * sum(train[:5]) / 5


def test_k_and_offset_are_drawn_independently_and_reproducibly(tiny_run, tmp_path):
    def draws(out, **kw):
        Trainer(settings(tiny_run, out, max_steps=8, eval_every=100, save_every=100, **kw)).run()
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
        return [line["k"] for line in lines], [line["offset"] for line in lines]

    k1, o1 = draws(tmp_path / "a")
    k2, o2 = draws(tmp_path / "b")
    assert (k1, o1) == (k2, o2)
    assert len(set(k1)) > 1 and all(2 <= k <= 4 for k in k1)
    fixed_k, fixed_offsets = draws(tmp_path / "c", k_min=3, k_max=3)
    assert set(fixed_k) == {3} and len(set(fixed_offsets)) > 1  # the grid still moves with k fixed


def test_validation_reports_agreement_by_offset_and_eff_k(tiny_run, tmp_path):
    Trainer(settings(tiny_run, tmp_path / "out", max_steps=0)).run()  # the prepared model: no validation
    Trainer(settings(tiny_run, tmp_path / "out2", max_steps=2, lr=1e-9)).run()
    evals = [json.loads(line) for line in (tmp_path / "out2" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and len(evals[-1]["agreement"]) == 4
    # At a negligible learning rate the student is still the teacher at offset 1 (same weights).
    assert evals[-1]["agreement"][0] == 1.0
    assert all(0.0 <= a <= 1.0 for a in evals[-1]["agreement"])
    assert 1.0 <= evals[-1]["eff_k_tau_0.9"] <= 4.0


def run_cli(*args, cwd=None):
    return subprocess.run([MTP_TRAIN, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_trains_with_a_recipe_and_flags(tiny_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_run / 'model'}\ndata: {tiny_run / 'data.jsonl'}\nprompt-field: question\nresponse_field: answer\n"
        "seq_len: 40\nregions: 4\nk_max: 4\nmicro_batch_size: 4\ndtype: fp32\nmax_steps: 50\n"
    )
    proc = run_cli("--config", str(recipe), "--loss", "soft-kl", "--max-steps", "2", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2  # the flag overrode the recipe's max_steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "sof-kl"], "unknown loss 'sof-kl'; did you mean 'soft-kl'?"),
        (["--k-min", "5", "--k-max", "3"], r"--k-min \(5\) must be <= --k-max \(3\)"),
        (["--seq-len", "12"], "--seq-len 12 is too short for --regions 4 and --k-max 4"),
        (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
        (["--prompt-field", "query"], "--prompt-field 'query': no such field in .*; its fields are question, answer"),
        (["--mask-tokens", "2"], "--mask-tokens 2: per-slot mask tokens need one per slot"),
    ],
)
def test_cli_errors_are_one_clear_line(args, message, tiny_run, tmp_path):
    base = ["--model", str(tiny_run / "model"), "--data", str(tiny_run / "data.jsonl"), "--prompt-field", "question",
            "--response-field", "answer", "--seq-len", "40", "--regions", "4", "--k-max", "4",
            "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    proc = run_cli(*base, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    import re

    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("k_maxx: 3\n", r"unknown settings 'k_maxx' \(did you mean 'k_max'\?\)"),
        ("seq_len: long\n", r"--seq-len must be int; got 'long'"),
        ("template: html\n", "--template must be one of plain, chat, completion; got 'html'"),
        ("- a list\n", "expected a mapping of settings"),
    ],
)
def test_bad_recipes_are_named(yaml_text, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        build_config(recipe)


def test_an_existing_run_is_not_overwritten_without_resume(tiny_run, tmp_path):
    Trainer(settings(tiny_run, tmp_path / "out", max_steps=2)).run()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(settings(tiny_run, tmp_path / "out", max_steps=2)).run()
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        Trainer(settings(tiny_run, tmp_path / "fresh", max_steps=2)).run(resume=True)


def test_per_slot_mask_tokens_and_a_dataset_directory(tiny_run, tmp_path):
    """One mask token per slot; data given as a directory that load_dataset reads like a hub name
    (train + test files), whose test split becomes the held-out rows."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny_run / "data.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (data / "test.jsonl").write_text("\n".join(lines[40:]) + "\n")
    trainer = Trainer(settings(tiny_run, tmp_path / "out", data=str(data), mask_tokens=3, max_steps=2))
    out = trainer.run()
    from transformers import AutoConfig

    spec = read_mtp_spec(AutoConfig.from_pretrained(out))
    assert len(spec.mask_token_ids) == 3 and spec.max_decodable_k == 4
    assert trainer.eval_documents is not trainer.documents and len(trainer.eval_indices) == 8


def test_chat_template_rows_and_lm_eval_loads_the_run_directory(tiny_run, tmp_path):
    from lm_eval.api.registry import get_model
    from transformers import AutoTokenizer

    model_dir = tmp_path / "chat-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "model")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(model_dir)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        (model_dir / f).write_bytes((tiny_run / "model" / f).read_bytes())
    trainer = Trainer(settings(tiny_run, tmp_path / "out", model=str(model_dir), template="chat", max_steps=1, k_max=3))
    out = trainer.run()
    text = trainer.documents.text(0)
    assert text.startswith("<user>") and "<assistant>" in text
    lm = get_model("mtp").create_from_arg_string(f"pretrained={out}", {"device": "cpu"})
    assert (lm.k, lm.strategy) == (3, "confadapt")  # k defaults to the run's k_max


def test_a_token_budget_ends_the_run(tiny_run, tmp_path):
    trainer = Trainer(settings(tiny_run, tmp_path / "out", max_steps=None, max_tokens=500, save_every=100, eval_every=100))
    assert trainer.config.max_steps is None
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert lines[-1]["tokens_seen"] >= 500 and lines[-2]["tokens_seen"] < 500


def test_shipped_recipes_load_by_name():
    from train_cli.config import ConfigError, shipped_recipes

    assert {"smollm2-synthetic", "llama-3.2-1b-metamathqa"} <= set(shipped_recipes())
    for name in shipped_recipes():
        config = build_config(name)
        assert config.k_max >= config.k_min >= 2 and config.seq_len // config.regions >= config.k_max
    demo = build_config("smollm2-synthetic", max_steps=7)
    assert demo.data.startswith("synthetic-gsm") and demo.template == "completion" and demo.max_steps == 7
    with pytest.raises(ConfigError, match="--config no-such-recipe: no such file, and not a shipped recipe .*smollm2-synthetic"):
        build_config("no-such-recipe")


def test_rollouts_are_the_teachers_greedy_answers_and_resume(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_plugins import synthetic
    from train_cli.rollouts import FILE

    out = tmp_path / "out"
    config = settings(tiny_run, out, data="synthetic-gsm:12", prompt_field="prompt", response_field="completion",
                      template="completion", rollouts=3, rollout_shots=2, rollout_max_tokens=10, max_steps=2,
                      eval_every=2, save_every=2, eval_rows=4)
    Trainer(config).run()
    lines = [json.loads(line) for line in (out / FILE).read_text().splitlines()]
    problems = synthetic.problems("train", 12)
    assert [line["prompt"] for line in lines] == [p["prompt"] for p in problems[2:5]]
    # Each response is plain greedy decoding of the frozen model after the two worked examples.
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "model")
    shots = "".join(p["prompt"] + p["completion"] + "\n\n" for p in problems[:2])
    for line in lines:
        ids = tokenizer(shots + line["prompt"], return_tensors="pt").input_ids
        greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
        assert line["completion"] == text.split("\n\n")[0].split("Question:")[0].rstrip()
    # A crash mid-file: the torn line is dropped and only the missing answers are generated again.
    kept = (out / FILE).read_text().splitlines()[:1]
    (out / FILE).write_text(kept[0] + "\n" + '{"prompt": "Quest')
    resumed = settings(tiny_run, tmp_path / "again", data="synthetic-gsm:12", prompt_field="prompt", response_field="completion",
                       template="completion", rollouts=3, rollout_shots=2, rollout_max_tokens=10, max_steps=1, eval_rows=4)
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / FILE).write_text((out / FILE).read_text())
    Trainer(resumed).run()
    assert [json.loads(line) for line in (tmp_path / "again" / FILE).read_text().splitlines()] == lines


def test_training_only_the_mask_embeddings_keeps_every_other_weight(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = Trainer(settings(tiny_run, tmp_path / "out", trainable="mask-embeddings", mask_tokens=3, lr=1e-2, max_steps=3)).run()
    original, trained = weights(tiny_run / "model"), weights(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    mask_ids = list(read_mtp_spec(model).mask_token_ids)
    for name, value in original.items():
        if value.shape == trained[name].shape:
            assert torch.equal(value, trained[name]), name
        else:  # the embedding (and an untied output) grew by the mask rows: the old rows are untouched
            assert torch.equal(value, trained[name][: value.shape[0]]), name
    prepared = Trainer(settings(tiny_run, tmp_path / "prepared", mask_tokens=3, max_steps=0)).run()
    before = weights(prepared)["model.embed_tokens.weight"][mask_ids]
    assert not torch.equal(before, trained["model.embed_tokens.weight"][mask_ids])  # the mask rows learned
