"""The gated adapter checkpoint: an adapter that loads wherever a full checkpoint does, and nowhere
it could be mistaken for something else.

``save_adapter`` writes the adapter weights and the trained mask-token embedding rows
(``mtp_adapter.safetensors``), the tokenizer, and ``mtp_adapter.json``: the base model (hub id or
path, and a content hash of its weights, checked on load), the gating rule, rank, alpha, targets and
the ``mtp`` block. It has no ``config.json`` and no ``adapter_config.json``, so neither transformers
nor PEFT can take it for a model or for an adapter to apply to every token: they refuse it. A full
export (``full=True``) also writes the base weights (with the mask rows) as an ordinary HF model
directory: any other tool then loads the exact base model, and ``load_adapter`` (through
``mtp_plugins.load_checkpoint``) the base with the gated adapter attached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtp_plugins.adapters import (
    _A,
    _B,
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    GATE_RULE,
    MASK_ROWS,
    AdapterError,
    AdapterSettings,
    GatedAdapters,
    adapters_of,
    attach_gated_lora,
    export_mask_rows,
)


def is_adapter_dir(path: Any) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's part of a model state dict: the A/B matrices and the trained mask rows."""
    picked = {}
    for name, tensor in state_dict.items():
        last = name.rsplit(".", 1)[-1]
        if last in (_A, _B):
            picked[name] = tensor
        elif last == MASK_ROWS:
            picked[MASK_ROWS] = tensor
    return picked


def base_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's part of a state dict (what an ordinary HF loader expects)."""
    return {n: t for n, t in state_dict.items() if n.rsplit(".", 1)[-1] not in (_A, _B, MASK_ROWS)}


def weights_files(name_or_path: str, revision: str | None = None) -> list[Path]:
    """The safetensors files of a model: a local directory's, or a hub model's (from the HF cache;
    downloaded if missing, like ``from_pretrained``)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / n for n in names]
    return sorted(p for p in path.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_hash(name_or_path: str, revision: str | None = None) -> str:
    """sha256 over the model's weights: each tensor's name, dtype, shape and bytes, in name order
    (so it does not depend on how the files are sharded). Cached per file state in the process."""
    from safetensors import safe_open

    files = weights_files(name_or_path, revision)
    if not files:
        raise AdapterError(f"cannot hash the weights of {name_or_path}: it has no safetensors weights files")
    key = (";".join(str(f.resolve()) for f in files), sum(f.stat().st_size for f in files),
           max(f.stat().st_mtime_ns for f in files))
    if key in _HASHES:
        return _HASHES[key]
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = sorted((name, h) for h in handles for name in h.keys())
    digest = hashlib.sha256()
    for name, handle in where:
        tensor = handle.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def adapter_record(adapters: GatedAdapters, spec: Any, base: str, base_hash: str | None, full: bool) -> dict[str, Any]:
    """The contents of ``mtp_adapter.json``."""
    s = adapters.settings
    return {
        "format": "mtp-plugins gated adapter",
        "format_version": ADAPTER_FORMAT,
        "kind": "gated-lora",
        "gate": GATE_RULE,
        "base": {"name_or_path": str(base), "weights_sha256": base_hash},
        "full": full,  # the base weights (with the mask rows) are in this directory too
        "rank": s.rank,
        "alpha": s.alpha,
        "targets": list(s.targets),
        "mtp": spec.to_dict(),
    }


def save_adapter(
    directory: Path, model: Any, tokenizer: Any, *, base: str, base_hash: str | None,
    state_dict: dict[str, torch.Tensor] | None = None, full: bool = False,
) -> None:
    """Write the adapter checkpoint into ``directory`` (callers stage it and move it into place).
    ``state_dict``: the gathered weights of a sharded model (None: the model's own)."""
    from safetensors.torch import save_file

    from mtp_plugins.checkpoint import read_mtp_spec

    adapters, spec = adapters_of(model), read_mtp_spec(model)
    if adapters is None or spec is None:
        raise AdapterError("save_adapter needs a model with gated adapters and an mtp block")
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = adapter_tensors(state)
    if MASK_ROWS not in tensors:  # no trainable copy: the rows of the embedding matrix
        weight = state[next(n for n in state if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))]
        tensors[MASK_ROWS] = weight[list(spec.mask_token_ids)]
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "mtp_gate": GATE_RULE})
    tokenizer.save_pretrained(directory)
    if full:
        base_state = base_tensors(state)
        embedding = next(n for n in base_state if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
        base_state[embedding] = base_state[embedding].clone()
        base_state[embedding][list(spec.mask_token_ids)] = tensors[MASK_ROWS].to(base_state[embedding].dtype)
        model.save_pretrained(directory, safe_serialization=True, state_dict=base_state)
    record = adapter_record(adapters, spec, base, base_hash, full)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_adapter_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path}: cannot read {ADAPTER_CONFIG} ({error})") from None
    if not isinstance(record, dict) or record.get("format_version") != ADAPTER_FORMAT or record.get("kind") != "gated-lora":
        raise AdapterError(f"{path}: {ADAPTER_CONFIG} is not a gated-lora adapter of format {ADAPTER_FORMAT}")
    if record.get("gate") != GATE_RULE:
        raise AdapterError(f"{path}: unknown gating rule {record.get('gate')!r} (this version knows {GATE_RULE!r})")
    return record


def load_adapter(
    path: str | Path, *, base: str | None = None, dtype: Any = None, device: Any = None,
    revision: str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
) -> tuple[Any, Any, Any]:
    """The base model with the gated adapter of ``path`` attached, its tokenizer and MTP spec.

    ``base`` overrides the recorded base model (a moved directory, a hub mirror); a base whose
    weights hash differs from the recorded one is refused with a message naming both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_plugins.checkpoint import MTPSpec, add_mask_tokens, loading, weights_source

    path = Path(path)
    record = read_adapter_record(path)
    recorded = record["base"]["name_or_path"]
    source = str(path) if record.get("full") and base is None else (base or recorded)
    if not record.get("full") or base is not None:
        _check_base(path, source, recorded, record["base"].get("weights_sha256"), revision)
    with loading(source):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype if dtype is not None else "auto", revision=revision,
            trust_remote_code=trust_remote_code, **weights_source(source, allow_pickle=allow_pickle),
        )
    with loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    spec = MTPSpec.from_dict(record["mtp"])
    add_mask_tokens(model, tokenizer, num_tokens=len(spec.mask_token_ids), k_max=spec.k_max)
    from mtp_plugins.checkpoint import write_mtp_spec

    write_mtp_spec(model, spec)
    settings = AdapterSettings(rank=record["rank"], alpha=record["alpha"], targets=tuple(record["targets"]))
    adapters = attach_gated_lora(model, spec.mask_token_ids, settings)
    load_adapter_weights(model, path, spec.mask_token_ids)
    for p in adapters.parameters():
        p.requires_grad_(False)  # an inference model (set it back to fine-tune it further)
    if device is not None:
        model.to(device)
        adapters.gate.mask_ids = adapters.gate.mask_ids.to(model.get_input_embeddings().weight.device)
    model.eval()
    return model, tokenizer, spec


def load_adapter_weights(model: Any, path: Path, mask_ids: Sequence[int]) -> None:
    """Copy ``path``'s adapter weights into the adapters attached to ``model``, and its mask rows into
    the trainable rows (a training run resumed) or else into the embedding matrix."""
    from safetensors.torch import load_file

    adapters = adapters_of(model)
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    expected = {f"{name}.{w}" for name in adapters.modules for w in (_A, _B)} | {MASK_ROWS}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} does not fit this model and adapter's targets "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, module in adapters.modules.items():
            for w in (_A, _B):
                getattr(module, w).copy_(tensors[f"{name}.{w}"])
        trainable = getattr(model.get_input_embeddings(), MASK_ROWS, None)
        if trainable is not None:
            trainable.copy_(tensors[MASK_ROWS])
    export_mask_rows(model, mask_ids, tensors[MASK_ROWS])


def _check_base(path: Path, source: str, recorded: str, expected: str | None, revision: str | None) -> None:
    if expected is None:
        return
    try:
        actual = weights_hash(source, revision)
    except (OSError, AdapterError) as error:
        hint = "" if source != recorded else " (pass the base model's new place: base=PATH)"
        raise AdapterError(f"{path}: cannot read its base model {source}: {error}{hint}") from None
    if actual != expected:
        raise AdapterError(
            f"{path} is a gated adapter for {recorded} (weights sha256 {expected[:12]}...), but {source} has other "
            f"weights (sha256 {actual[:12]}...); load it with the base model it was trained on"
        )
