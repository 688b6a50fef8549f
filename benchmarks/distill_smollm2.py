"""Full-weight against gated-lora distillation of SmolLM2-135M-Instruct at EQUAL WALL-CLOCK (CPU).

Each mode trains for the same number of minutes on GSM8K train (chat template, hard-label, k drawn
in 2..k_max, micro-batch 8 x 160, bf16 compute), one after the other in this process with nothing
else running; each is validated on the same held-out rows as it goes. Then every checkpoint decodes
the same GSM8K test questions (chat template, greedy, up to 128 new tokens, batch 8, bf16) with
``ar`` and ConfAdapt (tau 0.9, k = k_max), and the original model with HF ``generate``. Reported:
steps done, held-out agreement with the teacher per offset, Eff. k at tau 0.9, ConfAdapt answers
(final number) equal to the same checkpoint's ``ar``, and the checkpoint's ``ar`` equal to the
original model (answers and texts).

    python benchmarks/distill_smollm2.py --minutes 15 --out benchmarks/results/distill_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from common import SHARED_GSM8K, header, publish

import mtp_plugins
from train_cli.config import build_config
from train_cli.trainer import EST_EFF_K, Trainer


def final_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def encode(tokenizer, questions: list[str], batch_size: int):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    for i in range(0, len(prompts), batch_size):
        yield tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)


def original_texts(path: str, questions: list[str], max_new: int, batch_size: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    texts = []
    with torch.inference_mode():
        for enc in encode(tokenizer, questions, batch_size):
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def decode_report(model_dir: Path, questions: list[str], max_new: int, batch_size: int, k: int) -> dict:
    model, tokenizer, _ = mtp_plugins.load_checkpoint(model_dir, dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    texts: dict[str, list[str]] = {"ar": [], "confadapt": []}
    stats: dict[str, list] = {"ar": [], "confadapt": []}
    for enc in encode(tokenizer, questions, batch_size):
        for strategy in texts:
            out = mtp_plugins.generate(model, enc.input_ids, enc.attention_mask, strategy=strategy, k=k, tau=0.9,
                                       max_new_tokens=max_new)
            texts[strategy] += tokenizer.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            stats[strategy].append(out.stats)
    tokens = sum(s.tokens for s in stats["confadapt"])
    passes = sum(s.forward_passes for s in stats["confadapt"])
    return {"eff_k": tokens / passes, "texts": texts}


def train_for(args: argparse.Namespace, mode: str, out: Path) -> dict:
    """Train one mode for ``args.minutes`` of wall-clock (validation excluded), export it."""
    from mtp_plugins.smollm2 import prepare_smollm2

    extra = ({"trainable": "gated-lora", "lora_rank": args.rank, "lora_alpha": 2.0 * args.rank, "lr": args.lr_gated,
              "weight_decay": 0.0} if mode == "gated-lora" else {"lr": args.lr_full})
    config = build_config(
        model=str(prepare_smollm2()), data=str(args.gsm8k / "train.jsonl"), prompt_field="question",
        response_field="answer", template="chat", k_min=2, k_max=args.k_max, loss="hard-label", warmup_steps=20,
        micro_batch_size=8, eval_rows=32, dtype="bf16", output_dir=str(out), max_steps=10**6, save_every=10**6,
        **extra,
    )
    trainer = Trainer(config)
    trainer.setup()
    curve, spent, last_eval = [trainer.validate()], 0.0, 0.0
    while spent < args.minutes * 60:
        metrics = trainer.train_step()
        spent += metrics["seconds"]
        if spent - last_eval >= args.minutes * 60 / 5:
            curve.append({**trainer.validate(), "minutes": spent / 60})
            last_eval = spent
    if curve[-1]["step"] != trainer.step:
        curve.append({**trainer.validate(), "minutes": spent / 60})
    trainer.export()
    return {"config": config, "steps": trainer.step, "minutes": spent / 60, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock per mode")
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-gated", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--run-dir", type=Path, default=Path("benchmarks/runs/distill_smollm2"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mtp_plugins.smollm2 import prepare_smollm2

    questions = [json.loads(line)["question"] for line in (args.gsm8k / "test.jsonl").read_text().splitlines()[: args.questions]]
    runs = {}
    for mode in ("full-weight", "gated-lora"):
        out = args.run_dir / mode
        if out.exists():
            raise SystemExit(f"{out} exists: remove it (or pass another --run-dir) to measure afresh")
        runs[mode] = train_for(args, mode, out)
    start = time.perf_counter()
    original = original_texts(str(prepare_smollm2()), questions, args.max_new, 8)
    n = len(questions)
    lines = header("Full-weight vs gated-lora distillation of SmolLM2-135M-Instruct at equal wall-clock (CPU)") + [
        f"Each mode trained {args.minutes:g} minutes (validation excluded) on GSM8K train: hard-label, k in [2, "
        f"{args.k_max}], micro-batch 8 x 160, chat template, bf16 compute, 20 warm-up steps then constant lr "
        f"(full-weight {args.lr_full:g}; gated-lora {args.lr_gated:g}, rank {args.rank}, alpha {2 * args.rank}, the "
        f"default targets o_proj and down_proj, no weight decay). Decoding: {n} GSM8K test questions, chat template, greedy, "
        f"up to {args.max_new} new tokens, batch 8, bf16; ConfAdapt tau 0.9 with k = {args.k_max}.", "",
        "| mode | steps | s/step | held-out agreement by offset 1..k | est. Eff. k (one pass) | ConfAdapt Eff. k | "
        "ConfAdapt answers = own ar | ar answers = original | ar texts = original |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, run in runs.items():
        report = decode_report(args.run_dir / mode, questions, args.max_new, 8, args.k_max)
        ar, conf = report["texts"]["ar"], report["texts"]["confadapt"]
        final = run["curve"][-1]
        run["decode"] = {"eff_k": report["eff_k"],
                         "confadapt_answers_equal_ar": sum(final_number(a) == final_number(c) for a, c in zip(ar, conf)),
                         "ar_answers_equal_original": sum(final_number(a) == final_number(o) for a, o in zip(ar, original)),
                         "ar_texts_equal_original": sum(a == o for a, o in zip(ar, original))}
        d = run["decode"]
        lines.append(
            f"| {mode} | {run['steps']} | {run['minutes'] * 60 / run['steps']:.2f} | "
            f"{' '.join(f'{a:.2f}' for a in final['agreement'])} | {final[EST_EFF_K]:.2f} | {d['eff_k']:.2f} | "
            f"{d['confadapt_answers_equal_ar']}/{n} | {d['ar_answers_equal_original']}/{n} | {d['ar_texts_equal_original']}/{n} |")
    lines += ["", "## Held-out curves (k = k_max)", "", "| mode | minutes | step | agreement by offset | est. Eff. k |", "|---|---|---|---|---|"]
    for mode, run in runs.items():
        lines += [f"| {mode} | {m.get('minutes', 0.0):.1f} | {m['step']} | {' '.join(f'{a:.2f}' for a in m['agreement'])} | "
                  f"{m[EST_EFF_K]:.2f} |" for m in run["curve"]]
    g, f = runs["gated-lora"]["decode"], runs["full-weight"]["decode"]
    lines += ["", "## Goal", "",
              f"- gated-lora ConfAdapt Eff. k at tau 0.9 {g['eff_k']:.2f} vs full-weight {f['eff_k']:.2f} in the same time: "
              f"{'PASS' if g['eff_k'] > f['eff_k'] else 'FAIL'}",
              f"- gated-lora `ar` equal to the original on every prompt: {g['ar_texts_equal_original']}/{n} texts: "
              f"{'PASS' if g['ar_texts_equal_original'] == n else 'FAIL'}",
              f"(decoding took {(time.perf_counter() - start) / 60:.1f} min)"]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
