"""HF prompt-lookup decoding and stop strings, measured: how many tokens it generates against how
many it keeps, on the prompts of ``batch_speed.py`` (batch 1, 4-shot GSM8K, stop "Question:").

In transformers 5.24 assisted decoding (``prompt_lookup_num_tokens``) does not stop at
``stop_strings``: rows run on to ``max_new_tokens``. ``batch_speed.py`` counts only the tokens a row
keeps (up to the stop), as for every method; this script gives the other count too, so the peer's
speed can be read both ways.

    python benchmarks/prompt_lookup_stop.py --out benchmarks/results/prompt_lookup_stop.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from batch_speed import DEFAULT_MODEL, STOP, useful
from common import SHARED_GSM8K, gsm8k_prompts, header, publish

from mtp_plugins import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lookup-tokens", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer, _ = load_checkpoint(args.model, dtype=torch.bfloat16)
    prompts = gsm8k_prompts(SHARED_GSM8K, args.prompts, 4)
    lines = [
        *header("HF prompt lookup and stop strings"),
        f"Model: {args.model} (bf16); {len(prompts)} prompts one at a time, greedy, stop {STOP}, "
        f"max {args.max_new_tokens} new tokens.",
        "",
        "| method | tokens generated | tokens kept (up to the stop) | seconds | generated/s | kept/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, extra in [("HF generate", {}), (f"HF prompt lookup ({args.lookup_tokens})",
                                             {"prompt_lookup_num_tokens": args.lookup_tokens})]:
        enc = tokenizer(prompts[0], return_tensors="pt")
        model.generate(**enc, do_sample=False, max_new_tokens=4, **extra)  # warm-up
        generated = kept = 0
        start = time.perf_counter()
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens, stop_strings=STOP,
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, **extra)
            row = out[0, enc.input_ids.shape[1] :].tolist()
            generated += len(row)
            kept += len(useful(row, tokenizer.eos_token_id, tokenizer))
        seconds = time.perf_counter() - start
        lines.append(f"| {name} | {generated} | {kept} | {seconds:.1f} | {generated / seconds:.1f} | {kept / seconds:.1f} |")
        print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
