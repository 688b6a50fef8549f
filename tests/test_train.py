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
from train_cli.trainer import EST_EFF_K, Trainer

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
    # A one-pass estimate on the ground-truth text, named for what it is (not decoding's Eff. k).
    assert 1.0 <= evals[-1][EST_EFF_K] <= 4.0 and "eff_k_tau_0.9" not in evals[-1]
    assert EST_EFF_K == "est_eff_k_tau_0.9_one_pass"


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


@pytest.mark.parametrize("vocab", ["teacher-lacks-the-mask-row", "padded-vocabulary"])
def test_the_mask_token_is_never_a_draft_or_a_target(vocab, tiny_run, tmp_path):
    """A student (and a teacher, where it has the mask's row) biased towards the mask token:
    training runs, and no draft fed to the teacher, no target and no validation argmax is a mask id."""
    from train_cli.trainer import NEVER

    tokenizer = build_tokenizer()
    extra = 8 if vocab == "padded-vocabulary" else 0  # rows past the tokenizer: the mask id falls inside them
    model = build_model("llama", len(tokenizer) + extra)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen = {"drafted": set(), "targets": set(), "student_argmax": set()}

    class MaskBiased(Trainer):
        def setup(self, resume=False):
            super().setup(resume)
            mask = list(self.spec.mask_token_ids)

            def favour_mask(module, args, output):
                output = output.clone()
                output[..., [m for m in mask if m < output.shape[-1]]] += 1e3
                seen["student_argmax"].update(output.argmax(-1).flatten().tolist()) if module is self.student.lm_head else None
                return output

            self.student.lm_head.register_forward_hook(favour_mask)
            self.teacher.lm_head.register_forward_hook(favour_mask)
            self.teacher.get_input_embeddings().register_forward_pre_hook(
                lambda module, args: seen["drafted"].update(args[0].flatten().tolist()))
            loss = self.loss_fn

            def recording(student, teacher, targets, weights):
                assert (teacher[:, mask] == NEVER).all()
                seen["targets"].update(teacher.argmax(-1)[weights > 0].tolist())
                return loss(student, teacher, targets, weights)

            self.loss_fn = recording

    trainer = MaskBiased(settings(tiny_run, tmp_path / "out", model=str(tmp_path / "model"), max_steps=2, loss="hard-label"))
    trainer.run()
    mask = set(trainer.spec.mask_token_ids)
    teacher_rows = trainer.teacher.get_input_embeddings().num_embeddings
    assert mask <= seen["student_argmax"]  # the bias works: the student's raw argmax is the mask
    assert seen["drafted"] and not seen["drafted"] & mask and max(seen["drafted"]) < teacher_rows
    assert seen["targets"] and not seen["targets"] & mask
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and all(0.0 <= a <= 1.0 for a in evals[-1]["agreement"])


def test_an_mtp_checkpoint_trained_again_records_this_runs_k_max(tiny_run, tmp_path):
    """k_max is the horizon of the run that wrote the checkpoint (this one's), not the earlier run's."""
    from transformers import AutoConfig

    first = Trainer(settings(tiny_run, tmp_path / "first", max_steps=1, k_max=4)).run()
    assert read_mtp_spec(AutoConfig.from_pretrained(first)).k_max == 4
    for k_max in (8, 3):
        again = Trainer(settings(tiny_run, tmp_path / f"k{k_max}", model=str(first), max_steps=1, k_max=k_max)).run()
        spec = read_mtp_spec(AutoConfig.from_pretrained(again))
        assert spec.k_max == k_max and spec.mask_token_ids == read_mtp_spec(AutoConfig.from_pretrained(first)).mask_token_ids


def test_resume_with_only_the_output_dir_continues_the_recorded_run(tiny_run, tmp_path, monkeypatch):
    """Flags that may change (how long, how it logs) apply; the rest comes from the recorded run, and
    train_config.yaml records the settings that were used."""
    import yaml

    from train_cli.app import main

    out = tmp_path / "out"
    first = ["--model", str(tiny_run / "model"), "--data", str(tiny_run / "data.jsonl"), "--prompt-field", "question",
             "--response-field", "answer", "--seq-len", "40", "--regions", "4", "--k-max", "3", "--lr", "0.002",
             "--dtype", "float32", "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["mtp-train", *first])
    main()
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # another working directory, and the output directory spelled relatively
    monkeypatch.setattr(sys, "argv", ["mtp-train", "--resume", "--output-dir", "out", "--max-steps", "4", "--log-every", "2"])
    main()
    used = yaml.safe_load((out / "train_config.yaml").read_text())
    assert {k: v for k, v in used.items() if k not in ("max_steps", "log_every", "output_dir")} == \
           {k: v for k, v in recorded.items() if k not in ("max_steps", "log_every", "output_dir")}
    assert (used["max_steps"], used["log_every"], used["k_max"], used["lr"], used["dtype"]) == (4, 2, 3, 0.002, "fp32")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [line["step"] for line in lines] == [1, 2, 4] and all(2 <= line["k"] <= 3 for line in lines)
    # The Python API checks its whole config against the record the same way.
    api = dict(model=str(tiny_run / "model"), k_max=3, lr=0.002, max_steps=6)
    with pytest.raises(ConfigError, match=r"^--resume: --eval-rows 8 contradicts the run's recorded --eval-rows 64 "):
        Trainer(settings(tiny_run, out, **api)).run(resume=True)


def test_list_plugins_shows_a_hook_plugins_own_requirement(plugin_dist, capsys, monkeypatch):
    plugin_dist("needy_hook", """
        from mtp_plugins.hooks import HookPluginError, hookimpl

        class Needy:
            opt_in = True

            def require(self):
                raise HookPluginError("needy: set NEEDY_URL to the collector's address (no package is missing)")

            @hookimpl
            def mtp_step_end(self, step, metrics):
                pass

        plugin = Needy()
    """, "[mtp_plugins.hooks]\nneedy = needy_hook:plugin\n", dist="needy-dist")
    monkeypatch.setenv("COLUMNS", "400")
    from train_cli.app import print_plugins

    print_plugins()
    row = next(line for line in capsys.readouterr().out.splitlines() if "needy" in line and "needy-dist" in line)
    assert "set NEEDY_URL to the collector's address (no package is missing)" in row, row
    assert "pip install" not in row, row


def test_the_loss_is_the_uniform_mean_over_every_supervised_position(tiny_run, tmp_path):
    """Micro-batches with different numbers of supervised positions (long rows, short documents):
    the step's loss and update weigh each position alike (METHOD.md section 4), so 2 micro-batches
    of 2 rows equal 1 of 4 rows; a mean of the micro-batches' means would not."""
    from safetensors.torch import load_file

    long_rows = dict(seq_len=160, regions=4, k_min=3, k_max=3, max_steps=1, eval_every=100, save_every=100, warmup_steps=0)

    def step(name, **shape):
        out = Trainer(settings(tiny_run, tmp_path / name, **long_rows, **shape)).run()
        line = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x)
        return line, load_file(str(out / "model.safetensors"))

    (split, a), (whole, b) = step("split", micro_batch_size=2, grad_accum=2), step("whole", micro_batch_size=4, grad_accum=1)
    # The same 4 rows and grid offset, by hand: the uniform mean differs from the mean of the two means.
    probe = Trainer(settings(tiny_run, tmp_path / "probe", **long_rows))
    probe.setup()
    rows = probe.sampler.take(4)
    parts = [probe.forward(probe._layout(probe.documents, part, 3, split["offset"]), train=False) for part in (rows[:2], rows[2:])]
    counts = [3 * int(p.supervised.sum()) for p in parts]
    uniform = sum(p.loss.item() * n for p, n in zip(parts, counts)) / sum(counts)
    assert counts[0] != counts[1] and abs(uniform - sum(p.loss.item() for p in parts) / 2) > 1e-3, counts
    assert split["supervised_positions"] == whole["supervised_positions"] == sum(counts)
    assert split["loss"] == pytest.approx(uniform, rel=1e-5) and whole["loss"] == pytest.approx(uniform, rel=1e-5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("budget", ["steps", "tokens"])
def test_progress_in_a_log_prints_whole_lines_with_an_eta(budget, capsys, monkeypatch):
    """Not a terminal (a log, a pipe): one whole line per 10% of the run, however long, with the
    elapsed time and an ETA; rich wraps nothing at 80 columns."""
    from train_cli import plugins

    now = [0.0]  # the clock: 2 s a step
    monkeypatch.setattr(plugins.time, "monotonic", lambda: now[0])
    monkeypatch.delenv("COLUMNS", raising=False)
    model = "/a/model/directory/" + "deep/" * 30 + "model"
    progress = plugins.Progress()
    total = 20 if budget == "steps" else None
    progress.mtp_train_start(config={"model": model, "max_tokens": None if total else 2000}, output_dir="/runs/" + "x" * 90,
                             start_step=0, total_steps=total)
    for step in range(1, 21):
        now[0] = 2.0 * step
        progress.mtp_step_end(step=step, metrics={"loss": 1.0 / step, "k": 3, "tokens_per_s": 1234.0,
                                                  "tokens": 100, "tokens_seen": 100 * step})
    progress.mtp_validation_end(step=20, metrics={"loss": 0.5, "agreement": [1.0, 0.5] * 20, EST_EFF_K: 1.5})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"mtp-train: {model} -> /runs/{'x' * 90}, " + ("steps 0..20" if total else "until 2000 tokens")
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 10, lines  # a line per 10%
    where = "step 10/20" if total else "step 10, tokens 1000/2000"
    half = next(line for line in steps if line.startswith(where + " "))
    # 2 s a step; by steps the clock starts with the run, by tokens at the first step seen.
    assert half.endswith("elapsed 0:00:20  ETA 0:00:20" if total else "elapsed 0:00:18  ETA 0:00:20"), half
    assert lines[-1].startswith("eval @ 20: loss 0.5000  agreement by offset [1.00 0.50") and lines[-1].endswith(
        "est. Eff. k@0.9 (one pass) 1.50")
