"""Decode speed, side by side in one run: HF ``generate`` (greedy) vs the engine's ``ar``, ``static``
k=4 and ``confadapt`` tau 0.9, at batch 1 and 8, on GSM8K test prompts, in two scenarios:

- ``stop``: as lm-eval runs it: each row stops at EOS or at the stop string "Question:"
  (SmolLM2-Instruct answers in a few dozen tokens, so the prompt's prefill weighs heavily);
- ``fixed``: EOS and stop strings ignored, every row decodes exactly ``--max-new-tokens`` tokens,
  which measures decoding throughput.

Default model: SmolLM2-135M-Instruct in bf16 with a mask token added in memory (an UNTRAINED MTP
model: confadapt mostly emits 1 token per pass, as expected before training). Also measures the cost
of one decoding pass that feeds 1 token vs 1 token + (k-1) mask slots, at a fixed cache, which is
what MTP decoding pays per pass.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from common import SHARED_GSM8K, gsm8k_prompts, load_mtp_model, machine_line

import mtp_plugins
from mtp_plugins.decoding.attention import grouped_attention
from mtp_plugins.decoding.kvcache import new_dynamic_cache

STOP = ["Question:"]


def engine_method(strategy: str, k: int, tau: float = 0.9):
    def run(model, tokenizer, enc, max_new, fixed):
        stops = {"eos_token_id": [], "stop_strings": None} if fixed else {"stop_strings": STOP}
        out = mtp_plugins.generate(
            model, enc.input_ids, enc.attention_mask, strategy=strategy, k=k, tau=tau,
            max_new_tokens=max_new, tokenizer=tokenizer, **stops,
        )
        return out.sequences, out.stats
    return run


def hf_generate(model, tokenizer, enc, max_new, fixed):
    config = model.generation_config
    eos = config.eos_token_id
    if fixed:  # HF reads "no EOS" from the generation config only
        config.eos_token_id = None
    try:
        sequences = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new, pad_token_id=config.pad_token_id,
            **({} if fixed else {"stop_strings": STOP, "tokenizer": tokenizer}),
        )
    finally:
        config.eos_token_id = eos
    return sequences, None


METHODS = {
    "HF generate": hf_generate,
    "engine ar": engine_method("ar", 1),
    "static k=4": engine_method("static", 4),
    "confadapt k=8 tau=0.9": engine_method("confadapt", 8, 0.9),
}


def run_batches(method, model, tokenizer, batches, max_new, fixed):
    start = time.perf_counter()
    results = [method(model, tokenizer, enc, max_new, fixed) for enc in batches]
    return time.perf_counter() - start, results


def measure(model, tokenizer, prompts, batch_size, max_new, repeats, fixed):
    batches = [
        tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        for i in range(0, len(prompts), batch_size)
    ]
    times = {name: [] for name in METHODS}
    outputs = {}
    for _ in range(repeats):  # methods interleaved, so that drift of the machine hits all alike
        for name, method in METHODS.items():
            seconds, outputs[name] = run_batches(method, model, tokenizer, batches, max_new, fixed)
            times[name].append(seconds)
    ar_outputs = outputs["engine ar"]
    rows = []
    for name in METHODS:
        seconds = statistics.median(times[name])
        if name == "HF generate":
            # HF returns no per-row lengths; where its tokens equal engine ar's, the work is the same.
            stats = [s for _, s in ar_outputs]
            same = sum(
                torch.equal(hf_row[: ar_row.shape[0]], ar_row) and bool((hf_row[ar_row.shape[0] :] == model.generation_config.pad_token_id).all())
                for (hf_seq, _), (ar_seq, _) in zip(outputs[name], ar_outputs)
                for hf_row, ar_row in zip(hf_seq, ar_seq)
            )
        else:
            stats = [s for _, s in outputs[name]]
            same = sum(
                torch.equal(row, ar_row)
                for (seq, _), (ar_seq, _) in zip(outputs[name], ar_outputs)
                for row, ar_row in zip(seq, ar_seq)
            )
        tokens = sum(s.tokens for s in stats)
        passes = sum(s.forward_passes for s in stats)
        calls = sum(s.model_calls for s in stats)
        rows.append({
            "method": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "eff_k": tokens / passes if name != "HF generate" else 1.0, "calls": calls, "same_as_ar": same,
        })
    return rows


def pass_costs(model, enc, widths, passes):
    """Median seconds of one decoding pass feeding ``w`` tokens (1 real + w-1 masks), at the cache of
    the prompt batch, including the crop of the mask entries, for each width ``w``."""
    spec = mtp_plugins.read_mtp_spec(model)
    batch = enc.input_ids.shape[0]
    state = {}
    with torch.inference_mode(), grouped_attention(model):  # as the engine runs it
        for w in widths:
            cache = new_dynamic_cache(model)
            model(**enc, cache=cache, use_cache=True, logits_to_keep=1)
            state[w] = [cache, enc.attention_mask.bool(), enc.attention_mask.sum(1)]
        block = {
            w: torch.tensor([[enc.input_ids[0, -1].item()] + spec.mask_ids(w - 1)] * batch) for w in widths
        }
        times = {w: [] for w in widths}
        for _ in range(passes):
            for w in widths:  # interleaved
                cache, valid, nxt = state[w]
                attention = torch.cat([valid, torch.ones(batch, w, dtype=torch.bool)], dim=1)
                positions = nxt[:, None] + torch.arange(w)
                start = time.perf_counter()
                logits = model(input_ids=block[w], attention_mask=attention, position_ids=positions,
                               cache=cache, use_cache=True, logits_to_keep=w).logits
                logits.argmax(-1).tolist()
                if w > 1:
                    cache.crop(-(w - 1))
                times[w].append(time.perf_counter() - start)
                state[w] = [cache, attention[:, : attention.shape[1] - (w - 1)], nxt + 1]
    return {w: statistics.median(t) for w, t in times.items()}


def scenario_section(model, tokenizer, prompts, args, batch_size, fixed, checks) -> list[str]:
    rows = measure(model, tokenizer, prompts, batch_size, args.max_new_tokens, args.repeats, fixed)
    hf = next(r for r in rows if r["method"] == "HF generate")
    ar = next(r for r in rows if r["method"] == "engine ar")
    scenario = "fixed" if fixed else "stop"
    lines = [
        f"## Batch {batch_size}, scenario `{scenario}`",
        "",
        "| method | tokens | seconds | tokens/s | tokens/s vs HF | Eff. k | model calls | rows equal to engine ar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / hf['tokens_per_s']:.3f} | {r['eff_k']:.2f} | {r['calls'] or '-'} | "
            f"{r['same_as_ar']}/{len(prompts)} |"
        )
    checks.append(
        f"batch {batch_size}, `{scenario}`: engine ar time / HF generate time = "
        f"{ar['seconds'] / hf['seconds']:.3f} (target <= 1.05)"
    )
    return lines + [""]


def pass_cost_section(model, tokenizer, prompts, batch_size, checks) -> list[str]:
    enc = tokenizer(prompts[:batch_size], return_tensors="pt", padding=True)
    costs = pass_costs(model, enc, [1, 2, 4, 8], passes=12)
    checks.append(f"batch {batch_size}: a k=4 pass / an ar pass = {costs[4] / costs[1]:.3f} (target <= 1.3)")
    return [
        f"Cost of one pass at the cache of {batch_size} prompt(s), 1 token + (k-1) mask slots, median of 12:",
        "",
        "| k | ms per pass | vs k=1 |",
        "|---|---|---|",
        *[f"| {w} | {1000 * s:.1f} | {s / costs[1]:.3f} |" for w, s in costs.items()],
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model dir or id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K, help="directory with train.jsonl/test.jsonl")
    parser.add_argument("--prompts", type=int, default=8, help="GSM8K test questions")
    parser.add_argument("--shots", type=int, default=4, help="worked train examples before each question")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--scenarios", default="stop,fixed", help="stop, fixed or both (see above)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, path = load_mtp_model(args.model, args.dtype)
    prompts = gsm8k_prompts(args.gsm8k, args.prompts, args.shots)
    lines = [
        "# Decode speed: HF generate vs the engine (untrained MTP model)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {date.today()}; machine: {machine_line()}  ",
        f"Model: {path} ({args.dtype}), a mask token added in memory (untrained). "
        f"{len(prompts)} GSM8K test prompts, {args.shots}-shot, greedy, max {args.max_new_tokens} new tokens; "
        f"scenario `stop`: stop at EOS or {STOP}; scenario `fixed`: exactly {args.max_new_tokens} tokens per row. "
        f"Median of {args.repeats} interleaved repeats.",
        "",
    ]
    checks: list[str] = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for scenario in args.scenarios.split(","):
            section = scenario_section(model, tokenizer, prompts, args, batch_size, scenario == "fixed", checks)
            print("\n".join(section), flush=True)
            lines += section
        section = pass_cost_section(model, tokenizer, prompts, batch_size, checks)
        print("\n".join(section), flush=True)
        lines += section
    lines += ["## Targets", ""] + [f"- {c}" for c in checks] + [""]
    print("\n".join(lines[-len(checks) - 1 :]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
