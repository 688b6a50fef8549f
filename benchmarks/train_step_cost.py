"""Cost of one MTP self-distillation step, full-weight and gated-lora, against one ordinary next-token
fine-tuning step of the same model on the same rows, measured side by side (interleaved) in one run;
and the peak memory of each kind of run, each in a process of its own.

All use the trainer's precision setting (bf16 autocast on this CPU), AdamW, and micro-batch 8 rows
of 160 tokens from GSM8K train, with the same k draws (same seed):

- full-weight: ``Trainer.train_step`` with ``--trainable all`` (float32 student, bf16 teacher copy;
  student forward/backward on the layout, student forcing, teacher forward, hard-label loss);
- gated-lora: ``--trainable gated-lora`` (one bf16 copy of the frozen base, float32 adapters and mask
  rows; the real pass, the slot pass with gradient, the teacher's slot pass; ``train_cli/gated.py``);
- ordinary: a causal-LM loss over all 160 positions of the full-weight student.

    python benchmarks/train_step_cost.py --out benchmarks/results/train_step_cost.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_GSM8K, header, publish

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


def make_trainer(args: argparse.Namespace, out: str, mode: str) -> Trainer:
    from mtp_plugins.smollm2 import prepare_smollm2

    k_min, k_max = (int(x) for x in args.k.split(","))
    extra = {"trainable": "gated-lora", "lora_rank": args.rank, "lora_alpha": 2.0 * args.rank} if mode == "gated" else {}
    config = build_config(
        model=args.model or str(prepare_smollm2()), data=str(args.gsm8k / "train.jsonl"), prompt_field="question",
        response_field="answer", output_dir=out, max_steps=10**6, k_min=k_min, k_max=k_max, dtype=args.dtype,
        micro_batch_size=8, eval_rows=0, loss="hard-label", **extra,
    )
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def peak_memory(args: argparse.Namespace, mode: str) -> float:
    """Peak resident memory (GiB) of a process that sets up one kind of run and takes 3 steps."""
    argv = [sys.executable, __file__, "--only", mode, "--k", args.k, "--dtype", args.dtype, "--rank", str(args.rank),
            "--gsm8k", str(args.gsm8k)] + (["--model", args.model] if args.model else [])
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_gib"]


def only(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp, args.only)
        for _ in range(3):
            trainer.train_step()
    # VmHWM (this process's own high-water mark: exec starts it afresh, where ru_maxrss keeps the
    # forking parent's), else ru_maxrss.
    status = Path("/proc/self/status")
    hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
    kib = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_gib": kib / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", default="2,16", help="k_min,k_max of the MTP steps")
    parser.add_argument("--rank", type=int, default=16, help="gated-lora rank")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", choices=["full", "gated"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return only(args)
    with tempfile.TemporaryDirectory() as full_dir, tempfile.TemporaryDirectory() as gated_dir:
        full, gated = make_trainer(args, full_dir, "full"), make_trainer(args, gated_dir, "gated")
        ordinary_optimizer = torch.optim.AdamW(full.student.parameters(), lr=full.config.lr)
        times: dict[str, list[float]] = {"full": [], "gated": [], "ordinary": []}
        ks = []
        for i in range(args.steps + 2):  # interleaved; the first two of each are warm-up
            a, b = full.train_step(), gated.train_step()
            seconds = {"full": a["seconds"], "gated": b["seconds"],
                       "ordinary": ordinary_step(full, ordinary_optimizer, full.config.seq_len)}
            if i >= 2:
                for name, value in seconds.items():
                    times[name].append(value)
                ks.append((a["k"], b["k"]))
    del full, gated, ordinary_optimizer
    memory = {mode: peak_memory(args, mode) for mode in ("full", "gated")}
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [("MTP full-weight (student fwd+bwd, teacher copy fwd)", "full"),
            ("MTP gated-lora (real pass, slot pass fwd+bwd, teacher slot pass)", "gated"),
            ("ordinary next-token fine-tuning", "ordinary")]
    lines = header("Training step cost: full-weight and gated-lora MTP vs ordinary fine-tuning") + [
        f"Model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; micro-batch 8 x 160 tokens, 5 regions, k drawn in "
        f"[{args.k}] (drawn, full/gated: {ks}); {args.dtype} autocast; gated-lora rank {args.rank}, alpha "
        f"{2 * args.rank}, the default targets (the residual-stream projections o_proj, down_proj); median of {args.steps} interleaved steps. Peak memory: "
        "resident set of a separate process that sets the run up and takes 3 steps.", "",
        "| step | seconds (median) | per-step seconds | peak memory GiB |",
        "|---|---|---|---|",
    ]
    for label, name in rows:
        mem = f"{memory[name]:.2f}" if name in memory else "-"
        lines.append(f"| {label} | {med[name]:.2f} | {', '.join(f'{s:.2f}' for s in times[name])} | {mem} |")
    ratio = med["gated"] / med["full"]
    lines += ["", "## Targets", "",
              f"- gated-lora step / full-weight step = {ratio:.3f} (target <= 0.6): {'PASS' if ratio <= 0.6 else 'FAIL'}",
              f"- gated-lora peak memory / full-weight = {memory['gated'] / memory['full']:.3f} (target < 1): "
              f"{'PASS' if memory['gated'] < memory['full'] else 'FAIL'}",
              f"- full-weight MTP step / ordinary step = {med['full'] / med['ordinary']:.3f} (target <= 1.45; FLOPs alone: 1.33)"]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
