"""The MTP checkpoint format.

An MTP checkpoint is an ordinary Hugging Face causal LM (same architecture, safetensors, no remote
code) with one or more extra *mask tokens* in its vocabulary and an ``mtp`` block in ``config.json``:

    "mtp": {"format_version": 1, "mask_token_ids": [49152], "k_max": 16}

``mask_token_ids`` holds one id (every mask slot uses it) or one id per slot (slot j uses id j).
``k_max`` is the largest horizon the checkpoint was trained for (``null`` before training). Whatever
the trainer used is what inference uses: nobody passes a mask id by hand.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CONFIG_KEY = "mtp"
MASK_TOKEN = "<|mtp_mask|>"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

log = logging.getLogger("mtp_plugins")


class CheckpointError(ValueError):
    """A model that cannot be loaded (safely); the message names it, says why and what to do."""


def mask_token_names(num_tokens: int) -> list[str]:
    """The token strings added for ``num_tokens`` mask tokens (one shared, or one per slot)."""
    if num_tokens == 1:
        return [MASK_TOKEN]
    return [f"<|mtp_mask_{i}|>" for i in range(1, num_tokens + 1)]


@dataclass(frozen=True)
class MTPSpec:
    """The MTP facts a checkpoint records in ``config.mtp``."""

    mask_token_ids: tuple[int, ...]
    k_max: int | None = None
    format_version: int = FORMAT_VERSION

    @property
    def shared_mask(self) -> bool:
        return len(self.mask_token_ids) == 1

    @property
    def max_decodable_k(self) -> int | None:
        """The largest k inference can feed (None: any, since every slot uses the shared mask)."""
        return None if self.shared_mask else len(self.mask_token_ids) + 1

    def mask_ids(self, num_slots: int) -> list[int]:
        """Mask token ids for ``num_slots`` mask slots (k - 1 of them for horizon k)."""
        if self.shared_mask:
            return [self.mask_token_ids[0]] * num_slots
        if num_slots > len(self.mask_token_ids):
            raise ValueError(
                f"this checkpoint has {len(self.mask_token_ids)} per-slot mask tokens, so it decodes "
                f"k <= {len(self.mask_token_ids) + 1}; got k={num_slots + 1}"
            )
        return list(self.mask_token_ids[:num_slots])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "mask_token_ids": list(self.mask_token_ids),
            "k_max": self.k_max,
        }

    @classmethod
    def from_dict(cls, block: Any) -> MTPSpec:
        if not isinstance(block, dict):
            raise CheckpointError(f"config.{CONFIG_KEY} must be a mapping, got {type(block).__name__}")
        version = block.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"config.{CONFIG_KEY}.format_version is {version!r}; this version of mtp-plugins "
                f"reads format {FORMAT_VERSION}"
            )
        ids = block.get("mask_token_ids")
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise CheckpointError(
                f"config.{CONFIG_KEY}.mask_token_ids must be a non-empty list of token ids, got {ids!r}"
            )
        k_max = block.get("k_max")
        if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
            raise CheckpointError(f"config.{CONFIG_KEY}.k_max must be a positive int or null, got {k_max!r}")
        return cls(mask_token_ids=tuple(ids), k_max=k_max, format_version=version)


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def read_mtp_spec(model_or_config: Any) -> MTPSpec | None:
    """The checkpoint's MTP facts, or None for a model without mask tokens (CheckpointError for a
    malformed ``mtp`` block or mask ids outside the vocabulary, naming the checkpoint's path)."""
    config = _config_of(model_or_config)
    block = getattr(config, CONFIG_KEY, None)
    if block is None:
        return None
    where = f"{config._name_or_path}: " if getattr(config, "_name_or_path", "") else ""
    try:
        spec = MTPSpec.from_dict(block)
    except CheckpointError as error:
        raise CheckpointError(f"{where}{error}") from None
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(model_or_config, "get_input_embeddings"):
        vocab = model_or_config.get_input_embeddings().weight.shape[0]
    if vocab is not None and max(spec.mask_token_ids) >= vocab:
        raise CheckpointError(
            f"{where}config.{CONFIG_KEY}.mask_token_ids {list(spec.mask_token_ids)} lie outside the "
            f"vocabulary: token ids must be < {vocab} (its vocab_size)"
        )
    return spec


def checkpoint_spec(name_or_path: str | PathLike[str], **kwargs: Any) -> MTPSpec | None:
    """The MTP spec a checkpoint records, read without its weights: from ``config.json``, or from
    ``mtp_adapter.json`` for a gated adapter. ``kwargs`` go to ``AutoConfig.from_pretrained``."""
    from mtp_plugins import adapter_checkpoint, adapters

    if adapter_checkpoint.is_adapter_dir(name_or_path):
        try:
            return MTPSpec.from_dict(adapter_checkpoint.read_adapter_record(Path(name_or_path))["mtp"])
        except adapters.AdapterError as error:
            raise CheckpointError(str(error)) from None
    from transformers import AutoConfig

    with loading(name_or_path):
        return read_mtp_spec(AutoConfig.from_pretrained(name_or_path, **kwargs))


def write_mtp_spec(model_or_config: Any, spec: MTPSpec) -> None:
    """Record ``spec`` in the config, where ``save_pretrained`` writes it to ``config.json``."""
    setattr(_config_of(model_or_config), CONFIG_KEY, spec.to_dict())


def add_mask_tokens(model: Any, tokenizer: Any, num_tokens: int = 1, *, k_max: int | None = None) -> MTPSpec:
    """Make ``model`` an MTP checkpoint: add mask token(s) to ``tokenizer`` and the model.

    The new embedding rows (and output rows, when the output matrix is not tied) start as the plain
    mean of the existing rows. ``num_tokens=1`` adds one shared mask token; ``num_tokens=n`` adds one
    per mask slot, which allows horizons up to ``k = n + 1``. Calling it again with the same
    ``num_tokens`` adds nothing; a ``k_max`` given then replaces the recorded one (the trainer
    passes the k_max of the run, so a checkpoint records the horizon it was last trained for, even
    when an earlier run used a larger one), and None keeps it.
    """
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
        raise ValueError(f"k_max must be a positive int or None, got {k_max!r}")
    if k_max is not None and num_tokens > 1 and k_max > num_tokens + 1:
        raise ValueError(f"k_max={k_max} needs at least {k_max - 1} per-slot mask tokens, got {num_tokens}")
    existing = read_mtp_spec(model)
    if existing is not None:
        if len(existing.mask_token_ids) != num_tokens:
            raise ValueError(
                f"model already has {len(existing.mask_token_ids)} mask token(s); cannot switch to {num_tokens}"
            )
        if k_max is None or k_max == existing.k_max:
            return existing
        spec = MTPSpec(mask_token_ids=existing.mask_token_ids, k_max=k_max, format_version=existing.format_version)
        write_mtp_spec(model, spec)
        return spec

    from transformers import AddedToken

    names = mask_token_names(num_tokens)
    tokenizer_len_before = len(tokenizer)
    tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]

    embeddings = model.get_input_embeddings()
    rows_before = embeddings.weight.shape[0]
    # Rows past the tokenizer (padding rows some models carry) are not real tokens: leave them out of
    # the mean so that the mask starts at the centre of the real vocabulary.
    real_rows = min(rows_before, tokenizer_len_before, min(ids))
    if max(ids) >= rows_before:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    _set_rows_to_mean(model.get_input_embeddings(), ids, real_rows)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        _set_rows_to_mean(output, ids, real_rows)

    spec = MTPSpec(mask_token_ids=tuple(ids), k_max=k_max)
    write_mtp_spec(model, spec)
    return spec


@torch.no_grad()
def _set_rows_to_mean(module: torch.nn.Module, ids: list[int], real_rows: int) -> None:
    weight = module.weight
    mean = weight[:real_rows].float().mean(dim=0).to(weight.dtype)
    weight[ids] = mean
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias[ids] = bias[:real_rows].float().mean().to(bias.dtype)


def weights_source(
    name_or_path: str | PathLike[str], *, allow_pickle: bool = False, opt_in: str = "allow_pickle=True"
) -> dict[str, Any]:
    """``from_pretrained`` arguments that read the weights from safetensors only.

    A local directory must hold a weights file. Unpickling a ``pytorch_model.bin`` can run arbitrary
    code, so weights that exist only as pickle files are refused (CheckpointError; ``opt_in`` says
    how the caller's user allows them) unless ``allow_pickle``, which loads them with a warning.
    """
    path = Path(name_or_path)
    files = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if any(name.endswith((".safetensors", ".safetensors.index.json")) for name in files):
        return {"use_safetensors": True}
    pickles = sorted(files.intersection(PICKLE_WEIGHTS))
    if path.is_dir() and not pickles:
        raise CheckpointError(
            f"cannot load {name_or_path}: it has no weights file (model.safetensors, or the shards that "
            "model.safetensors.index.json lists)"
        )
    if not allow_pickle:
        if pickles:
            raise CheckpointError(
                f"cannot load {name_or_path}: its weights are only pickle files ({', '.join(pickles)}), and "
                "unpickling can run arbitrary code; convert them to safetensors (load the model with "
                "from_pretrained(..., use_safetensors=False) where you trust it, then save_pretrained), "
                f"or allow pickle weights with {opt_in}"
            )
        return {"use_safetensors": True}
    log.warning(  # pickle files here, or a hub model that may have only those
        "mtp-plugins: %s: pickle weights are allowed (%s); unpickling can run arbitrary code, so load "
        "only files you trust", name_or_path, opt_in,
    )
    return {"use_safetensors": None}  # transformers' default: safetensors where present, else pickle


@contextmanager
def loading(name_or_path: str | PathLike[str]) -> Iterator[None]:
    """Turn the errors of loading a model or tokenizer into one CheckpointError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise CheckpointError(
            f"cannot load {name_or_path}: a safetensors weights file is corrupt or incomplete ({error})"
        ) from None
    except (OSError, pickle.UnpicklingError) as error:
        # A hub id is ``name`` or ``org/name``; anything else that reads as a path and is not there
        # is a mistyped local directory, whatever the hub (or the network) says about it.
        name = str(name_or_path)
        path = Path(name).expanduser()
        parts = name.replace("\\", "/").split("/")
        local = (
            name.startswith((".", "~", "/")) or path.is_absolute() or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())
        )
        if local and not path.exists():
            parent = path.parent
            siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
            close = difflib.get_close_matches(path.name, siblings, n=1)
            hint = f"; did you mean {str(parent / close[0])!r}?" if close else ""
            raise CheckpointError(f"cannot load {name_or_path}: no such directory (a local path, not a hub id){hint}") from None
        text = str(error).strip()
        raise CheckpointError(f"cannot load {name_or_path}: {text.splitlines()[0] if text else type(error).__name__}") from None


def load_checkpoint(
    name_or_path: str | PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    base: str | None = None,
) -> tuple[Any, Any, MTPSpec | None]:
    """Load a model (hub id or local directory), its tokenizer and its MTP spec (None if absent).

    A gated adapter checkpoint (``mtp_adapter.json``, from ``mtp-train --trainable gated-lora``)
    loads as its base model with the gated adapter attached; ``base`` overrides the recorded base
    (its weights must hash as recorded).

    Weights are read from safetensors only unless ``allow_pickle`` (see ``weights_source``); remote
    code runs only when asked for. Any failure is a CheckpointError naming the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_plugins import adapter_checkpoint, adapters

    if adapter_checkpoint.is_adapter_dir(name_or_path):
        try:
            return adapter_checkpoint.load_adapter(name_or_path, base=base, dtype=dtype, device=device, revision=revision,
                                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        except adapters.AdapterError as error:
            raise CheckpointError(str(error)) from None
    if base is not None:
        raise CheckpointError(f"base={base!r} is only for gated adapter checkpoints; {name_or_path} is a full model")
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    source = weights_source(name_or_path, allow_pickle=allow_pickle)
    with loading(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype if dtype is not None else "auto", **source, **kwargs
        )
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, read_mtp_spec(model)
