"""`mtp-train` on 2 CPU processes (torchrun, gloo, FSDP2): per-rank k, sharded data, a single HF
export, exact-enough resume, and the same loss curve as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, batch
from test_train import tiny_run  # noqa: F401  (the module-scoped tiny model and data)

from mtp_plugins import generate

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MTP_TRAIN = str(Path(sys.executable).with_name("mtp-train"))

# float32 collectives (reduce-scatter of gradients, all-gather of weights) sum in another order
# than one process does; the curves agree to this tolerance.
TOLERANCE = 1e-4


def args(tiny_run, out, *extra):
    return [
        "--model", str(tiny_run / "model"), "--data", str(tiny_run / "data.jsonl"), "--prompt-field", "question",
        "--response-field", "answer", "--output-dir", str(out), "--seq-len", "40", "--regions", "4",
        "--k-max", "4", "--dtype", "fp32", "--lr", "1e-3", "--warmup-steps", "2", "--eval-rows", "8", *extra,
    ]


def train(tiny_run, out, *extra, processes=2):
    """``processes`` torchrun workers; 0 means a plain process (no torchrun, no process group)."""
    command = [TORCHRUN, "--nproc-per-node", str(processes), "--no-python", MTP_TRAIN] if processes else [MTP_TRAIN]
    proc = subprocess.run([*command, *args(tiny_run, out, *extra)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_lines(lines):
    return [line for line in lines if line["kind"] == "train"]


def test_two_processes_train_with_their_own_k_and_export_once(tiny_run, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    lines = train_lines(train(tiny_run, out, "--max-steps", "8", "--micro-batch-size", "2", "--save-every", "4", "--loss", "soft-kl"))
    assert len(lines) == 8 and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    differ = sum(line["k_per_rank"][0] != line["k_per_rank"][1] for line in lines)
    assert differ >= 4, [line["k_per_rank"] for line in lines]
    assert all(2 <= k <= 4 for line in lines for k in line["k_per_rank"])
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=12)
    assert torch.equal(generate(model, ids, mask, strategy="verify", k=4, max_new_tokens=12).sequences, ar.sequences)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_resume_on_two_processes(tiny_run, tmp_path):  # noqa: F811
    common = ("--micro-batch-size", "2", "--save-every", "2", "--loss", "hard-label")
    train(tiny_run, tmp_path / "straight", "--max-steps", "4", *common)
    train(tiny_run, tmp_path / "split", "--max-steps", "2", *common)
    train(tiny_run, tmp_path / "split", "--max-steps", "4", "--resume", *common)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=name)


def test_one_process_and_two_give_the_same_loss_curve(tiny_run, tmp_path):  # noqa: F811
    # Same global batch (4 rows x 2 micro-batches), fixed k, every region supervised.
    fixed = ("--k-min", "3", "--k-max", "3", "--max-steps", "5", "--save-every", "5", "--eval-every", "5", "--grad-accum", "2")
    one = train_lines(train(tiny_run, tmp_path / "one", "--micro-batch-size", "4", *fixed, processes=0))
    two = train_lines(train(tiny_run, tmp_path / "two", "--micro-batch-size", "2", *fixed))
    # torchrun with one worker is FSDP over one device (what a one-GPU check of the sharded path runs).
    fsdp_one = train_lines(train(tiny_run, tmp_path / "fsdp-one", "--micro-batch-size", "4", *fixed, processes=1))
    assert "k_per_rank" not in one[0] and len(two[0]["k_per_rank"]) == 2 and len(fsdp_one[0]["k_per_rank"]) == 1
    for other in (two, fsdp_one):
        assert [line["offset"] for line in one] == [line["offset"] for line in other]
        for a, b in zip(one, other):
            assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=TOLERANCE), (a["step"], a["loss"], b["loss"])
    assert one[-1]["loss"] != one[0]["loss"]  # the curve moves: the comparison is not of constants


def test_ranks_weigh_every_supervised_position_alike(tiny_run, tmp_path):  # noqa: F811
    """Long rows of short documents: the ranks hold different numbers of supervised positions. The
    loss and the update are the uniform mean over the global batch (each rank's loss scaled by its
    share of the positions), so 2 ranks of 2 rows equal 1 process of 4; a mean of the ranks' means
    would not."""
    from safetensors.torch import load_file

    fixed = ("--seq-len", "160", "--k-min", "3", "--k-max", "3", "--max-steps", "3", "--save-every", "3", "--eval-every", "3")
    one = train_lines(train(tiny_run, tmp_path / "one", "--micro-batch-size", "4", *fixed, processes=0))
    two = train_lines(train(tiny_run, tmp_path / "two", "--micro-batch-size", "2", *fixed))
    assert [line["supervised_positions"] for line in one] == [line["supervised_positions"] for line in two]
    assert any(len(set(line["supervised_positions_per_rank"])) > 1 for line in two), two  # the ranks' shares differ
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=TOLERANCE), (a["step"], a["loss"], b["loss"])
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=name)


def test_resume_refuses_another_launch(tiny_run, tmp_path):  # noqa: F811
    common = ("--micro-batch-size", "2", "--save-every", "2", "--max-steps", "2")
    train(tiny_run, tmp_path / "run", *common, processes=0)
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--no-python", MTP_TRAIN, *args(tiny_run, tmp_path / "run"),
                           *common[:-1], "4", "--resume"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "written by a single plain process" in proc.stderr and "torchrun with 2 process(es)" in proc.stderr, proc.stderr[-2000:]


def test_gated_lora_on_two_processes_follows_one_and_exports_one_adapter(tiny_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from mtp_plugins import load_checkpoint
    from mtp_plugins.adapters import ADAPTER_WEIGHTS

    fixed = ("--trainable", "gated-lora", "--lora-rank", "4", "--lr", "5e-2", "--k-min", "3", "--k-max", "3",
             "--max-steps", "4", "--save-every", "2", "--eval-every", "4", "--grad-accum", "2")
    one = train_lines(train(tiny_run, tmp_path / "one", "--micro-batch-size", "4", *fixed, processes=0))
    two = train_lines(train(tiny_run, tmp_path / "two", "--micro-batch-size", "2", *fixed))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=TOLERANCE), (a["step"], a["loss"], b["loss"])
    assert one[-1]["loss"] != one[0]["loss"]
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=name)
    assert not (tmp_path / "two" / "config.json").exists()  # one adapter export, no full model
    model, tokenizer, _ = load_checkpoint(tmp_path / "two")
    ids, mask = batch(tokenizer, PROMPTS)
    ar = generate(model, ids, mask, strategy="ar", max_new_tokens=12)
    assert torch.equal(generate(model, ids, mask, strategy="verify", k=3, max_new_tokens=12).sequences, ar.sequences)
