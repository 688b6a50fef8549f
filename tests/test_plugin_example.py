"""Third-party plugins end to end: the example package installed with pip is used by ``mtp-train``
and ``lm_eval``; a broken plugin and a name clash are reported without breaking the built-ins."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

from mtp_plugins import registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mtp-plugin-example"
BIN = Path(sys.executable).parent
MTP_TRAIN, LM_EVAL = str(BIN / "mtp-train"), str(BIN / "lm_eval")


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def example_installed():
    """pip-install the example package (from its folder) into this environment; uninstall after."""
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(EXAMPLE))
    registry.refresh()
    try:
        yield
    finally:
        pip("uninstall", "--yes", "--quiet", "mtp-plugin-example")
        sys.modules.pop("mtp_plugin_example", None)
        registry.refresh()


def run(command: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}, cwd=cwd)


def train_args(tiny_run, out, *extra):  # noqa: F811
    return [
        MTP_TRAIN, "--model", str(tiny_run / "model"), "--data", str(tiny_run / "data.jsonl"), "--prompt-field", "question",
        "--response-field", "answer", "--output-dir", str(out), "--seq-len", "40", "--regions", "4", "--k-max", "4",
        "--dtype", "fp32", "--micro-batch-size", "2", "--eval-rows", "4", "--max-steps", "2", *extra,
    ]


def test_listing_shows_the_example_plugins_with_their_distribution(example_installed):
    proc = run([MTP_TRAIN, "--list-plugins"], env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[2].strip(): line for line in proc.stdout.splitlines() if line.count("│") > 4}
    for name, kind in [("reverse-kl", "loss"), ("entropy-confadapt", "decoder"), ("csv-metrics", "hook plugin")]:
        assert kind in rows[name] and "mtp-plugin-example 0.1.0" in rows[name] and "ok" in rows[name], rows.get(name)
    assert "opt-in (--report-to csv-metrics)" in rows["csv-metrics"]
    assert "0 broken" in proc.stdout


def test_the_example_loss_is_reverse_kl(example_installed):
    loss = registry.load_loss("reverse-kl")()
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    q, p = student.softmax(-1), teacher.softmax(-1)
    expected = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(loss(student, teacher, torch.zeros(5, dtype=torch.long), torch.ones(5)), expected)
    assert float(loss(student, student, torch.zeros(5, dtype=torch.long), torch.ones(5))) == pytest.approx(0.0, abs=1e-6)


def test_mtp_train_uses_the_example_loss_and_its_hook_fires(example_installed, tiny_run, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run(train_args(tiny_run, out, "--loss", "reverse-kl", "--report-to", "csv-metrics"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert [float(r["loss"]) for r in rows] == pytest.approx([line["loss"] for line in lines])
    assert json.loads((out / "config.json").read_text())["mtp"]["k_max"] == 4


def test_lm_eval_decodes_with_the_example_decoder(example_installed, tiny_checkpoints, tmp_path):
    out = tmp_path / "eval"
    proc = run([
        LM_EVAL, "--model", "mtp", "--model_args",
        f"pretrained={tiny_checkpoints['mtp']},k=4,tau=0.5,strategy=entropy-confadapt,report_to=csv-metrics",
        "--tasks", "gsm8k", "--limit", "2", "--device", "cpu", "--output_path", str(out), "--gen_kwargs", "max_gen_toks=16",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    mtp = json.loads(results.read_text())["config"]["mtp"]
    assert mtp["strategy"] == "entropy-confadapt" and mtp["samples"] == 2
    (table,) = out.rglob("mtp_decode.csv")
    with table.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["strategy"] == "entropy-confadapt" and int(row["samples"]) == 2
    assert float(row["eff_k"]) == pytest.approx(mtp["eff_k"])


def fake_dist(root: Path, dist: str, entry_points: str) -> Path:
    """A distribution whose metadata is on PYTHONPATH (its code may well be missing)."""
    info = root / f"{dist.replace('-', '_')}-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


def test_a_broken_plugin_is_listed_and_the_built_ins_still_work(tiny_run, tiny_checkpoints, tmp_path):  # noqa: F811
    path = fake_dist(tmp_path / "site", "broken-plugins", """
        [mtp_plugins.losses]
        broken-loss = missing_module:Loss
        [mtp_plugins.decoders]
        broken-decoder = missing_module:Decoder
        [mtp_plugins.hooks]
        broken-hook = missing_module:hook
    """)
    env = {"PYTHONPATH": str(path)}
    listing = run([MTP_TRAIN, "--list-plugins"], env={**env, "COLUMNS": "400"})
    assert listing.returncode == 0
    rows = {line.split("│")[2].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 4}
    for name in ("broken-loss", "broken-decoder", "broken-hook"):
        assert "broken-plugins 2.0" in rows[name] and "missing_module:" in rows[name]
        assert "BROKEN: failed to load: ModuleNotFoundError: No module named 'missing_module'" in rows[name]
    assert all("ok" in rows[name] for name in ("soft-kl", "confadapt", "metrics-file"))
    assert "3 broken" in listing.stdout

    trained = run(train_args(tiny_run, tmp_path / "out", "--loss", "soft-kl"), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stderr.count("skipping broken hook plugin broken-hook = missing_module:hook, from broken-plugins 2.0") == 1
    assert (tmp_path / "out" / "config.json").exists()

    evaluated = run([
        LM_EVAL, "--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},k=4,strategy=confadapt",
        "--tasks", "gsm8k", "--limit", "1", "--device", "cpu", "--gen_kwargs", "max_gen_toks=8",
    ], env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "gsm8k" in evaluated.stdout


def test_two_distributions_claiming_one_loss_name_is_a_clear_error(tiny_run, tmp_path):  # noqa: F811
    path = fake_dist(tmp_path / "site", "copycat-losses", "[mtp_plugins.losses]\nsoft-kl = copycat:SoftKL\n")
    proc = run(train_args(tiny_run, tmp_path / "out", "--loss", "soft-kl"), env={"PYTHONPATH": str(path)})
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mtp-train: error: loss name 'soft-kl' is registered by more than one distribution:")
    assert "copycat-losses 2.0 (copycat:SoftKL)" in line and "mtp-plugins" in line
    assert not (tmp_path / "out").exists()
