"""Untrusted files (docs/reliability.md): weights from safetensors only unless pickle is allowed
explicitly, torch state read with ``weights_only=True``, no remote code by default, and nothing
written outside the output directory and the Hugging Face cache."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, REPO, build_model, build_tokenizer

from mtp_plugins import add_mask_tokens, load_checkpoint
from mtp_plugins.checkpoint import CheckpointError

SOURCES = sorted([*(REPO / "mtp_plugins").rglob("*.py"), *(REPO / "train_cli").rglob("*.py")])


@pytest.fixture(scope="module")
def pickle_checkpoint(tmp_path_factory) -> Path:
    """A tiny MTP checkpoint whose weights exist only as ``pytorch_model.bin``."""
    path = tmp_path_factory.mktemp("pickle") / "model"
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer))
    add_mask_tokens(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_pickle_weights_are_refused_unless_allowed_with_a_warning(pickle_checkpoint, caplog):
    with pytest.raises(CheckpointError, match=r"its weights are only pickle files \(pytorch_model.bin\), and unpickling can "
                       r"run arbitrary code; convert them to safetensors .* or allow pickle weights with allow_pickle=True"):
        load_checkpoint(pickle_checkpoint)
    with caplog.at_level(logging.WARNING, logger="mtp_plugins"):
        model, _, spec = load_checkpoint(pickle_checkpoint, allow_pickle=True)
    assert "pickle weights are allowed (allow_pickle=True); unpickling can run arbitrary code" in caplog.text
    state = torch.load(pickle_checkpoint / "pytorch_model.bin", weights_only=True)
    assert spec is not None and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_lm_eval_and_mtp_train_load_pickle_weights_only_when_asked(pickle_checkpoint, tmp_path, caplog):
    from lm_eval.api.registry import get_model

    from mtp_plugins.lm_eval.model import MTPArgumentError
    from train_cli.config import build_config
    from train_cli.trainer import Trainer

    with pytest.raises(MTPArgumentError, match="allow pickle weights with model_args allow_pickle=true"):
        get_model("mtp").create_from_arg_string(f"pretrained={pickle_checkpoint}", {"device": "cpu"})
    with caplog.at_level(logging.WARNING, logger="mtp_plugins"):
        lm = get_model("mtp").create_from_arg_string(f"pretrained={pickle_checkpoint},allow_pickle=true", {"device": "cpu"})
    assert lm.k == 8 and "(model_args allow_pickle=true)" in caplog.text

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": line, "response": line}) + "\n" for line in CORPUS))
    common = dict(model=str(pickle_checkpoint), data=str(data), prompt_field="prompt", response_field="response",
                  max_steps=0, seq_len=40, regions=4, k_max=4, eval_rows=1)
    with pytest.raises(CheckpointError, match="or allow pickle weights with --allow-pickle"):
        Trainer(build_config(**common, output_dir=str(tmp_path / "refused"))).run()
    assert not (tmp_path / "refused").exists()
    out = Trainer(build_config(**common, output_dir=str(tmp_path / "out"), allow_pickle=True)).run()
    assert (out / "model.safetensors").exists() and not list(out.rglob("*.bin"))  # what we write is safetensors


def test_the_sweep_loads_pickle_weights_only_when_asked(pickle_checkpoint, tmp_path):
    from mtp_plugins.lm_eval.sweep import Sweep

    def sweep(allow_pickle: bool) -> Sweep:
        return Sweep(str(pickle_checkpoint), str(pickle_checkpoint), "synthetic_gsm", tmp_path, limit=1, batch_size=1,
                     dtype="float32", num_fewshot=None, max_gen_toks=None, device="cpu", allow_pickle=allow_pickle)

    with pytest.raises(CheckpointError, match="or allow pickle weights with --allow-pickle"):
        sweep(False)._load("mtp")
    assert sweep(True)._load("mtp") is not None


def _calls(path: Path) -> list[tuple[ast.Call, str]]:
    """Every call in a source file with the dotted name of what it calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            found.append((node, ast.unparse(node.func)))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_torch_state_is_read_with_weights_only():
    loads = []
    for path in SOURCES:
        source = path.read_text(encoding="utf-8")
        assert "from torch import load" not in source and "from torch.serialization import load" not in source, path
        for call, name in _calls(path):
            if name in ("torch.load", "torch.serialization.load"):
                loads.append(path.name)
                flag = _keyword(call, "weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}: {ast.unparse(call)}"
    assert loads  # the checkpoint's trainer state is one


def _off(default: ast.expr | None) -> bool:
    """False, or a Typer option whose default is False or None (None: the config's default)."""
    if isinstance(default, ast.Call) and ast.unparse(default.func) == "typer.Option" and default.args:
        default = default.args[0]
        return isinstance(default, ast.Constant) and default.value in (False, None)
    return isinstance(default, ast.Constant) and default.value is False


def test_remote_code_and_pickle_are_off_by_default():
    from mtp_plugins.lm_eval.model import MTPLM
    from train_cli.config import TrainConfig

    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    if arg.arg in ("trust_remote_code", "allow_pickle"):
                        assert _off(default), f"{path}:{node.lineno}"
            elif isinstance(node, ast.AnnAssign) and ast.unparse(node.target) in ("trust_remote_code", "allow_pickle"):
                assert _off(node.value), f"{path}:{node.lineno}"
            elif isinstance(node, ast.Call):
                for name in ("trust_remote_code", "allow_pickle"):
                    value = _keyword(node, name)
                    assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{node.lineno}"
    assert TrainConfig().trust_remote_code is False and TrainConfig().allow_pickle is False
    for function in (MTPLM.__init__, load_checkpoint):
        parameters = inspect.signature(function).parameters
        assert parameters["trust_remote_code"].default is False and parameters["allow_pickle"].default is False


def test_every_model_load_goes_through_the_safetensors_check():
    """Each ``AutoModelForCausalLM.from_pretrained`` passes the arguments of ``weights_source`` (or
    reads a GGUF file, which is not pickle)."""
    seen = 0
    for path in SOURCES:
        for call, name in _calls(path):
            if name.endswith("AutoModelForCausalLM.from_pretrained"):
                seen += 1
                spread = [k.value for k in call.keywords if k.arg is None]
                assert _keyword(call, "gguf_file") is not None or spread, f"{path}:{call.lineno}: {ast.unparse(call)}"
    assert seen >= 3


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_training_writes_only_the_output_directory_and_the_hf_cache(tmp_path):
    """``mtp-train`` with HOME, TMPDIR, the HF cache and the working directory all fresh: new files
    appear under ``--output-dir`` and ``HF_HOME`` (datasets' copy of the data file) only."""
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"q": line, "a": line}) + "\n" for line in CORPUS * 4))
    for name in ("home", "tmp", "cwd", "hf"):
        (tmp_path / name).mkdir()
    before = _files(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_", "TORCH"))}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mtp-train")), "--model", str(tmp_path / "model"),
         "--data", str(tmp_path / "data.jsonl"), "--prompt-field", "q", "--response-field", "a", "--seq-len", "40", "--regions", "4", "--k-max", "4",
         "--micro-batch-size", "2", "--eval-rows", "2", "--eval-every", "1", "--save-every", "1", "--dtype", "fp32",
         "--max-steps", "2", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path / "cwd", env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = _files(tmp_path) - before
    assert any(f.startswith("out/checkpoints/") for f in new) and "out/model.safetensors" in new
    assert sorted(f for f in new if not f.startswith(("out/", "hf/"))) == []
