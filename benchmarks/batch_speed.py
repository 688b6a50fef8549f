"""Decoding speed under batching, side by side in one run: batch 1, 4, 8, 16, 32 on 4-shot GSM8K test
prompts with a distilled SmolLM2-135M checkpoint in bf16.

Methods, at every batch size, on the same prompts:

- HF ``generate`` greedy, the original model and the MTP checkpoint;
- HF prompt-lookup decoding (``prompt_lookup_num_tokens``) on the MTP checkpoint, the training-free
  peer; HF runs it one row at a time (it refuses batches), so at batch B the rows run in turn (and
  in transformers 5.24 it ignores stop strings, running on to ``max_new_tokens``: see
  ``prompt_lookup_stop.py`` for its speed counted both ways);
- the engine: ``ar``, ``confadapt`` tau 0.9 as shipped (``mask_slots="auto"``) and with every one of
  the k-1 slots fed every pass (the paper's method), ``verify`` as shipped (auto width, drafts from
  the prompt where mask proposals are unsure) and with mask drafts only at full width.

Every row stops at EOS, at "Question:" or at ``--max-new-tokens``. Reported: tokens/s (useful tokens:
what each row keeps), Eff. k (tokens per row-pass), the mean time of one decoding pass (forward
hooks; prefill excluded) relative to an ``ar`` pass, the share of time outside the model
(bookkeeping), final answers and whole texts equal to ``ar``'s, peak memory above the loaded models
(resident set sampled every 2 ms). A second part decodes in float32 and checks that ``verify``
(both forms) gives ``ar``'s tokens exactly at every batch size.

    python benchmarks/batch_speed.py --out benchmarks/results/batch_speed.md

The checkpoint defaults to ``benchmarks/runs/distill_smollm2/full-weight`` (``distill_smollm2.py``; ``gated-lora`` beside it is the adapter; the committed results were measured on an earlier full-weight run of it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, REPO, SHARED_GSM8K, gsm8k_prompts, machine_line

import mtp_plugins
from mtp_plugins import load_checkpoint
from mtp_plugins.files import write_atomic

STOP = ["Question:"]
DEFAULT_MODEL = REPO / "benchmarks" / "runs" / "distill_smollm2" / "full-weight"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every 2 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:  # hand freed heap back to the OS, so the baseline is what is really held
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self._rss()
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class ForwardClock:
    """Counts and times the model's forward calls (the first call of each generate is the prefill)."""

    def __init__(self, models: list[Any]) -> None:
        self.handles = []
        for m in models:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.new_generate = True

    def begin(self) -> None:
        """A ``generate`` call starts: its first forward is a prefill."""
        self.new_generate = True

    def _pre(self, module: Any, args: Any) -> None:
        self.start = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        seconds = time.perf_counter() - self.start
        if self.new_generate:
            self.prefill_seconds += seconds
            self.new_generate = False
        else:
            self.decode_seconds += seconds
            self.calls += 1


def final_answer(text: str) -> str:
    """The answer a GSM8K grader reads: after '####', else the last number."""
    text = text.split("Question:")[0]
    marked = re.search(r"####\s*(-?[\d,.]+)", text)
    numbers = [marked.group(1)] if marked else re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else ""


def useful(row: list[int], eos: int, tokenizer: Any) -> list[int]:
    """What a row keeps: up to and including the token that completes a stop string or is EOS (the
    pad id may equal EOS, so padding after a stop string is not counted)."""
    for i, token in enumerate(row):
        if token == eos:
            row = row[: i + 1]
            break
    if any(s in tokenizer.decode(row) for s in STOP):
        return next(row[:n] for n in range(1, len(row) + 1) if any(s in tokenizer.decode(row[:n]) for s in STOP))
    return row


Method = Callable[[Any, int], list[list[int]]]  # (tokenized batch, max_new) -> generated rows


class Methods:
    """The methods under test, each a function of a tokenized batch; engine methods keep their stats."""

    def __init__(self, original: Any, mtp: Any, tokenizer: Any, clock: ForwardClock, args: argparse.Namespace) -> None:
        self.tokenizer, self.clock = tokenizer, clock
        self.table: dict[str, Method] = {}
        self.stats: dict[str, list] = {}
        k, tau = args.k, args.tau
        self.table["HF generate (original)"] = self.hf(original)
        self.table["HF generate (MTP ckpt)"] = self.hf(mtp)
        self.table[f"HF prompt lookup ({args.lookup_tokens})"] = self.lookup(mtp, args.lookup_tokens)
        self.engine("engine ar", mtp, strategy="ar", k=1)
        self.engine(f"confadapt k={k} tau={tau}", mtp, strategy="confadapt", k=k, tau=tau)
        self.engine(f"confadapt k={k} tau={tau}, all slots", mtp, strategy="confadapt", k=k, tau=tau, mask_slots=k - 1)
        self.engine(f"verify k={k}", mtp, strategy="verify", k=k)
        self.engine(f"verify k={k}, mask drafts, all slots", mtp, strategy="verify", k=k, mask_slots=k - 1,
                    draft_lookup=0)

    def hf(self, model: Any, **extra: Any) -> Method:
        tokenizer = self.tokenizer

        def run(enc: Any, max_new: int) -> list[list[int]]:
            self.clock.begin()
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, stop_strings=STOP,
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, **extra)
            return out[:, enc.input_ids.shape[1] :].tolist()
        return run

    def lookup(self, model: Any, n_tokens: int) -> Method:
        one = self.hf(model, prompt_lookup_num_tokens=n_tokens)

        def run(enc: Any, max_new: int) -> list[list[int]]:
            rows = []
            for ids, mask in zip(enc.input_ids, enc.attention_mask):  # HF: batch size 1 only
                real = ids[mask.bool()][None]
                rows += one(type(enc)({"input_ids": real, "attention_mask": torch.ones_like(real)}), max_new)
            return rows
        return run

    def engine(self, name: str, model: Any, **options: Any) -> None:
        stats = self.stats[name] = []

        def run(enc: Any, max_new: int) -> list[list[int]]:
            self.clock.begin()
            out = mtp_plugins.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new,
                                       stop_strings=STOP, tokenizer=self.tokenizer, **options)
            stats.append(out.stats)
            return out.sequences[:, enc.input_ids.shape[1] :].tolist()
        self.table[name] = run


def run_batch_size(methods: Methods, prompts: list[str], batch: int, max_new: int) -> list[dict[str, Any]]:
    tokenizer, clock = methods.tokenizer, methods.clock
    encs = [tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True) for i in range(0, len(prompts), batch)]
    # Warm-up: allocator, thread pools, and the engine's pass-cost tables for this batch and every
    # smaller one that retiring rows lead to (timed once per process, as in an lm-eval run).
    short = [tokenizer.decode(tokenizer(p).input_ids[-24:]) for p in prompts[:batch]]
    for name, method in methods.table.items():
        sizes = [1 << i for i in range(batch.bit_length()) if 1 << i < batch] if name in methods.stats else []
        for size in [*sizes, batch]:
            method(tokenizer(short[:size], return_tensors="pt", padding=True), 4)
    for s in methods.stats.values():
        s.clear()
    eos = tokenizer.eos_token_id
    records = []
    for name, method in methods.table.items():
        clock.reset()
        rows: list[list[int]] = []
        with PeakRSS() as memory:
            start = time.perf_counter()
            for enc in encs:
                rows += method(enc, max_new)
            seconds = time.perf_counter() - start
        rows = [useful(r, eos, tokenizer) for r in rows]
        tokens = sum(len(r) for r in rows)
        stats = methods.stats.get(name)
        slots = [n for s in stats for n in s.mask_slots_per_call] if stats else []
        records.append({
            "method": name, "batch": batch, "prompts": len(prompts), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "calls": clock.calls, "decode_seconds": clock.decode_seconds,
            "prefill_seconds": clock.prefill_seconds,
            "eff_k": sum(s.tokens for s in stats) / sum(s.forward_passes for s in stats) if stats else None,
            "mean_slots": sum(slots) / len(slots) if slots else None,
            "peak_mib": memory.mib,
            "texts": [tokenizer.decode(r, skip_special_tokens=True) for r in rows],
        })
        print(f"  batch {batch:>2} {name:<44} {tokens:>5} tokens {seconds:7.1f} s {tokens / seconds:7.1f} tok/s",
              flush=True)
    return records


def add_comparisons(records: list[dict[str, Any]]) -> None:
    ar = next(r for r in records if r["method"] == "engine ar")
    hf = next(r for r in records if r["method"] == "HF generate (MTP ckpt)")
    ar_pass = ar["decode_seconds"] / max(ar["calls"], 1)
    for r in records:
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
        r["vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["pass_cost"] = (r["decode_seconds"] / max(r["calls"], 1)) / ar_pass
        r["outside_model"] = 1 - (r["decode_seconds"] + r["prefill_seconds"]) / r["seconds"]
        r["same_text"] = sum(a == b for a, b in zip(r["texts"], ar["texts"]))
        r["same_answer"] = sum(final_answer(a) == final_answer(b) for a, b in zip(r["texts"], ar["texts"]))
        decode_rate = r["tokens"] / max(r["seconds"] - r["prefill_seconds"], 1e-9)
        ar_decode_rate = ar["tokens"] / max(ar["seconds"] - ar["prefill_seconds"], 1e-9)
        r["decode_speedup_vs_ar"] = decode_rate / ar_decode_rate
        # What the passes alone allow: Eff. k tokens per row-pass at this pass cost.
        r["ideal_speedup"] = r["eff_k"] / r["pass_cost"] if r["eff_k"] else None


def exactness(path: str, prompts: list[str], batch_sizes: list[int], k: int, max_new: int) -> list[str]:
    model, tokenizer, _ = load_checkpoint(path, dtype=torch.float32)
    tokenizer.padding_side = "left"
    lines = []
    for batch in batch_sizes:
        enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)

        def run(**options: Any) -> list[list[int]]:
            return mtp_plugins.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new,
                                        eos_token_id=[], **options).sequences.tolist()

        ar = run(strategy="ar", k=1)
        shipped = run(strategy="verify", k=k)
        paper = run(strategy="verify", k=k, mask_slots=k - 1, draft_lookup=0)
        same = (sum(a == b for a, b in zip(shipped, ar)), sum(a == b for a, b in zip(paper, ar)))
        ok = same == (batch, batch)
        lines.append(f"- batch {batch}: `verify` k={k} (shipped) {same[0]}/{batch} rows, (mask drafts, all slots) "
                     f"{same[1]}/{batch} rows token-identical to `ar` over {max_new} tokens: {'PASS' if ok else 'FAIL'}")
        print(lines[-1], flush=True)
    return lines


def report(records: list[dict[str, Any]], args: argparse.Namespace, exact_lines: list[str]) -> str:
    k, tau = args.k, args.tau
    lines = [
        "# Decoding speed under batching",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {date.today()}; machine: {machine_line()}  ",
        f"Model: {args.model} ({args.dtype}); original: {args.original}. 4-shot GSM8K test prompts "
        f"(max(batch, {args.min_prompts}) per batch size, the same for every method), greedy, stop at EOS or "
        f"{STOP}, max {args.max_new_tokens} new tokens. One timed run per method after a warm-up call.",
        "",
        "| batch | method | tokens/s | vs HF (MTP) | vs ar | Eff. k | mask slots | pass cost vs ar | outside model | "
        "answers = ar | texts = ar | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in records:
        n = len(r["texts"])
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_hf']:.2f} | {r['vs_ar']:.2f} | "
            f"{number(r['eff_k'])} | {number(r['mean_slots'])} | {r['pass_cost']:.2f} | {r['outside_model']:.1%} | "
            f"{r['same_answer']}/{n} | {r['same_text']}/{n} | {r['peak_mib']:.0f} |"
        )
    lines += ["", "## Targets", ""]
    lines += checks(records, k, tau)
    lines += ["", f"## Exactness in float32 (`verify` vs `ar`, {args.exact_max_new} tokens, no EOS)", ""] + exact_lines
    return "\n".join(lines) + "\n"


def checks(records: list[dict[str, Any]], k: int, tau: float) -> list[str]:
    out = []
    conf = f"confadapt k={k} tau={tau}"
    for r in records:
        if r["method"] == conf and r["batch"] <= 16:
            hf = max(x["tokens_per_s"] for x in records if x["batch"] == r["batch"] and x["method"].startswith("HF generate"))
            ratio = r["tokens_per_s"] / hf
            out.append(f"- batch {r['batch']}: confadapt tokens/s / the faster HF generate = {ratio:.2f} "
                       f"(target >= 1): {'PASS' if ratio >= 1 else 'FAIL'}")
        if r["method"] == conf and r["batch"] == 1:
            share = r["decode_speedup_vs_ar"] / r["ideal_speedup"]
            out.append(f"- batch 1: confadapt decode speedup over ar {r['decode_speedup_vs_ar']:.2f} vs Eff. k / pass "
                       f"cost {r['ideal_speedup']:.2f} = {share:.2f} (target >= 0.85): {'PASS' if share >= 0.85 else 'FAIL'}")
    for batch in sorted({r["batch"] for r in records}):
        here = [r for r in records if r["batch"] == batch]
        lookup = next(r for r in here if r["method"].startswith("HF prompt lookup"))
        best = max((r for r in here if r["method"].startswith(("verify", "confadapt")) and
                    (r["method"].startswith("verify") or r["same_answer"] >= 0.9 * len(r["texts"]))),
                   key=lambda r: r["tokens_per_s"])
        ratio = best["tokens_per_s"] / lookup["tokens_per_s"]
        out.append(f"- batch {batch}: fastest of verify / confadapt (>= 90% answers = ar) is {best['method']}, "
                   f"{ratio:.2f}x HF prompt lookup: {'PASS' if ratio > 1 else 'FAIL'}")
    return out


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name in names:
        rows = [r for r in records if r["method"] == name]
        style = "--" if name.startswith("HF") else "-"
        batches = [r["batch"] for r in rows]
        axes[0].plot(batches, [r["tokens_per_s"] for r in rows], style, marker="o", label=name)
        axes[1].plot(batches, [r["vs_hf"] for r in rows], style, marker="o", label=name)
    for ax, title in zip(axes, ["tokens/s", "tokens/s vs HF generate (MTP checkpoint)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="distilled MTP checkpoint directory")
    parser.add_argument("--original", help="the model before distillation (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--min-prompts", type=int, default=8, help="prompts per batch size at least")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens")
    parser.add_argument("--exact-batch-sizes", default="1,4,8,16,32", help="float32 exactness part ('' to skip)")
    parser.add_argument("--exact-max-new", type=int, default=32)
    parser.add_argument("--out", type=Path, help="markdown report; the plot and raw JSON go next to it")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"no checkpoint at {args.model}: run benchmarks/distill_smollm2.py first, or pass --model")
    if args.original is None:
        from mtp_plugins.smollm2 import prepare_smollm2

        args.original = str(prepare_smollm2())

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = gsm8k_prompts(args.gsm8k, max(max(batch_sizes), args.min_prompts), args.shots)
    mtp, tokenizer, _ = load_checkpoint(args.model, dtype=DTYPES[args.dtype])
    original, _, _ = load_checkpoint(args.original, dtype=DTYPES[args.dtype])
    tokenizer.padding_side = "left"
    table = Methods(original, mtp, tokenizer, ForwardClock([original, mtp]), args)
    records = []
    for batch in batch_sizes:
        here = run_batch_size(table, prompts[: max(batch, args.min_prompts)], batch, args.max_new_tokens)
        add_comparisons(here)
        records += here
    exact_sizes = [int(b) for b in args.exact_batch_sizes.split(",") if b]
    exact_lines = exactness(args.model, prompts, exact_sizes, args.k, args.exact_max_new) if exact_sizes else []
    text = report(records, args, exact_lines)
    print(text)
    if args.out:
        write_atomic(args.out, text)
        write_atomic(args.out.with_suffix(".json"), json.dumps(records, indent=1))
        plot(records, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
