"""``mtp-sweep``: every point through lm-eval in one process, report and plot, resumable; on our
offline task and on the stock gsm8k task (seeded offline cache)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

MTP_SWEEP = str(Path(sys.executable).with_name("mtp-sweep"))


def sweep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = None if env is None else {**os.environ, **env}
    return subprocess.run([MTP_SWEEP, *args], capture_output=True, text=True, timeout=900, env=environment)


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
    names = ["hf", "ar", "verify", "verify-lookup3", "static-k2", "confadapt-tau0.9", "confadapt-tau0.3"]
    assert sorted(p.stem for p in (out / "points").iterdir()) == sorted(names)
    rows = table((out / "report.md").read_text())
    assert list(rows) == names
    # float32: the checkpoint's ar decoding is the original model's (hf) greedy decoding, answer for answer.
    assert rows["ar"]["answers = hf"] == "3/3" and rows["hf"]["answers = hf"] == "3/3" and rows["ar"]["answers = ar"] == "3/3"
    assert rows["ar"]["texts = hf"] == "3/3"
    # verify (the default --verify-lookup 0,3) is lossless: ar's answers, by contract and in float32 in fact.
    for name in ("verify", "verify-lookup3"):
        assert rows[name]["answers = ar"] == "3/3" and rows[name]["lossless by contract"] == "yes"
    assert [rows[n]["lossless by contract"] for n in ("hf", "ar", "static-k2", "confadapt-tau0.9")] == ["yes", "yes", "no", "no"]
    lookup = json.loads((out / "points" / "verify-lookup3.json").read_text())
    assert lookup["point"]["draft_lookup"] == 3 and lookup["mtp"]["strategy"] == "verify"
    assert lookup["point"]["recovery"] == 1 and lookup["mtp"]["decoder_options"] == {"recovery": 1}  # recorded = used
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
        # Eff. k of the timed generations themselves: mtp points only; ar and static k=2 are exact
        assert "eff_k" not in timing["runs"][batch]["hf"] and timing["summary"][batch]["hf"]["eff_k"] is None
        assert timing["runs"][batch]["ar"]["eff_k"] == [1.0, 1.0]
        assert all(1.0 < e <= 2.0 for e in timing["runs"][batch]["static-k2"]["eff_k"])
    median, low, high = timing["summary"]["1"]["static-k2"]["tokens_per_second"]
    assert low <= median <= high and f"{median:.1f} ({low:.1f}..{high:.1f})" == rows["static-k2"]["tokens/s, batch 1"]
    assert rows["hf"]["speed-up vs hf, batch 2"] == "1.00x (1.00..1.00)"
    assert timing["warmup_tokens"] == 16 and "warm-up batch each (at most 16 new tokens)" in (out / "report.md").read_text()
    # The allocator the timings ran under (mtp-sweep tunes glibc malloc at start) is recorded and reported.
    if platform.libc_ver()[0] == "glibc":
        assert timing["key"]["malloc"] == {"state": "tuned", "mmap_threshold": 64 << 20, "trim_threshold": 256 << 20}
        assert timing["malloc"] in (out / "report.md").read_text() and timing["malloc"].startswith("glibc malloc tuned")
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert f"report: {out / 'report.md'}" in first.stdout

    again = sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before, reused") == 7 and "evaluating" not in again.stderr
    assert f"timing: reused from {out / 'timing.json'}" in again.stderr
    assert table((out / "report.md").read_text()) == rows

    more = sweep(*[a if a != "0.9,0.3" else "0.9,0.5" for a in args])  # one new point, six reused
    assert more.returncode == 0 and more.stderr.count("done before, reused") == 6
    assert "confadapt-tau0.5" in table((out / "report.md").read_text())
    assert "timing at batch 1" in more.stderr  # another set of points: timed again, all together

    # The same points and settings under glibc's default allocator: not the saved timing, timed again.
    default = sweep(*[a if a != "0.9,0.3" else "0.9,0.5" for a in args], env={"MTP_PLUGINS_MALLOC": "0"})
    assert default.returncode == 0 and default.stderr.count("done before, reused") == 7
    assert "timing at batch 1" in default.stderr and "timing: reused" not in default.stderr
    assert json.loads((out / "timing.json").read_text())["key"]["malloc"]["state"] == "off"


def test_sweep_on_the_stock_gsm8k_task(tiny_checkpoints, tmp_path):
    out = tmp_path / "gsm8k"
    proc = sweep(str(tiny_checkpoints["mtp"]), "--task", "gsm8k", "--limit", "2", "--taus", "0.9", "--static", "2",
                 "--skip-hf", "--max-gen-toks", "16", "--out", str(out), "--timing-repeats", "0", "--verify-lookup", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table((out / "report.md").read_text())
    assert list(rows) == ["ar", "static-k2", "confadapt-tau0.9"]  # --verify-lookup none: no verify points
    assert "exact_match,flexible-extract" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--taus", "0.9,1.5"], "--taus '0.9,1.5': every tau must be in (0, 1]"),
        (["--taus", "high"], "--taus 'high': expected comma-separated floats"),
        (["--static", "0"], "--static '0': every k must be >= 1"),
        (["--verify-lookup", "0,-1"], "--verify-lookup '0,-1': every n-gram length must be >= 0 (0: drafts from the "
                                      "mask slots alone)"),
        (["--verify-lookup", "3.5"], "--verify-lookup '3.5': expected comma-separated ints"),
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


# ------------------------------------------------------------------ plan, report, plot on known records

SETTINGS = {"model": "/runs/distilled", "original": "/models/original", "task": "synthetic_gsm", "limit": 10,
            "batch_size": 4, "dtype": "bfloat16", "num_fewshot": None, "max_gen_toks": None, "device": "cpu"}
#: name -> (point fields, accuracy, Eff. k, how many of the 10 answers equal ar's, batch-1 speed-up)
FAKE = {
    "hf": ({"backend": "hf"}, 0.4, 1.0, 10, [1.0, 1.0, 1.0]),
    "ar": ({"strategy": "ar", "k": 1, "tau": 1.0}, 0.4, 1.0, 10, [0.95, 0.9, 1.0]),
    "verify": ({"strategy": "verify", "k": 4, "tau": 1.0, "draft_lookup": 0}, 0.4, 1.91, 10, [1.72, 1.61, 1.79]),
    "verify-lookup3": ({"strategy": "verify", "k": 4, "tau": 1.0, "draft_lookup": 3}, 0.4, 2.34, 10, [2.05, 1.94, 2.2]),
    "static-k2": ({"strategy": "static", "k": 2, "tau": 1.0}, 0.1, 2.0, 5, [1.9, 1.8, 2.0]),
    "confadapt-tau0.9": ({"strategy": "confadapt", "k": 4, "tau": 0.9}, 0.3, 2.26, 8, [2.1, 2.02, 2.31]),
}


def fake_records() -> list[dict]:
    """Sweep records as points/*.json holds them, with known numbers: 10 problems; ar's texts equal
    hf's on 9 (its answers on all 10)."""
    records = []
    for name, (fields, accuracy, eff_k, same, _) in FAKE.items():
        point = {"name": name, "backend": "mtp", "strategy": None, "k": None, "tau": None, "draft_lookup": None, **fields}
        answers = {str(d): f"a{d}" if d < same else f"other{d}" for d in range(10)}
        responses = {str(d): f"text {d}" + (" changed" if name == "ar" and d == 9 else "") for d in range(10)}
        weights = {"model": "m" * 64} | ({"original": "o" * 64} if name == "hf" else {})
        records.append({"point": point, "settings": dict(SETTINGS), "weights": weights,
                        "metric": "exact_match,flexible-extract", "accuracy": accuracy, "stderr": 0.05, "eff_k": eff_k,
                        "answers": answers, "responses": responses})
    return records


def fake_timing(records: list[dict]) -> dict:
    summary = {str(b): {name: {"tokens_per_second": [10 * up[0], 10 * up[1], 10 * up[2]], "speedup": up,
                               "eff_k": None if name == "hf" else [1.5 + b / 10] * 3}
                        for name, (*_, up) in FAKE.items()} for b in (1, 4)}
    return {"key": {"settings": dict(SETTINGS), "points": [[r["point"], r["weights"]] for r in records]},
            "batch_sizes": [1, 4], "reference": "hf", "prompts": {"1": 8, "4": 8}, "repeats": 3, "summary": summary}


def write_fake_sweep(out: Path, timed: bool = True) -> None:
    """OUT/points/*.json and (timed) OUT/timing.json of a sweep with the FAKE points."""
    records = fake_records()
    (out / "points").mkdir(parents=True)
    for record in records:
        (out / "points" / f"{record['point']['name']}.json").write_text(json.dumps(record))
    if timed:
        (out / "timing.json").write_text(json.dumps(fake_timing(records)))


def test_plan_adds_one_verify_point_per_lookup_after_ar():
    from mtp_plugins.lm_eval.sweep import Point, plan

    points = plan([0.9], [2], 4, verify_lookups=[0, 3])
    assert [p.name for p in points] == ["hf", "ar", "verify", "verify-lookup3", "static-k2", "confadapt-tau0.9"]
    assert points[2] == Point("verify", "mtp", "verify", 4, 1.0, draft_lookup=0, recovery=1)
    assert points[3] == Point("verify-lookup3", "mtp", "verify", 4, 1.0, draft_lookup=3, recovery=1)
    assert points[1].draft_lookup is None and points[5].draft_lookup is None
    assert points[1].recovery is None and points[5].recovery is None  # recorded only where used


def test_verify_points_record_their_recovery():
    # The recorded recovery is the one the point's decoder ran with; a saved point with another is not reused.
    from dataclasses import asdict, replace

    from mtp_plugins.lm_eval.sweep import plan
    from mtp_plugins.lm_eval.sweep_report import _notes

    verify = plan([], [], 4, include_hf=False, verify_lookups=[0])[1]
    assert asdict(verify)["recovery"] == 1
    assert asdict(replace(verify, recovery=0)) != asdict(verify)
    assert any("1 recovery group(s)" in line for line in _notes(None, [1]))
    assert not any("recovery" in line for line in _notes(None, [0]))
    assert [p.name for p in plan([0.9], [], 4, include_hf=False)] == ["ar", "confadapt-tau0.9"]  # no lookups: no verify


def test_the_report_states_the_warm_up_the_timing_recorded():
    from mtp_plugins.lm_eval.sweep_report import _notes

    timing = fake_timing(fake_records())
    assert any("3 rounds after one warm-up batch each, the points" in line for line in _notes(timing))  # not recorded
    timing["warmup_tokens"] = 16
    assert any("3 rounds after one warm-up batch each (at most 16 new tokens), the points" in line for line in _notes(timing))


def test_check_numbers_reads_verify_lookups():
    from mtp_plugins.lm_eval.sweep_args import check_numbers

    common = dict(taus="0.9", static="2", k=None, limit=None, batch_size=1, dtype="float32", num_fewshot=None,
                  max_gen_toks=None, timing_prompts=1, timing_repeats=0)
    assert check_numbers(**common)[2] == [0, 3]  # the default
    assert check_numbers(**common, verify_lookup="4,0,4")[2] == [4, 0]  # each once, in order
    assert check_numbers(**common, verify_lookup="none")[2] == []


def test_the_report_says_which_points_are_lossless_by_contract():
    from types import SimpleNamespace

    from mtp_plugins.lm_eval.sweep_report import report

    records = fake_records()
    sweep = SimpleNamespace(task="synthetic_gsm", model_path="/runs/distilled", original_path="/models/original",
                            limit=10, batch_size=4, dtype="bfloat16", device="cpu")
    text = report(records, sweep, "mtp-sweep /runs/distilled", fake_timing(records))
    rows = table(text)
    assert list(rows) == list(FAKE)
    assert {name: row["lossless by contract"] for name, row in rows.items()} == {
        "hf": "yes", "ar": "yes", "verify": "yes", "verify-lookup3": "yes", "static-k2": "no", "confadapt-tau0.9": "no"}
    assert list(rows["verify"]) == [
        "point", "lossless by contract", "accuracy", "Eff. k, accuracy pass (batch 4)", "tokens/s, batch 1",
        "speed-up vs hf, batch 1", "Eff. k, batch 1", "tokens/s, batch 4", "speed-up vs hf, batch 4", "Eff. k, batch 4",
        "answers = ar", "answers = hf", "texts = hf"]
    assert rows["verify"]["accuracy"] == "40.0 ± 5.0" and rows["verify"]["Eff. k, accuracy pass (batch 4)"] == "1.91"
    assert (rows["verify"]["Eff. k, batch 1"], rows["verify"]["Eff. k, batch 4"], rows["hf"]["Eff. k, batch 1"]) == ("1.60", "1.90", "-")
    assert rows["verify"]["speed-up vs hf, batch 1"] == "1.72x (1.61..1.79)"
    assert rows["confadapt-tau0.9"]["answers = ar"] == "8/10" and rows["ar"]["texts = hf"] == "9/10"
    assert ("`lossless by contract`: yes where the output equals greedy `ar` decoding of the same checkpoint by "
            "construction") in text
    assert "in exact arithmetic; in bf16 a wider pass may round differently, which the `answers = ar` column counts" in text


@pytest.mark.parametrize("timed", [True, False], ids=["timed", "not-timed"])
def test_the_plot_is_written_with_verify_points(timed, tmp_path):
    pytest.importorskip("matplotlib")
    from mtp_plugins.lm_eval.sweep_report import lossless, plot, short_name

    records = fake_records()
    path = tmp_path / "pareto.png"
    assert plot(records, path, fake_timing(records) if timed else None) is True
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]  # no temporary file left behind
    assert [short_name(r) for r in records] == ["original", "ar", "verify", "verify + lookup 3", "k 2", "τ 0.9"]
    assert [lossless(r) for r in records] == [True, True, True, True, False, False]
