"""``mtp-demo`` end to end on a tiny model (the real run on SmolLM2 is `make demo`): every stage runs,
the report and plot appear, and a second run reuses every finished stage; its plain-words summary,
built from a sweep's saved points and timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_sweep import write_fake_sweep
from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

MTP_DEMO = str(Path(sys.executable).with_name("mtp-demo"))


def demo(model: Path, out: Path, steps: str = "3") -> subprocess.CompletedProcess:
    return subprocess.run(
        [MTP_DEMO, "--model", str(model), "--out", str(out), "--max-steps", steps, "--limit", "2", "--batch-size", "2",
         "--taus", "0.9", "--static", "2", "--verify-lookup", "2", "--max-gen-toks", "12", "--timing-prompts", "2",
         "--timing-repeats", "1"],
        capture_output=True, text=True, timeout=900,
    )


def test_demo_runs_every_stage_then_reuses_them(tiny_run, tmp_path):  # noqa: F811
    out = tmp_path / "demo"
    first = demo(tiny_run / "model", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "distilled" / "train_config.yaml").exists() and (out / "sweep" / "pareto.png").exists()
    assert not (out / "undistilled").exists() and not (out / "sweep-undistilled").exists()  # no such stage any more
    assert sorted(p.stem for p in (out / "sweep" / "points").iterdir()) == sorted(
        ["hf", "ar", "verify-lookup2", "static-k2", "confadapt-tau0.9"])  # --verify-lookup 2 reached the sweep
    assert f"report: {out / 'sweep' / 'report.md'}" in first.stdout
    assert "== mtp-demo: 2/3 distillation with the recipe 'smollm2-demo'" in first.stderr
    assert "== mtp-demo: 3/3 sweep on the offline task 'synthetic_gsm_easy'" in first.stderr
    # The plain-words summary: printed, and the same text in OUT/summary.md.
    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "original model", "distilled adapter, ar", "verify with prompt lookup (n-grams up to 2)", "ConfAdapt tau 0.9"]
    assert "\n".join(summary) in first.stdout and "x the tokens/s of the original at batch 1 (" in summary[2]
    # What is kept: the exports and the sweeps; the finished run's resume state is removed.
    assert not (out / "distilled" / "checkpoints").exists() and f"removed {out / 'distilled' / 'checkpoints'}" in first.stderr
    stages = json.loads((out / "demo_stages.json").read_text())
    assert stages["distillation"]["finished"] and stages["distillation"]["settings"]["max_steps"] == 3

    again = demo(tiny_run / "model", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"distillation with the recipe 'smollm2-demo': done before with the same settings, reused ({out / 'distilled'})" in again.stderr
    assert again.stderr.count("done before, reused") == 5 and "evaluating" not in again.stderr

    # Another --max-steps: the finished stage is not reused as if it had those settings.
    changed = demo(tiny_run / "model", out, steps="4")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        f"mtp-demo: error: the distillation stage in {out / 'distilled'} was made with --max-steps 3; this run asks "
        f"for 4: remove {out / 'distilled'} to redo it with the new settings, or choose another --out")
    assert json.loads((out / "demo_stages.json").read_text()) == stages

    # A recipe whose content changed since (an update of the package) is not reused either.
    stale = json.loads((out / "demo_stages.json").read_text())
    stale["distillation"]["settings"]["recipe_sha256"] = "0" * 64
    (out / "demo_stages.json").write_text(json.dumps(stale))
    updated = demo(tiny_run / "model", out)
    assert updated.returncode == 2 and "was made with the recipe's content (sha256) '0000" in updated.stderr


def test_demo_names_a_missing_model(tmp_path):
    proc = demo(tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"mtp-demo: error: --model {tmp_path / 'nowhere'}: not a model directory (no config.json)"


def test_the_summary_is_built_from_the_saved_points_and_timings(tmp_path):
    from train_cli.demo import _summary

    sweep = tmp_path / "sweep"
    write_fake_sweep(sweep)
    assert _summary(sweep).splitlines() == [
        "original model: 40% on 10 problems (flexible extract)",
        "distilled model, ar: texts identical to the original on 9/10, answers 10/10",
        "verify (drafts from the mask slots alone): answers identical to ar on 10/10, 1.72x the tokens/s of the "
        "original at batch 1 (1.61..1.79 over 3 interleaved rounds), Eff. k 1.6 at batch 1 (1.9 in the accuracy pass at batch 4)",
        "verify with prompt lookup (n-grams up to 3): answers identical to ar on 10/10, 2.05x the tokens/s of the "
        "original at batch 1 (1.94..2.20 over 3 interleaved rounds), Eff. k 1.6 at batch 1 (2.3 in the accuracy pass at batch 4)",
        "ConfAdapt tau 0.9: 2.10x faster at batch 1, 8/10 answers kept (equal to ar), accuracy 30% (original 40%), "
        "Eff. k 1.6 at batch 1 (2.3 in the accuracy pass at batch 4)",
    ]


def test_the_summary_says_not_timed_and_leaves_out_what_is_missing(tmp_path):
    from train_cli.demo import _summary

    sweep = tmp_path / "sweep"
    write_fake_sweep(sweep, timed=False)
    for name in ("hf", "verify-lookup3"):
        (sweep / "points" / f"{name}.json").unlink()
    stale = json.loads((sweep / "points" / "confadapt-tau0.9.json").read_text())
    stale["point"] = {**stale["point"], "name": "confadapt-tau0.5", "tau": 0.5}
    stale["settings"]["limit"] = 99  # saved by an earlier sweep with other settings: not this sweep's result
    (sweep / "points" / "confadapt-tau0.5.json").write_text(json.dumps(stale))
    assert _summary(sweep).splitlines() == [
        "verify (drafts from the mask slots alone): answers identical to ar on 10/10, not timed, Eff. k 1.9",
        "ConfAdapt tau 0.9: not timed, 8/10 answers kept (equal to ar), accuracy 30%, Eff. k 2.3",
    ]
    assert _summary(tmp_path / "nothing") == ""


def test_the_demo_point_lists_are_module_constants_and_its_defaults():
    import inspect

    from train_cli import demo

    options = inspect.signature(demo.demo).parameters
    assert [options[name].default.default for name in ("taus", "static", "verify_lookup", "limit")] == [
        demo.TAUS, demo.STATIC, demo.VERIFY_LOOKUP, demo.LIMIT]
    assert "0" in demo.VERIFY_LOOKUP.split(",") and "0.9" in demo.TAUS.split(",")  # the points the goals name
    # the stderr of an accuracy near 40% on LIMIT problems is below 5 points
    assert 100 * (0.4 * 0.6 / (demo.LIMIT - 1)) ** 0.5 < 5


def test_the_demo_recipe_trains_a_gated_adapter_on_the_demo_tasks_level():
    import yaml

    from mtp_plugins import synthetic
    from train_cli import demo
    from train_cli.config import build_config

    config = build_config(demo.RECIPE)
    assert config.trainable == "gated-lora" and config.export == "adapter"
    task = yaml.safe_load((Path(__file__).parents[1] / "tasks" / f"{demo.TASK}.yaml").read_text())
    assert synthetic.parse_source(config.data)[1] == task["dataset_kwargs"]["difficulty"] == "easy"


def test_the_constraints_pin_every_dependency_within_what_pyproject_allows():
    """``make`` installs with ``-c constraints.txt`` so the committed demo reproduces: every direct
    dependency of the package and of the extras ``make`` installs must be pinned there, to a version
    ``pyproject.toml`` accepts; torch is left to TORCH_SPEC (CPU or CUDA build)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins
    wanted = project["dependencies"] + project["optional-dependencies"]["test"] + project["optional-dependencies"]["bench"]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"
    makefile = (root / "Makefile").read_text()
    assert "-c $(CONSTRAINTS)" in makefile and "CONSTRAINTS ?= constraints.txt" in makefile
