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


def lossless(record: dict[str, Any]) -> bool:
    """The point's output is greedy decoding of the same checkpoint by contract: ``hf`` (the original
    model's own greedy decoding) and points whose registered decoder declares ``lossless``."""
    point = record["point"]
    if point["backend"] == "hf":
        return True
    from mtp_plugins.registry import PluginError, load_decoder

    try:
        return bool(load_decoder(point["strategy"]).lossless)
    except PluginError:  # a plugin decoder no longer installed: no contract to go by
        return False


def short_name(record: dict[str, Any]) -> str:
    """A point's label in the plot: "original", "ar", "verify", "verify + lookup 3", "k 3", "τ 0.9"."""
    point = record["point"]
    if point["backend"] == "hf":
        return "original"
    if point["strategy"] == "verify":
        return f"verify + lookup {point['draft_lookup']}" if point.get("draft_lookup") else "verify"
    if point["strategy"] == "static":
        return f"k {point['k']}"
    if point["strategy"] == "confadapt":
        return f"τ {point['tau']:g}"
    return point["name"]


def _speed_cells(name: str, timing: dict[str, Any] | None) -> list[str]:
    if not timing:
        return []
    cells = []
    for batch in timing["batch_sizes"]:
        row = timing["summary"][str(batch)].get(name, {})
        tps, up = row.get("tokens_per_second"), row.get("speedup")
        cells.append(f"{tps[0]:.1f} ({tps[1]:.1f}..{tps[2]:.1f})" if tps else "-")
        cells.append(f"{up[0]:.2f}x ({up[1]:.2f}..{up[2]:.2f})" if up else "-")
        eff_k = row.get("eff_k")
        cells.append(f"{eff_k[0]:.2f}" if eff_k else "-")
    return cells


def report(records: list[dict[str, Any]], sweep: Any, command: str, timing: dict[str, Any] | None) -> str:
    """report.md: accuracy +- stderr, Eff. k, timed speed (median (min..max)) and agreement per point."""
    by_name = {r["point"]["name"]: r for r in records}
    hf, ar = by_name.get("hf"), by_name.get("ar")
    metric = records[0]["metric"]
    speed_heads = []
    if timing:
        for batch in timing["batch_sizes"]:
            speed_heads += [f"tokens/s, batch {batch}", f"speed-up vs {timing['reference']}, batch {batch}",
                            f"Eff. k, batch {batch}"]
    heads = ["point", "lossless by contract", "accuracy", f"Eff. k, accuracy pass (batch {sweep.batch_size})", *speed_heads,
             "answers = ar", "answers = hf", "texts = hf"]
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
        cells = [r["point"]["name"], "yes" if lossless(r) else "no", acc, f"{r['eff_k']:.2f}",
                 *_speed_cells(r["point"]["name"], timing),
                 _count(r, ar, "answers"), _count(r, hf, "answers"), _count(r, hf, "responses")]
        lines.append("| " + " | ".join(cells) + " |")
    recovery = sorted({r["point"].get("recovery") or 0 for r in records if r["point"].get("strategy") == "verify"})
    lines += ["", *_notes(timing, recovery)]
    return "\n".join(lines) + "\n"


def _recovery_note(recovery: list[int]) -> str:
    if not any(recovery):
        return ""
    groups = "/".join(str(g) for g in recovery)
    return (f"; each pass also feeds {groups} recovery group(s) of mask slots after the decided token (and the first "
            "drafts), so that a rejected draft still leaves the next pass drafts")


def _warmup(timing: dict[str, Any]) -> str:
    """The warm-up's length as the timing recorded it (timings made before it was recorded: nothing)."""
    tokens = timing.get("warmup_tokens")
    return f" (at most {tokens} new tokens)" if tokens else ""


def _notes(timing: dict[str, Any] | None, recovery: list[int] = ()) -> list[str]:
    if timing:
        speed = (
            "Speed: generated tokens per second of generation time, timed after the accuracy pass on the same prompts "
            f"for every point (the task's formatted contexts of the first documents: {_prompt_counts(timing)}), in one process, "
            f"{timing['repeats']} rounds after one warm-up batch each{_warmup(timing)}, the points interleaved batch by batch (each batch of prompts "
            "generated by every point in turn, the order rotated per batch and round); the median with the min..max over the rounds. Speed-up: this point's tokens/s over "
            f"`{timing['reference']}`'s in the same round; median (min..max) over the rounds."
            + (f" Allocator: {timing['malloc']}." if timing.get("malloc") else "")
        )
    else:
        speed = "Speed: not timed (--timing-repeats 0)."
    return [
        speed,
        "`lossless by contract`: yes where the output equals greedy `ar` decoding of the same checkpoint by "
        "construction (`hf`: the original model itself; `ar`, `verify`: only tokens the model's own next-token "
        "prediction confirms are emitted), in exact arithmetic; in bf16 a wider pass may round differently, which "
        "the `answers = ar` column counts. `verify` drafts from the mask slots alone, `verify-lookupN` also from "
        "n-grams (up to N tokens) of the prompt and output" + _recovery_note(recovery) + ". No: the decoder may emit tokens greedy decoding would "
        "not (faster, may change answers).",
        "Eff. k = tokens emitted / forward passes (1 for `hf` and `ar`), in the accuracy pass and in the timed generations at each batch size (`verify` feeds mask slots by the cost of the batch, so its Eff. k at batch 1 can be higher). `answers = ar`: final answers (after the "
        "metric's filter) equal to the same checkpoint's `ar` answers; `answers = hf`: equal to the original model's; "
        "`texts = hf`: whole generated texts equal to the original model's.",
    ]


def _prompt_counts(timing: dict[str, Any]) -> str:
    return ", ".join(f"{n} at batch {b}" for b, n in timing["prompts"].items())


def plot(records: list[dict[str, Any]], path: Path, timing: dict[str, Any] | None = None) -> bool:
    """pareto.png, for someone who has not read the paper; False (and no file) when matplotlib is not installed.

    Left: accuracy against the measured speed-up over the original model at batch 1 (median with
    min..max over the interleaved rounds). Right: accuracy against Eff. k, with the paper's 8B points.
    Lossless points are filled, lossy ones hollow; the original model's accuracy is a line on both."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.6), constrained_layout=True)
    hf = next((r for r in records if r["point"]["name"] == "hf"), None)
    for axis in (left, right) if timing else (right,):
        if hf:
            _original_line(axis, hf)
    speed = _speedups(records, timing)
    for lossless_group in (True, False):
        rows = [r for r in records if lossless(r) == lossless_group]
        if not rows:
            continue
        style = _STYLE[lossless_group]
        acc = [100 * r["accuracy"] for r in rows]
        err = [0 if math.isnan(r["stderr"]) else 100 * r["stderr"] for r in rows]
        right.errorbar([r["eff_k"] for r in rows], acc, yerr=err, linestyle="none", capsize=3, **style)
        _annotate(right, rows, [r["eff_k"] for r in rows], acc, style["color"])
        timed = [i for i, r in enumerate(rows) if speed and speed.get(r["point"]["name"])]
        if timed:
            ups = [speed[rows[i]["point"]["name"]] for i in timed]
            xerr = [[u[0] - u[1] for u in ups], [u[2] - u[0] for u in ups]]
            left.errorbar([u[0] for u in ups], [acc[i] for i in timed], xerr=xerr, yerr=[err[i] for i in timed],
                          linestyle="none", capsize=3, **style)
            _annotate(left, [rows[i] for i in timed], [u[0] for u in ups], [acc[i] for i in timed], style["color"])
    for j, (name, pts) in enumerate(PAPER_8B.items()):
        right.plot([p[1] for p in pts], [p[0] for p in pts], color="gray", marker="o", markerfacecolor="none",
                   linestyle=":", alpha=0.5, label="the paper: Llama-3.1-8B on GSM8K (for reference)" if j == 0 else None)
    _decorate(left, right, timing, hf)
    settings = records[0]["settings"]
    problems = len(records[0]["answers"])
    fig.suptitle(f"{settings['task']}: {problems} problems per point; model {Path(settings['model']).name}"
                 + (f" (original: {Path(settings['original']).name})" if hf else ""))
    try:
        with atomic_writer(path, "wb") as f:
            fig.savefig(f, format="png", dpi=130)
    finally:
        plt.close(fig)
    return True


_STYLE = {
    True: {"color": "tab:blue", "marker": "o", "markersize": 8, "label": "lossless (same output as the original)"},
    False: {"color": "tab:red", "marker": "D", "markersize": 7, "markerfacecolor": "none", "markeredgewidth": 1.5,
            "label": "lossy (faster, may change answers)"},
}


def _speedups(records: list[dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, list[float]] | None:
    """point name -> [median, min, max] batch-1 speed-up over the timing reference; None: not timed."""
    if not timing:
        return None
    summary = timing["summary"][str(timing["batch_sizes"][0])]
    return {r["point"]["name"]: summary.get(r["point"]["name"], {}).get("speedup") for r in records}


def _original_line(axis: Any, hf: dict[str, Any]) -> None:
    acc = 100 * hf["accuracy"]
    if not math.isnan(hf["stderr"]):
        axis.axhspan(acc - 100 * hf["stderr"], acc + 100 * hf["stderr"], color="black", alpha=0.07, linewidth=0)
    axis.axhline(acc, color="black", linewidth=1.0, label=f"original model ({acc:.0f}%)")
    axis.text(0.99, acc, "original model", transform=axis.get_yaxis_transform(), ha="right", va="bottom", fontsize=8)


def _annotate(axis: Any, rows: list[dict[str, Any]], xs: list[float], ys: list[float], color: str) -> None:
    for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
        axis.annotate(short_name(r), (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -12),
                      fontsize=8, color=color)


def _decorate(left: Any, right: Any, timing: dict[str, Any] | None, hf: dict[str, Any] | None) -> None:
    reference = timing["reference"] if timing else "hf"
    over = "the original model" if reference == "hf" else f"`{reference}` (no original-model row)"
    left.set_title(f"accuracy vs measured speed-up over {over}")
    left.set_ylabel("accuracy (%)")
    left.grid(alpha=0.3)
    if timing:
        batch = timing["batch_sizes"][0]
        left.set_xlabel(f"speed-up (tokens/s ratio at batch {batch}; bars: min..max over {timing['repeats']} "
                        "interleaved rounds)")
        speed = "original speed" if reference == "hf" else f"{reference} speed"
        left.axvline(1.0, color="gray", linewidth=1.0, linestyle="--", label=speed)
        left.text(1.0, 0.99, f" {speed} (1x)", transform=left.get_xaxis_transform(), ha="left", va="top", fontsize=8,
                  color="gray")
        left.legend(fontsize=8, loc="best")
    else:
        left.set_xlabel("speed-up over the original model")
        left.text(0.5, 0.5, "not timed\n(--timing-repeats 0)", transform=left.transAxes, ha="center", va="center",
                  fontsize=14, color="gray")
        left.set_xticks([])
        left.set_yticks([])
    right.set_title("accuracy vs tokens per forward pass")
    right.set_xlabel("Eff. k: tokens emitted per forward pass (1 = one token at a time)")
    right.set_ylabel("accuracy (%)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="best")
