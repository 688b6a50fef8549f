"""Issue 17, evaluation side: bad input to ``--model mtp``, ``mtp-sweep`` and ``mtp-demo`` is one line,
before any model call; saved results are reused only for the same settings and model content; speed
ratios do not depend on load changes; decoder options reach a plugin decoder through lm-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DECODER = REPO / "examples" / "mtp-plugin-example" / "mtp_plugin_example" / "decoder.py"


def build(model_args: str):
    from lm_eval.api.registry import get_model

    return get_model("mtp").create_from_arg_string(model_args, {"device": "cpu", "batch_size": 2})


def refused(model_args: str) -> str:
    from mtp_plugins.lm_eval.model import MTPArgumentError

    with pytest.raises(MTPArgumentError) as error:
        build(model_args)
    (line,) = str(error.value).splitlines()
    return line


def run_main(main, argv: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """A console entry point run in this process; (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------ model_args


def test_an_unknown_model_arg_gets_did_you_mean_and_the_names_allowed(tiny_checkpoints):
    line = refused(f"pretrained={tiny_checkpoints['mtp']},tua=0.5")
    assert line.startswith("model_args tua=0.5 is not an argument of --model mtp; did you mean 'tau'? allowed: mtp's ")
    assert "strategy, stats_path" in line and "strategy confadapt's options: none" in line and "batch_size" in line
    line = refused(f"pretrained={tiny_checkpoints['mtp']},speculate=yes")
    assert line.startswith("model_args speculate='yes' is not an argument of --model mtp; allowed: ")


def test_stats_path_that_cannot_be_written_fails_at_construction(tiny_checkpoints, tmp_path):
    existing_file = tmp_path / "notes.txt"
    existing_file.write_text("keep me")
    ckpt = tiny_checkpoints["mtp"]
    assert refused(f"pretrained={ckpt},stats_path={tmp_path}") == (
        f"model_args stats_path='{tmp_path}' is not allowed: it is a directory; give a file path (e.g. DIR/mtp_samples.jsonl)")
    assert refused(f"pretrained={ckpt},stats_path={existing_file}/s.jsonl") == (
        f"model_args stats_path='{existing_file}/s.jsonl' is not allowed: {existing_file} is a file, not a directory")
    assert refused(f"pretrained={ckpt},stats_path=/proc/mtp.jsonl").startswith(
        "model_args stats_path='/proc/mtp.jsonl' is not allowed: cannot create a file in /proc")
    assert existing_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_mistyped_local_path_says_no_such_directory_not_the_hub(tiny_checkpoints, tmp_path, monkeypatch):
    (tmp_path / "mtp-demo" / "distilled").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert refused("pretrained=mtp-demo/distiled,strategy=ar") == (
        "model_args pretrained: cannot load mtp-demo/distiled: no such directory (a local path, not a hub id); "
        "did you mean 'mtp-demo/distilled'?")
    assert refused("pretrained=runs/a/b,strategy=ar").endswith("no such directory (a local path, not a hub id)")
    hub = refused("pretrained=some-org/some-model,strategy=ar")  # one '/', no such local directory: a hub id
    assert hub.startswith("model_args pretrained: cannot load some-org/some-model: ") and "no such directory" not in hub


@pytest.fixture
def example_decoder(plugin_dist):
    """The example package's decoder, registered through entry-point metadata as pip would."""
    plugin_dist("mtp_plugin_example_decoder", EXAMPLE_DECODER.read_text(),
                "[mtp_plugins.decoders]\nentropy-confadapt = mtp_plugin_example_decoder:EntropyGatedConfAdapt\n",
                dist="mtp-plugin-example")


def test_decoder_options_reach_a_plugin_decoder_through_lm_eval(example_decoder, tiny_checkpoints):
    import lm_eval

    from mtp_plugins.lm_eval.sweep import task_manager

    manager = task_manager()
    common = f"pretrained={tiny_checkpoints['mtp']},strategy=entropy-confadapt,k=4,tau=0.01"
    eff_k = {}
    for gate in (0.0, 1e9):  # gate 0: every row is "uncertain", one token per pass; 1e9: never
        lm = build(f"{common},gate={gate}")
        assert lm.decoder_options == {"gate": gate}
        results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], limit=2, gen_kwargs={"max_gen_toks": 8},
                                          task_manager=manager)
        mtp = results["config"]["mtp"]
        assert mtp["decoder_options"] == {"gate": gate} and mtp["tokens"] > 2
        eff_k[gate] = mtp["eff_k"]
    assert eff_k[0.0] == 1.0 and eff_k[1e9] > 1.5


def test_bad_decoder_options_fail_before_loading(example_decoder, tiny_checkpoints):
    # /nonexistent: a refusal that names the option proves that nothing was loaded first.
    assert refused("pretrained=/nonexistent,strategy=entropy-confadapt,gate=-1") == (
        "model_args gate=-1 is not allowed: gate must be a number of nats >= 0, got -1")
    assert refused("pretrained=/nonexistent,strategy=entropy-confadapt,decay=1.5") == (
        "model_args decay=1.5 is not allowed: decay must be a number in [0, 1), got 1.5")
    line = refused(f"pretrained={tiny_checkpoints['mtp']},strategy=entropy-confadapt,gatee=0.5")
    assert "model_args gatee=0.5 is not an argument of --model mtp; did you mean 'gate'?" in line
    assert "strategy entropy-confadapt's options: decay, gate" in line
    # Another strategy does not declare it: refused, not silently dropped.
    assert "strategy confadapt's options: none" in refused(f"pretrained={tiny_checkpoints['mtp']},gate=0.5")


def test_the_summary_shows_tau_only_where_used_and_the_whole_samples_path(capsys):
    from mtp_plugins.lm_eval.stats import aggregate, summary_table

    path = Path("/very/long/output/" + "nested-directory-name/" * 12 + "mtp_samples_2026-01-01T00-00-00.jsonl")
    summary = aggregate([], strategy="verify", k=4, tau=0.9, seconds=1.0, calls=0)
    summary_table(summary, path, uses_tau=False)
    err = capsys.readouterr().err
    assert "verify (k=4)" in err and "tau" not in err
    assert f"MTP per-sample statistics: {path}\n" in err
    summary_table(aggregate([], strategy="confadapt", k=4, tau=0.9, seconds=1.0, calls=0), None, uses_tau=True)
    assert "confadapt (k=4, tau=0.9)" in capsys.readouterr().err


def test_the_stock_lm_eval_excepthook_prints_our_errors_in_one_line(monkeypatch, capsys):
    from mtp_plugins.checkpoint import CheckpointError
    from mtp_plugins.lm_eval import _startup
    from mtp_plugins.lm_eval.model import MTPArgumentError

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args[1]))
    monkeypatch.delenv("MTP_PLUGINS_DEBUG", raising=False)
    _startup.install_excepthook("lm_eval")
    _startup.install_excepthook("lm_eval")  # idempotent
    for error in (MTPArgumentError("model_args k=0 is not allowed"), CheckpointError("cannot load x: no such directory")):
        sys.excepthook(type(error), error, None)
    other = RuntimeError("a bug")
    sys.excepthook(RuntimeError, other, None)
    assert capsys.readouterr().err.splitlines() == [
        "lm_eval: error: model_args k=0 is not allowed", "lm_eval: error: cannot load x: no such directory"]
    assert seen == [other]  # anything else keeps its traceback
    assert _startup.is_lm_eval_cli(["/venv/bin/lm_eval"]) and _startup.is_lm_eval_cli(["/x/lm_eval/__main__.py"])
    assert not _startup.is_lm_eval_cli(["my_script.py"])


# ------------------------------------------------------------------ mtp-sweep


def sweep_main(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    from mtp_plugins.lm_eval.sweep import main

    return run_main(main, ["mtp-sweep", *args], monkeypatch, capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-gen-toks", "0"], "--max-gen-toks 0: must be >= 1 (or left out)"),
        (["--k", "0"], "--k 0: must be >= 1 (or left out)"),
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--timing-repeats", "-1"], "--timing-repeats -1: must be >= 0"),
        (["--verify-lookup", "-2"], "--verify-lookup '-2': every n-gram length must be >= 0 (0: drafts from the mask "
                                    "slots alone)"),
        (["--verify-lookup", "three"], "--verify-lookup 'three': expected comma-separated ints"),
        (["--device", "gpu"], "--device 'gpu': not a device; use cpu, cuda or cuda:N"),
        (["--task", "synthetic_gms"], "--task 'synthetic_gms': not an lm-eval task; did you mean 'synthetic_gsm'? ours: "
                                      "synthetic_gsm, synthetic_gsm_easy, gsm8k_cot_mtp, gsm8k_cot_mtp_zeroshot; `lm-eval ls tasks` lists all"),
    ],
    ids=["max-gen-toks-zero", "k-zero", "batch-size-zero", "timing-repeats-negative", "verify-lookup-negative",
         "verify-lookup-not-int", "device-unknown", "task-unknown"],
)
def test_bad_sweep_arguments_fail_before_any_point(args, message, tiny_checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    status, lines = sweep_main([str(tiny_checkpoints["mtp"]), "--out", str(out), *args], monkeypatch, capsys)
    assert (status, lines) == (2, [f"mtp-sweep: error: {message}"])
    assert not out.exists()


def test_sweep_out_that_is_a_file_fails_before_any_point(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.md"
    out.write_text("an old report")
    status, lines = sweep_main([str(tiny_checkpoints["mtp"]), "--out", str(out)], monkeypatch, capsys)
    assert (status, lines) == (2, [f"mtp-sweep: error: --out {out}: it is a file, not a directory"])
    assert out.read_text() == "an old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_a_moved_original_model_is_named_before_any_point(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    run = copy_checkpoint(tiny_checkpoints["mtp"], tmp_path / "run")
    (run / "train_config.yaml").write_text(f"model: {tmp_path / 'moved-away'}\n")
    out = tmp_path / "sweep"
    status, lines = sweep_main([str(run), "--out", str(out)], monkeypatch, capsys)
    assert (status, lines) == (2, [
        f"mtp-sweep: error: --original '{tmp_path / 'moved-away'}' (recorded in {run / 'train_config.yaml'} as the model "
        f"the run started from): cannot load {tmp_path / 'moved-away'}: no such directory (a local path, not a hub id); "
        "pass --original PATH for the hf row, or --skip-hf"])
    assert not out.exists()


def test_saved_points_are_not_reused_after_the_weights_changed(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from mtp_plugins.lm_eval import sweep_args
    from mtp_plugins.lm_eval.sweep import main

    manager = sweep_args.task_manager()
    monkeypatch.setattr(sweep_args, "task_manager", lambda: manager)  # indexed once for the three runs
    ckpt = copy_checkpoint(tiny_checkpoints["mtp"], tmp_path / "ckpt")
    out = tmp_path / "sweep"
    args = ["mtp-sweep", str(ckpt), "--task", "synthetic_gsm", "--limit", "1", "--taus", "0.9", "--static", "none",
            "--verify-lookup", "none", "--skip-hf", "--dtype", "float32", "--max-gen-toks", "4", "--timing-repeats", "0", "--out", str(out)]

    def run() -> str:
        monkeypatch.setattr(sys, "argv", args)
        main()
        return capsys.readouterr().err

    first = run()
    assert first.count(": evaluating synthetic_gsm ...") == 2
    saved = json.loads((out / "points" / "ar.json").read_text())
    assert saved["settings"]["max_gen_toks"] == 4 and saved["weights"]["model"]
    assert run().count("done before, reused") == 2
    weights = load_file(ckpt / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.5
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    third = run()
    assert third.count(f"(the saved point is not reused: the files of the checkpoint {ckpt} changed since it was saved)") == 2
    assert json.loads((out / "points" / "ar.json").read_text())["weights"]["model"] != saved["weights"]["model"]


# ------------------------------------------------------------------ the timing phase


class FakeLM:
    """What the timing phase uses of an lm-eval model: each generation costs ``cost`` fake seconds
    times the machine's current load, and emits 4 one-character tokens per row."""

    max_gen_toks, max_length, truncation, eot_token_id = 4, 100, False, 0

    def __init__(self, name: str, cost: float, clock: dict, log: list, slow_after: int = 6) -> None:
        self.name, self.cost, self.clock, self.log, self.slow_after = name, cost, clock, log, slow_after
        self.lengths: list[int] = []  # new tokens asked for, per call
        import torch

        self.device = torch.device("cpu")

    def tok_encode(self, text):
        return [1] * len(text)

    def tok_decode(self, tokens, skip_special_tokens=True):
        if isinstance(tokens, int):  # the end-of-text token, which lm-eval adds to the stop strings
            return "<eos>"
        return "".join("x" for t in tokens if t)

    def tok_batch_encode(self, strings, left_truncate_len=None, truncation=False):
        import torch

        ids = torch.ones(len(strings), 3, dtype=torch.long)
        return ids, torch.ones_like(ids)

    def _model_generate(self, context, attention_mask, stop, max_length, **kwargs):
        import torch

        self.log.append(self.name)
        self.lengths.append(max_length - context.shape[1])
        calls = len(self.log)
        load = 1.0 if calls <= self.slow_after else 3.0  # the machine gets three times slower midway
        self.clock["now"] += self.cost * load
        return torch.cat([context, torch.ones(context.shape[0], max_length - context.shape[1], dtype=torch.long)], dim=1)


def test_timed_speed_ups_are_interleaved_and_survive_a_load_change(monkeypatch):
    from mtp_plugins.lm_eval import timing

    clock, log = {"now": 0.0}, []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(timing, "WARMUP_TOKENS", 3)
    lms = {"hf": FakeLM("hf", 2.0, clock, log), "fast": FakeLM("fast", 1.0, clock, log)}
    prompts = timing.TimingPrompts(["q1", "q2"], {"until": ["\n"], "max_gen_toks": 4})
    runs = timing.time_points(lms, prompts, [2], repeats=5, count=len, say=lambda line: None)
    # warm-up of each, then rounds with the order rotated: hf fast, fast hf, hf fast, ...
    assert log == ["hf", "fast", "hf", "fast", "fast", "hf", "hf", "fast", "fast", "hf", "hf", "fast"]
    # the warm-up batch asks for WARMUP_TOKENS new tokens, the timed ones for the task's max_gen_toks
    assert lms["hf"].lengths == lms["fast"].lengths == [3] + [4] * 5
    per_point = runs["2"]
    assert [len(per_point[n]["seconds"]) for n in ("hf", "fast")] == [5, 5] and per_point["fast"]["tokens"] == [8] * 5
    summary = timing.summarize(per_point, "hf")
    # Timed one after another, "fast" would show 2/3 = 0.67x or 6x depending on the order; round by
    # round it is 2x in every round, whatever the load.
    assert summary["fast"]["speedup"] == timing.Spread(2.0, 2.0, 2.0)
    assert summary["hf"]["speedup"] == timing.Spread(1.0, 1.0, 1.0)
    speed = summary["fast"]["tokens_per_second"]
    assert speed.low == pytest.approx(8 / 3.0) and speed.high == pytest.approx(8 / 1.0)
    # N prompts at batch 1; at a larger batch, enough of the same first prompts to fill it.
    five = timing.TimingPrompts(["a", "b", "c", "d", "e"], {}, count=2)
    assert five.at(1) == ["a", "b"] and five.at(4) == ["a", "b", "c", "d"] and five.at(16) == list("abcde")


def test_timing_interleaves_the_points_batch_by_batch_so_a_load_change_inside_a_round_cancels(monkeypatch):
    from mtp_plugins.lm_eval import timing

    clock, log = {"now": 0.0}, []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    # Two batches at batch 1; the machine slows down 3x after the 4th call, in the middle of round 1.
    lms = {name: FakeLM(name, cost, clock, log, slow_after=4) for name, cost in (("hf", 2.0), ("fast", 1.0))}
    prompts = timing.TimingPrompts(["q1", "q2"], {"until": ["\n"], "max_gen_toks": 4})
    runs = timing.time_points(lms, prompts, [1], repeats=2, count=len, say=lambda line: None)
    # warm-up, then per round each batch by every point in turn, the order rotated per batch and round
    assert log == ["hf", "fast", "hf", "fast", "fast", "hf", "fast", "hf", "hf", "fast"]
    per_point = runs["1"]
    assert per_point["hf"]["seconds"] == [2.0 + 6.0, 6.0 + 6.0] and per_point["fast"]["seconds"] == [1.0 + 3.0, 3.0 + 3.0]
    assert per_point["fast"]["tokens"] == [8, 8]
    # Point after point within the round (hf both batches at load 1, then fast both at load 3), round
    # 1 would read 0.67x; batch by batch it reads 2x.
    assert timing.summarize(per_point, "hf")["fast"]["speedup"] == timing.Spread(2.0, 2.0, 2.0)


# ------------------------------------------------------------------ mtp-demo


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-gen-toks", "0"], "--max-gen-toks 0: must be >= 1 (or left out)"),
        (["--limit", "0"], "--limit 0: must be >= 1 (or left out)"),
        (["--taus", "0.9,2"], "--taus '0.9,2': every tau must be in (0, 1]"),
        (["--max-steps", "0"], "--max-steps 0: must be >= 1 (or left out for the recipe's)"),
        (["--timing-prompts", "0"], "--timing-prompts 0: must be >= 1"),
        (["--verify-lookup", "1,-3"], "--verify-lookup '1,-3': every n-gram length must be >= 0 (0: drafts from the "
                                      "mask slots alone)"),
    ],
    ids=["max-gen-toks-zero", "limit-zero", "tau-above-1", "max-steps-zero", "timing-prompts-zero", "verify-lookup-negative"],
)
def test_bad_demo_arguments_fail_before_the_first_stage(args, message, tmp_path, monkeypatch, capsys):
    from train_cli.demo import main

    out = tmp_path / "demo"
    status, lines = run_main(main, ["mtp-demo", "--model", str(tmp_path / "nowhere"), "--out", str(out), *args],
                             monkeypatch, capsys)
    assert (status, lines) == (2, [f"mtp-demo: error: {message}"])
    assert not out.exists()
