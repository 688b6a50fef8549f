"""``verify`` with and without recovery groups at batch 1 on the demo task, against ``ar``.

The synthetic_gsm_easy prompts (the task's shots from the train split, test questions), bf16, mask drafts
only (``draft_lookup=0``), one process, the configurations interleaved per prompt with the order
rotated; the first round warms up and is not counted. Prints (and with --out writes) Eff. k, tokens/s,
speed-up over ``ar``, ms per pass (prefill included) and outputs equal to ``ar``.

    python benchmarks/verify_recovery.py mtp-demo/distilled --prompts 12 --recovery 0,1,3 --out benchmarks/results/verify_recovery.md
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from common import demo_prompts

from mtp_plugins import generate
from mtp_plugins.checkpoint import load_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--prompts", type=int, default=12)
parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
parser.add_argument("--recovery", default="0,1,3")
parser.add_argument("--out")
args = parser.parse_args()

model, tok, spec = load_checkpoint(args.checkpoint, dtype=torch.bfloat16)
prompts = [tok(p, return_tensors="pt").input_ids for p in demo_prompts(args.prompts)]
configs = [("ar", None)] + [("verify", {"recovery": int(g)}) for g in args.recovery.split(",")]
totals = [[0, 0, 0.0] for _ in configs]  # tokens, passes, seconds
texts: list[list[list[int]]] = [[] for _ in configs]
for rnd in range(args.rounds + 1):
    for j, ids in enumerate(prompts):
        shift = (j + rnd) % len(configs)
        for i in list(range(len(configs)))[shift:] + list(range(len(configs)))[:shift]:
            strategy, options = configs[i]
            start = time.perf_counter()
            out = generate(model, ids, strategy=strategy, k=spec.k_max if strategy == "verify" else 1, max_new_tokens=48,
                           stop_strings=["\n\n", "Question:"], tokenizer=tok,
                           draft_lookup=0 if strategy == "verify" else None, decoder_options=options)
            seconds = time.perf_counter() - start
            if rnd:
                totals[i][0] += out.stats.tokens
                totals[i][1] += out.stats.forward_passes
                totals[i][2] += seconds
            if rnd == 1:
                texts[i].append(out.sequences[0, ids.shape[1]:].tolist())
ar_rate = totals[0][0] / totals[0][2]
lines = [
    f"`python benchmarks/verify_recovery.py {args.checkpoint} --prompts {args.prompts} --rounds {args.rounds} "
    f"--recovery {args.recovery}`: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
    f"bf16, batch 1, k {spec.k_max}, {len(prompts)} prompts x {args.rounds} rounds",
    "",
    "| decoding | Eff. k | tokens/s | speed-up vs ar | ms per pass (prefill included) | outputs = ar |",
    "|---|---|---|---|---|---|",
]
for (strategy, options), (tokens, passes, seconds), outs in zip(configs, totals, texts):
    name = strategy if options is None else f"verify, recovery={options['recovery']}"
    same = sum(a == b for a, b in zip(outs, texts[0]))
    lines.append(f"| {name} | {tokens / passes:.2f} | {tokens / seconds:.1f} | {tokens / seconds / ar_rate:.2f}x | "
                 f"{1000 * seconds / passes:.1f} | {same}/{len(outs)} |")
print("\n".join(lines))
if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("# verify recovery groups at batch 1 (demo task)\n\n" + "\n".join(lines) + "\n")
