"""``mtp-sweep``: every point through lm-eval in one process, report and plot, resumable; on our
offline task and on the stock gsm8k task (seeded offline cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MTP_SWEEP = str(Path(sys.executable).with_name("mtp-sweep"))


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MTP_SWEEP, *args], capture_output=True, text=True, timeout=900)


def table(report: str) -> dict[str, dict[str, str]]:
    """point -> column header -> cell, from report.md's table."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return {cells[0]: dict(zip(heads, cells)) for cells in rows}


def test_sweep_on_the_offline_task_writes_report_and_plot_and_resumes(tiny_checkpoints, tmp_path):
    out = tmp_path / "sweep"
    args = [str(tiny_checkpoints["mtp"]), "--task", "synthetic_gsm", "--limit", "3", "--taus", "0.9,0.3", "--static", "2",
            "--batch-size", "2", "--dtype", "float32", "--max-gen-toks", "24", "--out", str(out),
            "--timing-prompts", "2", "--timing-repeats", "2"]
    first = sweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["hf", "ar", "static-k2", "confadapt-tau0.9", "confadapt-tau0.3"]
    assert sorted(p.stem for p in (out / "points").iterdir()) == sorted(names)
    rows = table((out / "report.md").read_text())
    assert list(rows) == names
    # float32: the checkpoint's ar decoding is the original model's (hf) greedy decoding, answer for answer.
    assert rows["ar"]["answers = hf"] == "3/3" and rows["hf"]["answers = hf"] == "3/3" and rows["ar"]["answers = ar"] == "3/3"
    assert rows["ar"]["texts = hf"] == "3/3"
    static = json.loads((out / "points" / "static-k2.json").read_text())
    assert static["eff_k"] > 1.5 and static["mtp"]["strategy"] == "static" and static["mtp"]["k"] == 2
    assert static["settings"]["task"] == "synthetic_gsm" and len(static["answers"]) == 3
    assert len(static["weights"]["model"]) == 64 and len(static["contexts"]) == 3
    # Speed comes from the interleaved timing phase: batch 1 and the accuracy pass's batch 2, 2 rounds each.
    timing = json.loads((out / "timing.json").read_text())
    assert timing["batch_sizes"] == [1, 2] and timing["reference"] == "hf" and timing["prompts"] == {"1": 2, "2": 2}
    for batch in ("1", "2"):
        assert sorted(timing["runs"][batch]) == sorted(names)
        assert all(len(run["seconds"]) == 2 and min(run["tokens"]) > 0 for run in timing["runs"][batch].values())
        assert timing["summary"][batch]["hf"]["speedup"] == [1.0, 1.0, 1.0]
    median, low, high = timing["summary"]["1"]["static-k2"]["tokens_per_second"]
    assert low <= median <= high and f"{median:.1f} ({low:.1f}..{high:.1f})" == rows["static-k2"]["tokens/s, batch 1"]
    assert rows["hf"]["speed-up vs hf, batch 2"] == "1.00x (1.00..1.00)"
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert f"report: {out / 'report.md'}" in first.stdout

    again = sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before, reused") == 5 and "evaluating" not in again.stderr
    assert f"timing: reused from {out / 'timing.json'}" in again.stderr
    assert table((out / "report.md").read_text()) == rows

    more = sweep(*[a if a != "0.9,0.3" else "0.9,0.5" for a in args])  # one new point, four reused
    assert more.returncode == 0 and more.stderr.count("done before, reused") == 4
    assert "confadapt-tau0.5" in table((out / "report.md").read_text())
    assert "timing at batch 1" in more.stderr  # another set of points: timed again, all together


def test_sweep_on_the_stock_gsm8k_task(tiny_checkpoints, tmp_path):
    out = tmp_path / "gsm8k"
    proc = sweep(str(tiny_checkpoints["mtp"]), "--task", "gsm8k", "--limit", "2", "--taus", "0.9", "--static", "2",
                 "--skip-hf", "--max-gen-toks", "16", "--out", str(out), "--timing-repeats", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table((out / "report.md").read_text())
    assert list(rows) == ["ar", "static-k2", "confadapt-tau0.9"]
    assert "exact_match,flexible-extract" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--taus", "0.9,1.5"], "--taus '0.9,1.5': every tau must be in (0, 1]"),
        (["--taus", "high"], "--taus 'high': expected comma-separated floats"),
        (["--static", "0"], "--static '0': every k must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line(args, message, tiny_checkpoints, tmp_path):
    proc = sweep(str(tiny_checkpoints["mtp"]), "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mtp-sweep: error: {message}"]
    assert not (tmp_path / "x").exists()


def test_a_plain_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    proc = sweep(str(tiny_checkpoints["plain"]), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "has no mask token" in proc.stderr and "not an MTP checkpoint" in proc.stderr
