"""``mtp-sweep``'s outputs: ``report.md`` (one row per point) and ``pareto.png``.

Accuracy, Eff. k and answer agreement come from the accuracy pass (lm-eval); speeds come only from
the timing phase (``timing.py``: interleaved rounds on the same prompts), never from the accuracy
pass, whose points run one after another.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mtp_plugins.files import atomic_writer

# METHOD.md section 8: Llama-3.1-8B-Magpie, GSM8K 8-shot CoT, flexible extract (accuracy %, Eff. k).
PAPER_8B = {
    "untouched ar": [(69.5, 1.0)],
    "MTP ar": [(66.0, 1.0)],
    "MTP confadapt": [(66.0, 2.1), (64.7, 2.8), (64.1, 3.3), (59.2, 4.2), (46.6, 6.1)],
    "MTP static": [(60.7, 2.0), (53.0, 3.0), (41.5, 5.0)],
}


def agreement(a: dict[str, str], b: dict[str, str]) -> tuple[int, int]:
    shared = sorted(set(a) & set(b))
    return sum(a[d] == b[d] for d in shared), len(shared)


def _count(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    return "{}/{}".format(*agreement(a[key], b[key])) if a and b else "-"


def _speed_cells(name: str, timing: dict[str, Any] | None) -> list[str]:
    if not timing:
        return []
    cells = []
    for batch in timing["batch_sizes"]:
        row = timing["summary"][str(batch)].get(name, {})
        tps, up = row.get("tokens_per_second"), row.get("speedup")
        cells.append(f"{tps[0]:.1f} ({tps[1]:.1f}..{tps[2]:.1f})" if tps else "-")
        cells.append(f"{up[0]:.2f}x ({up[1]:.2f}..{up[2]:.2f})" if up else "-")
    return cells


def report(records: list[dict[str, Any]], sweep: Any, command: str, timing: dict[str, Any] | None) -> str:
    """report.md: accuracy +- stderr, Eff. k, timed speed (median (min..max)) and agreement per point."""
    by_name = {r["point"]["name"]: r for r in records}
    hf, ar = by_name.get("hf"), by_name.get("ar")
    metric = records[0]["metric"]
    speed_heads = []
    if timing:
        for batch in timing["batch_sizes"]:
            speed_heads += [f"tokens/s, batch {batch}", f"speed-up vs {timing['reference']}, batch {batch}"]
    heads = ["point", "accuracy", "Eff. k", *speed_heads, "answers = ar", "answers = hf", "texts = hf"]
    lines = [
        f"# MTP sweep: {sweep.task}",
        "",
        f"- checkpoint: `{sweep.model_path}`; original model (`hf` row): `{sweep.original_path}`",
        f"- task `{sweep.task}`, limit {sweep.limit}, batch size {sweep.batch_size}, {sweep.dtype} on {sweep.device}; "
        f"accuracy = `{metric}`",
        f"- command: `{command}`",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for r in records:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}" if not math.isnan(r["stderr"]) else f"{100 * r['accuracy']:.1f}"
        cells = [r["point"]["name"], acc, f"{r['eff_k']:.2f}", *_speed_cells(r["point"]["name"], timing),
                 _count(r, ar, "answers"), _count(r, hf, "answers"), _count(r, hf, "responses")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_notes(timing)]
    return "\n".join(lines) + "\n"


def _notes(timing: dict[str, Any] | None) -> list[str]:
    if timing:
        speed = (
            "Speed: generated tokens per second of generation time, timed after the accuracy pass on the same prompts "
            f"for every point (the task's formatted contexts of the first documents: {_prompt_counts(timing)}), in one process, "
            f"{timing['repeats']} rounds with the points interleaved (round-robin, order rotated each round) after one "
            "warm-up batch each; the median with the min..max over the rounds. Speed-up: this point's tokens/s over "
            f"`{timing['reference']}`'s in the same round; median (min..max) over the rounds."
        )
    else:
        speed = "Speed: not timed (--timing-repeats 0)."
    return [
        speed,
        "Eff. k = tokens emitted / forward passes (1 for `hf` and `ar`). `answers = ar`: final answers (after the "
        "metric's filter) equal to the same checkpoint's `ar` answers; `answers = hf`: equal to the original model's; "
        "`texts = hf`: whole generated texts equal to the original model's.",
    ]


def _prompt_counts(timing: dict[str, Any]) -> str:
    return ", ".join(f"{n} at batch {b}" for b, n in timing["prompts"].items())


def _speedups(rows: list[dict[str, Any]], timing: dict[str, Any] | None) -> list[tuple[float, float, float]] | None:
    """(median, min, max) batch-1 speed-up of each row, or None where the rows were not all timed."""
    if not timing:
        return None
    summary = timing["summary"][str(timing["batch_sizes"][0])]
    found = [summary.get(r["point"]["name"], {}).get("speedup") for r in rows]
    return [tuple(f) for f in found] if all(found) else None


def plot(records: list[dict[str, Any]], path: Path, timing: dict[str, Any] | None = None) -> bool:
    """pareto.png; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ar = next((r for r in records if r["point"]["name"] == "ar"), None)
    fig, (left, right, agree) = plt.subplots(1, 3, figsize=(17, 4.8), constrained_layout=True)
    styles = {"hf": ("black", "s"), "ar": ("tab:blue", "o"), "static": ("tab:orange", "^"), "confadapt": ("tab:green", "D")}
    for group, (color, marker) in styles.items():
        rows = sorted((r for r in records if (r["point"]["strategy"] or "hf") == group), key=lambda r: r["eff_k"])
        if not rows:
            continue
        line = "-" if len(rows) > 1 else "none"
        acc = [100 * r["accuracy"] for r in rows]
        err = [0 if math.isnan(r["stderr"]) else 100 * r["stderr"] for r in rows]
        effk = [r["eff_k"] for r in rows]
        left.errorbar(effk, acc, yerr=err, color=color, marker=marker, linestyle=line, capsize=3, label=f"this run: {group}")
        speed = _speedups(rows, timing)
        if speed:
            order = sorted(range(len(rows)), key=lambda i: speed[i][0])
            xerr = [[speed[i][0] - speed[i][1] for i in order], [speed[i][2] - speed[i][0] for i in order]]
            right.errorbar([speed[i][0] for i in order], [acc[i] for i in order], xerr=xerr, yerr=[err[i] for i in order],
                           color=color, marker=marker, linestyle=line, capsize=3, label=group)
        if ar and group in ("static", "confadapt"):
            same = [100 * equal / max(1, shared) for equal, shared in (agreement(r["answers"], ar["answers"]) for r in rows)]
            agree.plot(effk, same, color=color, marker=marker, linestyle=line, label=group)
            for i, (r, x, y) in enumerate(zip(rows, effk, same)):
                label = f"τ {r['point']['tau']:g}" if group == "confadapt" else f"k {r['point']['k']}"
                agree.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -10), fontsize=8, color=color)
    _decorate(left, right, agree, records, timing)
    fig.suptitle(f"{records[0]['settings']['task']}: {Path(records[0]['settings']['model']).name}")
    try:
        with atomic_writer(path, "wb") as f:
            fig.savefig(f, format="png", dpi=130)
    finally:
        plt.close(fig)
    return True


def _decorate(left: Any, right: Any, agree: Any, records: list[dict[str, Any]], timing: dict[str, Any] | None) -> None:
    for name, pts in PAPER_8B.items():
        marker = {"untouched ar": "s", "MTP ar": "o", "MTP confadapt": "D", "MTP static": "^"}[name]
        left.plot([p[1] for p in pts], [p[0] for p in pts], color="gray", marker=marker, alpha=0.45, linestyle=":",
                  markerfacecolor="none", label=f"paper 8B (GSM8K): {name}")
    left.set_xlabel("Eff. k (tokens per forward pass)")
    left.set_ylabel("accuracy (%)")
    left.set_title("accuracy vs tokens per pass")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    if timing:
        batch = timing["batch_sizes"][0]
        right.set_xlabel(f"speed-up vs {timing['reference']}: tokens/s ratio at batch {batch} (median, min..max)")
        right.legend(fontsize=8, loc="best")
    else:
        right.set_xlabel("speed-up: not timed (--timing-repeats 0)")
    right.set_ylabel("accuracy (%)")
    right.set_title("accuracy vs measured speed-up (interleaved timings)")
    right.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    right.grid(alpha=0.3)
    agree.set_xlabel("Eff. k (tokens per forward pass)")
    agree.set_ylabel("final answers equal to ar (%)")
    agree.set_title("faithfulness to the checkpoint's own greedy answers")
    agree.set_ylim(-5, 105)
    agree.axhline(90, color="gray", linewidth=0.8, linestyle="--")
    agree.grid(alpha=0.3)
    if any(r["point"]["name"] == "ar" for r in records):
        agree.legend(fontsize=8, loc="best")
