"""``mtp-demo`` end to end on a tiny model (the real run on SmolLM2 is `make demo`): every stage runs,
the report and plot appear, and a second run reuses every finished stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

MTP_DEMO = str(Path(sys.executable).with_name("mtp-demo"))


def demo(model: Path, out: Path, steps: str = "3") -> subprocess.CompletedProcess:
    return subprocess.run(
        [MTP_DEMO, "--model", str(model), "--out", str(out), "--max-steps", steps, "--limit", "2", "--batch-size", "2",
         "--taus", "0.9", "--static", "2", "--max-gen-toks", "12", "--timing-prompts", "2", "--timing-repeats", "1"],
        capture_output=True, text=True, timeout=900,
    )


def test_demo_runs_every_stage_then_reuses_them(tiny_run, tmp_path):  # noqa: F811
    out = tmp_path / "demo"
    first = demo(tiny_run / "model", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "distilled" / "train_config.yaml").exists() and (out / "undistilled" / "config.json").exists()
    assert (out / "sweep" / "pareto.png").exists() and (out / "sweep-undistilled" / "report.md").exists()
    report = (out / "sweep" / "report.md").read_text()
    for point in ("| hf |", "| ar |", "| static-k2 |", "| confadapt-tau0.9 |"):
        assert point in report
    assert "ConfAdapt tau 0.9 Eff. k: undistilled" in first.stdout and f"report: {out / 'sweep' / 'report.md'}" in first.stdout
    assert "distillation with the recipe 'smollm2-synthetic'" in first.stderr
    assert "ConfAdapt tau 0.9 at batch 1: " in first.stdout and "x the tokens/s of hf (" in first.stdout
    # What is kept: the exports and the sweeps; the finished run's resume state is removed.
    assert not (out / "distilled" / "checkpoints").exists() and f"removed {out / 'distilled' / 'checkpoints'}" in first.stderr
    stages = json.loads((out / "demo_stages.json").read_text())
    assert stages["distillation"]["finished"] and stages["distillation"]["settings"]["max_steps"] == 3

    again = demo(tiny_run / "model", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"distillation with the recipe 'smollm2-synthetic': done before with the same settings, reused ({out / 'distilled'})" in again.stderr
    assert again.stderr.count("done before, reused") == 6 and "evaluating" not in again.stderr

    # Another --max-steps: the finished stage is not reused as if it had those settings.
    changed = demo(tiny_run / "model", out, steps="4")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        f"mtp-demo: error: the distillation stage in {out / 'distilled'} was made with --max-steps 3; this run asks "
        f"for 4: remove {out / 'distilled'} to redo it with the new settings, or choose another --out")
    assert json.loads((out / "demo_stages.json").read_text()) == stages


def test_demo_names_a_missing_model(tmp_path):
    proc = demo(tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"mtp-demo: error: --model {tmp_path / 'nowhere'}: not a model directory (no config.json)"
