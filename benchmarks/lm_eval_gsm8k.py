"""A real lm-eval run on GSM8K, side by side in one process: ``--model hf`` vs ``--model mtp``
with ``strategy=ar`` vs ``strategy=confadapt`` (k=8, tau=0.9), on the stock ``gsm8k`` task and our
``gsm8k_cot_mtp``, at batch 1 and 8.

Model: SmolLM2-135M-Instruct plus an (untrained) mask token, bf16, saved once as a checkpoint
directory. GSM8K comes from ``../shared`` through a private, seeded datasets cache (offline).
Reports seconds per sample (time inside ``generate_until``), generated tokens per second (the
responses re-tokenized, the same count for every backend), Eff. k, exact match, and how many
answers equal ``hf``'s.

    python benchmarks/lm_eval_gsm8k.py --limit 16 --out benchmarks/results/lm_eval_gsm8k.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common import REPO, machine_line

CONFIGS = [
    ("hf", "hf", ""),
    ("mtp ar", "mtp", "strategy=ar"),
    ("mtp confadapt k=8 tau=0.9", "mtp", "strategy=confadapt,k=8,tau=0.9"),
]


def prepare_checkpoint(cache: Path) -> Path:
    """SmolLM2-135M-Instruct with one mask token added, as an ordinary HF directory."""
    target = cache / "SmolLM2-135M-Instruct-mtp-untrained"
    if (target / "config.json").exists():
        return target
    from mtp_plugins import add_mask_tokens, load_checkpoint
    from mtp_plugins.smollm2 import prepare_smollm2

    model, tokenizer, _ = load_checkpoint(prepare_smollm2())
    add_mask_tokens(model, tokenizer)
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def load_lm(model: str, model_args: str, batch_size: int):
    """An lm-eval model object whose ``generate_until`` adds its wall time to ``lm.generation_seconds``."""
    from lm_eval.api.registry import get_model

    lm = get_model(model).create_from_arg_string(
        model_args, {"batch_size": batch_size, "device": "cpu"}
    )
    generate_until = lm.generate_until
    lm.generation_seconds = []

    def timed(requests, *args, **kwargs):
        start = time.perf_counter()
        try:
            return generate_until(requests, *args, **kwargs)
        finally:
            lm.generation_seconds.append(time.perf_counter() - start)

    lm.generate_until = timed
    return lm


def evaluate(lm, task: str, limit: int):
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=True)
    responses = {s["doc_id"]: s["resps"][0][0] for s in results["samples"][task]}
    tokens = sum(len(lm.tokenizer(r, add_special_tokens=False).input_ids) for r in responses.values())
    accuracy = results["results"][task]["exact_match,flexible-extract"]
    stderr = results["results"][task]["exact_match_stderr,flexible-extract"]
    mtp = results["config"].get("mtp", {})
    return {"tokens": tokens, "accuracy": accuracy, "stderr": stderr, "eff_k": mtp.get("eff_k"), "responses": responses}


def run_configs(checkpoint: Path, dtype: str, task: str, limit: int, batch_size: int, repeats: int) -> dict:
    """Every config on the same task and batch size, repeated in rotation; median generation time."""
    lms = {
        label: load_lm(model, f"pretrained={checkpoint},dtype={dtype}" + (f",{extra}" if extra else ""), batch_size)
        for label, model, extra in CONFIGS
    }
    rows = {}
    for _ in range(repeats):  # rotation: drift of the machine hits every config alike
        for label, lm in lms.items():
            rows[label] = evaluate(lm, task, limit)
    for label, lm in lms.items():
        rows[label]["seconds"] = statistics.median(lm.generation_seconds)
    return rows


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--tasks", default="gsm8k,gsm8k_cot_mtp")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from mtp_plugins.smollm2 import cache_root

    cache = cache_root()
    hf_home = cache / "benchmark-hf-home"
    os.environ["HF_HOME"] = str(hf_home)  # before datasets is imported: a private, seeded cache
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, str(args.shared / "tools" / "seed_gsm8k_cache.py"), "--cache-dir",
                    str(hf_home / "datasets")], check=True, capture_output=True)
    checkpoint = prepare_checkpoint(cache)

    lines = [
        "# lm-eval on GSM8K: `hf` vs `mtp` (untrained mask token)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {date.today()}; machine: {machine_line()}  ",
        f"Model: SmolLM2-135M-Instruct + one mask token ({checkpoint}), dtype={args.dtype}; "
        f"--limit {args.limit}; flexible-extract exact match. Seconds: median over {args.repeats} rotations of "
        "the time spent inside `generate_until`; "
        "tokens are the final responses re-tokenized (the same count for every backend).",
        "",
        "| task | batch | model | s/sample | tokens/s | time vs hf | Eff. k | exact match | answers equal to hf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for task in args.tasks.split(","):
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            rows = run_configs(checkpoint, args.dtype, task, args.limit, batch_size, args.repeats)
            hf = rows["hf"]
            for label, r in rows.items():
                same = sum(r["responses"][d] == hf["responses"][d] for d in hf["responses"])
                line = (
                    f"| {task} | {batch_size} | {label} | {r['seconds'] / args.limit:.2f} | "
                    f"{r['tokens'] / r['seconds']:.1f} | {r['seconds'] / hf['seconds']:.3f} | "
                    f"{r['eff_k'] if r['eff_k'] is None else format(r['eff_k'], '.2f')} | "
                    f"{r['accuracy']:.3f} ± {_number(r['stderr'])} | {same}/{len(hf['responses'])} |"
                )
                lines.append(line)
                print(line, flush=True)
            ar = rows["mtp ar"]
            same = sum(ar["responses"][d] == hf["responses"][d] for d in hf["responses"])
            checks.append(
                f"{task}, batch {batch_size}: mtp ar time / hf time = {ar['seconds'] / hf['seconds']:.3f} "
                f"(target <= 1.05), identical answers {same}/{len(hf['responses'])}"
            )
    lines += ["", "## Targets", ""] + [f"- {c}" for c in checks] + [""]
    print("\n".join(lines[-len(checks) - 1:]))
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
