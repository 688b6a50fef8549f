"""Cost of one MTP self-distillation step vs one ordinary next-token fine-tuning step of the same
model on the same rows, measured side by side (interleaved) in one run.

Both use the trainer's precision setting (float32 weights, bf16 autocast on this CPU), AdamW, and
micro-batch 8 rows of 160 tokens from GSM8K train. The MTP step is ``Trainer.train_step`` (student
forward/backward on the layout, student forcing, teacher forward, hard-label loss); the ordinary
step is a causal-LM loss over all 160 positions (full-vocabulary logits everywhere).

    python benchmarks/train_step_cost.py --out benchmarks/results/train_step_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from common import SHARED_GSM8K, machine_line

from train_cli.config import build_config
from train_cli.trainer import Trainer


def ordinary_step(trainer: Trainer, optimizer: torch.optim.Optimizer, seq_len: int) -> float:
    """One next-token fine-tuning step on rows from the same sampler; returns seconds."""
    c = trainer.config
    start = time.perf_counter()
    docs = trainer.documents.tokens(trainer.sampler.take(c.micro_batch_size), seq_len)
    ids = torch.full((len(docs), seq_len), trainer.pad_id)
    labels = torch.full((len(docs), seq_len), -100)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        labels[i, : len(d)] = torch.tensor(d)
    with torch.autocast("cpu", dtype=trainer.compute_dtype, enabled=trainer.compute_dtype != torch.float32):
        loss = trainer.student(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.student.parameters(), c.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", default="2,16", help="k_min,k_max of the MTP steps")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mtp_plugins.smollm2 import prepare_smollm2

    k_min, k_max = (int(x) for x in args.k.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config(
            model=args.model or str(prepare_smollm2()), data=str(args.gsm8k / "train.jsonl"),
            prompt_field="question", response_field="answer", output_dir=tmp, max_steps=10**6, k_min=k_min,
            k_max=k_max, dtype=args.dtype, micro_batch_size=8, eval_rows=0, loss="hard-label",
        )
        trainer = Trainer(config)
        trainer.setup()
        ordinary_optimizer = torch.optim.AdamW(trainer.student.parameters(), lr=config.lr)
        mtp, plain, ks = [], [], []
        for i in range(args.steps + 2):  # interleaved; the first two of each are warm-up
            metrics = trainer.train_step()
            seconds = ordinary_step(trainer, ordinary_optimizer, config.seq_len)
            if i >= 2:
                mtp.append(metrics["seconds"])
                plain.append(seconds)
                ks.append(metrics["k"])
    m, p = statistics.median(mtp), statistics.median(plain)
    lines = [
        "# Training step cost: MTP self-distillation vs ordinary next-token fine-tuning",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {date.today()}; machine: {machine_line()}  ",
        f"Model: {config.model}; micro-batch 8 x {config.seq_len} tokens, {config.regions} regions, k drawn in "
        f"[{k_min}, {k_max}] (drawn: {ks}); float32 weights, {args.dtype} autocast; median of {args.steps} interleaved steps.",
        "",
        "| step | seconds (median) | per-step seconds |",
        "|---|---|---|",
        f"| MTP (student fwd+bwd, teacher fwd, hard-label) | {m:.2f} | {', '.join(f'{s:.2f}' for s in mtp)} |",
        f"| ordinary next-token fine-tuning | {p:.2f} | {', '.join(f'{s:.2f}' for s in plain)} |",
        "",
        f"MTP step / ordinary step = {m / p:.3f} (target <= 1.45; FLOPs alone: 1.33)",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
