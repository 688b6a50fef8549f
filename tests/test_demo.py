"""``mtp-demo`` end to end on a tiny model (the real run on SmolLM2 is `make demo`): every stage runs,
the report and plot appear, and a second run reuses every finished stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

MTP_DEMO = str(Path(sys.executable).with_name("mtp-demo"))


def demo(model: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MTP_DEMO, "--model", str(model), "--out", str(out), "--max-steps", "3", "--limit", "2", "--batch-size", "2",
         "--taus", "0.9", "--static", "2", "--max-gen-toks", "12"],
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

    again = demo(tiny_run / "model", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distillation: done before" in again.stderr
    assert again.stderr.count("done before, reused") == 6 and "evaluating" not in again.stderr


def test_demo_names_a_missing_model(tmp_path):
    proc = demo(tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"mtp-demo: error: --model {tmp_path / 'nowhere'}: not a model directory (no config.json)"
