"""``mtp-sweep``: accuracy against speed for one MTP checkpoint on one lm-eval task.

In one process it evaluates the original model through lm-eval's ``hf`` backend and the checkpoint
through ``mtp`` with ``ar``, ``static`` (k in a list) and ``confadapt`` (tau in a list), on the same
documents and prompts, then writes ``report.md`` (accuracy +- stderr, Eff. k, tokens/s, speedups
against ``hf`` and ``ar``, final answers equal to ``ar``) and ``pareto.png`` (accuracy against Eff. k
and against wall-clock speedup, with the paper's 8B points for reference). Each finished point is
saved as ``points/NAME.json``; a rerun with the same settings reuses it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from mtp_plugins.files import atomic_writer, write_atomic

DEFAULT_TAUS = "0.99,0.95,0.9,0.8,0.6"
DEFAULT_STATIC = "2,3,4"

# METHOD.md section 8: Llama-3.1-8B-Magpie, GSM8K 8-shot CoT, flexible extract (accuracy %, Eff. k).
PAPER_8B = {
    "untouched ar": [(69.5, 1.0)],
    "MTP ar": [(66.0, 1.0)],
    "MTP confadapt": [(66.0, 2.1), (64.7, 2.8), (64.1, 3.3), (59.2, 4.2), (46.6, 6.1)],
    "MTP static": [(60.7, 2.0), (53.0, 3.0), (41.5, 5.0)],
}


class SweepError(ValueError):
    """A bad sweep argument; printed as one line."""


@dataclass(frozen=True)
class Point:
    name: str
    backend: str  # "hf" (the original model) or "mtp" (the checkpoint)
    strategy: str | None = None
    k: int | None = None
    tau: float | None = None


def plan(taus: list[float], static_ks: list[int], k: int, include_hf: bool = True) -> list[Point]:
    points = [Point("hf", "hf")] if include_hf else []
    points.append(Point("ar", "mtp", "ar", 1, 1.0))
    points += [Point(f"static-k{s}", "mtp", "static", s, 1.0) for s in static_ks]
    points += [Point(f"confadapt-tau{t:g}", "mtp", "confadapt", k, t) for t in taus]
    return points


def _numbers(text: str, kind: type, flag: str, allow_empty: bool = False) -> list:
    if allow_empty and text.strip().lower() in ("", "none"):
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if not values:
        raise SweepError(f"{flag} {text!r}: give at least one value")
    return values


def _metric(results: dict[str, Any], task: str) -> tuple[str, float, float]:
    """(metric name, value, stderr): flexible-extract exact match where the task has it."""
    scores = results["results"][task]
    for key in ("exact_match,flexible-extract", "exact_match,strict-match"):
        if key in scores:
            stderr = scores.get(key.replace(",", "_stderr,"), float("nan"))
            return key, float(scores[key]), float(stderr) if stderr not in (None, "N/A") else float("nan")
    key = next(k for k, v in scores.items() if "," in k and "stderr" not in k and isinstance(v, (int, float)))
    return key, float(scores[key]), float(scores.get(key.replace(",", "_stderr,"), float("nan")))


def _answers(results: dict[str, Any], task: str, metric: str) -> dict[str, str]:
    """doc_id -> the filtered final answer under the metric's filter."""
    filter_name = metric.split(",", 1)[1]
    out = {}
    for sample in results["samples"][task]:
        if sample.get("filter", filter_name) == filter_name:
            filtered = sample["filtered_resps"]
            out[str(sample["doc_id"])] = str(filtered[0] if isinstance(filtered, list) else filtered)
    return out


def _responses(results: dict[str, Any], task: str) -> dict[str, str]:
    """doc_id -> the generated text (before any filter)."""
    texts: dict[str, str] = {}
    for sample in results["samples"][task]:
        resps = sample["resps"]
        while isinstance(resps, list):
            resps = resps[0] if resps else ""
        texts.setdefault(str(sample["doc_id"]), str(resps))
    return texts


class Sweep:
    def __init__(self, model: str, original: str, task: str, out: Path, *, limit: int | None, batch_size: int,
                 dtype: str, num_fewshot: int | None, max_gen_toks: int | None, device: str, allow_pickle: bool = False) -> None:
        self.model_path, self.original_path, self.task, self.out = model, original, task, out
        self.limit, self.batch_size, self.dtype, self.device = limit, batch_size, dtype, device
        self.num_fewshot, self.max_gen_toks = num_fewshot, max_gen_toks
        self.allow_pickle = allow_pickle
        self._models: dict[str, Any] = {}
        self._tokenizer: Any = None

    def settings(self) -> dict[str, Any]:
        """What a saved point must match to be reused."""
        return {"model": str(self.model_path), "original": str(self.original_path), "task": self.task, "limit": self.limit,
                "batch_size": self.batch_size, "dtype": self.dtype, "num_fewshot": self.num_fewshot,
                "max_gen_toks": self.max_gen_toks, "device": self.device}

    def point_path(self, point: Point) -> Path:
        return self.out / "points" / f"{point.name}.json"

    def saved(self, point: Point) -> dict[str, Any] | None:
        path = self.point_path(point)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("settings") != self.settings() or record.get("point") != asdict(point):
            return None
        return record

    def _load(self, which: str) -> Any:
        """The model of a backend, loaded once per path (hf and mtp share it when the paths agree)."""
        path = self.model_path if which == "mtp" else self.original_path
        if path not in self._models:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from mtp_plugins.checkpoint import loading, weights_source

            source = weights_source(path, allow_pickle=self.allow_pickle, opt_in="--allow-pickle")
            with loading(path):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype), **source)
            self._models[path] = model.to(self.device).eval()
            if self._tokenizer is None:
                with loading(self.model_path):
                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._models[path]

    def run_point(self, point: Point) -> dict[str, Any]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from mtp_plugins.lm_eval._startup import tasks_dir
        from mtp_plugins.lm_eval.model import MTPLM

        model = self._load(point.backend)
        common = {"pretrained": model, "tokenizer": self._tokenizer, "batch_size": self.batch_size}
        if point.backend == "hf":
            lm = HFLM(**common)
        else:
            lm = MTPLM(strategy=point.strategy, k=point.k, tau=point.tau, **common)
        seconds = [0.0]
        generate_until = lm.generate_until

        def timed(requests, *args, **kwargs):
            start = time.perf_counter()
            try:
                return generate_until(requests, *args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start

        lm.generate_until = timed
        kwargs: dict[str, Any] = {}
        if self.max_gen_toks:
            kwargs["gen_kwargs"] = f"max_gen_toks={self.max_gen_toks}"
        if self.num_fewshot is not None:
            kwargs["num_fewshot"] = self.num_fewshot
        ours = tasks_dir()
        manager = TaskManager(include_path=ours) if ours else TaskManager()
        results = lm_eval.simple_evaluate(model=lm, tasks=[self.task], limit=self.limit, log_samples=True,
                                          task_manager=manager, **kwargs)
        metric, value, stderr = _metric(results, self.task)
        responses = _responses(results, self.task)
        tokens = sum(len(self._tokenizer(text, add_special_tokens=False).input_ids) for text in responses.values())
        mtp = lm.mtp_summary() if point.backend == "mtp" else None
        return {
            "point": asdict(point), "settings": self.settings(), "metric": metric, "accuracy": value, "stderr": stderr,
            "eff_k": mtp["eff_k"] if mtp else 1.0, "generation_seconds": seconds[0], "tokens": tokens,
            "tokens_per_second": tokens / seconds[0] if seconds[0] else 0.0, "answers": _answers(results, self.task, metric),
            "responses": responses, "mtp": mtp,
        }

    def run(self, points: list[Point], say: Any = print) -> list[dict[str, Any]]:
        records = []
        for i, point in enumerate(points, 1):
            record = self.saved(point)
            if record is not None:
                say(f"[{i}/{len(points)}] {point.name}: done before, reused ({self.point_path(point)})")
            else:
                say(f"[{i}/{len(points)}] {point.name}: evaluating {self.task} ...")
                record = self.run_point(point)
                write_atomic(self.point_path(point), json.dumps(record, indent=1))
                say(f"    accuracy {record['accuracy']:.3f}  Eff. k {record['eff_k']:.2f}  "
                    f"{record['tokens_per_second']:.1f} tok/s  {record['generation_seconds']:.0f} s")
            records.append(record)
        return records


def agreement(a: dict[str, str], b: dict[str, str]) -> tuple[int, int]:
    shared = sorted(set(a) & set(b))
    return sum(a[d] == b[d] for d in shared), len(shared)


def report(records: list[dict[str, Any]], sweep: Sweep, command: str) -> str:
    by_name = {r["point"]["name"]: r for r in records}
    hf, ar = by_name.get("hf"), by_name.get("ar")
    metric = records[0]["metric"]
    lines = [
        f"# MTP sweep: {sweep.task}",
        "",
        f"- checkpoint: `{sweep.model_path}`; original model (`hf` row): `{sweep.original_path}`",
        f"- task `{sweep.task}`, limit {sweep.limit}, batch size {sweep.batch_size}, {sweep.dtype} on {sweep.device}; "
        f"accuracy = `{metric}`",
        f"- command: `{command}`",
        "",
        "| point | accuracy | Eff. k | tokens/s | speedup vs hf | speedup vs ar | answers = ar | answers = hf |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}" if not math.isnan(r["stderr"]) else f"{100 * r['accuracy']:.1f}"
        vs_hf = f"{r['tokens_per_second'] / hf['tokens_per_second']:.2f}x" if hf and hf["tokens_per_second"] else "-"
        vs_ar = f"{r['tokens_per_second'] / ar['tokens_per_second']:.2f}x" if ar and ar["tokens_per_second"] else "-"
        eq_ar = "{}/{}".format(*agreement(r["answers"], ar["answers"])) if ar else "-"
        eq_hf = "{}/{}".format(*agreement(r["answers"], hf["answers"])) if hf else "-"
        lines.append(f"| {r['point']['name']} | {acc} | {r['eff_k']:.2f} | {r['tokens_per_second']:.1f} | {vs_hf} | {vs_ar} | {eq_ar} | {eq_hf} |")
    lines += [
        "",
        "Speedup = generated tokens per second of generation wall time, relative to the `hf` (or `ar`) row, on the same "
        "documents and prompts in this one process (responses may differ in length, so throughput is compared, not total time).",
        "Eff. k = tokens emitted / forward passes (1 for `hf` and `ar`). `answers = ar`: final answers (after the "
        "metric's filter) equal to the same checkpoint's `ar` answers; `answers = hf`: equal to the original model's.",
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """pareto.png; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_name = {r["point"]["name"]: r for r in records}
    hf, ar = by_name.get("hf"), by_name.get("ar")
    fig, (left, right, agree) = plt.subplots(1, 3, figsize=(17, 4.8), constrained_layout=True)
    styles = {"hf": ("black", "s"), "ar": ("tab:blue", "o"), "static": ("tab:orange", "^"), "confadapt": ("tab:green", "D")}
    for group in ("hf", "ar", "static", "confadapt"):
        rows = sorted((r for r in records if (r["point"]["strategy"] or "hf") == group), key=lambda r: r["eff_k"])
        if not rows:
            continue
        color, marker = styles[group]
        line = "-" if len(rows) > 1 else "none"
        acc = [100 * r["accuracy"] for r in rows]
        err = [0 if math.isnan(r["stderr"]) else 100 * r["stderr"] for r in rows]
        effk = [r["eff_k"] for r in rows]
        left.errorbar(effk, acc, yerr=err, color=color, marker=marker, linestyle=line, capsize=3, label=f"this run: {group}")
        if hf:
            speed = [r["tokens_per_second"] / hf["tokens_per_second"] for r in rows]
            order = sorted(range(len(rows)), key=lambda i: speed[i])
            right.errorbar([speed[i] for i in order], [acc[i] for i in order], yerr=[err[i] for i in order], color=color,
                           marker=marker, linestyle=line, capsize=3, label=group)
        if ar and group in ("static", "confadapt"):
            same = [100 * equal / max(1, shared) for equal, shared in (agreement(r["answers"], ar["answers"]) for r in rows)]
            agree.plot(effk, same, color=color, marker=marker, linestyle=line, label=group)
            for i, (r, x, y) in enumerate(zip(rows, effk, same)):
                label = f"τ {r['point']['tau']:g}" if group == "confadapt" else f"k {r['point']['k']}"
                agree.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -10), fontsize=8, color=color)
    paper_styles = {"untouched ar": ("gray", "s"), "MTP ar": ("gray", "o"), "MTP confadapt": ("gray", "D"), "MTP static": ("gray", "^")}
    for name, pts in PAPER_8B.items():
        color, marker = paper_styles[name]
        left.plot([p[1] for p in pts], [p[0] for p in pts], color=color, marker=marker, alpha=0.45, linestyle=":",
                  markerfacecolor="none", label=f"paper 8B (GSM8K): {name}")
    left.set_xlabel("Eff. k (tokens per forward pass)")
    left.set_ylabel("accuracy (%)")
    left.set_title("accuracy vs tokens per pass")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    right.set_xlabel("speedup vs hf generate: tokens/s ratio (this machine)")
    right.set_ylabel("accuracy (%)")
    right.set_title("accuracy vs measured speedup")
    right.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    right.grid(alpha=0.3)
    if hf:
        right.legend(fontsize=8, loc="best")
    agree.set_xlabel("Eff. k (tokens per forward pass)")
    agree.set_ylabel("final answers equal to ar (%)")
    agree.set_title("faithfulness to the checkpoint's own greedy answers")
    agree.set_ylim(-5, 105)
    agree.axhline(90, color="gray", linewidth=0.8, linestyle="--")
    agree.grid(alpha=0.3)
    if ar:
        agree.legend(fontsize=8, loc="best")
    fig.suptitle(f"{records[0]['settings']['task']}: {Path(records[0]['settings']['model']).name}")
    try:
        with atomic_writer(path, "wb") as f:
            fig.savefig(f, format="png", dpi=130)
    finally:
        plt.close(fig)
    return True


def original_of(model: str) -> str:
    """The model a training run started from (its train_config.yaml), else the checkpoint itself."""
    config = Path(model) / "train_config.yaml"
    if config.exists():
        import yaml

        source = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model")
        if source:
            return str(source)
    return model


app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


@app.command(help="Evaluate hf, ar, static k and confadapt tau on one lm-eval task; write report.md and pareto.png.")
def sweep(
    model: str = typer.Argument(..., help="The MTP checkpoint (a directory or hub id)."),
    task: str = typer.Option("synthetic_gsm", help="lm-eval task (ours: synthetic_gsm, gsm8k_cot_mtp; or stock gsm8k)."),
    out: Path = typer.Option(Path("mtp-sweep"), help="Output directory: report.md, pareto.png, points/."),
    original: Optional[str] = typer.Option(None, help="The original model for the hf row [default: the run's source model, else MODEL]."),
    limit: Optional[int] = typer.Option(None, help="Documents per point (lm-eval --limit)."),
    taus: str = typer.Option(DEFAULT_TAUS, help="ConfAdapt thresholds, comma-separated."),
    static: str = typer.Option(DEFAULT_STATIC, help="Static k values, comma-separated ('none' for no static points)."),
    k: Optional[int] = typer.Option(None, help="k for confadapt [default: the checkpoint's k_max, else 8]."),
    batch_size: int = typer.Option(1, help="Generation batch size."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 or float32."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    num_fewshot: Optional[int] = typer.Option(None, help="Override the task's few-shot count."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Override the task's max_gen_toks."),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="Leave out the original-model row."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle weights (pytorch_model.bin) of a model without safetensors; unpickling can run arbitrary code."),
) -> None:
    tau_values = _numbers(taus, float, "--taus")
    if any(not 0 < t <= 1 for t in tau_values):
        raise SweepError(f"--taus {taus!r}: every tau must be in (0, 1]")
    static_ks = _numbers(static, int, "--static", allow_empty=True)
    if any(s < 1 for s in static_ks):
        raise SweepError(f"--static {static!r}: every k must be >= 1")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise SweepError(f"--dtype {dtype!r}: use bfloat16, float32 or float16")
    if limit is not None and limit < 1:
        raise SweepError(f"--limit {limit}: must be >= 1")
    from transformers import AutoConfig

    from mtp_plugins.checkpoint import read_mtp_spec

    try:
        spec = read_mtp_spec(AutoConfig.from_pretrained(model))
    except OSError as error:
        raise SweepError(f"MODEL {model!r}: cannot read its config ({error})") from None
    if spec is None:
        raise SweepError(f"MODEL {model!r} has no mask token (no `mtp` block in config.json): not an MTP checkpoint")
    if k is None:
        k = spec.k_max or 8
    runner = Sweep(model, original or original_of(model), task, out, limit=limit, batch_size=batch_size, dtype=dtype,
                   num_fewshot=num_fewshot, max_gen_toks=max_gen_toks, device=device, allow_pickle=allow_pickle)
    points = plan(tau_values, static_ks, k, include_hf=not skip_hf)
    records = runner.run(points, say=lambda line: print(line, file=sys.stderr, flush=True))
    command = "mtp-sweep " + " ".join(sys.argv[1:])
    write_atomic(out / "report.md", report(records, runner, command))
    plotted = plot(records, out / "pareto.png")
    print(f"report: {out / 'report.md'}")
    print(f"plot:   {out / 'pareto.png'}" if plotted else "plot:   not drawn (pip install matplotlib)")


def main() -> None:
    from mtp_plugins.checkpoint import CheckpointError
    from mtp_plugins.console import run_app
    from mtp_plugins.lm_eval.model import MTPArgumentError

    run_app(app, "mtp-sweep", (SweepError, MTPArgumentError, CheckpointError), "interrupted; finished points are kept and reused by the next run")


if __name__ == "__main__":
    main()
