"""What a gated adapter adds to a decoding pass: the same pass with and without it, side by side.

Two copies of SmolLM2-135M-Instruct (bf16, one mask token), one with gated adapters (random, so
that the low-rank path really runs) at each rank asked for, the other plain. Each pass is what the
engine feeds (a KV cache of ``--context`` tokens, then ``pending`` real tokens + ``masks`` mask
slots per row, the adapters gated to the mask slots), timed interleaved across the models, median
of ``--repeats``. The contract: at most 1.1x the plain pass at batch 1 and 8 (issue 15), and no
low-rank work at all in a pass without mask slots.

    python benchmarks/adapter_pass_cost.py --out benchmarks/results/adapter_pass_cost.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import header, publish

from mtp_plugins import add_mask_tokens, load_checkpoint
from mtp_plugins.adapters import AdapterSettings, attach_gated_lora, gate_tail
from mtp_plugins.decoding.kvcache import new_dynamic_cache
from mtp_plugins.smollm2 import prepare_smollm2

PASSES = [("ar (no mask slots)", 1, 0), ("confadapt k=8", 1, 7), ("verify k=8", 8, 7), ("confadapt k=4", 1, 3)]


def timed_pass(model, cache, batch: int, context: int, pending: int, masks: int) -> float:
    width = pending + masks
    block = torch.randint(0, 49000, (batch, width))
    if masks:
        block[:, -masks:] = model.config.mtp["mask_token_ids"][0]
    attention = torch.ones((batch, context + width), dtype=torch.long)
    positions = torch.arange(context, context + width).expand(batch, -1)
    start = time.perf_counter()
    with gate_tail(model, masks):
        logits = model(input_ids=block, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=width).logits
    logits[:, :, :1].tolist()
    seconds = time.perf_counter() - start
    cache.crop(-width)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,64,128")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    plain, tokenizer, path = load_checkpoint(str(prepare_smollm2()), dtype=torch.bfloat16)
    spec = add_mask_tokens(plain, tokenizer)
    models = {"plain": plain}
    for rank in ranks:
        gated = copy.deepcopy(plain)
        adapters = attach_gated_lora(gated, spec.mask_token_ids, AdapterSettings(rank=rank, alpha=2.0 * rank))
        with torch.no_grad():
            for p in adapters.parameters():
                p.normal_(0.0, 0.02)
        models[f"rank {rank}"] = gated.eval()
    lines = header("Gated adapter: cost of a decoding pass with and without it") + [
        f"Model: {path} (bf16), one mask token; adapters on every attention and MLP projection; "
        f"a KV cache of {args.context} tokens; median of {args.repeats} passes, the models interleaved.", "",
        "| batch | pass (pending + mask slots per row) | plain ms | " + " | ".join(f"rank {r} ms (x plain)" for r in ranks) + " |",
        "|---|---|---|" + "---|" * len(ranks),
    ]
    verdicts = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            caches = {}
            for name, model in models.items():
                caches[name] = new_dynamic_cache(model)
                ids = torch.randint(0, 49000, (batch, args.context))
                model(input_ids=ids, cache=caches[name], use_cache=True, logits_to_keep=1)
            for label, pending, masks in PASSES:
                times: dict[str, list[float]] = {name: [] for name in models}
                for i in range(args.repeats + 2):
                    for name, model in models.items():
                        seconds = timed_pass(model, caches[name], batch, args.context, pending, masks)
                        if i >= 2:
                            times[name].append(seconds)
                med = {name: statistics.median(t) * 1000 for name, t in times.items()}
                cells = [f"{med[f'rank {r}']:.1f} ({med[f'rank {r}'] / med['plain']:.3f})" for r in ranks]
                lines.append(f"| {batch} | {label} ({pending} + {masks}) | {med['plain']:.1f} | " + " | ".join(cells) + " |")
                ratio = med[f"rank {ranks[0]}"] / med["plain"]
                verdicts.append(f"- batch {batch}, {label}: rank {ranks[0]} / plain = {ratio:.3f} (target <= 1.1): "
                                f"{'PASS' if ratio <= 1.1 else 'FAIL'}")
    publish(lines + ["", "## Target", ""] + verdicts, args.out)


if __name__ == "__main__":
    main()
