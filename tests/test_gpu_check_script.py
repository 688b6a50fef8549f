"""``benchmarks/gpu_check.py`` runs end to end with ``--tiny --device cpu`` (the GPU run itself needs a
GPU): the tables (eager, and the compiled path through a real ``torch.compile``), the exactness PASS
lines, the target line and an atomically written report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_cpu_prints_table_and_passes(tmp_path):
    out = tmp_path / "results" / "gpu_check.md"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    stdout = run.stdout
    assert stdout.count("| batch | k | ms/pass | pass cost vs ar | tokens/s | tokens/s vs ar |") == 1
    for batch in (1, 2, 4):
        assert f"| {batch} | 1 (ar) |" in stdout
        for k in (2, 4, 8, 16):
            assert f"| {batch} | {k} |" in stdout
    assert "skipped" not in stdout and "not run" not in stdout and "Partial report" not in stdout
    assert stdout.count("| batch | k | first call s (compiles) | tokens/s eager | tokens/s compiled |") == 1
    assert "| 1 | 1 (ar) | " in stdout.split("first call s")[1] and "| 1 | 8 | " in stdout.split("first call s")[1]
    for check in ("engine ar == HF generate", "engine verify k=4 == HF generate", "engine static k=1 == engine ar",
                  "engine verify k=4 compile=True == HF generate"):
        assert f"- PASS: {check}" in stdout
    assert "FAIL" not in stdout
    assert "static k=8 pass / ar pass at batch 1 = " in stdout and "(target <= 1.2)" in stdout
    assert "Elapsed: " in stdout
    assert out.read_text(encoding="utf-8").strip() == stdout.strip()  # the report is the printed output
    assert [p.name for p in out.parent.iterdir()] == ["gpu_check.md"]  # no temp file left behind


def test_gpu_check_wrapper_is_valid_bash():
    wrapper = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(wrapper)], check=True)
    text = wrapper.read_text()
    assert "set -euo pipefail" in text and "timeout -k 10 470" in text
    assert "--out benchmarks/results/gpu_check.md" in text
