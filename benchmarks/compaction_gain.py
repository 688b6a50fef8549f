"""What dropping the cache's holes buys: ``verify`` (as shipped) with compaction on and off, side by
side (interleaved), batch 1 and 8, the prompts and checkpoint of ``batch_speed.py``.

    python benchmarks/compaction_gain.py --out benchmarks/results/compaction_gain.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from batch_speed import DEFAULT_MODEL, STOP
from common import SHARED_GSM8K, gsm8k_prompts, header, load_mtp_model, publish

import mtp_plugins
from mtp_plugins.decoding import kvcache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer, _ = load_mtp_model(args.model, "bf16")
    prompts = gsm8k_prompts(SHARED_GSM8K, args.prompts, args.shots)
    compactions = []
    compact = kvcache.DynamicKV.compact

    def counted(kv: kvcache.DynamicKV) -> bool:
        before = kv.valid.shape[1]
        done = compact(kv)
        if kv.valid.shape[1] < before:
            compactions.append(before - kv.valid.shape[1])
        return done

    kvcache.DynamicKV.compact = counted
    lines = [
        *header("Cache compaction: verify with and without"),
        f"Model: {args.model} (bf16); {len(prompts)} GSM8K prompts, {args.shots}-shot, `verify` k=8 as shipped, stop "
        f"{STOP}, max {args.max_new_tokens} new tokens; median of {args.repeats} interleaved repeats.",
        "",
        "| batch | compaction | seconds | tokens | tokens/s | on / off | compactions (columns dropped) per run |",
        "|---|---|---|---|---|---|---|",
    ]
    default = kvcache.COMPACT_MIN
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        encs = [tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True) for i in range(0, len(prompts), batch)]
        times: dict[str, list[float]] = {"on": [], "off": []}
        tokens = {}
        dropped: dict[str, tuple[int, int]] = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for mode in ("on", "off"):
                kvcache.COMPACT_MIN = default if mode == "on" else 1 << 40
                compactions.clear()
                start = time.perf_counter()
                tokens[mode] = sum(
                    mtp_plugins.generate(model, e.input_ids, e.attention_mask, strategy="verify", k=8,
                                         max_new_tokens=args.max_new_tokens, stop_strings=STOP,
                                         tokenizer=tokenizer).stats.tokens
                    for e in encs
                )
                times[mode].append(time.perf_counter() - start)
                dropped[mode] = (len(compactions), sum(compactions))
        kvcache.COMPACT_MIN = default
        seconds = {m: statistics.median(t[1:]) for m, t in times.items()}
        for mode in ("on", "off"):
            lines.append(f"| {batch} | {mode} | {seconds[mode]:.1f} | {tokens[mode]} | {tokens[mode] / seconds[mode]:.1f} | "
                         f"{(tokens['on'] / seconds['on']) / (tokens['off'] / seconds['off']):.3f} | "
                         f"{dropped[mode][0]} ({dropped[mode][1]}) |")
            print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
