"""How far the mask slots' confidence can be trusted where ConfAdapt uses it: along greedy answers.

For each checkpoint: greedy (``ar``) answers to the first N synthetic_gsm_easy test prompts (the
task's few-shot prompt, bf16, batch 1), then one teacher-forced pass over prompt + answer with k-1 mask
slots after every answer position (the training layout, the prompt as its context). Per offset it
prints how often the proposal equals greedy decoding's token, how often its confidence reaches 0.9,
and how often a proposal that confident is right: ConfAdapt at tau 0.9 emits exactly those. Then a
strict replay of ConfAdapt along each greedy answer: an answer counts as kept only if every token
the replay emits equals greedy's (decoding itself continues after a slip and often still lands on
the same final answer, so the lm-eval "answers kept" count is higher).

The last columns are the ceiling this base model leaves ConfAdapt at each tau: the same replay with
ideal slots (always greedy's token, and exactly as confident as the base model itself is when it
reaches that position, i.e. calibrated), at the checkpoint's k and at k 8. A run of emitted tokens
needs every one of them confident, proposal 0 (the base model's own next token) included, so where
the base model's greedy tokens are often below tau, no training of the slots can lift Eff. k much
above this without emitting tokens the model itself is unsure of.

    python benchmarks/slot_calibration.py OLD_ADAPTER NEW_ADAPTER --problems 64 --out benchmarks/results/slot_calibration.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import demo_prompts, header, publish

from mtp_plugins import generate
from mtp_plugins.checkpoint import load_checkpoint
from mtp_plugins.layout import IGNORE, LayoutGeometry, build_layout
from train_cli.gated import gated_logits

TAUS = (0.99, 0.95, 0.9, 0.8, 0.6)


def slot_predictions(model, spec, prompt: list[int], answer: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence, correctness and validity ``[len(answer), k]``: at answer position i (after the
    prompt and answer[:i]) the proposals for offsets 1..k against greedy's tokens."""
    k, n = spec.k_max, len(answer)
    geometry = LayoutGeometry(seq_len=n * k, regions=n, k=k, context=len(prompt) - 1)
    layout = build_layout([prompt + answer], geometry, spec.mask_ids(k - 1), pad_id=0)
    logits, _ = gated_logits(model, layout, spec.mask_ids(k - 1), list(spec.mask_token_ids), dtype=torch.bfloat16,
                             autocast=False, teacher=False)
    confidence, token = logits[0].softmax(-1).max(-1)  # [n, k]
    valid = layout.targets[0] != IGNORE
    return confidence, (token == layout.targets[0]) & valid, valid


def replay(confidence: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, tau: float) -> tuple[bool, int]:
    """ConfAdapt along the greedy answer: (every emitted token was greedy's, passes taken)."""
    position, passes = 0, 0
    while position < confidence.shape[0]:
        run = 0
        while run < confidence.shape[1] and valid[position, run] and confidence[position, run] >= tau:
            run += 1
        run = max(run, 1)
        if not correct[position, :run].all():
            return False, passes
        position, passes = position + run, passes + 1
    return True, passes


def ideal_slots(confidence: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replay inputs for ideal calibrated slots: at answer position i, offset j has the base model's
    own confidence at position i + j (``confidence[:, 0]``: offset 1 is the base model) and is right."""
    n = confidence.shape[0]
    base = torch.cat([confidence[:, 0], torch.zeros(k)])
    at = torch.arange(n)[:, None] + torch.arange(k)[None, :]
    valid = at < n
    return base[at], valid, valid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = header("Mask-slot confidence along greedy answers (synthetic_gsm_easy, bf16)")
    lines.append("")
    for path in args.checkpoints:
        model, tok, spec = load_checkpoint(path, dtype=torch.bfloat16)
        model.eval()
        rows = []
        with torch.no_grad():
            for text in demo_prompts(args.problems):
                ids = tok(text, return_tensors="pt").input_ids
                out = generate(model, ids, strategy="ar", k=1, max_new_tokens=64, stop_strings=["\n\n", "Question:"],
                               tokenizer=tok)
                rows.append(slot_predictions(model, spec, ids[0].tolist(), out.sequences[0, ids.shape[1]:].tolist()))
        confidence, correct, valid = (torch.cat([r[i] for r in rows]) for i in range(3))
        lines += [f"### `{path}` (k {spec.k_max}, {len(rows)} greedy answers, {valid[:, 0].sum().item()} positions)", "",
                  "| offset | proposal = greedy | confidence >= 0.9 | right when >= 0.9 |", "|---|---|---|---|"]
        for j in range(spec.k_max):
            v = valid[:, j]
            sure = confidence[v, j] >= 0.9
            lines.append(f"| {j + 1} | {correct[v, j].float().mean():.3f} | {sure.float().mean():.3f} | "
                         f"{correct[v, j][sure].float().mean():.3f} |")
        ks = sorted({spec.k_max, 8})
        lines += ["", "| tau | answers replayed exactly | Eff. k of those | "
                  + " | ".join(f"ceiling Eff. k, ideal slots, k {k}" for k in ks) + " |", "|---|---|---|" + "---|" * len(ks)]
        for tau in TAUS:
            results = [replay(*r, tau) for r in rows]
            kept = [(ok, passes, r[0].shape[0]) for (ok, passes), r in zip(results, rows) if ok]
            eff = sum(n for *_, n in kept) / max(sum(p for _, p, _ in kept), 1)
            ceilings = []
            for k in ks:
                passes = sum(replay(*ideal_slots(r[0], k), tau)[1] for r in rows)
                ceilings.append(f"{confidence.shape[0] / passes:.2f}")  # every answer position, all replayed
            lines.append(f"| {tau} | {len(kept)}/{len(rows)} | {eff:.2f} | " + " | ".join(ceilings) + " |")
        lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
