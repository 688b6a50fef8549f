"""The static KV cache and ``torch.compile`` on this CPU, side by side with the default dynamic cache:
the prompts, checkpoint and stop rule of ``batch_speed.py`` (4-shot GSM8K, distilled SmolLM2-135M, bf16).

For ``ar``, ``confadapt`` tau 0.9 and ``verify`` (k=8), at each batch size: the dynamic cache as
shipped, the static cache (eager; all k-1 mask slots, as the static path always feeds) and
``compile=True`` (static cache, inductor). Each method runs the whole prompt set twice: the first
round compiles every shape it meets (its seconds are reported as "first round"), the second is
timed. Reported: tokens/s, ratio to the dynamic cache of the same strategy, Eff. k, texts equal to
dynamic ``ar``'s.

    python benchmarks/compile_speed.py --out benchmarks/results/compile_speed.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from batch_speed import DEFAULT_MODEL, STOP, useful
from common import SHARED_GSM8K, gsm8k_prompts, header, load_mtp_model, publish

import mtp_plugins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer, _ = load_mtp_model(args.model, "bf16")
    prompts = gsm8k_prompts(SHARED_GSM8K, args.prompts, args.shots)
    k, tau = args.k, args.tau
    strategies = {"ar": dict(strategy="ar", k=1), f"confadapt k={k} tau={tau}": dict(strategy="confadapt", k=k, tau=tau),
                  f"verify k={k}": dict(strategy="verify", k=k)}
    caches = {"dynamic": {}, "static": dict(cache="static"), "compiled": dict(compile=True)}
    lines = [
        *header("Static KV cache and torch.compile on the CPU"),
        f"Model: {args.model} (bf16); {len(prompts)} GSM8K test prompts, {args.shots}-shot, stop {STOP} or EOS, "
        f"max {args.max_new_tokens} new tokens. Each method runs the prompt set twice: the first round compiles "
        "(and warms up), the second is timed. `compiled` is `compile=True` (static cache, inductor mode "
        "`default`); `static` is the static cache without compiling.",
        "",
        "| batch | strategy | cache | first round s | seconds | tokens | tokens/s | vs dynamic | Eff. k | texts = dynamic ar |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eos = tokenizer.eos_token_id
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        encs = [tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True) for i in range(0, len(prompts), batch)]
        reference: list[str] | None = None
        for name, options in strategies.items():
            dynamic_rate = None
            for cache, cache_options in caches.items():
                def run() -> tuple[float, list[list[int]], list[Any]]:
                    start = time.perf_counter()
                    rows, stats = [], []
                    for enc in encs:
                        out = mtp_plugins.generate(model, enc.input_ids, enc.attention_mask,
                                                   max_new_tokens=args.max_new_tokens, stop_strings=STOP,
                                                   tokenizer=tokenizer, **options, **cache_options)
                        rows += out.sequences[:, enc.input_ids.shape[1] :].tolist()
                        stats.append(out.stats)
                    return time.perf_counter() - start, rows, stats

                first, _, _ = run()
                seconds, rows, stats = run()
                texts = [tokenizer.decode(useful(r, eos, tokenizer), skip_special_tokens=True) for r in rows]
                if reference is None:
                    reference = texts
                tokens = sum(len(useful(r, eos, tokenizer)) for r in rows)
                rate = tokens / seconds
                dynamic_rate = dynamic_rate or rate
                eff_k = sum(s.tokens for s in stats) / sum(s.forward_passes for s in stats)
                same = sum(a == b for a, b in zip(texts, reference))
                lines.append(f"| {batch} | {name} | {cache} | {first:.1f} | {seconds:.1f} | {tokens} | {rate:.1f} | "
                             f"{rate / dynamic_rate:.2f}x | {eff_k:.2f} | {same}/{len(texts)} |")
                print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
