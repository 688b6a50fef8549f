"""The ``mtp`` lm-eval backend: the literal CLI, equivalence with ``hf``, statistics, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))
GEN = {"max_gen_toks": 24}


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LM_EVAL, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=600
    )


def evaluate(model: str, model_args: str, tasks: list[str], **kwargs):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, device="cpu", log_samples=True, **kwargs
    )


def responses(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s["resps"] for s in results["samples"][task]}


def test_literal_cli_run_writes_results_and_mtp_statistics(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},k=4,tau=0.9",
        "--tasks", "gsm8k", "--limit", "4", "--device", "cpu", "--output_path", str(out), "--log_samples",
        "--gen_kwargs", "max_gen_toks=24",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MTP decoding" in proc.stderr
    (results_file,) = out.rglob("results_*.json")
    mtp = json.loads(results_file.read_text())["config"]["mtp"]
    assert (mtp["strategy"], mtp["k"], mtp["tau"], mtp["samples"]) == ("confadapt", 4, 0.9, 4)
    assert mtp["eff_k"] == pytest.approx(mtp["tokens"] / mtp["forward_passes"])
    assert 0 < mtp["tokens"] <= 4 * 24
    (stats_file,) = out.rglob("mtp_samples_*.jsonl")
    assert mtp["samples_path"] == str(stats_file)
    records = [json.loads(line) for line in stats_file.read_text().splitlines()]
    (samples_file,) = out.rglob("samples_gsm8k_*.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    # Joinable with --log_samples on (task, doc_id) (lm-eval logs each doc once per filter).
    assert sorted((r["task"], r["doc_id"]) for r in records) == sorted({("gsm8k", s["doc_id"]) for s in logged})
    assert sum(r["tokens"] for r in records) == mtp["tokens"]
    assert all(sum(r["tokens_per_pass"]) == r["tokens"] and r["forward_passes"] >= 1 for r in records)


@pytest.mark.parametrize(
    "mtp_args",
    ["strategy=ar", "strategy=verify,k=4", "strategy=verify,k=4,mask_slots=3,draft_lookup=0", "strategy=verify,k=4,cache=static"],
)
def test_mtp_generates_the_same_text_as_hf(mtp_args, tiny_checkpoints):
    ckpt = tiny_checkpoints["mtp"]
    hf = evaluate("hf", f"pretrained={ckpt}", ["gsm8k"], limit=4, batch_size=2, gen_kwargs=GEN)
    mtp = evaluate("mtp", f"pretrained={ckpt},{mtp_args}", ["gsm8k"], limit=4, batch_size=2, gen_kwargs=GEN)
    assert responses(mtp, "gsm8k") == responses(hf, "gsm8k")
    assert len(responses(hf, "gsm8k")) == 4
    assert mtp["config"]["mtp"]["samples"] == 4


TINY_MC = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_loglikelihood_requests_take_the_ordinary_path(tiny_checkpoints, tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "tiny_mc.jsonl"
    rows = [
        {"question": "2 + 3 = ?", "choices": ["5", "6", "23"], "label": 0},
        {"question": "How many eggs?", "choices": ["16 eggs", "three", "9"], "label": 2},
        {"question": "She sells the remainder", "choices": ["yes", "no"], "label": 1},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(TINY_MC.format(data=data))
    manager = TaskManager(include_path=str(tmp_path))
    # The mtp checkpoint is the plain one plus an (untrained) mask token, which is never a prediction:
    # its log-likelihoods are the plain model's (up to the order of a float32 sum), not hf's on it.
    hf = evaluate("hf", f"pretrained={tiny_checkpoints['plain']}", ["tiny_mc"], task_manager=manager, batch_size=2)
    mtp = evaluate("mtp", f"pretrained={tiny_checkpoints['mtp']},k=4", ["tiny_mc"], task_manager=manager, batch_size=2)
    assert_same_loglikelihoods(mtp, hf, "tiny_mc")


def assert_same_loglikelihoods(mtp: dict, hf: dict, task: str) -> None:
    """Same accuracy, same greedy flags, log-likelihoods equal up to the order of a float32 sum (the
    mask column is -inf in ours, absent in the original's)."""
    assert mtp["results"][task]["acc,none"] == hf["results"][task]["acc,none"]
    ours, theirs = responses(mtp, task), responses(hf, task)
    assert ours.keys() == theirs.keys()
    for doc in ours:
        for (ll, greedy), (ll_hf, greedy_hf) in zip((r[0] for r in ours[doc]), (r[0] for r in theirs[doc])):
            assert greedy == greedy_hf and ll == pytest.approx(ll_hf, abs=1e-5)


def test_builtin_models_and_our_tasks_are_found():
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mtp_plugins.lm_eval.model import MTPLM

    assert get_model("mtp") is MTPLM
    assert get_model("hf") is HFLM
    assert get_model("dummy").__name__ == "DummyLM"
    names = TaskManager().all_tasks
    assert {"gsm8k", "gsm8k_cot", "gsm8k_cot_mtp", "gsm8k_cot_mtp_zeroshot", "gsm8k_cot_mtp_chat"} <= set(names)


def test_lm_eval_ls_tasks_lists_ours():
    proc = subprocess.run([LM_EVAL, "ls", "tasks"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gsm8k_cot_mtp" in proc.stdout and "gsm8k_cot_mtp_zeroshot" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("k=0", "model_args k=0 is not allowed: k must be an integer >= 1"),
        ("tau=1.5", r"model_args tau=1.5 is not allowed: tau must be a number in \(0, 1\]"),
        ("tau=0", r"tau must be a number in \(0, 1\]"),
        ("strategy=confadap", "model_args strategy='confadap' is not allowed: unknown decoder 'confadap'; did you mean 'confadapt'"),
    ],
)
def test_bad_model_args_are_named_before_loading(args, message):
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError

    with pytest.raises(MTPArgumentError, match=message):
        get_model("mtp").create_from_arg_string(f"pretrained=/nonexistent,{args}", {"device": "cpu"})


def test_mtp_strategies_need_a_mask_token(tiny_checkpoints):
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError

    plain = tiny_checkpoints["plain"]
    with pytest.raises(MTPArgumentError, match=r"strategy=confadapt with k=8 needs an MTP checkpoint.*no mask token"):
        get_model("mtp").create_from_arg_string(f"pretrained={plain}", {"device": "cpu"})
    lm = get_model("mtp").create_from_arg_string(f"pretrained={plain},strategy=ar", {"device": "cpu"})
    assert lm.k == 8 and lm.strategy == "ar"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("k=4,mask_slots=4",
         r"model_args mask_slots=4 is not allowed: mask_slots must be 'auto', 'adaptive', 'timed' or an int in \[0, 3\] \(k-1 for k=4\)"),
        ("strategy=ar,mask_slots=1", r"mask_slots=1 is not allowed: .* an int in \[0, 0\]"),
        ("mask_slots=some", r"mask_slots='some' is not allowed"),
        ("draft_lookup=-1",
         r"model_args draft_lookup=-1 is not allowed: draft_lookup must be an int >= 0 \(the longest n-gram matched; 0: off\)"),
        ("cache=paged", r"model_args cache='paged' is not allowed: cache must be one of \['dynamic', 'static'\]"),
        ("compile=fast", r"model_args compile='fast' is not allowed: compile must be True, False or a torch.compile mode \[.*'reduce-overhead'"),
        ("cache=dynamic,compile=true", r"model_args cache='dynamic' is not allowed: compile=True needs cache='static'"),
    ],
)
def test_bad_decoding_args_name_what_is_allowed(args, message, tiny_checkpoints):
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError

    with pytest.raises(MTPArgumentError, match=message):
        get_model("mtp").create_from_arg_string(f"pretrained={tiny_checkpoints['mtp']},{args}", {"device": "cpu"})


def test_bad_model_args_are_one_line_and_exit_non_zero_on_the_stock_cli(tiny_checkpoints):
    proc = run_cli("--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},k=0", "--tasks", "gsm8k",
                   "--limit", "1", "--device", "cpu")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "lm_eval: error: model_args k=0 is not allowed: k must be an integer >= 1 (or left out)"


def test_k_defaults_to_the_trained_k_max(tiny_checkpoints, tmp_path):
    from lm_eval.api.registry import get_model

    config = json.loads((tiny_checkpoints["mtp"] / "config.json").read_text())
    config["mtp"]["k_max"] = 5
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_checkpoints["mtp"].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "config.json").write_text(json.dumps(config))
    lm = get_model("mtp").create_from_arg_string(f"pretrained={ckpt}", {"device": "cpu"})
    assert (lm.k, lm.tau, lm.strategy) == (5, 0.9, "confadapt")


def test_data_parallel_on_two_cpu_processes(tiny_checkpoints, tmp_path):
    """torchrun + accelerate's CPU mode: documents are sharded across the two ranks and the MTP
    statistics of both land, once, in rank 0's outputs."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m", "lm_eval",
         "--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},k=4",
         "--tasks", "gsm8k", "--limit", "6", "--device", "cpu", "--output_path", str(out), "--log_samples",
         "--gen_kwargs", "max_gen_toks=16"],
        capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on rank 1" in proc.stderr  # the second process took part
    (stats_file,) = out.rglob("mtp_samples_*.jsonl")
    records = [json.loads(line) for line in stats_file.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in records) == list(range(6))
    (results_file,) = out.rglob("results_*.json")
    mtp = json.loads(results_file.read_text())["config"]["mtp"]
    assert mtp["samples"] == 6 and mtp["tokens"] == sum(r["tokens"] for r in records)


def test_gsm8k_cot_mtp_prompts_like_gsm8k_cot_with_the_trigger(tiny_checkpoints):
    """Our tasks reuse the installed lm-eval's gsm8k_cot exemplars and add "Let's think step by step."."""
    from lm_eval.tasks import TaskManager

    ckpt = tiny_checkpoints["mtp"]
    out = evaluate("mtp", f"pretrained={ckpt},strategy=ar",
                   ["gsm8k_cot_mtp", "gsm8k_cot_mtp_zeroshot", "gsm8k_cot"], limit=1, gen_kwargs={"max_gen_toks": 2})
    prompt = {task: out["samples"][task][0]["arguments"][0][0] for task in out["samples"]}
    question = out["samples"]["gsm8k_cot_mtp"][0]["doc"]["question"]
    assert prompt["gsm8k_cot_mtp_zeroshot"] == f"Q: {question}\nA: Let's think step by step."
    few = prompt["gsm8k_cot_mtp"]
    assert few.endswith(f"Q: {question}\nA: Let's think step by step.")
    assert few.count("Q: ") == 9 and few.count("A: Let's think step by step.") == 9
    # Remove the trigger and it is exactly lm-eval's gsm8k_cot prompt.
    assert few.replace("A: Let's think step by step.", "A:") == prompt["gsm8k_cot"]
    until = out["configs"]["gsm8k_cot_mtp"]["generation_kwargs"]["until"]
    assert "Q:" in until
    assert {"gsm8k_cot_mtp_chat", "mtp_gsm8k"} <= set(TaskManager().all_tasks)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/lm_eval", "--model", "mtp", "--output_path", "out"], "out"),
        (["/venv/bin/lm-eval", "run", "-o", "res"], "res"),
        (["/site-packages/lm_eval/__main__.py", "--output-path=o2"], "o2"),
        (["/venv/bin/lm_eval", "--output", "out"], None),  # no abbreviations: lm-eval's flag is spelled out
        (["benchmarks/lm_eval_gsm8k.py", "--out", "report.md"], None),  # another program's flags
        (["python", "-c"], None),
    ],
)
def test_output_path_is_read_only_from_the_lm_eval_command_line(argv, expected):
    from mtp_plugins.lm_eval.stats import output_path_from_argv

    assert output_path_from_argv(argv) == expected
