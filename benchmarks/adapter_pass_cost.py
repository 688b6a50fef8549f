"""What a gated adapter adds to a decoding pass: the same pass with the gate on and off, side by side.

SmolLM2-135M-Instruct (bf16, one mask token) with gated adapters (random, so that the low-rank path
really runs) for each (targets, rank) asked for. Each pass is what the engine feeds: a KV cache of
``--context`` tokens, then ``pending`` real tokens + ``masks`` mask slots per row. "plain" is the same
model, the same cache and the same block with the gate off (exactly the computation of the model
without adapters: the low-rank path is skipped); "gated" has the adapters on the mask slots, as the
engine runs it. The two alternate pass by pass, median of ``--repeats`` each. The contract: at most
1.1x the plain pass at batch 1 and 8 (issue 15), and no low-rank work in a pass without mask slots.

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
from mtp_plugins.adapters import AdapterSettings, attach_gated_lora, gate_tail, parse_targets
from mtp_plugins.decoding.kvcache import new_dynamic_cache
from mtp_plugins.smollm2 import prepare_smollm2

PASSES = [("confadapt k=8", 1, 7), ("verify k=8", 8, 7), ("confadapt k=4", 1, 3)]


def timed_pass(model, cache, batch: int, context: int, pending: int, masks: int, gated: bool) -> float:
    width = pending + masks
    block = torch.randint(0, 49000, (batch, width))
    if masks:
        block[:, -masks:] = model.config.mtp["mask_token_ids"][0]
    attention = torch.ones((batch, context + width), dtype=torch.long)
    positions = torch.arange(context, context + width).expand(batch, -1)
    start = time.perf_counter()
    with gate_tail(model, masks if gated else 0):
        logits = model(input_ids=block, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=width).logits
    logits[:, :, :1].tolist()
    seconds = time.perf_counter() - start
    cache.crop(-width)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="residual:16,residual:64,all:16",
                        help="comma-separated TARGETS:RANK (targets joined by +)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = [(t.replace("+", ","), int(r)) for t, r in (v.split(":") for v in args.adapters.split(","))]
    names = [f"{t} r{r}" for t, r in variants]
    plain, tokenizer, path = load_checkpoint(str(prepare_smollm2()), dtype=torch.bfloat16)
    spec = add_mask_tokens(plain, tokenizer)
    models = {}
    for name, (targets, rank) in zip(names, variants):
        gated = copy.deepcopy(plain)
        settings = AdapterSettings(rank=rank, alpha=2.0 * rank, targets=parse_targets(targets))
        adapters = attach_gated_lora(gated, spec.mask_token_ids, settings)
        with torch.no_grad():
            for p in adapters.parameters():
                p.normal_(0.0, 0.02).requires_grad_(False)  # as load_checkpoint gives them
        models[name] = gated.eval()
    del plain
    lines = header("Gated adapter: cost of a decoding pass with the gate on and off") + [
        f"Model: {path} (bf16), one mask token; adapters (targets, rank) as in the columns, alpha = 2 x rank; "
        f"a KV cache of {args.context} tokens; plain = the same model and block with the gate off; median "
        f"ms of {args.repeats} passes each, alternating; the ratio is the median of the {args.repeats} adjacent pairs' "
        "ratios.", "",
        "| batch | pass (pending + mask slots per row) | " + " | ".join(f"{n}: plain ms, gated ms (x plain)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
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
                cells = []
                for name, model in models.items():
                    times: dict[bool, list[float]] = {False: [], True: []}
                    for i in range(args.repeats + 3):
                        for gated in (False, True):
                            seconds = timed_pass(model, caches[name], batch, args.context, pending, masks, gated)
                            if i >= 3:
                                times[gated].append(seconds)
                    off, on = (statistics.median(times[g]) * 1000 for g in (False, True))
                    # The ratio of each adjacent (plain, gated) pair, then their median: drifts of the
                    # machine's speed during the run cancel within a pair.
                    ratio = statistics.median(b / a for a, b in zip(times[False], times[True]))
                    cells.append(f"{off:.1f}, {on:.1f} ({ratio:.3f})")
                    verdicts.append(f"- batch {batch}, {label}: {name} gated / plain = {ratio:.3f} (target <= 1.1): "
                                    f"{'PASS' if ratio <= 1.1 else 'FAIL'}")
                lines.append(f"| {batch} | {label} ({pending} + {masks}) | " + " | ".join(cells) + " |")
    publish(lines + ["", "## Target", ""] + verdicts, args.out)


if __name__ == "__main__":
    main()
