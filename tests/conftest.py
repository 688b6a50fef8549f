"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random causal LMs, built in the test.

Everything is offline: the HF offline switches are set before transformers is imported, so a hidden
download fails loudly instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every HF cache of the run (and of its subprocesses, which inherit HF_HOME) lives in a fresh
# directory: the tests neither read nor write the user's caches. It is removed when the session's
# process exits (the pid check: a forked child exiting must not remove it under the session).
HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mtp-tests-hf-")
_SESSION_PID = os.getpid()


@atexit.register
def _remove_hf_home() -> None:
    if os.getpid() == _SESSION_PID:
        shutil.rmtree(HF_HOME, ignore_errors=True)


import pytest
import torch

from mtp_plugins import registry

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MTP_SHARED_DIR", REPO.parent / "shared"))

CORPUS = [
    "Q: Natalia sold clips to 48 of her friends in April. How many clips did she sell? A: 48 + 24 = 72.",
    "Q: Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes. A: 12 / 60 * 50 = 10.",
    "The answer is 72. The answer is 10. Let's think step by step.",
    "hello world, this is a small corpus for a tiny tokenizer used by the tests of the decode engine.",
]


def build_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def build_model(arch: str, vocab_size: int, seed: int = 0, *, tie: bool = False, **overrides):
    """A tiny random causal LM of family ``arch`` (llama, qwen2, gpt2) in float32, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 1, "tie_word_embeddings": tie}
    if arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        cls = GPT2LMHeadModel
    else:
        sizes = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        }
        config_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        config = config_cls(**sizes, **common)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = cls(config).eval()
    # Random init at std 0.02 gives nearly flat next-token distributions; a larger scale makes
    # greedy choices decisive, as in a trained model, so that float ties cannot decide a test.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def tokenizer_factory():
    return build_tokenizer


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def mtp_llama(tokenizer):
    """A tiny random Llama with one shared mask token (an untrained MTP checkpoint)."""
    from mtp_plugins import add_mask_tokens

    model = build_model("llama", len(tokenizer))
    add_mask_tokens(model, tokenizer)
    return model


def batch(tokenizer, texts: list[str]):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


PROMPTS = [
    "Q: Natalia sold clips",
    "hello world, this is",
    "Q: Weng earns $12 an hour for babysitting. Yesterday",
    "The answer",
]


@pytest.fixture(scope="session")
def gsm8k_cache():
    """Seed the (test-private) datasets cache with the real GSM8K from ../shared, for lm-eval's
    hub-named tasks (openai/gsm8k) to run offline. Returns the GSM8K data directory."""
    tool = SHARED / "tools" / "seed_gsm8k_cache.py"
    if not tool.exists():
        pytest.skip(f"needs ../shared beside the repository (GSM8K and its cache seeder); looked in {SHARED}")
    cache = Path(os.environ["HF_HOME"]) / "datasets"
    subprocess.run([sys.executable, str(tool), "--cache-dir", str(cache)], check=True, capture_output=True)
    return SHARED / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, gsm8k_cache):
    """Two tiny random Llama checkpoints on disk with a tokenizer fitted to GSM8K text:
    ``mtp`` (one mask token) and ``plain`` (none)."""
    import json

    from mtp_plugins import add_mask_tokens

    lines = (gsm8k_cache / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    texts = [json.loads(line)["question"] + " " + json.loads(line)["answer"] for line in lines]
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in ("mtp", "plain"):
        tokenizer = build_tokenizer(vocab_size=1200, corpus=texts)
        model = build_model("llama", len(tokenizer), seed=7, max_position_embeddings=1024)
        if name == "mtp":
            add_mask_tokens(model, tokenizer)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """Put a third-party plugin distribution on sys.path (a module and its dist-info), as pip would."""

    modules: list[str] = []

    def install(module: str, module_source: str, entry_points: str, dist: str = "third-party-decoders") -> None:
        modules.append(module)
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.refresh()

    yield install
    monkeypatch.undo()
    for module in modules:
        sys.modules.pop(module, None)
    registry.refresh()
