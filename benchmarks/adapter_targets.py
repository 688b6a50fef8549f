"""Which projections, rank and learning rate a gated adapter needs on SmolLM2-135M-Instruct (CPU).

Each variant trains ``--trainable gated-lora`` for the same number of steps on GSM8K train (chat
template, hard-label, k in 2..k_max, micro-batch 8 x 160, bf16 compute, 20 warm-up steps then
constant lr), one after the other in this process, and is validated on the same 32 held-out rows:
agreement of the student's argmax with the teacher's at each offset, and the one-pass estimate of
ConfAdapt's Eff. k at tau 0.9. The seconds per step are reported beside them; the decoding cost of
each target set is ``adapter_pass_cost.py``'s. This is what the defaults of ``--lora-targets``,
``--lora-rank`` and the recipes were chosen by.

    python benchmarks/adapter_targets.py --out benchmarks/results/adapter_targets.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import SHARED_GSM8K, header, publish

from train_cli.config import build_config
from train_cli.trainer import EST_EFF_K, Trainer


def run(args: argparse.Namespace, targets: str, rank: int, lr: float) -> dict:
    from mtp_plugins.smollm2 import prepare_smollm2

    with tempfile.TemporaryDirectory() as out:
        config = build_config(
            model=str(prepare_smollm2()), data=str(args.gsm8k / "train.jsonl"), prompt_field="question",
            response_field="answer", template="chat", k_min=2, k_max=args.k_max, loss="hard-label", lr=lr,
            warmup_steps=20, micro_batch_size=8, eval_rows=32, dtype="bf16", output_dir=out, max_steps=args.steps,
            trainable="gated-lora", lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=targets, weight_decay=0.0,
        )
        trainer = Trainer(config)
        trainer.setup()
        seconds = [trainer.train_step()["seconds"] for _ in range(args.steps)]
        return {**trainer.validate(), "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="all:16:1e-3,o_proj+down_proj:16:1e-3,down_proj:16:1e-3,down_proj:64:1e-3,"
                        "o_proj+down_proj:16:3e-3", help="comma-separated TARGETS:RANK:LR (targets joined by +)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = header("Gated adapter: targets, rank and lr on SmolLM2-135M-Instruct") + [
        f"Each variant: {args.steps} steps of --trainable gated-lora on GSM8K train (hard-label, k in [2, {args.k_max}], "
        "micro-batch 8 x 160, chat template, bf16, alpha = 2 x rank, 20 warm-up steps then constant lr); validated on 32 "
        "held-out rows at k = k_max.", "",
        "| targets | rank | lr | s/step | held-out agreement by offset 1..k | est. Eff. k at tau 0.9 (one pass) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in args.variants.split(","):
        targets, rank, lr = variant.split(":")
        r = run(args, targets.replace("+", ","), int(rank), float(lr))
        lines.append(f"| {targets.replace('+', ', ')} | {rank} | {lr} | {r['seconds']:.2f} | "
                     f"{' '.join(f'{a:.2f}' for a in r['agreement'])} | {r[EST_EFF_K]:.2f} |")
        print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
