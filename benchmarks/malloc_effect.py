"""What glibc malloc tuning (``mtp_plugins/allocator.py``) does to batch-1 decoding on this CPU.

The setting is per process (glibc's dynamic mmap threshold cannot be restored once set), so each
measurement is a child process, with glibc's defaults (``MTP_PLUGINS_MALLOC=0``) or tuned,
alternating, the order rotated per round. A child times, at batch 1 on the demo task's prompts
(synthetic_gsm_easy with its shots), bf16: the prompt's prefill, HF ``generate`` (greedy, a fixed
number of new tokens, EOS ignored) and the engine's ``ar`` and ``confadapt`` (k 4, tau 0.9), and
returns its tokens, which must be the same under both settings.

    python benchmarks/malloc_effect.py [--model mtp-demo/distilled] --out benchmarks/results/malloc_effect.md

Default model: SmolLM2-135M-Instruct with a mask token added in memory (untrained: ``confadapt``
then emits about one token a pass, which still times a pass of 1 + 3 mask slots).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"glibc defaults": {"MTP_PLUGINS_MALLOC": "0"}, "tuned": {"MTP_PLUGINS_MALLOC": "1"}}
METHODS = ("prefill", "HF generate", "engine ar", "confadapt k=4 tau=0.9")


def child(args: argparse.Namespace) -> None:
    import torch
    from common import MALLOC, demo_prompts, load_mtp_model

    import mtp_plugins

    torch.manual_seed(0)
    model, tokenizer, _ = load_mtp_model(args.model, "bf16")
    model.eval()
    prompts = [tokenizer(p, return_tensors="pt") for p in demo_prompts(args.prompts)]
    config = model.generation_config
    config.eos_token_id = None  # every row decodes exactly max_new_tokens

    def prefill(enc):
        with torch.inference_mode():
            model(**enc, use_cache=True, logits_to_keep=1)
        return None, 0, 0

    def hf(enc):
        out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=config.pad_token_id)
        return out[0, enc.input_ids.shape[1]:].tolist(), args.max_new_tokens, args.max_new_tokens

    def engine(strategy, k):
        def run(enc):
            out = mtp_plugins.generate(model, enc.input_ids, enc.attention_mask, strategy=strategy, k=k, tau=0.9,
                                       max_new_tokens=args.max_new_tokens, tokenizer=tokenizer, eos_token_id=[],
                                       stop_strings=None)
            return out.sequences[0].tolist(), out.stats.tokens, out.stats.forward_passes
        return run

    runs = dict(zip(METHODS, (prefill, hf, engine("ar", 1), engine("confadapt", 4))))
    for run in runs.values():  # warm-up
        run(prompts[0])
    result = {"malloc": MALLOC.describe(), "state": MALLOC.state}
    for name, run in runs.items():
        start, tokens, passes, texts = time.perf_counter(), 0, 0, []
        for enc in prompts:
            text, t, p = run(enc)
            tokens, passes = tokens + t, passes + p
            texts.append(text)
        seconds = time.perf_counter() - start
        result[name] = {"seconds": seconds, "tokens": tokens, "passes": passes,
                        "sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="An MTP checkpoint or adapter [default: SmolLM2, untrained]")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from common import header, publish

    here = Path(__file__).resolve().parent
    command = [sys.executable, str(here / "malloc_effect.py"), "--child", "--prompts", str(args.prompts),
               "--max-new-tokens", str(args.max_new_tokens)] + (["--model", args.model] if args.model else [])
    results = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        order = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | SETTINGS[name]
            proc = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=here, check=False)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: " + ", ".join(
                f"{m} {results[name][-1][m]['seconds']:.2f} s" for m in METHODS), file=sys.stderr, flush=True)

    def per_unit(name: str, method: str) -> list[float]:
        """ms per prompt (prefill), per token (HF generate), per pass (engine), one value per round."""
        rows = [r[method] for r in results[name]]
        if method == "prefill":
            return [1000 * r["seconds"] / args.prompts for r in rows]
        if method == "HF generate":
            return [1000 * r["seconds"] / r["tokens"] for r in rows]
        return [1000 * r["seconds"] / r["passes"] for r in rows]

    base, tuned = SETTINGS
    lines = header("glibc malloc tuning: batch-1 decoding with glibc's defaults and tuned")
    lines += [f"Prompts: the first {args.prompts} of synthetic_gsm_easy with its shots; {args.max_new_tokens} new tokens each "
              f"(EOS ignored), bf16, batch 1; model: {args.model or 'SmolLM2-135M-Instruct (untrained mask token)'}; "
              f"{args.rounds} rounds, each setting its own process, alternating. Tuned: {results[tuned][0]['malloc']}.", "",
              "| | unit | glibc defaults | tuned | defaults / tuned | same tokens |", "|---|---|---|---|---|---|"]
    units = {"prefill": "ms / prompt", "HF generate": "ms / token", "engine ar": "ms / pass", "confadapt k=4 tau=0.9": "ms / pass"}
    for method in METHODS:
        a, b = per_unit(base, method), per_unit(tuned, method)
        ratios = sorted(x / y for x, y in zip(a, b))
        hashes = {r[method]["sha256"] for name in SETTINGS for r in results[name]}
        same = "yes" if len(hashes) == 1 else f"NO ({len(hashes)} different)"
        lines.append(f"| {method} | {units[method]} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
                     f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}..{ratios[-1]:.2f}) | {same if method != 'prefill' else '-'} |")
    for name in SETTINGS:
        eff = [r["confadapt k=4 tau=0.9"]["tokens"] / r["confadapt k=4 tau=0.9"]["passes"] for r in results[name]]
        lines.append(f"\n{name}: confadapt Eff. k {statistics.median(eff):.2f}.")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
