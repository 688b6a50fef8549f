"""The bad-input matrix (docs/reliability.md): every bad lm-eval model_arg, ``mtp-train`` flag, data
file and recipe is refused with one message that names the input and what is allowed, a non-zero
exit without a traceback from the command-line tools, and no output left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets  # noqa: F401  (imported here, its log handler writes to the session's stderr, not one test's)
import pytest
import torch
from conftest import CORPUS, build_model, build_tokenizer

from mtp_plugins import add_mask_tokens
from train_cli.config import build_config
from train_cli.trainer import Trainer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny checkpoints, good and broken, and training data files, good and broken."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("bad-input")
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    add_mask_tokens(model, tokenizer)
    for name in ("mtp", "bad-mask", "no-weights", "corrupt", "truncated", "pickle"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    config = json.loads((root / "bad-mask" / "config.json").read_text())
    config["mtp"]["mask_token_ids"] = [config["vocab_size"] + 5]
    (root / "bad-mask" / "config.json").write_text(json.dumps(config))
    (root / "no-weights" / "model.safetensors").unlink()
    (root / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file " * 8)
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    torch.save(load_file(str(root / "pickle" / "model.safetensors")), root / "pickle" / "pytorch_model.bin")
    (root / "pickle" / "model.safetensors").unlink()

    rows = [{"question": f"{CORPUS[i % 4][:50]} ({i})", "answer": CORPUS[(i + 1) % 4]} for i in range(24)]
    lines = [json.dumps(r) for r in rows]
    data = {
        "good.jsonl": "\n".join(lines) + "\n",
        "empty.jsonl": "",
        "blank.jsonl": "\n \n\n",
        "empty-rows.jsonl": "".join(
            json.dumps({"question": q, "answer": a}) + "\n" for q, a in [("", ""), (None, " "), ("  ", None)] * 4
        ),
        "bad-json.jsonl": lines[0] + "\n" + '{"question": "a", "answer": \n',
        "not-objects.jsonl": "[1, 2]\n[3, 4]\n",
        "rows.csv": "question,answer\na,b\n",
        "long.jsonl": "".join(json.dumps({"question": "words " * 3000, "answer": "more " * 3000}) + "\n" for _ in range(12)),
        # recipes
        "unknown-key.yaml": "k_maxx: 3\nseq-len: 40\n",
        "wrong-type.yaml": "warmup_steps: soon\n",
        "wrong-bool.yaml": "trust_remote_code: 'yes'\n",
        "wrong-choice.yaml": "schedule: linear\n",
        "a-list.yaml": "- k_max: 3\n",
        "not-yaml.yaml": "k_max: [3\n",
        "python-tag.yaml": "k_max: !!python/object/apply:os.getpid []\n",
        "lr-inf.yaml": "lr: .inf\n",
        "grad-clip-nan.yaml": "grad_clip: .nan\n",
        "beta1-one.yaml": "adam_beta1: 1.0\n",
        "beta2-negative.yaml": "adam_beta2: -0.5\n",
        "beta1-other.yaml": "adam_beta1: 0.8\n",
        "warmup-inf.yaml": "warmup_steps: .inf\n",
        # text fields that are not text, and JSON objects
        "list-field.jsonl": "".join(json.dumps({"question": ["a", "b"], "answer": "c"}) + "\n" for _ in range(6)),
        "object-field.jsonl": "".join(json.dumps({"question": "a", "answer": {"text": "c"}}) + "\n" for _ in range(6)),
        "mixed-field.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:2] + [{"question": [1, 2], "answer": "c"}] + rows[2:6]),
        "columns.json": json.dumps({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}),
        "ragged-columns.json": json.dumps({"question": [r["question"] for r in rows], "answer": "one answer"}),
    }
    for name, text in data.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.jsonl").write_bytes((lines[0] + "\n").encode() + '{"question": "café", "answer": "b"}\n'.encode("latin-1"))
    (root / "cut-utf8.jsonl").write_bytes((lines[0] + "\n").encode() + '{"question": "caf'.encode() + "é".encode()[:1])
    return root


def no_files(directory: Path) -> list[str]:
    """What a refused command left in ``directory`` (nothing, if it kept its word)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


# ------------------------------------------------------------------------------------------ lm-eval


def cases(*rows: tuple) -> list:
    """Table rows ``(id, *values)`` as pytest parameters named by their id."""
    return [pytest.param(*values, id=name) for name, *values in rows]


@pytest.mark.parametrize(
    ("checkpoint", "args", "message"),
    cases(
        ("k-zero", "mtp", "k=0", r"model_args k=0 is not allowed: k must be an integer >= 1 \(or left out\)"),
        ("k-negative", "mtp", "k=-3", r"model_args k=-3 is not allowed: k must be an integer >= 1"),
        ("k-not-an-int", "mtp", "k=two", r"model_args k='two' is not allowed: k must be an integer >= 1"),
        ("tau-zero", "mtp", "tau=0", r"model_args tau=0 is not allowed: tau must be a number in \(0, 1\]"),
        ("tau-above-1", "mtp", "tau=1.5", r"model_args tau=1.5 is not allowed: tau must be a number in \(0, 1\]"),
        ("tau-negative", "mtp", "tau=-0.2", r"model_args tau=-0.2 is not allowed: tau must be a number in \(0, 1\]"),
        ("strategy-typo", "mtp", "strategy=confadap",
         r"model_args strategy='confadap' is not allowed: unknown decoder 'confadap'; did you mean 'confadapt'\? "
         r"available: ar, confadapt, static, verify"),
        ("strategy-unknown", "mtp", "strategy=beam",
         r"model_args strategy='beam' is not allowed: unknown decoder 'beam' available: ar, confadapt, static, verify"),
        ("report-to-unknown", "mtp", "report_to=nope", r"model_args report_to='nope' is not allowed: .*'nope'"),
        ("allow-pickle-not-bool", "mtp", "allow_pickle=maybe",
         r"model_args allow_pickle='maybe' is not allowed: use true or false"),
        ("use-safetensors-given", "mtp", "use_safetensors=False",
         r"model_args use_safetensors is not an argument of --model mtp: weights load from safetensors only; "
         r"pass allow_pickle=true to allow pickle weights"),
        ("no-mask-token", "plain", "",
         r"strategy=confadapt with k=8 needs an MTP checkpoint, but .*plain has no mask token .*pass strategy=ar or k=1"),
        ("mask-id-outside-vocab", "bad-mask", "",
         r"model_args pretrained: .*bad-mask: config.mtp.mask_token_ids \[\d+\] lie outside the vocabulary: "
         r"token ids must be < \d+ \(its vocab_size\)"),
        ("no-weights-file", "no-weights", "",
         r"model_args pretrained: cannot load .*no-weights: it has no weights file \(model.safetensors"),
        ("corrupt-weights", "corrupt", "",
         r"model_args pretrained: cannot load .*corrupt: a safetensors weights file is corrupt or incomplete \(.*header"),
        ("truncated-weights", "truncated", "",
         r"model_args pretrained: cannot load .*truncated: a safetensors weights file is corrupt or incomplete"),
        ("pickle-only-weights", "pickle", "",
         r"cannot load .*pickle: its weights are only pickle files \(pytorch_model.bin\), and unpickling can run "
         r"arbitrary code; convert them to safetensors .* or allow pickle weights with model_args allow_pickle=true"),
        ("no-such-directory", "missing", "", r"model_args pretrained: cannot load .*missing: no such directory"),
    ),
)
def test_bad_model_args_are_refused_with_one_message(checkpoint, args, message, files, tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError

    monkeypatch.chdir(tmp_path)
    model_args = ",".join(a for a in (f"pretrained={files / checkpoint}", args) if a)
    with pytest.raises(MTPArgumentError) as raised:
        get_model("mtp").create_from_arg_string(model_args, {"device": "cpu"})
    assert re.search(message, str(raised.value)), str(raised.value)
    assert "\n" not in str(raised.value)
    assert no_files(tmp_path) == []


def test_sampling_with_a_greedy_only_strategy_is_refused_before_generating(files, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError

    stats = tmp_path / "stats.jsonl"
    model_args = f"pretrained={files / 'mtp'},strategy=verify,k=3,stats_path={stats}"
    lm = get_model("mtp").create_from_arg_string(model_args, {"device": "cpu"})

    def request(doc_id: int, **gen_kwargs) -> Instance:
        return Instance("generate_until", {}, ("Q: hello world", {"until": ["\n"], "max_gen_toks": 3, **gen_kwargs}), doc_id,
                        metadata=("toy_task", doc_id, 1))

    with pytest.raises(MTPArgumentError, match=r"model_args strategy=verify decodes greedily, but task toy_task asks for "
                       r"sampling \(do_sample=True, temperature=0.7\); use strategy=confadapt, static or ar, or "
                       r"--gen_kwargs do_sample=false"):
        lm.generate_until([request(0), request(1, do_sample=True, temperature=0.7)])
    assert not stats.exists()  # nothing was generated, so no statistics file either
    # lm-eval's convention: temperature 0 means greedy, which verify serves.
    assert len(lm.generate_until([request(2, do_sample=True, temperature=0.0)])) == 1


def test_the_fallback_cli_prints_one_line_and_writes_nothing(files, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "mtp-lm-eval"), "--model", "mtp", "--model_args", f"pretrained={files / 'pickle'}", "--tasks", "synthetic_gsm",
         "--limit", "1", "--device", "cpu", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"mtp-lm-eval: error: model_args pretrained: cannot load .*pickle: its weights are only pickle "
                        r"files .* allow_pickle=true", last), last
    assert no_files(out) == []


# ------------------------------------------------------------------------------------------ mtp-train


TRAIN_BASE = ["--prompt-field", "question", "--response-field", "answer", "--seq-len", "40", "--regions", "4",
              "--k-max", "4", "--micro-batch-size", "2", "--eval-rows", "2", "--dtype", "fp32", "--max-steps", "1"]
ERROR = "mtp-train: error: "


@pytest.mark.parametrize(
    ("args", "message"),
    cases(
        # flags
        ("k-min-above-k-max", ["--k-min", "5", "--k-max", "3"], ERROR + r"--k-min \(5\) must be <= --k-max \(3\)"),
        ("k-max-zero", ["--k-max", "0"], ERROR + r"--k-max must be >= 1, got 0"),
        ("seq-len-too-short", ["--seq-len", "12"],
         ERROR + r"--seq-len 12 is too short for --regions 4 and --k-max 4: each region needs k_max - 1 mask slots "
                 r"plus a real token \(seq_len >= 16\)"),
        ("loss-unknown", ["--loss", "sof-kl"], ERROR + r"unknown loss 'sof-kl'; did you mean 'soft-kl'\? available: .*hard-label"),
        ("lr-zero", ["--lr", "0"], ERROR + r"--lr must be a finite number > 0, got 0.0"),
        ("k-max-not-an-int", ["--k-max", "four"], r"Error: Invalid value for '--k-max': Input should be a valid integer"),
        ("template-unknown", ["--template", "html"],
         r"Error: Invalid value for '--template': .*'html' is not one of 'plain', 'chat', 'completion'"),
        ("device-unknown", ["--device", "gpu0"], ERROR + r"--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
        ("device-meta", ["--device", "meta"], ERROR + r"--device 'meta' is not a device; use auto, cpu, cuda or cuda:N"),
        ("device-gpu-missing", ["--device", "cuda:99"],
         ERROR + r"--device cuda:99: (this PyTorch is built without CUDA|no CUDA GPU is visible|this machine has \d+ CUDA "
                 r"GPU\(s\), cuda:0\.\.cuda:\d+)"),
        *([("device-cuda-unavailable", ["--device", "cuda"],
            ERROR + r"--device cuda: (this PyTorch is built without CUDA|no CUDA GPU is visible); use --device cpu \(or auto\)")]
          if not torch.cuda.is_available() else []),
        # numbers that would train a broken model
        ("lr-inf", ["--lr", "inf"], ERROR + r"--lr must be a finite number > 0, got inf"),
        ("lr-nan", ["--lr", "nan"], ERROR + r"--lr must be a finite number > 0, got nan"),
        ("grad-clip-nan", ["--grad-clip", "nan"], ERROR + r"--grad-clip must be a finite number > 0, got nan"),
        ("grad-clip-negative", ["--grad-clip", "-1"], ERROR + r"--grad-clip must be a finite number > 0, got -1.0"),
        ("grad-clip-zero", ["--grad-clip", "0"], ERROR + r"--grad-clip must be a finite number > 0, got 0.0"),
        ("weight-decay-nan", ["--weight-decay", "nan"], ERROR + r"--weight-decay must be a finite number >= 0, got nan"),
        ("weight-decay-negative", ["--weight-decay", "-0.1"], ERROR + r"--weight-decay must be a finite number >= 0, got -0.1"),
        ("prefix-weight-inf", ["--prefix-loss-weight", "inf"],
         ERROR + r"--prefix-loss-weight must be a finite number >= 0, got inf"),
        ("prefix-weight-negative", ["--prefix-loss-weight", "-1"],
         ERROR + r"--prefix-loss-weight must be a finite number >= 0, got -1.0"),
        ("entropy-weight-nan", ["--entropy-weight", "nan"], ERROR + r"--entropy-weight must be a finite number, got nan"),
        ("beta1-one", ["--adam-beta1", "1"], ERROR + r"--adam-beta1 must be a number in \[0, 1\), got 1.0"),
        ("beta2-nan", ["--adam-beta2", "nan"], ERROR + r"--adam-beta2 must be a number in \[0, 1\), got nan"),
        ("seed-too-large", ["--seed", str(2**64)],
         ERROR + r"--seed must be an integer in \[0, 2\*\*64 - 1\] \(torch's seed range\), got 18446744073709551616"),
        ("seed-negative", ["--seed", "-1"], ERROR + r"--seed must be an integer in \[0, 2\*\*64 - 1\]"),
        # the run directory
        ("output-dir-empty", ["--output-dir", ""],
         ERROR + r"--output-dir '': give the run's directory \(a new one, or a run's to --resume\)"),
        ("output-dir-a-file", ["--output-dir", "{root}/good.jsonl"],
         ERROR + r"--output-dir .*good.jsonl: is a file; give a directory \(a new one, or a run's to --resume\)"),
        ("output-dir-under-a-file", ["--output-dir", "{root}/good.jsonl/run"],
         ERROR + r"--output-dir .*good.jsonl/run: .*good.jsonl is a file, so no directory can be made under it"),
        ("output-dir-not-writable", ["--output-dir", "{unwritable}/run"],
         ERROR + r"--output-dir .*/run: cannot write in .* \((Permission denied|Operation not permitted)\); "
                 r"give a writable directory"),
        ("report-to-unknown", ["--report-to", "nope"], ERROR + r".*'nope'"),
        # data files
        ("data-missing", ["--data", "{root}/missing.jsonl"], ERROR + r"--data .*missing.jsonl: no such file"),
        ("data-csv", ["--data", "{root}/rows.csv"],
         ERROR + r"--data .*rows.csv: unsupported file type; use one of .jsonl, .json, .parquet"),
        ("field-missing", ["--prompt-field", "query"],
         ERROR + r"--prompt-field 'query': no such field in .*good.jsonl; its fields are question, answer"),
        ("data-empty-file", ["--data", "{root}/empty.jsonl"], ERROR + r"--data .*empty.jsonl: the file is empty \(no rows\)"),
        ("data-blank-lines", ["--data", "{root}/blank.jsonl"], ERROR + r"--data .*blank.jsonl: the file is empty \(no rows\)"),
        ("data-empty-rows", ["--data", "{root}/empty-rows.jsonl"],
         ERROR + r"--data .*empty-rows.jsonl: every row has an empty 'question' and 'answer'; nothing to train on"),
        ("data-latin1", ["--data", "{root}/latin1.jsonl"],
         ERROR + r"--data .*latin1.jsonl: line 2 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
        ("data-cut-utf8", ["--data", "{root}/cut-utf8.jsonl"],
         ERROR + r"--data .*cut-utf8.jsonl: line 2 is not UTF-8 text \(byte 0xc3\); save the file as UTF-8"),
        ("data-bad-json-line", ["--data", "{root}/bad-json.jsonl"],
         ERROR + r"--data .*bad-json.jsonl: cannot read it as json \(line 2 is not valid JSON: Expecting value at column 28\)"),
        ("data-not-objects", ["--data", "{root}/not-objects.jsonl"],
         ERROR + r"--data .*not-objects.jsonl: cannot read it as json \(line 1 is a JSON list, not an object of fields\)"),
        ("data-list-in-a-text-field", ["--data", "{root}/list-field.jsonl"],
         ERROR + r"--data .*list-field.jsonl: row 1, field 'question' \(--prompt-field\) holds a list, not text; "
                 r"each row's prompt and response must be text"),
        ("data-object-in-a-text-field", ["--data", "{root}/object-field.jsonl"],
         ERROR + r"--data .*object-field.jsonl: row 1, field 'answer' \(--response-field\) holds an object, not text"),
        ("data-a-list-in-row-3", ["--data", "{root}/mixed-field.jsonl"],
         ERROR + r"--data .*mixed-field.jsonl: row 3, field 'question' \(--prompt-field\) holds a list, not text"),
        ("data-json-object-not-columns", ["--data", "{root}/ragged-columns.json"],
         ERROR + r"--data .*ragged-columns.json: a JSON object must hold columns, each field a list of values of one "
                 r"length \(or give a list of rows, or JSON Lines\); found \{'question': list of 24, 'answer': str\}"),
        # models
        ("model-missing", ["--model", "{root}/missing"], ERROR + r"cannot load .*missing: no such directory"),
        ("model-no-weights", ["--model", "{root}/no-weights"], ERROR + r"cannot load .*no-weights: it has no weights file"),
        ("model-corrupt-weights", ["--model", "{root}/corrupt"],
         ERROR + r"cannot load .*corrupt: a safetensors weights file is corrupt or incomplete"),
        ("model-pickle-only", ["--model", "{root}/pickle"],
         ERROR + r"cannot load .*pickle: its weights are only pickle files \(pytorch_model.bin\).* or allow pickle weights "
                 r"with --allow-pickle"),
        ("model-mask-id-outside-vocab", ["--model", "{root}/bad-mask"],
         ERROR + r".*bad-mask: config.mtp.mask_token_ids \[\d+\] lie outside the vocabulary: token ids must be < \d+"),
        ("mask-tokens-contradict-the-model", ["--model", "{root}/mtp", "--mask-tokens", "3"],
         ERROR + r"--mask-tokens 3: .*mtp is an MTP checkpoint with 1 mask token\(s\) \(config.mtp.mask_token_ids "
                 r"\[\d+\]\); use --mask-tokens 1"),
        # recipes
        ("recipe-unknown-key", ["--config", "{root}/unknown-key.yaml"],
         ERROR + r"--config .*unknown-key.yaml: unknown settings 'k_maxx' \(did you mean 'k_max'\?\)"),
        ("recipe-wrong-type", ["--config", "{root}/wrong-type.yaml"], ERROR + r"--warmup-steps must be int; got 'soon' \(str\)"),
        ("recipe-wrong-bool", ["--config", "{root}/wrong-bool.yaml"],
         ERROR + r"--trust-remote-code must be bool; got 'yes' \(str\)"),
        ("recipe-wrong-choice", ["--config", "{root}/wrong-choice.yaml"],
         ERROR + r"--schedule must be one of constant, cosine; got 'linear'"),
        ("recipe-a-list", ["--config", "{root}/a-list.yaml"],
         ERROR + r"--config .*a-list.yaml: expected a mapping of settings, got list"),
        ("recipe-not-yaml", ["--config", "{root}/not-yaml.yaml"],
         ERROR + r"--config .*not-yaml.yaml: not valid YAML at line 2, column 1 \(expected ',' or '\]', but got '<stream end>'\)"),
        ("recipe-python-tag", ["--config", "{root}/python-tag.yaml"],
         ERROR + r"--config .*python-tag.yaml: not valid YAML at line 1, column 8 \(could not determine a constructor for "
                 r"the tag 'tag:yaml.org,2002:python/object/apply:os.getpid'\)"),
        ("recipe-missing", ["--config", "{root}/missing.yaml"],
         ERROR + r"--config .*missing.yaml: no such file, and not a shipped recipe \(.*smollm2-synthetic"),
        ("recipe-lr-inf", ["--config", "{root}/lr-inf.yaml"], ERROR + r"--lr must be a finite number > 0, got inf"),
        ("recipe-grad-clip-nan", ["--config", "{root}/grad-clip-nan.yaml"], ERROR + r"--grad-clip must be a finite number > 0, got nan"),
        ("recipe-beta1-one", ["--config", "{root}/beta1-one.yaml"], ERROR + r"--adam-beta1 must be a number in \[0, 1\), got 1.0"),
        ("recipe-beta2-negative", ["--config", "{root}/beta2-negative.yaml"],
         ERROR + r"--adam-beta2 must be a number in \[0, 1\), got -0.5"),
        ("recipe-int-inf", ["--config", "{root}/warmup-inf.yaml"], ERROR + r"--warmup-steps must be int; got inf \(float\)"),
    ),
)
def test_bad_training_input_is_one_line_and_leaves_nothing(args, message, files, tmp_path, monkeypatch, capsys):
    from train_cli.app import main

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = ["--model", str(files / "plain"), "--data", str(files / "good.jsonl"), *TRAIN_BASE, "--output-dir", str(out)]
    extra = [a.format(root=files, unwritable=unwritable(files) if "{unwritable}" in a else None) for a in args]
    before = no_files(files)
    monkeypatch.setattr(sys, "argv", ["mtp-train", *argv, *extra])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr
    if stderr.startswith(ERROR):
        assert stderr.count("\n") == 1, stderr
    assert not out.exists() and no_files(cwd) == [] and no_files(files) == before


def unwritable(root: Path) -> Path:
    """A directory this process cannot write in: one without write permission, or (as root, whom
    permissions do not stop) /sys, where no one can make a directory."""
    import tempfile

    if os.geteuid() != 0:
        locked = root / "read-only"
        locked.mkdir(exist_ok=True)
        locked.chmod(0o555)
        return locked
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("no directory here refuses this process a write")


def test_the_console_script_exits_2_without_a_traceback(files, tmp_path):
    proc = subprocess.run(
        [str(BIN / "mtp-train"), "--model", str(files / "plain"), "--data", str(files / "latin1.jsonl"), *TRAIN_BASE,
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("mtp-train: error: --data ")
    assert no_files(tmp_path) == []


def test_rows_longer_than_the_layout_are_cut_to_it(files, tmp_path):
    """Not an error: each document contributes the tokens one row of the layout holds; the rest is
    cut."""
    config = build_config(model=str(files / "plain"), data=str(files / "long.jsonl"), prompt_field="question",
                          response_field="answer", output_dir=str(tmp_path / "out"), max_steps=2, seq_len=40, regions=4,
                          k_max=4, micro_batch_size=2, eval_rows=2, dtype="fp32")
    trainer = Trainer(config)
    trainer.run()
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    # At most every real column of every row: seq_len minus the k-1 mask slots of each region.
    assert all(0 < s["tokens"] <= 2 * (40 - 4 * (s["k"] - 1)) for s in steps), steps


def test_empty_rows_are_left_out_and_counted(files, tmp_path, capsys):
    """Rows with neither prompt nor response are left out; a row missing one field keeps the other."""
    mixed = tmp_path / "mixed.jsonl"
    one_field = json.dumps({"question": "only a prompt"}) + "\n"
    mixed.write_text((files / "good.jsonl").read_text() + (files / "empty-rows.jsonl").read_text() + one_field)
    config = build_config(model=str(files / "plain"), data=str(mixed), prompt_field="question", response_field="answer",
                          output_dir=str(tmp_path / "out"), max_steps=0, seq_len=40, regions=4, k_max=4, eval_rows=2)
    from train_cli.data import load_rows

    train, held = load_rows(config)
    assert len(train) == 25 and held is None and train[24] == {"question": "only a prompt", "answer": None}
    assert "left out 12 rows with an empty prompt and response" in capsys.readouterr().err


def test_a_json_object_of_columns_is_read_as_columns(files, tmp_path):
    """``{"question": [...], "answer": [...]}`` is rows of columns, not one row of lists."""
    from train_cli.data import load_rows

    config = build_config(model=str(files / "plain"), data=str(files / "columns.json"), prompt_field="question",
                          response_field="answer", output_dir=str(tmp_path / "out"), max_steps=0, seq_len=40, regions=4,
                          k_max=4, eval_rows=2)
    train, held = load_rows(config)
    expected = [json.loads(line) for line in (files / "good.jsonl").read_text().splitlines()]
    assert len(train) == len(expected) == 24 and held is None
    assert [dict(row) for row in train] == expected


@pytest.mark.parametrize(("spelling", "recorded"), [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"), ("fp32", "fp32")])
def test_dtype_takes_the_torch_names_and_records_the_short_one(spelling, recorded, files, tmp_path, monkeypatch, capsys):
    import yaml

    from train_cli.app import main

    out = tmp_path / "out"
    argv = ["--model", str(files / "plain"), "--data", str(files / "good.jsonl"), *TRAIN_BASE, "--max-steps", "0",
            "--dtype", spelling, "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["mtp-train", *argv])
    main()
    assert yaml.safe_load((out / "train_config.yaml").read_text())["dtype"] == recorded
    assert build_config(dtype=spelling).dtype == recorded


def test_an_unreadable_data_file_is_named_before_anything_loads(files, tmp_path, monkeypatch, capsys):
    """A data file this process may not read (its permissions; as root, whom permissions do not
    stop, the same PermissionError is raised by the open)."""
    import builtins

    from train_cli.app import main

    data = tmp_path / "secret.jsonl"
    data.write_text((files / "good.jsonl").read_text())
    data.chmod(0o000)
    if os.geteuid() == 0:
        real_open = builtins.open

        def guarded(path, *args, **kwargs):
            if str(path) == str(data):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("train_cli.data.open", guarded, raising=False)
    out = tmp_path / "out"
    argv = ["--model", str(files / "plain"), "--data", str(data), *TRAIN_BASE, "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["mtp-train", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert stderr == f"{ERROR}--data {data}: cannot read it (Permission denied); check its permissions\n"
    assert not out.exists()


# ------------------------------------------------------------------------------------------ mtp-train --resume


@pytest.fixture(scope="module")
def recorded_run(files, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint per step, recorded with --lr 1e-3 and --k-max 4."""
    out = tmp_path_factory.mktemp("recorded") / "run"
    config = build_config(model=str(files / "plain"), data=str(files / "good.jsonl"), prompt_field="question",
                          response_field="answer", output_dir=str(out), max_steps=2, save_every=1, keep_last=5, seq_len=40,
                          regions=4, k_max=4, micro_batch_size=2, eval_rows=2, dtype="fp32", lr=1e-3)
    Trainer(config).run()
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:  # same size, not a torch file
    path.write_bytes(b"\0" * path.stat().st_size)


def snapshot(directory: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*"))


@pytest.mark.parametrize(
    ("args", "damage", "message"),
    cases(
        ("resume-another-model", ["--model", "{root}/mtp"], None,
         r"--resume: --model '.*mtp' contradicts the run's recorded --model '.*plain' \(.*step-0000002/train_config.yaml\); "
         r"leave it out to continue the run as recorded, or start a new run in another --output-dir \(what may change "
         r"on resume: --output-dir, --max-steps, .*--device"),
        ("resume-another-k-max", ["--k-max", "3"], None, r"--resume: --k-max 3 contradicts the run's recorded --k-max 4 \("),
        ("resume-another-lr", ["--lr", "0.5"], None, r"--resume: --lr 0.5 contradicts the run's recorded --lr 0.001 \("),
        ("resume-another-loss", ["--loss", "soft-kl"], None,
         r"--resume: --loss 'soft-kl' contradicts the run's recorded --loss 'hard-label' \("),
        ("resume-recipe-contradicts", ["--config", "{root}/beta1-other.yaml"], None,
         r"--resume: --adam-beta1 0.8 contradicts the run's recorded --adam-beta1 0.9 \("),
        ("resume-without-checkpoints", [], "no-checkpoints", r"--resume: no complete checkpoint in .*checkpoints$"),
        ("resume-every-state-truncated", [], "truncate-states",
         r"--resume: no intact checkpoint in .*checkpoints \(step-0000002: trainer_state.pt has \d+ bytes, \d+ were "
         r"written; step-0000001: trainer_state.pt has \d+ bytes, \d+ were written\); start a new run$"),
        ("resume-every-state-unreadable", [], "scramble-states",
         r"--resume: no intact checkpoint in .*checkpoints \(step-0000002: trainer_state.pt is unreadable \(.*\); "
         r"step-0000001: trainer_state.pt is unreadable \(.*\)\); start a new run$"),
    ),
)
def test_a_bad_resume_is_one_line_and_changes_nothing(args, damage, message, recorded_run, files, tmp_path, monkeypatch,
                                                      capsys):
    import shutil

    from train_cli import checkpoints
    from train_cli.app import main

    out = tmp_path / "run"
    shutil.copytree(recorded_run, out)
    for checkpoint in checkpoints.complete_checkpoints(out):
        if damage == "no-checkpoints":
            shutil.rmtree(checkpoint)
        elif damage:
            (_truncate if damage == "truncate-states" else _scramble)(checkpoint / checkpoints.STATE_FILE)
    before = snapshot(out)
    # Today's flags as the run was started, plus the case's own (a resume with only --output-dir is fine).
    argv = ["--resume", "--output-dir", str(out), "--max-steps", "3", *(a.format(root=files) for a in args)]
    monkeypatch.setattr(sys, "argv", ["mtp-train", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert stderr.startswith(ERROR) and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr.strip()[len(ERROR):]), stderr
    assert snapshot(out) == before
