"""Lifecycle hooks (pluggy): isolation of broken hook plugins, opt-in loggers, and the built-in
Weights & Biases and TensorBoard plugins."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_train import settings, tiny_run  # noqa: F401  (the module-scoped tiny model and data)

from mtp_plugins import registry
from mtp_plugins.hooks import HookPluginError, hookimpl, plugin_manager
from train_cli.trainer import Trainer

MTP_TRAIN = str(Path(sys.executable).with_name("mtp-train"))

HOOK_MODULE = """
from mtp_plugins.hooks import hookimpl

CALLS = []

class Recorder:
    opt_in = {opt_in}

    @hookimpl
    def mtp_step_end(self, step, metrics):
        CALLS.append(step)

recorder = Recorder()

class Unmarked:
    def mtp_step_end(self, step, metrics):
        CALLS.append("unmarked")

unmarked = Unmarked()

class WrongArgs:
    @hookimpl
    def mtp_step_end(self, step, metrics, extra):
        pass

wrong_args = WrongArgs()
"""

ENTRY_POINTS = """
[mtp_plugins.hooks]
recorder = hooky:recorder
unmarked = hooky:unmarked
wrong-args = hooky:wrong_args
gone = no_such_module:plugin
"""


def registered(manager) -> set[str]:
    return {name for name, _ in manager.list_name_plugin()}


def test_broken_hook_plugins_are_reported_once_and_skipped(plugin_dist, caplog):
    plugin_dist("hooky", HOOK_MODULE.format(opt_in=False), ENTRY_POINTS, dist="hooky-dist")
    with caplog.at_level(logging.WARNING, logger="mtp_plugins"):
        manager = plugin_manager()
        plugin_manager()  # a second manager in the same process says nothing new
    names = registered(manager)
    assert {"recorder", "metrics-file", "progress"} <= names
    assert not names & {"unmarked", "wrong-args", "gone"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert any("gone = no_such_module:plugin, from hooky-dist 1.0: failed to load: ModuleNotFoundError" in m for m in messages)
    assert any("mtp_step_end not marked with @mtp_plugins.hooks.hookimpl" in m for m in messages)
    assert any("wrong-args = hooky:wrong_args, from hooky-dist 1.0" in m and "extra" in m for m in messages)
    manager.hook.mtp_step_end(step=7, metrics={"loss": 1.0, "k": 2, "tokens_per_s": 1.0})
    import hooky

    assert hooky.CALLS == [7]


def test_training_runs_with_a_broken_hook_plugin_installed(plugin_dist, tiny_run, tmp_path):  # noqa: F811
    plugin_dist("hooky", HOOK_MODULE.format(opt_in=False), ENTRY_POINTS, dist="hooky-dist")
    Trainer(settings(tiny_run, tmp_path / "out", max_steps=2, eval_every=2, save_every=2)).run()
    import hooky

    assert hooky.CALLS == [1, 2]  # the working third-party hook fired at every step
    assert (tmp_path / "out" / "config.json").exists()


def test_opt_in_plugins_run_only_when_named(plugin_dist):
    plugin_dist("hooky", HOOK_MODULE.format(opt_in=True), ENTRY_POINTS, dist="hooky-dist")
    assert "recorder" not in registered(plugin_manager())
    assert "recorder" in registered(plugin_manager(report_to="recorder"))
    with pytest.raises(registry.UnknownPluginError, match=r"--report-to 'recordr': no hook plugin of that name; opt-in hook plugins installed: recorder, tensorboard, wandb"):
        plugin_manager(report_to="recordr")
    with pytest.raises(registry.PluginLoadError, match="gone = no_such_module:plugin, from hooky-dist 1.0"):
        plugin_manager(report_to="gone")  # asked for by name: its failure is an error, not a warning


def test_wandb_asked_for_but_not_installed_is_one_clear_line(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed (import raises ImportError)
    with pytest.raises(HookPluginError, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
        plugin_manager(report_to="wandb")
    proc = subprocess.run(
        [MTP_TRAIN, "--model", str(tiny_run / "model"), "--data", str(tiny_run / "data.jsonl"), "--prompt-field", "question",
         "--response-field", "answer", "--output-dir", str(tmp_path / "out"), "--report-to", "nope"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mtp-train: error: --report-to 'nope': no hook plugin of that name; opt-in hook plugins installed: tensorboard, wandb"
    ]
    assert not (tmp_path / "out").exists()


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.summary = calls, {}
        calls.append(("init", kwargs))

    def log(self, values, step=None):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logger_sends_train_and_eval_metrics(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.run = None
    fake.init = lambda **kwargs: FakeRun(calls, kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Trainer(settings(tiny_run, tmp_path / "out", max_steps=2, eval_every=2, save_every=2, report_to="wandb")).run()
    init = calls[0]
    assert init[0] == "init" and init[1]["dir"] == str(tmp_path / "out") and init[1]["config"]["report_to"] == "wandb"
    assert "project" not in init[1] and "entity" not in init[1]  # wandb's own settings decide
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs if "train/loss" in c[2]] == [1, 2]
    evals = [c[2] for c in logs if "eval/loss" in c[2]]
    assert len(evals) == 1 and "eval/agreement/1" in evals[0] and "eval/est_eff_k_tau_0.9_one_pass" in evals[0]
    assert calls[-1] == ("finish",)


def test_tensorboard_logger_writes_event_files(tiny_run, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="the tensorboard package (a test extra) is needed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(settings(tiny_run, tmp_path / "out", max_steps=3, eval_every=3, save_every=3, report_to="tensorboard")).run()
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [3]
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


def test_an_extra_plugin_object_receives_every_event(tiny_run, tmp_path):  # noqa: F811
    seen: list[str] = []

    class Everything:
        @hookimpl
        def mtp_train_start(self, config, output_dir, start_step, total_steps):
            seen.append(f"start {start_step}/{total_steps}")

        @hookimpl
        def mtp_step_end(self, step, metrics):
            seen.append(f"step {step}")

        @hookimpl
        def mtp_validation_end(self, step, metrics):
            seen.append(f"eval {step}")

        @hookimpl
        def mtp_checkpoint_saved(self, path, step):
            assert Path(path).is_dir()
            seen.append(f"saved {step}")

        @hookimpl
        def mtp_train_end(self, summary):
            seen.append(f"end {summary['step']}")

    Trainer(settings(tiny_run, tmp_path / "out", max_steps=2, eval_every=2, save_every=1), plugins=(Everything(),)).run()
    assert seen == ["start 0/2", "step 1", "saved 1", "step 2", "eval 2", "saved 2", "end 2"]
