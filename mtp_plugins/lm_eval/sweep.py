"""``mtp-sweep``: accuracy against speed for one MTP checkpoint on one lm-eval task.

In one process it evaluates the original model through lm-eval's ``hf`` backend and the checkpoint
through ``mtp`` with ``ar``, ``verify`` (lossless; one point per prompt-lookup n-gram length in a
list, 0: drafts from the mask slots alone), ``static`` (k in a list) and ``confadapt`` (tau in a
list), on the same documents and prompts (the accuracy pass), then times every point on the same
prompts, interleaved and repeated, at batch 1 and at the accuracy pass's batch size (the timing
phase, ``timing.py``), and writes ``report.md`` (lossless by contract, accuracy +- stderr, Eff. k,
tokens/s and speed-ups against ``hf`` with their spread, answers and texts equal to ``ar`` / ``hf``)
and ``pareto.png`` (``sweep_report.py``).

Each finished point is saved as ``points/NAME.json``; a rerun reuses it when its settings AND the
content of the model files (sha256 of the weights, config and tokenizer of the checkpoint, and of
the original for ``hf``) are those of this run, and says why otherwise. The timing phase is saved as
``timing.json`` and reused when every point and timing setting is the same. Every argument, the
output directory, the task and both models are checked before the first point.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from mtp_plugins.decoding.strategies import Verify
from mtp_plugins.files import write_atomic
from mtp_plugins.lm_eval.sweep_args import (
    SweepError,
    check_device,
    check_model,
    check_numbers,
    check_original,
    check_out,
    check_task,
    original_of,
    task_manager,
)
from mtp_plugins.lm_eval.sweep_report import agreement, plot, report  # noqa: F401  (agreement: used by mtp-demo)

DEFAULT_TAUS = "0.99,0.95,0.9,0.8,0.6"
DEFAULT_STATIC = "2,3,4"
DEFAULT_VERIFY_LOOKUP = "0,3"
#: The timing.json layout (a saved timing of another layout is timed again): 2 adds Eff. k per batch;
#: 3 interleaves the points batch by batch within a round; 4 records (and is keyed on) the allocator;
#: 5 warms up with a short generation (timing.WARMUP_TOKENS new tokens, also in the key).
TIMING_VERSION = 5
#: Files of a model directory whose content a saved point is keyed on (what from_pretrained reads).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".jinja")


@dataclass(frozen=True)
class Point:
    name: str
    backend: str  # "hf" (the original model) or "mtp" (the checkpoint)
    strategy: str | None = None
    k: int | None = None
    tau: float | None = None
    #: ``verify``: the longest prompt-lookup n-gram drafted besides the mask slots (0: mask drafts only).
    draft_lookup: int | None = None
    #: ``verify``: the recovery groups of mask slots a pass feeds (the decoder's ``recovery`` option,
    #: recorded as used so that a saved point is reused only with the same value).
    recovery: int | None = None


def plan(taus: list[float], static_ks: list[int], k: int, include_hf: bool = True,
         verify_lookups: list[int] = ()) -> list[Point]:
    """hf, ar, one verify point per n-gram length (``verify`` for 0, ``verify-lookupN``), static k, confadapt tau."""
    points = [Point("hf", "hf")] if include_hf else []
    points.append(Point("ar", "mtp", "ar", 1, 1.0))
    recovery = Verify.options["recovery"]
    points += [Point("verify" if n == 0 else f"verify-lookup{n}", "mtp", "verify", k, 1.0, draft_lookup=n, recovery=recovery)
               for n in verify_lookups]
    points += [Point(f"static-k{s}", "mtp", "static", s, 1.0) for s in static_ks]
    points += [Point(f"confadapt-tau{t:g}", "mtp", "confadapt", k, t) for t in taus]
    return points


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


def _contexts(results: dict[str, Any], task: str) -> tuple[dict[str, str], dict[str, Any]]:
    """doc_id -> the formatted prompt lm-eval generated from, and the generation kwargs it used."""
    contexts: dict[str, str] = {}
    gen_kwargs: dict[str, Any] = {}
    for sample in results["samples"][task]:
        context, kwargs = sample["arguments"][0][:2]
        contexts.setdefault(str(sample["doc_id"]), str(context))
        gen_kwargs = gen_kwargs or dict(kwargs)
    return contexts, gen_kwargs


def fingerprint(name_or_path: str) -> str | None:
    """sha256 over the model files ``from_pretrained`` reads (weights, config, tokenizer), of a local
    directory or of a hub id's cached snapshot; None where neither is on this machine."""
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:  # not in the local cache (yet): nothing to compare
            return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES):
        with path.open("rb") as f:
            digest.update(f"{path.name}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()


class Sweep:
    def __init__(self, model: str, original: str, task: str, out: Path, *, limit: int | None, batch_size: int,
                 dtype: str, num_fewshot: int | None, max_gen_toks: int | None, device: str, allow_pickle: bool = False,
                 task_manager: Any = None, timing_prompts: int = 8, timing_repeats: int = 3) -> None:
        self.model_path, self.original_path, self.task, self.out = model, original, task, out
        self.limit, self.batch_size, self.dtype, self.device = limit, batch_size, dtype, device
        self.num_fewshot, self.max_gen_toks = num_fewshot, max_gen_toks
        self.allow_pickle = allow_pickle
        self.task_manager = task_manager
        self.timing_prompts, self.timing_repeats = timing_prompts, timing_repeats
        self._models: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._fingerprints: dict[str, str | None] = {}

    def settings(self) -> dict[str, Any]:
        """What a saved point must match to be reused (with ``weights``)."""
        return {"model": str(self.model_path), "original": str(self.original_path), "task": self.task, "limit": self.limit,
                "batch_size": self.batch_size, "dtype": self.dtype, "num_fewshot": self.num_fewshot,
                "max_gen_toks": self.max_gen_toks, "device": self.device}

    def weights(self, point: Point) -> dict[str, str | None]:
        """sha256 of the model files a point's results depend on: the checkpoint (its tokenizer serves
        every point) and, for ``hf``, the original model."""
        paths = {"model": self.model_path} | ({"original": self.original_path} if point.backend == "hf" else {})
        for path in paths.values():
            if path not in self._fingerprints:
                self._fingerprints[path] = fingerprint(path)
        return {role: self._fingerprints[path] for role, path in paths.items()}

    def point_path(self, point: Point) -> Path:
        return self.out / "points" / f"{point.name}.json"

    def saved(self, point: Point) -> tuple[dict[str, Any] | None, str | None]:
        """(the saved record to reuse, None) or (None, why it cannot be reused; None: there is none)."""
        path = self.point_path(point)
        if not path.exists():
            return None, None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None, f"{path} is unreadable"
        changed = [key for key, value in self.settings().items() if record.get("settings", {}).get(key) != value]
        if changed:
            return None, "settings changed: " + ", ".join(changed)
        if record.get("point") != asdict(point):
            return None, "the point's settings changed"
        weights = self.weights(point)
        if None in weights.values():
            return None, "the model files could not be fingerprinted"
        stale = [role for role, digest in weights.items() if record.get("weights", {}).get(role) != digest]
        if stale:
            names = {"model": f"the checkpoint {self.model_path}", "original": f"the original {self.original_path}"}
            return None, "the files of " + " and ".join(names[r] for r in stale) + " changed since it was saved"
        return record, None

    def _load(self, which: str) -> Any:
        """The model of a backend, loaded once per path (hf and mtp share it when the paths agree)."""
        path = self.model_path if which == "mtp" else self.original_path
        if path not in self._models:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from mtp_plugins.adapter_checkpoint import is_adapter_dir
            from mtp_plugins.checkpoint import load_checkpoint, loading, weights_source

            if is_adapter_dir(path):  # a gated adapter: its base model with the adapter attached
                model = load_checkpoint(path, dtype=getattr(torch, self.dtype), allow_pickle=self.allow_pickle)[0]
            else:
                source = weights_source(path, allow_pickle=self.allow_pickle, opt_in="--allow-pickle")
                with loading(path):
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype), **source)
            self._models[path] = model.to(self.device).eval()
            if self._tokenizer is None:
                with loading(self.model_path):
                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._models[path]

    def _lm(self, point: Point, batch_size: int) -> Any:
        """The lm-eval model of a point (``hf`` or ``mtp``) around the loaded weights."""
        from lm_eval.models.huggingface import HFLM

        from mtp_plugins.lm_eval.model import MTPLM

        common = {"pretrained": self._load(point.backend), "tokenizer": self._tokenizer, "batch_size": batch_size}
        if point.backend == "hf":
            return HFLM(**common)
        options = {} if point.recovery is None else {"recovery": point.recovery}
        return MTPLM(strategy=point.strategy, k=point.k, tau=point.tau, draft_lookup=point.draft_lookup, **options, **common)

    def _manager(self) -> Any:
        if self.task_manager is None:
            self.task_manager = task_manager()
        return self.task_manager

    def run_point(self, point: Point) -> dict[str, Any]:
        import lm_eval

        lm = self._lm(point, self.batch_size)
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
        if self.max_gen_toks is not None:
            kwargs["gen_kwargs"] = f"max_gen_toks={self.max_gen_toks}"
        if self.num_fewshot is not None:
            kwargs["num_fewshot"] = self.num_fewshot
        results = lm_eval.simple_evaluate(model=lm, tasks=[self.task], limit=self.limit, log_samples=True,
                                          task_manager=self._manager(), **kwargs)
        metric, value, stderr = _metric(results, self.task)
        responses = _responses(results, self.task)
        contexts, gen_kwargs = _contexts(results, self.task)
        tokens = sum(self.count_tokens(text) for text in responses.values())
        mtp = lm.mtp_summary() if point.backend == "mtp" else None
        return {
            "point": asdict(point), "settings": self.settings(), "weights": self.weights(point), "metric": metric,
            "accuracy": value, "stderr": stderr, "eff_k": mtp["eff_k"] if mtp else 1.0,
            # the accuracy pass's own speed: points one after another, so not comparable (see timing.json)
            "generation_seconds": seconds[0], "tokens": tokens,
            "tokens_per_second": tokens / seconds[0] if seconds[0] else 0.0, "answers": _answers(results, self.task, metric),
            "responses": responses, "contexts": contexts, "gen_kwargs": gen_kwargs, "mtp": mtp,
        }

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False).input_ids)

    def run(self, points: list[Point], say: Any = print) -> list[dict[str, Any]]:
        records = []
        for i, point in enumerate(points, 1):
            record, why = self.saved(point)
            if record is not None:
                say(f"[{i}/{len(points)}] {point.name}: done before, reused ({self.point_path(point)})")
            else:
                again = f" (the saved point is not reused: {why})" if why else ""
                say(f"[{i}/{len(points)}] {point.name}: evaluating {self.task}{again} ...")
                record = self.run_point(point)
                write_atomic(self.point_path(point), json.dumps(record, indent=1))
                say(f"    accuracy {record['accuracy']:.3f}  Eff. k {record['eff_k']:.2f}  "
                    f"{record['generation_seconds']:.0f} s")
            records.append(record)
        return records

    def timing(self, points: list[Point], records: list[dict[str, Any]], say: Any = print) -> dict[str, Any] | None:
        """The timing phase (``timing.py``), or its saved result when every point and setting is the same."""
        from mtp_plugins import allocator
        from mtp_plugins.lm_eval import timing

        if self.timing_repeats == 0:
            return None
        batch_sizes = sorted({1, self.batch_size})
        reference = "hf" if any(p.name == "hf" for p in points) else "ar"
        key = {"version": TIMING_VERSION, "settings": self.settings(), "points": [[r["point"], r["weights"]] for r in records],
               "prompts": self.timing_prompts, "repeats": self.timing_repeats, "batch_sizes": batch_sizes,
               "warmup_tokens": timing.WARMUP_TOKENS, "malloc": allocator.current().to_json()}
        path = self.out / "timing.json"
        saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if saved and saved.get("key") == key:
            say(f"timing: reused from {path}")
            return saved
        contexts = records[0]["contexts"]
        prompts = timing.TimingPrompts([contexts[d] for d in sorted(contexts, key=int)], records[0]["gen_kwargs"],
                                       self.timing_prompts)
        lms = {p.name: self._lm(p, 1) for p in points}
        runs = timing.time_points(lms, prompts, batch_sizes, self.timing_repeats, self.count_tokens, say)
        summary = {}
        for batch, per_point in runs.items():
            spreads = timing.summarize(per_point, reference)
            summary[batch] = {name: {kind: [s.median, s.low, s.high] if s else None for kind, s in row.items()}
                              for name, row in spreads.items()}
        result = {"key": key, "batch_sizes": batch_sizes, "reference": reference,
                  "prompts": {str(b): len(prompts.at(b)) for b in batch_sizes},
                  "repeats": self.timing_repeats, "warmup_tokens": timing.WARMUP_TOKENS,
                  "malloc": allocator.current().describe(), "runs": runs, "summary": summary}
        write_atomic(path, json.dumps(result, indent=1))
        return result


app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


@app.command(help="Evaluate hf, ar, verify, static k and confadapt tau on one lm-eval task, time them interleaved; "
                  "write report.md and pareto.png.")
def sweep(
    model: str = typer.Argument(..., help="The MTP checkpoint (a directory or hub id)."),
    task: str = typer.Option("synthetic_gsm", help="lm-eval task (ours: synthetic_gsm, synthetic_gsm_easy, gsm8k_cot_mtp; or stock gsm8k)."),
    out: Path = typer.Option(Path("mtp-sweep"), help="Output directory: report.md, pareto.png, points/, timing.json."),
    original: Optional[str] = typer.Option(None, help="The original model for the hf row [default: the run's source model, else MODEL]."),
    limit: Optional[int] = typer.Option(None, help="Documents per point (lm-eval --limit)."),
    taus: str = typer.Option(DEFAULT_TAUS, help="ConfAdapt thresholds, comma-separated."),
    static: str = typer.Option(DEFAULT_STATIC, help="Static k values, comma-separated ('none' for no static points)."),
    verify_lookup: str = typer.Option(DEFAULT_VERIFY_LOOKUP, help="verify points (lossless): prompt-lookup n-gram lengths, "
                                      "comma-separated, 0 = drafts from the mask slots alone ('none' for no verify points)."),
    k: Optional[int] = typer.Option(None, help="k for verify and confadapt [default: the checkpoint's k_max, else 8]."),
    batch_size: int = typer.Option(1, help="Generation batch size of the accuracy pass (also timed)."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 or float32."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    num_fewshot: Optional[int] = typer.Option(None, help="Override the task's few-shot count."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Override the task's max_gen_toks (>= 1)."),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="Leave out the original-model row."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle weights (pytorch_model.bin) of a model without safetensors; unpickling can run arbitrary code."),
    timing_prompts: int = typer.Option(8, help="Prompts of the timing phase (the first documents' formatted contexts)."),
    timing_repeats: int = typer.Option(3, help="Interleaved rounds of the timing phase (0: no timing)."),
) -> None:
    tau_values, static_ks, lookups = check_numbers(
        taus=taus, static=static, k=k, limit=limit, batch_size=batch_size, dtype=dtype, num_fewshot=num_fewshot,
        max_gen_toks=max_gen_toks, timing_prompts=timing_prompts, timing_repeats=timing_repeats,
        verify_lookup=verify_lookup)
    check_out(out)
    check_device(device)
    k = check_model(model, k, static_ks)
    recorded = False
    if original is None:
        original, recorded = original_of(model)
    if not skip_hf:
        check_original(original, recorded, model)
    manager = check_task(task)
    runner = Sweep(model, original, task, out, limit=limit, batch_size=batch_size, dtype=dtype, num_fewshot=num_fewshot,
                   max_gen_toks=max_gen_toks, device=device, allow_pickle=allow_pickle, task_manager=manager,
                   timing_prompts=timing_prompts, timing_repeats=timing_repeats)
    points = plan(tau_values, static_ks, k, include_hf=not skip_hf, verify_lookups=lookups)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    records = runner.run(points, say=say)
    timed = runner.timing(points, records, say=say)
    command = "mtp-sweep " + " ".join(sys.argv[1:])
    write_atomic(out / "report.md", report(records, runner, command, timed))
    plotted = plot(records, out / "pareto.png", timed)
    print(f"report: {out / 'report.md'}")
    print(f"plot:   {out / 'pareto.png'}" if plotted else "plot:   not drawn (pip install matplotlib)")


def main() -> None:
    from mtp_plugins.checkpoint import CheckpointError
    from mtp_plugins.console import run_app
    from mtp_plugins.lm_eval.model import MTPArgumentError

    run_app(app, "mtp-sweep", (SweepError, MTPArgumentError, CheckpointError), "interrupted; finished points are kept and reused by the next run")


if __name__ == "__main__":
    main()
