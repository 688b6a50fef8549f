"""What glibc malloc tuning (``mtp_plugins/allocator.py``) does to decoding and training on this CPU.

The setting is per process (glibc's dynamic mmap threshold cannot be restored once set), so each
measurement is a child process, with glibc's defaults (``MTP_PLUGINS_MALLOC=0``), or the decoding
or the training thresholds of ``mtp_plugins.allocator.THRESHOLDS`` (set through glibc's own
variables), the order rotated per round. A decoding child times, at batch 1 on the demo task's
prompts (synthetic_gsm_easy with its shots), bf16: the prompt's prefill, HF ``generate`` (greedy, a
fixed number of new tokens, EOS ignored) and the engine's ``ar`` and ``confadapt`` (k 4, tau 0.9),
and returns its tokens, which must be the same under every setting. A training child takes the demo
recipe's first steps (``smollm2-demo``, gated adapters, bf16) on SmolLM2-135M-Instruct, times the
steps after two warm-up steps and returns every step's loss and gradient norm and its peak
resident memory (at 2 threads a training is not bitwise repeatable from run to run, so "same
result" can read NO for training under any setting; at 1 thread it repeats).

    python benchmarks/malloc_effect.py [--model mtp-demo/distilled] --out benchmarks/results/malloc_effect.md

Default model of the decoding child: SmolLM2-135M-Instruct with a mask token added in memory
(untrained: ``confadapt`` then emits about one token a pass, which still times a pass of 1 + 3 mask slots).
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

from mtp_plugins.allocator import THRESHOLDS


def _glibc(workload: str) -> dict[str, str]:
    mmap, trim = THRESHOLDS[workload]
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap), "MALLOC_TRIM_THRESHOLD_": str(trim)}


SETTINGS = {"glibc defaults": {"MTP_PLUGINS_MALLOC": "0"},
            "decoding's (64 / 256 MiB)": _glibc("decode"),
            "training's (1 GiB / 2 GiB)": _glibc("train")}
DECODING = ("prefill", "HF generate", "engine ar", "confadapt k=4 tau=0.9")
TRAINING = "demo training step"
WARMUP_STEPS = 2


def train_child(args: argparse.Namespace) -> None:
    """The demo recipe's first steps: seconds per step, a hash of every step's loss and gradient norm, peak RSS."""
    import resource
    import tempfile

    from common import MALLOC

    from mtp_plugins.smollm2 import prepare_smollm2
    from train_cli.config import build_config
    from train_cli.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(build_config("smollm2-demo", model=str(prepare_smollm2()), output_dir=out, max_steps=1000))
        trainer.setup()
        steps = [trainer.train_step() for _ in range(WARMUP_STEPS + args.train_steps)]
    timed = steps[WARMUP_STEPS:]
    # Every step's loss and gradient norm, exactly (at 2 threads they, and the weights, can differ
    # from run to run by ~1e-9 under any one setting: not the allocator's doing).
    trace = json.dumps([[m["loss"], m["grad_norm"]] for m in steps])
    print(json.dumps({"malloc": MALLOC.describe(), "state": MALLOC.state, TRAINING: {
        "seconds": sum(m["seconds"] for m in timed), "steps": len(timed),
        "sha256": hashlib.sha256(trace.encode()).hexdigest(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))


def decode_child(args: argparse.Namespace) -> None:
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

    runs = dict(zip(DECODING, (prefill, hf, engine("ar", 1), engine("confadapt", 4))))
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
    parser.add_argument("--train-steps", type=int, default=6, help="Timed demo training steps (0: no training child)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=("decode", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "decode":
        return decode_child(args)
    if args.child == "train":
        return train_child(args)

    from common import header, publish

    here = Path(__file__).resolve().parent
    common = ["--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--train-steps",
              str(args.train_steps)] + (["--model", args.model] if args.model else [])
    children = {"decode": DECODING} | ({"train": (TRAINING,)} if args.train_steps > 0 else {})
    methods = [m for ms in children.values() for m in ms]
    results: dict[str, list[dict]] = {name: [{} for _ in range(args.rounds)] for name in SETTINGS}
    for round_ in range(args.rounds):
        shift = round_ % len(SETTINGS)
        order = list(SETTINGS)[shift:] + list(SETTINGS)[:shift]
        for kind in children:
            for name in order:
                environment = ({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MTP_PLUGINS_MALLOC"}
                               | SETTINGS[name])
                proc = subprocess.run([sys.executable, str(here / "malloc_effect.py"), "--child", kind, *common],
                                      capture_output=True, text=True, env=environment, cwd=here, check=False)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                results[name][round_].update(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {name}: " + ", ".join(
                    f"{m} {results[name][round_][m]['seconds']:.2f} s" for m in children[kind]), file=sys.stderr, flush=True)

    def per_unit(name: str, method: str) -> list[float]:
        """ms per prompt (prefill), per token (HF generate), per pass (engine), s per step (training); one per round."""
        rows = [r[method] for r in results[name]]
        if method == "prefill":
            return [1000 * r["seconds"] / args.prompts for r in rows]
        if method == "HF generate":
            return [1000 * r["seconds"] / r["tokens"] for r in rows]
        if method == TRAINING:
            return [r["seconds"] / r["steps"] for r in rows]
        return [1000 * r["seconds"] / r["passes"] for r in rows]

    def ratio(a: list[float], b: list[float]) -> str:
        values = sorted(x / y for x, y in zip(a, b))
        return f"{statistics.median(values):.2f}x ({values[0]:.2f}..{values[-1]:.2f})"

    names = list(SETTINGS)
    tuned = names[-1]  # the ratios' denominator
    lines = header("glibc malloc tuning: decoding and a training step under glibc's defaults, decoding's and training's thresholds")
    lines += [f"Decoding: the first {args.prompts} prompts of synthetic_gsm_easy with its shots; {args.max_new_tokens} new tokens "
              f"each (EOS ignored), bf16, batch 1; model: {args.model or 'SmolLM2-135M-Instruct (untrained mask token)'}. "
              + (f"Training: the demo recipe (smollm2-demo) on SmolLM2-135M-Instruct, {args.train_steps} steps timed after "
                 f"{WARMUP_STEPS} warm-up steps. " if args.train_steps > 0 else "")
              + f"{args.rounds} rounds, each setting its own process, the order rotated per round. "
              "The thresholds are set through glibc's own variables (the values of mtp_plugins.allocator.THRESHOLDS): "
              f"{results[names[1]][0]['malloc']}; {results[tuned][0]['malloc']}.", "",
              "| | unit | " + " | ".join(names) + " | " + " | ".join(f"{n} / training's" for n in names[:-1]) + " | same result |",
              "|---|---|" + "---|" * (2 * len(names))]
    units = {"prefill": "ms / prompt", "HF generate": "ms / token", "engine ar": "ms / pass",
             "confadapt k=4 tau=0.9": "ms / pass", TRAINING: "s / step"}
    for method in methods:
        values = {name: per_unit(name, method) for name in names}
        hashes = {r[method]["sha256"] for name in names for r in results[name]} if method != "prefill" else set()
        same = "-" if method == "prefill" else "yes" if len(hashes) == 1 else f"NO ({len(hashes)} different)"
        lines.append(f"| {method} | {units[method]} | " + " | ".join(f"{statistics.median(v):.2f}" for v in values.values())
                     + " | " + " | ".join(ratio(values[n], values[tuned]) for n in names[:-1]) + f" | {same} |")
    lines.append("")
    for name in names:
        eff = [r["confadapt k=4 tau=0.9"]["tokens"] / r["confadapt k=4 tau=0.9"]["passes"] for r in results[name]]
        rss = [r[TRAINING]["peak_rss_gb"] for r in results[name]] if args.train_steps > 0 else []
        lines.append(f"- {name}: confadapt Eff. k {statistics.median(eff):.2f}"
                     + (f"; training child's peak RSS {max(rss):.2f} GB" if rss else "") + ".")
    lines += ["", "Same result: decoding, the generated tokens; training, every step's loss and gradient norm, exactly."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
