"""The bad-input matrix (docs/reliability.md): every bad lm-eval model_arg, ``mtp-train`` flag, data
file and recipe is refused with one message that names the input and what is allowed, a non-zero
exit without a traceback from the command-line tools, and no output left behind."""

from __future__ import annotations

import json
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
        ("lr-zero", ["--lr", "0"], ERROR + r"--lr must be > 0, got 0.0"),
        ("k-max-not-an-int", ["--k-max", "four"], r"Error: Invalid value for '--k-max': Input should be a valid integer"),
        ("template-unknown", ["--template", "html"],
         r"Error: Invalid value for '--template': .*'html' is not one of 'plain', 'chat', 'completion'"),
        ("device-unknown", ["--device", "gpu0"], ERROR + r"--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
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
    ),
)
def test_bad_training_input_is_one_line_and_leaves_nothing(args, message, files, tmp_path, monkeypatch, capsys):
    from train_cli.app import main

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = ["--model", str(files / "plain"), "--data", str(files / "good.jsonl"), *TRAIN_BASE, "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["mtp-train", *argv, *(a.format(root=files) for a in args)])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr
    if stderr.startswith(ERROR):
        assert stderr.count("\n") == 1, stderr
    assert not out.exists() and no_files(cwd) == []


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
