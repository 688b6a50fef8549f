"""A real distillation of SmolLM2-135M-Instruct on GSM8K train, sized for a CPU session, with what
ConfAdapt (tau 0.9, k=8) does on GSM8K test prompts before and after.

Before = the prepared checkpoint (mask token added, untrained); after = the distilled one. On each,
the same GSM8K test questions (chat template, greedy, up to 128 new tokens) are decoded with ``ar``
and with ``confadapt``; reported: Eff. k, how many confadapt answers (final number) and texts equal
the same checkpoint's ``ar`` ones, and the training curve (metrics.jsonl, plotted when matplotlib is
installed).

    python benchmarks/distill_smollm2.py --steps 240 --out benchmarks/results/distill_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import date
from pathlib import Path

import torch
from common import SHARED_GSM8K, machine_line

import mtp_plugins
from train_cli.config import build_config
from train_cli.trainer import Trainer


def final_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def decode_report(model_dir: Path, questions: list[str], max_new: int, batch_size: int) -> dict:
    model, tokenizer, _ = mtp_plugins.load_checkpoint(model_dir, dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    texts = {"ar": [], "confadapt": []}
    stats = {"ar": [], "confadapt": []}
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        for strategy in texts:
            out = mtp_plugins.generate(model, enc.input_ids, enc.attention_mask, strategy=strategy, k=8, tau=0.9,
                                       max_new_tokens=max_new)
            texts[strategy] += tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            stats[strategy].append(out.stats)
    tokens = sum(s.tokens for s in stats["confadapt"])
    passes = sum(s.forward_passes for s in stats["confadapt"])
    seconds = {k: sum(s.wall_seconds for s in v) for k, v in stats.items()}
    return {
        "eff_k": tokens / passes,
        "same_answer": sum(final_number(a) == final_number(c) for a, c in zip(texts["ar"], texts["confadapt"])),
        "same_text": sum(a == c for a, c in zip(texts["ar"], texts["confadapt"])),
        "speedup": (sum(s.tokens for s in stats["confadapt"]) / seconds["confadapt"])
        / (sum(s.tokens for s in stats["ar"]) / seconds["ar"]),
        "n": len(questions),
        "example": texts["confadapt"][0],
    }


def plot(metrics: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    for j in range(len(evals[0]["agreement"])):
        axes[1].plot([m["step"] for m in evals], [m["agreement"][j] for m in evals], marker="o", label=f"offset {j + 1}")
    axes[1].set(title="held-out agreement with the teacher", xlabel="step")
    axes[1].legend(fontsize=7)
    axes[2].plot([m["step"] for m in evals], [m["eff_k_tau_0.9"] for m in evals], marker="o")
    axes[2].set(title="held-out Eff. k at tau 0.9 (k=8)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--loss", default="hard-label")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--run-dir", type=Path, default=Path("benchmarks/runs/distill_smollm2"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mtp_plugins.smollm2 import prepare_smollm2

    questions = [json.loads(line)["question"] for line in (args.gsm8k / "test.jsonl").read_text().splitlines()[: args.questions]]
    common = dict(
        model=str(prepare_smollm2()), data=str(args.gsm8k / "train.jsonl"), prompt_field="question",
        response_field="answer", template="chat", k_min=2, k_max=args.k_max, loss=args.loss, lr=args.lr,
        warmup_steps=20, micro_batch_size=8, eval_rows=32, eval_every=max(1, args.steps // 6),
        save_every=args.steps, dtype="bf16",
    )
    prepared = args.run_dir / "prepared"
    if not (prepared / "config.json").exists():
        Trainer(build_config(**common, output_dir=str(prepared), max_steps=0)).run()
    before = decode_report(prepared, questions, 128, 8)
    trained = args.run_dir / "trained"
    if not (trained / "config.json").exists():
        Trainer(build_config(**common, output_dir=str(trained), max_steps=args.steps)).run(
            resume=(trained / "checkpoints").exists()
        )
    after = decode_report(trained, questions, 128, 8)
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    train = [m for m in metrics if m["kind"] == "train"]
    png = (args.out.with_suffix(".png") if args.out else trained / "curve.png")
    plotted = plot(metrics, png)
    lines = [
        "# Distilling SmolLM2-135M-Instruct on GSM8K train (CPU)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {date.today()}; machine: {machine_line()}  ",
        f"Recipe: {args.loss}, k in [2, {args.k_max}], lr {args.lr} (20 warm-up steps, constant), micro-batch 8 x 160, "
        f"{args.steps} steps, chat template, bf16 compute; {sum(m['seconds'] for m in train) / 60:.1f} min of training "
        f"({sum(m['seconds'] for m in train) / len(train):.2f} s/step).",
        "",
        f"## ConfAdapt (tau 0.9, k=8) on {args.questions} GSM8K test questions, vs the same checkpoint's `ar`",
        "",
        "| checkpoint | Eff. k | answers equal to ar | texts equal to ar | tokens/s vs ar |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("before (mask token added, untrained)", before), ("after distillation", after)):
        lines.append(f"| {name} | {r['eff_k']:.2f} | {r['same_answer']}/{r['n']} | {r['same_text']}/{r['n']} | {r['speedup']:.2f} |")
    lines += [
        "",
        "## Training curve (held-out rows, k = k_max)",
        "",
        "| step | loss | agreement with the teacher by offset 1..k | Eff. k at tau 0.9 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m['step']} | {m['loss']:.3f} | {' '.join(f'{a:.2f}' for a in m['agreement'])} | {m['eff_k_tau_0.9']:.2f} |" for m in evals]
    if plotted:
        lines += ["", f"![curve]({png.name})"]
    lines += ["", f"Example confadapt output after distillation: {after['example'][:300]!r}", ""]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
