"""Crash safety: SIGKILL at random moments (inside checkpoint writes too) never costs more than the
steps since the last complete checkpoint and ``--resume`` finishes the run; Ctrl-C saves and exits
130; a NaN/inf loss stops (or is skipped) without a checkpoint of the poisoned state; result files
are replaced atomically."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

from mtp_plugins.files import atomic_writer, write_atomic
from train_cli import checkpoints
from train_cli.config import build_config
from train_cli.trainer import NonFiniteLoss, Trainer

MTP_TRAIN = str(Path(sys.executable).with_name("mtp-train"))
# One thread: the killed runs and the reference agree; wide lines: rich does not wrap the log.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
RUN = dict(prompt_field="question", response_field="answer", seq_len=40, regions=4, k_min=2, k_max=4, micro_batch_size=4,
           grad_accum=1, dtype="fp32", lr=1e-3, warmup_steps=2, eval_rows=8, eval_every=1000, save_every=1, keep_last=2)
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "train_config.yaml", checkpoints.STATE_FILE}


def config(tiny_run, out, **overrides):  # noqa: F811
    return build_config(model=str(tiny_run / "model"), data=str(tiny_run / "data.jsonl"), output_dir=str(out),
                        **{**RUN, **overrides})


def cli(tiny_run, out, **overrides):  # noqa: F811
    values = {"model": tiny_run / "model", "data": tiny_run / "data.jsonl", "output_dir": out, **RUN, **overrides}
    return [MTP_TRAIN, *(part for key, value in values.items() for part in (f"--{key.replace('_', '-')}", str(value)))]


def launch(args, log: Path, env=ENV) -> subprocess.Popen:
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll every millisecond until ``predicate()`` holds while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(0.001)


def train_records(out: Path) -> list[dict]:
    return [r for r in checkpoints.complete_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def check_killed_run(out: Path, newest_before: int) -> int:
    """After a kill: every directory under a checkpoint's name is whole, the newest loads (weights and
    trainer state) and is no older than before, and metrics.jsonl reads back with at most a torn tail."""
    from transformers import AutoModelForCausalLM

    from mtp_plugins import read_mtp_spec

    complete = checkpoints.complete_checkpoints(out)
    named = sorted(p for p in checkpoints.checkpoint_dir(out).iterdir() if p.name.startswith("step-"))
    assert named == complete and complete, sorted(p.name for p in checkpoints.checkpoint_dir(out).iterdir())
    for path in complete:
        assert CHECKPOINT_FILES <= {f.name for f in path.iterdir()}, path
    state = checkpoints.load_state(complete[-1])
    assert state["step"] == int(complete[-1].name.removeprefix("step-")) >= newest_before
    model = AutoModelForCausalLM.from_pretrained(complete[-1])
    assert read_mtp_spec(model) is not None and all(torch.isfinite(p).all() for p in model.parameters())
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(checkpoints.complete_jsonl(out / "metrics.jsonl")) >= len(lines) - 1
    steps = [r["step"] for r in train_records(out)]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= state["step"], steps
    return state["step"]


def test_sigkill_at_random_moments_never_breaks_the_run_and_resume_finishes_it(tiny_run, tmp_path):  # noqa: F811
    """Kills after a step, inside a checkpoint write (polling for this process's temporary directory),
    during start-up and inside the final export; each time the last complete checkpoint loads and
    ``--resume`` continues from it; the finished run equals one never interrupted."""
    from safetensors.torch import load_file

    max_steps, out, rng = 60, tmp_path / "killed", random.Random(1234)
    newest, history = 0, []  # (moment, newest checkpoint after the kill, the kill left a temporary directory)
    moments = ["step", "write", "startup", "write", "step", "write", "export"]
    root = checkpoints.checkpoint_dir(out)
    for i, moment in enumerate(moments):
        resume = bool(checkpoints.complete_checkpoints(out))
        leftovers = {p.name for p in root.iterdir() if p.name.startswith(".")} if root.exists() else set()
        args = cli(tiny_run, out, max_steps=max_steps) + (["--resume"] if resume else [])
        proc = launch(args, tmp_path / f"launch-{i}.log")
        if moment == "step":  # a random moment once this process has saved a checkpoint of its own
            wait_until(lambda: checkpoints.complete_checkpoints(out)[-1:] > [checkpoints.checkpoint_path(out, newest)], proc)
            time.sleep(rng.uniform(0.0, 0.3))
        elif moment == "write":  # inside the write of the j-th checkpoint of this process
            staging = root / f".partial-step-{newest + rng.randint(1, 3):07d}-{proc.pid}"
            wait_until(staging.exists, proc)
            time.sleep(rng.uniform(0.0, 0.005))
        elif moment == "startup":  # loading, resuming, dropping later metrics lines, removing leftovers
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # inside the final export, once every step is done
            wait_until((out / ".export-partial").exists, proc)
        assert proc.poll() is None, f"kill {i} ({moment}) came too late: the run had ended"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        hit = any(p.name.endswith(f"-{proc.pid}") for p in root.iterdir()) or (out / ".export-partial").exists()
        if moment != "startup":  # this process got past its start: it resumed from the newest checkpoint...
            if resume:
                assert f"steps {newest}..{max_steps}" in (tmp_path / f"launch-{i}.log").read_text(), history
            assert not leftovers & {p.name for p in root.iterdir()}, history  # ...and removed the leftovers
        newest = check_killed_run(out, newest)
        history.append((moment, newest, hit))
    assert sum(hit for moment, _, hit in history if moment == "write") >= 2, history  # the writes were hit
    assert newest == max_steps, history  # the export kill came after the last step's checkpoint
    assert (out / ".export-partial").exists() or not (out / "config.json").exists(), history  # no half a model

    proc = launch(cli(tiny_run, out, max_steps=max_steps) + ["--resume"], tmp_path / "final.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert not [p.name for p in checkpoints.checkpoint_dir(out).iterdir() if p.name.startswith(".")]
    assert not (out / ".export-partial").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, max_steps + 1))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed runs
    try:
        straight = Trainer(config(tiny_run, tmp_path / "straight", max_steps=max_steps, save_every=1000)).run()
    finally:
        torch.set_num_threads(threads)
    reference = [r for r in checkpoints.complete_jsonl(straight / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["k"], r["offset"]) for r in records if r["kind"] == "train"] == [(r["k"], r["offset"]) for r in reference]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sigint_saves_the_last_step_prints_how_to_resume_and_exits_130(tiny_run, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = launch(cli(tiny_run, out, max_steps=80, save_every=1000), tmp_path / "run.log")
    wait_until(lambda: len(train_records(out)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    step = train_records(out)[-1]["step"]
    assert 3 <= step < 80
    checkpoint = checkpoints.checkpoint_path(out, step)
    assert checkpoints.complete_checkpoints(out) == [checkpoint]  # the only one: --save-every is 1000
    assert checkpoints.load_state(checkpoint)["step"] == step
    last = log.strip().splitlines()[-1]
    match = re.fullmatch(rf"mtp-train: interrupted after step {step}, saved as {re.escape(str(checkpoint))}; continue with: (.*)", last)
    assert match, last
    command = shlex.split(match.group(1))
    assert command[0] == "mtp-train" and command[-1] == "--resume"

    resumed = subprocess.run([MTP_TRAIN, *command[1:]], capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {step}..80" in resumed.stderr
    assert [r["step"] for r in train_records(out)] == list(range(1, 81))


# A loss plugin that poisons chosen training steps: loss * NaN, or (NAN_IN=grad) a finite loss whose
# gradient is NaN. Counting only training calls (validation runs without grad) with grad_accum 1.
NAN_LOSS = """
    import os

    import torch
    from mtp_plugins.losses import HardLabel

    class NanAt(HardLabel):
        def __init__(self):
            self.calls = 0
            self.steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}

        def __call__(self, student, teacher, targets, weights):
            loss = super().__call__(student, teacher, targets, weights)
            if not torch.is_grad_enabled():
                return loss
            self.calls += 1
            if self.calls not in self.steps:
                return loss
            if os.environ.get("NAN_IN") == "grad":
                student.register_hook(lambda grad: torch.full_like(grad, float("nan")))
                return loss
            return loss * float("nan")
"""
NAN_ENTRY_POINTS = "[mtp_plugins.losses]\nnan-at = nan_loss:NanAt\n"


def test_a_nan_loss_stops_the_cli_with_one_line_and_keeps_the_last_checkpoint(plugin_dist, tiny_run, tmp_path):  # noqa: F811
    plugin_dist("nan_loss", NAN_LOSS, NAN_ENTRY_POINTS, dist="nan-loss")
    out = tmp_path / "out"
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**ENV, "NAN_STEPS": "3", "PYTHONPATH": os.pathsep.join(path)}  # where plugin_dist put the plugin
    proc = subprocess.run(cli(tiny_run, out, max_steps=6, keep_last=5, loss="nan-at"), capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    step2 = checkpoints.checkpoint_path(out, 2)
    expected = (f"mtp-train: error: step 3: non-finite loss nan; stopped before its update, the last checkpoint, {step2}, "
                "is untouched (--on-nonfinite skip skips such steps instead)")
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert checkpoints.complete_checkpoints(out) == [checkpoints.checkpoint_path(out, 1), step2]
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert not (out / "config.json").exists()  # no export of the run


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skip_leaves_the_update_out_counts_it_and_stops_past_the_limit(where, plugin_dist, tiny_run, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    plugin_dist("nan_loss", NAN_LOSS, NAN_ENTRY_POINTS, dist="nan-loss")
    monkeypatch.setenv("NAN_STEPS", "2,3")
    monkeypatch.setenv("NAN_IN", where)
    out = tmp_path / "out"
    Trainer(config(tiny_run, out, max_steps=5, keep_last=10, loss="nan-at", on_nonfinite="skip", max_nonfinite=2)).run()
    assert [r["nonfinite_skipped"] for r in train_records(out)] == [0, 1, 2, 2, 2]
    weights = [load_file(str(checkpoints.checkpoint_path(out, step) / "model.safetensors")) for step in (1, 2, 3, 4)]
    for name in weights[0]:  # steps 2 and 3 changed nothing; step 4 trained again
        assert torch.equal(weights[0][name], weights[1][name]) and torch.equal(weights[1][name], weights[2][name]), name
    assert any(not torch.equal(weights[2][name], weights[3][name]) for name in weights[0])
    moments = [checkpoints.load_state(checkpoints.checkpoint_path(out, step))["optimizer"]["state"] for step in (1, 3)]
    assert all(torch.equal(moments[0][i][key], moments[1][i][key]) for i in moments[0] for key in moments[0][i])
    assert checkpoints.load_state(checkpoints.checkpoint_path(out, 5))["nonfinite_skipped"] == 2
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "model.safetensors")).values())

    monkeypatch.setenv("NAN_STEPS", "2,3,4")
    with pytest.raises(NonFiniteLoss, match=r"^step 4: non-finite .*; 3 such steps in this run, more than --max-nonfinite 2 "
                                            r"skipped; stopped, the last checkpoint, .*step-0000003, is untouched$"):
        Trainer(config(tiny_run, tmp_path / "again", max_steps=5, loss="nan-at", on_nonfinite="skip", max_nonfinite=2)).run()


def test_resumed_metrics_drop_later_lines_and_a_torn_tail_in_one_atomic_rewrite(tmp_path):
    from train_cli.plugins import MetricsFile

    lines = [json.dumps({"kind": "train", "step": s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tr')
    MetricsFile().mtp_train_start(config={}, output_dir=str(tmp_path), start_step=3, total_steps=5)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    from mtp_plugins.lm_eval.stats import SampleStats, write_jsonl

    path = tmp_path / "report.md"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_writer(path) as f:
            f.write("new, half")
            raise RuntimeError("midway")
    assert path.read_text() == "old\n"
    write_atomic(path, b"new\n")
    assert path.read_text() == "new\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600

    samples = tmp_path / "mtp_samples.jsonl"
    good = SampleStats("gsm8k", 0, 3, 2, [2, 1], 1.5, "eos", 1, 0.1)
    write_jsonl(samples, [good])
    bad = SampleStats("gsm8k", 1, 3, 2, [2, 1], 1.5, object(), 1, 0.1)  # not serializable: fails after one record
    with pytest.raises(TypeError):
        write_jsonl(samples, [good, bad])
    assert [json.loads(line) for line in samples.read_text().splitlines()] == [asdict(good)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtp_samples.jsonl", "report.md"]  # no temporary left


@pytest.fixture(scope="module")
def three_checkpoints(tiny_run, tmp_path_factory):  # noqa: F811
    """A run stopped after 3 steps (a checkpoint each), and the same run done in 4 steps straight."""
    root = tmp_path_factory.mktemp("fallback")
    Trainer(config(tiny_run, root / "run", max_steps=3, keep_last=3)).run()
    Trainer(config(tiny_run, root / "straight", max_steps=4, keep_last=3)).run()
    return root


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # what a full disk, a copy cut short or a stray rm leaves in a checkpoint
    "weights-truncated": (lambda c: _cut(c / "model.safetensors"), r"model.safetensors has \d+ bytes, \d+ were written"),
    "tokenizer-missing": (lambda c: (c / "tokenizer.json").unlink(), r"tokenizer.json is missing"),
    "state-truncated": (lambda c: _cut(c / checkpoints.STATE_FILE), r"trainer_state.pt has \d+ bytes, \d+ were written"),
    "state-overwritten": (lambda c: (c / checkpoints.STATE_FILE).write_bytes(b"\0" * (c / checkpoints.STATE_FILE).stat().st_size),
                          r"trainer_state.pt is unreadable \(.*\)"),
    "config-truncated": (lambda c: _cut(c / "config.json"), r"config.json has \d+ bytes, \d+ were written"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(damage, three_checkpoints, tmp_path, monkeypatch,
                                                                         capsys):
    """``mtp-train --resume --output-dir DIR`` alone: the run's recorded settings, from step 2 when
    step 3 is damaged (one warning line naming it and why; it is moved aside, not resumed from or
    counted), to the very weights of the run done straight."""
    import shutil

    from safetensors.torch import load_file

    from train_cli.app import main

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints / "run", out)
    damaged = checkpoints.checkpoint_path(out, 3)
    act, reason = DAMAGES[damage]
    act(damaged)
    monkeypatch.setattr(sys, "argv", ["mtp-train", "--resume", "--output-dir", str(out), "--max-steps", "4"])
    main()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and re.fullmatch(
        rf"mtp-train: warning: --resume: {re.escape(str(damaged))} is damaged \({reason}\); resuming from step-0000002 "
        rf"instead \(it moves to {re.escape(str(damaged.with_name('damaged-step-0000003')))}\)", warnings[0]), warnings
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["step-0000002", "step-0000003", "step-0000004"]
    assert (checkpoints.checkpoint_dir(out) / "damaged-step-0000003").is_dir()
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(three_checkpoints / "straight" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_weights_that_an_update_made_non_finite_are_never_written(tiny_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A finite loss and gradient, then an update that overflows float32 (lr 1e39 passes as a
    finite number): no checkpoint and no export of those weights, one line, exit 2."""
    from train_cli.app import main

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mtp-train", *cli(tiny_run, out, max_steps=3, lr=1e39, warmup_steps=0)[1:]])
    with pytest.raises(SystemExit) as exited:
        main()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2
    assert re.fullmatch(r"mtp-train: error: step 1: the weights are not finite after its update \(NaN/inf in \S+ and \d+ "
                        r"more\); the checkpoint of step 1 is not written and there is no earlier checkpoint \(a smaller "
                        r"--lr keeps the updates finite\)", last), last
    assert checkpoints.complete_checkpoints(out) == [] and not (out / "config.json").exists()
    assert [r["step"] for r in train_records(out)] == [1]  # the step happened; its weights were not kept


def test_metrics_lines_stay_strict_json_when_a_value_is_nan(tmp_path):
    from train_cli.plugins import MetricsFile

    def strict(line: str) -> dict:
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON: {line}"))

    metrics = MetricsFile()
    metrics.mtp_train_start(config={}, output_dir=str(tmp_path), start_step=0, total_steps=2)
    metrics.mtp_step_end(step=1, metrics={"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    metrics.mtp_validation_end(step=1, metrics={"step": 1, "loss": float("-inf"), "agreement": [1.0, float("nan")]})
    lines = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"kind": "train", "step": 1, "loss": None, "grad_norm": None, "lr": 1e-3},
                     {"kind": "eval", "step": 1, "loss": None, "agreement": [1.0, None]}]
    MetricsFile().mtp_train_start(config={}, output_dir=str(tmp_path), start_step=1, total_steps=2)  # the resume rewrite
    assert [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines


@pytest.mark.parametrize("moment", ["importing", "loading-data"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(moment, tiny_run, tmp_path):  # noqa: F811
    """SIGINT half a second in (importing torch and transformers takes longer), or once it reads the
    data file (its own datasets cache appears): one line, exit status 130, no traceback, no output
    directory."""
    out, hf_home = tmp_path / "out", tmp_path / "hf"
    proc = launch(cli(tiny_run, out, max_steps=1000), tmp_path / "run.log", env={**ENV, "HF_HOME": str(hf_home)})
    if moment == "importing":
        time.sleep(0.5)
    else:
        wait_until(lambda: (hf_home / "datasets").exists(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == ("mtp-train: interrupted during start-up, before the first step; nothing was "
                                            "trained or saved"), log[-3000:]
    assert not out.exists()


def test_a_start_up_ctrl_c_that_a_library_swallows_still_stops_before_anything_is_written(tiny_run, tmp_path, monkeypatch,  # noqa: F811
                                                                                         capsys):
    """The loading-data Ctrl-C above once ran the whole training: the KeyboardInterrupt was raised
    inside ``datasets`` and swallowed there. mtp-train's start-up handler records every Ctrl-C, and
    ``run`` raises it again before the output directory exists."""
    import train_cli.trainer as trainer_module
    from train_cli.app import main

    real = trainer_module.load_rows

    def swallowing(config):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here and raises; a careless library catches it
        except KeyboardInterrupt:
            pass
        return real(config)

    out = tmp_path / "out"
    monkeypatch.setattr(trainer_module, "load_rows", swallowing)
    monkeypatch.setattr(trainer_module, "startup_sigints", [])
    monkeypatch.setattr(sys, "argv", cli(tiny_run, out, max_steps=3))
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            main()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mtp-train: interrupted during start-up, before the first step; nothing was trained or saved")
    assert not out.exists()


def test_a_start_up_ctrl_c_raised_inside_a_weakref_callback_prints_no_traceback():
    """Python cannot propagate an exception out of a weakref callback and prints it as "Exception
    ignored in ..." with a traceback; a recorded start-up Ctrl-C there stays silent (the trainer stops
    on the record), anything else still reaches the original hook."""
    import weakref

    from train_cli.app import quiet_startup_interrupts

    seen: list[type] = []
    recorded: list[int] = []
    hook = quiet_startup_interrupts(recorded, lambda unraisable: seen.append(type(unraisable.exc_value)))

    class Thing:
        pass

    def raise_in_callback(error: BaseException) -> None:
        previous, sys.unraisablehook = sys.unraisablehook, hook
        try:
            thing = Thing()
            ref = weakref.ref(thing, lambda ref: (_ for _ in ()).throw(error))
            del thing  # the callback runs here (the ref is alive), its exception goes to sys.unraisablehook
            assert ref() is None
        finally:
            sys.unraisablehook = previous

    raise_in_callback(KeyboardInterrupt())  # not recorded by the start-up handler: reported
    recorded.append(2)
    raise_in_callback(KeyboardInterrupt())  # recorded: silent
    raise_in_callback(ValueError("other"))  # anything else: reported
    assert seen == [KeyboardInterrupt, ValueError]
