"""Gated low-rank adapters: mask slots learn, the next-token path never moves (METHOD.md section 10).

Every target projection ``W`` of the base model gets a low-rank path whose output counts only at
mask-token positions::

    y = W x + g(t) * B (A x) * alpha / rank,    g(t) = 1 exactly where token t is a mask token.

Real tokens never attend to mask slots (training layout, decode engine), so every real token
computes exactly the base model: its next-token predictions, ``ar`` and ``verify`` decoding and
every log-likelihood are the base model's by construction. The adapter cannot be merged into the
base weights (that would change the real tokens too); it travels as its own small checkpoint.

Where the gate applies is held by a ``Gate`` on the model. By default it is read from each call's
``input_ids`` (so ``model.generate`` or an lm-eval log-likelihood call, which hold no mask token,
run the base model and never touch the adapters); the decode engine and the trainer, which know
where their mask slots are, set it for a pass (``gate_tail``: the last n columns of every row;
``gate_all``; ``gate_off``), which keeps the shapes static for ``torch.compile``. The low-rank path
is computed only for the gated rows, and not at all in a pass without mask slots.

The adapter checkpoint (``save_adapter`` / ``load_adapter``) holds the adapter weights and the
trained mask-token embedding rows (``mtp_adapter.safetensors``), the tokenizer, and
``mtp_adapter.json``: the base model (hub id or path, and a content hash of its weights, checked on
load), the gating rule, rank, alpha, targets and the ``mtp`` block. It has no ``config.json`` and no
``adapter_config.json``, so neither transformers nor PEFT can take it for a model or for an adapter
to apply to every token: they refuse it. A full export (``save_adapter(..., full=True)``) also
writes the base weights (with the mask rows) as an ordinary HF model directory: any other tool then
loads the exact base model, and ``load_checkpoint`` the base with the gated adapter attached.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mtp_plugins.adapter_settings import (  # noqa: F401  (part of this module's API)
    ATTENTION,
    MLP,
    TARGET_SETS,
    AdapterError,
    AdapterSettings,
    parse_targets,
)

ADAPTER_CONFIG = "mtp_adapter.json"
ADAPTER_WEIGHTS = "mtp_adapter.safetensors"
ADAPTER_FORMAT = 1
GATE_RULE = "mask-token"  # g(t) = 1 exactly where token t is one of the mask tokens, 0 elsewhere
MASK_ROWS = "mtp_mask_embeddings"  # [mask tokens, hidden]: the trained embedding rows of the mask tokens
_A, _B = "mtp_lora_A", "mtp_lora_B"

@dataclass
class Gate:
    """Which rows of the current forward pass get the adapters: ``tail`` (the last n columns of every
    row) or ``rows`` (flat indices into batch x columns); neither: none."""

    mask_ids: torch.Tensor
    tail: int = 0
    rows: torch.Tensor | None = None
    forced: bool = False  # set for a pass by gate_tail / gate_all / gate_off, else read from input_ids


@dataclass
class GatedAdapters:
    """What ``attach_gated_lora`` added to a model (kept on the model as ``model.mtp_adapters``)."""

    settings: AdapterSettings
    gate: Gate
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # name -> projection with A, B
    handles: list[Any] = field(default_factory=list, repr=False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in (getattr(m, _A), getattr(m, _B))]


def adapters_of(model: Any) -> GatedAdapters | None:
    return model.__dict__.get("mtp_adapters")


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a projection: ``nn.Linear``, or transformers' GPT-2 ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def attach_gated_lora(
    model: Any, mask_ids: Sequence[int], settings: AdapterSettings = AdapterSettings(), *, dtype: torch.dtype | None = None,
    seed: int = 0,
) -> GatedAdapters:
    """Give every target projection of ``model`` a gated low-rank path (B starts at zero, so the
    model is unchanged until it trains). The parameters are registered on the projections
    themselves (``...q_proj.mtp_lora_A``), so FSDP shards them with their layer; ``dtype``: theirs
    (default: the projection's; the trainer keeps float32 master weights over a bf16 base). ``A`` is
    drawn from a generator seeded with ``seed``, so a run is reproducible."""
    if adapters_of(model) is not None:
        raise AdapterError("this model already has gated adapters attached")
    device = model.get_input_embeddings().weight.device
    gate = Gate(mask_ids=torch.tensor(list(mask_ids), dtype=torch.long, device=device))
    adapters = GatedAdapters(settings=settings, gate=gate)
    wanted = set(settings.targets)
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        features = _features(module)
        if features is None or name.rsplit(".", 1)[-1] not in wanted:
            continue
        kind = dtype or module.weight.dtype
        bound = 1.0 / math.sqrt(features[0])  # nn.Linear's default init (kaiming-uniform, a = sqrt(5))
        a = (torch.rand(settings.rank, features[0], generator=generator) * 2 - 1).mul_(bound)
        a = a.to(device=module.weight.device, dtype=kind)
        module.register_parameter(_A, torch.nn.Parameter(a))
        module.register_parameter(_B, torch.nn.Parameter(torch.zeros(features[1], settings.rank, dtype=kind, device=a.device)))
        # The gated path is the projection's own forward (a bound method; cheaper per call than a
        # forward hook, and a deepcopy of the model rebinds it to the copy), its state on the module.
        module.__dict__.update(_mtp_gate=gate, _mtp_scale=settings.scale)
        module.forward = types.MethodType(_gated_forward, module)
        adapters.modules[name] = module
    _group_shared_inputs(adapters.modules, settings.scale)
    if not adapters.modules:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _features(m) is not None})
        raise AdapterError(
            f"adapter targets {', '.join(settings.targets)} match no projection of {type(model).__name__}; "
            f"its projections: {', '.join(found)}"
        )
    adapters.handles.append(model.register_forward_pre_hook(_gate_from_inputs, with_kwargs=True))
    model.__dict__["mtp_adapters"] = adapters
    return adapters


def _gated_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The projection, plus its low-rank path on the gated rows of ``x`` ``[B, S, in]``."""
    output = type(module).forward(module, x)
    gate, scale = module._mtp_gate, module._mtp_scale
    tail, rows = gate.tail, gate.rows
    if not tail and rows is None:
        return output  # a pass without mask slots: the base projection alone
    if tail:
        tail = output.shape[1] if tail < 0 else tail
        if not torch.is_grad_enabled():
            group = module.__dict__.get("_mtp_group")
            if group is not None:
                low = group[0].delta(group[1], x, tail)
            else:
                a, b = _inference_weights(module, scale)
                low = torch.mm(torch.mm(x[:, -tail:].to(torch.float32).reshape(-1, a.shape[0]), a), b)
            output[:, -tail:] += low.view(output.shape[0], tail, -1)
            return output
        a, b = getattr(module, _A), getattr(module, _B)
        delta = (F.linear(F.linear(x[:, -tail:], a), b) * scale).to(output.dtype)  # [B, tail, out]
        if tail == output.shape[1]:
            return output + delta
        return torch.cat([output[:, :-tail], output[:, -tail:] + delta], dim=1)
    a, b = getattr(module, _A), getattr(module, _B)
    flat = output.reshape(-1, output.shape[-1])
    delta = F.linear(F.linear(x.reshape(-1, x.shape[-1]).index_select(0, rows), a), b) * scale
    return flat.index_add(0, rows, delta.to(flat.dtype)).view(output.shape)


def _inference_weights(module: torch.nn.Module, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^T`` and ``scale * B^T`` as contiguous float32 matrices, made once per weight version.

    Without gradients the low-rank path runs in float32 whatever the model's dtype: on a CPU a
    bfloat16 matrix product this small costs about 4x a float32 one (per-call overhead), and the
    adapter runs 2 of them per projection per pass."""
    a, b = getattr(module, _A), getattr(module, _B)
    # Trainable weights change under optimizers that do not bump the version counter (fused AdamW):
    # only frozen ones (a loaded checkpoint) are held.
    key = None if a.requires_grad or b.requires_grad else (a._version, b._version, a.data_ptr(), b.data_ptr())
    held = module.__dict__.get("_mtp_inference")
    if key is None or held is None or held[0] != key:
        with torch.no_grad():
            held = (key, a.detach().float().t().contiguous(), (b.detach().float() * scale).t().contiguous())
        module.__dict__["_mtp_inference"] = held
    return held[1], held[2]


#: Sibling projections that every supported architecture calls on the same input tensor, one after
#: the other: their low-rank paths share one pass over that input (one A product, one B product).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedInput:
    """The inference low-rank path of sibling projections on one input: ``[A_1 .. A_n]`` in one
    product, then a block-diagonal ``B`` in another, computed once for the first sibling called and
    handed to the others (each checks that it got the same input tensor)."""

    def __init__(self, members: list[torch.nn.Module], scale: float) -> None:
        self.members, self.scale = members, scale
        self._key: Any = None
        self._weights: Any = None
        self._input: torch.Tensor | None = None
        self._tail = 0
        self._parts: list[torch.Tensor] = []

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        params = [(getattr(m, _A), getattr(m, _B)) for m in self.members]
        trainable = any(a.requires_grad or b.requires_grad for a, b in params)  # see _inference_weights
        key = None if trainable else tuple((a._version, b._version, a.data_ptr(), b.data_ptr()) for a, b in params)
        if key is None or self._key != key:
            with torch.no_grad():
                a_cat = torch.cat([a.detach().float().t() for a, _ in params], dim=1).contiguous()  # [in, n*r]
                b_diag = torch.block_diag(*[b.detach().float().t() * self.scale for _, b in params])  # [n*r, sum out]
            self._key, self._weights = key, (a_cat, b_diag, [b.shape[0] for _, b in params])
        return self._weights

    def delta(self, index: int, x: torch.Tensor, tail: int) -> torch.Tensor:
        """[B * tail, out] float32: member ``index``'s low-rank path on the last ``tail`` columns of ``x``."""
        if self._input is not x or self._tail != tail or index == 0:
            a_cat, b_diag, outs = self._matrices()
            low = torch.mm(torch.mm(x[:, -tail:].to(torch.float32).reshape(-1, a_cat.shape[0]), a_cat), b_diag)
            self._input, self._tail, self._parts = x, tail, list(low.split(outs, dim=1))
        return self._parts[index]


def _group_shared_inputs(modules: dict[str, torch.nn.Module], scale: float) -> None:
    for names in SHARED_INPUT:
        parents: dict[str, list[torch.nn.Module]] = {}
        for name, module in modules.items():
            parent, _, last = name.rpartition(".")
            if last in names:
                parents.setdefault(parent, [None] * len(names))[names.index(last)] = module
        for members in parents.values():
            present = [m for m in members if m is not None]
            if len(present) > 1:
                group = _SharedInput(present, scale)
                for i, m in enumerate(present):
                    m.__dict__["_mtp_group"] = (group, i)


def _gate_from_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Unless a pass set the gate, it is where ``input_ids`` hold a mask token (none without ids)."""
    gate = model.__dict__["mtp_adapters"].gate
    if gate.forced:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    gate.tail, gate.rows = 0, None
    if isinstance(ids, torch.Tensor):
        rows = torch.isin(ids.flatten(), gate.mask_ids).nonzero().flatten()
        gate.rows = rows if rows.numel() else None


@contextmanager
def _forced(model: Any, tail: int = 0, rows: torch.Tensor | None = None) -> Iterator[None]:
    adapters = adapters_of(model)
    if adapters is None:
        yield
        return
    gate = adapters.gate
    before = (gate.tail, gate.rows, gate.forced)
    gate.tail, gate.rows, gate.forced = tail, rows, True
    try:
        yield
    finally:
        gate.tail, gate.rows, gate.forced = before


def gate_tail(model: Any, columns: int) -> Any:
    """For the passes inside: the adapters act on the last ``columns`` columns of every row (the
    engine's mask slots) and nowhere else; 0: nowhere. A no-op for a model without adapters."""
    return _forced(model, tail=columns)


def gate_all(model: Any) -> Any:
    """The adapters act on every column (a pass that feeds only mask slots)."""

    @contextmanager
    def every_column() -> Iterator[None]:
        with _forced(model, tail=-1):
            yield

    return every_column()


def gate_off(model: Any) -> Any:
    """The base model alone (the teacher: the same weights with the gate off)."""
    return _forced(model)


# ---------------------------------------------------------------------------------- mask rows


def train_mask_rows(model: Any, mask_ids: Sequence[int], dtype: torch.dtype | None = None) -> torch.nn.Parameter:
    """A trainable copy of the mask tokens' embedding rows (in ``dtype``; default the matrix's), used
    wherever ``input_ids`` hold a mask token (the embedding matrix itself stays frozen: no gradient or
    optimizer state for its other rows). ``export_mask_rows`` writes it back into the matrix."""
    embedding = model.get_input_embeddings()
    ids = torch.tensor(list(mask_ids), dtype=torch.long, device=embedding.weight.device)
    rows = torch.nn.Parameter(embedding.weight.detach()[ids].to(dtype or embedding.weight.dtype, copy=True))
    embedding.register_parameter(MASK_ROWS, rows)
    slot = torch.full((embedding.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
    slot[ids] = torch.arange(len(ids), device=ids.device)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        which = slot[args[0]]  # [B, S]: mask index, or -1 for real tokens
        mine = getattr(module, MASK_ROWS)
        return torch.where((which >= 0)[..., None], mine[which.clamp(min=0)].to(output.dtype), output)

    embedding.register_forward_hook(hook)
    return rows


def export_mask_rows(model: Any, mask_ids: Sequence[int], rows: torch.Tensor | None = None) -> None:
    """Write the trained mask rows (``rows``, or the embedding's ``mtp_mask_embeddings``) into the
    embedding matrix, where plain lookups (inference) read them."""
    embedding = model.get_input_embeddings()
    if rows is None:
        rows = getattr(embedding, MASK_ROWS)
    with torch.no_grad():
        embedding.weight[list(mask_ids)] = rows.detach().to(embedding.weight.dtype, copy=True)


# --------------------------------------------------------------------------- checkpoint files


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
    from safetensors.torch import load_file
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
