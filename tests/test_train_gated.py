"""`mtp-train --trainable gated-lora`: the base never moves, the adapter export loads everywhere a
checkpoint does, resume is exact, every loss trains, and what the mode cannot do is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import PROMPTS, batch
from safetensors.torch import load_file
from test_train import settings, tiny_run  # noqa: F401  (the fixture)
from transformers import AutoModelForCausalLM

from mtp_plugins import generate, load_checkpoint
from mtp_plugins.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapters_of
from train_cli.config import ConfigError
from train_cli.trainer import Trainer

GATED = dict(trainable="gated-lora", lora_rank=4, lora_alpha=8.0, lr=5e-2)


def _original(tiny_run):
    return AutoModelForCausalLM.from_pretrained(tiny_run / "model", dtype=torch.float32).eval()


@pytest.mark.parametrize("loss", ["hard-label", "soft-kl", "ground-truth"])
def test_a_gated_run_learns_the_mask_slots_and_leaves_the_base_exact(loss, tiny_run, tmp_path):
    out = Trainer(settings(tiny_run, tmp_path / "out", loss=loss, **GATED)).run()
    assert (out / ADAPTER_CONFIG).is_file() and not (out / "config.json").exists()
    record = json.loads((out / ADAPTER_CONFIG).read_text())
    assert record["base"]["name_or_path"] == str(tiny_run / "model") and len(record["base"]["weights_sha256"]) == 64
    assert (record["rank"], record["alpha"], record["gate"], record["mtp"]["k_max"]) == (4, 8.0, "mask-token", 4)
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.endswith("mtp_lora_B"))  # it learnt
    model, tokenizer, spec = load_checkpoint(out, dtype=torch.float32)
    assert adapters_of(model) is not None and spec.k_max == 4
    original = _original(tiny_run)
    ids, mask = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        assert torch.equal(model(ids, attention_mask=mask).logits[..., : want.shape[-1]], want)
    expected = original.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=1)
    for strategy in ("ar", "verify"):
        assert torch.equal(generate(model, ids, mask, strategy=strategy, k=4, max_new_tokens=16).sequences, expected)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [1, 2, 3, 4]


def test_the_adapter_is_a_few_per_cent_of_the_base(tiny_run, tmp_path):
    out = Trainer(settings(tiny_run, tmp_path / "out", max_steps=1, **GATED)).run()
    adapter = (out / ADAPTER_WEIGHTS).stat().st_size
    base = (tiny_run / "model" / "model.safetensors").stat().st_size
    assert adapter < 0.25 * base  # the tiny test model is nearly all embedding; SmolLM2: README
    step = out / "checkpoints" / "step-0000001"
    assert (step / ADAPTER_WEIGHTS).is_file() and not (step / "model.safetensors").exists()


def test_gated_resume_reaches_the_same_adapter(tiny_run, tmp_path):
    Trainer(settings(tiny_run, tmp_path / "straight", **GATED)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=2, **GATED)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=4, **GATED)).run(resume=True)
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("straight", "split"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_full_export_is_the_exact_base_to_other_tools(tiny_run, tmp_path):
    out = Trainer(settings(tiny_run, tmp_path / "out", max_steps=2, export="full", **GATED)).run()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert adapters_of(plain) is None
    original = _original(tiny_run)
    model, tokenizer, _ = load_checkpoint(out, dtype=torch.float32)
    ids, mask = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        assert torch.equal(plain(ids, attention_mask=mask).logits[..., : want.shape[-1]], want)
    assert adapters_of(model) is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"prefix_loss_weight": 0.5}, r"--prefix-loss-weight 0.5 does nothing with --trainable gated-lora"),
     ({"activation_checkpointing": True}, r"--activation-checkpointing is not for --trainable gated-lora"),
     ({"lora_rank": 0}, r"--lora-rank must be >= 1, got 0"),
     ({"lora_alpha": float("nan")}, r"--lora-alpha must be a finite number"),
     ({"lora_targets": " , "}, r"--lora-targets: .*name at least one projection")],
)
def test_what_gated_lora_cannot_do_is_refused(overrides, message, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=message):
        settings(tiny_run, tmp_path / "out", **{**GATED, **overrides})


def test_export_full_is_only_for_gated_lora(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=r"--export full is for --trainable gated-lora"):
        settings(tiny_run, tmp_path / "out", export="full")


def test_gated_rollouts_are_the_original_models_greedy_answers(tiny_run, tmp_path):
    from mtp_plugins import synthetic
    from train_cli.rollouts import FILE

    out = tmp_path / "out"
    Trainer(settings(tiny_run, out, data="synthetic-gsm:12", prompt_field="prompt", response_field="completion",
                     template="completion", rollouts=2, rollout_shots=2, rollout_max_tokens=10, max_steps=1,
                     eval_rows=4, **GATED)).run()
    lines = [json.loads(line) for line in (out / FILE).read_text().splitlines()]
    problems = synthetic.problems("train", 12)
    original = _original(tiny_run)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "model")
    shots = "".join(p["prompt"] + p["completion"] + "\n\n" for p in problems[:2])
    for line in lines:  # generated by the student with the gate off: the base model, no teacher copy
        ids = tokenizer(shots + line["prompt"], return_tensors="pt").input_ids
        greedy = original.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
        assert line["completion"] == text.split("\n\n")[0].split("Question:")[0].rstrip()


def _rows_in(tokenizer, ids):
    """The data rows (by their "(i)" marker) whose text a context shows."""
    import re

    return [int(m) for m in re.findall(r"\((\d+)\)", tokenizer.decode(ids))]


def test_context_shots_put_training_rows_before_every_document(tiny_run, tmp_path):
    trainer = Trainer(settings(tiny_run, tmp_path / "out", context_shots=2, **GATED))
    trainer.setup()
    context = trainer._step_context()
    shown = _rows_in(trainer.tokenizer, context)
    assert len(set(shown)) == 2 and not set(shown) & set(trainer.eval_indices)  # never a held-out row
    assert trainer._step_context() == context  # a function of the step: a resumed run draws the same
    trainer.step = 7
    assert _rows_in(trainer.tokenizer, trainer._step_context()) != shown  # drawn afresh each step
    assert _rows_in(trainer.tokenizer, trainer.eval_context) == trainer.example_pool[:2]  # validation: fixed
    layout = trainer._layout(trainer.documents, [0, 1], 3, 0, context)
    assert (layout.input_ids[:, : len(context)] == torch.tensor(context)).all()
    assert (layout.supervised_columns >= len(context)).all()
    # The document after the context is the row's text without the tokenizer's leading special tokens.
    doc = trainer.documents.tokens([0], 10, special_tokens=False)[0]
    assert layout.input_ids[0, len(context) : len(context) + 5].tolist() == doc[:5]


def test_follow_example_puts_a_blank_line_and_a_training_row_after_every_document(tiny_run, tmp_path):
    trainer = Trainer(settings(tiny_run, tmp_path / "out", context_shots=1, follow_example=True, **GATED))
    trainer.setup()
    after = trainer._follow(4, 0)
    assert all(a.startswith("\n\n") for a in after) and len(after) == 4
    followed = {r for a in after for r in _rows_in(trainer.tokenizer, trainer.tokenizer(a).input_ids)}
    assert followed and not followed & set(trainer.eval_indices)  # never a held-out row
    assert trainer._follow(4, 0) == after  # a function of the step: a resumed run draws the same
    assert trainer._follow(4, 1) != after or trainer._follow(4, 2) != after  # each micro-batch its own
    # Validation: fixed rows, the pool's after its context's.
    assert [_rows_in(trainer.tokenizer, trainer.tokenizer(a).input_ids) for a in trainer._follow(2, None)] == \
        [[trainer.example_pool[1]], [trainer.example_pool[2]]]
    # The document and what follows it, tokenized together, in place of EOS.
    eos = trainer.tokenizer.eos_token_id
    text = trainer.documents.text(0) + after[0]
    ids = trainer.documents.tokens([0], 1000, special_tokens=False, after=after[:1])[0]
    assert ids == trainer.tokenizer(text, add_special_tokens=False).input_ids and eos not in ids
    plain = trainer.documents.tokens([0], 1000, special_tokens=False)[0]
    assert plain[-1] == eos and ids[: len(plain) - 1] == plain[:-1]
    # The layout supervises targets past the document's end (the separator and the next row).
    context = trainer._step_context()
    layout = trainer._layout(trainer.documents, [0], 3, 0, context, after[:1])
    bare = trainer._layout(trainer.documents, [0], 3, 0, context)
    assert layout.supervised.sum() >= bare.supervised.sum()
    assert (layout.input_ids[0, : len(context)] == torch.tensor(context)).all()


def test_follow_example_trains_and_resumes_exactly(tiny_run, tmp_path):
    extra = {**GATED, "follow_example": True}
    Trainer(settings(tiny_run, tmp_path / "straight", **extra)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=2, **extra)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=4, **extra)).run(resume=True)
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("trainable", ["gated-lora", "all"])
def test_a_run_with_context_shots_resumes_to_the_same_weights(trainable, tiny_run, tmp_path):
    extra = {**GATED, "trainable": trainable, "lr": 1e-3 if trainable == "all" else GATED["lr"], "context_shots": 1}
    Trainer(settings(tiny_run, tmp_path / "straight", **extra)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=2, **extra)).run()
    Trainer(settings(tiny_run, tmp_path / "split", max_steps=4, **extra)).run(resume=True)
    name = ADAPTER_WEIGHTS if trainable == "gated-lora" else "model.safetensors"
    a, b = (load_file(str(tmp_path / d / name)) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


@pytest.mark.parametrize(("value", "message"), [(-1, r"--context-shots must be >= 0, got -1"),
                                                 (60, r"--context-shots 60: only \d+ training rows to draw examples from")])
def test_bad_context_shots_are_refused(value, message, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Trainer(settings(tiny_run, tmp_path / "out", context_shots=value, **GATED)).setup()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_teacher_temperature_divides_the_teachers_logits_before_the_loss(tiny_run, tmp_path, monkeypatch):
    from mtp_plugins.losses import SoftKL

    seen = []
    original_call = SoftKL.__call__

    def spy(self, student, teacher, targets, weights):
        seen.append(teacher.detach().clone())
        return original_call(self, student, teacher, targets, weights)

    monkeypatch.setattr(SoftKL, "__call__", spy)
    firsts = {}
    for temperature in (1.0, 0.5):
        seen.clear()
        out = Trainer(settings(tiny_run, tmp_path / str(temperature), loss="soft-kl", max_steps=1, eval_rows=4,
                               teacher_temperature=temperature, **GATED)).run()
        firsts[temperature] = seen[0]
        recorded = (out / "train_config.yaml").read_text()
        assert f"teacher_temperature: {temperature}" in recorded
    assert torch.equal(firsts[0.5], firsts[1.0] / 0.5)


@pytest.mark.parametrize(("loss", "temperature", "message"), [
    ("ground-truth", 0.7, r"--teacher-temperature 0.7 does nothing with --loss ground-truth: it uses no teacher"),
    ("soft-kl", 0.0, r"--teacher-temperature must be .*got 0.0"),
    ("soft-kl", float("inf"), r"--teacher-temperature must be .*got inf"),
])
def test_a_teacher_temperature_that_cannot_work_is_refused(loss, temperature, message, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Trainer(settings(tiny_run, tmp_path / "out", loss=loss, teacher_temperature=temperature, **GATED))
