"""Helpers shared by the benchmarks: the model under test, GSM8K prompts, timing, a machine line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from mtp_plugins.allocator import tune_malloc
from mtp_plugins.files import write_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# Llama-3.2-1B's published shape (config.json of meta-llama/Llama-3.2-1B), for the GPU scripts (no hub
# there: random weights), and a tiny model of the same family to check those scripts on a CPU.
LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)
TINY = dict(LLAMA_3_2_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)

# The benchmarks run under the allocator our commands use (mtp_plugins/allocator.py): mtp-train's for
# the training benchmarks, the decoding commands' for the rest; the machine line says which.
TRAINING_BENCHMARKS = {"train_step_cost", "distill_smollm2", "adapter_targets"}
MALLOC = tune_malloc("train" if Path(sys.argv[0]).stem in TRAINING_BENCHMARKS else "decode")


def gsm8k_prompts(directory: Path, n: int, shots: int) -> list[str]:
    """``n`` test questions, each after ``shots`` worked train examples (lm-eval's gsm8k format)."""
    def rows(name: str) -> list[dict]:
        path = directory / f"{name}.jsonl"
        if not path.exists():
            raise SystemExit(f"GSM8K file not found: {path} (pass --gsm8k DIR holding train.jsonl and test.jsonl)")
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    examples = rows("train")[:shots]
    prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    return [f"{prefix}Question: {q['question']}\nAnswer:" for q in rows("test")[:n]]


def demo_prompts(n: int) -> list[str]:
    """The first ``n`` test prompts of the demo task (synthetic_gsm_easy), each after the task's number
    of worked examples (its YAML's ``num_fewshot``; the first train rows, as the benchmarks fix them)."""
    import yaml

    from mtp_plugins import synthetic

    shots = yaml.safe_load((REPO / "tasks" / "synthetic_gsm_easy.yaml").read_text())["num_fewshot"]
    prefix = "".join(r["prompt"] + r["completion"] + "\n\n" for r in synthetic.problems("train", shots, difficulty="easy"))
    return [prefix + r["prompt"] for r in synthetic.problems("test", n, difficulty="easy")]


def load_mtp_model(model: str | None, dtype: str):
    """The model under test with a mask token (added in memory if the checkpoint has none)."""
    from mtp_plugins import add_mask_tokens, load_checkpoint
    from mtp_plugins.smollm2 import prepare_smollm2

    path = model or str(prepare_smollm2())
    model_obj, tokenizer, spec = load_checkpoint(path, dtype=DTYPES[dtype])
    if spec is None:
        add_mask_tokens(model_obj, tokenizer)
    tokenizer.padding_side = "left"
    return model_obj, tokenizer, path


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall seconds over ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}; {MALLOC.describe()}"
    )


def header(title: str) -> list[str]:
    """The first lines of a result file: title, the command that produced it, date and machine."""
    return [f"# {title}", "", f"Command: `python {' '.join(sys.argv)}`  ",
            f"Date: {date.today()}; machine: {machine_line()}  "]


def publish(lines: list[str], out: Path | None) -> None:
    """Print the report and, with ``out``, write it there (whole or not at all)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_atomic(out, text)
